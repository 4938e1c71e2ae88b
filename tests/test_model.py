"""model.py: Whisper / Llama compatibility against naive float64 references written here,
KV-cached decoding against full recomputation, padding invariance, rotary, audio splicing."""
import errno
import json
import math
import os
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import model as M

ATOL = 1e-5  # cached vs full, padded vs alone (fp32)


def tiny_decoder(seed=0, **kw):
    _, _, cfg = M.make_configs("tiny", vocab_size=97)
    cfg = M.DecoderConfig(**{**asdict(cfg), **kw})
    torch.manual_seed(seed)
    dec = M.Decoder(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a missing weight would show
        for layer in dec.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return dec


# -----------------------------------------------------------------------------
# naive float64 references (independent of model.py)


def ref_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_softmax_attention(q, k, v, allowed):
    """q (T, d), k/v (S, d), allowed (T, S) bool."""
    s = q @ k.T / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - s.max(-1, keepdim=True).values)
    return (p / p.sum(-1, keepdim=True)) @ v


def ref_whisper_encoder(sd, n_head, mel):
    """Whisper's encoder equations, one clip, float64. sd: Whisper keys without 'encoder.'."""
    g = {k: v.double() for k, v in sd.items()}
    x = ref_gelu(F.conv1d(mel.double()[None], g["conv1.weight"], g["conv1.bias"], padding=1))
    # (T2, C)
    x = ref_gelu(F.conv1d(x, g["conv2.weight"], g["conv2.bias"], stride=2, padding=1))[0].T
    T2, C = x.shape
    x = x + g["positional_embedding"][:T2]
    hs = C // n_head
    i = 0
    while f"blocks.{i}.attn.query.weight" in g:
        p = f"blocks.{i}."
        h = ref_layer_norm(x, g[p + "attn_ln.weight"], g[p + "attn_ln.bias"])
        q = h @ g[p + "attn.query.weight"].T + g[p + "attn.query.bias"]
        k = h @ g[p + "attn.key.weight"].T
        v = h @ g[p + "attn.value.weight"].T + g[p + "attn.value.bias"]
        allowed = torch.ones(T2, T2, dtype=torch.bool)
        o = torch.cat([ref_softmax_attention(q[:, j * hs:(j + 1) * hs], k[:, j * hs:(j + 1) * hs],
                                             v[:, j * hs:(j + 1) * hs], allowed)
                       for j in range(n_head)], -1)
        x = x + o @ g[p + "attn.out.weight"].T + g[p + "attn.out.bias"]
        h = ref_layer_norm(x, g[p + "mlp_ln.weight"], g[p + "mlp_ln.bias"])
        h = ref_gelu(h @ g[p + "mlp.0.weight"].T + g[p + "mlp.0.bias"])
        h = h @ g[p + "mlp.2.weight"].T + g[p + "mlp.2.bias"]
        x = x + h
        i += 1
    return ref_layer_norm(x, g["ln_post.weight"], g["ln_post.bias"])


def whisper_state_dict(dims, gen):
    """Random weights under Whisper's key names and shapes; the positional table by its formula."""
    C, M_, L = dims["n_audio_state"], dims["n_mels"], dims["n_audio_layer"]

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=gen) * s

    half = C // 2
    inv = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float64))
    t = torch.arange(dims["n_audio_ctx"], dtype=torch.float64)[:, None] * inv[None]
    sd = {"conv1.weight": r(C, M_, 3, s=0.1), "conv1.bias": r(C),
          "conv2.weight": r(C, C, 3), "conv2.bias": r(C),
          "positional_embedding": torch.cat([t.sin(), t.cos()], 1).float(),
          "ln_post.weight": 1 + r(C), "ln_post.bias": r(C)}
    for i in range(L):
        p = f"blocks.{i}."
        sd.update({p + "attn.query.weight": r(C, C), p + "attn.query.bias": r(C),
                   p + "attn.key.weight": r(C, C),
                   p + "attn.value.weight": r(C, C), p + "attn.value.bias": r(C),
                   p + "attn.out.weight": r(C, C), p + "attn.out.bias": r(C),
                   p + "attn_ln.weight": 1 + r(C), p + "attn_ln.bias": r(C),
                   p + "mlp.0.weight": r(4 * C, C), p + "mlp.0.bias": r(4 * C),
                   p + "mlp.2.weight": r(C, 4 * C), p + "mlp.2.bias": r(C),
                   p + "mlp_ln.weight": 1 + r(C), p + "mlp_ln.bias": r(C)})
    return sd


def ref_llama(sd, cfg, ids):
    """HF Llama equations, one sequence, float64. sd: HF keys without 'model.'; cfg: config.json's
    dict."""
    g = {k: v.double() for k, v in sd.items()}
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg["hidden_size"]
    hd = D // H
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    T = len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    def rope(x):  # x (T, hd): pairs (i, i + hd/2) rotate by pos * theta^(-2i/hd)
        out = x.clone()
        for pos in range(T):
            for i in range(hd // 2):
                a = pos * theta ** (-2 * i / hd)
                c, s = math.cos(a), math.sin(a)
                out[pos, i] = x[pos, i] * c - x[pos, i + hd // 2] * s
                out[pos, i + hd // 2] = x[pos, i + hd // 2] * c + x[pos, i] * s
        return out

    x = g["embed_tokens.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for n in range(cfg["num_hidden_layers"]):
        p = f"layers.{n}."
        h = rms(x, g[p + "input_layernorm.weight"])
        q, k, v = (h @ g[p + f"self_attn.{w}_proj.weight"].T for w in "qkv")
        heads = []
        for j in range(H):
            kvj = j // (H // KV)
            heads.append(ref_softmax_attention(rope(q[:, j * hd:(j + 1) * hd]),
                                               rope(k[:, kvj * hd:(kvj + 1) * hd]),
                                               v[:, kvj * hd:(kvj + 1) * hd], causal))
        x = x + torch.cat(heads, -1) @ g[p + "self_attn.o_proj.weight"].T
        h = rms(x, g[p + "post_attention_layernorm.weight"])
        a = h @ g[p + "mlp.gate_proj.weight"].T
        up = h @ g[p + "mlp.up_proj.weight"].T
        x = x + (a * torch.sigmoid(a) * up) @ g[p + "mlp.down_proj.weight"].T
    x = rms(x, g["norm.weight"])
    head = g["lm_head.weight"] if "lm_head.weight" in g else g["embed_tokens.weight"]
    return x @ head.T


def llama_state_dict(cfg, gen, with_head):
    D, H, KV, F_, V = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size", "vocab_size"))
    hd = D // H

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=gen) * s

    sd = {"embed_tokens.weight": r(V, D, s=1.0), "norm.weight": 1 + r(D)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"layers.{n}."
        sd.update({p + "self_attn.q_proj.weight": r(H * hd, D),
                   p + "self_attn.k_proj.weight": r(KV * hd, D),
                   p + "self_attn.v_proj.weight": r(KV * hd, D),
                   p + "self_attn.o_proj.weight": r(D, H * hd),
                   p + "mlp.gate_proj.weight": r(F_, D), p + "mlp.up_proj.weight": r(F_, D),
                   p + "mlp.down_proj.weight": r(D, F_),
                   p + "input_layernorm.weight": 1 + r(D),
                   p + "post_attention_layernorm.weight": 1 + r(D)})
    if with_head:
        sd["lm_head.weight"] = r(V, D)
    return sd


# -----------------------------------------------------------------------------
# compatibility


def test_whisper_encoder_matches_reference(tmp_path):  # at Whisper tiny's dims
    dims = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
    gen = torch.Generator().manual_seed(0)
    sd = whisper_state_dict(dims, gen)
    ckpt = {"dims": dims, "model_state_dict": {**{"encoder." + k: v for k, v in sd.items()},
                                               "decoder.token_embedding.weight": torch.zeros(4, 4)}}
    torch.save(ckpt, tmp_path / "tiny.pt")
    enc = M.load_whisper_encoder(str(tmp_path / "tiny.pt")).eval()
    # the loaded table is the checkpoint's (float64 formula here); sinusoids() computes it in
    # float32
    # like Whisper, whose angles reach 1500 rad, hence the loose tolerance
    assert torch.equal(enc.positional_embedding, sd["positional_embedding"])
    assert (M.sinusoids(1500, 384) - sd["positional_embedding"]).abs().max() < 1e-3
    mel = torch.randn(1, 80, 3000, generator=gen)  # full length: 30 s
    with torch.no_grad():
        x, lens = enc(mel)
        ref = ref_whisper_encoder(sd, 6, mel[0])
        assert x.shape == (1, 1500, 384) and lens.tolist() == [1500]
        assert (x[0].double() - ref).abs().max() < 2e-4
        # shorter: the positional table is sliced
        x, lens = enc(mel[:, :, :400], torch.tensor([400]))
        ref = ref_whisper_encoder(sd, 6, mel[0, :, :400])
        assert x.shape == (1, 200, 384) and (x[0].double() - ref).abs().max() < 2e-4


@pytest.mark.parametrize("tied", [False, True])
def test_llama_decoder_matches_reference(tied):
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
               rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=128)
    sd = llama_state_dict(cfg, torch.Generator().manual_seed(1), with_head=not tied)
    # untied: HF's "model." prefix and a stale rotary buffer; tied: bare keys and no lm_head.weight
    ck = ({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in sd.items()}
          | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}) if not tied else sd
    dec = M.load_llama(ck, cfg).eval()
    assert (dec.lm_head.weight is dec.embed_tokens.weight) == tied
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = dec.logits(dec(ids))[0]
    ref = ref_llama(sd, cfg, ids[0].tolist())
    assert (logits.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_llama_config_round_trip():
    """llama_config writes what load_llama reads: a decoder comes back with its config, logits."""
    cfg = M.DecoderConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                          rope_theta=5e5, norm_eps=1e-6, tie_embeddings=False, max_seq_len=64,
                          head_dim=16)
    torch.manual_seed(0)
    dec = M.Decoder(cfg).eval()
    back = M.load_llama(dec.state_dict(), json.loads(json.dumps(M.llama_config(cfg)))).eval()
    assert back.cfg == cfg
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert torch.equal(back.logits(back(ids)), dec.logits(dec(ids)))


# -----------------------------------------------------------------------------
# KV cache


def full_hidden(dec, seq):
    with torch.no_grad():
        return dec(torch.tensor([seq]))[0]


@pytest.mark.parametrize("use_embeds", [False, True])
def test_cached_decoding_rows_of_different_lengths(use_embeds):
    dec = tiny_decoder()
    g = torch.Generator().manual_seed(3)
    lens, steps = [5, 9, 2], 6
    seqs = [torch.randint(0, 97, (n + steps,), generator=g).tolist() for n in lens]
    T = max(lens)
    prompts = torch.randint(0, 97, (3, T), generator=g)  # padding is random tokens: must not matter
    for b, n in enumerate(lens):
        prompts[b, :n] = torch.tensor(seqs[b][:n])
    with torch.no_grad():
        cache = dec.new_cache(3, T + steps)
        lengths = torch.tensor(lens)
        if use_embeds:
            h = dec.prefill(cache, lengths, inputs_embeds=dec.embed_tokens(prompts))
        else:
            h = dec.prefill(cache, lengths, input_ids=prompts)
        assert lengths.tolist() == lens  # the caller's tensor is not changed by decode below
        fulls = [full_hidden(dec, s) for s in seqs]
        for b, n in enumerate(lens):
            assert (h[b, :n] - fulls[b][:n]).abs().max() <= ATOL
        for j in range(steps):
            tok = torch.tensor([seqs[b][lens[b] + j] for b in range(3)])
            if use_embeds:
                hd = dec.decode(cache, inputs_embeds=dec.embed_tokens(tok)[:, None])
            else:
                hd = dec.decode(cache, input_ids=tok)
            assert hd.shape == (3, dec.cfg.dim)
            for b, n in enumerate(lens):
                assert (hd[b] - fulls[b][n + j]).abs().max() <= ATOL, (b, j)
        assert cache.lengths.tolist() == [n + steps for n in lens]
        assert lengths.tolist() == lens


def assert_rows_are_full_recomputation(dec, prompts, lens, n_rep, conts, outs):
    """Row r of a cache repeated n_rep times after prefill continues prompt r // n_rep with
    conts[r]: its hidden states outs[r] (steps, dim) must be the full forward's over prompt +
    continuation."""
    for r in range(len(outs)):
        b = r // n_rep
        full = full_hidden(dec, prompts[b, :lens[b]].tolist() + conts[r].tolist())
        assert (outs[r] - full[lens[b]:]).abs().max() <= ATOL, r


def test_cached_decoding_rows_repeated_after_prefill():
    dec = tiny_decoder(seed=1)
    g = torch.Generator().manual_seed(4)
    lens, n_rep, steps = [3, 7], 3, 5
    prompts = torch.randint(0, 97, (2, 7), generator=g)
    with torch.no_grad():
        cache = dec.new_cache(2, 7 + steps)
        dec.prefill(cache, torch.tensor(lens), input_ids=prompts)
        cache = cache.repeat_interleave(n_rep)
        assert cache.lengths.tolist() == [3, 3, 3, 7, 7, 7] and cache.k[0].shape[0] == 6
        conts = torch.randint(0, 97, (6, steps), generator=g)  # every sample continues differently
        # (6, steps, dim)
        outs = torch.stack([dec.decode(cache, input_ids=conts[:, j]) for j in range(steps)], 1)
    assert_rows_are_full_recomputation(dec, prompts, lens, n_rep, conts, outs)


def test_static_cache_fixed_shapes_in_place_and_equal_to_full_recomputation():
    # a static cache (what a CUDA graph needs): allocated once at its final size by
    # repeat_interleave, every step reads keys of one shape, lengths advances in place, and the
    # hidden states are full recomputation's, rows of different lengths, n samples per prompt
    dec = tiny_decoder(seed=1)
    g = torch.Generator().manual_seed(4)
    lens, n_rep, steps = [3, 7], 3, 5
    prompts = torch.randint(0, 97, (2, 7), generator=g)
    with torch.no_grad():
        prefilled = dec.new_cache(2, 7)  # the prompt only
        dec.prefill(prefilled, torch.tensor(lens), input_ids=prompts)
        cache = prefilled.repeat_interleave(n_rep, max_len=7 + steps)
        assert cache.static and cache.k[0].shape == (6, dec.cfg.n_kv_heads, 7 + steps,
                                                     dec.cfg.head_dim)
        assert cache.lengths.tolist() == [3, 3, 3, 7, 7, 7]
        memory = [t.data_ptr() for t in cache.k + cache.v + [cache.lengths]]
        shapes, update = [], cache.update

        def recorded(layer, k, v):  # the keys attention reads, shape by shape
            out = update(layer, k, v)
            shapes.append(out[0].shape)
            return out
        cache.update = recorded
        conts = torch.randint(0, 97, (6, steps), generator=g)
        # (6, steps, dim)
        outs = torch.stack([dec.decode(cache, input_ids=conts[:, j]) for j in range(steps)], 1)
        assert set(shapes) == {(6, dec.cfg.n_kv_heads, 7 + steps, dec.cfg.head_dim)}
        assert [t.data_ptr() for t in cache.k + cache.v + [cache.lengths]] == memory
        assert cache.lengths.tolist() == [3 + steps] * 3 + [7 + steps] * 3
    assert_rows_are_full_recomputation(dec, prompts, lens, n_rep, conts, outs)


def test_decoder_padding_invariance():
    dec = tiny_decoder(seed=2)
    g = torch.Generator().manual_seed(5)
    row = torch.randint(0, 97, (6,), generator=g)
    alone = full_hidden(dec, row.tolist())
    for T, B in [(6, 1), (10, 3), (15, 2)]:
        # other rows and the padding differ each time
        batch = torch.randint(0, 97, (B, T), generator=g)
        batch[B - 1, :6] = row
        with torch.no_grad():
            h = dec(batch)
        assert (h[B - 1, :6] - alone).abs().max() <= ATOL


# -----------------------------------------------------------------------------
# rotary


def test_rotary_depends_on_relative_position_only():
    dec = tiny_decoder(seed=3)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    cos, sin = dec.rotary(9 + 37)
    pos = torch.arange(9)
    with torch.no_grad():  # every layer and the final norm, with rows of the model's own table
        x = dec.embed_tokens(ids)
        h0 = dec._run(x, cos[pos], sin[pos])
        h1 = dec._run(x, cos[pos + 37], sin[pos + 37])  # shift every position: same outputs
        # stretch: relative distances change, outputs must too
        h2 = dec._run(x, cos[pos * 2], sin[pos * 2])
    torch.testing.assert_close(h0, dec(ids), rtol=0, atol=0)  # positions 0..T-1 are forward's
    assert (h0 - h1).abs().max() < 1e-5
    assert (h0 - h2).abs().max() > 1e-3
    # the score <rope(q, m), rope(k, n)> is a function of m - n
    q, k = torch.randn(2, 16, dtype=torch.float64)
    cos, sin = M.rope_table(64, 16, 10000.0)

    def score(m, n):
        qm = M.apply_rope(q, cos[m].double(), sin[m].double())
        return (qm * M.apply_rope(k, cos[n].double(), sin[n].double())).sum()

    assert abs(score(3, 1) - score(53, 51)) < 1e-5
    assert abs(score(3, 1) - score(1, 3)) > 1e-3


def test_rotary_table_grows_past_max_seq_len():
    short, long = tiny_decoder(seed=4, max_seq_len=8), tiny_decoder(seed=4, max_seq_len=64)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(short(ids), long(ids), rtol=0, atol=1e-6)
        assert short.rope_cos.shape[0] == 20  # grown to the sequence (at least twice its size)
        torch.testing.assert_close(short.rope_cos, long.rope_cos[:20], rtol=0, atol=1e-6)
        # cached decoding past the table: the table grows again, the outputs stay a full pass's
        cache = short.new_cache(2, 50)
        short.prefill(cache, torch.tensor([20, 20]), input_ids=ids)
        for _ in range(15):
            h = short.decode(cache, input_ids=ids[:, 0])
        full = long(torch.cat([ids, ids[:, :1].expand(2, 15)], 1))
    assert short.rope_cos.shape[0] == 40  # twice 20, enough for position 34
    assert (h - full[:, -1]).abs().max() <= ATOL


# -----------------------------------------------------------------------------
# encoder padding, adapter, splicing, the student copy


def test_encoder_padding_invariance():
    enc_cfg, _, _ = M.make_configs("tiny", 97)
    torch.manual_seed(7)
    enc = M.AudioEncoder(**asdict(enc_cfg)).eval()
    g = torch.Generator().manual_seed(8)
    mel_lens = [301, 200, 512]
    # the padding is garbage, not zeros: must not matter
    mels = torch.randn(3, 80, 512, generator=g)
    with torch.no_grad():
        x, lens = enc(mels, torch.tensor(mel_lens))
        assert x.shape == (3, 256, 32) and lens.tolist() == [150, 100, 256]
        for b, n in enumerate(mel_lens):
            alone, _ = enc(mels[b:b + 1, :, :n])
            assert alone.shape[1] == n // 2
            assert (x[b, :n // 2] - alone[0]).abs().max() <= ATOL, b
            assert (x[b, n // 2:] == 0).all()
        x, lens = enc(mels[:2], torch.tensor([1, 512]))  # an empty clip gives zeros, not NaN
        assert lens.tolist() == [0, 256] and torch.isfinite(x).all() and (x[0] == 0).all()


def test_spoken_letters_and_ctc_targets():
    assert M.spoken_letters("Three plus fifteen ?  tell me.") == "thre plus fiften tel me"
    assert M.ctc_targets("a b") == [2, M.SPACE, 3] and M.ctc_targets("?") == []


def test_word_spans_cut_at_emitted_spaces():
    S, a, b = M.SPACE, 2, 3
    assert M.word_spans([0, a, a, 0, S, 0, b, 0, S, S, 0, 0, S, a, 0]) == [(0, 4), (5, 8), (13, 15)]
    assert M.word_spans([0, S, 0, S]) == [] and M.word_spans([a]) == [(0, 1)]
    assert M.word_spans([]) == []


def test_span_pool_parts_in_time_order():
    torch.manual_seed(0)
    x = torch.randn(10, 3, dtype=torch.float64)
    got = M.span_pool(x, [(0, 10), (2, 4), (7, 8)], bins=4).reshape(3, 4, 3)
    parts = [[(0, 2), (2, 5), (5, 7), (7, 10)],   # 10 frames into 4 parts
             [(2, 3), (2, 3), (3, 4), (3, 4)],    # 2 frames: each part takes the frame it starts in
             [(7, 8)] * 4]
    for i, span in enumerate(parts):
        for j, (s, e) in enumerate(span):
            torch.testing.assert_close(got[i, j], x[s:e].mean(0), rtol=0, atol=1e-12)


def test_speech_encoder_pools_the_clip_then_each_word(monkeypatch):
    enc_cfg, adp_cfg, _ = M.make_configs("tiny", 97)
    torch.manual_seed(9)
    enc = M.SpeechEncoder(enc_cfg, adp_cfg.bins).eval()
    S, a = M.SPACE, 2
    paths = torch.tensor([[0, a, 0, S, a, a, S, 0, a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                          # row 1 has 5 frames
                          [a, S, a, 0, 0, a, S, a, S, a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    real = enc.frames

    def frames(mel, mel_lens):  # the real frames, and CTC log-probs whose best path is `paths`
        x, lens, _ = real(mel, mel_lens)
        return x, lens, F.one_hot(paths[:, :x.shape[1]],
                                  len(M.CTC_CHARS) + 1).float().log_softmax(-1)
    monkeypatch.setattr(enc, "frames", frames)
    mel = torch.randn(2, 80, 40)
    with torch.no_grad():
        words, lens = enc(mel, torch.tensor([40, 10]))  # 20 and 5 frames
        x, _, _ = real(mel, torch.tensor([40, 10]))
    assert lens.tolist() == [4, 3] and words.shape == (2, 4, adp_cfg.bins * enc_cfg.n_state)
    # row 1's padding frames cut no words
    for b, spans in enumerate([[(0, 20), (0, 3), (4, 6), (7, 20)], [(0, 5), (0, 1), (2, 5)]]):
        torch.testing.assert_close(words[b, :len(spans)], M.span_pool(x[b], spans, adp_cfg.bins))
    assert (words[1, 3:] == 0).all()
    ctc = M.CTCEncoder(enc_cfg)
    # strict: the student's encoder is the CTC encoder less its voice heads
    enc.load_state_dict(ctc.speech_encoder_state())


def test_adapter_clip_mlp_then_words_as_embedding_mixtures():
    _, adp_cfg, _ = M.make_configs("tiny", 97)
    torch.manual_seed(9)
    adp = M.Adapter(adp_cfg)
    x = torch.randn(2, 5, adp_cfg.bins * adp_cfg.d_in)
    emb = torch.randn(97, adp_cfg.d_out)
    with torch.no_grad():
        y, lens, logits = adp(x, torch.tensor([5, 2]), emb)
        assert lens.tolist() == [5, 2] and (y[1, 2:] == 0).all() and logits.shape == (2, 4, 97)
        for b, n in enumerate([5, 2]):
            clip = adp.clip2(F.gelu(adp.clip1(x[b, 0])))
            # an embedding's length
            torch.testing.assert_close(y[b, 0], clip / clip.norm() * emb.norm(dim=1).mean())
            for w in range(1, n):
                q = adp.word2(F.gelu(adp.word1(x[b, w])))
                p = torch.softmax(emb @ q, 0)  # one probability per vocabulary token
                torch.testing.assert_close(logits[b, w - 1], emb @ q)
                how = adp.how(x[b, w])
                length = emb.norm(dim=1).mean()
                want = (p[:, None] * emb).sum(0) + how / how.norm() * length / 2
                torch.testing.assert_close(y[b, w], want)
    # a sure word arrives as its token's embedding, plus how it was said (half an embedding's
    # length)
    with torch.no_grad():
        adp.word2.weight.zero_()
        unit = emb / emb.norm(dim=1, keepdim=True)
        adp.word2.bias.copy_(100.0 * unit[7])
        y, _, _ = adp(x, torch.tensor([5, 5]), unit)
        how = adp.how(x[:, 1:])
    torch.testing.assert_close(y[:, 1:], unit[7] + how / how.norm(dim=-1, keepdim=True) / 2,
                               atol=1e-4, rtol=0)


def tiny_speech_lm(audio_token_id=5):
    enc_cfg, adp_cfg, dec_cfg = M.make_configs("tiny", 97)
    torch.manual_seed(10)
    return M.SpeechLM(enc_cfg, adp_cfg, dec_cfg, audio_token_id=audio_token_id).eval()


def test_audio_splicing_lands_at_the_placeholder():
    m = tiny_speech_lm()
    A, D = 5, m.decoder.cfg.dim
    ids = torch.tensor([[10, 11, A, 12, 13, 14, 0, 0],
                        [A, 20, 21, 22, 0, 0, 0, 0],
                        [30, 31, 32, 33, 34, 35, 36, 37],   # text only
                        [40, 41, 42, 43, 44, 45, A, 0]])
    lengths = torch.tensor([6, 4, 8, 7])
    audio = torch.randn(4, 5, D)
    audio_lens = torch.tensor([3, 5, 0, 2])
    with torch.no_grad():
        x, new_lens = m.embed(ids, lengths, audio, audio_lens)
        E = m.decoder.embed_tokens.weight
        want = [torch.cat([E[[10, 11]], audio[0, :3], E[[12, 13, 14]]]),
                torch.cat([audio[1, :5], E[[20, 21, 22]]]),
                E[[30, 31, 32, 33, 34, 35, 36, 37]],
                torch.cat([E[[40, 41, 42, 43, 44, 45]], audio[3, :2]])]
    assert new_lens.tolist() == [8, 8, 8, 8] and x.shape == (4, 8, D)
    for b, w in enumerate(want):
        assert torch.equal(x[b, :len(w)], w), b
        assert (x[b, len(w):] == 0).all()
    # a text-only batch is plain embedding; two placeholders in a row are refused
    x, new_lens = m.embed(ids[2:3], lengths[2:3])
    assert torch.equal(x[0], want[2]) and new_lens.tolist() == [8]
    with pytest.raises(ValueError):
        m.embed(torch.tensor([[A, 1, A]]), torch.tensor([3]), audio[:1], audio_lens[:1])


def test_speech_lm_end_to_end_and_freeze():
    m = tiny_speech_lm()
    mel = torch.randn(2, 80, 160)  # 1.6 s -> 80 encoder frames -> the clip's token + one per word
    emb, alens = m.encode_audio(mel, torch.tensor([160, 96]))
    words, wlens = m.encoder(mel, torch.tensor([160, 96]))
    assert torch.equal(alens, wlens) and emb.shape == (2, int(wlens.max()), m.decoder.cfg.dim)
    torch.testing.assert_close(emb, m.adapter(words, wlens, m.decoder.embed_tokens.weight)[0])
    ids = torch.tensor([[1, 2, 5, 3], [1, 5, 3, 0]])
    m.freeze_audio()
    h, lens = m(ids, torch.tensor([4, 3]), mel, torch.tensor([160, 96]))
    assert lens.tolist() == [3 + int(alens[0]), 2 + int(alens[1])]
    assert h.shape == (2, int(lens.max()), m.decoder.cfg.dim)
    h[0, lens[0] - 1].sum().backward()
    assert all(p.grad is None for p in [*m.encoder.parameters(), *m.adapter.parameters()])
    assert m.decoder.layers[0].mlp.up_proj.weight.grad is not None
    m.freeze_audio(False)
    assert all(p.requires_grad for p in m.parameters())


def test_student_copy_gives_teacher_logits_exactly():
    teacher = tiny_decoder(seed=11)
    enc_cfg, adp_cfg, _ = M.make_configs("tiny", 97)
    student = M.student_from_teacher(teacher, enc_cfg, adp_cfg, audio_token_id=5)
    ids = torch.randint(6, 97, (3, 10), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        t_logits = teacher.logits(teacher(ids))
        assert torch.equal(student.decoder.logits(student.decoder(ids)), t_logits)
        x, _ = student.embed(ids, torch.full((3,), 10))  # the student's text path
        assert torch.equal(student.decoder.logits(student.decoder(inputs_embeds=x)), t_logits)
    # a copy, not shared: training the student leaves the teacher alone; the tie survives
    assert student.decoder.lm_head.weight is student.decoder.embed_tokens.weight
    with torch.no_grad():
        student.decoder.embed_tokens.weight.add_(1.0)
    assert torch.equal(teacher.logits(teacher(ids)), t_logits)


def test_a_checkpoint_rebuilds_the_model_it_was_saved_from(tmp_path):
    """model_configs -> save_checkpoint -> load_model gives back the kind of model each stage saves
    (teacher, pretrained encoder, student) with its weights, its audio token and its outputs; a
    config that does not fit the weights stored with it is named. In every preset the adapter's
    widths are the encoder's and the decoder's."""
    for preset, p in M.PRESETS.items():
        enc, adp, dec = M.make_configs(preset, vocab_size=123)
        assert (adp.d_in, adp.d_out, dec.vocab_size) == (p["encoder"]["n_state"],
                                                         p["decoder"]["dim"], 123), preset
    enc, _, _ = M.make_configs("tiny", 97)
    torch.manual_seed(3)
    mel, mel_lens = torch.randn(2, 80, 160), torch.tensor([160, 96])
    ids, lens = torch.tensor([[1, 2, 7, 3], [1, 7, 3, 0]]), torch.tensor([4, 3])
    # its norms are not the initial 1s
    models = {"teacher": (tiny_decoder(seed=3), lambda m: m.logits(m(ids))),
              "encoder": (M.CTCEncoder(enc).eval(), lambda m: m.heads(mel, mel_lens)[0]),
              "student": (tiny_speech_lm(audio_token_id=7),
                          lambda m: m(ids, lens, mel, mel_lens)[0])}
    for name, (m, run) in models.items():
        path = str(tmp_path / name / "model.pt")
        M.save_checkpoint(path,
                          {"model": m.state_dict(), "configs": M.model_configs(m), "train": {}})
        back, _ = M.load_model(path, "cpu")
        assert type(back) is type(m), name
        saved, loaded = m.state_dict(), back.state_dict()
        assert loaded.keys() == saved.keys(), name
        assert all(torch.equal(loaded[k], v) for k, v in saved.items()), name
        with torch.no_grad():
            assert torch.equal(run(back.eval()), run(m)), name
    assert back.audio_token_id == 7
    ck = M.load_checkpoint(str(tmp_path / "teacher" / "model.pt"))
    ck["configs"]["decoder"]["hidden_dim"] = 64
    M.save_checkpoint(str(tmp_path / "other.pt"), ck)
    with pytest.raises(ValueError,
                       match=r"other\.pt: weights do not match the config stored with them"):
        M.load_model(str(tmp_path / "other.pt"), "cpu")


def enospc(f):
    """A write that fills the disk: half a file, then the error a full disk gives."""
    f.write(b"half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


def enospc_under_torch(f):
    """The same, wrapped in an error of another kind."""
    try:
        enospc(f)
    except OSError as e:
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from e


def torch_save_on_a_full_disk(f):
    """torch.save's own failure on a full disk (Linux's /dev/full): an OSError raised while its
    RuntimeError is handled, two chained tracebacks unless caught."""
    f.write(b"half a checkpoint")
    with open("/dev/full", "wb") as full:
        torch.save({"model": torch.zeros(10_000)}, full)


@pytest.mark.parametrize("write", [
    enospc, enospc_under_torch,
    pytest.param(torch_save_on_a_full_disk, marks=pytest.mark.skipif(
        not os.path.exists("/dev/full"), reason="needs /dev/full"))])
def test_a_full_disk_is_one_error_naming_the_file_and_leaves_no_temporary(tmp_path, write):
    path = str(tmp_path / "run" / "ckpt.pt")
    M.atomic_write(path, lambda f: f.write(b"the last good one"), mode="wb")
    with pytest.raises(OSError) as caught:
        M.atomic_write(path, write, mode="wb")
    err = caught.value
    assert str(err) == f"{path}: not written (No space left on device)"
    assert err.errno == errno.ENOSPC
    assert err.__cause__ is None and err.__suppress_context__  # one error, no chained traceback
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # no ckpt.pt.tmp
    assert open(path, "rb").read() == b"the last good one"  # the previous file stays whole


def test_an_interrupted_write_leaves_no_temporary_and_stays_an_interrupt(tmp_path):
    def interrupted(f):
        f.write("partial")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        M.atomic_write(str(tmp_path / "eval.json"), interrupted)
    assert os.listdir(tmp_path) == []


def test_a_truncated_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    path = str(tmp_path / "omni" / "model.pt")
    dec = tiny_decoder()
    M.save_checkpoint(path,
                      {"model": dec.state_dict(), "configs": M.model_configs(dec), "train": {}})
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(whole[:len(whole) // 2])  # what a kill mid-copy leaves
    with pytest.raises(ValueError) as caught:
        M.load_model(path, "cpu")
    msg = str(caught.value)
    assert msg.startswith(f"{path}: not a readable checkpoint (")
    assert msg.endswith("; delete it and rerun the stage that makes it")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
