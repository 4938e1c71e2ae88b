"""
The speed and memory benchmarks behind the README's figures. Each item returns records (dicts of
COLUMNS' fields), each figure beside the naive way's, measured in the same run, printed as a table;
nothing is asserted (no test collects this file).

    python tests/bench.py                  # items 1 to 5 and 7 on this CPU
    python tests/bench.py --device cuda    # items 4 to 6 on a GPU (--no-compile: item 4 without
                                           # compiled_step, whose compilation takes a while)
    python tests/bench.py --threads 2      # torch's thread count (0: its default)
"""
import argparse
import functools
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402  (needs the path above)
import model as M  # noqa: E402
import xopd  # noqa: E402
from eval import markdown  # noqa: E402

# -----------------------------------------------------------------------------
# Fast decode steps for xopd.sample(step=...), which the pipeline does not use: what items 1, 4, 5
# and 6 measure against the eager step.
# step(x (B, 1, dim), cache) -> (B, 1, dim) gives the eager step's tokens up to float rounding;
# sample reads its optional static (False: True allocates the rollout's cache once at its final
# size, the same shapes at every step) and check_every (1: steps between two host reads, each a
# wait for the device, of whether every row has ended).

def static_step(decoder):
    """Decoder.decode_step on a fixed-shape cache, run eagerly."""
    step = functools.partial(M.Decoder.decode_step, decoder)
    step.static = True
    return step


@functools.cache  # made on first use (the compiler takes seconds to import), one for every decoder
def _compiled_decode_step():
    return torch.compile(M.Decoder.decode_step)


def compiled_step(decoder):
    """Decoder.decode_step through torch.compile. Its first calls compile (seconds; once more when
    the number of keys first changes, after which it is a symbolic size)."""
    return functools.partial(_compiled_decode_step(), decoder)


class DecodeGraph:
    """Decoder.decode_step on a static cache, captured in a CUDA graph at its first call on a
    cache and replayed after (a replay launches a step's hundreds of small kernels at once). The
    input is copied into the graph's own buffer, the cache and cache.lengths are written in place
    (Decoder.decode), the output is the graph's buffer, overwritten by the next call. Another
    cache (the next rollout's) is captured anew. On a CPU the same buffers run eagerly."""
    static, check_every = True, 8

    def __init__(self, decoder):
        self.decoder, self.buffers = decoder, None

    def __call__(self, x, cache):  # a replay needs the input's shape, the cache's memory
        buffers = [x.shape] + [(t.data_ptr(), t.shape) for t in [*cache.k, *cache.v, cache.lengths]]
        if buffers != self.buffers:
            self.capture(x, cache)
            self.buffers = buffers
        self.x.copy_(x)
        self.replay()
        return self.out

    def capture(self, x, cache):
        assert cache.static, "a graph needs a static cache: the same shapes at every step"
        self.x = x.clone()
        run = functools.partial(self.decoder.decode_step, self.x, cache)
        if not x.is_cuda:
            self.out = run()
            self.replay = lambda: self.out.copy_(run())
            return
        # the warm-up writes this step's keys, which every replay writes again before reading;
        # autocast's weight casts made there stay in its cache, where the graph reads them
        with torch.cuda.device(x.device):
            self.graph, self.out = capture_cuda_graph(run)
        self.replay = self.graph.replay


# One side stream per GPU for every capture, as torch.cuda.graph keeps one: the allocator reuses
# memory freed on a stream for that stream only, so a new stream per rollout would strand memory.
_capture_streams = {}


def capture_cuda_graph(fn, warmup=3):
    """fn() captured in a CUDA graph on the current GPU -> (the graph, fn's output: buffers each
    graph.replay() writes). As torch.cuda.graph: warm-up calls on a side stream (lazy cuBLAS and
    kernel choices), then the capture there into a memory pool of the graph's own; without its
    empty_cache, which would hand cached memory back to the driver at every rollout."""
    side = _capture_streams.setdefault(torch.cuda.current_device(), torch.cuda.Stream())
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()  # from here to capture_end the kernels are recorded, not run
        out = fn()
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(side)
    return graph, out


# -----------------------------------------------------------------------------
# The benchmarks

@torch.no_grad()
def timeit(fn, reps=3, calls=1, device="cpu"):
    """Seconds per call: the best of `reps` runs of `calls` calls back to back (the run least
    disturbed by other load), after one warm-up call; on CUDA a run ends when the GPU's does."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def same(a, b):
    """The share of equal tokens in two samplers' outputs (0 when their shapes differ)."""
    return (a == b).float().mean().item() if a.shape == b.shape else 0.0


def random_decoder(preset, vocab, seed, device="cpu"):
    _, _, dcfg = M.make_configs(preset, vocab)
    torch.manual_seed(seed)
    return M.Decoder(dcfg).eval().to(device)


# xopd.sample's ways to run a decode step: name -> (label, its step= for a new rollout)
STEPS = {"eager": ("xopd.sample", lambda dec: None),
         "static": ("static_step", static_step),
         "graph": ("DecodeGraph", DecodeGraph),
         "compiled": ("compiled_step", compiled_step),
         "naive": ("recompute prefix (no cache)", None)}


@torch.inference_mode()
def sample_recompute(decoder, lengths, input_ids, *, max_new_tokens, eos_id, temperature=1.0,
                     generator=None):
    """The naive way to sample: run the whole prefix through the decoder for every new token."""
    B, T = input_ids.shape
    ids = torch.cat([input_ids, input_ids.new_full((B, max_new_tokens), eos_id)], dim=1)
    rows = torch.arange(B)
    for step in range(max_new_tokens):
        hidden = decoder(ids[:, :T + step])  # (B, T+step, dim): everything again
        logits = decoder.logits(hidden[rows, lengths - 1 + step])
        ids[rows, lengths + step] = xopd.sample_next_token(logits, generator, temperature)[0]
    return torch.stack([ids[rows, lengths + step] for step in range(max_new_tokens)], 1)


def bench_rollouts(preset="gpu", prompts=64, n=4, new_tokens=64, vocab=2000, reps=3, seed=0,
                   device="cpu", ways=("eager", "static", "graph"), prompt=None, eos_id=3):
    """Items 1 and 6: a random decoder's rollouts (temperature 1, bf16 autocast on CUDA, prompts
    of `prompt` tokens, else 24 to 47) each way. -> {way: {"s", "tok_s", "repeats": the same
    tokens from one seed, "same": share of tokens equal to the first way's}}"""
    dec = random_decoder(preset, vocab, seed, device)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(24, 48, (prompts,), generator=g) if prompt is None else (
        torch.full((prompts,), prompt))
    ids = torch.randint(4, vocab, (prompts, int(lens.max())), generator=g).to(device)
    lens, kind = lens.to(device), torch.device(device).type
    kw = dict(input_ids=ids, max_new_tokens=new_tokens, eos_id=eos_id)

    def run(way):
        gen = torch.Generator(device).manual_seed(seed)
        if way == "naive":
            return (sample_recompute(dec, lens, generator=gen, **kw),)
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
            return xopd.sample(dec, lens, n=n, generator=gen, step=STEPS[way][1](dec), **kw)
    res, outs = {}, {way: [] for way in ways}
    for way in ways:
        s = timeit(lambda: outs[way].append(run(way)), reps=reps, device=device)
        first, last = outs[way][0], outs[way][-1]
        res[way] = dict(s=s, tok_s=prompts * n * new_tokens / s,
                        repeats=all(torch.equal(a, b) for a, b in zip(first, last)),
                        same=same(first[0], outs[ways[0]][0][0]))
    return res


def bench_mem(variant, N=8192, V=32768, d=256, chunk_size=1024, seed=0):
    """Item 2, one variant in this process: forward + backward time and peak extra RSS."""
    def peak_rss_mb():  # VmHWM on Linux: a child started by fork + exec inherits ru_maxrss
        if os.path.exists("/proc/self/status"):
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, else KiB

    def logprobs(h, w, t):
        if variant == "fused":
            return xopd.token_logprobs(h, w, t, chunk_size=chunk_size)
        return F.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None]).squeeze(1)  # (N, V) logits
    torch.manual_seed(seed)
    for n in (64, N):  # a warm-up on a small vocabulary: kernel / allocator set-up is not counted
        h, w = torch.randn(n, d, requires_grad=True), torch.randn(256, d, requires_grad=True)
        logprobs(h, w, torch.randint(0, 256, (n,))).sum().backward()
    h = (0.1 * torch.randn(N, d)).requires_grad_()
    w = (0.1 * torch.randn(V, d)).requires_grad_()
    t = torch.randint(0, V, (N,))
    upstream = torch.randn(N)
    base = peak_rss_mb()  # inputs are in; what follows is the variant's own memory
    t0 = time.perf_counter()
    (logprobs(h, w, t) * upstream).sum().backward()
    seconds = time.perf_counter() - t0
    return dict(variant=variant, seconds=seconds, peak_extra_mb=peak_rss_mb() - base,
                checksum=float(h.grad.double().abs().sum() + w.grad.double().abs().sum()))


def bench_logprobs(threads=0, repeats=2):
    """Item 2: each variant in `repeats` processes of its own (`mem`), so that each peak RSS
    is its own: the largest peak (the high-water mark can miss a freed buffer), the least time."""
    recs = []
    for variant in ("naive", "fused"):
        args = [sys.executable, os.path.abspath(__file__), "mem", "--variant", variant,
                "--threads", str(threads)]
        runs = [json.loads(subprocess.run(args, check=True, capture_output=True, text=True)
                           .stdout.strip().splitlines()[-1]) for _ in range(repeats)]
        recs.append(dict(variant=variant, s=min(r["seconds"] for r in runs),
                         peak_mb=max(r["peak_extra_mb"] for r in runs),
                         peaks_mb=[round(r["peak_extra_mb"]) for r in runs]))
    naive, fused = recs
    fused.update(variant="fused, chunk 1024", x=naive["s"] / fused["s"], vs="naive",
                 less_mem=naive["peak_mb"] / max(fused["peak_mb"], 1e-9))
    return recs


def bench_step(batch=8, n=4, max_new_tokens=64, vocab=2000, preset="cpu", seed=0, frames=300):
    """Item 3: one X-OPD step of the preset (after a warm-up step), phase by phase."""
    torch.manual_seed(seed)
    enc, adp, dcfg = M.make_configs(preset, vocab)
    teacher = M.Decoder(dcfg)
    student = M.student_from_teacher(teacher, enc, adp, audio_token_id=vocab - 1).freeze_audio()
    for p in teacher.parameters():  # a frozen teacher that differs from the student
        p.requires_grad_(False).add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    text_lens = torch.randint(24, 48, (batch,), generator=g)
    speech_ids = torch.full((batch, 8), 5)
    speech_ids[:, 3] = vocab - 1  # chat prefix, the AUDIO placeholder, chat suffix
    b = data.Batch(text_ids=torch.randint(4, vocab - 1, (batch, int(text_lens.max())), generator=g),
                   text_lens=text_lens, speech_ids=speech_ids, speech_lens=torch.full((batch,), 8),
                   mels=torch.randn(batch, enc.n_mels, frames, generator=g),  # 3 s of audio
                   mel_lens=torch.full((batch,), frames))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=2e-6)
    for s in (seed, seed + 1):  # a warm-up step, then the timed one
        loss, m = xopd.xopd_step(student, teacher, b, n=n, max_new_tokens=max_new_tokens, eos_id=3,
                                 generator=torch.Generator().manual_seed(s))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)  # train.update_weights' work, without the clipping
        loss.backward()
        opt.step()
        m["ms_update"] = m.pop("ms_loss") + (time.perf_counter() - t0) * 1e3
    ms = {"rollout": m["ms_rollout"], "teacher scoring": m["ms_teacher"], "update": m["ms_update"]}
    total = sum(ms.values())
    return [dict(variant=k, ms=v, share=v / total) for k, v in ms.items()] + [
        dict(variant="total", ms=total, note=f"{m['tokens']} sampled tokens")]


def linears(dec):
    """The weights of every matrix multiply a token goes through: the layers', then the head."""
    layers = [m.weight for m in dec.layers.modules() if isinstance(m, torch.nn.Linear)]
    return layers + [dec.lm_head.weight]


def matmuls_alone(shapes, graph=False, **timing):
    """shapes: [(rows, weights)]: each weight multiplied with `rows` random rows, alone (with
    graph, replayed from a CUDA graph: no launch cost). -> (their FLOPs, timeit's seconds)"""
    device = shapes[0][1][0].device
    xs = {key: torch.randn(*key, device=device)
          for key in {(rows, w.shape[1]) for rows, group in shapes for w in group}}

    def alone():
        for rows, group in shapes:
            for w in group:
                F.linear(xs[rows, w.shape[1]], w)
    flops = sum(2 * rows * w.numel() for rows, group in shapes for w in group)
    fn = capture_cuda_graph(alone)[0].replay if graph else alone
    return flops, timeit(fn, device=device, **timing)


def bench_vs_hf(preset, batch=32, prompt=64, new_tokens=128, vocab=2000, reps=5, seed=0,
                device="cpu", compile=True):
    """Item 4: xopd.sample's ways against transformers' generate on the same random Llama
    weights (temperature 1, no end token); the linear layers' FLOPs over each one's time."""
    try:
        import transformers
    except ImportError:
        return [dict(variant=preset, note="skipped: transformers is not installed (pip install "
                     "transformers; it is not a dependency of this project)")]
    _, _, dcfg = M.make_configs(preset, vocab)
    config = M.llama_config(dcfg) | dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval().to(device)
    dec = M.load_llama(hf.state_dict(), config).eval().to(device)
    ids = torch.randint(0, vocab, (batch, prompt)).to(device)
    lens = torch.full((batch,), prompt, device=device)

    def ours(way, n=new_tokens, temperature=1.0):
        return xopd.sample(dec, lens, input_ids=ids, max_new_tokens=n, eos_id=-1,
                           temperature=temperature, step=STEPS[way][1](dec))[0]

    def theirs(n=new_tokens, **how):
        how = how or dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **how)
        assert out.shape == (batch, prompt + n), "generate stopped early"
        return out[:, prompt:]
    # the prompt's multiplies (the head on the last position only), then one per decoded token
    ws = linears(dec)
    calls = [(batch * prompt, ws[:-1]), (batch, ws[-1:])] + [(batch, ws)] * (new_tokens - 1)
    flops, t_alone = matmuls_alone(calls, reps=reps)
    greedy, t_hf = theirs(16, do_sample=False), timeit(theirs, reps=reps, device=device)
    recs = [dict(variant=f"{preset}: transformers {transformers.__version__} generate",
                 tok_s=batch * new_tokens / t_hf)]
    for way in ["eager", "graph"] + (["compiled"] if compile else []):
        t0 = time.perf_counter()  # the first call (torch.compile compiles here), 16 greedy tokens
        agree = same(ours(way, 16, temperature=0.0), greedy)  # its .item() waits for the device
        first_s = time.perf_counter() - t0
        t = timeit(functools.partial(ours, way), reps=reps, device=device)
        recs.append(dict(variant=f"{preset}: {STEPS[way][0]}", same_greedy=agree, first_s=first_s,
                         tok_s=batch * new_tokens / t, x=t_hf / t, vs="generate",
                         gflops=flops / t / 1e9, mm_share=t_alone / t))
    return recs + [dict(variant=f"{preset}: the same matmuls alone", gflops=flops / t_alone / 1e9)]


@torch.inference_mode()
def bench_decode_step(preset, batch=32, prompt=64, new_tokens=128, vocab=2000, reps=100, seed=0,
                      device="cpu"):
    """Item 5: one decode step (no head) on a static cache mid-rollout of item 4's size, eager
    and (CUDA) from a CUDA graph: the time, the bytes it reads, and a device copy's speed."""
    dec = random_decoder(preset, vocab, seed, device)
    cuda = torch.device(device).type == "cuda"
    written = prompt + new_tokens // 2  # keys in the cache mid-rollout
    prefilled = dec.new_cache(batch, written)
    dec.prefill(prefilled, torch.full((batch,), written, device=device),
                input_ids=torch.randint(0, vocab, (batch, written), device=device))
    cache = prefilled.repeat_interleave(1, max_len=prompt + new_tokens)
    x = dec.embed_tokens(torch.randint(0, vocab, (batch, 1), device=device))  # (B, 1, dim)
    ws = linears(dec)[:-1]  # the layers' projections: decode_step stops before the head
    weights = sum(w.numel() * w.element_size() for w in ws)
    kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    src = torch.zeros((2**30 if cuda else 2**26) // 4, device=device)  # 1 GiB (64 MiB on a CPU)
    dst = torch.empty_like(src)
    t_copy = timeit(lambda: dst.copy_(src), calls=10, device=device)
    copy = 2 * src.numel() * src.element_size() / t_copy  # bytes/s, each read and written
    recs = [dict(variant=f"{preset}: bytes it reads", mb=(weights + kv) / 1e6,
                 note=f"weights {weights / 1e6:.1f} MB, keys and values {kv / 1e6:.1f} MB"),
            dict(variant=f"{preset}: a device copy (read + write)", gb_s=copy / 1e9)]
    _, t_mm = matmuls_alone([(batch, ws)], graph=cuda, calls=reps)
    # every call writes the same position (lengths does not advance): the same work each time
    steps = {"eager": lambda: dec.decode_step(x, cache)}
    if cuda:
        steps["CUDA graph"] = functools.partial(DecodeGraph(dec), x, cache)
    for name, step in steps.items():
        t = timeit(step, calls=reps, device=device)
        recs.append(dict(variant=f"{preset}: {name}", us=t * 1e6, mm_share=t_mm / t,
                         gb_s=(weights + kv) / t / 1e9, of_copy=(weights + kv) / t / copy))
    return recs + [dict(variant=f"{preset}: its matmuls alone" + ", from a graph" * cuda,
                        us=t_mm * 1e6, gb_s=weights / t_mm / 1e9, note="weights read")]


def bench_preset(preset, vocab=2000, seed=0):
    """Item 7, on this CPU: a preset's parameters (a tied head once) and speeds."""
    torch.manual_seed(seed)
    m = M.SpeechLM(*M.make_configs(preset, vocab), audio_token_id=1).eval()
    ids = torch.randint(0, vocab, (4, 256))
    mel, mel_lens = torch.randn(4, m.enc_cfg.n_mels, 1000), torch.full((4,), 1000)

    def decode(steps=32):
        cache = m.decoder.new_cache(8, 64 + steps)
        m.decoder.prefill(cache, torch.full((8,), 64), ids[:, :64].repeat(2, 1))
        for _ in range(steps):
            m.decoder.decode(cache, ids[:, 0].repeat(2))
    params = {part: sum(p.numel() for p in getattr(m, part).parameters()) / 1e6
              for part in ("encoder", "adapter", "decoder")}
    return dict(variant=preset, params_m=sum(params.values()),
                forward_tok_s=4 * 256 / timeit(lambda: m.decoder(ids), reps=5),
                decode_tok_s=8 * 32 / timeit(decode, reps=2),
                audio_s_s=40 / timeit(lambda: m.encode_audio(mel, mel_lens), reps=2),
                note=", ".join(f"{k} {v:.3f}M" for k, v in params.items()))


# The bench's columns: (record field, label, format); an item's table has those its records fill
COLUMNS = [
    ("variant", "variant", "{}"), ("s", "s", "{:.2f}"), ("ms", "ms", "{:.0f}"),
    ("us", "µs", "{:.0f}"), ("share", "share", "{:.0%}"), ("tok_s", "tok/s", "{:.0f}"),
    ("x", "speed-up", "{:.2f}x"), ("vs", "over", "{}"), ("peak_mb", "peak extra MB", "{:.0f}"),
    ("peaks_mb", "each process's peak (MB)", "{}"), ("less_mem", "less memory", "{:.1f}x"),
    ("gflops", "matmul GFLOP/s", "{:.1f}"), ("mm_share", "matmuls' share of it", "{:.0%}"),
    ("first_s", "first call (s)", "{:.1f}"), ("mb", "MB", "{:.1f}"), ("gb_s", "GB/s", "{:.0f}"),
    ("of_copy", "of a device copy's GB/s", "{:.0%}"), ("repeats", "same tokens run to run", "{}"),
    ("same", "tokens as the first row's", "{:.1%}"),
    ("same_greedy", "greedy tokens as generate's", "{:.1%}"), ("params_m", "params (M)", "{:.3f}"),
    ("forward_tok_s", "decoder forward tok/s", "{:.0f}"),
    ("decode_tok_s", "prefill + decode new tok/s", "{:.0f}"),
    ("audio_s_s", "encoder + adapter audio s/s", "{:.1f}"), ("note", "notes", "{}")]


def bench_table(records):
    cols = [c for c in COLUMNS if any(c[0] in r for r in records)]
    return markdown("| " + " | ".join(name for _, name, _ in cols) + " |",
                    [[form.format(r[k]) if k in r else "" for k, _, form in cols] for r in records])


def rollout_records(r):
    base = next(iter(r))
    return [dict(variant=STEPS[k][0], ms=v["s"] * 1e3, tok_s=v["tok_s"], x=r[base]["s"] / v["s"],
                 vs=base, repeats="yes" if v["repeats"] else "NO", same=v["same"])
            for k, v in r.items()]


def bench_items(args):
    """[(number, what it measures, run -> records)]: items 1 to 5 and 7 on a CPU (2 first, while
    this process is small: its children fork from it), with --device items 4 to 6 there."""
    dev, both = args.device, ("cpu", "gpu")
    on = "" if dev == "cpu" else f" on {dev}"
    items = [
        (2, "token_logprobs vs log_softmax(h @ W.T).gather, N 8192, V 32768, d 256, fp32, fwd+bwd "
         "(2 processes each: fastest time, largest peak)",
         lambda: bench_logprobs(threads=torch.get_num_threads())),
        (1, "sampling, cpu preset decoder (vocab 2000), batch 32, prompt 64, 128 new tokens",
         lambda: rollout_records(bench_rollouts("cpu", prompts=32, n=1, new_tokens=128, reps=1,
                                                prompt=64, ways=("eager", "static", "naive"),
                                                eos_id=-1))),
        (3, "one xopd_step, cpu preset (vocab 2000), 8 prompts x n 4 x 2 modalities, 64 new tokens",
         bench_step),
        (4, f"xopd.sample (eager, DecodeGraph: eager on a CPU{', compiled_step' * args.compile})"
         " vs transformers' generate, cpu and gpu preset decoders, float32, batch 32, prompt 64, "
         f"128 new tokens (best of 5 each){on}",
         lambda: [r for p in both for r in bench_vs_hf(p, device=dev, compile=args.compile)]),
        (5, "one decode step mid-rollout (item 4's sizes), at fixed shapes: eager, from a CUDA "
         f"graph (on CUDA), its matmuls alone{on}",
         lambda: [r for p in both
                  for r in bench_decode_step(p, reps=100 if on else 10, device=dev)]),
        (6, f"the align stage's rollouts at the gpu preset's size, bf16 autocast{on}",
         lambda: rollout_records(bench_rollouts(device=dev))),
        (7, "each preset's parameters and speeds: decoder forward on 4 x 256 tokens, prefill "
         "8 x 64 then 32 cached decode steps, encoder + adapter on 4 clips of 10 s",
         lambda: [bench_preset(p) for p in M.PRESETS])]
    return [item for item in items if item[0] in (4, 5) or (item[0] == 6) == bool(on)]


def bench(args):
    """The machine, each item named as it starts, then the tables in order."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                    if ln.startswith("model name")), cpu)
    machine = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start")
    if args.device != "cpu":
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            sys.exit(f"--device {args.device}: not usable here ({e})")
        if args.device.startswith("cuda"):
            machine += f"; {torch.cuda.get_device_name(args.device)}"
    print(f"machine: {machine}")
    tables = []
    for number, what, run in bench_items(args):
        print(f"{number}. {what} ...", flush=True)
        tables.append((number, f"{number}. {what}\n\n{bench_table(run())}"))
    print("\n\n".join(table for _, table in sorted(tables)))


def main(argv=None):
    """The items' tables; with `mem` first, item 2's child: one variant in this process."""
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    if argv[:1] == ["mem"]:
        ap.add_argument("mem")
        ap.add_argument("--variant", choices=["naive", "fused"], required=True)
        for name, default in (("--N", 8192), ("--V", 32768), ("--d", 256), ("--chunk-size", 1024)):
            ap.add_argument(name, type=int, default=default)
    else:
        ap.add_argument("--device", default="cpu", help="cuda: items 4 to 6 alone (the samplers "
                        "vs generate, the decode step, the align stage's rollouts), on the GPU")
        ap.add_argument("--no-compile", dest="compile", action="store_false",
                        help="item 4 without compiled_step (its compilation takes a while)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "mem" in args:
        print(json.dumps(bench_mem(args.variant, args.N, args.V, args.d, args.chunk_size)))
    else:
        bench(args)


if __name__ == "__main__":
    main()
