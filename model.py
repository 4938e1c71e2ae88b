"""A Whisper audio encoder with a character CTC head, a word-pooling adapter, a Llama decoder with
a preallocated KV cache, the speech LLM that splices audio in at the AUDIO placeholder; checkpoints.
Token rate: 100 mel frames/s (hop 10 ms) -> 50 frames/s after the stride-2 conv2 -> one audio
token per spoken word (where the CTC head's best path puts it), after one for the whole clip."""
import copy
import json
import math
import os
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

# -----------------------------------------------------------------------------
# configs and presets

@dataclass
class EncoderConfig:  # exactly Whisper's AudioEncoder constructor arguments
    n_mels: int = 80
    n_ctx: int = 1500  # encoder positions (30 s at 50 frames/s); shorter inputs slice it
    n_state: int = 384
    n_head: int = 6
    n_layer: int = 4


@dataclass
class AdapterConfig:
    bins: int = 4  # time-ordered parts each word's frames are averaged into (bins * d_in each)
    d_in: int = 0  # encoder width (make_configs fills it)
    d_out: int = 0  # decoder width (make_configs fills it)
    hidden: int = 0  # MLP width; 0 -> d_out

    def __post_init__(self):
        self.hidden = self.hidden or self.d_out


@dataclass
class DecoderConfig:
    vocab_size: int = 2000
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int = 0  # grouped-query attention; 0 -> n_heads
    hidden_dim: int = 512  # SwiGLU width
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 1024  # positions in the rotary table; a longer sequence grows it
    head_dim: int = 0  # 0 -> dim // n_heads (some Llama-family checkpoints differ)

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.head_dim % 2 == 0, "rotary needs an even head_dim"


PRESETS = {  # every encoder has Whisper's n_mels = 80 and n_ctx = 1500, every adapter 4 bins
    "tiny": dict(encoder=dict(n_state=32, n_head=2, n_layer=1), adapter=dict(hidden=64),
                 decoder=dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                              max_seq_len=512)),  # tests: trains in seconds
    "cpu": dict(encoder=dict(n_state=128, n_head=4, n_layer=3), adapter=dict(hidden=256),
                decoder=dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, hidden_dim=512,
                             max_seq_len=1024)),  # the toy run on 2 CPU cores (~3.1M parameters)
    "gpu": dict(encoder=dict(n_state=384, n_head=6, n_layer=4), adapter=dict(hidden=1024),
                decoder=dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1408,
                             max_seq_len=2048)),  # one GPU; Whisper tiny's encoder loads into it
}


def make_configs(preset, vocab_size):
    """-> (EncoderConfig, AdapterConfig, DecoderConfig); the adapter's widths are the others'."""
    p = PRESETS[preset]
    enc = EncoderConfig(**p["encoder"])
    dec = DecoderConfig(vocab_size=vocab_size, **p["decoder"])
    adp = AdapterConfig(**p["adapter"], d_in=enc.n_state, d_out=dec.dim)
    return enc, adp, dec


# -----------------------------------------------------------------------------
# audio encoder: Whisper's, plus a padding mask

def sinusoids(length, channels, max_timescale=10000):
    """Whisper's sinusoidal positional table (length, channels): [sin | cos] halves."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


def lengths_mask(lens, T):
    """lens (B,) -> (B, T) bool: True at each row's first lens[b] positions."""
    return torch.arange(T, device=lens.device)[None, :] < lens[:, None]


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state, n_head):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # Whisper: the key has no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x, key_mask=None):
        B, T, C = x.shape
        q, k, v = (f(x).view(B, T, self.n_head, -1).transpose(1, 2)
                   for f in (self.query, self.key, self.value))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state, n_head):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(),
                                 nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x, key_mask=None):
        x = x + self.attn(self.attn_ln(x), key_mask)
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    def __init__(self, n_mels, n_ctx, n_state, n_head, n_layer):
        super().__init__()
        self.n_ctx = n_ctx
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel, mel_lens=None):
        """mel (B, n_mels, T), mel_lens (B,) or None (all full) -> x (B, T // 2, n_state), lens
        (B,); Whisper's encoder when unpadded. Padding: zeroed before each conv, masked as keys."""
        B, _, T = mel.shape
        T2 = T // 2  # floor: an odd last frame is dropped (conv2 would give ceil(T / 2))
        assert T2 <= self.n_ctx, f"{T} mel frames exceed 2 * n_ctx = {2 * self.n_ctx}"
        if mel_lens is None:
            mel_lens = torch.full((B,), T, dtype=torch.long, device=mel.device)
        valid = lengths_mask(mel_lens, T)[:, None, :]  # (B, 1, T)
        x = F.gelu(self.conv1(mel * valid)) * valid
        x = F.gelu(self.conv2(x))[:, :, :T2].permute(0, 2, 1)  # (B, T2, n_state)
        x = x + self.positional_embedding[:T2].to(x.dtype)
        lens = mel_lens // 2
        keep = lengths_mask(lens, T2)  # (B, T2)
        key_mask = None
        if not bool(keep.all()):  # key 0 stays: an empty clip (< 2 frames) gives no NaN softmax
            key_mask = (keep | (torch.arange(T2, device=mel.device) == 0))[:, None, None, :]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_post(x) * keep[..., None], lens  # padded frames are zeros


WHISPER_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")


def torch_load(path, what, advice="", **kw):
    """torch.load onto the CPU, weights_only; an unreadable file: one ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        raise ValueError(f"{path}: not a readable {what} ({why}){advice}") from None


def read_whisper(path):
    """An openai-whisper checkpoint file -> {"dims", "model_state_dict"}, memory-mapped (GBs)."""
    ckpt = torch_load(path, "Whisper checkpoint", mmap=True)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("dims"), dict)
            and "model_state_dict" in ckpt):
        raise ValueError(f"{path}: expected openai-whisper's layout, a dict with 'dims' and "
                         "'model_state_dict'")
    missing = [k for k in WHISPER_DIMS if k not in ckpt["dims"]]
    if missing:
        raise ValueError(f"{path}: field 'dims' lacks {missing}")
    return ckpt


def whisper_config(ckpt):
    """The EncoderConfig of a Whisper checkpoint's encoder (read_whisper's dict)."""
    return EncoderConfig(*(ckpt["dims"][k] for k in WHISPER_DIMS))


def load_whisper_encoder(ckpt):
    """A Whisper checkpoint (a path or read_whisper's dict) -> its AudioEncoder, loaded strict."""
    ckpt = ckpt if isinstance(ckpt, dict) else read_whisper(ckpt)
    enc = AudioEncoder(**asdict(whisper_config(ckpt)))
    sd = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items()
          if k.startswith("encoder.")}
    try:
        enc.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the Whisper checkpoint's encoder weights do not match its dims "
                         f"({e})") from None
    return enc


# -----------------------------------------------------------------------------
# the speech encoder and the adapter: a character CTC head finds the words (the toy language is
# spoken as it is spelled), so the adapter hands the decoder one vector per word (docs/decisions.md,
# "The audio side"). Voice heads learn pitch, rate, emotion and noise, which CTC alone discards.

CTC_CHARS = " abcdefghijklmnopqrstuvwxyz"
SPACE = 1  # CTC_CHARS.index(" ") + 1: id 0 is CTC's blank
VOICE_CLASSES = {"pitch": ("low", "high"), "rate": ("slow", "fast"),
                 "emotion": ("neutral", "happy", "sad"), "noise": ("clean", "noisy")}


def spoken_letters(text):
    """A transcript as the toy synthesiser speaks it: letters and single spaces, a doubled letter
    once ('three' -> 'thre'; CTC would need a blank between, a boundary the audio lacks)."""
    s = " ".join("".join(c if c in CTC_CHARS else " " for c in text.lower()).split())
    return "".join(c for i, c in enumerate(s) if i == 0 or c != s[i - 1])


def ctc_targets(text):
    """spoken_letters(text) -> CTC target ids 1.. (0 is the blank)."""
    return [CTC_CHARS.index(c) + 1 for c in spoken_letters(text)]


def ctc_greedy(logp, lens):
    """Best-path CTC decoding: logp (B, T, C), lens (B,) -> strings (repeats merged, no blanks)."""
    out = []
    for path, n in zip(logp.argmax(-1).tolist(), lens.tolist()):
        ids = [c for i, c in enumerate(path[:n]) if c != 0 and (i == 0 or c != path[i - 1])]
        out.append("".join(CTC_CHARS[c - 1] for c in ids))
    return out


def word_spans(path):
    """A best CTC path (frame ids) -> [(start, end)] of the words: spans with a letter, between
    emitted spaces or the clip's edges."""
    spans, start, letters = [], 0, False
    for t, c in enumerate([*path, SPACE]):  # a space after the last frame ends the last word
        if c == SPACE:
            if letters:
                spans.append((start, t))
            start, letters = t + 1, False
        elif c != 0:
            letters = True
    return spans


def span_pool(x, spans, bins):
    """x (T, C), spans [(start, end)] -> (len(spans), bins * C): each span's mean in bins parts
    in time order (at least a frame each), so a word's letters keep their order."""
    w = x.new_zeros(len(spans) * bins, x.shape[0])  # averaging weights, one row per part
    for i, (s, e) in enumerate(spans):
        for j in range(bins):
            a = s + (e - s) * j // bins
            b = max(s + (e - s) * (j + 1) // bins, a + 1)
            w[i * bins + j, a:b] = 1.0 / (b - a)
    return (w @ x).reshape(len(spans), bins * x.shape[1])


class SpeechEncoder(nn.Module):
    """The audio encoder and its CTC head, whose best path cuts the clip into words."""

    def __init__(self, enc_cfg: EncoderConfig, bins=4):
        super().__init__()
        self.enc_cfg, self.bins = enc_cfg, bins
        self.encoder = AudioEncoder(**asdict(enc_cfg))
        self.ctc_head = nn.Linear(enc_cfg.n_state, len(CTC_CHARS) + 1)

    def frames(self, mel, mel_lens):
        """mel (B, n_mels, T), mel_lens (B,) -> x (B, T // 2, n_state), lens, CTC log-probs."""
        x, lens = self.encoder(mel, mel_lens)
        return x, lens, self.ctc_head(x).float().log_softmax(-1)

    def forward(self, mel, mel_lens):
        """-> (B, 1 + W, bins * n_state): the clip, then each word (padding zero), lens (B,)."""
        x, lens, logp = self.frames(mel, mel_lens)
        rows = [span_pool(x[b], [(0, n)] + word_spans(path[:n]), self.bins)
                for b, (path, n) in enumerate(zip(logp.argmax(-1).tolist(), lens.tolist()))]
        out = pad_sequence(rows, batch_first=True).to(x.dtype)  # padding rows zero
        return out, torch.tensor([len(r) for r in rows], device=x.device)


class CTCEncoder(SpeechEncoder):
    """The speech encoder with the voice heads that pretrain it beside CTC (they stay behind)."""

    def __init__(self, enc_cfg: EncoderConfig):
        super().__init__(enc_cfg)
        self.voice_heads = nn.ModuleDict({k: nn.Linear(enc_cfg.n_state, len(v))
                                          for k, v in VOICE_CLASSES.items()})

    def heads(self, mel, mel_lens):
        """-> CTC log-probs (B, T // 2, C), lens (B,), {voice task: logits (B, classes)}."""
        x, lens, logp = self.frames(mel, mel_lens)
        valid = lengths_mask(lens, x.size(1)).to(x.dtype)[..., None]
        pooled = (x * valid).sum(1) / lens.clamp(min=1)[:, None].to(x.dtype)  # the clip's mean
        return logp, lens, {k: head(pooled) for k, head in self.voice_heads.items()}

    def speech_encoder_state(self):
        """The state dict a SpeechLM's encoder loads: everything but the voice heads."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("voice_heads.")}


class Adapter(nn.Module):
    """SpeechEncoder's vectors into the decoder's input space. The clip's: an MLP. A word's: an MLP
    query scored against the (detached) token embeddings, read as their softmax average (LegoSLM:
    a sure word arrives as its token, a doubtful one as a mixture), plus how it was said."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.clip1 = nn.Linear(cfg.bins * cfg.d_in, cfg.hidden)
        self.clip2 = nn.Linear(cfg.hidden, cfg.d_out)
        self.word1 = nn.Linear(cfg.bins * cfg.d_in, cfg.hidden)
        self.word2 = nn.Linear(cfg.hidden, cfg.d_out)
        self.how = nn.Linear(cfg.bins * cfg.d_in, cfg.d_out)  # how a word was said, added to it

    def forward(self, x, lens, embeddings):
        """x (B, 1 + W, bins * d_in), lens (B,), embeddings (vocab, d_out) -> y (B, 1 + W, d_out)
        (padding rows zero), lens, word logits (B, W, vocab)."""
        # fixed lengths: left free, the clip's or the how vector grows until the other goes unread
        length = embeddings.detach().norm(dim=-1).mean()  # of an average token embedding
        clip = F.normalize(self.clip2(F.gelu(self.clip1(x[:, :1]))), dim=-1) * length  # (B, 1, d)
        logits = self.word2(F.gelu(self.word1(x[:, 1:]))) @ embeddings.detach().T  # (B, W, vocab)
        words = logits.float().softmax(-1).to(embeddings.dtype) @ embeddings  # (B, W, d_out)
        words = words + (F.normalize(self.how(x[:, 1:]), dim=-1) * length / 2).to(words.dtype)
        y = torch.cat([clip, words.to(clip.dtype)], 1)
        return y * lengths_mask(lens, x.shape[1])[..., None], lens, logits


# -----------------------------------------------------------------------------
# decoder: Llama

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 under bf16, as Llama
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_table(n_positions, head_dim, theta):
    """cos, sin (n_positions, head_dim), float32: the rotary embedding of positions 0..n-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.arange(n_positions).float()[:, None] * inv_freq  # (n, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (n, hd), the half-rotation layout of apply_rope
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Half-rotation layout (HF Llama): pairs are (i, i + hd/2), not interleaved (2i, 2i+1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # which of the KV cache's layers this one writes
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        """x (B, T, dim); cos, sin broadcast to (B, 1, T, hd); mask bool (True = attend) broadcast
        to (B, 1, T, keys), None = causal. A cache stores this call's k, v and gives all back."""
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for f in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh or nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nkv, keys, hd)
        # GQA: query head h reads kv head h // (n_heads // n_kv_heads). SDPA reads a cache grouped
        # in place; training repeats the heads (SDPA's grouped backward sums in another order).
        if T == 1 and cache is not None and torch.compiler.is_compiling():
            # a decode step under torch.compile: matmuls and a softmax the compiler fuses
            qg = q.view(B, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            scores = (qg @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, nkv, group, keys)
            y = scores.masked_fill(~mask, -math.inf).softmax(-1) @ v
            return self.o_proj(y.reshape(B, T, -1))
        if cache is None:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer_idx):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values per layer (B, n_kv_heads, max_len, head_dim), written in place; lengths[b]:
    row b's next position; end = max(lengths), an int (no sync). static: all max_len keys read."""

    def __init__(self, n_layers, batch_size, n_kv_heads, max_len, head_dim, dtype=None,
                 device=None, static=False):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.end, self.max_len, self.static = 0, max_len, static

    def update(self, layer, k, v):
        """k, v (B, nkv, T, hd) written from lengths[b] on -> keys, values 0 .. end + T - 1."""
        kc, vc = self.k[layer], self.v[layer]
        T = k.shape[2]
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        cols = self.lengths[:, None] + torch.arange(T, device=k.device)  # (B, T)
        kc[rows, :, cols] = k.transpose(1, 2)  # indexed as (B, T, n_kv_heads, head_dim)
        vc[rows, :, cols] = v.transpose(1, 2)
        n = self.max_len if self.static else self.end + T
        return kc[:, :, :n], vc[:, :, :n]

    def repeat_interleave(self, n, max_len=None):
        """Row b -> rows b*n .. b*n+n-1 (n samples a prompt); max_len: a static cache that long."""
        B, H, T, D = self.k[0].shape
        size = max_len or T
        new = KVCache(len(self.k), B * n, H, size, D, self.k[0].dtype, self.k[0].device,
                      static=max_len is not None)
        for src, dst in zip(self.k + self.v, new.k + new.v):
            dst.view(B, n, H, size, D)[:, :, :, :T] = src[:, None]  # (B, 1, H, T, D) to n copies
        new.lengths.copy_(self.lengths.repeat_interleave(n))
        new.end = self.end
        return new


class Decoder(nn.Module):
    """Llama. Call it under torch.no_grad() when using a cache (the cache is written in place)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one Parameter, two names
        # computed once, indexed by position; not persistent: a checkpoint holds weights only
        cos, sin = rope_table(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def logits(self, hidden):
        return hidden @ self.lm_head.weight.T

    def _embed(self, input_ids, inputs_embeds):
        assert (input_ids is None) != (inputs_embeds is None), "give input_ids or inputs_embeds"
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def rotary(self, n):
        """cos, sin (n, head_dim) of positions 0..n-1; the table at least doubles to reach n."""
        if n > self.rope_cos.shape[0]:
            with torch.inference_mode(False):  # the table outlives a sampling call's inference mode
                size = max(n, 2 * self.rope_cos.shape[0])
                cos, sin = rope_table(size, self.cfg.head_dim, self.cfg.rope_theta)
                self.rope_cos, self.rope_sin = cos.to(self.rope_cos), sin.to(self.rope_sin)
        return self.rope_cos[:n], self.rope_sin[:n]

    def _run(self, x, cos, sin, mask=None, cache=None):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)

    def forward(self, input_ids=None, inputs_embeds=None):
        """input_ids (B, T) or inputs_embeds (B, T, dim) -> hidden (B, T, dim) after the final norm.
        Causal; rows are right padded, so padding never reaches a real position."""
        x = self._embed(input_ids, inputs_embeds)
        return self._run(x, *self.rotary(x.shape[1]))  # positions 0..T-1 for every row

    def new_cache(self, batch_size, max_len):
        c, w = self.cfg, self.embed_tokens.weight
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, max_len, c.head_dim, w.dtype, w.device)

    def prefill(self, cache, lengths, input_ids=None, inputs_embeds=None):
        """Right-padded prompts (B, T), lengths (B,) -> hidden (B, T, dim), into a fresh cache
        (padding too: decode overwrites and masks it); hidden[b, lengths[b] - 1] predicts next."""
        x = self._embed(input_ids, inputs_embeds)
        T = x.shape[1]
        assert cache.end == 0, "prefill needs a fresh cache"
        assert T <= cache.max_len, f"prompt of {T} tokens exceeds the cache ({cache.max_len})"
        h = self._run(x, *self.rotary(T), cache=cache)
        cache.lengths = lengths.to(device=x.device, dtype=torch.long).clone()
        cache.end = int(cache.lengths.max())
        return h

    def decode(self, cache, input_ids=None, inputs_embeds=None, step=None):
        """One token per row, input_ids (B,) or inputs_embeds (B, 1, dim), at position lengths[b]
        -> hidden (B, dim). step: decode_step (None) or a faster one (xopd.sample's step)."""
        x = self._embed(None if input_ids is None else input_ids[:, None], inputs_embeds)
        assert cache.end < cache.max_len, "KV cache full"
        h = (step or self.decode_step)(x, cache)  # x, h (B, 1, dim)
        cache.lengths += 1  # in place (prefill copied it): a CUDA graph reads this tensor
        cache.end += 1
        return h[:, 0]

    def decode_step(self, x, cache):
        """x (B, 1, dim) at positions cache.lengths -> (B, 1, dim). A static cache fixes the shapes
        and reads nothing on the host (the mask spans all max_len keys): a CUDA graph replays it."""
        pos = cache.lengths
        n = cache.max_len if cache.static else cache.end + 1  # keys up to the longest row's end
        mask = lengths_mask(pos + 1, n)[:, None, None, :]  # (B, 1, 1, n)
        cos, sin = self.rotary(n)
        cos, sin = cos[pos][:, None, None], sin[pos][:, None, None]  # (B, 1, 1, hd)
        return self._run(x, cos, sin, mask, cache)


# DecoderConfig field -> (config.json name, default if absent or null: None required, 0 derived)
HF_CONFIG = {"vocab_size": ("vocab_size", None), "dim": ("hidden_size", None),
             "n_layers": ("num_hidden_layers", None), "n_heads": ("num_attention_heads", None),
             "n_kv_heads": ("num_key_value_heads", 0), "hidden_dim": ("intermediate_size", None),
             "rope_theta": ("rope_theta", 10000.0), "norm_eps": ("rms_norm_eps", 1e-6),
             "tie_embeddings": ("tie_word_embeddings", False),
             "max_seq_len": ("max_position_embeddings", 2048), "head_dim": ("head_dim", 0)}


def load_llama(sd, config):
    """A Hugging Face Llama state dict ("model." prefix optional; a tied one may lack lm_head) or
    its .bin / .pt file, and its config.json -> Decoder; anything unfit: ValueError naming it."""
    sd = sd if isinstance(sd, dict) else read_weights(sd)
    for key, plain in (("rope_scaling", None), ("attention_bias", False), ("mlp_bias", False),
                       ("hidden_act", "silu")):  # plain Llama's values: anything else is refused
        if config.get(key) and config[key] != plain:
            raise ValueError(f"field {key!r} = {config[key]!r} is not supported (plain Llama: "
                             f"only {plain!r})")
    for name, default in HF_CONFIG.values():
        if default is None and config.get(name) is None:
            raise ValueError(f"missing field {name!r}")
    # each value as the type of DecoderConfig's default (rope_theta a float, tie_embeddings a bool)
    cfg = DecoderConfig(**{f: type(getattr(DecoderConfig, f))(config.get(name) or default)
                           for f, (name, default) in HF_CONFIG.items()})
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in sd.items()
          if not k.endswith("rotary_emb.inv_freq")}  # a buffer some checkpoints carry
    if cfg.tie_embeddings and "embed_tokens.weight" in sd:
        sd.setdefault("lm_head.weight", sd["embed_tokens.weight"])
    dec = Decoder(cfg)
    want = dec.state_dict()
    missing, extra = [k for k in want if k not in sd], [k for k in sd if k not in want]
    if missing or extra:
        more_m, more_e = " ..." if len(missing) > 5 else "", " ..." if len(extra) > 5 else ""
        raise ValueError(f"the weights lack {missing[:5]}{more_m} and have {extra[:5]}{more_e} "
                         "beyond what the config describes")
    bad = [f"{k} {tuple(sd[k].shape)} (config: {tuple(v.shape)})" for k, v in want.items()
           if sd[k].shape != v.shape]
    if bad:
        raise ValueError(f"tensor shapes disagree with the config: {bad[:3]}")
    dec.load_state_dict(sd, strict=True)
    return dec


# a model folder's weights, in the order looked for; an .index.json file names the shards
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


def read_weights(path):
    """One weights file (.bin, .pt, or .safetensors with the optional package) -> state dict."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the optional package safetensors"
                             " (pip install safetensors), or give pytorch_model.bin") from None
        return load_file(path)
    return torch_load(path, "weights file")


def read_hf_config(folder):
    """A Hugging Face model folder's config.json -> its contents (a Llama-architecture model's)."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{cfg_path}: not found (expected a Hugging Face model folder: "
                         f"config.json, weights as {' / '.join(WEIGHT_FILES)}, tokenizer.json)")
    try:
        with open(cfg_path) as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{cfg_path}: field 'model_type' = {config['model_type']!r} is not "
                         "supported (a Llama-architecture model is expected)")
    if not isinstance(config.get("vocab_size"), int):
        raise ValueError(f"{cfg_path}: field 'vocab_size' is missing or not an integer")
    return config


def load_llama_folder(folder):
    """A Hugging Face Llama folder (config.json, WEIGHT_FILES) -> (Decoder, config); a problem is
    a ValueError naming the file (and the field or tensor)."""
    config, cfg_path = read_hf_config(folder), os.path.join(folder, "config.json")
    found = [name for name in WEIGHT_FILES if os.path.exists(os.path.join(folder, name))]
    if not found:
        raise ValueError(f"{folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
    where, shards = os.path.join(folder, found[0]), found[:1]
    if where.endswith(".index.json"):
        with open(where) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        if not shards:
            raise ValueError(f"{where}: field 'weight_map' is missing or empty")
    sd = {}
    for name in shards:  # one file, or the shards an index names
        if not os.path.exists(os.path.join(folder, name)):
            raise ValueError(f"{where}: names the shard {name}, which is not in {folder}")
        sd.update(read_weights(os.path.join(folder, name)))
    try:
        return load_llama(sd, config), config
    except ValueError as e:  # the config's or the weights' fault: name the file it is in
        bad_config = str(e).startswith(("field", "missing field"))
        raise ValueError(f"{cfg_path if bad_config else where}: {e}") from None


def llama_config(cfg: DecoderConfig):
    """The inverse of load_llama's reading: a DecoderConfig as a Hugging Face Llama config.json."""
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                **{name: getattr(cfg, f) for f, (name, _) in HF_CONFIG.items()})


# -----------------------------------------------------------------------------
# the speech LLM

class SpeechLM(nn.Module):
    """encoder + adapter + decoder, which reads [chat prefix, audio vectors, chat suffix]."""

    def __init__(self, enc_cfg: EncoderConfig, adp_cfg: AdapterConfig, dec_cfg: DecoderConfig,
                 audio_token_id=-1):
        super().__init__()
        assert (adp_cfg.d_in, adp_cfg.d_out) == (enc_cfg.n_state, dec_cfg.dim), "adapter widths"
        self.encoder = SpeechEncoder(enc_cfg, adp_cfg.bins)
        self.adapter = Adapter(adp_cfg)
        self.decoder = Decoder(dec_cfg)
        self.audio_token_id = audio_token_id  # the AUDIO placeholder's id in the shared tokenizer
        self.enc_cfg, self.adp_cfg = enc_cfg, adp_cfg  # with decoder.cfg: what a checkpoint stores

    def encode_audio(self, mel, mel_lens):
        """mel (B, n_mels, T), mel_lens (B,) -> audio_embeds (B, 1 + words, dim), lens (B,)."""
        return self.audio_embeds(*self.encoder(mel, mel_lens))

    def audio_embeds(self, words, lens):
        """SpeechEncoder's output (or a cached copy) -> audio_embeds (B, 1 + W, dim), lens (B,)."""
        return self.adapter(words, lens, self.decoder.embed_tokens.weight)[:2]

    def embed(self, input_ids, lengths, audio_embeds=None, audio_lens=None):
        """input_ids (B, T) right padded, lengths (B,) -> inputs_embeds (B, T', dim), lengths (B,):
        row b's AUDIO placeholder (at most one) replaced by audio_embeds[b, :audio_lens[b]]."""
        if audio_embeds is not None and self.audio_token_id < 0:
            raise ValueError("SpeechLM.audio_token_id is not set: the placeholder cannot be found")
        # the placeholder's own row is never read (a real teacher's vocabulary has none): embed 0
        tok = self.decoder.embed_tokens(input_ids.masked_fill(input_ids == self.audio_token_id, 0))
        rows = []
        for b in range(input_ids.shape[0]):
            n = int(lengths[b])
            where = (input_ids[b, :n] == self.audio_token_id).nonzero().flatten().tolist()
            if len(where) > 1:
                raise ValueError(f"row {b} holds {len(where)} audio placeholders, expected <= 1")
            if where and audio_embeds is None:
                raise ValueError(f"row {b} holds an audio placeholder but no audio was given")
            p = where[0] if where else n  # no placeholder: the row's tokens, nothing between
            audio = audio_embeds[b, :int(audio_lens[b])].to(tok.dtype) if where else tok[b, :0]
            rows.append(torch.cat([tok[b, :p], audio, tok[b, p + 1:n]]))
        lens = torch.tensor([len(r) for r in rows], dtype=torch.long, device=input_ids.device)
        return pad_sequence(rows, batch_first=True), lens  # (B, T', dim), right padded with zeros

    def forward(self, input_ids, lengths, mel=None, mel_lens=None):
        """-> hidden (B, T', dim), lengths (B,) for a batch of (speech or text) prompts."""
        audio = self.encode_audio(mel, mel_lens) if mel is not None else (None, None)
        x, lens = self.embed(input_ids, lengths, *audio)
        return self.decoder(inputs_embeds=x), lens

    def freeze_audio(self, frozen=True):
        """Encoder and adapter stop (or resume) training; a flag, the forward is unchanged."""
        for p in list(self.encoder.parameters()) + list(self.adapter.parameters()):
            p.requires_grad_(not frozen)
        return self


def student_from_teacher(teacher: Decoder, enc_cfg, adp_cfg, audio_token_id=-1):
    """The speech LLM whose decoder is a deep copy of the text teacher (new encoder and adapter)."""
    adp_cfg = replace(adp_cfg, d_in=enc_cfg.n_state, d_out=teacher.cfg.dim)
    student = SpeechLM(enc_cfg, adp_cfg, teacher.cfg, audio_token_id)
    student.decoder = copy.deepcopy(teacher)  # deepcopy keeps a tied head tied
    return student


# -----------------------------------------------------------------------------
# checkpoints: written atomically, loaded with weights_only=True, configs inside

def atomic_write(path, write, mode="w"):
    """write(f) into path + ".tmp", then rename it to path: a crash never leaves half a file. Any
    failure removes the .tmp and is one OSError naming path, with the errno beneath (if any)."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        why = f"{type(e).__name__}: {e}" if cause is None else cause.strerror or str(cause)
        err = OSError(f"{path}: not written ({why})")
        err.errno = getattr(cause, "errno", None)
        raise err from None
    finally:  # a failure or an interrupt (which stays what it is) leaves no .tmp
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, payload):
    """payload: a dict with at least "model" (a state dict), "configs" (model_configs), "train"."""
    atomic_write(path, lambda f: torch.save(payload, f), mode="wb")


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint; a missing, truncated or foreign one: an error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ckpt = torch_load(path, "checkpoint", "; delete it and rerun the stage that makes it")
    missing = [k for k in ("model", "configs", "train")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks the field(s) {missing}; "
                         "expected one written by train.py")
    return ckpt


def model_configs(model):
    """The asdict(cfg)s a checkpoint stores, from which build_model rebuilds the model."""
    if isinstance(model, Decoder):
        return {"decoder": asdict(model.cfg)}
    if isinstance(model, CTCEncoder):
        return {"encoder": asdict(model.enc_cfg)}
    return {"encoder": asdict(model.enc_cfg), "adapter": asdict(model.adp_cfg),
            "decoder": asdict(model.decoder.cfg), "audio_token_id": model.audio_token_id}


def build_model(configs):
    """model_configs -> a Decoder (teacher), CTCEncoder (encoder) or SpeechLM (student)."""
    if "decoder" not in configs:
        return CTCEncoder(EncoderConfig(**configs["encoder"]))
    dec = DecoderConfig(**configs["decoder"])
    if "encoder" not in configs:
        return Decoder(dec)
    return SpeechLM(EncoderConfig(**configs["encoder"]), AdapterConfig(**configs["adapter"]),
                    dec, audio_token_id=configs["audio_token_id"])


def load_model(path, device):
    """-> (the model of a checkpoint on device, the checkpoint)."""
    ckpt = load_checkpoint(path)
    m = build_model(ckpt["configs"])
    try:
        m.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the config stored with them "
                         f"({e})") from None
    return m.to(device), ckpt


def pick_device():
    """-> (device, autocast dtype or None, the reason to print): CPU float32, GPU bf16 autocast."""
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        why = f"CUDA device {torch.cuda.get_device_name()} found; "
        why += "bf16 autocast" if bf16 else "float32 (no bf16 support)"
        return torch.device("cuda"), (torch.bfloat16 if bf16 else None), why
    why = f"no CUDA device; CPU with {torch.get_num_threads()} threads, float32, no autocast"
    return torch.device("cpu"), None, why
