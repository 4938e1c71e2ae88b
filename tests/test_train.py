"""The pipeline end to end on the tiny preset, resume, the guards, and the tables it ends with."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import eval as E
import model as M
import train
import xopd
from conftest import RUN_STEPS  # the shared tiny_run's step counts (conftest.py)


def tiny(out, data_dir, *extra):
    return ["--preset", "tiny", "--out", str(out), "--data", data_dir, *extra]


def like_tiny_run(out, data_dir, *extra):
    """The flags of the shared tiny_run (conftest.py), for a run that reuses its stages."""
    return tiny(out, data_dir, *RUN_STEPS, *extra)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_stage_and_method_writes_a_checkpoint_and_a_log(tiny_run):
    aligns = ("xopd", "sft", "kd", "gkd", "xopd_lam0", "xopd_lam1")
    names = ["teacher", "encoder", "omni"] + [f"align/{m}" for m in aligns]
    for name in names:
        ck = M.load_checkpoint(os.path.join(tiny_run, name, "model.pt"))
        assert ck["train"]["preset"] == "tiny"
        # finished runs leave only model.pt
        assert not os.path.exists(os.path.join(tiny_run, name, "ckpt.pt"))
        log = read_log(os.path.join(tiny_run, name, "log.jsonl"))
        assert [r["step"] for r in log] == list(range(1, ck["step"] + 1))
        # each step's rate is the schedule's at that step, under the stage's own peak
        peak, warmup = ck["lr"], ck["train"]["warmup"]
        assert [r["lr"] for r in log] == [train.lr_at(k, len(log), peak, warmup)
                                          for k in range(len(log))]
        assert peak == (ck["train"][f"{name}_lr"] if "/" not in name
                        else train.ALIGN_LR[name.split("/")[1].split("_")[0]])


def test_alignment_keeps_the_audio_side_frozen_and_changes_the_decoder(tiny_run):
    base = M.load_checkpoint(os.path.join(tiny_run, "omni", "model.pt"))["model"]
    for m in ("xopd", "sft", "gkd"):
        new = M.load_checkpoint(os.path.join(tiny_run, "align", m, "model.pt"))["model"]
        for k in base:
            if k.startswith(("encoder.", "adapter.")):
                assert torch.equal(base[k], new[k]), f"{m} changed the frozen {k}"
        assert any(not torch.equal(base[k], new[k]) for k in base
                   if k.startswith("decoder.")), f"{m} did not train"


def test_eval_writes_all_three_tables(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tables.*"))
    t = E.report(str(run))
    assert set(t) == {"premise", "table1", "table2", "table3", "curves"}
    assert "xopd" in t["table1"] and "base student" in t["table1"]
    lams = [line.split("|")[1].strip() for line in t["table2"].splitlines()[2:]]
    assert lams == ["0", "0.5", "1"]
    # Table 1's cells are the scores in each run's eval.json, family by family, S then T
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:8]]
             for line in t["table1"].splitlines()[2:]}
    for row, name in (("base student", "omni"), ("xopd", "align/xopd")):
        res = json.load(open(run / name / "eval.json"))
        fams = ("arith", "facts", "instruct")
        assert cells[row] == [f"{res[m][f]:.1f}" for f in fams for m in ("S", "T")], row
    res = json.load(open(run / "tables.json"))["results"][0]  # one seed
    fams = set(res["teacher"]["T"])
    assert fams == {"arith", "instruct", "facts"} and res["teacher"]["S"] == {}
    assert set(res["omni"]["S"]) == fams
    assert set(res["omni"]["audio"]) == {"pitch", "rate", "emotion", "noise"}
    # Table 3's rows carry each student's own ASR WER, the teacher (no audio) has none
    rows = {line.split("|")[1].strip(): line for line in t["table3"].splitlines()[2:]}
    assert rows["base student"].rstrip(" |").endswith(f"| {res['omni']['asr_wer']:.1f}")
    assert "asr_wer" not in res["teacher"] and "text teacher (T only)" not in rows


def test_rerun_skips_finished_stages(tiny_run, tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    capsys.readouterr()
    stages = ("teacher", "encoder", "omni", "align/xopd")
    before = {s: os.path.getmtime(run / s / "model.pt") for s in stages}
    train.main(like_tiny_run(run, tiny_data))
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.endswith("exists: skipped")] == [
        f"[{s}] {run / s / 'model.pt'} exists: skipped" for s in before]
    assert {s: os.path.getmtime(run / s / "model.pt") for s in before} == before


def test_stage_headers_estimate_the_time_left_from_the_stages_still_to_run(
        tiny_run, tiny_data, tmp_path, capsys, monkeypatch):
    """On a run whose first stages are done, only align and eval are left: at the reference pace
    until a stage has run here, then at this machine's pace on it."""
    monkeypatch.setitem(train.REFERENCE_S, "tiny", dict.fromkeys(train.REFERENCE_S["cpu"], 100))
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns("align"))
    train.main(like_tiny_run(out, tiny_data))
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== [")]
    stages = ["data", "teacher", "encoder", "omni", "align", "eval"]
    assert [h.split("]")[0] for h in heads] == [f"== [{i}/6 {s}" for i, s in enumerate(stages, 1)]
    # align 100 s + eval 100 s
    assert all(h.endswith("about 3m20s left at the README's pace)") for h in heads[:5])
    # align took ~1 s, not 100
    assert "pace" not in heads[5] and not heads[5].endswith("about 1m40s left)")


def test_resume_reproduces_the_uninterrupted_losses(tiny_run, tmp_path, tiny_data, monkeypatch):
    steps = RUN_STEPS
    flags = dict(zip(steps[::2], steps[1::2]))
    # as below
    counts = (flags["--teacher_steps"], flags["--align_steps"], flags["--ckpt_every"])
    assert counts == ("6", "4", "2")
    full = tiny_run  # teacher 6 steps, encoder 4, omni 6, X-OPD 4, a checkpoint every 2
    # the same run, interrupted during step 5 of the teacher and during step 3 of X-OPD
    part = tmp_path / "part"
    real_lr_at = train.lr_at

    def interrupt_at(stage_steps, at):
        def lr_at(step, total, peak, warmup):
            if total == stage_steps and step == at:
                raise KeyboardInterrupt
            return real_lr_at(step, total, peak, warmup)
        return lr_at

    monkeypatch.setattr(train, "lr_at", interrupt_at(6, 4))
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny(part, tiny_data, *steps))
    # step 4's checkpoint waits for step 5's finite loss, which never came: step 2's is on disk
    assert M.load_checkpoint(str(part / "teacher" / "ckpt.pt"))["step"] == 2
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    monkeypatch.setattr(train, "stage_align", lambda *a: None)  # stop after omni this time
    monkeypatch.setattr(E, "evaluate_all", lambda *a: None)
    train.main(tiny(part, tiny_data, *steps, "--resume"))
    monkeypatch.undo()
    monkeypatch.setattr(train, "lr_at", interrupt_at(4, 2))
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny(part, tiny_data, *steps))
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.main(tiny(part, tiny_data, *steps, "--resume"))
    for stage in ("teacher", "encoder", "omni", "align/xopd"):
        a, b = read_log(full / stage / "log.jsonl"), read_log(part / stage / "log.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b]
        assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5,
                                                       abs=1e-6), stage


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    real = xopd.response_nll
    calls = {"n": 0}

    def poisoned(*a, **k):
        loss, n = real(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), n

    monkeypatch.setattr(xopd, "response_nll", poisoned)
    with pytest.raises(SystemExit, match="loss is nan"):
        train.main(tiny(tmp_path, tiny_data, "--teacher_steps", "6", "--ckpt_every", "2"))
    ck = M.load_checkpoint(str(tmp_path / "teacher" / "ckpt.pt"))
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not os.path.exists(tmp_path / "teacher" / "model.pt")


def test_divergence_stops_by_name_and_never_saves_the_diverged_weights(tiny_run, tmp_path,
                                                                       tiny_data):
    # lr 1e10: step 1 moves every weight by ~1e10, step 2's loss is not finite; step 1's
    # checkpoint was waiting for that loss, so no checkpoint holds the diverged weights
    with pytest.raises(SystemExit, match="teacher.*stopping"):
        train.main(tiny(tmp_path, tiny_data, "--teacher_lr", "1e10", "--ckpt_every", "1"))
    ck = tmp_path / "teacher" / "ckpt.pt"
    assert not ck.exists() or all(v.abs().max() < 1e3
                                  for v in M.load_checkpoint(str(ck))["model"].values())
    # X-OPD samples from the student: diverged weights stop the run by name, not inside multinomial
    for stage in ("teacher", "encoder", "omni"):
        shutil.copytree(os.path.join(tiny_run, stage), tmp_path / "ok" / stage)
    with pytest.raises(SystemExit, match="align/xopd_big.*(not finite|nan|inf).*stopping"):
        train.main(like_tiny_run(tmp_path / "ok", tiny_data, "--align_lr", "1e10", "--tag", "big"))
    assert not (tmp_path / "ok" / "align" / "xopd_big" / "model.pt").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--method", "dpo"], "--method"),
    (["--lam", "1.5"], "--lam"),
    (["--preset", "huge"], "--preset"),
    (["--n", "0"], "--n"),
    (["--bogus", "1"], "--bogus"),
    (["--align_steps", "ten"], "--align_steps"),
    (["--temperature", "0"], "--temperature: --method xopd samples its rollouts; expected a "
                             "finite temperature > 0, got 0.0"),
    (["--method", "gkd", "--temperature", "nan"], "--temperature: --method gkd samples"),
    (["--method", "sft", "--temperature", "inf"],
     "--temperature: expected a finite value >= 0, got inf"),
    (["--val_rkl_prompts", "0"], "--val_rkl_prompts: expected a positive integer, got 0"),
    (["--val_per_family", "0"], "--val_per_family: expected a positive integer"),
    (["--val_every", "0"], "--val_every: expected a positive integer"),
    (["--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    (["--warmup", "-2"], "--warmup: expected an integer >= 0"),
    (["--teacher_lr", "0"], "--teacher_lr: expected a finite learning rate > 0, got 0.0"),
    (["--omni_lr", "nan"], "--omni_lr: expected a finite learning rate > 0, got nan"),
    (["--encoder_lr=-1e-3"], "--encoder_lr: expected a finite learning rate > 0"),
    (["--align_lr", "inf"], "--align_lr: expected a finite learning rate > 0 (or 0"),
    (["--lr_grid", "1e-4,0"], "--lr_grid: expected comma-separated learning rates > 0"),
    (["--lr_grid", "1e-4,x"], "--lr_grid: expected comma-separated learning rates > 0"),
    (["--grad_clip", "-1"], "--grad_clip: expected a finite value >= 0 (0: off), got -1.0"),
    (["--grad_clip", "nan"], "--grad_clip: expected a finite value >= 0"),
    (["--tag", "run/2"], "--tag: expected a plain name (letters, digits, -, _, .), got 'run/2'"),
])
def test_bad_flags_are_refused_by_name(argv, needle, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert needle in capsys.readouterr().err


def test_edge_values_that_mean_something_are_accepted():
    # sft never samples
    assert train.parse_args(["--method", "sft", "--temperature", "0"]).temperature == 0.0
    assert train.parse_args(["--align_lr", "0"]).align_lr == 0.0  # 0: the method's own rate
    cfg = train.parse_args(["--seed", "0", "--warmup", "0", "--grad_clip", "0", "--lr_grid",
                            "3e-5,1e-4"])
    assert (cfg.seed, cfg.warmup, cfg.grad_clip, cfg.lr_grid) == (0, 0, 0.0, "3e-5,1e-4")


def test_val_rkl_prompts_below_the_number_of_val_families_is_refused_before_stage_1(tiny_data,
                                                                                    tmp_path):
    world = data.World(tiny_data)
    with pytest.raises(SystemExit, match=r"--val_rkl_prompts 2: expected at least one per family "
                                         r"of .*val\.jsonl \(3: arith, facts, instruct\)"):
        train.main(tiny(tmp_path / "run", tiny_data, "--val_rkl_prompts", "2"))
    assert not os.path.exists(tmp_path / "run" / "teacher")
    train.check_world(train.parse_args(tiny(tmp_path / "run", tiny_data, "--val_rkl_prompts", "3")),
                      world)


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="model.pt: not a readable checkpoint"):
        M.load_checkpoint(str(path))
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="lacks the field"):
        M.load_checkpoint(str(path))


def test_lr_selection_reads_val_and_never_the_test_pool(tiny_run, tiny_data, tmp_path, monkeypatch):
    for stage in ("teacher", "encoder", "omni"):  # the same base; only the align runs are new
        shutil.copytree(os.path.join(tiny_run, stage), tmp_path / stage)

    class Untouchable(list):
        def _refuse(self, *a):
            raise AssertionError("the test pool was read while choosing a learning rate")
        __iter__ = __getitem__ = __len__ = __bool__ = _refuse

    real = data.read_manifest
    def read_manifest(path, audio=True, **kw):
        recs = real(path, audio, **kw)
        return Untouchable(recs) if os.path.basename(path) == "test.jsonl" else recs
    monkeypatch.setattr(data, "read_manifest", read_manifest)
    train.main(like_tiny_run(tmp_path, tiny_data, "--method", "sft", "--lr_grid", "1e-3,1e-4"))
    choice = json.load(open(tmp_path / "select" / "lr_sft.json"))
    finals = {lr: read_log(tmp_path / "select" / f"sft_lr{lr:g}" / "val.jsonl")[-1]
              for lr in (1e-4, 1e-3)}
    start = read_log(tmp_path / "select" / "sft_lr0.001" / "val.jsonl")[0]  # the base student
    assert choice["final"] == {f"{lr:g}": r for lr, r in finals.items()} and choice["base"] == start
    fams = data.text_families(data.World(tiny_data).val, 100)
    assert choice["chosen"] == train.rate_rule(start, finals, fams)[0]
    # item 3 of issue 34: runs measured on other val prompts are not reused
    with pytest.raises(SystemExit, match=r"\[select/sft_lr0\.0001\] .*\(val_per_family 100 -> 2\)"
                                         r"\. Delete .*select/sft_lr0\.0001 to rebuild it"):
        train.main(like_tiny_run(tmp_path, tiny_data, "--method", "sft", "--lr_grid", "1e-3,1e-4",
                                 "--val_per_family", "2"))
    # no test-set evaluation
    assert not os.path.exists(tmp_path / "select" / "sft_lr0.0001" / "eval.json")
    assert not os.path.exists(tmp_path / "align")  # the tables never list a selection run


def test_base_only_builds_stages_1_to_3_which_a_whole_run_then_reuses(tiny_data, tmp_path,
                                                                     capsys):
    train.main(like_tiny_run(tmp_path, tiny_data, "--base_only"))
    stages = ("teacher", "encoder", "omni")
    assert all(os.path.exists(tmp_path / s / "model.pt") for s in stages)
    assert not os.path.exists(tmp_path / "align") and not os.path.exists(tmp_path / "tables.md")
    capsys.readouterr()
    train.main(like_tiny_run(tmp_path, tiny_data))  # the same fingerprints: nothing retrained
    out = capsys.readouterr().out
    assert all(f"[{s}] {tmp_path / s / 'model.pt'} exists: skipped" in out for s in stages)
    assert os.path.exists(tmp_path / "align" / "xopd" / "eval.json")


def val_rec(S, T):  # a val record of two families of 100 prompts each, scores per family
    return {"val_S_a": S[0], "val_S_b": S[1], "val_T_a": T[0], "val_T_b": T[1],
            "val_S": sum(S) / 2, "val_T": sum(T) / 2}


# (base, {lr: final}, chosen): se of 50 % on 100 prompts is 5, so two families' mean has
# se = sqrt(25 + 25) / 2 = 3.54; of 90 %: sqrt(9 + 9) / 2 = 2.12
RATE_RULE_CASES = [
    # 1e-3 has the best val_S but loses val_T (50 -> 40 < 50 - 2 * 3.54): 3e-4 wins
    (val_rec((50, 50), (50, 50)), {1e-4: val_rec((55, 55), (50, 50)),
                                   3e-4: val_rec((60, 60), (49, 49)),
                                   1e-3: val_rec((80, 80), (40, 40))}, 3e-4, "2 of 3"),
    # 1e-4 and 3e-4 keep val_T; 1e-4 is within one se (2.12) of 3e-4's val_S 90: the smaller
    (val_rec((50, 50), (90, 90)), {1e-4: val_rec((88, 88), (90, 90)),
                                   3e-4: val_rec((90, 90), (89, 89))}, 1e-4, "2 of 2"),
    # no rate keeps val_T: the highest val_T
    (val_rec((50, 50), (90, 90)), {1e-4: val_rec((60, 60), (70, 70)),
                                   3e-4: val_rec((70, 70), (60, 60))}, 1e-4, "no rate"),
]


@pytest.mark.parametrize("base, finals, chosen, why", RATE_RULE_CASES)
def test_rate_rule_keeps_the_text_side_then_the_smallest_rate_near_the_best(base, finals, chosen,
                                                                            why):
    fams = {"a": [None] * 100, "b": [None] * 100}
    assert train.val_se(val_rec((50, 50), (90, 90)), fams, "val_S") == pytest.approx(50 ** 0.5 / 2)
    got, said = train.rate_rule(base, finals, fams)
    assert got == chosen and said.startswith(why)


def test_word_alignment_loss_on_clips_cut_into_as_many_words_as_spoken():
    enc_cfg, adp_cfg, dec_cfg = M.make_configs("tiny", 97)
    torch.manual_seed(4)
    student = M.SpeechLM(enc_cfg, adp_cfg, dec_cfg, audio_token_id=5)
    feats = torch.randn(3, 4, adp_cfg.bins * adp_cfg.d_in)
    # the clip, then 3, 2, 3 words
    batch = data.Batch(feats=feats, feat_lens=torch.tensor([4, 3, 4]))
    # row 1 was cut into 2 words of 3 spoken: left out
    word_ids = [[[10], [11], [12]], [[13], [14], [15]], [[16], [17], [18]]]
    got, n = train.word_alignment_loss(student, batch, word_ids)
    assert n == 6
    _, _, logits = student.adapter(feats, batch.feat_lens, student.decoder.embed_tokens.weight)
    picked = torch.cat([logits[0, :3], logits[2, :3]])
    logp = picked.log_softmax(-1)
    want = -logp[torch.arange(6), torch.tensor([10, 11, 12, 16, 17, 18])].mean()
    torch.testing.assert_close(got, want)
    got.backward()  # it trains the adapter's word scores, never the token embeddings
    assert student.adapter.word2.weight.grad is not None
    assert student.decoder.embed_tokens.weight.grad is None
    none, n = train.word_alignment_loss(student, batch, [[[1]], [[2]], [[3]]])
    assert none.item() == 0.0 and n == 0
    # a BPE splits words into pieces: each piece of a k-piece word is a target of weight 1/k
    word_ids[2][1] = [17, 20, 20]  # a word written with a repeated piece counts that piece twice
    got, n = train.word_alignment_loss(student, batch, word_ids)
    per_word = -logp[torch.arange(6), torch.tensor([10, 11, 12, 16, 17, 18])]
    per_word[4] = -(logp[4, 17] + 2 * logp[4, 20]) / 3
    torch.testing.assert_close(got, per_word.mean())


def test_a_users_data_folder_without_manifests_is_refused_and_left_alone(tmp_path):
    user = tmp_path / "u"
    user.mkdir()
    (user / "test.jsonl").write_text("{}\n")
    (user / "train.json").write_text("misnamed\n")
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--data", str(user)])
    assert "train.jsonl" in str(e.value) and "--data" in str(e.value)
    assert sorted(os.listdir(user)) == ["test.jsonl", "train.json"]
    assert (user / "test.jsonl").read_text() == "{}\n"


def test_a_stage_built_from_anything_else_is_refused_by_field_with_every_folder_to_rebuild(
        tiny_run, tiny_data, tmp_path):
    """Each refusal by the check that makes it, on the shared run's own checkpoints: the data
    folder's (toy_data_to_generate), each stage's model.pt (reusable) and a resumed ckpt.pt
    (resume_point), by the fingerprint the stage would have now."""
    out = str(tiny_run)
    world = data.World(tiny_data)
    cfg = lambda *extra, data_dir=tiny_data: train.parse_args(like_tiny_run(out, data_dir, *extra))
    own = train.ALIGN_LR["xopd"]

    def reusable(c, name, lr=None, w=world):
        return train.reusable(c, name, train.stage_fingerprint(c, w, name, lr))
    # the same settings: every stage is reused (test_rerun_skips_finished_stages: main skips them)
    same = cfg()
    assert [reusable(same, s) for s in ("teacher", "encoder", "omni")] == [True] * 3
    assert reusable(same, "align/xopd", own)
    stamp = open(os.path.join(tiny_data, "done.json")).read()
    with pytest.raises(SystemExit,
                       match=r"--data .*holds the toy world of seed 0 \(tiny preset\).*\(cpu\)"):
        train.toy_data_to_generate(train.parse_args(["--preset", "cpu", "--out", out, "--data",
                                                     tiny_data]))
    with pytest.raises(SystemExit,
                       match=r"--data .*holds the toy world of seed 0 .*asks for seed 3"):
        train.toy_data_to_generate(cfg("--seed", "3"))
    assert open(os.path.join(tiny_data, "done.json")).read() == stamp  # left as it was
    methods = ("gkd", "kd", "sft", "xopd", "xopd_lam0", "xopd_lam1")
    aligns = ", ".join(f"{out}/align/{m}" for m in methods)
    with pytest.raises(SystemExit) as e:
        reusable(cfg("--seed", "3"), "teacher")
    assert str(e.value) == (
        f"[teacher] {out}/teacher/model.pt was built from other settings, data or inputs "
        f"(seed 0 -> 3). Delete {out}/teacher, {out}/omni, {aligns} to rebuild them, or choose "
        f"another --out.")
    # a copy of the data is the same data; an edited manifest is not (item 4 of issue 34)
    assert reusable(same, "teacher", w=data.World(user_copy(tiny_data, tmp_path / "copy")))
    first_100 = ("train.jsonl", lambda recs: recs[:100])
    cut = data.World(user_copy(tiny_data, tmp_path / "cut", first_100))
    with pytest.raises(SystemExit, match=r"\[teacher\] .*\(data: train\.jsonl changed\)"):
        reusable(same, "teacher", w=cut)
    with pytest.raises(SystemExit, match=rf"\[encoder\] .*\(encoder_steps 4 -> 5\)\. Delete "
                                         rf"{out}/encoder, {out}/omni, {out}/align/gkd, "):
        reusable(cfg("--encoder_steps", "5"), "encoder")
    with pytest.raises(SystemExit,
                       match=rf"\(align_steps 4 -> 6\)\. Delete {out}/align/xopd to rebuild it,"):
        reusable(cfg("--align_steps", "6"), "align/xopd", own)
    with pytest.raises(SystemExit, match=rf"\[align/xopd\] .*\(lr {own!r} -> 0\.05\)"):
        reusable(cfg("--align_lr", "0.05"), "align/xopd", 0.05)
    # resume (item 3 of issue 34): a checkpoint is not continued under another warm-up or clipping
    f = train.stage_files(str(tmp_path), "omni")
    ck = M.load_checkpoint(os.path.join(out, "omni", "model.pt"))
    M.save_checkpoint(f.ckpt, {**ck, "step": 2})
    other = cfg("--warmup", "0", "--grad_clip", "0", "--resume")
    fp = train.stage_fingerprint(other, world, "omni")
    with pytest.raises(SystemExit, match=r"omni/ckpt\.pt was built .*\(warmup 2 -> 0; "
                                         r"grad_clip 1\.0 -> 0\.0\)"):
        train.resume_point(other, "omni", f, None, None, fp, 6)


def test_a_stage_on_a_rebuilt_input_is_refused_and_so_is_one_without_a_fingerprint(
        tiny_run, tiny_data, tmp_path, monkeypatch):
    """Item 1 of issue 34: after the refusal's own advice (delete teacher/, rerun with another
    --teacher_steps) the new teacher is built and the omni stage, built on the old one, refused."""
    for stage in ("teacher", "encoder", "omni", "align"):
        shutil.copytree(os.path.join(tiny_run, stage), tmp_path / stage)
    shutil.rmtree(tmp_path / "teacher")
    with pytest.raises(SystemExit) as e:
        train.main(like_tiny_run(tmp_path, tiny_data, "--teacher_steps", "3"))
    assert str(e.value).startswith(f"[omni] {tmp_path}/omni/model.pt was built from other "
                                   f"settings, data or inputs (input teacher rebuilt). Delete "
                                   f"{tmp_path}/omni, {tmp_path}/align/gkd, ")
    assert M.load_checkpoint(str(tmp_path / "teacher" / "model.pt"))["step"] == 3
    # a checkpoint made before fingerprints is refused by that name
    ck = M.load_checkpoint(str(tmp_path / "encoder" / "model.pt"))
    M.save_checkpoint(str(tmp_path / "encoder" / "model.pt"),
                      {k: v for k, v in ck.items() if not k.startswith("fingerprint")})
    with pytest.raises(SystemExit, match=r"\[encoder\] .*\(fingerprint: none recorded .*\)\. "
                                         rf"Delete {tmp_path}/encoder, {tmp_path}/omni, "):
        train.main(like_tiny_run(tmp_path, tiny_data, "--teacher_steps", "3"))


def test_kd_answers_are_made_again_for_another_teacher_length_or_prompts(tiny_run, tiny_data,
                                                                         tmp_path, monkeypatch):
    """Item 2 of issue 34: the KD cache is read only for the teacher, prompts and length it was
    made for; otherwise made again (xopd.generate's greedy answers), new prompts included."""
    world = data.World(tiny_data)
    cfg = lambda *extra: train.parse_args(like_tiny_run(tmp_path, tiny_data, *extra))
    cpu = torch.device("cpu")
    teacher, ck = M.load_model(os.path.join(tiny_run, "teacher", "model.pt"), cpu)
    tid = ck["fingerprint_id"]
    recs = [r for r in world.align if r["kind"] == "text"]
    os.makedirs(tmp_path / "align")
    shutil.copy(os.path.join(tiny_run, "align", "teacher_responses.json"), tmp_path / "align")
    real, made = xopd.generate, []

    def fresh(model, w, rs, modality, device, n):
        made.append(n)
        return real(model, w, rs, modality, device, n)
    monkeypatch.setattr(xopd, "generate", fresh)
    def answers(n, rs):
        return dict(zip([r["id"] for r in rs], real(teacher, world, rs, "text", cpu, n)))
    kd_run = train.teacher_responses(cfg(), world, teacher, tid, recs, cpu, None)
    assert made == [] and kd_run == answers(24, recs)  # the kd run's, read: 24 tokens (tiny preset)
    short = train.teacher_responses(cfg("--max_new_tokens", "8"), world, teacher, tid, recs, cpu,
                                    None)
    assert made == [8] and short == answers(8, recs) != kd_run
    new = recs + [{**recs[0], "id": "align-arith-00005-new"}]
    assert train.teacher_responses(cfg(), world, teacher, tid, new, cpu, None) == answers(24, new)
    other = train.teacher_responses(cfg(), world, teacher, "another", new, cpu, None)
    assert other == answers(24, new)
    assert made == [8, 24, 24]
    train.teacher_responses(cfg(), world, teacher, "another", new, cpu, None)
    assert made == [8, 24, 24]  # its own, read


def test_log_holds_exactly_the_steps_of_its_model_after_any_interrupts(tiny_run, tiny_data,
                                                                      tmp_path, monkeypatch):
    """Item 9 of issue 34: cut short after the checkpoint at step 4, run again without --resume
    (the log emptied, the checkpoint kept), cut short at step 1, then resumed from step 4: the
    log holds steps 1-6 with the uninterrupted run's losses."""
    real_lr_at = train.lr_at

    def cut_at(at):
        def lr_at(step, total, peak, warmup):
            if step == at:
                raise KeyboardInterrupt
            return real_lr_at(step, total, peak, warmup)
        return lr_at
    for stage in ("stage_encoder", "stage_omni", "stage_align"):
        monkeypatch.setattr(train, stage, lambda *a: None)  # the teacher alone
    monkeypatch.setattr(E, "evaluate_all", lambda *a: None)
    monkeypatch.setattr(E, "report", lambda *a: None)
    for at in (5, 1):  # during step 6, then during step 2 of a run from step 0
        monkeypatch.setattr(train, "lr_at", cut_at(at))
        with pytest.raises(KeyboardInterrupt):
            train.main(like_tiny_run(tmp_path, tiny_data))
    assert M.load_checkpoint(str(tmp_path / "teacher" / "ckpt.pt"))["step"] == 4
    assert [r["step"] for r in read_log(tmp_path / "teacher" / "log.jsonl")] == [1]
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    train.main(like_tiny_run(tmp_path, tiny_data, "--resume"))
    full = read_log(os.path.join(tiny_run, "teacher", "log.jsonl"))
    log = read_log(tmp_path / "teacher" / "log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in full], rel=1e-5, abs=1e-6)


def test_a_damaged_checkpoint_ends_in_one_line_naming_it(tiny_run, tiny_data, tmp_path):
    """Item 8 of issue 34: no traceback for what a user can fix."""
    for stage in ("teacher", "encoder", "omni"):
        shutil.copytree(os.path.join(tiny_run, stage), tmp_path / stage)
    final = tmp_path / "omni" / "model.pt"
    final.write_bytes(final.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        train.main(like_tiny_run(tmp_path, tiny_data))
    assert str(e.value).startswith(f"{final}: not a readable checkpoint (")
    assert "\n" not in str(e.value)


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_naming_it_and_leaves_no_tmp(
        tiny_run, tiny_data, tmp_path, monkeypatch):
    """Item 8 of issue 34: ENOSPC while a checkpoint is written."""
    for stage in ("teacher", "encoder"):
        shutil.copytree(os.path.join(tiny_run, stage), tmp_path / stage)
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if "step" in obj:  # a training checkpoint: half written, then the disk is full
            f.write(b"x" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        train.main(like_tiny_run(tmp_path, tiny_data))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'omni' / 'ckpt.pt'}: ") and "\n" not in message
    assert "No space left on device" in message
    assert sorted(os.listdir(tmp_path / "omni")) == ["log.jsonl", "val.jsonl"]

def test_sparkline_draws_bin_means_between_the_extremes():
    assert train.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert train.sparkline([0, 0, 7, 7], width=2) == "▁█"  # two bins of two: means 0 and 7
    assert train.sparkline([3.0, float("nan"), 3.0]) == "▄▄" and train.sparkline([]) == ""
    assert len(train.sparkline(list(range(1000)))) == 40


def test_precompute_gives_the_features_of_first_use_to_the_last_bit(tiny_data, capsys):
    """Features computed ahead of the steps are those each step would have computed on first use:
    the same groups of clips in the same order, a repeat within a step kept, so the same bits."""
    world_lazy, world_ahead = data.World(tiny_data), data.World(tiny_data)
    enc_cfg, _, _ = M.make_configs("tiny", world_lazy.tok.get_vocab_size())
    torch.manual_seed(0)
    enc = M.AudioEncoder(**vars(enc_cfg)).eval()
    recs = world_lazy.train[:40]

    # overlapping batches of clips of different lengths, one clip twice in a step
    def records_at(step):
        rows = [recs[i] for i in data.batch_indices(len(recs), 6, step, 0)]
        return rows + rows[:1]
    for step in range(12):
        world_lazy.features(records_at(step), enc, "cpu")
    train.precompute("omni", "features", 12, records_at, lambda rs: world_ahead.features(rs, enc,
                                                                                         "cpu"))
    lazy, ahead = world_lazy._feats[enc], world_ahead._feats[enc]
    assert lazy.keys() == ahead.keys() and len(lazy) > 20
    assert all(torch.equal(lazy[k], ahead[k]) for k in lazy)
    assert "before step 1" in capsys.readouterr().out.splitlines()[-1]


def test_omni_mix_and_voice_first_train_the_parts_they_name_and_a_stage_of_another_mix_is_refused(
        tmp_path, tiny_run, tiny_data, capsys):
    for stage in ("teacher", "encoder"):
        shutil.copytree(os.path.join(tiny_run, stage), tmp_path / stage)
    train.main(like_tiny_run(tmp_path, tiny_data, "--omni_mix", "asr=1", "--voice_first", "3",
                             "--align_steps", "1", "--eval_per_family", "1"))
    log = read_log(tmp_path / "omni" / "log.jsonl")
    assert all(r["loss_t"] > 0 for r in log[:3])  # voice first: audio questions and written text
    assert all(r["loss_t"] == 0 for r in log[3:])  # then no written rows
    # but 8 transcripts a step, each several words and the end token
    assert all(r["tokens"] > 8 * 3 for r in log[3:])
    default = read_log(os.path.join(tiny_run, "omni", "log.jsonl"))
    assert any(r["loss_t"] > 0 for r in default)
    other = train.parse_args(like_tiny_run(tmp_path, tiny_data, "--omni_mix",
                                           "asr=0.5,audio_qa=0.5", "--voice_first", "3"))
    with pytest.raises(SystemExit, match=r"\[omni\] .*omni/model\.pt was built from other .*"
                                         r"\(omni_mix 'asr=1' -> 'asr=0\.5,audio_qa=0\.5'\)"):
        # refused before it loads a model
        train.stage_omni(other, data.World(tiny_data), None, None)
    with pytest.raises(SystemExit, match="--omni_mix: expected part=fraction pairs"):
        train.parse_args(["--omni_mix", "asr=1,speech=1"])


def test_align_max_wer_keeps_the_prompts_the_student_transcribes_that_well(tiny_data, monkeypatch,
                                                                           capsys):
    world = data.World(tiny_data)
    recs = [r for r in world.align if r["kind"] == "text"]
    asked = []

    def generate(model, world, rs, modality, device, max_new_tokens, encoder=None):
        # every third clip exactly, the others with their first spoken word replaced
        asked.extend((r["instruction"], modality) for r in rs)
        words = [data.spoken_words(r["transcript"]).split() for r in rs]
        return [" ".join(w if i % 3 == 0 else ["zzz"] + w[1:]) for i, w in enumerate(words)]
    monkeypatch.setattr(xopd, "generate", generate)
    student = type("Student", (), {"encoder": None})()
    n_words = [len(data.spoken_words(r["transcript"]).split()) for r in recs]
    cases = ((0.0, [r for i, r in enumerate(recs) if i % 3 == 0]),
             (15.0, [r for i, (r, n) in enumerate(zip(recs, n_words)) if i % 3 == 0
                     or 100 / n <= 15]),
             (100.0, recs))
    assert len({len(expect) for _, expect in cases}) == 3  # three different answers
    for max_wer, expect in cases:
        cfg = train.parse_args(["--preset", "tiny", "--align_max_wer", str(max_wer)])
        kept = train.align_prompts(cfg, world, student, "align", torch.device("cpu"), None)
        assert kept == expect
    assert set(asked) == {(data.AUDIO_INSTRUCTIONS["asr"], "speech")}
    assert "aligning on those" in capsys.readouterr().out


def test_omni_pools_hold_train_prompts_only_and_answer_styles_mix_as_asked(tiny_data):
    """The omni stage never sees an align, val or test prompt, whatever style answers it; the
    share of spoken instructions answered in the teacher's style is the one asked for, drawn
    the same on every call (resume) and never a missing target."""
    world = data.World(tiny_data)
    held_out = {r["transcript"] for r in world.align + world.val + world.test
                if r["kind"] == "text"}
    pools = train.omni_pools(world)
    assert all(pools[k] for k in ("asr", "audio_qa", "spoken", "written"))
    for part, recs in pools.items():
        assert all(r["split"] == "train" for r in recs), part
        assert not {r["transcript"] for r in recs} & held_out, part
    spoken = pools["spoken"] * 50
    for share in (0.0, 0.5, 1.0):
        targets = train.answer_styles(spoken, "reference", "teacher", share, seed=7)
        assert targets == train.answer_styles(spoken, "reference", "teacher", share, seed=7)
        teacher_style = [t == r["teacher"] != r["reference"] for r, t in zip(spoken, targets)]
        assert all(t in (r["reference"], r["teacher"]) for r, t in zip(spoken, targets))
        assert sum(teacher_style) / len(spoken) == pytest.approx(share, abs=0.05)
    # a manifest without teacher answers keeps its own
    no_teacher = [{**r, "teacher": None} for r in spoken]
    assert train.answer_styles(no_teacher, "reference", "teacher", 1.0, seed=7) == [r["reference"]
                                                                                    for r in spoken]


def test_spliced_lists_are_new_lists_of_words_spoken_in_training_clips(tiny_data):
    """word_bank keeps the train clips the encoder cut into as many words as they have, each word
    with its own feature row; spliced_lists reads every word it writes by a row of that word in
    a kept clip, behind a kept clip's vector, 3-6 words, the same for a seed; the World uses a
    record's own features and caches none of them."""
    world = data.World(tiny_data)
    pools = train.omni_pools(world)
    encoder = torch.nn.Identity()  # a cache key: the features below are put in its cache by hand
    cache = world._feats.setdefault(encoder, {})
    where = {}  # feature value -> (clip id, row)
    for c, r in enumerate(pools["asr"]):
        n = len(data.spoken_words(r["transcript"]).split())
        n += c % 3 == 0  # every third clip is cut wrong (one row too many): left out
        cache[r["id"]] = torch.arange(1 + n, dtype=torch.float32)[:, None].repeat(1, 2) + 1000 * c
        where.update({1000 * c + i: (r, i) for i in range(1 + n)})
    bank = train.word_bank(world, pools["asr"], encoder, "cpu")
    kept = [r for c, r in enumerate(pools["asr"]) if c % 3]
    assert len(bank[1]) == len(kept) and sum(map(len, bank[0].values())) == sum(
        len(data.spoken_words(r["transcript"]).split()) for r in kept)
    lists = train.spliced_lists(bank, 40, seed=3, instruction="transcribe the speech .")
    again = train.spliced_lists(bank, 40, seed=3, instruction="x")
    assert [(r["transcript"], t) for r, t in lists] == [(r["transcript"], t) for r, t in again]
    assert [t for _, t in lists] != [t for _, t in train.spliced_lists(bank, 40, seed=4,
                                                                       instruction="x")]
    for rec, target in lists:
        words = target.split()
        assert rec["transcript"] == target and 3 <= len(words) <= 6
        assert rec["feats"].shape == (1 + len(words), 2)
        clip, row = where[int(rec["feats"][0, 0])]
        assert row == 0 and clip in kept and clip["split"] == "train"
        for w, v in zip(words, rec["feats"][1:]):
            clip, row = where[int(v[0])]
            assert row >= 1 and clip in kept
            assert data.spoken_words(clip["transcript"]).split()[row - 1] == w
    b = world.batch([r for r, _ in lists[:3]], device="cpu", text=False, encoder=encoder)
    for i, (rec, _) in enumerate(lists[:3]):
        assert torch.equal(b.feats[i, :int(b.feat_lens[i])],
                           rec["feats"]) and rec["id"] not in cache


def test_a_finished_run_with_another_eval_per_family_is_scored_again(tiny_run, tiny_data, tmp_path,
                                                                     capsys):
    """train.py --eval_per_family N on a finished run scores every model (and the encoder on its
    own) on N prompts per family, not the cached scores of the preset's 4."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    assert json.load(open(out / "encoder" / "eval.json"))["settings"]["per_family"] == 4
    train.main(like_tiny_run(out, tiny_data, "--eval_per_family", "2"))
    for name in ("encoder", "teacher", "omni", "align/xopd", "align/sft"):
        assert json.load(open(out / name / "eval.json"))["settings"]["per_family"] == 2, name
    # scored on 2 clips per audio question: every accuracy is 0, 50 or 100
    assert all(v in (0.0, 50.0, 100.0)
               for v in json.load(open(out / "omni" / "eval.json"))["audio"].values())
    text = capsys.readouterr().out
    assert "[eval] omni:" in text and "per_family 4 -> 2" in text


def user_copy(tiny_data, dest, edit=None):
    """The tiny world as a user's folder (no done.json; wavs/ linked), manifest `edit[0]` passed
    through edit[1] (a function of its list of records)."""
    os.makedirs(dest)
    for f in os.listdir(tiny_data):
        if f.endswith(".jsonl") or f == "tokenizer.json":
            shutil.copy(os.path.join(tiny_data, f), os.path.join(dest, f))
    os.symlink(os.path.join(tiny_data, "wavs"), os.path.join(dest, "wavs"))
    if edit:
        name, fn = edit
        recs = [json.loads(line) for line in open(os.path.join(dest, name))]
        with open(os.path.join(dest, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in fn(recs))
    return str(dest)


def without_reference(recs, how):
    for i, r in enumerate(recs):
        if i == 1:
            if how == "missing":
                del r["reference"]
            else:
                r["reference"] = how
    return recs


@pytest.mark.parametrize("how", ["missing", None, "  "])
def test_sft_without_reference_responses_is_refused_by_file_and_field_before_training(
        tiny_data, tmp_path, how):
    d = user_copy(tiny_data, tmp_path / "d", ("align.jsonl", lambda recs: without_reference(recs,
                                                                                            how)))
    for method in ("sft", "gkd"):
        with pytest.raises(SystemExit, match=r"align\.jsonl:2: field 'reference' is missing, null "
                                             r"or empty \(1 of the 39 align prompts\)"):
            train.main(tiny(tmp_path / "run", d, "--method", method))
    assert not os.path.exists(tmp_path / "run" / "teacher")  # refused before stage 1
    # methods that need no reference responses are not refused
    for argv in (["--method", "xopd"], ["--method", "kd"], ["--method", "gkd", "--gkd_mix", "1"]):
        train.check_world(train.parse_args(tiny(tmp_path / "run", d, *argv)), data.World(d))


MICRO = ["--teacher_steps", "2", "--encoder_steps", "2", "--omni_steps", "2", "--voice_first", "1",
         "--align_steps", "1", "--eval_per_family", "1"]


def test_a_run_folder_reads_the_same_from_any_directory_and_after_a_move(tiny_data, tmp_path,
                                                                         monkeypatch, capsys):
    """Made with relative paths from one directory, a run is found finished from another (given
    by its absolute path), and again after the folder (data inside it) is moved; eval.py reads
    its tokenizer from there too."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    shutil.copytree(tiny_data, tmp_path / "a" / "base" / "data")
    monkeypatch.chdir(tmp_path / "a")
    train.main(["--preset", "tiny", "--out", "base", *MICRO])
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    train.main(["--preset", "tiny", "--out", str(tmp_path / "a" / "base"), *MICRO])
    assert [line for line in capsys.readouterr().out.splitlines()
            if line.endswith("exists: skipped")] != []
    os.rename(tmp_path / "a" / "base", tmp_path / "moved")
    for stage in ("teacher", "encoder", "omni", "align/xopd"):
        # newer than the scores: eval.py scores again
        os.utime(tmp_path / "moved" / stage / "model.pt")
    train.main(["--preset", "tiny", "--out", str(tmp_path / "moved"), *MICRO])
    text = capsys.readouterr().out
    assert text.count("exists: skipped") == 4 and "[eval] omni: T" in text
    E.main(["--out", str(tmp_path / "moved")])
    assert json.load(open(tmp_path / "moved" / "omni" / "eval.json"))["settings"]["per_family"] == 1


def test_stored_paths_inside_the_run_folder_follow_it():
    old = {"out": "../base", "data": "../base/data", "teacher": "",
           "chat_format": "/models/fmt.json"}
    # relative, as an older version stored it
    assert data.run_path(old, "data", "/abs/base") == "/abs/base/data"
    assert data.run_path(old, "teacher", "/abs/base") == ""
    # outside the run: as stored
    assert data.run_path(old, "chat_format", "/abs/base") == "/models/fmt.json"
    moved = {"out": "/old/run", "data": "/old/run/data", "student": "/old/runner/omni/model.pt"}
    assert data.run_path(moved, "data", "/new/place") == "/new/place/data"
    assert data.run_path(moved, "student", "/new/place") == "/old/runner/omni/model.pt"


@pytest.mark.parametrize("clip, needle", [
    (None, "no such audio file"),
    (b"not audio", "cannot be read as audio"),
    (0.010, r"160 samples at 16000 Hz \(0\.010 s\); expected 25 ms to 30 s"),
    (35.0, r"560000 samples at 16000 Hz \(35\.000 s\); expected 25 ms to 30 s"),
])
def test_every_clip_is_checked_before_stage_1(tiny_data, tmp_path, clip, needle):
    """A test clip that is missing, unreadable, too short for the log-mel or longer than the
    encoder's window is refused by manifest line before the teacher trains (not at eval)."""
    def swap(recs):
        recs[4]["audio"] = "mine/clip.wav"
        return recs
    d = user_copy(tiny_data, tmp_path / "d", ("test.jsonl", swap))
    os.makedirs(os.path.join(d, "mine"))
    if isinstance(clip, bytes):
        open(os.path.join(d, "mine", "clip.wav"), "wb").write(clip)
    elif clip is not None:
        import soundfile as sf
        sf.write(os.path.join(d, "mine", "clip.wav"),
                 0.1 * torch.randn(round(clip * 16000)).numpy(), 16000)
    with pytest.raises(SystemExit, match=rf"test\.jsonl:5: .*mine/clip\.wav: {needle}"):
        train.main(tiny(tmp_path / "run", d))
    assert not os.path.exists(tmp_path / "run" / "teacher")


def test_one_run_per_folder_a_live_holder_is_named_a_dead_ones_lock_is_taken_over(tiny_data,
                                                                                  tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "lock").write_text(f"{live.pid}\n")
        with pytest.raises(SystemExit,
                           match=rf"--out .*run: in use by another run, process id {live.pid} "):
            train.main(tiny(out, tiny_data))
        assert (out / "lock").read_text() == f"{live.pid}\n"  # still the live run's
    finally:
        live.kill()
        live.wait()
    # now its process is gone: the lock is taken over, and let go when the run ends (here refused
    # early)
    with pytest.raises(SystemExit, match="--val_rkl_prompts 1"):
        train.main(tiny(out, tiny_data, "--val_rkl_prompts", "1"))
    note = f"{out / 'lock'}: left by process {live.pid}, which is no longer running; taking it over"
    assert note in capsys.readouterr().out
    assert not (out / "lock").exists()
    assert train.lock_run(str(out)) == str(out / "lock")
    assert (out / "lock").read_text() == f"{os.getpid()}\n"


def test_an_out_or_data_that_is_a_file_is_refused_by_flag(tiny_data, tmp_path):
    (tmp_path / "f").write_text("mine\n")
    with pytest.raises(SystemExit, match=r"--out .*f: is a file; expected a run folder"):
        train.main(tiny(tmp_path / "f", tiny_data))
    with pytest.raises(SystemExit, match=r"--data .*f: is a file; expected a folder"):
        train.main(tiny(tmp_path / "run", str(tmp_path / "f")))
    assert (tmp_path / "f").read_text() == "mine\n"


def test_an_interrupted_toy_data_generation_is_recognised_and_made_again(tiny_data, tmp_path,
                                                                         monkeypatch):
    """Cut short in a new --data folder, the generation leaves its marker beside wavs/; the rerun
    generates there again instead of refusing the folder as a user's. A finished one leaves none."""
    new = tmp_path / "new"

    def cut_short(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "build_world", cut_short)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny(tmp_path / "run", str(new)))
    assert sorted(os.listdir(new)) == [data.UNFINISHED,
                                       "wavs"] and not (tmp_path / "run" / "lock").exists()
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(data, "make_toy_data", lambda *a: calls.append(a) or sys.exit("generated"))
    with pytest.raises(SystemExit, match="generated"):
        train.main(tiny(tmp_path / "run", str(new)))
    assert calls == [(str(new), 0, "tiny")]
    assert os.path.exists(os.path.join(tiny_data, "done.json"))
    assert not os.path.exists(os.path.join(tiny_data, data.UNFINISHED))


def test_make_toy_data_from_a_script_without_a_main_guard_makes_the_clips_itself(tmp_path):
    """Spawned workers import the calling script; without `if __name__ == "__main__":` they cannot
    start: the clips are made in the calling process instead, with one line saying why, no
    traceback, and the generation cut short before (its marker there) is made again."""
    out = tmp_path / "d"
    out.mkdir()
    (out / data.UNFINISHED).write_text("{}")
    script = tmp_path / "make.py"
    root = os.path.dirname(os.path.abspath(data.__file__))
    script.write_text(f"import sys\nsys.path.insert(0, {root!r})\nimport data\n"
                      "data.PRESETS['mini'] = dict(\n"
                      "    text=dict(text=4, train=4, align=2, val=2, test=2), facts_entities=1,\n"
                      "    asr=dict(train=2, test=2), audio_q=dict(train=1, test=1),\n"
                      "    speakers=(2, 2))\n"
                      f"data.make_toy_data({str(out)!r}, seed=0, preset='mini')\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("[data] generating the mini toy world (seed 0)") == 1
    assert "again: the last generation there was cut short" in r.stdout
    assert os.path.exists(out / "done.json") and not os.path.exists(out / data.UNFINISHED)
    recs = data.read_manifest(out / "test.jsonl") + data.read_manifest(out / "train.jsonl")
    assert recs and all(os.path.getsize(r["audio"]) > 44 for r in recs)


def test_ctrl_c_during_data_generation_ends_with_one_line_saying_how_to_go_on(tmp_path):
    """Ctrl-C reaches every process of the terminal's group, the clip workers too: one line on
    stderr, exit status 130, the run folder let go and the generation known as cut short."""
    root = os.path.dirname(os.path.abspath(train.__file__))
    cmd = [sys.executable, os.path.join(root, "train.py"), "--preset", "tiny",
           "--out", str(tmp_path / "run")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path, start_new_session=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"},
                         # Ctrl-C as in a terminal: a shell's background job (pytest ... &) ignores
                         # it, and so would the run
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith("[data] generating"):
            break
    time.sleep(1.5)  # the workers have started
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert err.strip().splitlines() == [
        "interrupted. Finished stages are kept: run the same command again to go on, with "
        "--resume to continue the stage that was cut short from its last checkpoint."]
    assert os.path.exists(tmp_path / "run" / "data" / data.UNFINISHED)
    assert not os.path.exists(tmp_path / "run" / "lock")


def test_an_out_folder_that_cannot_be_written_is_refused_by_flag(tiny_data, tmp_path, monkeypatch):
    def read_only(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(SystemExit, match=r"--out .*run: cannot write there \(Permission denied\)"):
        train.main(tiny(tmp_path / "run", tiny_data))


def test_eval_of_a_run_whose_data_is_gone_is_one_message(tiny_data, tmp_path):
    settings = {"out": str(tmp_path / "run"), "data": str(tmp_path / "gone"), "eval_per_family": 1,
                "max_new_tokens": 2}
    M.save_checkpoint(str(tmp_path / "run" / "teacher" / "model.pt"), {"model": {}, "configs": {},
                                                                       "train": settings})
    with pytest.raises(SystemExit, match=r"--out .*run: .*gone.*tokenizer\.json: tokenizer not "
                                         r"found .*\(give the data folder with --data\)"):
        E.main(["--out", str(tmp_path / "run")])
