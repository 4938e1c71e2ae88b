"""train.py under torchrun: 2 processes on gloo (CPU) against 1 process with the same global batch.

The ranks run this file as a script (the __main__ block at the bottom) under
`python -m torch.distributed.run --standalone --nproc_per_node 2`, as a user's torchrun would.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
import xopd  # noqa: E402
# noqa: E402  (the shared tiny_run's: it is the 1-process run here)
from conftest import RUN_STEPS as STEPS


def torchrun(*args, check=True):
    """This file's __main__ block on 2 ranks; -> the CompletedProcess (stdout, stderr as text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                  for f in fs)


STAGES = ("teacher", "encoder", "omni", "align/sft")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, tiny_run):
    """The tiny pipeline with SFT, in 1 process (the shared tiny_run, which holds it among its
    methods) and in 2 (same flags, so the same global batch)."""
    two = tmp_path_factory.mktemp("two")
    p = torchrun("train", "--out", two, "--preset", "tiny", "--data", tiny_data, "--method", "sft",
                 *STEPS)
    return tiny_run, two, p.stdout


def test_two_ranks_give_the_losses_and_weights_of_one(runs):
    one, two, _ = runs
    for stage in STAGES:
        a, b = read_log(one / stage / "log.jsonl"), read_log(two / stage / "log.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5,
                                                       abs=1e-6), stage
        assert [r["tokens"] for r in b] == [r["tokens"] for r in a], stage  # summed over the ranks
        wa = M.load_checkpoint(str(one / stage / "model.pt"))["model"]
        wb = M.load_checkpoint(str(two / stage / "model.pt"))["model"]
        for k in wa:  # Adam divides by a gradient's running scale: a near-zero gradient's rounding
            # moves its weight by up to the rate (2e-3 here) a step; seen: at most 5e-5 in these
            # steps
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=2e-4, msg=f"{stage}: {k}")


def test_only_rank_0_writes_and_prints(runs):
    one, two, stdout = runs
    # the 1-process run holds every method's align run: those of SFT alone are the 2-rank run's
    assert "align/xopd/model.pt" in files(one)
    assert files(two) == [f for f in files(one) if not f.startswith("align/")
                          or f.startswith("align/sft/")]
    # a second writer would leave its own files, or lines twice:
    for stage in STAGES:
        steps = len(read_log(one / stage / "log.jsonl"))
        assert [r["step"] for r in read_log(two / stage / "log.jsonl")] == list(range(1, steps + 1))
    assert stdout.count("time per stage") == 1 and "rank 0 of 2 (torchrun)" in stdout
    a, b = (json.load(open(r / "align" / "sft" / "eval.json")) for r in (two, one))
    # greedy scores are the same; the teacher's judgement is of sampled log-probs, equal up to the
    # rounding of gradients averaged over two ranks
    ja, jb = a.pop("judge"), b.pop("judge")
    assert a == b
    assert ja["rkl_cm"] == pytest.approx(jb["rkl_cm"], rel=1e-3)
    assert ja["teacher_lp"] == pytest.approx(jb["teacher_lp"], rel=1e-3)


def test_an_interrupted_two_rank_run_resumes_to_the_uninterrupted_losses(runs, tiny_data, tmp_path):
    _, two, _ = runs
    part = tmp_path / "part"
    argv = ["--out", part, "--preset", "tiny", "--data", tiny_data, "--method", "sft", *STEPS]
    # during step 5 of the teacher
    p = torchrun("train", *argv, "--interrupt_at", 6, 4, check=False)
    assert p.returncode != 0 and "KeyboardInterrupt" in p.stderr
    # step 4's waited for step 5
    assert M.load_checkpoint(str(part / "teacher" / "ckpt.pt"))["step"] == 2
    torchrun("train", *argv, "--resume")
    for stage in STAGES:
        a, b = read_log(two / stage / "log.jsonl"), read_log(part / stage / "log.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5,
                                                       abs=1e-6), stage


@pytest.mark.parametrize("flag", ["--batch_size", "--encoder_batch", "--align_batch"])
def test_a_batch_that_does_not_split_evenly_is_refused(flag):
    cfg = train.parse_args(["--preset", "tiny", "--out", "/tmp/x", flag, "6"])
    # 6 rows: 3 a rank (the preset's other batches are 8, 8 and 4)
    train.check_batches_split(cfg, 2)
    with pytest.raises(SystemExit, match=rf"^{flag} 6: under torchrun each step's batch is split "
                                         r"evenly over the 4 ranks; "
                                         r"expected a multiple of 4$"):
        train.check_batches_split(cfg, 4)
    # one process takes any batch
    train.check_batches_split(train.parse_args(["--preset", "tiny", "--out", "/tmp/x", flag, "7"]),
                              1)


def test_the_batch_check_comes_before_stage_1(tiny_data, tmp_path, monkeypatch):
    """The pipeline refuses by rank count before it writes anything: as rank 0 of 2 (no torchrun
    needed to see that) a batch of 3 stops it."""
    monkeypatch.setattr(train, "WORLD_SIZE", 2)
    with pytest.raises(SystemExit, match=r"--align_batch 3: .*expected a multiple of 2"):
        train.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--data", tiny_data,
                    "--align_batch", "3"])
    assert os.listdir(tmp_path / "run") == []  # no stage, and the lock let go


# -----------------------------------------------------------------------------
# X-OPD: the averaged gradient of 2 ranks = the gradient on the union of their rollouts


def xopd_pair():
    torch.manual_seed(0)
    enc, adp, dec = M.make_configs("tiny", 24)
    teacher = M.Decoder(dec)
    student = M.student_from_teacher(teacher, enc, adp, audio_token_id=23).freeze_audio()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    B, text, speech = 4, [], []
    for b in range(B):
        text.append([1] + torch.randint(4, 20, (3 + b,), generator=g).tolist() + [2])
        speech.append([1, 23, 2])
    pad = lambda seqs: torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs])
    batch = data.Batch(text_ids=pad(text), text_lens=torch.tensor(list(map(len, text))),
                       speech_ids=pad(speech),
                       speech_lens=torch.full((B,), 3), mels=torch.randn(B, 80, 64, generator=g),
                       mel_lens=torch.full((B,), 64))
    return student, teacher, batch


def rows(batch, idx):
    return data.Batch(**{k: None if v is None else v[idx] for k, v in vars(batch).items()})


KW = dict(n=2, lam=0.5, max_new_tokens=5, eos_id=3)


def xopd_rank(out):
    """One rank: X-OPD on its rows (train.shard), rollouts from its own generator, then the
    gradient averaged as train.update_weights does; saves the rollouts and that gradient."""
    train.init_distributed(torch.device("cpu"))
    student, teacher, batch = xopd_pair()
    idx = train.shard(list(range(batch.text_ids.size(0))))
    seen = {}
    real = xopd.student_rollouts

    def record(*a, **k):
        prompts, rollouts = real(*a, **k)
        seen.update(rollouts)
        return prompts, rollouts
    xopd.student_rollouts = record
    loss, _ = xopd.xopd_step(student, teacher, rows(batch, idx),
                             generator=torch.Generator().manual_seed(100 + train.RANK), **KW)
    params = [p for p in student.parameters() if p.requires_grad]
    loss.backward()
    train.average_gradients(params)
    torch.save({"idx": idx, "rollouts": seen, "grads": [p.grad for p in params]},
               os.path.join(out, f"rank{train.RANK}.pt"))
    # leave the group together: a rank that exits with gloo's threads still up can abort (SIGABRT)
    train.barrier()
    torch.distributed.destroy_process_group()


def test_xopd_averaged_gradient_is_the_gradient_on_the_union_of_the_rollouts(tmp_path, monkeypatch):
    torchrun("xopd", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["idx"] != ranks[1]["idx"]
    for a, b in zip(ranks[0]["grads"], ranks[1]["grads"]):
        assert torch.equal(a, b)  # every rank updates with the same gradient
    # one process, the union of both ranks' prompts and of their rollouts (padded to one length)
    student, teacher, batch = xopd_pair()
    union = rows(batch, ranks[0]["idx"] + ranks[1]["idx"])
    real = xopd.student_rollouts

    def replay(student, batch, **k):
        prompts, _ = real(student, batch, **k)
        out = {}
        for term in prompts:
            parts = [r["rollouts"][term] for r in ranks]
            L = max(p[0].size(1) for p in parts)
            padded = lambda i: [torch.nn.functional.pad(p[i], (0, L - p[i].size(1))) for p in parts]
            out[term] = tuple(torch.cat(padded(i)) for i in range(3))  # ids, mask, logp_old
        return prompts, out
    monkeypatch.setattr(xopd, "student_rollouts", replay)
    loss, _ = xopd.xopd_step(student, teacher, union, generator=torch.Generator().manual_seed(0),
                             **KW)
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    assert any(p.grad.abs().sum() > 0 for p in params)
    for p, g in zip(params, ranks[0]["grads"]):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":  # one rank, under torchrun
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "xopd":
        xopd_rank(args[0])
    else:
        # raise during step `at` of the stage with `steps` steps, on every rank
        if "--interrupt_at" in args:
            i = args.index("--interrupt_at")
            steps, at = int(args[i + 1]), int(args[i + 2])
            del args[i:i + 3]
            real_lr_at = train.lr_at

            def lr_at(step, total, peak, warmup):
                if total == steps and step == at:
                    raise KeyboardInterrupt
                return real_lr_at(step, total, peak, warmup)
            train.lr_at = lr_at
        train.main(args)
