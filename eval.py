"""
Evaluation: the paper's tables on the toy benchmarks, and speed / memory benchmarks.

    python eval.py bench      # KV-cached vs recomputed sampling, fused vs naive log-probs, one X-OPD step
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import model
import xopd

# -----------------------------------------------------------------------------
# speed / memory benchmarks (print a table, assert nothing)


def sample_recompute(decoder, lengths, input_ids, *, max_new_tokens, eos_id, temperature=1.0, generator=None):
    """The naive way to sample: run the whole prefix through the decoder for every new token."""
    B, T = input_ids.shape
    ids = torch.cat([input_ids, input_ids.new_full((B, max_new_tokens), eos_id)], dim=1)
    rows = torch.arange(B)
    out = []
    with torch.inference_mode():
        for step in range(max_new_tokens):
            hidden = decoder(ids[:, :T + step])  # (B, T+step, dim): everything again
            logits = decoder.logits(hidden[rows, lengths - 1 + step])
            tok, _ = xopd.sample_next_token(logits, generator, temperature)
            ids[rows, lengths + step] = tok
            out.append(tok)
    return torch.stack(out, 1)


def bench_sampling(batch=32, prompt=64, new_tokens=128, vocab=2000, preset="cpu", seed=0):
    """Item 1: tokens/s with the KV cache and with full recomputation, same model and seed."""
    _, _, dcfg = model.make_configs(preset, vocab)
    torch.manual_seed(seed)
    dec = model.Decoder(dcfg).eval()
    ids = torch.randint(0, vocab, (batch, prompt))
    lens = torch.full((batch,), prompt)
    no_eos = -1  # never sampled: every row runs the full length, the same work for both
    xopd.sample(dec, torch.full((2,), 8), input_ids=ids[:2, :8], max_new_tokens=4, eos_id=no_eos)  # warm-up
    t0 = time.perf_counter()
    cached, _, _ = xopd.sample(dec, lens, input_ids=ids, max_new_tokens=new_tokens, eos_id=no_eos,
                               generator=torch.Generator().manual_seed(seed))
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = sample_recompute(dec, lens, ids, max_new_tokens=new_tokens, eos_id=no_eos,
                             generator=torch.Generator().manual_seed(seed))
    t_naive = time.perf_counter() - t0
    n_tok = batch * new_tokens
    same = (cached == naive).float().mean().item()
    return dict(cached_tok_s=n_tok / t_cached, naive_tok_s=n_tok / t_naive, cached_s=t_cached, naive_s=t_naive,
                same_tokens=same)


def _peak_rss_mb():
    """
    Peak resident memory of this process. On Linux, VmHWM of /proc/self/status: ru_maxrss
    would do, except that a child started by fork/vfork + exec inherits its parent's peak
    in ru_maxrss, which hides everything below it. Elsewhere ru_maxrss.
    """
    if os.path.exists("/proc/self/status"):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def bench_mem(variant, N=8192, V=32768, d=256, chunk_size=1024, seed=0):
    """Item 2, one variant in this process: forward + backward time and peak extra RSS."""
    torch.manual_seed(seed)
    # warm-up on small sizes so kernel / allocator set-up is not counted as the variant's memory
    for n, v in ((64, 256), (N, 256)):
        h = torch.randn(n, d, requires_grad=True)
        w = torch.randn(v, d, requires_grad=True)
        t = torch.randint(0, v, (n,))
        _logprobs(variant, h, w, t, chunk_size).sum().backward()
    h = (0.1 * torch.randn(N, d)).requires_grad_()
    w = (0.1 * torch.randn(V, d)).requires_grad_()
    t = torch.randint(0, V, (N,))
    upstream = torch.randn(N)
    base = _peak_rss_mb()  # inputs are in; what follows is the variant's own memory
    t0 = time.perf_counter()
    out = _logprobs(variant, h, w, t, chunk_size)
    (out * upstream).sum().backward()
    seconds = time.perf_counter() - t0
    return dict(variant=variant, seconds=seconds, peak_extra_mb=_peak_rss_mb() - base,
                checksum=float(h.grad.double().abs().sum() + w.grad.double().abs().sum()))


def _logprobs(variant, h, w, t, chunk_size):
    if variant == "fused":
        return xopd.token_logprobs(h, w, t, chunk_size=chunk_size)
    return F.log_softmax(h @ w.T, dim=-1).gather(1, t[:, None]).squeeze(1)  # (N, V) logits, and more


def bench_logprobs(threads=0, repeats=2, **kw):
    """
    Item 2: each variant in its own process, so each peak RSS is its own. Each variant runs
    in `repeats` fresh processes: the peak is the largest of them (on this VM the kernel's
    high-water mark occasionally misses a freed buffer), the time the smallest.
    """
    res = {}
    for variant in ("naive", "fused"):
        args = [sys.executable, os.path.abspath(__file__), "bench-mem", "--variant", variant, "--threads", str(threads)]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        runs = [json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(repeats)]
        res[variant] = dict(seconds=min(r["seconds"] for r in runs),
                            peak_extra_mb=max(r["peak_extra_mb"] for r in runs),
                            all_peaks_mb=[round(r["peak_extra_mb"]) for r in runs])
    return res


def bench_step(batch=8, n=4, max_new_tokens=64, vocab=2000, preset="cpu", seed=0, seconds_audio=3.0):
    """Item 3: one xopd_step of the preset (after one warm-up step), split into its phases."""
    torch.manual_seed(seed)
    enc, adp, dcfg = model.make_configs(preset, vocab)
    teacher = model.Decoder(dcfg)
    audio_id, eos_id = vocab - 1, 3
    student = model.student_from_teacher(teacher, enc, adp, audio_token_id=audio_id).freeze_audio()
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    text_lens = torch.randint(24, 48, (batch,), generator=g)
    text_ids = torch.randint(4, vocab - 1, (batch, int(text_lens.max())), generator=g)
    speech_ids = torch.full((batch, 8), 5)
    speech_ids[:, 3] = audio_id  # chat prefix, the AUDIO placeholder, chat suffix
    frames = int(seconds_audio * 100)  # 10 ms hop
    b = dict(text_ids=text_ids, text_lens=text_lens, speech_ids=speech_ids, speech_lens=torch.full((batch,), 8),
             mels=torch.randn(batch, enc.n_mels, frames, generator=g), mel_lens=torch.full((batch,), frames),
             response_ids=torch.full((batch, 4), eos_id), response_lens=torch.full((batch,), 4))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=2e-6)
    kw = dict(n=n, max_new_tokens=max_new_tokens, eos_id=eos_id)
    xopd.xopd_step(student, teacher, opt, b, generator=torch.Generator().manual_seed(seed), **kw)  # warm-up
    m = xopd.xopd_step(student, teacher, opt, b, generator=torch.Generator().manual_seed(seed + 1), **kw)
    m.update(batch=batch, n=n, max_new_tokens=max_new_tokens)
    return m


def bench(args):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    machine = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"
    print(f"machine: {machine}")
    # item 2 first, while this process is small: its children start from a fresh memory map
    print("2. token_logprobs vs log_softmax(h @ W.T).gather, N 8192, V 32768, d 256, fp32, fwd+bwd "
          "(2 processes each: fastest time, largest peak) ...", flush=True)
    lp = bench_logprobs(threads=torch.get_num_threads())
    print("1. sampling, cpu preset decoder (vocab 2000), batch 32, prompt 64, 128 new tokens ...", flush=True)
    s = bench_sampling()
    print("3. one xopd_step, cpu preset (vocab 2000), 8 prompts x n 4 x 2 modalities, 64 new tokens ...", flush=True)
    st = bench_step()
    nv, fu = lp["naive"], lp["fused"]
    total = st["ms_rollout"] + st["ms_teacher"] + st["ms_update"]
    rows = [
        ("1 sampling", "KV cache", f"{s['cached_tok_s']:.0f} tok/s", f"{s['cached_s']:.2f} s"),
        ("1 sampling", "recompute prefix", f"{s['naive_tok_s']:.0f} tok/s", f"{s['naive_s']:.2f} s"),
        ("1 sampling", "ratio", f"{s['cached_tok_s'] / s['naive_tok_s']:.1f}x faster",
         f"{100 * s['same_tokens']:.1f}% same tokens"),
        ("2 log-probs", "naive", f"{nv['seconds']:.2f} s", f"{nv['peak_extra_mb']:.0f} MB peak extra {nv['all_peaks_mb']}"),
        ("2 log-probs", "fused, chunk 1024", f"{fu['seconds']:.2f} s", f"{fu['peak_extra_mb']:.0f} MB peak extra {fu['all_peaks_mb']}"),
        ("2 log-probs", "ratio", f"{nv['seconds'] / fu['seconds']:.2f}x time (naive / fused)",
         f"{nv['peak_extra_mb'] / max(fu['peak_extra_mb'], 1e-9):.1f}x less memory"),
        ("3 xopd_step", "rollout", f"{st['ms_rollout']:.0f} ms", f"{100 * st['ms_rollout'] / total:.0f}%"),
        ("3 xopd_step", "teacher scoring", f"{st['ms_teacher']:.0f} ms", f"{100 * st['ms_teacher'] / total:.0f}%"),
        ("3 xopd_step", "update", f"{st['ms_update']:.0f} ms", f"{100 * st['ms_update'] / total:.0f}%"),
        ("3 xopd_step", "total", f"{total:.0f} ms", f"{st['tokens']} sampled tokens"),
    ]
    table = ["| item | variant | speed | other |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    print("\n".join(table))
    return table, machine


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bench", help="speed / memory benchmarks: prints a table")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p = sub.add_parser("bench-mem", help="one token_logprobs variant in this process (used by bench)")
    p.add_argument("--variant", choices=["naive", "fused"], required=True)
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cmd == "bench":
        bench(args)
    elif args.cmd == "bench-mem":
        print(json.dumps(bench_mem(args.variant, args.N, args.V, args.d, args.chunk_size)))


if __name__ == "__main__":
    main()
