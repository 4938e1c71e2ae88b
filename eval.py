"""
Score runs on the toy benchmarks, from speech (S) and from text (T), and build the paper's tables.

    python eval.py --out runs/cpu        # evaluate what the run folder holds, print + write the tables
    python eval.py --out runs/s0 runs/s1 runs/s2   # one folder per seed: mean ± standard error
    python eval.py bench                 # speed / memory benchmarks (print a table, assert nothing):
                                         # KV-cached vs recomputed sampling, fused vs naive log-probs,
                                         # one X-OPD step split into its parts, (with
                                         # transformers installed) the sampler, eager,
                                         # graphed and compiled, vs its generate, and one
                                         # decode step: its matmuls' share, its bandwidth
    python eval.py bench --device cuda   # the last two alone, on the GPU, and the align
                                         # stage's rollouts, eager and graphed
    python eval.py --out runs/cpu --first_token   # does each student start its answers as the
                                                  # teacher does, from speech and from text?
    python eval.py --out runs/cpu --hearing       # where the base student's transcripts lose words:
                                                  # encoder, adapter, decoder; prompts vs word lists

Premise  the paper's setting: teacher >= 90 % on every family, base student ASR WER <= 10 % (seen
         speakers) / 15 % (unseen), ΔS 8 to 25, 0 < ΔT <= ΔS / 2, audio questions >= 80 % on
         average; the teacher can judge the student: its log-prob per token of the student's
         greedy answers from speech >= -3 nats on every family, per-token reverse KL <= 3 nats.
Table 1  S and T score per text-skill family; ΔS / ΔT = mean over families of the relative drop
         (%) against the text teacher's T score (the paper's "Avg. Drop").
Table 2  the λ ablation of X-OPD: λ = 0 (speech only), 0.5, 1 (text only).
Table 3  audio skills (the analog of MMAR): accuracy per question type and ASR WER, with the change
         against the base student (forgetting).
"""
import argparse
import functools
import glob
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import data
import model as M
import xopd

# -----------------------------------------------------------------------------
# Metrics

def relative_drop(score, reference):
    """(reference - score) / reference, in percent: the paper's per-benchmark drop."""
    return 100.0 * (reference - score) / reference if reference > 0 else float("nan")


def avg_drop(scores, reference):
    """Mean relative drop over the families that both dicts score (ΔS or ΔT)."""
    fams = [f for f in reference if f in scores]
    return sum(relative_drop(scores[f], reference[f]) for f in fams) / len(fams) if fams else float("nan")


# -----------------------------------------------------------------------------
# Scoring one model

generate = xopd.generate  # greedy answers (tests replace E.generate)


def test_sets(world, per_family):
    """The first `per_family` test records of every family, split into text and audio skills."""
    audio = {}
    for r in world.test:
        if r["kind"] == "audio":
            audio.setdefault(r["task"], []).append(r)
    return data.text_families(world.test, per_family), {t: rs[:per_family] for t, rs in sorted(audio.items())}


def wer_by_speaker(recs, preds, heard, key, reference=lambda text: text):
    """{key: WER %, key_seen / key_unseen: WER % on clips of speakers in / not in `heard`
    (World.heard: the train pool's speakers)}, against reference(transcript)."""
    wers = [(data.wer(reference(r["transcript"]), p), r["voice"].get("speaker") in heard) for r, p in zip(recs, preds)]
    out = {key: 100.0 * sum(w for w, _ in wers) / len(wers)}
    for suffix, want in (("_seen", True), ("_unseen", False)):
        part = [w for w, seen in wers if seen == want]
        if part:
            out[key + suffix] = 100.0 * sum(part) / len(part)
    return out


def evaluate_model(model, world, device, per_family, max_new_tokens, done=lambda part: None):
    """{"T": {family: score}, "S": {...}, "audio": {task: score}, "asr_wer": WER, "asr_wer_seen" /
    "asr_wer_unseen": WER on clips of speakers heard / never heard in training, "examples": [...]}.
    done(part) is called as each family or audio task is scored (for progress lines)."""
    model.eval()
    text, audio = test_sets(world, per_family)
    res, examples = {"T": {}, "S": {}, "audio": {}}, []
    modalities = ["text"] if isinstance(model, M.Decoder) else ["text", "speech"]
    for fam, recs in text.items():
        for mod in modalities:
            preds = generate(model, world, recs, mod, device, max_new_tokens)
            res["T" if mod == "text" else "S"][fam] = 100.0 * sum(data.score(r, p) for r, p in zip(recs, preds)) / len(recs)
            examples.append({"family": fam, "modality": mod, "prompt": recs[0]["transcript"], "prediction": preds[0],
                             "answer": recs[0]["answer"]})
        done(fam)
    if modalities == ["text", "speech"]:
        for task, recs in audio.items():
            preds = generate(model, world, recs, "speech", device, max_new_tokens)
            done(task)
            if task != "asr":
                res["audio"][task] = 100.0 * sum(data.score(r, p) for r, p in zip(recs, preds)) / len(recs)
                continue
            res.update(wer_by_speaker(recs, preds, world.heard, "asr_wer"))
    res["examples"] = examples
    return res


@torch.no_grad()
@torch.no_grad()
def judge(teacher, student, world, device, max_new_tokens, per_family=None, seed=0, batch_size=64):
    """
    Can the text teacher judge what the student says from speech? X-OPD's only signal is the
    teacher's log-probability of the student's tokens. On val prompts (never test ones), per family:
      teacher_lp   the teacher's mean log-probability per token (end token included, pooled over
                   the family's tokens) of the student's greedy answers from speech; also split by
                   answers right (teacher_lp_right) and wrong (teacher_lp_wrong);
      rkl_cm       the student's per-token cross-modal reverse KL: one answer per prompt sampled
                   from speech at temperature 1, the mean over its tokens of
                   log pi_theta(y_t | S, y<t) - log pi_phi(y_t | T, y<t) (the align log's -adv_cm),
                   pooled over tokens; "rkl_cm" alone is the same over every family.
    -> {"teacher_lp": {family: nats}, "teacher_lp_right": {...}, "teacher_lp_wrong": {...},
        "rkl_cm_by_family": {...}, "rkl_cm": nats}
    """
    teacher.eval()
    student.eval()
    gen = torch.Generator(device).manual_seed(seed)
    sums = {}  # (key, family) -> [nats, tokens]

    def add(key, fam, nats, tokens):
        acc = sums.setdefault((key, fam), [0.0, 0])
        acc[0] += float(nats)
        acc[1] += int(tokens)
    for fam, recs in data.text_families(world.val, per_family).items():
        for i in range(0, len(recs), batch_size):
            rows = recs[i:i + batch_size]
            b = world.batch(rows, device=device, encoder=student.encoder)
            kw = dict(terms=("cm",), n=1, max_new_tokens=max_new_tokens, eos_id=world.end_id, generator=gen)
            _, greedy = xopd.student_rollouts(student, b, temperature=0.0, **kw)
            _, sampled = xopd.student_rollouts(student, b, temperature=1.0, **kw)
            ids, mask, _ = greedy["cm"]
            t_lp = xopd.teacher_logprobs(teacher, b, greedy, n=1)["cm"] * mask  # (B, L)
            right = torch.tensor([data.score(r, world.decode(row)) == 1.0 for r, row in zip(rows, ids.tolist())])
            add("teacher_lp", fam, t_lp.sum(), mask.sum())
            add("teacher_lp_right", fam, t_lp[right].sum(), mask[right].sum())
            add("teacher_lp_wrong", fam, t_lp[~right].sum(), mask[~right].sum())
            _, mask, s_lp = sampled["cm"]
            rkl = (s_lp - xopd.teacher_logprobs(teacher, b, sampled, n=1)["cm"]) * mask
            add("rkl_cm_by_family", fam, rkl.sum(), mask.sum())
    res = {}
    for (key, fam), (nats, tokens) in sums.items():
        if tokens:
            res.setdefault(key, {})[fam] = nats / tokens
    pooled = [v for (k, _), v in sums.items() if k == "rkl_cm_by_family"]
    res["rkl_cm"] = sum(n for n, _ in pooled) / max(1, sum(t for _, t in pooled))
    return res


def evaluate_encoder(m, world, device, per_task, batch_size=64):
    """A pretrained model.CTCEncoder on its own, on the test clips: greedy CTC WER of the
    transcription clips (all, seen and unseen speakers) and the voice heads' accuracy on the
    clips of each audio question. Perception measured before any decoder reads it."""
    m.eval()
    _, audio = test_sets(world, per_task)
    res = {"voice": {}}
    for task, recs in audio.items():
        preds, voice = [], {}
        for i in range(0, len(recs), batch_size):
            mels, mel_lens = data.collate_mels([world.mel(r) for r in recs[i:i + batch_size]])
            logp, lens, v = m.heads(mels.to(device), mel_lens.to(device))
            preds += M.ctc_greedy(logp, lens)
            for k, logits in v.items():
                voice.setdefault(k, []).extend(logits.argmax(-1).tolist())
        if task == "asr":
            # against the transcript as spoken (a doubled letter once): what CTC can write
            res.update(wer_by_speaker(recs, preds, world.heard, "ctc_wer", M.spoken_letters))
            res["example"] = {"transcript": recs[0]["transcript"], "ctc": preds[0]}
        elif task in M.VOICE_CLASSES:
            classes = M.VOICE_CLASSES[task]
            res["voice"][task] = 100.0 * sum(classes[p] == r["answer"] for r, p in zip(recs, voice[task])) / len(recs)
    return res


def run_dirs(out):
    """Every finished run under out: teacher, omni (the base student), align/<name>."""
    runs = {}
    for name in ["teacher", "omni"] + sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "align", "*"))):
        if os.path.exists(os.path.join(out, name, "model.pt")):
            runs[name] = os.path.join(out, name)
    return runs


def run_world(out, data_dir=None):
    """The World of the run in folder out, as train.py built it (world_of, with the n_mels of the
    run's speech encoder), from any directory."""
    settings = M.load_checkpoint(os.path.join(out, "teacher", "model.pt"))["train"]
    settings = {**settings, **{k: data.run_path(settings, k, out) for k in data.RUN_PATHS}}
    omni = os.path.join(out, "omni", "model.pt")
    enc = M.load_checkpoint(omni)["configs"]["encoder"] if os.path.exists(omni) else {}
    world = data.world_of(settings, enc.get("n_mels", data.N_MELS), data_dir)
    world.check_clips(data.encoder_seconds(enc.get("n_ctx", M.EncoderConfig.n_ctx)))  # before any model is scored
    return world


def scored_on(world, **settings):
    """What a score depends on besides the model: the settings given (prompts per family, answer
    length) and the data scored, known by a hash of the manifests eval reads (test.jsonl: the
    prompts and clips; train.jsonl: which speakers count as heard; val.jsonl: judge's prompts) and, for a generated toy world,
    its done.json (seed, preset, format: the clips themselves). Cached with the scores in eval.json:
    scores cached under another key are made again, never shown as this one's."""
    h = hashlib.sha256()
    for name in ("test.jsonl", "train.jsonl", "val.jsonl"):  # val: the prompts judge reads
        if os.path.exists(os.path.join(world.dir, name)):
            with open(os.path.join(world.dir, name), "rb") as f:
                h.update(f.read())
    done = os.path.join(world.dir, "done.json")
    toy = json.load(open(done)) if os.path.exists(done) else None
    return {**settings, "data": {"manifests": h.hexdigest()[:16], "toy_world": toy}}


def cached(path, ckpt, key, name):
    """The scores in eval.json at path when they are of this checkpoint (written after it) and of
    this key (scored_on); else None, with a line saying why they are made again."""
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(ckpt):
        return None
    with open(path) as f:
        res = json.load(f)
    old = res.get("settings", {})
    if old == key:
        return res
    diff = [f"{k} {old.get(k)!r} -> {v!r}" if k != "data" else "another data folder" for k, v in key.items() if old.get(k) != v]
    print(f"[eval] {name}: {path} was scored with other settings ({'; '.join(diff)}): scoring again")
    return None


def score_encoder(out, world, device, per_task):
    """The pretrained encoder on its own, into encoder/eval.json (unless cached), printed."""
    path, ckpt = os.path.join(out, "encoder", "eval.json"), os.path.join(out, "encoder", "model.pt")
    key = scored_on(world, per_family=per_task)
    if not os.path.exists(ckpt) or cached(path, ckpt, key, "encoder"):
        return
    m, _ = M.load_model(ckpt, device)
    res = {**evaluate_encoder(m, world, device, per_task), "settings": key}
    M.atomic_write(path, lambda f: json.dump(res, f, indent=1))
    wer = (f"greedy CTC WER {res['ctc_wer']:.1f} % (seen speakers {res.get('ctc_wer_seen', float('nan')):.1f}, "
           f"unseen {res.get('ctc_wer_unseen', float('nan')):.1f})" if "ctc_wer" in res else "no transcription clips (task asr)")
    print(f"[eval] encoder on its own, test clips: {wer}; voice heads {fmt_scores(res['voice']) or '-'}")


def evaluate_all(out, world, device, per_family, max_new_tokens):
    """Score every finished run whose eval.json is missing, older than its model.pt, or scored
    with other settings or data (scored_on) (stage 5); a student is also judged by the run's
    teacher on the val prompts (judge, under "judge")."""
    key = scored_on(world, per_family=per_family, max_new_tokens=max_new_tokens)
    score_encoder(out, world, device, per_family)
    teacher = None
    for name, d in run_dirs(out).items():
        path, ckpt = os.path.join(d, "eval.json"), os.path.join(d, "model.pt")
        old = cached(path, ckpt, key, name)
        if old and ("judge" in old or not old["S"]):  # a student (scored from speech) is judged too
            continue
        m, _ = M.load_model(ckpt, device)
        t0 = shown = time.time()

        def done(part):  # a line at most every 5 s while one model is scored
            nonlocal shown
            if time.time() - shown >= 5:
                print(f"[eval] {name}: ... {part} scored ({time.time() - t0:.0f} s)", flush=True)
                shown = time.time()
        res = {**evaluate_model(m, world, device, per_family, max_new_tokens, done), "settings": key}
        if isinstance(m, M.SpeechLM):
            teacher = teacher or M.load_model(os.path.join(out, "teacher", "model.pt"), device)[0]
            res["judge"] = judge(teacher, m, world, device, max_new_tokens)
        M.atomic_write(path, lambda f: json.dump(res, f, indent=1))
        print(f"[eval] {name}: T {fmt_scores(res['T'])} | S {fmt_scores(res['S'])}")


@torch.no_grad()
def first_token_probe(out, world, device, per_family):
    """
    Does the student start its answers as its teacher does? On val prompts (never test ones):
    the first token of the text teacher's greedy answer from text, and its probability under the
    base student and every aligned one, from speech and from text. At temperature 1 that is the
    share of a student's rollouts whose first token is the teacher's.
    -> {run: {family: (p from speech, p from text)}}
    """
    runs = run_dirs(out)
    teacher, _ = M.load_model(os.path.join(runs.pop("teacher"), "model.pt"), device)
    fams = data.text_families(world.val, per_family)
    last = xopd.last_hidden  # (B, T, d) -> (B, d) at each row's last prompt position
    first = {}
    for fam, rs in fams.items():
        b = world.batch(rs, device=device, speech=False)
        first[fam] = teacher.logits(last(teacher(b.text_ids), b.text_lens)).argmax(-1)  # (B,)
    res = {}
    for name, d in runs.items():
        m, _ = M.load_model(os.path.join(d, "model.pt"), device)
        m.eval()
        res[name] = {}
        for fam, rs in fams.items():
            b = world.batch(rs, device=device, encoder=m.encoder)
            p = []
            for modality in ("speech", "text"):
                emb, lens = xopd.prompt_embeds(m, b, modality)
                logp = m.decoder.logits(last(m.decoder(inputs_embeds=emb), lens)).log_softmax(-1)
                p.append(100.0 * logp.gather(1, first[fam][:, None]).exp().mean().item())
            res[name][fam] = tuple(p)
    return res


@torch.no_grad()
def hearing_probe(out, world, device, per_task, max_new_tokens):
    """
    Where are words lost between the clip and the base student's transcript? On the test
    transcription clips, split into clips of spoken prompts (sentences of the text families) and
    of word lists (random words of the vocabulary, which no language model can guess), the WER of:
    the frozen encoder's own greedy CTC output (against the words as spoken: a doubled letter
    once); the adapter's word scores alone (each word's best-scoring token, no decoder); the base
    student's transcript; and the text teacher copying the same transcripts from text ("repeat
    the words : ..."), which needs no hearing at all. Also the share of spoken prompts read with
    every spoken word right: a task can only be answered from what was heard; and, as many, the
    word lists of the training clips, which the omni stage trained on (a decoder that memorised
    them reads those far better than the test lists).
    -> {row: {"prompts": WER %, "lists": WER %, "all": WER % (test clips), "train lists": WER %,
              "whole": % of prompt clips}}
    """
    student, _ = M.load_model(os.path.join(out, "omni", "model.pt"), device)
    teacher, _ = M.load_model(os.path.join(out, "teacher", "model.pt"), device)
    student.eval()
    teacher.eval()
    prompts = {r["transcript"] for r in world.train + world.align + world.val + world.test if r["kind"] == "text"}
    test = test_sets(world, per_task)[1]["asr"]
    recs = test + [r for r in world.train if r["task"] == "asr" and r["transcript"] not in prompts][:len(test)]
    ctc, adapter = [], []
    for i in range(0, len(recs), 64):
        rows = recs[i:i + 64]
        mels, mel_lens = data.collate_mels([world.mel(r) for r in rows])
        _, lens, logp = student.encoder.frames(mels.to(device), mel_lens.to(device))
        ctc += M.ctc_greedy(logp, lens)
        b = world.batch(rows, device=device, text=False, encoder=student.encoder)
        _, n, logits = student.adapter(b.feats, b.feat_lens, student.decoder.embed_tokens.weight)  # (B, W, vocab)
        adapter += [world.tok.decode(w[:k - 1]) for w, k in zip(logits.argmax(-1).tolist(), n.tolist())]
    copy = [{**r, "transcript": f"repeat the words : {data.spoken_words(r['transcript'])} .", "instruction": ""} for r in recs]
    hyps = {"audio encoder alone, greedy CTC": ctc,
            "adapter's word scores alone (best token per word)": adapter,
            "base student, from speech": generate(student, world, recs, "speech", device, max_new_tokens, encoder=student.encoder),
            "text teacher, copying the transcript from text": generate(teacher, world, copy, "text", device, max_new_tokens)}
    res = {}
    for row, preds in hyps.items():
        ref = (lambda t: M.spoken_letters(data.spoken_words(t))) if row.startswith("audio encoder") else data.spoken_words
        wers = [(data.wer(ref(r["transcript"]), data.spoken_words(p)), r["transcript"] in prompts) for r, p in zip(recs, preds)]
        wers, train = wers[:len(test)], wers[len(test):]
        res[row] = {k: 100.0 * sum(w for w, _ in part) / max(1, len(part)) for k, part in
                    (("prompts", [x for x in wers if x[1]]), ("lists", [x for x in wers if not x[1]]), ("all", wers),
                     ("train lists", train))}
        res[row]["whole"] = 100.0 * sum(w == 0 for w, p in wers if p) / max(1, sum(p for _, p in wers))
    return res


@torch.no_grad()
def heard_split(out, world, device, per_family, max_new_tokens):
    """
    How much of each student's ΔS is hearing? The test prompts of every text family are split by
    whether the base student transcribes the prompt's own clip whole (every spoken word right, asked
    with the transcription instruction). Encoder and adapter are frozen after the omni stage, so
    every aligned student reads the same audio vectors as the base one. Each student's score from
    speech and ΔS on either part (against the teacher's text scores on the same prompts): ΔS on
    the prompts heard whole is the gap that is not about hearing.
    -> {"heard": {family: % heard whole}, run: {"S heard" / "S misheard": {family: %},
        "ΔS" / "ΔS heard" / "ΔS misheard": float}} (a part with no prompt scores nan)
    """
    runs = run_dirs(out)
    teacher, _ = M.load_model(os.path.join(runs.pop("teacher"), "model.pt"), device)
    base, _ = M.load_model(os.path.join(runs["omni"], "model.pt"), device)
    base.eval()
    fams = test_sets(world, per_family)[0]
    asr = data.AUDIO_INSTRUCTIONS["asr"]
    heard = {f: [data.spoken_words(p) == data.spoken_words(r["transcript"]) for r, p in
                 zip(rs, generate(base, world, [{**r, "instruction": asr} for r in rs], "speech", device, max_new_tokens))]
             for f, rs in fams.items()}

    def scores(model, modality):
        return {f: [data.score(r, p) for r, p in zip(rs, generate(model, world, rs, modality, device, max_new_tokens))]
                for f, rs in fams.items()}

    def on(xs, part):  # {family: % right} on one part of the split
        sel = {f: [x for x, h in zip(xs[f], heard[f]) if part is None or h == part] for f in xs}
        return {f: 100.0 * sum(v) / len(v) if v else float("nan") for f, v in sel.items()}
    teacher_T = scores(teacher, "text")
    res = {"heard": {f: 100.0 * sum(h) / len(h) for f, h in heard.items()}}
    for name, d in runs.items():
        m = base if name == "omni" else M.load_model(os.path.join(d, "model.pt"), device)[0]
        m.eval()
        S = scores(m, "speech")
        res[name] = {"S heard": on(S, True), "S misheard": on(S, False)}
        for key, part in (("ΔS", None), ("ΔS heard", True), ("ΔS misheard", False)):
            res[name][key] = avg_drop(on(S, part), on(teacher_T, part))
    return res


def fmt_scores(d):
    return " ".join(f"{k} {v:.1f}" for k, v in d.items()) or "-"


# -----------------------------------------------------------------------------
# Tables

def label(name):
    return {"teacher": "text teacher (T only)", "omni": "base student"}.get(name, name.replace("align/", ""))


def mean_se(xs):
    """Mean and standard error of the mean (sample std / sqrt(n)); se is nan for one value."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def fmt(xs, digits=1):
    """One table cell from the per-seed values: 'mean' for one seed, 'mean ± se' for several."""
    m, se = mean_se(xs)
    return f"{m:.{digits}f}" if len(xs) < 2 else f"{m:.{digits}f} ± {se:.{digits}f}"


def drops(seeds, name, modality):
    """ΔS or ΔT of run `name` in every seed, each against that seed's own text teacher."""
    return [avg_drop(r[name][modality], r["teacher"]["T"]) for r in seeds]


# The premise (the paper's setting, in miniature): a strong text teacher; a base student that
# hears well but answers worse from speech than its text backbone does, and lost a little
# from text; audio skills worth forgetting. name, value from one seed's results, target, test.
PREMISE = [
    ("text teacher, worst family from text (%)", lambda r: min(r["teacher"]["T"].values()), ">= 90", lambda v: v >= 90),
    ("base student ASR WER, seen speakers (%)", lambda r: r["omni"].get("asr_wer_seen", float("nan")), "<= 10", lambda v: v <= 10),
    ("base student ASR WER, unseen speakers (%)", lambda r: r["omni"].get("asr_wer_unseen", float("nan")), "<= 15", lambda v: v <= 15),
    ("base student ΔS (%)", lambda r: avg_drop(r["omni"]["S"], r["teacher"]["T"]), "8 to 25", lambda v: 8 <= v <= 25),
    ("base student ΔT (%)", lambda r: avg_drop(r["omni"]["T"], r["teacher"]["T"]), "> 0 and <= ΔS / 2", None),
    ("base student audio questions, mean accuracy (%)",
     lambda r: sum(r["omni"]["audio"].values()) / max(1, len(r["omni"]["audio"])), ">= 80", lambda v: v >= 80),
    # the teacher can judge the student (judge): it gives the student's answers from speech a
    # probability a real text LLM would, and the two are close enough for its feedback to carry
    ("teacher's log-prob per token of the base student's greedy answers from speech, worst family, val (nats)",
     lambda r: min(r["omni"].get("judge", {}).get("teacher_lp", {"-": float("nan")}).values()), ">= -3", lambda v: v >= -3),
    ("base student's per-token cross-modal reverse KL to the teacher, val (nats)",
     lambda r: r["omni"].get("judge", {}).get("rkl_cm", float("nan")), "<= 3", lambda v: v <= 3),
]


def premise(seeds):
    """The premise table's rows [(name, per-seed values, target, met)] from per-seed results
    ({run name: eval.json contents}, one dict per seed). A row is met when the mean meets it."""
    rows = []
    for name, value, target, test in PREMISE:
        vals = [value(r) for r in seeds]
        m = sum(vals) / len(vals)
        if test is None:  # ΔT: between 0 and the same seeds' mean ΔS
            ds = sum(avg_drop(r["omni"]["S"], r["teacher"]["T"]) for r in seeds) / len(seeds)
            met = 0 < m <= ds / 2
        else:
            met = test(m)
        rows.append((name, vals, target, met))
    return rows


def tables(seeds):
    """The premise table and the paper's three tables as markdown, from a list of per-seed
    results ({run name: eval.json contents}); a cell is the mean ± standard error over seeds.
    Only runs present in every seed are shown."""
    seeds = [r for r in seeds if "teacher" in r]
    if not seeds:
        return {}
    names = [n for n in seeds[0] if all(n in r for r in seeds)]
    fams = list(seeds[0]["teacher"]["T"])
    out = {}
    if "omni" in names:
        rows = ["| premise | value | target | met |", "|---|---|---|---|"]
        rows += [f"| {n} | {fmt(v)} | {t} | {'yes' if ok else 'NO'} |" for n, v, t, ok in premise(seeds)]
        out["premise"] = "\n".join(rows)
    # Table 1
    rows = ["| model | " + " | ".join(f"{f} S | {f} T" for f in fams) + " | ΔS | ΔT |",
            "|---|" + "---|---|" * len(fams) + "---|---|"]
    for n in names:
        cells = []
        for f in fams:
            s = fmt([r[n]["S"][f] for r in seeds]) if f in seeds[0][n]["S"] else "-"
            cells.append(f"{s} | {fmt([r[n]['T'][f] for r in seeds])}")
        ds = fmt(drops(seeds, n, "S"), 2) if seeds[0][n]["S"] else "-"
        rows.append(f"| {label(n)} | " + " | ".join(cells) + f" | {ds} | {fmt(drops(seeds, n, 'T'), 2)} |")
    out["table1"] = "\n".join(rows)
    # paired over seeds: each method's ΔS / ΔT minus the base student's of the same seed, so the
    # seed-to-seed spread of the pipeline cancels; '*' marks a mean beyond two standard errors
    methods = [n for n in names if n.startswith("align/")]
    if "omni" in names and methods and len(seeds) > 1:
        def paired(n, modality, against="omni"):
            d = [a - b for a, b in zip(drops(seeds, n, modality), drops(seeds, against, modality))]
            m, se = mean_se(d)
            return fmt(d, 2) + (" *" if abs(m) > 2 * se else "")
        xo = "align/xopd" in methods  # is X-OPD's the lowest? the same pairing, X-OPD against every other method
        rows = ["| model | ΔS − base student's | ΔT − base student's |" + (" X-OPD's ΔS − this | X-OPD's ΔT − this |" if xo else ""),
                "|---|---|---|" + ("---|---|" if xo else "")]
        for n in methods:
            vs = "" if not xo else " | |" if n == "align/xopd" else f" {paired('align/xopd', 'S', n)} | {paired('align/xopd', 'T', n)} |"
            rows.append(f"| {label(n)} | {paired(n, 'S')} | {paired(n, 'T')} |" + vs)
        out["paired"] = "\n".join(rows)
    # Table 2: λ ablation
    lam_runs = [(lam, n) for lam, n in ((0.0, "align/xopd_lam0"), (0.5, "align/xopd"), (1.0, "align/xopd_lam1")) if n in names]
    if lam_runs:
        rows = ["| λ | ΔS | ΔT |", "|---|---|---|"]
        rows += [f"| {lam:g} | {fmt(drops(seeds, n, 'S'), 2)} | {fmt(drops(seeds, n, 'T'), 2)} |" for lam, n in lam_runs]
        out["table2"] = "\n".join(rows)
    # Table 3: audio skills against the base student (forgetting)
    students = [n for n in names if seeds[0][n].get("audio")]
    if "omni" in students:
        tasks = list(seeds[0]["omni"]["audio"])
        avg = lambda r: sum(r["audio"].values()) / len(r["audio"])
        rows = ["| model | " + " | ".join(tasks) + " | audio avg | Δ vs base | ASR WER |", "|---|" + "---|" * (len(tasks) + 3)]
        for n in students:
            rows.append(f"| {label(n)} | " + " | ".join(fmt([r[n]["audio"][t] for r in seeds]) for t in tasks) +
                        f" | {fmt([avg(r[n]) for r in seeds])} | {fmt([avg(r[n]) - avg(r['omni']) for r in seeds])} |"
                        f" {fmt([r[n].get('asr_wer', float('nan')) for r in seeds])} |")
        out["table3"] = "\n".join(rows)
    # the align stage's val curves: score from speech and the two reverse-KL estimates, per val step
    curved = [n for n in methods if all(r[n].get("curve") for r in seeds)]
    if curved:
        steps = [c["step"] for c in seeds[0][curved[0]]["curve"]]
        rows = ["| model | " + " | ".join(f"step {k}" for k in steps) + " | rkl_im first → last | rkl_cm first → last |",
                "|---|" + "---|" * (len(steps) + 2)]
        for n in curved:
            at = lambda key, i: fmt([r[n]["curve"][i][key] for r in seeds], 2 if key.startswith("rkl") else 1)
            rows.append(f"| {label(n)} | " + " | ".join(at("val_S", i) for i in range(len(steps))) +
                        "".join(f" | {at(k, 0)} → {at(k, -1)}" for k in ("rkl_im", "rkl_cm")) + " |")
        out["curves"] = "\n".join(rows)
    return out


TITLES = {
    "premise": "Premise: the paper's setting in miniature (base student = after the omni stage)",
    "table1": "Table 1: text skills from speech (S) and text (T); ΔS / ΔT = mean relative drop (%) vs the text teacher",
    "paired": "Table 1, paired: each method's change of ΔS / ΔT against the base student of its own seed, and X-OPD's against each method's, seed by seed (* beyond two standard errors)",
    "table2": "Table 2: λ ablation of X-OPD",
    "table3": "Table 3: audio skills (accuracy %, ASR WER %) vs the base student",
    "curves": "The align stage's val curves: score from speech (%, val prompts) at each val step; reverse-KL estimates (nats per response)",
}


def load_results(out):
    """{run name: eval.json contents} for every evaluated run in a run folder."""
    results = {}
    for name, d in run_dirs(out).items():
        p = os.path.join(d, "eval.json")
        if os.path.exists(p):
            with open(p) as f:
                results[name] = json.load(f)
            curve = os.path.join(d, "val.jsonl")  # an align run's val curve (train.validate)
            if name.startswith("align/") and os.path.exists(curve):
                with open(curve) as f:
                    results[name]["curve"] = [json.loads(line) for line in f if line.strip()]
    return results


def report(outs, write_to=None):
    """Print the tables of one run folder, or of several (one per seed: mean ± standard error),
    and write them as tables.md and tables.json into write_to (default: the first folder)."""
    outs = [outs] if isinstance(outs, str) else list(outs)
    seeds = [load_results(o) for o in outs]
    t = tables(seeds)
    head = f"{len(outs)} seed(s): " + ", ".join(outs) + ("; cells are mean ± standard error over seeds" if len(outs) > 1 else "")
    md = head + "\n\n" + "\n\n".join(f"### {TITLES[k]}\n\n{v}" for k, v in t.items())
    print(md)
    dest = write_to or outs[0]
    M.atomic_write(os.path.join(dest, "tables.md"), lambda f: f.write(md + "\n"))
    summary = {"runs": outs, "results": [{n: {k: v for k, v in r.items() if k != "examples"} for n, r in s.items()} for s in seeds],
               "tables": t}
    M.atomic_write(os.path.join(dest, "tables.json"), lambda f: json.dump(summary, f, indent=1))
    return t


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
    """Item 1: tokens/s with the KV cache (today's, and at fixed shapes: sample(static=True)) and
    with full recomputation, same model and seed."""
    _, _, dcfg = M.make_configs(preset, vocab)
    torch.manual_seed(seed)
    dec = M.Decoder(dcfg).eval()
    ids = torch.randint(0, vocab, (batch, prompt))
    lens = torch.full((batch,), prompt)
    no_eos = -1  # never sampled: every row runs the full length, the same work for both
    xopd.sample(dec, torch.full((2,), 8), input_ids=ids[:2, :8], max_new_tokens=4, eos_id=no_eos)  # warm-up
    out, seconds = {}, {}
    for name, fn in (("cached", functools.partial(xopd.sample, dec)),
                     ("static", functools.partial(xopd.sample, dec, static=True)),
                     ("naive", functools.partial(sample_recompute, dec))):
        t0 = time.perf_counter()
        out[name] = fn(lens, input_ids=ids, max_new_tokens=new_tokens, eos_id=no_eos,
                       generator=torch.Generator().manual_seed(seed))
        seconds[name] = time.perf_counter() - t0
        out[name] = out[name][0] if isinstance(out[name], tuple) else out[name]
    n_tok = batch * new_tokens
    return dict(cached_tok_s=n_tok / seconds["cached"], static_tok_s=n_tok / seconds["static"],
                naive_tok_s=n_tok / seconds["naive"], cached_s=seconds["cached"], static_s=seconds["static"],
                naive_s=seconds["naive"], same_tokens=(out["cached"] == out["naive"]).float().mean().item(),
                same_tokens_static=(out["cached"] == out["static"]).float().mean().item())


def _linears(dec):
    """The weights of every matrix multiply a token goes through: each layer's projections, then the head."""
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return [layer.get_submodule(n).weight for layer in dec.layers for n in names] + [dec.lm_head.weight]


def bench_vs_hf(preset, batch=32, prompt=64, new_tokens=128, vocab=2000, reps=5, seed=0, device="cpu",
                compile=True):
    """
    Item 4: xopd.sample against transformers' generate (its default KV cache) on the same random
    Llama weights (loaded into this project's Decoder with model.load_llama), temperature 1, no
    top-k / top-p, no end token; the samplers alternate, best of `reps` each. Ours: eager, with
    graph=True (each decode step replayed from a CUDA graph; on a CPU the same fixed-shape step,
    eager) and, with compile, through torch.compile. Also the matmul GFLOP/s: the linear layers'
    FLOPs over each sampler's whole time, against the same shapes (same weights, same rows per
    call) run alone. On a GPU (device "cuda") every timing waits for the GPU to finish. None when
    transformers is not installed.
    """
    try:
        import transformers
    except ImportError:
        return None
    _, _, dcfg = M.make_configs(preset, vocab)
    config = M.llama_config(dcfg) | dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval().to(device)
    dec = M.load_llama(hf.state_dict(), config).eval().to(device)
    ids = torch.randint(0, vocab, (batch, prompt)).to(device)
    lens = torch.full((batch,), prompt, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def ours(n=new_tokens, temperature=1.0, **way):
        return xopd.sample(dec, lens, input_ids=ids, max_new_tokens=n, eos_id=-1, temperature=temperature, **way)[0]

    def theirs(n=new_tokens, greedy=False):
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=not greedy,
                              **({} if greedy else dict(temperature=1.0, top_k=0, top_p=1.0)))
        assert out.shape == (batch, prompt + n), "generate stopped early"
        return out[:, prompt:]

    ways = {"ours": {}, "graphed": dict(graph=True)} | ({"compiled": dict(compile=True)} if compile else {})
    greedy = theirs(16, greedy=True)
    res = {}
    for name, way in ways.items():  # the greedy tokens; the first call's time (torch.compile compiles here)
        sync()
        t0 = time.perf_counter()
        res[f"same_greedy_{name}"] = (ours(16, temperature=0.0, **way) == greedy).float().mean().item()
        sync()
        res[f"first_s_{name}"] = time.perf_counter() - t0
    fns = {name: functools.partial(ours, **way) for name, way in ways.items()} | {"hf": theirs}
    best = {name: float("inf") for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    # the same matrix multiplies alone: the prompt's (batch * prompt rows; the head on the last
    # position only), then one call per decoded token (batch rows)
    ws = _linears(dec)
    calls = [(batch * prompt, ws[:-1]), (batch, ws[-1:])] + [(batch, ws)] * (new_tokens - 1)
    flops = sum(2 * rows * w.numel() for rows, group in calls for w in group)
    xs = {rows: torch.randn(rows, dcfg.dim, device=device) for rows in (batch, batch * prompt)}
    hs = {rows: torch.randn(rows, dcfg.hidden_dim, device=device) for rows in (batch, batch * prompt)}

    def alone():
        with torch.inference_mode():
            for rows, group in calls:
                for w in group:
                    F.linear(hs[rows] if w.shape[1] == dcfg.hidden_dim else xs[rows], w)
        sync()
    t_alone = M._bench(alone, reps=reps)
    n_tok = batch * new_tokens
    for name in fns:
        res[f"{name}_tok_s"] = n_tok / best[name]
        res[f"gflops_{name}"] = flops / best[name] / 1e9
    return res | dict(gflops_alone=flops / t_alone / 1e9, transformers=transformers.__version__)


def bench_decode_step(preset, batch=32, prompt=64, new_tokens=128, vocab=2000, reps=100, seed=0, device="cpu"):
    """
    Item 5: one decode step (Decoder.decode_step on a static cache: every layer, one token per row,
    no head) in the middle of a rollout of item 4's size, eager and (on CUDA) replayed from a CUDA
    graph: its time; the share of it its matrix multiplies need (the same multiplies alone, on CUDA
    replayed from a graph of their own, so with no launch cost: the GPU's own time for them); and
    the memory bandwidth it reaches, the bytes it must read (the layers' weights, and the keys and
    values of all the static cache's positions, which its attention reads) over its time, against
    what a device-to-device copy reaches (read + write). float32, as item 4.
    """
    _, _, dcfg = M.make_configs(preset, vocab)
    torch.manual_seed(seed)
    dec = M.Decoder(dcfg).eval().to(device)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def per_call(fn, n=reps):  # seconds per call: the best of 3 runs of n calls back to back
        return M._bench(fn, reps=3, calls=n, sync=sync)

    with torch.inference_mode():
        written = prompt + new_tokens // 2  # keys in the cache mid-rollout
        prefilled = dec.new_cache(batch, written)
        dec.prefill(prefilled, torch.full((batch,), written, device=device),
                    input_ids=torch.randint(0, vocab, (batch, written), device=device))
        cache = prefilled.repeat_interleave(1, max_len=prompt + new_tokens)
        x = dec.embed_tokens(torch.randint(0, vocab, (batch, 1), device=device))  # (B, 1, dim)
        # every call writes the same position (lengths does not advance): the same work each time
        t_eager = per_call(lambda: dec.decode_step(x, cache))
        graphed = xopd.DecodeGraph(dec)
        t_graph = per_call(lambda: graphed(x, cache)) if cuda else None
        ws = _linears(dec)[:-1]  # the layers' projections: decode_step stops before the head
        xs, hs = torch.randn(batch, dcfg.dim, device=device), torch.randn(batch, dcfg.hidden_dim, device=device)

        def matmuls():
            for w in ws:
                F.linear(hs if w.shape[1] == dcfg.hidden_dim else xs, w)
        t_mm = per_call(xopd.capture_cuda_graph(matmuls)[0].replay if cuda else matmuls)
        src = torch.zeros((2**30 if cuda else 2**26) // 4, device=device)  # 1 GiB (64 MiB on a CPU)
        dst = torch.empty_like(src)
        t_copy = per_call(lambda: dst.copy_(src), n=10)
    weights = sum(w.numel() * w.element_size() for w in ws)
    kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    return dict(eager_s=t_eager, graph_s=t_graph, matmuls_s=t_mm, weight_bytes=weights, kv_bytes=kv,
                copy_bytes_s=2 * src.numel() * src.element_size() / t_copy)


def bench_rollouts(preset="gpu", prompts=64, n=4, new_tokens=64, vocab=2000, reps=3, seed=0, device="cpu"):
    """
    Item 6: rollouts of the align stage's size (the gpu preset's: 64 prompts of 24 to 47 tokens,
    n 4, 64 new tokens, temperature 1; bf16 autocast on CUDA, as train.py's), eager, at fixed
    shapes (static=True) and graph=True: seconds per rollout (best of `reps`), whether each gives
    the same tokens run to run from the same seed, and the share of tokens equal to the eager
    sampler's (bf16 rounds the default cache's shorter attention differently, and one different
    token changes the rest of its row). Random weights: the end token is rare.
    """
    _, _, dcfg = M.make_configs(preset, vocab)
    torch.manual_seed(seed)
    dec = M.Decoder(dcfg).eval().to(device)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(24, 48, (prompts,), generator=g)
    ids = torch.randint(4, vocab, (prompts, int(lens.max())), generator=g).to(device)
    lens = lens.to(device)
    kind = torch.device(device).type
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)

    def run(**way):
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
            return xopd.sample(dec, lens, input_ids=ids, n=n, max_new_tokens=new_tokens, eos_id=3,
                               generator=torch.Generator(device).manual_seed(seed), **way)
    res, first = {}, {}
    for name, way in (("eager", {}), ("static", dict(static=True)), ("graph", dict(graph=True))):
        first[name] = run(**way)
        best = float("inf")
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            again = run(**way)
            sync()
            best = min(best, time.perf_counter() - t0)
        res[f"{name}_s"] = best
        res[f"{name}_repeats"] = all(torch.equal(a, b) for a, b in zip(first[name], again))
        same = first[name][0].shape == first["eager"][0].shape and first[name][0] == first["eager"][0]
        res[f"{name}_same_as_eager"] = float(torch.as_tensor(same, dtype=torch.float).mean())
    return res | dict(tokens=prompts * n * new_tokens)


def rollout_rows(r, device="cpu"):
    """Item 6's table rows from bench_rollouts(...)."""
    item = f"6 align rollouts, gpu size on {device}"
    return [(item, name, f"{r[f'{key}_s'] * 1e3:.0f} ms",
             f"{r['tokens'] / r[f'{key}_s']:.0f} tok/s, {r['eager_s'] / r[f'{key}_s']:.2f}x eager; "
             f"same tokens run to run: {'yes' if r[f'{key}_repeats'] else 'NO'}; "
             f"{100 * r[f'{key}_same_as_eager']:.1f}% of the tokens as eager")
            for key, name in (("eager", "xopd.sample"), ("static", "static=True"), ("graph", "graph=True"))]


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
    """Item 3: one X-OPD step of the preset (after one warm-up step), split into its phases:
    rollouts, teacher scoring, and the update (the loss, backward and the optimiser step)."""
    torch.manual_seed(seed)
    enc, adp, dcfg = M.make_configs(preset, vocab)
    teacher = M.Decoder(dcfg)
    audio_id, eos_id = vocab - 1, 3
    student = M.student_from_teacher(teacher, enc, adp, audio_token_id=audio_id).freeze_audio()
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
    b = data.Batch(text_ids=text_ids, text_lens=text_lens, speech_ids=speech_ids, speech_lens=torch.full((batch,), 8),
                   mels=torch.randn(batch, enc.n_mels, frames, generator=g), mel_lens=torch.full((batch,), frames))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=2e-6)
    kw = dict(n=n, max_new_tokens=max_new_tokens, eos_id=eos_id)
    for s in (seed, seed + 1):  # a warm-up step, then the timed one
        loss, m = xopd.xopd_step(student, teacher, b, generator=torch.Generator().manual_seed(s), **kw)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)  # train.update_weights' work, without the clipping
        loss.backward()
        opt.step()
        m["ms_update"] = m.pop("ms_loss") + (time.perf_counter() - t0) * 1e3
    m.update(batch=batch, n=n, max_new_tokens=max_new_tokens)
    return m


def vs_hf_rows(hf, device="cpu"):
    """Item 4's table rows from {preset: bench_vs_hf(...)} (a preset whose result is None is left out)."""
    rows = []
    names = {"ours": "xopd.sample", "graphed": "xopd.sample(graph=True)" + (" (fixed shapes, eager on a CPU)" if device == "cpu" else ""),
             "compiled": "xopd.sample(compile=True)"}
    for p, r in hf.items():
        if r is None:
            continue
        item = f"4 vs generate, {p}" if device == "cpu" else f"4 vs generate, {p} size on {device}"
        alone = f"the same matmuls alone {r['gflops_alone']:.1f}"
        ours = [k for k in names if f"{k}_tok_s" in r]
        for k in ours:
            first = f"first call {r['first_s_compiled']:.0f} s (compiles); " if k == "compiled" else ""
            rows.append((item, names[k], f"{r[f'{k}_tok_s']:.0f} tok/s",
                         f"{r[f'gflops_{k}']:.1f} matmul GFLOP/s; {alone + '; ' if k == 'ours' else first}"
                         f"{100 * r[f'same_greedy_{k}']:.1f}% same greedy tokens as generate"))
        rows.append((item, f"transformers {r['transformers']} generate", f"{r['hf_tok_s']:.0f} tok/s", ""))
        for k in ours:
            rows.append((item, f"ratio, {names[k]}", f"{r[f'{k}_tok_s'] / r['hf_tok_s']:.2f}x generate",
                         f"matmuls are {100 * r[f'gflops_{k}'] / r['gflops_alone']:.0f}% of its time"))
    return rows


def step_rows(steps, device="cpu"):
    """Item 5's table rows from {preset: bench_decode_step(...)}."""
    rows = []
    for p, r in steps.items():
        item = f"5 decode step, {p}" + ("" if device == "cpu" else f" size on {device}")
        moved = r["weight_bytes"] + r["kv_bytes"]
        copy = r["copy_bytes_s"]
        rows.append((item, "bytes it reads", f"{moved / 1e6:.1f} MB",
                     f"weights {r['weight_bytes'] / 1e6:.1f} MB, keys and values {r['kv_bytes'] / 1e6:.1f} MB; "
                     f"a device copy reaches {copy / 1e9:.0f} GB/s (read + write)"))
        for name, t in (("eager", r["eager_s"]), ("CUDA graph", r["graph_s"])):
            if t is not None:
                rows.append((item, name, f"{t * 1e6:.0f} µs",
                             f"matmuls {100 * r['matmuls_s'] / t:.0f}% of it; {moved / t / 1e9:.0f} GB/s, "
                             f"{100 * moved / t / copy:.0f}% of the copy's"))
        rows.append((item, "its matmuls alone" + (", from a graph" if r["graph_s"] is not None else ""),
                     f"{r['matmuls_s'] * 1e6:.0f} µs", f"weights read at {r['weight_bytes'] / r['matmuls_s'] / 1e9:.0f} GB/s"))
    return rows


def bench(args):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    machine = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start"
    if args.device != "cpu":  # items 4 to 6 alone: items 1-3 measure this CPU (item 2 its process memory)
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as e:
            sys.exit(f"--device {args.device}: not usable here ({e})")
        machine += f"; {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""
        print(f"machine: {machine}")
        print(f"4. xopd.sample (eager, graph=True{', compile=True' if args.compile else ''}) vs transformers' "
              f"generate on {args.device}, cpu and gpu preset decoders, float32, batch 32, prompt 64, 128 new tokens "
              "(alternating, best of 5 each) ...", flush=True)
        hf = {p: bench_vs_hf(p, device=args.device, compile=args.compile) for p in ("cpu", "gpu")}
        print("5. one decode step mid-rollout (the same sizes): eager, from a CUDA graph, its matmuls alone ...", flush=True)
        steps = {p: bench_decode_step(p, device=args.device) for p in ("cpu", "gpu")}
        print("6. the align stage's rollouts at the gpu preset's size, bf16 autocast: eager, static, graph ...", flush=True)
        rollouts = bench_rollouts(device=args.device)
        rows = vs_hf_rows(hf, args.device) + step_rows(steps, args.device) + rollout_rows(rollouts, args.device)
        table = ["| item | variant | speed | other |", "|---|---|---|---|"]
        table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        print("\n".join(table))
        if None in hf.values():
            print("4. skipped: it needs transformers (pip install transformers; it is not a dependency of this project)")
        return table, machine
    print(f"machine: {machine}")
    # item 2 first, while this process is small: its children start from a fresh memory map
    print("2. token_logprobs vs log_softmax(h @ W.T).gather, N 8192, V 32768, d 256, fp32, fwd+bwd "
          "(2 processes each: fastest time, largest peak) ...", flush=True)
    lp = bench_logprobs(threads=torch.get_num_threads())
    print("1. sampling, cpu preset decoder (vocab 2000), batch 32, prompt 64, 128 new tokens ...", flush=True)
    s = bench_sampling()
    print("3. one xopd_step, cpu preset (vocab 2000), 8 prompts x n 4 x 2 modalities, 64 new tokens ...", flush=True)
    st = bench_step()
    print("4. xopd.sample vs transformers' generate, cpu and gpu preset decoders, batch 32, prompt 64, "
          "128 new tokens (alternating, best of 5 each) ...", flush=True)
    hf = {p: bench_vs_hf(p, compile=args.compile) for p in ("cpu", "gpu")}
    print("5. one decode step mid-rollout (item 4's sizes), at fixed shapes, and its matmuls alone ...", flush=True)
    steps = {p: bench_decode_step(p, reps=10) for p in ("cpu", "gpu")}
    nv, fu = lp["naive"], lp["fused"]
    total = st["ms_rollout"] + st["ms_teacher"] + st["ms_update"]
    rows = [
        ("1 sampling", "KV cache", f"{s['cached_tok_s']:.0f} tok/s", f"{s['cached_s']:.2f} s"),
        ("1 sampling", "KV cache, fixed shapes (static=True)", f"{s['static_tok_s']:.0f} tok/s",
         f"{s['static_s']:.2f} s; {100 * s['same_tokens_static']:.1f}% same tokens as the KV cache"),
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
    rows += vs_hf_rows(hf) + step_rows(steps)
    table = ["| item | variant | speed | other |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    print("\n".join(table))
    if None in hf.values():
        print("4. skipped: transformers is not installed (pip install transformers, in a venv of its own "
              "if you like; it is not a dependency of this project)")
    return table, machine


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if argv[:1] in (["bench"], ["bench-mem"]):
        sub = ap.add_subparsers(dest="cmd", required=True)
        p = sub.add_parser("bench", help="speed / memory benchmarks: prints a table")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--device", default="cpu", help="cuda: items 4 to 6 alone (the samplers vs generate, "
                       "the decode step, the align stage's rollouts), on the GPU")
        p.add_argument("--no-compile", dest="compile", action="store_false",
                       help="item 4 without xopd.sample(compile=True) (its compilation takes a while)")
        p = sub.add_parser("bench-mem", help="one token_logprobs variant in this process (used by bench)")
        p.add_argument("--variant", choices=["naive", "fused"], required=True)
        p.add_argument("--N", type=int, default=8192)
        p.add_argument("--V", type=int, default=32768)
        p.add_argument("--d", type=int, default=256)
        p.add_argument("--chunk-size", type=int, default=1024)
        p.add_argument("--threads", type=int, default=0)
        args = ap.parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.cmd == "bench":
            bench(args)
        else:
            print(json.dumps(bench_mem(args.variant, args.N, args.V, args.d, args.chunk_size)))
        return
    ap.add_argument("--out", required=True, nargs="+",
                    help="run folder(s) written by train.py; several (one per seed) give mean ± standard error")
    ap.add_argument("--data", default=None, help="data folder (default: the one each run was trained on)")
    ap.add_argument("--eval_per_family", type=int, default=None, help="test prompts per family (default: the run's)")
    ap.add_argument("--max_new_tokens", type=int, default=None, help="answer length limit (default: the run's)")
    ap.add_argument("--first_token", action="store_true",
                    help="instead of the tables: the probability (%%) that each student starts its answer with its "
                         "teacher's first token, from speech and from text, on val prompts (first_token_probe)")
    ap.add_argument("--hearing", action="store_true",
                    help="instead of the tables: where the base student loses words, on the test transcription "
                         "clips (hearing_probe), and each student's ΔS on the prompts the base student hears whole and on the rest (heard_split)")
    args = ap.parse_args(argv)
    device, _, why = M.pick_device()
    print(f"device: {device} ({why})")
    runs = []  # (folder, its World, its settings): what the flags leave out, as the run was trained
    for out in args.out:
        teacher = os.path.join(out, "teacher", "model.pt")
        if not os.path.exists(teacher):
            ap.error(f"--out: {out} holds no finished teacher ({teacher}); run train.py first")
        trained = M.load_checkpoint(teacher)["train"]
        trained.update({k: getattr(args, k) for k in ("eval_per_family", "max_new_tokens") if getattr(args, k) is not None})
        try:
            runs.append((out, run_world(out, args.data), trained))
        except (ValueError, FileNotFoundError) as e:  # the data folder: missing, or bad manifests or clips
            sys.exit(f"--out {out}: {e}" + ("" if args.data else " (give the data folder with --data)"))
    if args.first_token:
        seeds = [first_token_probe(out, world, device, s["val_per_family"]) for out, world, s in runs]
        fams = list(next(iter(seeds[0].values())))
        print("P(first token = the teacher's), % (mean over val prompts" + (", ± se over seeds)" if len(seeds) > 1 else ")"))
        print("| model | " + " | ".join(f"{f} S | {f} T" for f in fams) + " |\n|---|" + "---|---|" * len(fams))
        for name in (n for n in seeds[0] if all(n in s for s in seeds)):  # runs of every seed, as in the tables
            print(f"| {label(name)} | " + " | ".join(fmt([s[name][f][i] for s in seeds]) for f in fams for i in (0, 1)) + " |")
        return
    if args.hearing:
        seeds = [hearing_probe(out, world, device, s["eval_per_family"], s["max_new_tokens"]) for out, world, s in runs]
        print("WER % on the test transcription clips" + (" (mean ± se over seeds)" if len(seeds) > 1 else ""))
        print("| reads the words with | spoken prompts | word lists | all clips | spoken prompts read whole (%) "
              "| word lists of the training clips |\n|---|---|---|---|---|---|")
        for row in seeds[0]:
            print(f"| {row} | " + " | ".join(fmt([s[row][k] for s in seeds]) for k in ("prompts", "lists", "all", "whole", "train lists")) + " |")
        seeds = [heard_split(out, world, device, s["eval_per_family"], s["max_new_tokens"]) for out, world, s in runs]
        fams = list(seeds[0]["heard"])
        print("\nTest prompts the base student transcribes whole from their clips (%): " +
              ", ".join(f"{f} {fmt([s['heard'][f] for s in seeds])}" for f in fams) + "; each student's score from speech "
              "on those and on the rest (%), and its ΔS on either part (heard_split)")
        print("| model | " + " | ".join(f"{f} S heard | {f} S misheard" for f in fams) + " | ΔS | ΔS heard | ΔS misheard |\n"
              "|---|" + "---|---|" * len(fams) + "---|---|---|")
        for name in (n for n in seeds[0] if n != "heard" and all(n in s for s in seeds)):
            print(f"| {label(name)} | " + " | ".join(fmt([s[name][k][f] for s in seeds]) for f in fams for k in ("S heard", "S misheard"))
                  + " | " + " | ".join(fmt([s[name][k] for s in seeds], 2) for k in ("ΔS", "ΔS heard", "ΔS misheard")) + " |")
        return
    for out, world, s in runs:
        evaluate_all(out, world, device, s["eval_per_family"], s["max_new_tokens"])
    # one folder: its tables beside its runs; several seeds: in the folder that holds them all
    report(args.out, args.out[0] if len(args.out) == 1 else os.path.commonpath([os.path.abspath(o) for o in args.out]))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted. The scores written so far (each model's eval.json) are kept: run the same command "
              "again to score the rest.", file=sys.stderr)
        sys.exit(130)
