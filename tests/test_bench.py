"""tests/bench.py: the benchmarks' timing helper and their figures, from times chosen here."""
import pytest
import torch

import bench
import model as M


def test_timeit_is_the_best_run_per_call_after_a_warm_up(monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 26.0, 30.0, 39.0])  # runs of 2 calls: 10 s, 6 s, 9 s
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls, synced = [], []
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda: synced.append(1))
    assert bench.timeit(lambda: calls.append(1), reps=3, calls=2, device="cuda") == 3.0
    assert len(calls) == 1 + 3 * 2 and len(synced) == 1 + 3


def test_bench_decode_step_on_a_cpu_from_known_times(monkeypatch):
    """Item 5's table on a CPU (no graph) with timeit's seconds chosen here: the bytes a static
    decode step must read, from the config by hand (the layers' projections and every position
    of the keys and values), and every figure derived from them as by hand."""
    times = iter([2**27 / 12e9, 1e-6, 2e-6])  # a copy of 64 MiB, the matmuls alone, the step

    def timeit(fn, **timing):  # each timed function runs once
        fn()
        return next(times)
    monkeypatch.setattr(bench, "timeit", timeit)
    recs = bench.bench_decode_step("tiny", batch=3, prompt=4, new_tokens=6, reps=1)
    _, _, c = M.make_configs("tiny", 2000)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    weights = 4 * c.n_layers * (c.dim * (q + 2 * kv) + q * c.dim + 3 * c.dim * c.hidden_dim)
    assert recs[-1]["gb_s"] == weights / 1e-6 / 1e9  # the matmuls alone read the weights
    assert recs[0]["mb"] == (weights + 4 * 2 * c.n_layers * 3 * kv * (4 + 6)) / 1e6  # 214272 B
    assert bench.bench_table(recs).splitlines() == [
        "| variant | µs | matmuls' share of it | MB | GB/s | of a device copy's GB/s | notes |",
        "|---|---|---|---|---|---|---|",
        "| tiny: bytes it reads | | | 0.2 | | | weights 0.2 MB, keys and values 0.0 MB |",
        "| tiny: a device copy (read + write) | | | | 12 | | |",
        "| tiny: eager | 2 | 50% | | 107 | 893% | |",
        "| tiny: its matmuls alone | 1 | | | 203 | | weights read |"]


def test_bench_samplers_on_a_cpu():
    # the fixed-shape samplers' tokens equal to the default's and to the naive sampler's, and
    # the same from one seed run to run (the timings: test_timeit_is_the_best_run_per_call...)
    r = bench.bench_rollouts("tiny", prompts=3, n=1, new_tokens=6, reps=1, prompt=8,
                         ways=("eager", "static", "naive"), eos_id=-1)  # item 1
    assert all(r[k]["repeats"] and r[k]["same"] == 1.0 for k in ("eager", "static", "naive"))
    r = bench.bench_rollouts("tiny", prompts=2, n=2, new_tokens=5, reps=1)  # item 6
    assert all(r[k]["repeats"] and r[k]["same"] == 1.0 for k in ("eager", "static", "graph"))


def test_same_tokens_counts_equal_tokens_against_a_naive_sampler():
    """The benchmarks' share of equal tokens: the naive sampler's tokens against themselves with
    one token in four changed, and against a sampler that stops early (other shape: none)."""
    _, _, c = M.make_configs("tiny", 50)
    torch.manual_seed(0)
    dec = M.Decoder(c).eval()
    ids = torch.randint(0, 50, (2, 5))
    naive = bench.sample_recompute(dec, torch.full((2,), 5), ids, max_new_tokens=6, eos_id=-1,
                               generator=torch.Generator().manual_seed(0))
    changed = naive.clone()
    changed[:, ::4] += 1
    assert bench.same(naive, naive) == 1.0 and bench.same(changed, naive) == pytest.approx(8 / 12)
    assert bench.same(naive[:, :3], naive) == 0.0


def test_bench_table_of_rollouts_from_known_results():
    """Items 1 and 6's table from hand-made results: every figure derived as by hand, a column
    only where a record fills it."""
    r = {"eager": dict(s=0.5, tok_s=2000.0, repeats=True, same=1.0),
         "static": dict(s=0.25, tok_s=4000.0, repeats=True, same=0.75),
         "graph": dict(s=0.1, tok_s=10000.0, repeats=False, same=0.125)}
    assert bench.bench_table(bench.rollout_records(r)).splitlines()[2:] == [
        "| xopd.sample | 500 | 2000 | 1.00x | eager | yes | 100.0% |",
        "| static_step | 250 | 4000 | 2.00x | eager | yes | 75.0% |",
        "| DecodeGraph | 100 | 10000 | 5.00x | eager | NO | 12.5% |"]
