"""
Score runs on the toy benchmarks, from speech (S) and from text (T), and build the paper's tables.

    python eval.py --out runs/cpu                 # score what the run folder holds; the tables
    python eval.py --out runs/s0 runs/s1 runs/s2  # one folder per seed: mean ± t 95 %
    python eval.py --out runs/cpu --first_token   # do the students start answers as the teacher?
    python eval.py --out runs/cpu --explain 3     # X-OPD's per-token signal on 3 val prompts
    python eval.py --out runs/cpu --hearing       # where the base student's transcripts lose words
    python eval.py --out runs/s0 runs/s1 --premise  # the premise alone, on val (test unread)

The tables: the premise (PREMISE), the paper's Tables 1 to 3 (TABLES); ΔS / ΔT is the paper's
"Avg. Drop", the mean relative drop over families against the text teacher's T (avg_drop).
"""
import argparse
import glob
import itertools
import json
import math
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer

import data
import model as M
import xopd

NAN = float("nan")

# -----------------------------------------------------------------------------
# Metrics

def relative_drop(score, reference):
    """(reference - score) / reference, in percent: the paper's per-benchmark drop."""
    return 100.0 * (reference - score) / reference if reference > 0 else NAN


def avg_drop(scores, reference):
    """Mean relative drop over the families that both dicts score (ΔS or ΔT)."""
    fams = [f for f in reference if f in scores]
    if not fams:
        return NAN
    return sum(relative_drop(scores[f], reference[f]) for f in fams) / len(fams)


# -----------------------------------------------------------------------------
# Scoring one model

def test_sets(world, per_family, pool="test"):
    """The first `per_family` records of every family of a pool, split into text and audio skills
    (the toy's val pool has text skills only)."""
    recs = getattr(world, pool)
    return data.text_families(recs, per_family), data.text_families(recs, per_family, "audio")


def wer_by_speaker(recs, preds, speakers, key, reference=lambda text: text):
    """{key: WER % against reference(transcript); key_seen / key_unseen: speakers' / others'}."""
    wers = [(data.wer(reference(r["transcript"]), p), r["voice"].get("speaker") in speakers)
            for r, p in zip(recs, preds)]
    out = {key: 100.0 * sum(w for w, _ in wers) / len(wers)}
    for suffix, want in (("_seen", True), ("_unseen", False)):
        part = [w for w, seen in wers if seen == want]
        if part:
            out[key + suffix] = 100.0 * sum(part) / len(part)
    return out


def transcripts(model, world, recs, device, max_new_tokens, encoder=None):
    """A speech model's transcripts of recs' clips (each asked to transcribe), as spoken words."""
    asks = [{**r, "instruction": data.AUDIO_INSTRUCTIONS["asr"]} for r in recs]
    return [data.spoken_words(p) for p in xopd.generate(model, world, asks, "speech", device,
                                                        max_new_tokens, encoder=encoder)]


def evaluate_model(model, world, device, per_family, max_new_tokens, name="eval", pool="test"):
    """{"T" / "S": {family: score}, "items": {"T" / "S": {family: each prompt's score}}, "audio":
    {task: score}, "asr_wer" (and _seen / _unseen: the training speakers' clips / the others'),
    "examples": [...]}, with a progress line. On val a speech model also transcribes the spoken
    prompts: "prompt_wer" (_seen / _unseen) and "misheard", the % it does not transcribe whole."""
    model.eval()
    text, audio = test_sets(world, per_family, pool)
    speech = not isinstance(model, M.Decoder)
    audio = audio if speech else {}
    progress = data.Progress("eval", f"{name} scored", len(text) + len(audio), unit="parts")
    res, examples = {"T": {}, "S": {}, "audio": {}, "items": {"T": {}, "S": {}}}, []
    for i, (fam, recs) in enumerate(text.items()):
        for mod in ("text", "speech") if speech else ("text",):
            preds = xopd.generate(model, world, recs, mod, device, max_new_tokens)
            key = "T" if mod == "text" else "S"
            res["items"][key][fam] = [data.score(r, p) for r, p in zip(recs, preds)]
            res[key][fam] = 100.0 * sum(res["items"][key][fam]) / len(recs)
            examples.append({"family": fam, "modality": mod, "prompt": recs[0]["transcript"],
                             "prediction": preds[0], "answer": recs[0]["answer"]})
        progress(i + 1)
    for i, (task, recs) in enumerate(audio.items()):
        preds = xopd.generate(model, world, recs, "speech", device, max_new_tokens)
        progress(len(text) + i + 1)
        if task == "asr":
            res.update(wer_by_speaker(recs, preds, world.train_speakers, "asr_wer"))
        else:
            res["audio"][task] = 100.0 * sum(map(data.score, recs, preds)) / len(recs)
    if speech and pool == "val" and text:  # the prompts' hearing, as the paper's ASR filter
        prompts = [r for rs in text.values() for r in rs]
        said = transcripts(model, world, prompts, device, max_new_tokens)
        res.update(wer_by_speaker(prompts, said, world.train_speakers, "prompt_wer",
                                  data.spoken_words))
        whole = sum(p == data.spoken_words(r["transcript"]) for r, p in zip(prompts, said))
        res["misheard"] = 100.0 - 100.0 * whole / len(prompts)
    res["examples"] = examples
    return res


@torch.no_grad()
def judge(teacher, student, world, device, max_new_tokens, per_family=None, seed=0, batch_size=64):
    """Can the text teacher judge the student's answers from speech? On val prompts, per family,
    in nats per token (end token included): the teacher's log-prob of the student's greedy
    answers ("teacher_lp"; "_right" / "_wrong": of the right / wrong ones), xopd.sampled_rkl on
    one answer per prompt sampled at temperature 1 ("rkl_cm_by_family"; "rkl_cm": pooled)."""
    teacher.eval()
    student.eval()
    gen = torch.Generator(device).manual_seed(seed)
    sums = {}  # (key, family) -> [nats, tokens]

    def add(key, fam, nats, mask):
        acc = sums.setdefault((key, fam), [0.0, 0])
        acc[0] += float(nats.sum())
        acc[1] += int(mask.sum())
    kw = dict(terms=("cm",), n=1, max_new_tokens=max_new_tokens, eos_id=world.end_id, generator=gen)
    for fam, recs in data.text_families(world.val, per_family).items():
        for i in range(0, len(recs), batch_size):
            rows = recs[i:i + batch_size]
            b = world.batch(rows, device=device, encoder=student.encoder)
            _, greedy = xopd.student_rollouts(student, b, temperature=0.0, **kw)
            _, sampled = xopd.student_rollouts(student, b, temperature=1.0, **kw)
            ids, mask, _ = greedy["cm"]
            t_lp = xopd.teacher_logprobs(teacher, b, greedy, n=1)["cm"] * mask  # (B, L)
            right = torch.tensor([data.score(r, world.decode(row)) == 1.0
                                  for r, row in zip(rows, ids.tolist())])
            add("teacher_lp", fam, t_lp, mask)
            add("teacher_lp_right", fam, t_lp[right], mask[right])
            add("teacher_lp_wrong", fam, t_lp[~right], mask[~right])
            _, mask, s_lp = sampled["cm"]
            t_lp = xopd.teacher_logprobs(teacher, b, sampled, n=1)["cm"]
            add("rkl_cm_by_family", fam, xopd.sampled_rkl(s_lp, t_lp, mask), mask)
    res = {}
    for (key, fam), (nats, tokens) in sums.items():
        if tokens:
            res.setdefault(key, {})[fam] = nats / tokens
    pooled = [v for (k, _), v in sums.items() if k == "rkl_cm_by_family"]
    res["rkl_cm"] = sum(n for n, _ in pooled) / max(1, sum(t for _, t in pooled))
    return res


def evaluate_encoder(m, world, device, per_task, batch_size=64):
    """A pretrained model.CTCEncoder alone on the test clips (perception before any decoder):
    greedy CTC WER (all, seen and unseen speakers), the voice heads' accuracy per question."""
    m.eval()
    res = {"voice": {}}
    for task, recs in test_sets(world, per_task)[1].items():
        preds, voice = [], {}
        for i in range(0, len(recs), batch_size):
            mels, mel_lens = data.collate_mels([world.mel(r) for r in recs[i:i + batch_size]])
            logp, lens, v = m.heads(mels.to(device), mel_lens.to(device))
            preds += M.ctc_greedy(logp, lens)
            for k, logits in v.items():
                voice.setdefault(k, []).extend(logits.argmax(-1).tolist())
        if task == "asr":  # against the transcript as spoken (a doubled letter once)
            res.update(wer_by_speaker(recs, preds, world.train_speakers, "ctc_wer",
                                      M.spoken_letters))
            res["example"] = {"transcript": recs[0]["transcript"], "ctc": preds[0]}
        elif task in M.VOICE_CLASSES:
            right = sum(M.VOICE_CLASSES[task][p] == r["answer"] for r, p in zip(recs, voice[task]))
            res["voice"][task] = 100.0 * right / len(recs)
    return res


# -----------------------------------------------------------------------------
# Run folders: what they hold, what they were made from, and the scores cached in them

# The settings two seeds of one run may differ in (check_runs)
BESIDE_THE_RUN = ("out", "data", "seed", "resume", "ckpt_every", "log_every", "eval_per_family")


def run_dirs(out):
    """Every finished run under out: teacher, omni (the base student), align/<name>."""
    aligned = sorted(os.path.relpath(p, out) for p in glob.glob(os.path.join(out, "align", "*")))
    return {name: os.path.join(out, name) for name in ["teacher", "omni"] + aligned
            if os.path.exists(os.path.join(out, name, "model.pt"))}


def load(run_dir, device):
    """The model a run folder holds, on device, in eval mode."""
    return M.load_model(os.path.join(run_dir, "model.pt"), device)[0].eval()


def run_world(out, data_dir=None):
    """The World of the run in folder out as train.py built it (world_of, with the n_mels of the
    run's speech encoder), from any directory. Refused when its tokenizer is not the run's."""
    ckpts = {name: M.load_checkpoint(os.path.join(d, "model.pt"))
             for name, d in run_dirs(out).items() if name in ("teacher", "omni")}
    settings = ckpts["teacher"]["train"]
    settings = {**settings, **{k: data.run_path(settings, k, out) for k in data.RUN_PATHS}}
    enc = ckpts["omni"]["configs"]["encoder"] if "omni" in ckpts else {}
    world = data.world_of(settings, enc.get("n_mels", data.N_MELS), data_dir)
    tokenizer = os.path.join(settings["teacher"] or data_dir or settings["data"], "tokenizer.json")
    for name, ckpt in ckpts.items():
        if ckpt.get("tokenizer", world.tok.to_str()) != world.tok.to_str():
            raise ValueError(
                f"{tokenizer} is not the tokenizer {os.path.join(out, name, 'model.pt')} was "
                f"trained with (vocabularies of {world.tok.get_vocab_size()} and "
                f"{Tokenizer.from_str(ckpt['tokenizer']).get_vocab_size()} tokens); expected "
                "the one of the run's own data folder")
    world.check_clips(data.encoder_seconds(enc.get("n_ctx", M.EncoderConfig.n_ctx)))
    return world


def check_runs(outs):
    """Several --out folders, the seeds of one table: refused when two are one folder, or when a
    run was trained with other settings (BESIDE_THE_RUN aside) than the same run of another."""
    seen = {}
    for out in outs:
        first = seen.setdefault(os.path.realpath(out), out)
        if first != out:
            raise ValueError(f"{first} and {out} are the same run folder: give each seed's once")

    def settings(ckpt):  # train's per stage, else the checkpoint's whole "train"
        got = ckpt.get("fingerprint", {}).get("settings", ckpt["train"])
        return {k: v for k, v in got.items() if k not in BESIDE_THE_RUN}
    made = [{name: settings(M.load_checkpoint(os.path.join(d, "model.pt")))
             for name, d in run_dirs(out).items()} for out in outs] if len(outs) > 1 else []
    for out, runs in zip(outs[1:], made[1:]):
        for name in (n for n in made[0] if n in runs):
            a, b = made[0][name], runs[name]
            diff = "; ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}"
                             for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
            if diff:
                raise ValueError(f"{name} of {outs[0]} and of {out} were trained with other "
                                 f"settings ({diff}): a table's cells are the seeds of one run")


def cached(path, model_pt, key, name, fields):
    """The scores in eval.json at path when their fingerprint is key's and they are newer than
    the checkpoint; else None, with a line saying why (none for a missing eval.json)."""
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(model_pt):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
    except (ValueError, UnicodeDecodeError):
        res = None
    if not isinstance(res, dict) or any(k not in res for k in fields):
        print(f"[eval] {name}: {path} is unreadable or incomplete: scoring again")
        return None
    if res.get("fingerprint") == data.fingerprint(key):
        return res
    old = res.get("settings", {})
    diff = "; ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in key.items() if old.get(k) != v)
    print(f"[eval] {name}: {path} was scored with other settings ({diff}): scoring again")
    return None


def evaluate_all(out, world, device, per_family, max_new_tokens):
    """Score every finished run and the pretrained encoder alone, unless their eval.json is
    cached; a student is also judged by the run's teacher on the val prompts (judge)."""
    teacher_pt = os.path.join(out, "teacher", "model.pt")
    teacher_id, teacher = M.load_checkpoint(teacher_pt).get("fingerprint_id"), None
    encoder = os.path.join(out, "encoder")
    runs = {"encoder": encoder} if os.path.exists(os.path.join(encoder, "model.pt")) else {}
    for name, d in (runs | run_dirs(out)).items():
        path, ckpt, alone = os.path.join(d, "eval.json"), os.path.join(d, "model.pt"), d == encoder
        # what the scores are made from (eval.json's fingerprint); the encoder has no judge
        key = {"model": M.load_checkpoint(ckpt).get("fingerprint_id"),
               "teacher": None if alone else teacher_id, "data": world.digest(("test", "val")),
               "per_family": per_family, "max_new_tokens": None if alone else max_new_tokens}
        premise = name in ("teacher", "omni")  # scored on val too: the premise's rows
        need = ("voice",) if alone else ("T", "S", "audio", "items") + ("val",) * premise
        old = cached(path, ckpt, key, name, need)
        if old and (alone or "judge" in old or not old["S"]):  # a student is judged too
            continue
        m, _ = M.load_model(ckpt, device)
        res = (evaluate_encoder(m, world, device, per_family) if alone else
               evaluate_model(m, world, device, per_family, max_new_tokens, name))
        if premise:
            val = evaluate_model(m, world, device, per_family, max_new_tokens, name, "val")
            res["val"] = {k: v for k, v in val.items() if k not in ("items", "examples")}
        if isinstance(m, M.SpeechLM):
            teacher = teacher or M.load_model(teacher_pt, device)[0]
            res["judge"] = judge(teacher, m, world, device, max_new_tokens)
        res.update(settings=key, fingerprint=data.fingerprint(key))
        M.atomic_write(path, lambda f: json.dump(res, f, indent=1))
        if not alone:
            print(f"[eval] {name}: T {fmt_scores(res['T'])} | S {fmt_scores(res['S'])}")
            continue
        wer = (f"greedy CTC WER {res['ctc_wer']:.1f} % (seen speakers "
               f"{res.get('ctc_wer_seen', NAN):.1f}, unseen {res.get('ctc_wer_unseen', NAN):.1f})"
               if "ctc_wer" in res else "no transcription clips (task asr)")
        print(f"[eval] encoder on its own, test clips: {wer}; voice heads "
              f"{fmt_scores(res['voice'])}")


def fmt_scores(d):
    return " ".join(f"{k} {v:.1f}" for k, v in d.items()) or "-"


# -----------------------------------------------------------------------------
# Probes: where the gap from speech comes from

@torch.no_grad()
def first_token_probe(out, world, device, per_family):
    """Does each student start its answers as its teacher does? On val prompts, the probability
    (%) of the teacher's greedy first token from text under every student, from speech and from
    text. -> {run: {family: (p from speech, p from text)}}"""
    runs = run_dirs(out)
    teacher = load(runs.pop("teacher"), device)
    fams = data.text_families(world.val, per_family)
    last = xopd.last_hidden  # (B, T, d) -> (B, d) at each row's last prompt position
    first = {}
    for fam, rs in fams.items():
        b = world.batch(rs, device=device, speech=False)
        first[fam] = teacher.logits(last(teacher(b.text_ids), b.text_lens)).argmax(-1)  # (B,)
    res = {}
    for name, d in runs.items():
        m = load(d, device)
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
def hearing_probe(out, world, device, per_task, max_new_tokens, batch_size=64):
    """Where are words lost between a clip and the base student's transcript? The WER on the test
    clips of spoken prompts and of word lists (no language model can guess them), and on as many
    training word lists, of: the encoder's greedy CTC alone, the adapter alone (each word's
    best-scoring token, no decoder), the base student, the text teacher copying the transcript.
    "whole": % of spoken prompts read whole."""
    student = load(os.path.join(out, "omni"), device)
    teacher = load(os.path.join(out, "teacher"), device)
    pools = world.train + world.align + world.val + world.test
    prompts = {r["transcript"] for r in pools if r["kind"] == "text"}
    test = test_sets(world, per_task)[1]["asr"]
    lists = [r for r in world.train if r["task"] == "asr" and r["transcript"] not in prompts]
    recs = test + lists[:len(test)]
    copy = [{**r, "transcript": f"repeat the words : {data.spoken_words(r['transcript'])} .",
             "instruction": ""} for r in recs]
    ctc, adapter = [], []
    for i in range(0, len(recs), batch_size):
        rows = recs[i:i + batch_size]
        mels, mel_lens = data.collate_mels([world.mel(r) for r in rows])
        _, lens, logp = student.encoder.frames(mels.to(device), mel_lens.to(device))
        ctc += M.ctc_greedy(logp, lens)
        b = world.batch(rows, device=device, text=False, encoder=student.encoder)
        _, n, logits = student.adapter(b.feats, b.feat_lens, student.decoder.embed_tokens.weight)
        adapter += [world.tok.decode(w[:k - 1])  # each word's best-scoring token
                    for w, k in zip(logits.argmax(-1).tolist(), n.tolist())]
    hyps = {"audio encoder alone, greedy CTC": ctc,
            "adapter's word scores alone (best token per word)": adapter}
    hyps["base student, from speech"] = xopd.generate(student, world, recs, "speech", device,
                                                      max_new_tokens, encoder=student.encoder)
    hyps["text teacher, copying the transcript from text"] = xopd.generate(
        teacher, world, copy, "text", device, max_new_tokens)
    res = {}
    for row, preds in hyps.items():
        ref = ((lambda t: M.spoken_letters(data.spoken_words(t)))
               if row.startswith("audio encoder") else data.spoken_words)
        wers = [(data.wer(ref(r["transcript"]), data.spoken_words(p)), r["transcript"] in prompts)
                for r, p in zip(recs, preds)]
        wers, train = wers[:len(test)], wers[len(test):]
        parts = (("prompts", [x for x in wers if x[1]]), ("lists", [x for x in wers if not x[1]]),
                 ("all", wers), ("train lists", train))
        res[row] = {k: 100.0 * sum(w for w, _ in part) / max(1, len(part)) for k, part in parts}
        whole = sum(w == 0 for w, p in wers if p)
        res[row]["whole"] = 100.0 * whole / max(1, sum(p for _, p in wers))
    return res


@torch.no_grad()
def heard_split(out, world, device, per_family, max_new_tokens):
    """How much of each student's ΔS is hearing? The test prompts split by whether the base
    student transcribes their clip whole (the audio side is frozen after omni: every student
    hears the same): each student's score from speech ("S heard" / "S misheard", per family) and
    ΔS ("ΔS", "ΔS heard", "ΔS misheard"); "heard": {family: % heard whole}."""
    runs = run_dirs(out)
    teacher = load(runs.pop("teacher"), device)
    base = load(runs["omni"], device)
    fams = test_sets(world, per_family)[0]

    def gen(model, recs, modality):
        return xopd.generate(model, world, recs, modality, device, max_new_tokens)
    heard = {f: [p == data.spoken_words(r["transcript"]) for r, p in
                 zip(rs, transcripts(base, world, rs, device, max_new_tokens))]
             for f, rs in fams.items()}

    def scores(model, modality):
        return {f: [data.score(r, p) for r, p in zip(rs, gen(model, rs, modality))]
                for f, rs in fams.items()}

    def on(xs, part):  # {family: % right} on one part of the split (nan: no prompt)
        sel = {f: [x for x, h in zip(xs[f], heard[f]) if part is None or h == part] for f in xs}
        return {f: 100.0 * sum(v) / len(v) if v else NAN for f, v in sel.items()}
    teacher_T = scores(teacher, "text")
    res = {"heard": {f: 100.0 * sum(h) / len(h) for f, h in heard.items()}}
    for name, d in runs.items():
        S = scores(base if name == "omni" else load(d, device), "speech")
        res[name] = {"S heard": on(S, True), "S misheard": on(S, False)}
        for key, part in (("ΔS", None), ("ΔS heard", True), ("ΔS misheard", False)):
            res[name][key] = avg_drop(on(S, part), on(teacher_T, part))
    return res


@torch.no_grad()
def explain(out, world, device, n_prompts, max_new_tokens, seed=0):
    """X-OPD's signal, token by token: the base student's answers from speech to the first
    n_prompts val prompts (the families in turn), sampled at temperature 1, and per token the
    student's log-prob from speech and from text, the teacher's from text, and the advantages
    A_cm (Eq. 2) and A_im (Eq. 1) on those tokens (in training A_im scores the student's own
    rollouts from text). -> [{"record", "tokens", "S", "T", "teacher", "A_cm", "A_im"}]"""
    student = load(os.path.join(out, "omni"), device)
    teacher = load(os.path.join(out, "teacher"), device)
    fams = data.text_families(world.val).values()
    recs = [r for group in itertools.zip_longest(*fams) for r in group if r][:n_prompts]
    if not recs:
        sys.exit(f"--explain: {world.dir}/val.jsonl holds no spoken prompts to explain")
    b = world.batch(recs, device=device, encoder=student.encoder)
    gen = torch.Generator(device).manual_seed(seed)
    prompts, rollouts = xopd.student_rollouts(student, b, terms=("cm",), n=1, eos_id=world.end_id,
                                              max_new_tokens=max_new_tokens, generator=gen)
    ids, mask, _ = rollouts["cm"]  # (B, L)
    lp = {"teacher": xopd.teacher_logprobs(teacher, b, rollouts, n=1)["cm"]}
    for key, (emb, lens) in (("S", prompts["cm"]), ("T", xopd.prompt_embeds(student, b, "text"))):
        lp[key] = xopd.sequence_logprobs(student.decoder, emb, lens, ids, mask)
    lp["A_cm"], lp["A_im"] = lp["teacher"] - lp["S"], lp["teacher"] - lp["T"]
    return [{"record": r, "tokens": [world.tok.id_to_token(t) for t in ids[i][mask[i]].tolist()],
             **{k: v[i][mask[i]].tolist() for k, v in lp.items()}} for i, r in enumerate(recs)]


# -----------------------------------------------------------------------------
# Tables

def label(name):
    return {"teacher": "text teacher (T only)", "omni": "base student"}.get(
        name, name.replace("align/", ""))


def mean_se(xs):
    """Mean and standard error of the mean (sample std / sqrt(n)); se is nan for one value."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, NAN
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


def t_within(t, df):
    """P(|T| <= t) for Student's t with integer df degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3-4): a finite series in cos(θ), θ = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, series = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(1 + df % 2, df - 1, 2):  # odd df: 2/3, 2·4/(3·5)...; even: 1/2, 1·3/(2·4)...
        term *= c2 * k / (k + 1)
        series += term
    if df % 2 == 0:
        return math.sin(theta) * series
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0))


def t_quantile(q, df):
    """The two-sided critical value: P(|T| <= t) = q (bisection on t_within)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < q else (lo, mid)
    return lo


def holm(ps):
    """Holm's step-down adjusted p-values, in the order given: the k-th smallest p times the
    number of hypotheses left, never below an earlier one's, at most 1."""
    adjusted, running = [1.0] * len(ps), 0.0
    for k, i in enumerate(sorted(range(len(ps)), key=ps.__getitem__)):
        running = max(running, min(1.0, (len(ps) - k) * ps[i]))
        adjusted[i] = running
    return adjusted


def fmt(xs, digits=1):
    """One table cell from the per-seed values: 'mean' for one seed, else 'mean ± h', h the
    half-width of the t-based 95 % interval of the mean."""
    m, se = mean_se(xs)
    if len(xs) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {t_quantile(0.95, len(xs) - 1) * se:.{digits}f}"


def drops(seeds, name, modality):
    """ΔS or ΔT of run `name` in every seed, each against that seed's own text teacher."""
    return [avg_drop(r[name][modality], r["teacher"]["T"]) for r in seeds]


def bootstrap_drops(seeds, runs, draws=10_000, seed=0):
    """A paired bootstrap over seeds and test prompts: each of `draws` resamples draws the seeds
    with replacement and, within each drawn seed, every family's prompts with replacement (the
    same prompts for every model); each (run, modality) of runs gets its ΔS / ΔT on it, averaged
    over the drawn seeds, from eval.json's "items". -> {(run, modality): (draws,) array}"""
    rng, n = np.random.default_rng(seed), len(seeds)
    pick = rng.integers(0, n, (draws, n))  # the seed in each of a resample's n places
    out = {c: np.zeros(draws) for c in runs}
    for place in range(n):
        for s, r in enumerate(seeds):
            rows = pick[:, place] == s
            teacher = r["teacher"]["items"]["T"]
            for fam, t in teacher.items():  # counts of each prompt in the rows' resamples
                w = rng.multinomial(len(t), np.full(len(t), 1 / len(t)), int(rows.sum()))
                ref = w @ np.asarray(t)  # the teacher's T on the resample, times len(t)
                for name, mod in runs:
                    score = w @ np.asarray(r[name]["items"][mod][fam])
                    out[(name, mod)][rows] += 100 * (ref - score) / ref / len(teacher) / n
    return out


def markdown(header, rows):
    """A markdown table: the header, a rule, a line per row of cells (an empty cell is blank)."""
    lines = [header, "|---|" + "---|" * (header.count("|") - 2)]
    return "\n".join(lines + ["|" + "".join(f" {c} |" if c else " |" for c in row) for row in rows])


def val_drop(r, modality):
    """The base student's ΔS or ΔT on the val pool (against the teacher's T on val)."""
    return avg_drop(r["omni"]["val"][modality], r["teacher"]["val"]["T"])


# The premise, the paper's setting in miniature, on the val pool (the test pool serves the tables
# alone): a strong text teacher; a base student that hears the prompts but answers worse from
# speech than its backbone, a little worse from text; a teacher that can judge the student
# (judge). The audio questions, which the val pool lacks, are Table 3's. Name, value from one
# seed's results, target, test of the seeds' mean (and of the seeds).
PREMISE = [
    ("text teacher, worst family from text (%)",
     lambda r: min(r["teacher"]["val"]["T"].values(), default=NAN), ">= 90", lambda v, _: v >= 90),
    ("base student's transcripts of the spoken prompts, WER, seen speakers (%)",
     lambda r: r["omni"]["val"].get("prompt_wer_seen", NAN), "<= 10", lambda v, _: v <= 10),
    ("base student's transcripts of the spoken prompts, WER, unseen speakers (%)",
     lambda r: r["omni"]["val"].get("prompt_wer_unseen", NAN), "<= 15", lambda v, _: v <= 15),
    ("spoken prompts the base student does not transcribe whole (%)",
     lambda r: r["omni"]["val"].get("misheard", NAN), "<= 5", lambda v, _: v <= 5),
    ("base student ΔS (%)", lambda r: val_drop(r, "S"), "8 to 25", lambda v, _: 8 <= v <= 25),
    ("base student ΔT (%)", lambda r: val_drop(r, "T"), "> 0 and <= ΔS / 2",
     lambda v, seeds: 0 < v <= sum(val_drop(r, "S") for r in seeds) / len(seeds) / 2),
    ("teacher's log-prob per token of the base student's greedy answers from speech, worst "
     "family (nats)", lambda r: min(r["omni"].get("judge", {}).get("teacher_lp", {"-": NAN})
                                    .values()), ">= -3", lambda v, _: v >= -3),
    ("base student's per-token cross-modal reverse KL to the teacher (nats)",
     lambda r: r["omni"].get("judge", {}).get("rkl_cm", NAN), "<= 3", lambda v, _: v <= 3),
]


def premise(seeds):
    """The premise table's rows [(name, per-seed values, target, met)] from per-seed results
    ({run name: eval.json contents}, one dict per seed). A row is met when the mean meets it."""
    vals = [[value(r) for r in seeds] for _, value, _, _ in PREMISE]
    return [(name, v, target, test(sum(v) / len(v), seeds))
            for (name, _, target, test), v in zip(PREMISE, vals)]


def premise_table(seeds, names):
    if "omni" in names:
        rows = [(n, fmt(v), t, "yes" if ok else "NO") for n, v, t, ok in premise(seeds)]
        return markdown("| premise (val pool) | value | target | met |", rows)


def table1(seeds, names):
    fams = list(seeds[0]["teacher"]["T"])

    def cell(n, modality, f):  # the teacher has no S
        return fmt([r[n][modality][f] for r in seeds]) if f in seeds[0][n][modality] else "-"
    rows = [[label(n), *(cell(n, m, f) for f in fams for m in "ST"),
             fmt(drops(seeds, n, "S"), 2) if seeds[0][n]["S"] else "-",
             fmt(drops(seeds, n, "T"), 2)] for n in names]
    head = "| model | " + " | ".join(f"{f} S | {f} T" for f in fams) + " | ΔS | ΔT |"
    return markdown(head, rows)


XOPD = "align/xopd"
COMPARED = ("omni", "align/kd", "align/gkd", "align/sft", "align/xopd_lam0", "align/xopd_lam1")


def comparisons(seeds, names):
    """docs/protocol.md's named comparisons among the runs present: X-OPD's ΔS, then ΔT, minus
    each other run's; X-OPD's ΔS minus a third of the base student's. Each: the seeds' paired
    mean, its t-based 95 % interval and p, the Holm-adjusted p over all of them, the paired
    bootstrap's 95 % interval; it holds when both exclude zero. -> [dict]"""
    if XOPD not in names or len(seeds) < 2:
        return []
    named = [(m, n, 1.0) for m in "ST" for n in COMPARED if n in names]
    named += [("S", "omni", 1 / 3)] * ("omni" in names)
    boot = bootstrap_drops(seeds, {(XOPD, m) for m in "ST"} | {(n, m) for m, n, _ in named})
    out, df = [], len(seeds) - 1
    for m, n, share in named:
        d = [a - share * b for a, b in zip(drops(seeds, XOPD, m), drops(seeds, n, m))]
        mean, se = mean_se(d)
        t = abs(mean) / se if se > 0 else (math.inf if mean else 0.0)
        lo, hi = np.percentile(boot[(XOPD, m)] - share * boot[(n, m)], [2.5, 97.5])
        other = f"{'a third of ' if share != 1 else ''}{label(n)}'s"
        out.append({"what": f"Δ{m}: X-OPD's − {other}", "mean": mean,
                    "half": t_quantile(0.95, df) * se, "p": 1 - t_within(t, df),
                    "boot": (float(lo), float(hi))})
    for c, p in zip(out, holm([c["p"] for c in out])):
        c["holm"], c["holds"] = p, p < 0.05 and not c["boot"][0] <= 0 <= c["boot"][1]
    return out


def comparisons_table(seeds, names):
    rows = [(f"C{i}: {c['what']}", f"{c['mean']:.2f} ± {c['half']:.2f}", f"{c['p']:.3f}",
             f"{c['holm']:.3f}", "[{:.2f}, {:.2f}]".format(*c["boot"]),
             f"**X-OPD {'lower' if c['mean'] < 0 else 'higher'}**" if c["holds"] else "no")
            for i, c in enumerate(comparisons(seeds, names), 1)]
    head = "| comparison | paired mean ± t 95 % | p | Holm p | bootstrap 95 % | holds |"
    return markdown(head, rows) if rows else None


def table2(seeds, names):
    runs = ((0.0, "align/xopd_lam0"), (0.5, "align/xopd"), (1.0, "align/xopd_lam1"))
    rows = [[f"{lam:g}", fmt(drops(seeds, n, "S"), 2), fmt(drops(seeds, n, "T"), 2)]
            for lam, n in runs if n in names]
    return markdown("| λ | ΔS | ΔT |", rows) if rows else None


def table3(seeds, names):
    students = [n for n in names if seeds[0][n].get("audio")]
    if "omni" not in students:
        return None
    tasks = list(seeds[0]["omni"]["audio"])

    def avg(r):
        return sum(r["audio"].values()) / len(r["audio"])
    rows = [[label(n), *(fmt([r[n]["audio"][t] for r in seeds]) for t in tasks),
             fmt([avg(r[n]) for r in seeds]), fmt([avg(r[n]) - avg(r["omni"]) for r in seeds]),
             fmt([r[n].get("asr_wer", NAN) for r in seeds])] for n in students]
    head = "| model | " + " | ".join(tasks) + " | audio avg | Δ vs base | ASR WER |"
    return markdown(head, rows)


def curves_table(seeds, names):
    curved = [n for n in names if n.startswith("align/") and all(r[n].get("curve") for r in seeds)]
    if not curved:
        return None
    steps = [c["step"] for c in seeds[0][curved[0]]["curve"]]
    rows = []
    for n in curved:
        def at(key, i):
            return fmt([r[n]["curve"][i][key] for r in seeds], 2 if key.startswith("rkl") else 1)
        rows.append([label(n), *(at("val_S", i) for i in range(len(steps)))]
                    + [f"{at(k, 0)} → {at(k, -1)}" for k in ("val_T", "rkl_im", "rkl_cm")])
    return markdown("| model | " + " | ".join(f"step {k}" for k in steps)
                    + " | val_T first → last | rkl_im first → last | rkl_cm first → last |", rows)


# Each table: its key in tables(), the function that makes it (None: not for these runs), title
TABLES = [
    ("premise", premise_table, "Premise, on the val pool: the paper's setting in miniature (base "
     "student = after the omni stage)"),
    ("table1", table1, "Table 1: text skills from speech (S) and text (T); ΔS / ΔT = mean "
     "relative drop (%) vs the text teacher"),
    ("compared", comparisons_table, "The protocol's comparisons on test (docs/protocol.md), "
     "paired seed by seed; holds: Holm-adjusted p < 0.05 and the bootstrap interval excludes 0"),
    ("table2", table2, "Table 2: λ ablation of X-OPD"),
    ("table3", table3, "Table 3: audio skills (accuracy %, ASR WER %) vs the base student"),
    ("curves", curves_table, "The align stage's val curves: score from speech (%, val prompts) at "
     "each val step; score from text; reverse-KL estimates (nats per response)"),
]


def tables(seeds):
    """TABLES as markdown from per-seed results ({run name: eval.json contents}): a cell is the
    mean ± the t-based 95 % interval's half-width over seeds, of the runs present in every seed."""
    seeds = [r for r in seeds if "teacher" in r]
    names = [n for n in seeds[0] if all(n in r for r in seeds)] if seeds else []
    made = {key: make(seeds, names) for key, make, _ in TABLES} if seeds else {}
    return {key: t for key, t in made.items() if t is not None}


def report(outs, write_to=None):
    """Print the tables of one run folder, or of several (one per seed: mean ± t 95 %),
    and write them as tables.md and tables.json into write_to (default: the first folder)."""
    outs = [outs] if isinstance(outs, str) else list(outs)
    seeds = [{} for _ in outs]  # per seed: {run name: eval.json, an align run's val.jsonl curve}
    for results, out in zip(seeds, outs):
        for name, d in run_dirs(out).items():
            if os.path.exists(os.path.join(d, "eval.json")):
                with open(os.path.join(d, "eval.json")) as f:
                    results[name] = json.load(f)
                if name.startswith("align/") and os.path.exists(os.path.join(d, "val.jsonl")):
                    with open(os.path.join(d, "val.jsonl")) as f:
                        results[name]["curve"] = [json.loads(ln) for ln in f if ln.strip()]
    t = tables(seeds)
    head = f"{len(outs)} seed(s): " + ", ".join(outs)
    if len(outs) > 1:
        head += "; cells are mean ± the half-width of the t-based 95 % interval over seeds"
    md = head + "\n\n" + "\n\n".join(f"### {title}\n\n{t[k]}" for k, _, title in TABLES if k in t)
    print(md)
    dest = write_to or outs[0]
    M.atomic_write(os.path.join(dest, "tables.md"), lambda f: f.write(md + "\n"))
    results = [{n: {k: v for k, v in r.items() if k not in ("examples", "items")}
                for n, r in s.items()}
               for s in seeds]
    summary = {"runs": outs, "results": results, "tables": t}
    M.atomic_write(os.path.join(dest, "tables.json"), lambda f: json.dump(summary, f, indent=1))
    return t


# -----------------------------------------------------------------------------
# Command line: the tables (default), --premise, --first_token, --hearing, --explain

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, nargs="+", help="run folder(s) written by train.py; "
                    "several (one per seed) give mean ± the t-based 95 % interval")
    ap.add_argument("--data", help="data folder (default: the one each run was trained on)")
    ap.add_argument("--eval_per_family", type=int,
                    help="test prompts per family (default: the run's)")
    ap.add_argument("--max_new_tokens", type=int, help="answer length limit (default: the run's)")
    ap.add_argument("--explain", type=int, metavar="N", help="instead of the tables: the base "
                    "student's sampled answers from speech to N val prompts, per token both "
                    "models' log-probs and X-OPD's advantages A_cm, A_im (explain)")
    ap.add_argument("--first_token", action="store_true", help="instead of the tables: the "
                    "probability (%%) that each student starts its answer with its teacher's first "
                    "token, from speech and from text, on val prompts (first_token_probe)")
    ap.add_argument("--premise", action="store_true", help="instead of the tables: the premise "
                    "table alone, from the val pool (the test pool is not scored)")
    ap.add_argument("--hearing", action="store_true", help="instead of the tables: where the "
                    "base student loses words (hearing_probe), and each student's ΔS on the "
                    "prompts the base student hears whole and on the rest (heard_split)")
    return ap, ap.parse_args(argv)


def load_runs(ap, args):
    """[(folder, its World, its settings)] per --out folder: what the flags leave out, as the
    run was trained. A folder refused by check_runs or run_world ends the program in one line."""
    teachers = [os.path.join(out, "teacher", "model.pt") for out in args.out]
    for out, teacher in zip(args.out, teachers):
        if not os.path.exists(teacher):
            ap.error(f"--out: {out} holds no finished teacher ({teacher}); run train.py first")
    try:
        check_runs(args.out)
    except ValueError as e:
        sys.exit(f"--out: {e}")
    given = {k: getattr(args, k) for k in ("eval_per_family", "max_new_tokens")
             if getattr(args, k) is not None}
    runs = []
    for out, teacher in zip(args.out, teachers):
        trained = M.load_checkpoint(teacher)["train"] | given
        try:
            runs.append((out, run_world(out, args.data), trained))
        except (ValueError, FileNotFoundError) as e:  # the data folder: missing, or bad
            hint = "" if args.data else " (give the data folder with --data)"
            sys.exit(f"--out {out}: {e}{hint}")
    return runs


def explain_command(args, runs, device):
    push = lambda a: "up" if a > 0 else "down" if a < 0 else "-"  # the sign of its advantage
    for out, world, s in runs:
        for row in explain(out, world, device, args.explain, s["max_new_tokens"]):
            r = row["record"]
            print(f"\n{r['id']} ({r['task']}): spoken \"{r['transcript']}\"; right answer "
                  f"{r['answer']!r}. The base student's answer from speech, per token:")
            lines = [[tok, *(f"{row[k][t]:+.2f}" for k in ("S", "T", "teacher", "A_cm", "A_im")),
                      push(row["A_cm"][t])] for t, tok in enumerate(row["tokens"])]
            print(markdown("| token | log π_θ from S | log π_θ from T | log π_φ from T | A_cm "
                           "| A_im | X-OPD pushes it |", lines))


def first_token_command(args, runs, device):
    seeds = [first_token_probe(out, world, device, s["val_per_family"]) for out, world, s in runs]
    fams = list(next(iter(seeds[0].values())))
    print("P(first token = the teacher's), % (mean over val prompts"
          + (", ± t 95 % over seeds)" if len(seeds) > 1 else ")"))
    rows = [[label(name), *(fmt([s[name][f][i] for s in seeds]) for f in fams for i in (0, 1))]
            for name in seeds[0] if all(name in s for s in seeds)]  # runs of every seed
    print(markdown("| model | " + " | ".join(f"{f} S | {f} T" for f in fams) + " |", rows))


def hearing_command(args, runs, device):
    seeds = [hearing_probe(out, world, device, s["eval_per_family"], s["max_new_tokens"])
             for out, world, s in runs]
    print("WER % on the test transcription clips"
          + (" (mean ± t 95 % over seeds)" if len(seeds) > 1 else ""))
    keys = ("prompts", "lists", "all", "whole", "train lists")
    print(markdown("| reads the words with | spoken prompts | word lists | all clips | spoken "
                   "prompts read whole (%) | word lists of the training clips |",
                   [[row, *(fmt([s[row][k] for s in seeds]) for k in keys)] for row in seeds[0]]))
    seeds = [heard_split(out, world, device, s["eval_per_family"], s["max_new_tokens"])
             for out, world, s in runs]
    fams = list(seeds[0]["heard"])
    print("\nTest prompts the base student transcribes whole from their clips (%): "
          + ", ".join(f"{f} {fmt([s['heard'][f] for s in seeds])}" for f in fams)
          + "; each student's score from speech on those and on the rest (%), and its ΔS on "
          "either part (heard_split)")
    rows = [[label(name), *(fmt([s[name][k][f] for s in seeds]) for f in fams
                            for k in ("S heard", "S misheard")),
             *(fmt([s[name][k] for s in seeds], 2) for k in ("ΔS", "ΔS heard", "ΔS misheard"))]
            for name in seeds[0] if name != "heard" and all(name in s for s in seeds)]
    print(markdown("| model | " + " | ".join(f"{f} S heard | {f} S misheard" for f in fams)
                   + " | ΔS | ΔS heard | ΔS misheard |", rows))


def premise_command(args, runs, device):
    """The premise alone, the test pool unread: each seed's teacher and base student scored on
    val, the base student judged (as evaluate_all does); the table a world is chosen by."""
    seeds = []
    for out, world, s in runs:
        models = {name: load(os.path.join(out, name), device) for name in ("teacher", "omni")}
        seeds.append({name: {"val": evaluate_model(m, world, device, s["eval_per_family"],
                                                   s["max_new_tokens"], name, "val")}
                      for name, m in models.items()})
        seeds[-1]["omni"]["judge"] = judge(models["teacher"], models["omni"], world, device,
                                           s["max_new_tokens"])
    print(premise_table(seeds, ["omni"]))


def tables_command(args, runs, device):
    for out, world, s in runs:
        evaluate_all(out, world, device, s["eval_per_family"], s["max_new_tokens"])
    # one folder: its tables beside its runs; several seeds: in the folder that holds them all
    common = os.path.commonpath([os.path.abspath(o) for o in args.out])
    report(args.out, args.out[0] if len(args.out) == 1 else common)


def main(argv=None):
    ap, args = parse_args(sys.argv[1:] if argv is None else argv)
    device, _, why = M.pick_device()
    print(f"device: {device} ({why})")
    runs = load_runs(ap, args)
    if args.explain is not None and args.explain < 1:
        ap.error(f"--explain: expected a positive number of val prompts, got {args.explain}")
    command = (explain_command if args.explain else first_token_command if args.first_token
               else hearing_command if args.hearing else premise_command if args.premise
               else tables_command)
    try:
        command(args, runs, device)
    except OSError as e:  # a read-only or full run folder: one line naming the path
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"eval.py: cannot write {where}{e.strerror or e}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted. The scores written so far (each model's eval.json) are kept: run the "
              "same command again to score the rest.", file=sys.stderr)
        sys.exit(130)
