"""Tests for xopd.py: sampling, the fused log-prob gather, the X-OPD / GKD / SFT losses, one step.
Every reference is naive and float64 where numbers are compared."""
import copy
import dataclasses
import itertools
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import bench
import data
import model
import xopd


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors gain nothing from threads, and when other test files run beside this one,
    # oversubscribed OpenMP barriers can slow small ops a hundredfold
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def naive_logprobs(h, w, t, temperature=1.0):
    return F.log_softmax(h @ w.T / temperature, dim=-1).gather(1, t[:, None]).squeeze(1)


def tiny_decoder(vocab=16, dtype=torch.float64, seed=0, scale=20.0):
    """A 2-layer Llama; weights scaled up from the 0.02 init: distributions far from uniform."""
    torch.manual_seed(seed)
    cfg = model.DecoderConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              hidden_dim=64)
    dec = model.Decoder(cfg)
    with torch.no_grad():
        dec.embed_tokens.weight.mul_(scale)  # tied head: sharper logits
    return dec.to(dtype).eval()


def chi2_pvalue(counts, probs):
    """Pearson chi-square goodness of fit over the tokens with probability > 0."""
    n = counts.sum()
    keep = probs > 0
    expected = n * probs[keep]
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2).item()


# -----------------------------------------------------------------------------
# token_logprobs


@pytest.mark.parametrize("N,V,d,chunk",
                         [(37, 50, 8, 16), (1, 50, 8, 16), (64, 11, 5, 1024), (48, 30, 6, 16)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_float64_values_and_grads(N, V, d, chunk, temperature):
    g = torch.Generator().manual_seed(N * V)
    h = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, dtype=torch.float64, generator=g)  # a non-uniform incoming gradient
    out = xopd.token_logprobs(h, w, t, chunk_size=chunk, temperature=temperature)
    gh, gw = torch.autograd.grad((out * upstream).sum(), (h, w))
    ref = naive_logprobs(h, w, t, temperature)
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (h, w))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(gh, rh, rtol=0, atol=1e-9)
    torch.testing.assert_close(gw, rw, rtol=0, atol=1e-9)


def test_token_logprobs_float32_and_bf16():
    g = torch.Generator().manual_seed(1)
    h64 = torch.randn(200, 32, dtype=torch.float64, generator=g)
    w64 = torch.randn(300, 32, dtype=torch.float64, generator=g) * 0.3
    t = torch.randint(0, 300, (200,), generator=g)
    ref = naive_logprobs(h64, w64, t)
    ref_sum = naive_logprobs(h64.requires_grad_(), w64.requires_grad_(), t).sum()
    rh, rw = torch.autograd.grad(ref_sum, (h64, w64))
    h, w = h64.detach().float().requires_grad_(), w64.detach().float().requires_grad_()
    out = xopd.token_logprobs(h, w, t, chunk_size=64)
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.double(), rh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-5)
    # bf16 inputs: accumulation in float32, so the only error is the inputs' own rounding
    hb, wb = h64.detach().bfloat16().requires_grad_(), w64.detach().bfloat16().requires_grad_()
    outb = xopd.token_logprobs(hb, wb, t, chunk_size=64)
    assert outb.dtype == torch.float32
    refb = naive_logprobs(hb.detach().double(), wb.detach().double(), t)
    torch.testing.assert_close(outb.double(), refb, rtol=1e-5, atol=1e-5)
    gb = torch.autograd.grad(outb.sum(), (hb, wb))
    assert gb[0].dtype == torch.bfloat16 and gb[1].dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# sample_next_token


def filtered_probs(logits, temperature, top_k, top_p):
    """Reference filter written differently: loop over the sorted tokens."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        keep[i] = True
        mass += p[i].item()
    if top_p < 1.0:
        q = torch.where(keep, p, 0.0)
        q = q / q.sum()
        keep2 = torch.zeros_like(keep)
        mass = 0.0
        for i in order.tolist():
            if not keep[i] or mass >= top_p:
                break
            keep2[i] = True
            mass += q[i].item()
        keep = keep2
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    for top_p, kept in [(0.8, 2), (0.81, 3), (0.01, 1), (0.5, 1), (0.96, 4), (1.0, 4)]:
        draws = torch.stack([xopd.sample_next_token(logits, torch.Generator().manual_seed(s),
                                                    top_p=top_p)[0]
                             for s in range(300)])
        assert set(draws.flatten().tolist()) == set(range(kept)), (top_p, kept)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0),
                                                     (1.0, 0, 0.8), (0.8, 6, 0.9)])
def test_sample_next_token_frequencies(temperature, top_k, top_p):
    """Chi-square goodness of fit of 20000 draws to the filtered softmax, significance 1e-4
    (a correct sampler fails one in 10^4 runs; the seed is fixed, so it is deterministic)."""
    V, draws = 10, 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 1.5
    gen = torch.Generator().manual_seed(4)
    ids, lps = xopd.sample_next_token(logits.expand(draws, V), gen, temperature, top_k, top_p)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    counts = torch.bincount(ids, minlength=V).double()
    assert (counts[probs == 0] == 0).all(), "a filtered-out token was drawn"
    assert chi2_pvalue(counts, probs) > 1e-4
    # the returned log-prob is under the filtered, renormalised distribution
    torch.testing.assert_close(lps.double(), probs.log()[ids], rtol=0, atol=1e-5)


def test_sample_next_token_large_vocabulary():
    """The inverse-CDF draw over a running sum of 8192 probabilities: rows of different
    distributions, each token's frequency pooled into 16 bins of the vocabulary (low ids, where
    the running sum is small, and high ids, where it is near 1, alike), and the tail's many rare
    tokens drawn as often as their total mass says (Poisson, within 4 standard deviations)."""
    V, draws = 8192, 4000
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(5)) * 3.0
    logits[1, -1] = logits[1].max() + 2.0  # row 1: a heavy last token, the top of the running sum
    gen = torch.Generator().manual_seed(6)
    for r in range(2):
        ids, _ = xopd.sample_next_token(logits[r].expand(draws, V), gen)
        probs = torch.softmax(logits[r].double(), -1)
        bins = torch.arange(V) * 16 // V
        counts = torch.bincount(bins[ids], minlength=16).double()
        mass = torch.zeros(16, dtype=torch.float64).index_add_(0, bins, probs)
        assert chi2_pvalue(counts, mass) > 1e-4
        rare = probs < 1e-5  # the tail: each token under 1e-5, together drawn at their total mass
        expected = draws * probs[rare].sum().item()
        assert rare.sum() > V // 4
        assert abs(rare[ids].sum().item() - expected) < 4 * expected ** 0.5 + 2


def test_sample_next_token_greedy():
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    ids, lp = xopd.sample_next_token(logits, None, temperature=0.0)
    assert torch.equal(ids, logits.argmax(-1)) and torch.equal(lp, torch.zeros(5))


# -----------------------------------------------------------------------------
# KV-cached sampling with a tiny decoder


def prompts(vocab, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        ids[b, :n] = torch.randint(1, vocab, (n,), generator=g)
    return ids, torch.tensor(lens)


def test_greedy_equals_uncached_argmax():
    dec = tiny_decoder()
    ids, lens = prompts(16, [5, 2, 7])
    out, mask, lp = xopd.sample(dec, lens, input_ids=ids, max_new_tokens=8, eos_id=99,
                                temperature=0.0)
    assert out.shape == (3, 8) and mask.all()
    with torch.no_grad():
        for b in range(3):
            seq = ids[b, :lens[b]].tolist()
            for _ in range(8):  # recompute the whole prefix every step
                seq.append(dec.logits(dec(torch.tensor([seq]))[0, -1]).argmax().item())
            assert out[b].tolist() == seq[lens[b]:]


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sample_logprobs_match_recomputation(temperature, top_k):
    dec = tiny_decoder()
    ids, lens = prompts(16, [4, 6])
    out, mask, lp = xopd.sample(dec, lens, input_ids=ids, n=3, max_new_tokens=6, eos_id=0,
                                temperature=temperature, top_k=top_k,
                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for r in range(out.size(0)):
            b = r // 3  # rows b*n .. b*n+n-1 belong to prompt b
            seq = torch.cat([ids[b, :lens[b]], out[r]])[None]
            # (L, V) predicting each sampled token
            logits = dec.logits(dec(seq)[0, lens[b] - 1:-1]) / temperature
            if top_k:
                kth = logits.topk(top_k, -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            ref = logits.log_softmax(-1).gather(1, out[r, :, None]).squeeze(1)
            m = mask[r]
            torch.testing.assert_close(lp[r][m], ref[m], rtol=0, atol=1e-9)


def test_sample_eos_mask_seed_and_n():
    dec = tiny_decoder(vocab=8, scale=5.0)
    ids, lens = prompts(8, [3, 5, 4, 2])
    kw = dict(input_ids=ids, n=4, max_new_tokens=40, eos_id=3,
              generator=torch.Generator().manual_seed(1))
    out, mask, lp = xopd.sample(dec, lens, **kw)
    is_eos = out == 3
    ended = is_eos.any(1)
    # this seed mixes ended rows and rows cut at max_new_tokens
    assert 0 < int(ended.sum()) < out.size(0)
    for r in range(out.size(0)):
        if ended[r]:
            first = is_eos[r].nonzero()[0].item()
            assert mask[r, :first + 1].all() and not mask[r, first + 1:].any()  # eos itself is real
            assert (out[r, first:] == 3).all()  # finished rows keep emitting eos
            assert (lp[r, first + 1:] == 0).all()
        else:
            assert mask[r].all() and out.size(1) == 40
    # a seed reproduces the rollouts; n samples of one prompt differ
    kw["generator"] = torch.Generator().manual_seed(1)
    again = xopd.sample(dec, lens, **kw)
    assert all(torch.equal(a, b) for a, b in zip((out, mask, lp), again))
    for b in range(4):
        group = {tuple(out[b * 4 + i][mask[b * 4 + i]].tolist()) for i in range(4)}
        assert len(group) > 1


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_sampling_matches_eager():
    # rows of different lengths, n per prompt, end tokens, top-k: the compiled step (its own
    # attention, keys a symbolic size after the first step) changes no token
    dec = tiny_decoder(vocab=8, scale=5.0)
    ids, lens = prompts(8, [3, 5, 4, 2])
    kw = dict(input_ids=ids, n=3, max_new_tokens=12, eos_id=3, top_k=6)
    eager = xopd.sample(dec, lens, **kw, generator=torch.Generator().manual_seed(2))
    compiled = xopd.sample(dec, lens, **kw, generator=torch.Generator().manual_seed(2),
                           step=bench.compiled_step(dec))
    # some rows end, some run to the limit
    assert 0 < int((eager[0] == 3).any(1).sum()) < eager[0].size(0)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    torch.testing.assert_close(compiled[2], eager[2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed,top_k", [(1, 0), (3, 6)])
@pytest.mark.parametrize("way", ["static", "graph"])
def test_fixed_shape_sampling_matches_the_default(way, seed, top_k):
    # float64, rows of different lengths, n per prompt, end tokens: the static cache (and, on a
    # CPU, the graph's buffers run eagerly) give the default's tokens, mask and log-probs. Seed 1:
    # every row ends, at L = 33, so the graphed loop (which asks every 8 steps whether all rows have
    # ended) must drop its trailing steps; seed 3: some rows run to the limit.
    dec = tiny_decoder(vocab=8, scale=3.0)
    ids, lens = prompts(8, [3, 5, 4, 2])
    kw = dict(input_ids=ids, n=3, max_new_tokens=40, eos_id=3, top_k=top_k)
    ref = xopd.sample(dec, lens, **kw, generator=torch.Generator().manual_seed(seed))
    step = bench.static_step(dec) if way == "static" else bench.DecodeGraph(dec)
    out = xopd.sample(dec, lens, **kw, generator=torch.Generator().manual_seed(seed), step=step)
    ended = (ref[0] == 3).any(1)
    assert ended.any() and (ended.all() and ref[0].size(1) < 40 if seed == 1 else not ended.all())
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=1e-12)
    assert out[2].dtype == torch.float64


def test_decode_graph_replays_on_its_own_buffers():
    # the graph's bookkeeping, run eagerly on a CPU: the input goes through the graph's own buffer,
    # the output is one buffer overwritten at each call, and a cache in other memory (a replay
    # would read and write the old one) is captured anew
    dec = tiny_decoder()
    ids, lens = prompts(16, [4, 6])
    with torch.inference_mode():
        prefilled = dec.new_cache(2, 6)
        dec.prefill(prefilled, lens, input_ids=ids)
        cache = prefilled.repeat_interleave(2, max_len=10)
        ref = prefilled.repeat_interleave(2, max_len=10)
        step = bench.DecodeGraph(dec)
        outs = []
        for t in range(3):
            tok = torch.tensor([1, 2, 3, 4]) + t
            h = dec.decode(cache, input_ids=tok, step=step)
            outs.append(h.clone())
            torch.testing.assert_close(h, dec.decode(ref, input_ids=tok), rtol=0, atol=0)
        assert step.out.data_ptr() == h.data_ptr() and not torch.equal(outs[0], outs[2])
        cache.lengths = cache.lengths + 0  # the same values in new memory
        old_out = step.out
        h = dec.decode(cache, input_ids=tok + 1, step=step)
        assert step.out is not old_out  # captured again, on the new memory
        torch.testing.assert_close(h, dec.decode(ref, input_ids=tok + 1), rtol=0, atol=0)
        assert torch.equal(cache.lengths, ref.lengths)
        with pytest.raises(AssertionError, match="static"):
            bench.DecodeGraph(dec)(dec.embed_tokens(tok)[:, None], dec.new_cache(4, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_sampling_matches_eager_and_repeats(amp):
    # on the GPU: the graphed rollout gives the eager static rollout's tokens (the same kernels,
    # replayed), the same again run to run, and float32 log-probs equal to the default's to
    # rounding; under bf16 autocast too (the weights' casts cached outside the graph)
    dec = tiny_decoder(vocab=64, dtype=torch.float32, scale=3.0).cuda()
    ids, lens = prompts(64, [5, 9, 3, 7])
    ids, lens = ids.cuda(), lens.cuda()
    kw = dict(input_ids=ids, n=4, max_new_tokens=40, eos_id=3, top_p=0.95)

    def run(step=None):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            gen = torch.Generator("cuda").manual_seed(0)
            return xopd.sample(dec, lens, **kw, generator=gen, step=step)
    graph = bench.DecodeGraph(dec)  # one step object for two rollouts: each captures its own cache
    ref, static = run(), run(bench.static_step(dec))
    graphed, again = run(graph), run(graph)
    assert (ref[0] == 3).any(1).any()
    assert all(torch.equal(x, y) for x, y in zip(graphed, again))  # deterministic run to run
    assert torch.equal(graphed[0], static[0]) and torch.equal(graphed[1], static[1])
    torch.testing.assert_close(graphed[2], static[2], rtol=0, atol=1e-3 if amp else 1e-5)
    if not amp:  # bf16 rounds the default's shorter attention differently
        assert torch.equal(graphed[0], ref[0]) and torch.equal(graphed[1], ref[1])
        torch.testing.assert_close(graphed[2], ref[2], rtol=0, atol=1e-4)


def test_response_hidden_matches_per_row_forward():
    dec = tiny_decoder()
    ids, lens = prompts(16, [5, 2, 7])
    resp = torch.randint(0, 16, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = xopd.response_hidden(dec, dec.embed_tokens(ids), lens, resp)
        for b in range(3):
            full = dec(torch.cat([ids[b, :lens[b]], resp[b]])[None])[0]
            torch.testing.assert_close(h[b], full[lens[b] - 1:-1], rtol=0, atol=1e-10)


# -----------------------------------------------------------------------------
# X-OPD loss


def test_xopd_loss_reduction_and_lambda():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    lp = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(2, 4, dtype=torch.float64, generator=g)
    teacher = torch.randn(2, 4, dtype=torch.float64, generator=g)
    loss, stats = xopd.xopd_loss((lp, old, teacher, mask), None, lam=1.0)
    obj = (lp - old).exp() * (teacher - lp.detach())
    # per-sequence mean, then mean over sequences
    ref = -(obj[0, :3].mean() + obj[1, :1].mean()) / 2
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    assert stats["adv_im"] == pytest.approx((teacher - lp.detach())[mask].mean().item())
    # the sequence-level reverse-KL estimate: mean over rows of sum_t (log pi - log pi_phi)
    assert stats["rkl_im"] == pytest.approx((lp.detach() - teacher)[0, :3].sum().item() / 2
                                            + (lp.detach() - teacher)[1, :1].sum().item() / 2)
    # lambda selects the terms
    cm = (lp * 2, old, teacher * 3, mask)
    l_im = xopd.xopd_loss((lp, old, teacher, mask), None, lam=1.0)[0]
    l_cm = xopd.xopd_loss(None, cm, lam=0.0)[0]
    assert xopd.xopd_loss((lp, old, teacher, mask), cm, lam=1.0)[0].item() == l_im.item()
    assert xopd.xopd_loss((lp, old, teacher, mask), cm, lam=0.0)[0].item() == l_cm.item()
    mixed = xopd.xopd_loss((lp, old, teacher, mask), cm, lam=0.3)[0]
    torch.testing.assert_close(mixed, 0.3 * l_im + 0.7 * l_cm, rtol=0, atol=1e-12)
    # PPO clip changes only tokens whose ratio left [1 - eps, 1 + eps]
    clipped = xopd.xopd_loss((lp, old, teacher, mask), None, lam=1.0, ratio_clip=0.05)[0]
    r = (lp - old).exp()
    adv = teacher - lp.detach()
    obj_c = torch.minimum(r * adv, r.clamp(0.95, 1.05) * adv)
    torch.testing.assert_close(clipped, -(obj_c[0, :3].mean() + obj_c[1, :1].mean()) / 2, rtol=0,
                               atol=1e-12)


def test_token_sum_aggregation_matches_a_float64_reference():
    """Eq. 4 with loss_agg "token_sum": the sum of r_t * A_t over every real token divided by
    rows * a fixed length, written out row by row; its gradient against autograd of that
    reference. Rows of different lengths: unlike the per-sequence mean, every token weighs
    1 / (B * L)."""
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    lp = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(3, 5, dtype=torch.float64, generator=g)
    teacher = torch.randn(3, 5, dtype=torch.float64, generator=g)
    norm_len = 7
    loss, stats = xopd.xopd_loss((lp, old, teacher, mask), None, lam=1.0, agg="token_sum",
                                 norm_len=norm_len)
    ref = 0.0
    for b in range(3):
        for t in range(int(mask[b].sum())):
            ratio = math.exp(lp[b, t].item() - old[b, t].item())
            ref -= ratio * (teacher[b, t].item() - lp[b, t].item())
    assert loss.item() == pytest.approx(ref / (3 * norm_len), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, lp)
    lp_ref = lp.detach().clone().requires_grad_(True)
    obj = torch.exp(lp_ref - old) * (teacher - lp_ref.detach())
    ref_loss = -sum(obj[b, t] for b in range(3) for t in range(int(mask[b].sum()))) / (3 * norm_len)
    (ref_grad,) = torch.autograd.grad(ref_loss, lp_ref)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-14)
    assert stats["adv_im"] == pytest.approx((teacher - lp.detach())[mask].mean().item())
    # the paper's reduction differs on rows of different lengths; on rows of one full length the two
    # are the same up to L / norm_len
    seq = xopd.xopd_loss((lp, old, teacher, mask), None, lam=1.0)[0]
    assert abs(seq.item() - loss.item()) > 1e-3
    full = torch.ones(3, 5, dtype=torch.bool)
    a = xopd.xopd_loss((lp, old, teacher, full), None, lam=1.0, agg="token_sum", norm_len=5)[0]
    torch.testing.assert_close(a, xopd.xopd_loss((lp, old, teacher, full), None, lam=1.0)[0],
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="seq_mean, token_sum"):
        xopd.xopd_loss((lp, old, teacher, mask), None, lam=1.0, agg="mean")


def test_xopd_mc_gradient_matches_per_step_reverse_kl():
    """Tabular policy, vocab 3, fixed length 3, no eos (so the per-sequence 1/T weight is a
    constant). X-OPD's expected gradient, E[grad log pi(y_t|y<t) * A_t] summed over t, is
    -grad sum_t E_{y<t ~ pi} KL(pi(.|y<t) || q(.|y<t)) with the prefix distribution NOT
    differentiated. The sequence-level reverse KL KL(pi(y) || q(y)) = the same sum with the
    prefix distribution differentiated too: its extra (reward-to-go) terms are what X-OPD
    drops, and the test checks that the estimator is distinguishable from it.
    100 batches of 1000 rollouts; batch-mean gradients give the standard error; pass if
    every one of the 39 components is within 4.5 standard errors (a correct estimator fails
    with probability ~39 * 7e-6 ~ 3e-4; the seed is fixed).
    """
    V, T = 3, 3  # table rows below V ** t are the prefixes step t reaches
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(T, V ** (T - 1), V, dtype=torch.float64, generator=g, requires_grad=True)
    q_logits = torch.randn(T, V ** (T - 1), V, dtype=torch.float64, generator=g)
    lq = q_logits.log_softmax(-1)

    def prefix_index(y, t):  # y (M, >=t) -> index of the prefix y<t in base V
        idx = torch.zeros(y.size(0), dtype=torch.long)
        for s in range(t):
            idx = idx * V + y[:, s]
        return idx

    def exact(differentiate_prefix):
        lp, zero = theta.log_softmax(-1), torch.tensor(0.0, dtype=torch.float64)
        total = 0.0
        for t in range(T):
            for prefix in itertools.product(range(V), repeat=t):
                i = prefix_index(torch.tensor([prefix], dtype=torch.long).reshape(1, t), t)[0]
                rows = [prefix_index(torch.tensor([prefix[:s]]).reshape(1, s), s)[0]
                        for s in range(t)]
                w = sum(lp[s, rows[s], prefix[s]] for s in range(t)) if t else zero
                w = w.exp() if differentiate_prefix else w.exp().detach()
                kl = (lp[t, i].exp() * (lp[t, i] - lq[t, i])).sum()
                total = total + w * kl
        return torch.autograd.grad(total, theta)[0] / T  # the loss averages over the T tokens

    batches, M = 100, 1000
    grads = []
    for _ in range(batches):
        y = torch.zeros(M, T, dtype=torch.long)
        lps, lqs = [], []
        for t in range(T):
            i = prefix_index(y, t)
            lp_t = theta[t, i].log_softmax(-1)  # (M, V), with grad
            tok = torch.multinomial(lp_t.detach().exp(), 1, generator=g)  # (M, 1)
            y[:, t] = tok[:, 0]
            lps.append(lp_t.gather(1, tok).squeeze(1))
            lqs.append(lq[t, i].gather(1, tok).squeeze(1))
        lp = torch.stack(lps, 1)  # (M, T)
        term = (lp, lp.detach(), torch.stack(lqs, 1), torch.ones(M, T, dtype=torch.bool))
        loss, _ = xopd.xopd_loss(term, None, lam=1.0)
        grads.append(torch.autograd.grad(loss, theta)[0])
    grads = torch.stack(grads)
    used = torch.stack([torch.arange(V ** (T - 1)) < V ** t for t in range(T)])
    mean, se = grads.mean(0)[used], grads.std(0)[used] / math.sqrt(batches)  # (39,)
    z = (mean - exact(False)[used]) / se
    assert z.abs().max() < 4.5, z.abs().max()
    z_seq = (mean - exact(True)[used]) / se
    assert z_seq.abs().max() > 10  # the sequence-level gradient is a different target


def speech_lm_pair(vocab=24, audio_id=23, seed=0):
    torch.manual_seed(seed)
    enc, adp, dec = model.make_configs("tiny", vocab)
    teacher = model.Decoder(dec)
    with torch.no_grad():
        teacher.embed_tokens.weight.mul_(20.0)
    student = model.student_from_teacher(teacher, enc, adp, audio_token_id=audio_id).freeze_audio()
    return student, teacher


def paired_batch(vocab=24, audio_id=23, B=3, seed=0):
    """Text prompts [1, transcript, 2]; speech prompts [1, AUDIO, 2]; transcripts' lengths vary."""
    g = torch.Generator().manual_seed(seed)
    text, speech, transcripts = [], [], []
    for b in range(B):
        tr = torch.randint(4, 20, (3 + 2 * b,), generator=g).tolist()
        transcripts.append(tr)
        text.append([1] + tr + [2])
        speech.append([1, audio_id, 2])

    def collate(seqs):
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        return ids, torch.tensor([len(s) for s in seqs])
    text_ids, text_lens = collate(text)
    speech_ids, speech_lens = collate(speech)
    responses = [torch.randint(4, 20, (2 + b,), generator=g).tolist() + [3] for b in range(B)]
    resp_ids, resp_lens = collate(responses)
    mels = torch.randn(B, 80, 64, generator=g)
    batch = data.Batch(text_ids=text_ids, text_lens=text_lens, speech_ids=speech_ids,
                       speech_lens=speech_lens, mels=mels, mel_lens=torch.full((B,), 64),
                       response_ids=resp_ids, response_lens=resp_lens)
    return batch, transcripts


def test_xopd_step_zero_advantage_when_teacher_is_student(monkeypatch):
    """Teacher == student's decoder and the 'audio' carries exactly the transcript's token
    embeddings: both terms' advantages are exactly 0, so are the loss and its gradient."""
    student, teacher = speech_lm_pair()
    teacher = copy.deepcopy(student.decoder)
    batch, transcripts = paired_batch()

    def encode_audio(mel, mel_lens):  # S carries the same information as T
        ids = torch.zeros(len(transcripts), max(map(len, transcripts)), dtype=torch.long)
        for b, tr in enumerate(transcripts):
            ids[b, :len(tr)] = torch.tensor(tr)
        return student.decoder.embed_tokens(ids), torch.tensor([len(t) for t in transcripts])
    monkeypatch.setattr(student, "encode_audio", encode_audio)
    loss, m = xopd.xopd_step(student, teacher, batch, n=2, max_new_tokens=6, eos_id=3,
                             generator=torch.Generator().manual_seed(0))
    assert m["adv_im"] == 0.0 and m["adv_cm"] == 0.0 and loss.item() == 0.0
    assert m["rkl_im"] == 0.0 and m["rkl_cm"] == 0.0
    # the held-out estimate compares sampling-time (cached) log-probs with a full pass: equal up
    # to rounding
    rkl = xopd.reverse_kl(student, teacher, batch, n=2, max_new_tokens=6, eos_id=3,
                          generator=torch.Generator().manual_seed(0))
    assert set(rkl) == {"rkl_im", "rkl_cm"} and all(abs(v) < 1e-4 for v in rkl.values())
    loss.backward()
    assert all((p.grad == 0).all() for p in student.decoder.parameters())


def different_teacher_pair():
    """A student whose next-token distributions are spread (embeddings scaled down) and a teacher
    far from it: advantages of nats, rows of different lengths, some ended."""
    student, teacher = speech_lm_pair()
    with torch.no_grad():
        student.decoder.embed_tokens.weight.mul_(0.2)
        teacher.embed_tokens.weight.mul_(0.2)
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return student, teacher


def advantages_by_hand(student, teacher, batch, rollouts, n):
    """Eq. 1 / 2 from full forward passes, row by row, in float64: {term: [A_t of each row's
    real tokens]} for the recorded rollouts {term: (ids, mask, logp_old)} (row r answers prompt
    r // n)."""
    s, t = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    dec = s.decoder
    with torch.no_grad():
        audio = s.encode_audio(batch.mels.double(), batch.mel_lens)
        prompts = {"im": s.embed(batch.text_ids, batch.text_lens),
                   "cm": s.embed(batch.speech_ids, batch.speech_lens, *audio)}
        out = {}
        for term, (ids, mask, _) in rollouts.items():
            emb, lens = prompts[term]
            out[term] = []
            for r in range(ids.size(0)):
                b, y = r // n, ids[r][mask[r]]
                x = torch.cat([emb[b, :lens[b]], dec.embed_tokens(y)])[None]
                ls = dec.logits(dec(inputs_embeds=x))[0, lens[b] - 1:-1].log_softmax(-1)
                nt = int(batch.text_lens[b])
                lt = t.logits(t(torch.cat([batch.text_ids[b, :nt], y])[None]))[0, nt - 1:-1]
                out[term].append((lt.log_softmax(-1) - ls).gather(1, y[:, None]).squeeze(1))
    return out


def recording_sample(monkeypatch):
    """xopd.sample as it is, each call's rollouts appended to the list returned."""
    drawn, real = [], xopd.sample
    monkeypatch.setattr(xopd, "sample", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    return drawn


def test_xopd_step_diagnostics_match_full_forward_passes(monkeypatch):
    """adv_* (the mean advantage per token), rkl_* (the mean over rows of sum_t -A_t), the loss
    (on-policy r_t = 1 in value, so -(lam * mean_rows mean_t A_im + (1 - lam) * ... A_cm)) and the
    rollouts' lengths, against the advantages computed by hand from full forward passes; the
    gradient reaches the student's decoder only."""
    student, teacher = different_teacher_pair()
    batch, _ = paired_batch()
    drawn = recording_sample(monkeypatch)
    loss, m = xopd.xopd_step(student, teacher, batch, n=2, lam=0.3, max_new_tokens=5, eos_id=3,
                             generator=torch.Generator().manual_seed(0))
    rollouts = dict(zip(("im", "cm"), drawn))  # sampled from T, then from S
    adv = advantages_by_hand(student, teacher, batch, rollouts, n=2)
    ref_loss = 0.0
    for term, w in (("im", 0.3), ("cm", 0.7)):
        assert m[f"adv_{term}"] == pytest.approx(torch.cat(adv[term]).mean().item(), abs=1e-4)
        rkl = sum(-a.sum().item() for a in adv[term]) / len(adv[term])
        assert m[f"rkl_{term}"] == pytest.approx(rkl, abs=1e-4)
        ref_loss -= w * sum(a.mean().item() for a in adv[term]) / len(adv[term])
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    lengths = [len(a) for term in ("im", "cm") for a in adv[term]]
    ended = [bool((ids[r][mask[r]] == 3).any()) for ids, mask, _ in drawn for r in range(len(ids))]
    assert len(lengths) == 2 * 3 * 2 and m["tokens"] == sum(lengths)
    assert m["resp_len"] == pytest.approx(sum(lengths) / len(lengths))
    assert m["frac_ended"] == pytest.approx(sum(ended) / len(ended))
    loss.backward()
    assert all(p.grad is not None for p in student.decoder.parameters())
    assert all(p.grad is None for p in [*student.encoder.parameters(),
                                        *student.adapter.parameters()])
    assert all(p.grad is None for p in teacher.parameters())


def test_xopd_step_lambda_selects_the_terms(monkeypatch):
    """lam = 1 samples from T only and its loss is -mean_rows mean_t A_im; lam = 0 samples from S
    only, with -mean_rows mean_t A_cm (both by hand). lam = 1 never reads the audio."""
    student, teacher = different_teacher_pair()
    batch, _ = paired_batch()
    drawn = recording_sample(monkeypatch)
    kw = dict(n=2, max_new_tokens=5, eos_id=3)
    for lam, term in ((1.0, "im"), (0.0, "cm")):
        drawn.clear()
        gen = torch.Generator().manual_seed(0)
        loss, m = xopd.xopd_step(student, teacher, batch, lam=lam, generator=gen, **kw)
        assert len(drawn) == 1  # one term's rollouts, no other
        adv = advantages_by_hand(student, teacher, batch, {term: drawn[0]}, n=2)[term]
        ref = -sum(a.mean().item() for a in adv) / len(adv)
        assert loss.item() == pytest.approx(ref, abs=1e-5)
        assert m[f"adv_{term}"] == pytest.approx(torch.cat(adv).mean().item(), abs=1e-4)
        if lam == 1.0:  # other mels, the same loss
            silent = dataclasses.replace(batch, mels=torch.zeros_like(batch.mels))
            gen = torch.Generator().manual_seed(0)
            again, _ = xopd.xopd_step(student, teacher, silent, lam=1.0, generator=gen, **kw)
            assert again.item() == loss.item()


def test_steps_refuse_a_teacher_with_another_vocabulary():
    student, _ = speech_lm_pair()
    batch, _ = paired_batch()
    other = model.Decoder(model.DecoderConfig(vocab_size=30, dim=48, n_layers=1, n_heads=4,
                                              hidden_dim=64))
    with pytest.raises(ValueError, match="vocabulary"):
        xopd.xopd_step(student, other, batch, max_new_tokens=2, eos_id=3)
    with pytest.raises(ValueError, match="vocabulary"):
        xopd.gkd_step(student, other, batch, max_new_tokens=2, eos_id=3)


@pytest.mark.parametrize("frac", [0.0, 1.0])
def test_gkd_step_picks_fixed_or_sampled_responses(frac, monkeypatch):
    """Against a naive per-row computation, float64 throughout: the forward KL (beta 0) of the
    student hearing S + response from the teacher reading T + response, over the full
    vocabulary, mean over every response token. The responses are the batch's fixed ones
    (frac 0) or the student's own samples (frac 1), recorded as they are drawn."""
    student, teacher = speech_lm_pair()
    # a teacher far enough from the student for a divergence well above rounding
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.5 * torch.randn_like(p))
    student, teacher = student.double(), teacher.double()
    batch, _ = paired_batch()
    batch = dataclasses.replace(batch, mels=batch.mels.double())
    drawn, real = [], xopd.sample
    monkeypatch.setattr(xopd, "sample", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    loss, m = xopd.gkd_step(student, teacher, batch, student_frac=frac, max_new_tokens=5, eos_id=3,
                            generator=torch.Generator().manual_seed(0))
    B = batch.speech_ids.size(0)
    if frac == 0.0:  # every row keeps its fixed response, nothing is sampled
        assert drawn == []
        responses = [batch.response_ids[b, :batch.response_lens[b]] for b in range(B)]
    else:
        (ids, mask, _), = drawn
        responses = [ids[b][mask[b]] for b in range(B)]
        fixed = [batch.response_ids[b, :n] for b, n in enumerate(batch.response_lens.tolist())]
        # not the fixed ones
        assert any(r.shape != f.shape or not torch.equal(r, f) for r, f in zip(responses, fixed))
    dec, div, count = student.decoder, 0.0, 0
    with torch.no_grad():
        emb, lens = student.embed(batch.speech_ids, batch.speech_lens,
                                  *student.encode_audio(batch.mels, batch.mel_lens))
        for b, resp in enumerate(responses):
            x = torch.cat([emb[b, :lens[b]], dec.embed_tokens(resp)])[None]
            # the positions predicting resp
            ls = dec.logits(dec(inputs_embeds=x))[0, lens[b] - 1:-1]
            n_text = int(batch.text_lens[b])
            seq = torch.cat([batch.text_ids[b, :n_text], resp])[None]
            lt = teacher.logits(teacher(seq))[0, n_text - 1:-1]
            div += naive_gjsd(ls, lt, 0.0).sum().item()
            count += len(resp)
    assert m["frac_student"] == frac and m["tokens"] == count
    assert loss.item() == pytest.approx(div / count, rel=1e-5)  # the step's logits are float32


def test_sft_step_is_the_cross_entropy_of_the_responses_from_speech():
    """Against a naive per-row computation: splice the audio, append the response, cross-entropy
    of every response token, mean over all of them. float64 throughout."""
    student, _ = speech_lm_pair()
    student = student.double()
    batch, _ = paired_batch()
    batch = dataclasses.replace(batch, mels=batch.mels.double())
    loss, m = xopd.sft_step(student, batch, chunk_size=4)
    dec, nll, count = student.decoder, 0.0, 0
    with torch.no_grad():
        audio = student.encode_audio(batch.mels, batch.mel_lens)
        emb, lens = student.embed(batch.speech_ids, batch.speech_lens, *audio)
        for b in range(emb.size(0)):
            resp = batch.response_ids[b, :batch.response_lens[b]]
            x = torch.cat([emb[b, :lens[b]], dec.embed_tokens(resp)])[None]
            # the positions predicting resp
            logits = dec.logits(dec(inputs_embeds=x))[0, lens[b] - 1:-1]
            nll += F.cross_entropy(logits, resp, reduction="sum").item()
            count += len(resp)
    assert m["tokens"] == count
    assert loss.item() == pytest.approx(nll / count, rel=1e-10)


# -----------------------------------------------------------------------------
# GKD and SFT


def naive_gjsd(ls_logits, lt_logits, beta, temperature=1.0):
    p = torch.softmax(lt_logits / temperature, -1)  # teacher
    q = torch.softmax(ls_logits / temperature, -1)  # student
    if beta == 0:
        return (p * (p.log() - q.log())).sum(-1)
    if beta == 1:
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gkd_loss_values_and_grads(beta, temperature):
    g = torch.Generator().manual_seed(0)
    N, V, ds, dt = 29, 40, 6, 9
    hs = torch.randn(N, ds, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(V, ds, dtype=torch.float64, generator=g, requires_grad=True)
    ht = torch.randn(N, dt, dtype=torch.float64, generator=g)
    wt = torch.randn(V, dt, dtype=torch.float64, generator=g)
    upstream = torch.rand(N, dtype=torch.float64, generator=g)
    out = xopd.gkd_loss(hs, ws, ht, wt, beta, temperature, chunk_size=8)
    ref = naive_gjsd(hs @ ws.T, ht @ wt.T, beta, temperature).double()
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)  # float32 inside
    gh, gw = torch.autograd.grad((out.double() * upstream).sum(), (hs, ws))
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (hs, ws))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    assert (out >= -1e-6).all()
    if beta in (0.0, 1.0):  # the endpoints are the two KLs, computed another way
        kl = F.kl_div((hs @ ws.T / temperature).log_softmax(-1),
                      (ht @ wt.T / temperature).log_softmax(-1),
                      log_target=True, reduction="none").sum(-1)
        if beta == 1.0:
            kl = F.kl_div((ht @ wt.T / temperature).log_softmax(-1),
                          (hs @ ws.T / temperature).log_softmax(-1),
                          log_target=True, reduction="none").sum(-1)
        torch.testing.assert_close(out.double(), kl.detach(), rtol=0, atol=1e-5)
    # zero for equal distributions
    same = xopd.gkd_loss(hs.detach(), ws.detach(), hs.detach(), ws.detach(), beta, temperature,
                         chunk_size=8)
    assert same.abs().max() < 1e-6


def test_sft_loss_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 20, (3, 5), generator=g)
    mask = torch.arange(5)[None] < torch.tensor([[5], [2], [3]])
    loss = xopd.sft_loss(h, w, t, mask, chunk_size=4)
    ref = F.cross_entropy((h @ w.T)[mask], t[mask])
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(loss, w)[0], torch.autograd.grad(ref, w)[0],
                               rtol=0, atol=1e-10)
    # per sequence: each row's mean cross-entropy, then the mean over rows (rows of 5, 2, 3 tokens)
    per_row = xopd.sft_loss(h, w, t, mask, chunk_size=4, per_sequence=True)
    ce = F.cross_entropy((h @ w.T).reshape(15, 20), t.reshape(15), reduction="none").reshape(3, 5)
    ref_rows = sum(ce[b, :n].mean() for b, n in enumerate((5, 2, 3))) / 3
    torch.testing.assert_close(per_row, ref_rows, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.autograd.grad(per_row, h)[0],
                               torch.autograd.grad(ref_rows, h)[0], rtol=0, atol=1e-10)


def test_check_same_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    def tok(words, specials):
        t = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        t.add_special_tokens(specials)
        return t
    a = tok(["<unk>", "a", "b"], ["<|end|>"])
    xopd.check_same_tokenizer(a, tok(["<unk>", "a", "b"], ["<|end|>"]))
    with pytest.raises(ValueError, match="vocabularies differ"):
        xopd.check_same_tokenizer(a, tok(["<unk>", "b", "a"], ["<|end|>"]))
    with pytest.raises(ValueError, match="differ"):
        xopd.check_same_tokenizer(a, tok(["<unk>", "a", "b"], ["<|eot|>"]))
