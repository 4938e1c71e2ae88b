"""
The whole X-OPD story, one stage after another (the numbering is the README's):

    1 teacher  train the text decoder on the text skills (chat format)
    2 encoder  pretrain the Whisper-style audio encoder on transcription (character CTC)
    3 omni     the speech LLM (omni_student) trained on a multimodal mix: the "base" student
    4 align    one of sft | kd | gkd | xopd on the same paired prompts, audio side frozen
    5 eval     score every run from speech (S) and text (T); the paper's tables (eval.py)

    python train.py                         # cpu preset, toy data, all stages with xopd, tables
    python train.py --preset tiny           # the same in under a minute
    python train.py --method sft            # another alignment method on the same base
    python train.py --method xopd --lam 0   # the λ ablation
    python train.py --resume                # continue an interrupted stage
    python train.py --teacher DIR --whisper FILE --chat_format FILE --data DIR  # your own models
    torchrun --nproc_per_node 2 train.py ...  # data parallel: each rank a share of every batch

Each stage writes <out>/<stage>/model.pt with the fingerprint of what it was built from and is
skipped when that matches; a step's batch and sampling seed depend only on (seed, step), so a
resumed run reproduces an uninterrupted one.
"""
import argparse
import contextlib
import copy
import errno
import glob
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer

import data
import eval as E
import model as M
import xopd

# -----------------------------------------------------------------------------
# Settings: one dataclass, presets override its defaults, flags override presets.

METHODS = ("sft", "kd", "gkd", "xopd")
# The align stage's rate per method, chosen on seed 0's val prompts by --lr_grid (rate_rule,
# docs/protocol.md §3; the grid's scores: docs/experiments.md). --align_lr overrides it.
ALIGN_LR = {"sft": 3e-5, "kd": 3e-5, "gkd": 1e-4, "xopd": 1e-4}


@dataclass
class TrainConfig:
    preset: str = "cpu"          # model size and step counts: tiny | cpu | gpu
    method: str = "xopd"         # alignment method: sft | kd | gkd | xopd
    out: str = ""                # run folder (default runs/<preset>)
    data: str = ""               # data folder (default <out>/data: toy data, made if absent)
    seed: int = 0
    resume: bool = False
    base_only: bool = False      # stages 1-3 alone: the base student, no align stage or eval
    # your own models (README, "Your own models"): each replaces the stage that would make it
    teacher: str = ""            # a Llama-architecture model folder (Hugging Face layout)
    whisper: str = ""            # an openai-whisper checkpoint (.pt): its encoder, frozen
    chat_format: str = ""        # JSON with the strings of a turn (data.ChatFormat); "": the toy's
    student: str = ""            # a speech LLM checkpoint of this project (model.pt)
    # stages 1-3
    teacher_steps: int = 1500
    teacher_lr: float = 1e-3     # docs/decisions.md says why not higher
    teacher_prior: float = 0.2   # share of targets in the data's other answer style (`reference`)
    encoder_steps: int = 2400    # docs/protocol.md §1: W1, chosen by the premise rows on val
    encoder_lr: float = 2e-3
    encoder_batch: int = 16
    omni_steps: int = 3100
    omni_lr: float = 2e-3
    omni_mix: str = ""           # e.g. asr=0.5,audio_qa=0.5: parts of OMNI_MIX; "": OMNI_MIX
    voice_first: int = 300       # the first this many steps train on VOICE_FIRST_MIX
    omni_teacher_style: float = 0.9  # share of spoken instructions answered in the teacher's style
    omni_splice: float = 0.5     # share of transcription rows spliced from training clips' words
    batch_size: int = 32         # sequences per step in teacher / omni
    # align stage
    align_steps: int = 80
    align_lr: float = 0.0        # 0: the method's rate in ALIGN_LR
    lr_grid: str = ""            # e.g. 3e-5,1e-4,3e-4: align at each, keep the best on val
    align_batch: int = 16        # prompts per step (paper: 256; docs/experiments.md)
    n: int = 4                   # samples per prompt and modality (paper: 4)
    lam: float = 0.5             # λ: weight of the in-modal term (paper: 0.5)
    temperature: float = 1.0     # rollout temperature (1 = the student's own distribution)
    max_new_tokens: int = 48
    gkd_beta: float = 0.0        # GKD: 0 = forward KL (the paper's baseline)
    gkd_mix: float = 0.5         # GKD: fraction of rows that are student samples
    ratio_clip: float = 0.0      # PPO-style clip of X-OPD's importance ratio (0: off, the paper)
    loss_agg: str = "seq_mean"   # Eq. 4's reduction: seq_mean (the paper) | token_sum
    align_max_wer: float = -1.0  # align on prompts transcribed within this WER % (paper: 5); <0 all
    tag: str = ""                # suffix of the align run's folder, to keep variants apart
    # every stage
    warmup: int = 20             # linear lr warm-up steps
    grad_clip: float = 1.0       # max gradient norm before each optimiser step (0 = no clipping)
    ckpt_every: int = 50
    log_every: int = 10
    eval_per_family: int = 300   # test prompts per benchmark family
    val_every: int = 20          # align: measure on the val prompts every this many steps
    val_per_family: int = 100    # align: val prompts per family for the val score from speech
    val_rkl_prompts: int = 48    # align: val prompts (over the families) for reverse-KL estimates


TRAIN_PRESETS = {
    "tiny": dict(teacher_steps=30, encoder_steps=10, encoder_batch=8, omni_steps=30, voice_first=5,
                 align_steps=4, batch_size=8, align_batch=4, n=2, max_new_tokens=24, warmup=2,
                 ckpt_every=2, log_every=1, eval_per_family=4),
    "cpu": dict(),
    "gpu": dict(teacher_steps=3000, omni_steps=4300, align_steps=300, batch_size=64,
                align_batch=64, max_new_tokens=64, eval_per_family=500),
}

# -----------------------------------------------------------------------------
# The pipeline: stages 1-5 in order.

def pipeline(cfg):
    device, amp, why = M.pick_device()
    device = init_distributed(device)
    if RANK > 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 speaks for all; errors still reach stderr
    check_batches_split(cfg, WORLD_SIZE)
    ranks = f"; rank 0 of {WORLD_SIZE} (torchrun), each a 1/{WORLD_SIZE} share of every batch"
    print(f"device: {device} ({why})" + (ranks if WORLD_SIZE > 1 else ""))
    print_settings(cfg)
    torch.manual_seed(cfg.seed)
    clock = StageClock(cfg, device)
    barrier()  # every rank decides on the folder as it was before rank 0 writes there
    if toy := toy_data_to_generate(cfg):
        make = data.make_toy_data if RANK == 0 else lambda *a: None
        clock.run("data", make, cfg.data, cfg.seed, toy)
        barrier()
    try:
        world = load_world(cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(str(e))
    check_world(cfg, world)
    clock.run("teacher", stage_teacher, cfg, world, device, amp)
    clock.run("encoder", stage_encoder, cfg, world, device, amp)
    clock.run("omni", stage_omni, cfg, world, device, amp)
    if cfg.lr_grid:  # choosing the rate on val: no test-set evaluation
        clock.run("select", select_lr, cfg, world, device, amp)
    elif not cfg.base_only:
        clock.run("align", stage_align, cfg, world, device, amp)
        if RANK == 0:  # stage 5 on rank 0 alone; the others wait at the barrier below
            args = (cfg.out, world, device, cfg.eval_per_family, cfg.max_new_tokens)
            clock.run("eval", E.evaluate_all, *args)
            E.report(cfg.out)
    clock.summary()
    if WORLD_SIZE > 1:
        barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Stage 1: the teacher, a text LLM.

def answer_styles(rows, own, other, share, seed):
    """Each row's target: field `own`, or with probability `share` field `other` where it has one
    (draws from seed alone: the same on a resumed run and however torchrun splits the rows)."""
    if share <= 0:
        return [r[own] for r in rows]
    u = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [r[other] if x < share and r[other] else r[own] for r, x in zip(rows, u)]


def stage_teacher(cfg, world, device, amp):
    fp = stage_fingerprint(cfg, world, "teacher")
    if reusable(cfg, "teacher", fp):
        return
    if cfg.teacher:  # the user's own text model is the teacher
        try:
            teacher, _ = M.load_llama_folder(cfg.teacher)
        except ValueError as e:
            sys.exit(f"--teacher: {e}")
        return import_stage(cfg, "teacher", teacher, world, cfg.teacher, fp)
    fams = data.text_families(r for r in world.text + world.train if r["teacher"])
    if not fams:
        sys.exit(f"[teacher] {world.dir}: no text prompts with a `teacher` response (text.jsonl, "
                 f"or train.jsonl's kind \"text\" records) to train the teacher on; give a text "
                 f"model of your own with --teacher DIR (README, 'Your own models')")
    _, _, dec_cfg = M.make_configs(cfg.preset, world.tok.get_vocab_size())
    torch.manual_seed(cfg.seed)
    teacher = M.Decoder(dec_cfg).to(device)
    # an equal share of each batch per family: the text pool would drown the train pool's facts
    quota = {f: cfg.batch_size // len(fams) + (i < cfg.batch_size % len(fams))
             for i, f in enumerate(fams)}

    def step_fn(step):
        rows = [fams[f][i] for j, f in enumerate(fams)
                for i in data.batch_indices(len(fams[f]), quota[f], step, cfg.seed + 100 * j)]
        # a language prior: some targets are the bare `reference` (docs/decisions.md)
        seed = data.mix_seed(cfg.seed, step)
        targets = answer_styles(rows, "teacher", "reference", cfg.teacher_prior, seed)
        pairs = shard(list(zip(rows, targets)))
        b = world.batch([r for r, _ in pairs], [t for _, t in pairs], device, speech=False)
        with autocast(device, amp):
            loss, ntok = xopd.response_nll(teacher, b, "text")
        return share(loss, ntok, device), {"tokens": ntok}  # a mean over tokens

    run_stage("teacher", cfg, fp, teacher, cfg.teacher_steps, cfg.teacher_lr, step_fn, device,
              world.tok.to_str())


# -----------------------------------------------------------------------------
# Stage 2: the audio encoder, on character CTC and the speaker's voice (four small heads).

def voice_loss(logits, rows, device, zero):
    """The voice heads' cross-entropy: per task, the mean over the rows labelled for it; summed."""
    labels = [data.voice_labels(r["voice"]) for r in rows]
    total = zero
    for task, classes in M.VOICE_CLASSES.items():
        has = [i for i, lab in enumerate(labels) if task in lab]
        y = torch.tensor([classes.index(labels[i][task]) for i in has], device=device)  # int64
        ce = F.cross_entropy(logits[task][has].float(), y) if has else logits[task].sum() * 0.0
        total = total + share(ce, len(has), device)  # every rank joins the sum, rows or not
    return total


def stage_encoder(cfg, world, device, amp):
    fp = stage_fingerprint(cfg, world, "encoder")
    if reusable(cfg, "encoder", fp):
        return
    enc_cfg, _, _ = M.make_configs(cfg.preset, world.tok.get_vocab_size())
    whisper = M.read_whisper(cfg.whisper) if cfg.whisper else None  # main has checked it reads
    torch.manual_seed(cfg.seed + 1)
    m = M.CTCEncoder(M.whisper_config(whisper) if whisper else enc_cfg)
    if whisper:  # a real encoder stays as it is: only the CTC and voice heads learn to read it
        m.encoder = M.load_whisper_encoder(whisper).requires_grad_(False)
        print(f"[encoder] {cfg.whisper}: Whisper's encoder ({M.whisper_config(whisper)}), "
              "frozen; training the heads")
    m = m.to(device)
    recs = [r for r in world.train if M.ctc_targets(r["transcript"])]

    def rows_at(step):
        idx = data.batch_indices(len(recs), cfg.encoder_batch, step, cfg.seed + 1)
        return shard([recs[i] for i in idx])

    def step_fn(step):
        rows = rows_at(step)
        mels, mel_lens = data.collate_mels([world.mel(r) for r in rows])
        targets = [M.ctc_targets(r["transcript"]) for r in rows]
        with autocast(device, amp):
            logp, lens, voice = m.heads(mels.to(device), mel_lens.to(device))
        flat = torch.tensor(sum(targets, []), device=device)
        target_lens = torch.tensor([len(t) for t in targets], device=device)
        logp = logp.transpose(0, 1)  # (T, B, C), as ctc_loss takes it
        ctc = F.ctc_loss(logp, flat, lens, target_lens, zero_infinity=True)
        ctc = share(ctc, len(rows), device)
        voice_ce = voice_loss(voice, rows, device, ctc.new_zeros(()))
        stats = {"ctc": ctc.item(), "voice": voice_ce.item(), "tokens": sum(map(len, targets))}
        return ctc + voice_ce, stats

    precompute("encoder", "log-mels", cfg.encoder_steps, rows_at,
               lambda rs: [world.mel(r) for r in rs])
    run_stage("encoder", cfg, fp, m, cfg.encoder_steps, cfg.encoder_lr, step_fn, device,
              world.tok.to_str())


# -----------------------------------------------------------------------------
# Stage 3: omni, the base student.

# The omni mix, as real speech LLMs' data (Qwen-Audio, SALMONN): mostly transcription and audio
# questions, spoken instructions, and written text replayed to keep the text skills.
OMNI_MIX = {"asr": 0.45, "audio_qa": 0.25, "spoken": 0.2, "written": 0.1}
# The first cfg.voice_first steps; without them the decoder never reads the voice.
VOICE_FIRST_MIX = {"audio_qa": 0.75, "written": 0.25}
TARGET = {"asr": "reference", "audio_qa": "reference", "spoken": "reference", "written": "teacher"}


def omni_mix(cfg):
    """--omni_mix as {part: fraction of each batch's rows}."""
    if not cfg.omni_mix:
        return OMNI_MIX
    try:
        mix = {k.strip(): float(v) for k, v in (p.split("=") for p in cfg.omni_mix.split(","))}
    except ValueError:
        mix = {}
    if not mix or set(mix) - set(OMNI_MIX) or min(mix.values()) < 0 or not sum(mix.values()) > 0:
        sys.exit(f"--omni_mix: expected part=fraction pairs of the parts {', '.join(OMNI_MIX)}, "
                 f"like asr=0.5,audio_qa=0.5, got {cfg.omni_mix!r}")
    return mix


def omni_pools(world):
    """{part: the train pool's records that carry its target}; every clip is also an asr row."""
    asr = [r if r["task"] == "asr" else {**r, "instruction": data.AUDIO_INSTRUCTIONS["asr"],
                                         "reference": r["transcript"], "teacher": None}
           for r in world.train]
    text_recs = [r for r in world.train if r["kind"] == "text"]
    audio_qa = [r for r in world.train
                if r["kind"] == "audio" and r["task"] != "asr" and r["reference"]]
    return {"asr": [r for r in asr if r["transcript"]], "audio_qa": audio_qa,
            "spoken": [r for r in text_recs if r["reference"]],
            "written": [r for r in text_recs if r["teacher"]]}


def word_alignment_loss(student, batch, word_pieces):
    """The adapter's word scores as a classifier of the word spoken there (as BLSP pulls speech
    toward text), on clips cut into as many words as their transcripts have; a word of k pieces
    is a target of 1/k on each. -> (mean over the words, their number)."""
    embeddings = student.decoder.embed_tokens.weight
    _, lens, logits = student.adapter(batch.feats, batch.feat_lens, embeddings)  # (B, W, vocab)
    rows = [(b, words) for b, words in enumerate(word_pieces)
            if int(lens[b]) == 1 + len(words) and words]
    if not rows:  # zero, in the graph: under torchrun every rank reduces the same gradients
        return logits.sum() * 0.0, 0
    picked = torch.cat([logits[b, :len(words)] for b, words in rows]).float()  # (N words, vocab)
    words = [w for _, ws in rows for w in ws]
    if all(len(w) == 1 for w in words):  # a word-level tokenizer: one class per word
        target = torch.tensor([w[0] for w in words], device=picked.device)
        return F.cross_entropy(picked, target), len(picked)
    target = torch.zeros_like(picked)
    for i, w in enumerate(words):
        for piece in w:
            target[i, piece] += 1.0 / len(w)
    return F.cross_entropy(picked, target), len(picked)


def word_bank(world, recs, encoder, device):
    """({word: its vectors, one per time spoken}, [clip vector]) of the clips the frozen
    encoder cut into as many words as their transcripts have: spliced_lists' material."""
    words, clips = {}, []
    for i in range(0, len(recs), 64):
        feats, lens = world.features(recs[i:i + 64], encoder, device)
        for r, f, n in zip(recs[i:i + 64], feats, lens.tolist()):
            spoken = data.spoken_words(r["transcript"]).split()
            if n == 1 + len(spoken):
                clips.append(f[0])
                for w, v in zip(spoken, f[1:n]):
                    words.setdefault(w, []).append(v)
    return {w: torch.stack(vs) for w, vs in words.items()}, clips


def spliced_lists(bank, n, seed, instruction):
    """n transcription rows no clip holds: 3-6 bank words behind a random clip's vector, so the
    decoder reads words instead of memorising lists (docs/decisions.md). -> [(record, target)]"""
    words, clips = bank
    if not words or n <= 0:
        return []
    vocab = sorted(words)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(3, 7, (1,), generator=g))
        picked = [vocab[j] for j in torch.randint(len(vocab), (k,), generator=g).tolist()]
        vecs = [words[w][int(torch.randint(len(words[w]), (1,), generator=g))] for w in picked]
        clip = clips[int(torch.randint(len(clips), (1,), generator=g))]
        text = " ".join(picked)
        rec = {"id": f"spliced-{seed}-{i}", "task": "asr", "kind": "audio", "transcript": text,
               "instruction": instruction, "reference": text, "teacher": None,
               "feats": torch.stack([clip] + vecs)}
        out.append((rec, text))
    return out


def omni_student(cfg, world, device):
    """The base student: the encoder (frozen), a new adapter, a copy of the teacher's decoder."""
    teacher, _ = read_checkpoint(stage_files(cfg.out, "teacher").final, device)
    encoder, _ = read_checkpoint(stage_files(cfg.out, "encoder").final, device)
    _, adp_cfg, _ = M.make_configs(cfg.preset, world.tok.get_vocab_size())
    torch.manual_seed(cfg.seed + 2)
    student = M.student_from_teacher(teacher, encoder.enc_cfg, adp_cfg,
                                     audio_token_id=world.audio_id).to(device)
    student.encoder.load_state_dict(encoder.speech_encoder_state())
    student.encoder.requires_grad_(False)
    return student


def omni_loss(student, world, speech, written, device, amp):
    """Mean over the sequences of each one's mean NLL (the mix is in examples), plus the word
    alignment loss. speech: [(record, target)]. -> (loss, stats)"""
    speech_rows = [r for r, _ in speech]
    loss_s = loss_t = loss_words = torch.zeros((), device=device)  # a part without rows here
    tokens_s = tokens_t = n_words = 0
    with autocast(device, amp):
        if speech_rows:
            bs = world.batch(speech_rows, [t for _, t in speech], device, text=False,
                             encoder=student.encoder)
            loss_s, tokens_s = xopd.response_nll(student, bs, "speech", per_sequence=True)
            pieces = [data.spoken_word_ids(world.tok, r["transcript"]) for r in speech_rows]
            loss_words, n_words = word_alignment_loss(student, bs, pieces)
        if written:
            bt = world.batch(written, [r["teacher"] for r in written], device, speech=False)
            loss_t, tokens_t = xopd.response_nll(student, bt, "text", per_sequence=True)
        n = len(speech_rows) + len(written)
        loss = share((loss_s * len(speech_rows) + loss_t * len(written)) / n, n, device)
    loss_words = share(loss_words, n_words, device)
    stats = {"loss_s": loss_s.item(), "loss_t": loss_t.item(), "loss_align": loss_words.item(),
             "tokens": tokens_s + tokens_t}
    return loss + loss_words, stats


def stage_omni(cfg, world, device, amp):
    fp = stage_fingerprint(cfg, world, "omni")
    if reusable(cfg, "omni", fp):
        return
    if cfg.student:  # the user's own speech LLM of this project, with the run's tokenizer
        student, ck = read_checkpoint(cfg.student, device)
        if not isinstance(student, M.SpeechLM):
            sys.exit(f"--student {cfg.student}: holds a {type(student).__name__}; expected a "
                     f"speech LLM (an omni or align stage's model.pt)")
        try:
            xopd.check_same_tokenizer(world.tok, Tokenizer.from_str(ck["tokenizer"]))
        except ValueError as e:
            sys.exit(f"--student {cfg.student}: {e}")
        return import_stage(cfg, "omni", student, world, cfg.student, fp)
    student = omni_student(cfg, world, device)
    pools = omni_pools(world)
    sizes = {k: max(1, round(cfg.batch_size * f)) for k, f in omni_mix(cfg).items() if f > 0}
    voice_sizes = {k: max(1, round(cfg.batch_size * f)) for k, f in VOICE_FIRST_MIX.items()}
    n_spliced = round(sizes.get("asr", 0) * cfg.omni_splice)  # transcription rows spliced
    sizes["asr"] = sizes.get("asr", 0) - n_spliced
    bank = ({}, [])  # word_bank, after precompute

    def rows_at(step):
        """-> (spoken records with their targets, written records) of a step."""
        size = voice_sizes if step < cfg.voice_first else sizes
        seed, parts = data.mix_seed(cfg.seed, step), {}
        for j, k in enumerate(OMNI_MIX):  # j: each part's own seed, whatever the mix
            if size.get(k) and pools[k]:
                idx = data.batch_indices(len(pools[k]), size[k], step, cfg.seed + j)
                rows = [pools[k][i] for i in idx]
                targets = (answer_styles(rows, "reference", "teacher", cfg.omni_teacher_style, seed)
                           if k == "spoken" else [r[TARGET[k]] for r in rows])
                parts[k] = shard(list(zip(rows, targets)))
        if step >= cfg.voice_first:
            asr = data.AUDIO_INSTRUCTIONS["asr"]
            parts["spliced"] = shard(spliced_lists(bank, n_spliced, seed, asr))
        speech = [p for k in ("asr", "spliced", "audio_qa", "spoken") for p in parts.get(k, [])]
        return speech, [r for r, _ in parts.get("written", [])]

    def step_fn(step):
        return omni_loss(student, world, *rows_at(step), device, amp)

    precompute("omni", "frozen encoder's features", cfg.omni_steps,
               lambda step: [r for r, _ in rows_at(step)[0]],
               lambda rs: world.features(rs, student.encoder, device))
    if n_spliced:
        bank = word_bank(world, pools["asr"], student.encoder, device)
        print(f"[omni] spliced word lists: {n_spliced} of each step's transcription rows, from "
              f"{len(bank[0])} words spoken {sum(map(len, bank[0].values()))} times in "
              f"{len(bank[1])} training clips", flush=True)
    run_stage("omni", cfg, fp, student, cfg.omni_steps, cfg.omni_lr, step_fn, device,
              world.tok.to_str())


# -----------------------------------------------------------------------------
# Stage 4: align, one method on the paired prompts (select_lr: at each rate of a grid).

def align_name(cfg):
    name = cfg.method if cfg.lam == 0.5 else f"{cfg.method}_lam{cfg.lam:g}"
    return f"{name}_{cfg.tag}" if cfg.tag else name


def align_prompts(cfg, world, student, name, device, amp):
    """The align pool's text prompts (else the train pool's); under --align_max_wer, those the base
    student transcribes within that WER % (the paper: 5)."""
    recs = [r for r in world.align if r["kind"] == "text"]
    if not recs:
        recs = [r for r in world.train if r["kind"] == "text"]
        print(f"[{name}] {world.dir} has no align.jsonl: aligning on the train pool's spoken "
              "prompts, which the omni stage has already seen")
    if cfg.align_max_wer < 0:
        return recs
    with autocast(device, amp):
        said = E.transcripts(student, world, recs, device, cfg.max_new_tokens, student.encoder)
    keep = [r for r, h in zip(recs, said)
            if 100.0 * data.wer(data.spoken_words(r["transcript"]), h) <= cfg.align_max_wer]
    print(f"[{name}] {len(keep)} of {len(recs)} align prompts transcribed within "
          f"{cfg.align_max_wer:g} % WER: aligning on those")
    if not keep:
        sys.exit(f"[{name}] --align_max_wer {cfg.align_max_wer:g}: no align prompt is transcribed "
                 "that well")
    return keep


def teacher_responses(cfg, world, teacher, teacher_id, recs, device, amp):
    """Offline KD's targets {id: the teacher's greedy answer}, cached in
    align/teacher_responses.json under the fingerprint of teacher, prompts, max_new_tokens."""
    path = os.path.join(cfg.out, "align", "teacher_responses.json")
    prompts = data.fingerprint([(r["id"], world.prompt(r, "text")) for r in recs])
    fp = data.fingerprint({"teacher": teacher_id, "prompts": prompts,
                           "max_new_tokens": cfg.max_new_tokens})
    try:
        with open(path) as f:
            cached = json.load(f)
        if cached["fingerprint"] == fp:
            return cached["answers"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, damaged, or of another form
        pass
    with autocast(device, amp):
        answers = xopd.generate(teacher, world, recs, "text", device, cfg.max_new_tokens)
    out = {r["id"]: a for r, a in zip(recs, answers)}
    if RANK == 0:
        M.atomic_write(path, lambda f: json.dump({"fingerprint": fp, "answers": out}, f))
    return out


def val_monitor(cfg, world, student, teacher, device, amp):
    """-> monitor() -> {name: value} on the val prompts (reverse-KL probe, greedy scores from
    speech and from text per family), or None without val prompts."""
    val = data.text_families(world.val, cfg.val_per_family)
    if not val:
        return None
    probe = [r for rs in val.values() for r in rs[:cfg.val_rkl_prompts // len(val)]]

    def monitor():
        # the same rollout seed at every measurement, so the curve moves only with the model
        gen = torch.Generator(device).manual_seed(data.mix_seed(cfg.seed, -1))
        with autocast(device, amp):
            b = world.batch(probe, device=device, encoder=student.encoder)
            out = xopd.reverse_kl(student, teacher, b, n=1, max_new_tokens=cfg.max_new_tokens,
                                  eos_id=world.end_id, generator=gen)
            for fam, rs in val.items():
                for key, modality in (("S", "speech"), ("T", "text")):
                    preds = xopd.generate(student, world, rs, modality, device,
                                          cfg.max_new_tokens, encoder=student.encoder)
                    out[f"val_{key}_{fam}"] = 100.0 * sum(map(data.score, rs, preds)) / len(rs)
        for key in "ST":
            out[f"val_{key}"] = sum(out[f"val_{key}_{fam}"] for fam in val) / len(val)
        return out
    return monitor


def stage_align(cfg, world, device, amp, folder="align"):
    name = f"{folder}/{align_name(cfg)}"
    lr = cfg.align_lr or ALIGN_LR[cfg.method]
    fp = stage_fingerprint(cfg, world, name, lr)
    if reusable(cfg, name, fp):
        return
    teacher, t_ck = read_checkpoint(stage_files(cfg.out, "teacher").final, device)
    student, s_ck = read_checkpoint(stage_files(cfg.out, "omni").final, device)
    xopd.check_same_tokenizer(*(Tokenizer.from_str(ck["tokenizer"]) for ck in (t_ck, s_ck)))
    teacher.requires_grad_(False).eval()
    student.freeze_audio()
    recs = align_prompts(cfg, world, student, name, device, amp)
    kd = None
    if cfg.method == "kd":  # rank 0 makes the teacher's answers, the others read them
        kd_args = (cfg, world, teacher, t_ck["fingerprint_id"], recs, device, amp)
        if RANK == 0:
            teacher_responses(*kd_args)
        barrier()
        kd = teacher_responses(*kd_args)

    def rows_at(step):
        idx = data.batch_indices(len(recs), cfg.align_batch, step, cfg.seed + 7)
        return shard([recs[i] for i in idx])

    def step_fn(step):
        rows = rows_at(step)
        # the sampling seed of a step depends on (seed, step, rank) only: resumable, repeatable
        gen = torch.Generator(device).manual_seed(data.mix_seed(RANK, cfg.seed, step))
        sample = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      eos_id=world.end_id, generator=gen)
        if cfg.method == "xopd":
            b = world.batch(rows, device=device, encoder=student.encoder)
            with autocast(device, amp):
                loss, stats = xopd.xopd_step(student, teacher, b, n=cfg.n, lam=cfg.lam,
                                             ratio_clip=cfg.ratio_clip, loss_agg=cfg.loss_agg,
                                             **sample)
            return share(loss, len(rows), device), stats  # a mean over sequences (n per prompt)
        if cfg.method == "gkd":
            b = world.batch(rows, [r["reference"] for r in rows], device, encoder=student.encoder)
            with autocast(device, amp):
                loss, stats = xopd.gkd_step(student, teacher, b, beta=cfg.gkd_beta,
                                            student_frac=cfg.gkd_mix, pad_id=world.pad_id, **sample)
        else:
            targets = [kd[r["id"]] if cfg.method == "kd" else r["reference"] for r in rows]
            b = world.batch(rows, targets, device, text=False, encoder=student.encoder)
            with autocast(device, amp):
                loss, stats = xopd.sft_step(student, b)
        return share(loss, stats["tokens"], device), stats  # a mean over tokens

    precompute(name, "frozen encoder's features", cfg.align_steps, rows_at,
               lambda rs: world.features(rs, student.encoder, device))
    run_stage(name, cfg, fp, student, cfg.align_steps, lr, step_fn, device, world.tok.to_str(),
              val_monitor(cfg, world, student, teacher, device, amp))


def grid_runs(cfg):
    """[(lr, settings)] of cfg.lr_grid's align runs."""
    return [(lr, replace(cfg, align_lr=lr, tag=f"{cfg.tag}_lr{lr:g}".lstrip("_")))
            for lr in sorted(float(x) for x in cfg.lr_grid.split(","))]


def val_se(rec, fams, key):
    """The standard error of rec's val_S or val_T (key): each family's binomial se, averaged as
    the score is."""
    var = sum(rec[f"{key}_{f}"] * (100 - rec[f"{key}_{f}"]) / len(rs) for f, rs in fams.items())
    return var ** 0.5 / len(fams)


def rate_rule(base, finals, fams):
    """docs/protocol.md's rate rule on val: among the rates whose val_T stays within two standard
    errors of the base student's (none: the highest val_T), those whose val_S is within one
    standard error of the best; the smallest. base, finals[lr]: val records. -> (lr, why)"""
    se = lambda r, key: val_se(r, fams, key)
    kept = [lr for lr, r in finals.items() if r["val_T"] >= base["val_T"] - 2 * se(base, "val_T")]
    if not kept:
        return max(finals, key=lambda lr: (finals[lr]["val_T"], -lr)), "no rate keeps val_T"
    best = max((finals[lr] for lr in kept), key=lambda r: r["val_S"])
    near = [lr for lr in kept if finals[lr]["val_S"] >= best["val_S"] - se(best, "val_S")]
    return min(near), f"{len(kept)} of {len(finals)} rates keep val_T"


def select_lr(cfg, world, device, amp):
    """Align once per rate of cfg.lr_grid (in select/, apart from the tables) and choose one by
    rate_rule from the final val scores from speech and text; the test pool plays no part."""
    if not any(r["kind"] == "text" for r in world.val):
        sys.exit(f"--lr_grid: choosing a learning rate needs val prompts, and "
                 f"{world.dir}/val.jsonl has none")
    finals = {}
    for lr, run in grid_runs(cfg):
        stage_align(run, world, device, amp, folder="select")
        with open(os.path.join(cfg.out, "select", align_name(run), "val.jsonl")) as f:
            recs = [json.loads(line) for line in f]
        base, finals[lr] = recs[0], recs[-1]  # step 0: the base student, the same in every run
    fams = data.text_families(world.val, cfg.val_per_family)
    chosen, why = rate_rule(base, finals, fams)
    name = align_name(cfg)
    if RANK == 0:
        record = {"chosen": chosen, "why": why, "base": base, "final": {
            f"{lr:g}": r for lr, r in finals.items()}}
        M.atomic_write(os.path.join(cfg.out, "select", f"lr_{name}.json"),
                       lambda f: json.dump(record, f, indent=1))
    se = {k: val_se(base, fams, k) for k in ("val_S", "val_T")}
    print(f"[select] {name}: base student val_S {base['val_S']:.1f} ± {se['val_S']:.1f}, val_T "
          f"{base['val_T']:.1f} ± {se['val_T']:.1f}; " + ", ".join(
              f"lr {lr:g} -> {r['val_S']:.1f} / {r['val_T']:.1f}" for lr, r in finals.items())
          + f" (val_S / val_T); {why}: chosen lr {chosen:g}")
    return chosen


# -----------------------------------------------------------------------------
# The loop every stage shares.

def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run_stage(name, cfg, fp, model, steps, lr, step_fn, device, tokenizer, monitor=None):
    """Train `model`: step_fn(step) -> (loss, stats with 'tokens'); model.pt at the end. monitor()
    measures before step 1, every cfg.val_every steps and at the end."""
    f = stage_files(cfg.out, name)
    writer = RANK == 0  # rank 0 writes and measures; the others wait for it at the next step
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = resume_point(cfg, name, f, model, opt, fp, steps)
    print(f"[{name}] {steps} steps, lr {lr:g}, "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters")
    payload = lambda step: checkpoint_payload(cfg, model, tokenizer, fp, step=step, lr=lr,
                                              optimizer=opt.state_dict())
    stop = lambda step, what: sys.exit(
        f"[{name}] step {step + 1}: {what}; stopping. The last good checkpoint is kept in "
        f"{f.ckpt if os.path.exists(f.ckpt) else f.dir} (nothing written after it).")
    monitor = monitor if writer else None
    if monitor and start == 0:
        validate(name, model, monitor, f, 0)
    model.train()
    pending = warm = None  # warm: (time, step) the ETA counts from; the first step warms up
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, cfg.warmup)
        t0 = time.perf_counter()
        warm = (t0, step) if step == start + 1 else warm
        loss, m = checked_step(step_fn, step, device, stop)
        if pending:  # written one step late: its weights have now given a finite loss
            M.save_checkpoint(f.ckpt, pending)
            pending = None
        m.update(update_weights(params, opt, loss, cfg.grad_clip, lambda what: stop(step, what)))
        log_step(name, cfg, f if writer else None, step, steps, m, opt.param_groups[0]["lr"], t0,
                 warm, device)
        if monitor and ((step + 1) % cfg.val_every == 0 or step + 1 == steps):
            validate(name, model, monitor, f, step + 1)
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps and writer:
            pending = copy.deepcopy(payload(step + 1))  # a copy: the weights change in place
            pending["logs"] = {k: open(getattr(f, k)).read() for k in ("log", "val")}
    if not all(bool(torch.isfinite(p).all()) for p in params):
        stop(steps - 1, "the final weights are not finite")
    if writer:  # model.pt, the curves, and ckpt.pt removed
        M.save_checkpoint(f.final, payload(steps))
        curves(name, f.log, f.val)
        if os.path.exists(f.ckpt):
            os.remove(f.ckpt)
    barrier()  # the next stage, on every rank, reads what rank 0 has just written


def checked_step(step_fn, step, device, stop):
    """step_fn(step) -> (loss, stats over the whole batch); a non-finite loss or sampler on any
    rank stops every rank before the update."""
    failed = ""
    try:
        loss, stats = step_fn(step)
    except FloatingPointError as e:  # the sampler met non-finite logits
        failed = str(e)
    if all_sum([float(bool(failed))], device)[0]:  # any rank's failure stops every rank
        stop(step, failed or "another rank's sampler met non-finite logits")
    m = {"loss": loss.item(), **stats}
    if WORLD_SIZE > 1:  # the whole batch's loss and tokens; the other stats averaged over ranks
        summed = all_sum(list(m.values()), device)
        m = {k: int(v) if k == "tokens" else v / WORLD_SIZE for k, v in zip(m, summed)}
    if not math.isfinite(m["loss"]):
        stop(step, f"loss is {m['loss']}")
    return loss, m


def update_weights(params, opt, loss, grad_clip, stop):
    """Every stage's update: backward, average over ranks, clip (0: none), step; a non-finite norm
    stops before the step. -> {"grad_norm": before clipping}"""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if WORLD_SIZE > 1:
        average_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf).item()
    if not math.isfinite(norm):
        stop(f"the gradient norm is {norm}")
    opt.step()
    return {"grad_norm": norm} if grad_clip > 0 else {}


def log_step(name, cfg, f, step, steps, m, lr, t0, warm, device):
    """One JSON line per step into f.log (f None: not this rank's); printed every cfg.log_every."""
    if device.type == "cuda":
        torch.cuda.synchronize()  # the step's kernels have run: the clock reads the step's time
    dt = time.perf_counter() - t0
    eta = (fmt_time((time.perf_counter() - warm[0]) / (step + 1 - warm[1]) * (steps - step - 1))
           if warm else "-")
    stats = {k: round(v, 5) if isinstance(v, float) else v for k, v in m.items()}
    rec = {"step": step + 1, **stats, "lr": lr, "ms": round(dt * 1e3, 1),
           "tok_s": round(m["tokens"] / dt, 1)}
    if f:
        with open(f.log, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
        diag = " ".join(f"{k} {v:.4g}" for k, v in m.items()
                        if k not in ("loss", "tokens") and not k.startswith("ms_"))
        print(f"[{name}] step {step + 1:5d}/{steps} | loss {m['loss']:.4f} | {diag} | "
              f"{dt * 1e3:6.0f} ms | {m['tokens'] / dt:7.0f} tok/s | eta {eta}")


def validate(name, model, monitor, f, step):
    model.eval()
    rec = {"step": step, **monitor()}
    model.train()
    with open(f.val, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    values = " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step")
    print(f"[{name}] val at step {step}: {values}")


def precompute(name, what, steps, records_at, compute):
    """compute(records) before step 1 for each step's records new at that step, in step order:
    the groups first use would compute, so values match to the bit; step times stay steady."""
    seen, groups = set(), []
    for step in range(steps):  # repeats within a step stay, as on first use
        recs = [r for r in records_at(step) if r["id"] not in seen]
        seen.update(r["id"] for r in recs)
        if recs:
            groups.append(recs)
    total, n, t0 = sum(map(len, groups)), 0, time.time()
    progress = data.Progress(name, what, total)
    for recs in groups:
        compute(recs)
        n += len(recs)
        progress(n)
    print(f"[{name}] {what}: {total} clips in {fmt_time(time.time() - t0)}, before step 1",
          flush=True)


def autocast(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def sparkline(values, width=40):
    """The finite values' curve in at most `width` bins, each bin's mean as one of eight bars."""
    xs = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return ""
    n = min(width, len(xs))
    bins = (xs[i * len(xs) // n:(i + 1) * len(xs) // n] for i in range(n))
    means = [sum(b) / len(b) for b in bins]
    lo, hi = min(means), max(means)
    if hi == lo:
        return "▄" * n
    return "".join("▁▂▃▄▅▆▇█"[min(7, int((m - lo) / (hi - lo) * 8))] for m in means)


def curves(name, log_path, val_path):
    """Prints sparklines with first -> last values: the loss, and the val measurements."""
    for path, keys in ((log_path, ("loss",)), (val_path, ("rkl_cm", "rkl_im", "val_S", "val_T"))):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            recs = [json.loads(line) for line in f]
        for k in keys:
            v = [r[k] for r in recs if k in r]
            if len(v) > 1:
                print(f"[{name}] {k:7s} {sparkline(v)} {v[0]:.4g} -> {v[-1]:.4g}")


# -----------------------------------------------------------------------------
# Data parallel: under torchrun every rank takes its share of each batch and the gradients are
# averaged, so the weights stay equal; rank 0 alone writes and prints.

RANK, WORLD_SIZE = 0, 1


def init_distributed(device):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) -> this rank's device."""
    global RANK, WORLD_SIZE
    if "RANK" not in os.environ:
        return device
    RANK, WORLD_SIZE = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:  # the ranks of one machine share its cores
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", WORLD_SIZE))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    # a long timeout: the other ranks wait while rank 0 evaluates
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=6))
    return device


def barrier():
    if WORLD_SIZE > 1:
        dist.barrier()


def shard(rows):
    """This rank's rows of a step's batch: every WORLD_SIZE-th from RANK on (disjoint)."""
    return rows[RANK::WORLD_SIZE]


def all_sum(values, device):
    """Sum a list of floats over the ranks (on the device: nccl reduces GPU tensors only)."""
    if WORLD_SIZE == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def share(mean, n, device):
    """This rank's mean over its n items, weighted so that the ranks' average is the batch's."""
    if WORLD_SIZE == 1:
        return mean
    return mean * (n * WORLD_SIZE / max(all_sum([float(n)], device)[0], 1.0))


def average_gradients(params):
    """DDP's averaging, written out (the steps call several model methods, not one forward)."""
    for p in params:
        if p.grad is None:  # a part this rank's rows did not reach: its gradient here is 0
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # one collective, not one per tensor
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p) / WORLD_SIZE)


# =============================================================================
# Machinery: flags, the run folder (lock, fingerprints, resume), input checks, the stage clock.

def rates(text):
    try:
        return all(0 < float(x) < math.inf for x in text.split(",")) if text else True
    except ValueError:
        return False


# every integer setting but these three counts something: at least one
INTS = [f.name for f in fields(TrainConfig)
        if f.type is int and f.name not in ("seed", "warmup", "voice_first")]
# (flags, the refusal's text, whether value v under settings c is accepted)
CHECKS = [
    (("temperature",), "--method {c.method} samples its rollouts; expected a finite "
     "temperature > 0", lambda v, c: c.method not in ("xopd", "gkd") or 0 < v < math.inf),
    (("method",), f"expected one of {', '.join(METHODS)}", lambda v, c: v in METHODS),
    (("loss_agg",), f"expected one of {', '.join(xopd.LOSS_AGGS)}",
     lambda v, c: v in xopd.LOSS_AGGS),
    (("tag",), "expected a plain name (letters, digits, -, _, .)",  # a folder name, never a path
     lambda v, c: re.fullmatch(r"[\w.-]*", v, re.ASCII)),
    (INTS, "expected a positive integer", lambda v, c: v >= 1),
    (("lam", "gkd_beta", "gkd_mix", "teacher_prior", "omni_teacher_style", "omni_splice"),
     "expected a value in [0, 1]", lambda v, c: 0 <= v <= 1),
    (("seed", "warmup"), "expected an integer >= 0", lambda v, c: v >= 0),
    (("teacher_lr", "encoder_lr", "omni_lr"), "expected a finite learning rate > 0",
     lambda v, c: 0 < v < math.inf),
    (("align_lr",), "expected a finite learning rate > 0 (or 0: the method's own, ALIGN_LR)",
     lambda v, c: 0 <= v < math.inf),
    (("grad_clip", "ratio_clip"), "expected a finite value >= 0 (0: off)",
     lambda v, c: 0 <= v < math.inf),
    (("temperature",), "expected a finite value >= 0", lambda v, c: 0 <= v < math.inf),
    (("lr_grid",), "expected comma-separated learning rates > 0 like 3e-5,1e-4,3e-4",
     lambda v, c: rates(v)),
    (("voice_first",), "expected 0 to --omni_steps ({c.omni_steps})",
     lambda v, c: 0 <= v <= c.omni_steps),
]
# the errors of a folder the user named, which end the run in one line
USER_OS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
                  errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def parse_args(argv=None):
    """--key value for every TrainConfig field over the preset's; every value checked up front."""
    p = argparse.ArgumentParser(description="X-OPD: teacher -> omni -> align -> eval")
    for f in fields(TrainConfig):
        how = (dict(action="store_true") if f.type is bool
               else dict(type=f.type, metavar=f.name.upper()))
        p.add_argument(f"--{f.name}", default=None, **how)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", TrainConfig.preset)
    if preset not in TRAIN_PRESETS or preset not in M.PRESETS:
        p.error(f"--preset: expected one of {sorted(TRAIN_PRESETS)}, got {preset!r}")
    cfg = TrainConfig(**{**TRAIN_PRESETS[preset], **given})
    for names, what, ok in CHECKS:
        for k in names:
            if not ok(getattr(cfg, k), cfg):
                p.error(f"--{k}: {what.format(c=cfg)}, got {getattr(cfg, k)!r}")
    omni_mix(cfg)
    # absolute, as every checkpoint stores them: a run reads the same from any directory
    cfg.out = os.path.abspath(cfg.out or os.path.join("runs", cfg.preset))
    cfg.data = cfg.data or os.path.join(cfg.out, "data")
    for name in data.RUN_PATHS:
        setattr(cfg, name, getattr(cfg, name) and os.path.abspath(getattr(cfg, name)))
    return cfg


def print_settings(cfg):
    """One line: the run's folders and the settings that differ from the preset's."""
    preset = TrainConfig(**TRAIN_PRESETS[cfg.preset])
    changed = [f"{k} {v}" for k, v in asdict(cfg).items()
               if k not in ("preset", "out", "data") and v != getattr(preset, k)]
    print(f"settings: preset {cfg.preset}, out {cfg.out}, data {cfg.data}; "
          + (", ".join(changed) if changed else "everything else as the preset has it"))


def main(argv=None):
    """Hold the run folder and run the pipeline; a user's folder error ends it in one line."""
    cfg = parse_args(argv)
    lock = lock_run(cfg.out) if int(os.environ.get("RANK", 0)) == 0 else None  # rank 0's for all
    try:
        pipeline(cfg)
    except OSError as e:
        if e.errno not in USER_OS_ERRORS:
            raise
        sys.exit(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    finally:
        if lock and os.path.exists(lock):
            os.remove(lock)


def lock_run(out):
    """One run per folder: <out>/lock (O_EXCL) holds the run's process id; a live holder is
    refused, a dead one's lock taken over. -> the lock's path"""
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"--out {out}: is a file; expected a run folder (new, or one this project made)")
    path = os.path.join(out, "lock")
    try:
        os.makedirs(out, exist_ok=True)
        while True:
            with contextlib.suppress(FileExistsError), open(path, "x") as f:  # "x": O_EXCL
                f.write(f"{os.getpid()}\n")
                return path
            try:
                pid = int(open(path).read().strip())
            except (OSError, ValueError):  # gone meanwhile, or cut short while written
                pid = 0
            if pid and pid != os.getpid() and alive(pid):
                sys.exit(f"--out {out}: in use by another run, process id {pid} (its lock: "
                         f"{path}). Wait for it to end, or choose another --out.")
            if pid != os.getpid():
                why = f"left by process {pid}, which is no longer running" if pid else "unreadable"
                print(f"[lock] {path}: {why}; taking it over")
            with contextlib.suppress(FileNotFoundError):  # another run took it over first
                os.remove(path)
    except OSError as e:
        sys.exit(f"--out {out}: cannot write there ({e.strerror or e})")


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only whether the process exists
    except OSError as e:  # PermissionError: another user's, so it exists
        return isinstance(e, PermissionError)
    return True


def toy_data_to_generate(cfg):
    """The preset of the toy world to generate into cfg.data, or None: only into <out>/data, a new
    or empty folder, or one generated before (another seed's or preset's is refused) or begun."""
    preset = "tiny" if cfg.preset == "tiny" else "cpu"  # the toy world comes in these two sizes
    if os.path.exists(cfg.data) and not os.path.isdir(cfg.data):
        sys.exit(f"--data {cfg.data}: is a file; expected a folder (of manifests, or a new one for "
                 "the toy data)")
    generated = os.path.exists(os.path.join(cfg.data, "done.json"))
    unfinished = os.path.exists(os.path.join(cfg.data, data.UNFINISHED))
    has_manifest = os.path.exists(os.path.join(cfg.data, "train.jsonl"))
    free = (os.path.abspath(cfg.data) == os.path.abspath(os.path.join(cfg.out, "data"))
            or not os.path.isdir(cfg.data) or not os.listdir(cfg.data))
    made = json.load(open(os.path.join(cfg.data, "done.json"))) if generated else {}
    if generated and (made.get("seed"), made.get("preset")) != (cfg.seed, preset):
        sys.exit(f"--data {cfg.data}: holds the toy world of seed {made.get('seed')} "
                 f"({made.get('preset')} preset); this run asks for seed {cfg.seed} ({preset}). "
                 f"Choose another --data or --out, or delete {cfg.data} to generate it again.")
    if not (generated or unfinished or free or has_manifest):
        sys.exit(f"--data {cfg.data}: no train.jsonl there (expected train.jsonl and test.jsonl, "
                 "optionally align.jsonl, val.jsonl, text.jsonl, and tokenizer.json; README, "
                 "'Bring your own audio'). Toy data is generated only into a new or empty "
                 "folder, so nothing there was touched.")
    return preset if generated or unfinished or (free and not has_manifest) else None


def load_world(cfg):
    """The data folder, read with the tokenizer, chat format and n_mels of the models in use;
    every model and clip header checked before any stage runs."""
    n_mels, n_ctx = data.N_MELS, M.make_configs(cfg.preset, 1)[0].n_ctx
    if cfg.teacher:
        config = M.read_hf_config(cfg.teacher)
        tokenizer = os.path.join(cfg.teacher, "tokenizer.json")
        size = data.load_tokenizer(tokenizer).get_vocab_size(with_added_tokens=True)
        if size > config["vocab_size"]:  # ids past the end of the embedding table
            raise ValueError(f"{tokenizer}: {size} tokens, more than the {config['vocab_size']} "
                             f"of {os.path.join(cfg.teacher, 'config.json')}'s field "
                             "'vocab_size'; the tokenizer must be the model's own")
    if cfg.whisper:
        dims = M.read_whisper(cfg.whisper)["dims"]
        n_mels, n_ctx = dims["n_mels"], dims["n_audio_ctx"]
    if cfg.student:
        enc = read_checkpoint(cfg.student)["configs"].get("encoder", {})
        n_mels, n_ctx = enc.get("n_mels", n_mels), enc.get("n_ctx", n_ctx)
    world = data.world_of(asdict(cfg), n_mels)
    # choosing a learning rate (--lr_grid) never reads the test pool, not even its clips' headers
    pools = [p for p in data.POOLS if p != "test" or not cfg.lr_grid]
    world.check_clips(data.encoder_seconds(n_ctx), pools)
    return world


def check_world(cfg, world):
    """Refuse before the first stage what would stop a later one."""
    if cfg.method == "sft" or (cfg.method == "gkd" and cfg.gkd_mix < 1):
        recs = ([r for r in world.align if r["kind"] == "text"]
                or [r for r in world.train if r["kind"] == "text"])
        bad = [r for r in recs if not (isinstance(r["reference"], str) and r["reference"].strip())]
        if bad:
            sys.exit(f"{world.lines[bad[0]['id']]}: field 'reference' is missing, null or empty "
                     f"({len(bad)} of the {len(recs)} align prompts); --method {cfg.method} trains "
                     "on each prompt's reference response, so expected a non-empty string. Give "
                     "every align prompt one, or use --method xopd or kd, which need none.")
    fams = data.text_families(world.val)  # the probe takes val_rkl_prompts // families of each
    if fams and cfg.val_rkl_prompts < len(fams):
        sys.exit(f"--val_rkl_prompts {cfg.val_rkl_prompts}: expected at least one per family of "
                 f"{world.dir}/val.jsonl ({len(fams)}: {', '.join(fams)})")


def check_batches_split(cfg, ranks):
    for name in ("batch_size", "encoder_batch", "align_batch"):
        if getattr(cfg, name) % ranks:
            sys.exit(f"--{name} {getattr(cfg, name)}: under torchrun each step's batch is split "
                     f"evenly over the {ranks} ranks; expected a multiple of {ranks}")


# Fingerprints: an output is reused only when built from what it would be built from now.

SHARED = ("preset", "seed", "warmup", "grad_clip")  # shape the weights of every trained stage
SHAPES = {  # each stage's own settings that shape its weights or its records
    "teacher": ("teacher_steps", "teacher_lr", "teacher_prior", "batch_size"),
    "encoder": ("whisper", "encoder_steps", "encoder_lr", "encoder_batch"),
    "omni": ("omni_mix", "voice_first", "omni_steps", "omni_lr", "omni_teacher_style",
             "omni_splice", "batch_size"),
    "align": ("method", "lam", "align_steps", "align_batch", "n", "temperature",
              "max_new_tokens", "gkd_beta", "gkd_mix", "ratio_clip", "loss_agg", "align_max_wer",
              "val_every", "val_per_family", "val_rkl_prompts"),
}
READS = {"teacher": ("train", "text"), "encoder": ("train",), "omni": ("train",),
         "align": ("train", "align", "val")}  # the pools whose records a stage reads
BUILT_ON = {"teacher": (), "encoder": (), "omni": ("teacher", "encoder"),
            "align": ("teacher", "omni")}  # in pipeline order: a stage after its inputs
IMPORTS = {"teacher": "teacher", "omni": "student"}  # the flag giving a stage's model instead


def content_id(path):
    """A model file or folder by its files' digests."""
    if not os.path.isdir(path):
        return data.file_digest(path)
    files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    return data.fingerprint({f: data.file_digest(os.path.join(path, f)) for f in files})


def stage_fingerprint(cfg, world, name, lr=None):
    """What stage `name` is built from now (layout: docs/decisions.md); lr: the align stage's."""
    kind = "align" if "/" in name else name  # align/xopd, select/xopd_lr0.001
    flag = IMPORTS.get(kind)
    if flag and getattr(cfg, flag):
        settings = {flag: content_id(getattr(cfg, flag))}
        return {"stage": name, "settings": settings, "data": {}, "inputs": {}}
    settings = {k: getattr(cfg, k) for k in SHARED + SHAPES[kind]}
    for k in set(settings) & set(data.RUN_PATHS):  # a path by what it holds
        settings[k] = settings[k] and content_id(settings[k])
    if lr is not None:
        settings["lr"] = lr
    inputs = {s: read_checkpoint(stage_files(cfg.out, s).final).get("fingerprint_id")
              for s in BUILT_ON[kind]}
    return {"stage": name, "settings": settings,
            "data": {p: world.digest((p,)) for p in READS[kind]}, "inputs": inputs}


def rebuilt_with(out, name):
    """Stage folder `name` and every existing one built on it, in pipeline order."""
    kind = "align" if "/" in name else name  # align/xopd, select/xopd_lr0.001
    later = {k for k, inputs in BUILT_ON.items() if kind in inputs}
    later |= {k for k, inputs in BUILT_ON.items() if later & set(inputs)}
    built_on = ["omni"] * ("omni" in later) + ["align/*", "select/*"] * ("align" in later)
    # a pattern ending in a separator matches folders only
    found = [sorted(glob.glob(os.path.join(glob.escape(out), p, ""))) for p in built_on]
    return [os.path.join(out, name)] + [d.rstrip(os.sep) for ds in found for d in ds]


def check_fingerprint(cfg, name, path, ck, fp):
    """Stop unless checkpoint ck (at path) was built from fp, naming what differs."""
    if ck.get("fingerprint_id") == data.fingerprint(fp):
        return
    old, why = ck.get("fingerprint"), [
        "fingerprint: none recorded (made before outputs recorded what they are built from)"]
    if old:  # what differs, in words
        was, now = old["settings"], fp["settings"]
        shown = lambda k, v: ("(none)" if v is None else "other files" if k in data.RUN_PATHS
                              else repr(v))
        why = [f"stage {old['stage']!r} -> {fp['stage']!r}"] if old["stage"] != fp["stage"] else []
        why += [f"{k} {shown(k, was.get(k))} -> {shown(k, now.get(k))}"
                for k in [*now, *(k for k in was if k not in now)] if was.get(k) != now.get(k)]
        why += [f"data: {p}.jsonl changed" if part == "data" else f"input {p} rebuilt"
                for part in ("data", "inputs") for p in fp[part] if old[part].get(p) != fp[part][p]]
    folders = rebuilt_with(cfg.out, name)
    sys.exit(f"[{name}] {path} was built from other settings, data or inputs "
             f"({'; '.join(why)}). Delete {', '.join(folders)} to rebuild "
             f"{'them' if len(folders) > 1 else 'it'}, or choose another --out.")


def reusable(cfg, name, fp):
    """Whether stage `name` has its model.pt built from fp (one built from else is refused)."""
    final = stage_files(cfg.out, name).final
    if not os.path.exists(final):
        return False
    check_fingerprint(cfg, name, final, read_checkpoint(final), fp)
    print(f"[{name}] {final} exists: skipped")
    return True


def read_checkpoint(path, device=None):
    """A checkpoint (and its model, given a device); a damaged one ends the run in one line."""
    try:
        return M.load_model(path, device) if device else M.load_checkpoint(path)
    except ValueError as e:
        sys.exit(str(e))


def checkpoint_payload(cfg, model, tokenizer, fp, **extra):
    return {"model": model.state_dict(), "configs": M.model_configs(model), "train": asdict(cfg),
            "tokenizer": tokenizer, "fingerprint": fp, "fingerprint_id": data.fingerprint(fp),
            **extra}


def import_stage(cfg, name, model, world, source, fp):
    """The user's own model (--teacher, --student) written as the stage's model.pt."""
    if RANK == 0:
        final = stage_files(cfg.out, name).final
        M.save_checkpoint(final, checkpoint_payload(cfg, model, world.tok.to_str(), fp,
                                                    source=source))
        n = sum(p.numel() for p in model.parameters())
        print(f"[{name}] imported {source}: {n / 1e6:.2f}M parameters -> {final}")
    barrier()


def stage_files(out, name):
    d = os.path.join(out, name)
    path = lambda file: os.path.join(d, file)
    return SimpleNamespace(dir=d, final=path("model.pt"), ckpt=path("ckpt.pt"),
                           log=path("log.jsonl"), val=path("val.jsonl"))


def resume_point(cfg, name, f, model, opt, fp, steps):
    """-> the step to start from: ckpt.pt's under --resume (model, optimiser and logs restored)."""
    ck = {}
    if os.path.exists(f.ckpt) and not cfg.resume:
        print(f"[{name}] found an interrupted run in {f.dir}; starting over (pass --resume to "
              "continue it)")
    elif os.path.exists(f.ckpt):
        ck = read_checkpoint(f.ckpt)
        check_fingerprint(cfg, name, f.ckpt, ck, fp)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        print(f"[{name}] resuming from {f.ckpt} at step {ck['step']}/{steps}")
    if RANK == 0:  # the logs as the checkpoint saved them (none at step 0): exactly its steps
        for k in ("log", "val"):
            M.atomic_write(getattr(f, k), lambda fh: fh.write(ck.get("logs", {}).get(k, "")))
    return ck.get("step", 0)


# Each stage's seconds in the README's default run, for the headers' time left estimate.
REFERENCE_S = {"cpu": {"data": 38, "teacher": 148, "encoder": 362, "omni": 409, "align": 68,
                       "select": 360, "eval": 33}}


def has_output(cfg, stage):
    """Whether a stage of this run has its output there (eval never has)."""
    if stage == "data":
        return (os.path.exists(os.path.join(cfg.data, "train.jsonl"))
                and not os.path.exists(os.path.join(cfg.data, data.UNFINISHED)))
    folders = ([f"select/{align_name(run)}" for _, run in grid_runs(cfg)] if stage == "select"
               else [f"align/{align_name(cfg)}" if stage == "align" else stage])
    return stage != "eval" and all(os.path.exists(stage_files(cfg.out, f).final) for f in folders)


class StageClock:
    """Each stage under a header with the time so far and left; the times for the last line."""

    def __init__(self, cfg, device):
        self.cfg, self.device, self.t0 = cfg, device, time.time()
        last = ["select"] if cfg.lr_grid else [] if cfg.base_only else ["align", "eval"]
        self.stages = ["data", "teacher", "encoder", "omni"] + last
        self.times, self.peaks, self.ran = {}, {}, {}  # ran: (seconds, reference) of those run

    def run(self, name, fn, *args):
        i = self.stages.index(name)
        ahead = [s for s in self.stages[i:] if not has_output(self.cfg, s)]
        ref, left, ran = REFERENCE_S.get(self.cfg.preset, {}), "", self.ran.values()
        if ref and ahead:  # the reference times, at this machine's pace on the stages run so far
            pace = sum(t for t, _ in ran) / sum(r for _, r in ran) if ran else 1.0
            left = f"; about {fmt_time(pace * sum(ref[s] for s in ahead))} left"
            left += "" if ran else " at the README's pace"
        print(f"== [{i + 1}/{len(self.stages)} {name}] (run time so far "
              f"{fmt_time(time.time() - self.t0)}{left})", flush=True)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.time()
        fn(*args)
        self.times[name] = time.time() - t
        if cuda:  # the most the stage's tensors held at once (the allocator's cache aside)
            self.peaks[name] = torch.cuda.max_memory_allocated(self.device) / 2**30
            print(f"== [{name}] done in {fmt_time(self.times[name])}; peak GPU memory "
                  f"{self.peaks[name]:.2f} GiB", flush=True)
        if name in ahead and name in ref:
            self.ran[name] = (self.times[name], ref[name])

    def summary(self):
        peak = lambda k: f" ({self.peaks[k]:.2f} GiB)" if k in self.peaks else ""
        print("time per stage: "
              + ", ".join(f"{k} {fmt_time(v)}{peak(k)}" for k, v in self.times.items())
              + f"; wall time {fmt_time(time.time() - self.t0)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted. Finished stages are kept: run the same command again to go on, "
              "with --resume to continue the stage that was cut short from its last checkpoint.",
              file=sys.stderr)
        sys.exit(130)
