"""eval.py: the paper's drop metrics, the scores evaluate_model assembles from predictions, the
tables, the probes, when cached scores are made again, and the refusals."""
import glob
import itertools
import json
import os
import shutil

import pytest
import torch

import data
import eval as E
import model as M
import xopd


def test_relative_and_average_drop():
    # ΔS: teacher scores 80 / 50; student 60 / 50 -> drops 25 % and 0 % -> 12.5
    teacher = {"arith": 80.0, "facts": 50.0}
    assert E.avg_drop({"arith": 60.0, "facts": 50.0}, teacher) == pytest.approx(12.5)
    assert E.relative_drop(40.0, 50.0) == pytest.approx(20.0)
    assert E.avg_drop({"arith": 60.0}, teacher) == pytest.approx(25.0)  # shared families only


def test_evaluate_model_scores_known_predictions(tiny_data, monkeypatch):
    """Predictions chosen here (right from text, every other one wrong from speech, transcripts
    short of their last word): the scores must be the ones computed by hand from them."""
    world = data.World(tiny_data)
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    student = M.SpeechLM(enc, adp, dec, audio_token_id=world.audio_id)

    def generate(model, world, recs, modality, device, max_new_tokens, encoder=None):
        if modality == "text":
            return [r["teacher"] or r["answer"] for r in recs]
        asked = lambda r: r["instruction"] == data.AUDIO_INSTRUCTIONS["asr"] != r["task"]
        return [r["transcript"].split(" ", 1)[1] if asked(r)  # a spoken prompt, its first word lost
                else r["transcript"].rsplit(" ", 1)[0] if r["task"] == "asr"
                else r["answer"] if i % 2 == 0 else "no" for i, r in enumerate(recs)]
    monkeypatch.setattr(xopd, "generate", generate)
    res = E.evaluate_model(student, world, "cpu", per_family=4, max_new_tokens=8)
    text, audio = E.test_sets(world, 4)

    def half(recs):
        return pytest.approx(100.0 * len(recs[::2]) / len(recs))
    assert res["T"] == {fam: 100.0 for fam in text}
    assert res["S"] == {fam: half(recs) for fam, recs in text.items()}
    assert res["audio"] == {t: half(recs) for t, recs in audio.items() if t != "asr"}
    asr = audio["asr"]
    lost = sum(1 / len(r["transcript"].split()) for r in asr)
    assert res["asr_wer"] == pytest.approx(100.0 * lost / len(asr))
    assert res["items"]["S"] == {fam: [1.0, 0.0] * (len(r) // 2) + [1.0] * (len(r) % 2)
                                 for fam, r in text.items()}
    # on val, the base student's transcripts of the spoken prompts (the premise's hearing rows)
    val = E.evaluate_model(student, world, "cpu", per_family=4, max_new_tokens=8, pool="val")
    prompts = [r for rs in E.test_sets(world, 4, "val")[0].values() for r in rs]
    lost = [1 / len(data.spoken_words(r["transcript"]).split()) for r in prompts]
    assert val["prompt_wer"] == pytest.approx(100.0 * sum(lost) / len(lost))
    assert val["misheard"] == 100.0 and val["audio"] == {} and "prompt_wer" not in res


def _run(T, S=None, audio=None, seen=5.0, unseen=12.0, teacher_lp=None, rkl_cm=2.0,
         misheard=3.0):
    """A run's eval.json: the same scores on val and test; 100 items a family, k % of them right."""
    items = lambda d: {f: [1.0] * round(v) + [0.0] * (100 - round(v)) for f, v in d.items()}
    r = {"T": T, "S": S or {}, "audio": audio or {}, "items": {"T": items(T), "S": items(S or {})},
         "val": {"T": T, "S": S or {}}}
    if S is not None:
        r["val"].update(prompt_wer_seen=seen, prompt_wer_unseen=unseen, misheard=misheard)
        r["judge"] = {"teacher_lp": teacher_lp or {f: -2.0 for f in S}, "rkl_cm": rkl_cm}
    return r


def save_model(folder, m):
    M.save_checkpoint(str(folder / "model.pt"),
                      {"model": m.state_dict(), "configs": M.model_configs(m), "train": {}})


def test_premise_on_hand_made_scores():
    teacher = _run({"arith": 95.0, "facts": 100.0})
    # ΔS = mean(drop 30 %, drop 10 %) = 20; ΔT = mean(drop 10 %, drop 0 %) = 5; the teacher's
    # log-prob per token of the student's answers: worst family -2.9
    omni = _run({"arith": 85.5, "facts": 100.0}, {"arith": 66.5, "facts": 90.0},
                teacher_lp={"arith": -2.9, "facts": -1.0}, rkl_cm=2.5)

    def met(omni, teacher=teacher):
        return [ok for _, _, _, ok in E.premise([{"teacher": teacher, "omni": omni}])]
    values = [vals[0] for _, vals, _, _ in E.premise([{"teacher": teacher, "omni": omni}])]
    assert values == [95.0, 5.0, 12.0, 3.0, pytest.approx(20.0), pytest.approx(5.0), -2.9, 2.5]
    assert met(omni) == [True] * 8
    # each criterion fails on its own, on the val scores (the test scores play no part)
    weak = _run({"arith": 89.0, "facts": 100.0})
    assert met(omni, weak) == [False] + [True] * 7  # ΔS, ΔT move with the teacher but stay within
    assert met(omni, {**teacher, "T": {"arith": 50.0, "facts": 50.0}}) == [True] * 8
    deaf = {**omni, "val": {**omni["val"], "prompt_wer_seen": 10.5, "prompt_wer_unseen": 15.5,
                            "misheard": 5.5}}
    assert met(deaf) == [True, False, False, False] + [True] * 4
    for s_arith, ok in ((47.5, False), (95.0 * 0.86, True), (95.0 * 0.94, False)):
        # ΔS 30, 12, 8 (ΔT 5 > 8 / 2)
        r = met({**omni, "val": {**omni["val"], "S": {"arith": s_arith, "facts": 90.0}}})
        assert r[4:6] == ([False, True] if s_arith == 47.5 else [True, ok])
    assert met({**omni, "val": {**omni["val"], "T": {"arith": 96.0, "facts": 100.0}}})[5] is False
    unjudged = {**omni, "judge": {"teacher_lp": {"arith": -12.7, "facts": -1.0}, "rkl_cm": 12.5}}
    assert met(unjudged) == [True] * 6 + [False, False]


# Student's t: two-sided 95 % critical values from the published tables, and df 1 (Cauchy) / 2
# in closed form
T_CRITICAL = [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706), (30, 2.0423)]


@pytest.mark.parametrize("df, t", T_CRITICAL)
def test_t_critical_values_and_tails(df, t):
    assert E.t_quantile(0.95, df) == pytest.approx(t, abs=1e-4)
    assert E.t_within(t, df) == pytest.approx(0.95, abs=1e-5)
    assert E.t_within(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| <= 1) = 2 atan(1) / π
    assert E.t_within(3.0, 2) == pytest.approx(3.0 / (2 + 9.0) ** 0.5)


def test_holm_adjusts_step_down_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04: x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> kept monotone
    assert E.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert E.holm([0.5, 0.9]) == [1.0, 1.0]  # 2 x 0.5, then never below it


def test_mean_and_t_interval_over_seeds():
    m, se = E.mean_se([1.0, 2.0, 6.0])
    # sample var (4+1+9)/2 = 7, / n; the half-width t(0.975, 2) * se = 4.3027 * 1.5275 = 6.57
    assert m == pytest.approx(3.0) and se == pytest.approx((7.0 / 3) ** 0.5)
    assert E.fmt([2.0]) == "2.0" and E.fmt([1.0, 2.0, 6.0]) == "3.0 ± 6.6"
    seeds = [{"teacher": _run({"arith": 100.0}), "omni": _run({"arith": 90.0}, {"arith": s})}
             for s in (50.0, 70.0)]
    table = E.tables(seeds)["table1"].splitlines()
    row = [line for line in table if line.startswith("| base student")][0]
    # se 10 over two seeds, t(0.975, 1) = 12.706
    assert "| 60.0 ± 127.1 | 90.0 ± 0.0 | 40.00 ± 127.06 | 10.00 ± 0.00 |" in row


def test_bootstrap_pairs_the_prompts_and_resamples_seeds_and_items():
    def seed(student):
        return {"teacher": {"items": {"T": {"a": [1.0] * 400}}},
                "x": {"items": {"S": {"a": student}}}, "y": {"items": {"S": {"a": student}}}}
    half = [1.0, 0.0] * 200  # ΔS 50; over 400 items its se is 100 * sqrt(0.25 / 400) = 2.5
    got = E.bootstrap_drops([seed(half)], {("x", "S"), ("y", "S")})
    assert got[("x", "S")].mean() == pytest.approx(50.0, abs=0.1)
    assert got[("x", "S")].std() == pytest.approx(2.5, rel=0.05)
    assert (got[("x", "S")] == got[("y", "S")]).all()  # the same prompts for both: paired
    # no spread within a seed (ΔS 0 and 100): the mean of two drawn seeds is 0, 50 or 100
    got = E.bootstrap_drops([seed([1.0] * 400), seed([0.0] * 400)], {("x", "S")})[("x", "S")]
    freq = [float((abs(got - v) < 1e-9).mean()) for v in (0.0, 50.0, 100.0)]
    assert freq == pytest.approx([0.25, 0.5, 0.25], abs=0.02)


def test_comparisons_paired_over_seeds_with_holm_and_the_bootstrap():
    # the base student's ΔS moves a lot between seeds (40, 20, 30); X-OPD is 5, 5, 6 points
    # better in each; KD 3, 4, 3 points better than the base (so X-OPD's − KD's: -2, -1, -3)
    teacher = _run({"arith": 100.0})
    seeds = [{"teacher": teacher, "omni": _run({"arith": 100.0}, {"arith": 100.0 - b}),
              "align/xopd": _run({"arith": 100.0}, {"arith": 100.0 - b + g}),
              "align/kd": _run({"arith": 100.0}, {"arith": 100.0 - b + k})}
             for b, g, k in ((40, 5, 3), (20, 5, 4), (30, 6, 3))]
    got = E.comparisons(seeds, list(seeds[0]))
    assert [c["what"] for c in got] == [
        "ΔS: X-OPD's − base student's", "ΔS: X-OPD's − kd's", "ΔT: X-OPD's − base student's",
        "ΔT: X-OPD's − kd's", "ΔS: X-OPD's − a third of base student's"]
    p = lambda t: 1 - t / (2 + t * t) ** 0.5  # two-sided, df 2, in closed form
    # C1: -5, -5, -6: mean -16/3, se 1/3; C2: -2, -1, -3: mean -2, se sqrt(1/3);
    # C5: 35 - 40/3, 15 - 20/3, 24 - 10: mean 44/3, se sqrt(((7)^2 + (19/3)^2 + (2/3)^2) / 6)
    se5 = ((49 + (19 / 3) ** 2 + (2 / 3) ** 2) / 6) ** 0.5
    ps = [p(16.0), p(2 / 3 ** -0.5), 1.0, 1.0, p(44 / 3 / se5)]
    assert [c["mean"] for c in got] == pytest.approx([-16 / 3, -2.0, 0.0, 0.0, 44 / 3])
    assert [c["p"] for c in got] == pytest.approx(ps)
    assert got[0]["half"] == pytest.approx(4.3027 / 3, abs=1e-4)
    holm = [5 * ps[0], max(5 * ps[0], 4 * ps[4], 3 * ps[1]), 1.0, 1.0, max(5 * ps[0], 4 * ps[4])]
    assert [c["holm"] for c in got] == pytest.approx(holm)
    # X-OPD right on a superset of the base student's prompts: every resample's change is < 0
    assert got[0]["boot"][1] < 0 and got[0]["boot"][0] < -16 / 3 < got[0]["boot"][1]
    assert [c["holds"] for c in got] == [True, False, False, False, False]
    rows = E.tables(seeds)["compared"].splitlines()
    assert rows[2].startswith("| C1: ΔS: X-OPD's − base student's | -5.33 ± 1.43 | 0.004 | 0.019 |")
    assert rows[2].endswith("| **X-OPD lower** |") and rows[3].endswith("| no |")


def test_curves_table_gives_each_val_step_over_seeds():
    teacher = _run({"arith": 100.0})

    def curve(s0, s1, t1, kl):
        return [{"step": 0, "val_S": s0, "val_T": 90.0, "rkl_im": 1.0, "rkl_cm": kl},
                {"step": 20, "val_S": s1, "val_T": t1, "rkl_im": 0.5, "rkl_cm": kl / 2}]
    seeds = [{"teacher": teacher, "omni": _run({"arith": 90.0}, {"arith": 60.0}),
              "align/xopd": {**_run({"arith": 90.0}, {"arith": 70.0}),
                             "curve": curve(60.0, s1, t1, kl)}}
             for s1, t1, kl in ((70.0, 88.0, 2.0), (80.0, 86.0, 4.0))]
    rows = E.tables(seeds)["curves"].splitlines()
    assert rows[0].startswith("| model | step 0 | step 20 | val_T first → last | rkl_im")
    # two seeds: ± t(0.975, 1) = 12.706 times the standard error (5, 1, 1, 0.5)
    assert rows[2] == ("| xopd | 60.0 ± 0.0 | 75.0 ± 63.5 | 90.0 ± 0.0 → 87.0 ± 12.7 "
                       "| 1.00 ± 0.00 → 0.50 ± 0.00 | 3.00 ± 12.71 → 1.50 ± 6.35 |")
    del seeds[1]["align/xopd"]["curve"]  # a seed without its curve: no table, not a partial one
    assert "curves" not in E.tables(seeds)


def test_first_token_probe_of_a_student_whose_decoder_is_its_teacher(tiny_data, tmp_path):
    """A student that is a fresh copy of its teacher gives, from text, the teacher's own
    probability of its greedy first token, the largest it has: a known value per prompt. From
    speech, against the student's own forward pass on each clip alone (mels, not the batch's
    cached encoder features)."""
    world = data.World(tiny_data)
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    torch.manual_seed(0)
    teacher = M.Decoder(dec).eval()
    with torch.no_grad():
        teacher.embed_tokens.weight.mul_(30.0)  # a confident teacher: its first token is no tie
    student = M.student_from_teacher(teacher, enc, adp, audio_token_id=world.audio_id)
    for name, m in (("teacher", teacher), ("omni", student)):
        save_model(tmp_path / name, m)
    res = E.first_token_probe(str(tmp_path), world, "cpu", per_family=5)
    assert set(res) == {"omni"}
    student.eval()
    for fam, rs in data.text_families(world.val, 5).items():
        top, heard = [], []
        with torch.no_grad():
            for r in rs:
                text = torch.tensor([data.encode_prompt(world.tok, r, "text")])
                p = teacher.logits(teacher(text)[0, -1]).softmax(-1)
                top.append(float(p.max()))
                ids = torch.tensor([data.encode_prompt(world.tok, r, "speech")])
                mel = world.mel(r)[None]
                h, lens = student(ids, torch.tensor([ids.size(1)]), mel,
                                  torch.tensor([mel.size(-1)]))
                logits = student.decoder.logits(h[0, lens[0] - 1])
                heard.append(float(logits.softmax(-1)[p.argmax()]))
        assert res["omni"][fam][1] == pytest.approx(100.0 * sum(top) / len(top), rel=1e-4)
        assert res["omni"][fam][0] == pytest.approx(100.0 * sum(heard) / len(heard), rel=1e-4)


def read_each_clip_alone(student, world, recs):
    """The WERs of the encoder's greedy CTC and of the adapter's best token per word, each clip
    through a forward pass of its own, decoded here (the CTC against the letters as spoken: a
    doubled letter once)."""
    ctc, adapter = [], []
    with torch.no_grad():
        for r in recs:
            mel = world.mel(r)[None]
            mel_lens = torch.tensor([mel.size(-1)])
            _, n, logp = student.encoder.frames(mel, mel_lens)
            path = logp[0, :n[0]].argmax(-1).tolist()  # best path: repeats merged, blanks dropped
            text = "".join(M.CTC_CHARS[c - 1] for c, _ in itertools.groupby(path) if c)
            ctc.append(data.wer(M.spoken_letters(data.spoken_words(r["transcript"])), text))
            words, word_lens = student.encoder(mel, mel_lens)
            _, k, logits = student.adapter(words, word_lens, student.decoder.embed_tokens.weight)
            # one row per spoken word (k counts the clip's vector too)
            best = logits[0, :k[0] - 1].argmax(-1).tolist()
            adapter.append(data.wer(data.spoken_words(r["transcript"]),
                                    data.spoken_words(world.tok.decode(best))))
    return ctc, adapter


def test_hearing_probe_splits_prompts_from_word_lists_and_scores_spoken_words(tiny_data, tmp_path,
                                                                             monkeypatch):
    """Transcripts chosen here: the student drops the first word of every other clip and the
    punctuation of every clip, the teacher copies every transcript with its punctuation; the WERs
    and the share of prompts read whole must be the hand-computed ones, punctuation never
    counting, on each part of the split. The encoder's greedy CTC and the adapter's best token per
    word against a forward pass on each clip alone, decoded here (the CTC against the letters as
    spoken: a doubled letter once)."""
    world = data.World(tiny_data)
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    torch.manual_seed(0)
    teacher = M.Decoder(dec)
    student = M.student_from_teacher(teacher, enc, adp, audio_token_id=world.audio_id)
    for name, m in (("teacher", teacher), ("omni", student)):
        save_model(tmp_path / name, m)

    def generate(model, world, recs, modality, device, max_new_tokens, encoder=None):
        # "repeat the words : <words> ." -> "<words> ." (a full stop is no word)
        if modality == "text":
            return [r["transcript"].removeprefix("repeat the words : ") for r in recs]
        return [" ".join(w for w in r["transcript"].split()[r["id"] in dropped:] if w.isalpha())
                for r in recs]
    recs = E.test_sets(world, 10)[1]["asr"]
    pools = world.train + world.align + world.val + world.test
    prompts = {r["transcript"] for r in pools if r["kind"] == "text"}
    train_lists = [r for r in world.train
                   if r["task"] == "asr" and r["transcript"] not in prompts][:len(recs)]
    dropped = {r["id"] for r in recs[::2] + train_lists[::3]}
    monkeypatch.setattr(xopd, "generate", generate)
    res = E.hearing_probe(str(tmp_path), world, "cpu", per_task=10, max_new_tokens=8)
    parts = {"prompts": [r for r in recs if r["transcript"] in prompts],
             "lists": [r for r in recs if r["transcript"] not in prompts]}
    assert parts["prompts"] and parts["lists"]

    def lost(r):
        words = [w for w in data.normalize_text(r["transcript"]).split() if w.isalpha()]
        return 1 / len(words) if r["id"] in dropped else 0.0
    student_row = res["base student, from speech"]
    teacher_row = res["text teacher, copying the transcript from text"]
    assert len(train_lists) == len(recs) and 0 < len(train_lists[::3]) < len(train_lists)
    for part, rs in list(parts.items()) + [("all", recs), ("train lists", train_lists)]:
        assert student_row[part] == pytest.approx(100.0 * sum(lost(r) for r in rs) / len(rs))
        assert teacher_row[part] == 0.0
    assert 0 < sum(r["id"] in dropped for r in parts["prompts"]) < len(parts["prompts"])
    whole = sum(r["id"] not in dropped for r in parts["prompts"])
    assert student_row["whole"] == pytest.approx(100.0 * whole / len(parts["prompts"]))
    assert teacher_row["whole"] == 100.0
    ctc, adapter = read_each_clip_alone(student, world, recs)
    for row, wers in (("audio encoder alone, greedy CTC", ctc),
                      ("adapter's word scores alone (best token per word)", adapter)):
        by_part = {"prompts": [w for w, r in zip(wers, recs) if r["transcript"] in prompts],
                   "lists": [w for w, r in zip(wers, recs) if r["transcript"] not in prompts],
                   "all": wers}
        for part, ws in by_part.items():
            assert res[row][part] == pytest.approx(100.0 * sum(ws) / len(ws)), (row, part)
        whole = sum(w == 0 for w in by_part["prompts"])
        assert res[row]["whole"] == pytest.approx(100.0 * whole / len(by_part["prompts"]))


def test_judge_scores_the_students_answers_with_the_teachers_full_forward(tiny_data):
    """judge's teacher log-probs (per token, pooled per family, split right / wrong) and the
    per-token reverse KL, against the teacher's full-vocabulary log_softmax over prompt + answer,
    one row at a time, on the very answers the student gives (greedy, and sampled with the same
    generator in the same order)."""
    world = data.World(tiny_data)
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    torch.manual_seed(0)
    teacher = M.Decoder(dec).eval()
    student = M.SpeechLM(enc, adp, dec, audio_token_id=world.audio_id).eval()
    res = E.judge(teacher, student, world, "cpu", max_new_tokens=6, seed=3)

    def teacher_lp(rec, ids):  # (len,) log-probs of ids after the text prompt, full forward
        prompt = data.encode_prompt(world.tok, rec, "text")
        with torch.no_grad():
            logits = teacher.logits(teacher(torch.tensor([prompt + ids]))[0])
        logp = logits[len(prompt) - 1:-1].log_softmax(-1)
        return logp.gather(1, torch.tensor(ids)[:, None]).squeeze(1)

    gen = torch.Generator().manual_seed(3)
    rkl = {}
    for fam, recs in data.text_families(world.val).items():
        b = world.batch(recs, encoder=student.encoder)
        kw = dict(terms=("cm",), n=1, max_new_tokens=6, eos_id=world.end_id, generator=gen)
        greedy = xopd.student_rollouts(student, b, temperature=0.0, **kw)[1]["cm"]
        sampled = xopd.student_rollouts(student, b, temperature=1.0, **kw)[1]["cm"]
        sums = {"right": [0.0, 0], "wrong": [0.0, 0]}
        for r, ids, mask in zip(recs, greedy[0].tolist(), greedy[1]):
            ids = ids[:int(mask.sum())]
            key = "right" if data.score(r, world.decode(ids)) == 1.0 else "wrong"
            sums[key][0] += float(teacher_lp(r, ids).sum())
            sums[key][1] += len(ids)
        total = [sums["right"][0] + sums["wrong"][0], sums["right"][1] + sums["wrong"][1]]
        assert res["teacher_lp"][fam] == pytest.approx(total[0] / total[1], rel=1e-4)
        for key in ("right", "wrong"):
            if sums[key][1]:
                want = sums[key][0] / sums[key][1]
                assert res[f"teacher_lp_{key}"][fam] == pytest.approx(want, rel=1e-4)
        rkl[fam] = [0.0, 0]
        for r, ids, mask, lp in zip(recs, sampled[0].tolist(), sampled[1], sampled[2]):
            k = int(mask.sum())
            rkl[fam][0] += float(lp[:k].sum() - teacher_lp(r, ids[:k]).sum())
            rkl[fam][1] += k
        assert res["rkl_cm_by_family"][fam] == pytest.approx(rkl[fam][0] / rkl[fam][1], rel=1e-4)
    pooled = sum(v[0] for v in rkl.values()) / sum(v[1] for v in rkl.values())
    assert res["rkl_cm"] == pytest.approx(pooled, rel=1e-4)


def user_copy(src, dest, edit=None):
    """A data folder as a user's (manifests and tokenizer copied, wavs/ linked); edit(name, path)
    may change each copied file."""
    os.makedirs(dest)
    for f in os.listdir(src):
        if f.endswith(".jsonl") or f == "tokenizer.json":
            shutil.copy(os.path.join(src, f), dest / f)
            if edit:
                edit(f, dest / f)
    os.symlink(os.path.join(src, "wavs"), dest / "wavs")
    return dest


def test_cached_scores_are_made_again_when_what_they_were_made_from_differs(tiny_data, tmp_path,
                                                                            monkeypatch, capsys):
    """eval.json's fingerprint: the checkpoint's and its teacher's fingerprints, the data scored
    (the test and val pools, wherever the folder is) and the settings. Another value of any of
    them scores again, and so does a missing, truncated or incomplete eval.json; the same values,
    from a copy of the data folder, reuse it."""
    out = tmp_path / "run"
    calls = []

    def save(name, fingerprint_id):  # older than any eval.json: only the fingerprint tells
        path = out / name / "model.pt"
        M.save_checkpoint(str(path), {"model": {}, "configs": {}, "train": {},
                                      "fingerprint_id": fingerprint_id})
        os.utime(path, (0, 0))

    def evaluate_model(m, world, device, per_family, max_new_tokens, name="eval", pool="test"):
        calls.append(name) if pool == "test" else None
        return {"T": {"arith": float(per_family) + (pool == "val")}, "S": {}, "audio": {},
                "items": {"T": {}, "S": {}}}
    monkeypatch.setattr(E, "evaluate_model", evaluate_model)
    monkeypatch.setattr(M, "load_model", lambda path, device: (None, None))

    def scored(world=data.World(tiny_data), per_family=2, max_new_tokens=8):
        calls.clear()
        E.evaluate_all(str(out), world, "cpu", per_family, max_new_tokens)
        return sorted(calls)
    save("teacher", "t1")
    save("omni", "o1")
    both = ["omni", "teacher"]
    assert scored() == both and scored() == []
    assert json.load(open(out / "omni" / "eval.json"))["val"]["T"] == {"arith": 3.0}  # on val
    assert scored(per_family=3) == both and scored(per_family=3) == []
    assert "was scored with other settings (per_family 2 -> 3)" in capsys.readouterr().out
    assert scored(per_family=3, max_new_tokens=16) == both
    assert json.load(open(out / "omni" / "eval.json"))["settings"]["max_new_tokens"] == 16
    copy = user_copy(tiny_data, tmp_path / "copy")
    assert scored(data.World(str(copy)), 3, 16) == []  # the same data in another folder

    def short(f, path):  # test.jsonl without its last record
        if f == "test.jsonl":
            path.write_text("".join(open(path).readlines()[:-1]))
    assert scored(data.World(str(user_copy(tiny_data, tmp_path / "short", short))), 3, 16) == both
    assert scored(per_family=3, max_new_tokens=16) == both  # back on the whole test pool
    save("omni", "o2")  # omni made again from other inputs
    assert scored(per_family=3, max_new_tokens=16) == ["omni"]
    save("teacher", "t2")  # another teacher: every student is judged by it
    assert scored(per_family=3, max_new_tokens=16) == both
    for damage in ("{\"T\": {\"ari", "{}", "[1, 2]", "\x00\xff"):
        (out / "omni" / "eval.json").write_text(damage)
        assert scored(per_family=3, max_new_tokens=16) == ["omni"], damage
    assert "eval.json is unreadable or incomplete: scoring again" in capsys.readouterr().out
    os.remove(out / "omni" / "eval.json")
    assert scored(per_family=3, max_new_tokens=16) == ["omni"]


def tiny_teacher_run(world, out, **train):
    """A run folder holding a tiny untrained teacher, saved as train.py saves it."""
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    torch.manual_seed(0)
    teacher = M.Decoder(dec)
    settings = {"data": world.dir, "eval_per_family": 1, "max_new_tokens": 2, "teacher": "",
                "chat_format": "", **train}
    M.save_checkpoint(str(out / "teacher" / "model.pt"),
                      {"model": teacher.state_dict(), "configs": M.model_configs(teacher),
                       "train": settings, "tokenizer": world.tok.to_str()})
    return out


def test_eval_with_another_data_folders_tokenizer_is_refused_naming_both(tiny_data, tmp_path):
    """--data whose tokenizer gives two words each other's ids, or has one word more, than the
    tokenizer the run was trained with: one message naming both files, nothing scored or
    written."""
    run = tiny_teacher_run(data.World(tiny_data), tmp_path / "run")

    def swap(vocab):
        a, b = "seven", "blue"
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def more(vocab):
        vocab["zebra"] = len(vocab)
    for edit in (swap, more):
        def tokenizer(f, path):
            if f == "tokenizer.json":
                tok = json.load(open(path))
                edit(tok["model"]["vocab"])
                json.dump(tok, open(path, "w"))
        other = user_copy(tiny_data, tmp_path / edit.__name__, tokenizer)
        with pytest.raises(SystemExit, match=rf"{other}/tokenizer\.json is not the tokenizer "
                           rf"{run}/teacher/model\.pt was trained with .*expected"):
            E.main(["--out", str(run), "--data", str(other)])
    assert sorted(os.listdir(run)) == ["teacher"] and os.listdir(run / "teacher") == ["model.pt"]


def test_several_out_folders_of_other_settings_or_one_folder_twice_are_refused(tmp_path):
    """The seeds of one table: a folder given twice (through a link) and runs trained with other
    settings are refused by name before anything is scored or written; seeds that differ in the
    seed and the folders only are not."""
    def run(folder, **align):
        base = {"preset": "tiny", "seed": int(folder[-1]), "out": str(tmp_path / folder),
                "data": str(tmp_path / folder / "data"), "align_steps": 4, "lam": 0.5}
        for name, train in (("teacher", base), ("align/xopd", {**base, **align})):
            M.save_checkpoint(str(tmp_path / folder / name / "model.pt"),
                              {"model": {}, "configs": {}, "train": train})
        return str(tmp_path / folder)
    s0, s1 = run("s0"), run("s1")
    E.check_runs([s0, s1])
    os.symlink(s0, tmp_path / "seed0")
    with pytest.raises(SystemExit, match=rf"{s0} and {tmp_path / 'seed0'} are the same run folder"):
        E.main(["--out", s0, str(tmp_path / "seed0")])
    s2 = run("s2", align_steps=2)
    for order, (a, b) in (((s0, s2), ("4", "2")), ((s2, s0), ("2", "4"))):
        with pytest.raises(SystemExit, match=rf"align/xopd of {order[0]} and of {order[1]} were "
                           rf"trained with other settings \(align_steps {a} vs {b}\)"):
            E.main(["--out", *order])
    s3 = run("s3")
    M.save_checkpoint(str(tmp_path / "s3" / "teacher" / "model.pt"),
                      {"model": {}, "configs": {}, "train": {"preset": "cpu"}})
    with pytest.raises(SystemExit, match=r"teacher of .*s0 and of .*s3 .*preset 'tiny' vs 'cpu'"):
        E.main(["--out", s0, s3])
    written = [f for f in glob.glob(str(tmp_path / "**"), recursive=True) if os.path.isfile(f)]
    assert all(f.endswith("model.pt") for f in written)


def test_eval_on_a_folder_it_cannot_write_is_one_message_naming_the_path(tiny_data, tmp_path,
                                                                         monkeypatch):
    run = tiny_teacher_run(data.World(tiny_data), tmp_path / "run")

    def read_only(path, write, mode="w"):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(M, "atomic_write", read_only)
    with pytest.raises(SystemExit, match=rf"^eval\.py: cannot write {run}/teacher/eval\.json: "
                       r"Permission denied$"):
        E.main(["--out", str(run)])


def test_eval_cli_scores_again_with_another_eval_per_family(tiny_data, tmp_path, capsys):
    """python eval.py --out RUN --eval_per_family N on a run scored with another N prints N's
    tables, not the cached ones."""
    tiny_teacher_run(data.World(tiny_data), tmp_path)
    E.main(["--out", str(tmp_path)])
    assert json.load(open(tmp_path / "teacher" / "eval.json"))["settings"]["per_family"] == 1
    E.main(["--out", str(tmp_path), "--eval_per_family", "2"])
    res = json.load(open(tmp_path / "teacher" / "eval.json"))
    assert res["settings"]["per_family"] == 2
    assert "scored with other settings (per_family 1 -> 2)" in capsys.readouterr().out


def test_heard_split_scores_each_student_on_what_the_base_student_heard(tiny_data, tmp_path,
                                                                       monkeypatch):
    """Transcripts and answers chosen here: the base student transcribes every third prompt's clip
    short of its first word; it answers one prompt in three right from speech, the aligned student
    two in three, the teacher from text every prompt but the fifth ones. The shares heard whole,
    the scores and the ΔS on either part must be the hand-computed ones."""
    world = data.World(tiny_data)
    enc, adp, dec = M.make_configs("tiny", world.tok.get_vocab_size())
    torch.manual_seed(0)
    teacher = M.Decoder(dec)
    base = M.student_from_teacher(teacher, enc, adp, audio_token_id=world.audio_id)
    aligned = M.student_from_teacher(teacher, enc, adp, audio_token_id=world.audio_id)
    with torch.no_grad():
        aligned.decoder.norm.weight.fill_(2.0)  # tells the two students apart below
    for name, m in (("teacher", teacher), ("omni", base), ("align/xopd", aligned)):
        save_model(tmp_path / name, m)
    fams = E.test_sets(world, 6)[0]
    index = {r["id"]: i for rs in fams.values() for i, r in enumerate(rs)}

    def is_aligned(m):
        return float(m.decoder.norm.weight[0]) == 2.0

    def generate(model, world, recs, modality, device, max_new_tokens, encoder=None):
        if isinstance(model, M.Decoder):
            return [r["answer"] if index[r["id"]] % 5 != 4 else "no" for r in recs]
        if recs[0]["instruction"] == data.AUDIO_INSTRUCTIONS["asr"]:
            assert not is_aligned(model), "the split is the base student's hearing"
            return [" ".join(r["transcript"].split()[index[r["id"]] % 3 == 0:]) for r in recs]
        right = (lambda i: i % 3 != 0) if is_aligned(model) else (lambda i: i % 3 == 1)
        return [r["answer"] if right(index[r["id"]]) else "no" for r in recs]
    monkeypatch.setattr(xopd, "generate", generate)
    res = E.heard_split(str(tmp_path), world, "cpu", per_family=6, max_new_tokens=8)
    assert set(res) == {"heard", "omni", "align/xopd"}
    heard = {f: [i % 3 != 0 for i in range(len(rs))] for f, rs in fams.items()}
    assert res["heard"] == pytest.approx({f: 100.0 * sum(h) / len(h) for f, h in heard.items()})
    def pct(xs):
        return 100.0 * sum(xs) / len(xs)

    def on(part):  # {family: the prompts' indices in one part of the split}
        return {f: [i for i in range(len(rs)) if part is None or heard[f][i] == part]
                for f, rs in fams.items()}
    for name, right in (("omni", lambda i: i % 3 == 1), ("align/xopd", lambda i: i % 3 != 0)):
        for part, key in ((True, "S heard"), (False, "S misheard")):
            want = {f: pct([right(i) for i in ix]) for f, ix in on(part).items()}
            assert res[name][key] == pytest.approx(want)
        for part, key in ((None, "ΔS"), (True, "ΔS heard"), (False, "ΔS misheard")):
            teacher_T = [pct([i % 5 != 4 for i in ix]) for ix in on(part).values()]
            S = [pct([right(i) for i in ix]) for ix in on(part).values()]
            drops = [100.0 * (t - s) / t for t, s in zip(teacher_T, S)]
            assert res[name][key] == pytest.approx(sum(drops) / len(drops)), (name, key)
    assert res["align/xopd"]["ΔS heard"] < res["omni"]["ΔS heard"]
    assert res["omni"]["ΔS misheard"] == pytest.approx(100.0)


def test_explain_gives_each_tokens_log_probs_and_advantages_by_full_forward_passes(tiny_run):
    """explain's per-token log-probs and advantages against a full forward pass of each model
    over prompt + answer, softmax over the whole vocabulary in float64, row by row."""
    world = E.run_world(str(tiny_run))
    rows = E.explain(str(tiny_run), world, "cpu", 3, max_new_tokens=8, seed=1)
    student = E.load(os.path.join(tiny_run, "omni"), "cpu")
    teacher = E.load(os.path.join(tiny_run, "teacher"), "cpu")
    assert [r["record"]["task"] for r in rows] == list(data.text_families(world.val))[:3]

    def by_hand(decoder, prompt, answer):  # prompt (T, dim) -> log-prob of each answer token
        x = torch.cat([prompt, decoder.embed_tokens(answer)])[None]
        logits = decoder.logits(decoder(inputs_embeds=x))[0].double()
        return logits.log_softmax(-1)[len(prompt) - 1:-1].gather(1, answer[:, None])[:, 0]
    with torch.no_grad():
        for row in rows:
            b = world.batch([row["record"]], encoder=student.encoder)
            answer = torch.tensor([world.tok.token_to_id(t) for t in row["tokens"]])
            want = {}
            for key, modality in (("S", "speech"), ("T", "text")):
                emb, n = xopd.prompt_embeds(student, b, modality)
                want[key] = by_hand(student.decoder, emb[0, :n[0]], answer)
            want["teacher"] = by_hand(teacher, teacher.embed_tokens(b.text_ids[0, :b.text_lens[0]]),
                                      answer)
            want["A_cm"], want["A_im"] = want["teacher"] - want["S"], want["teacher"] - want["T"]
            for k, v in want.items():
                assert row[k] == pytest.approx(v.tolist(), abs=1e-4), k
    assert any(len(r["tokens"]) > 1 for r in rows)  # answers, not only an end token


def test_explain_command_prints_each_token_with_its_advantages(tiny_run, capsys):
    E.main(["--out", str(tiny_run), "--explain", "2"])
    printed = capsys.readouterr().out
    world = E.run_world(str(tiny_run))
    rows = E.explain(str(tiny_run), world, "cpu", 2, max_new_tokens=24)  # the tiny preset's
    for row in rows:
        assert f"{row['record']['id']} ({row['record']['task']}): spoken" in printed
        a_cm, a_im = row["A_cm"][0], row["A_im"][0]
        assert f"| {row['tokens'][0]} | {row['S'][0]:+.2f} |" in printed
        assert f"| {a_cm:+.2f} | {a_im:+.2f} | {'up' if a_cm > 0 else 'down'} |" in printed
    with pytest.raises(SystemExit):
        E.main(["--out", str(tiny_run), "--explain", "0"])
    assert "--explain: expected a positive number of val prompts, got 0" in capsys.readouterr().err


def test_premise_command_scores_val_alone_as_the_full_evaluation_does(tiny_run, capsys,
                                                                      monkeypatch):
    pools, real = [], E.evaluate_model

    def evaluate_model(*args, **kw):
        pools.append(args[6] if len(args) > 6 else kw.get("pool", "test"))
        return real(*args, **kw)
    monkeypatch.setattr(E, "evaluate_model", evaluate_model)
    E.main(["--out", str(tiny_run), "--premise"])
    assert pools == ["val", "val"]  # the teacher and the base student, never the test pool
    saved = {n: json.load(open(os.path.join(tiny_run, n, "eval.json")))
             for n in ("teacher", "omni")}
    assert E.premise_table([saved], ["omni"]) in capsys.readouterr().out
