"""Tests for data.py: log-mel against a float64 reference, audio I/O, the synthesizer, the toy
world, the tokenizer and chat format, manifests, collation."""
import errno
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import model

SR = 16000


# ---------------------------------------------------------------- independent float64 reference

def ref_mel(f):   # Slaney: 3 mels per 200 Hz below 1 kHz, then 27 mels per factor 6.4
    return f * 3 / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)


def ref_hz(m):
    return m * 200 / 3 if m < 15 else 1000 * 6.4 ** ((m - 15) / 27)


def ref_filters(n_mels, n_fft, sr=SR):
    edges = [ref_hz(i * ref_mel(sr / 2) / (n_mels + 1)) for i in range(n_mels + 2)]
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    w = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, c, hi = edges[i], edges[i + 1], edges[i + 2]
        for k, f in enumerate(freqs):
            if lo < f <= c:
                w[i, k] = (f - lo) / (c - lo)
            elif c < f < hi:
                w[i, k] = (hi - f) / (hi - c)
        w[i] *= 2.0 / (hi - lo)   # unit area
    return w


def ref_log_mel(x, n_mels=80):
    x = np.asarray(x, dtype=np.float64)
    xp = np.pad(x, 200, mode="reflect")
    n_frames = 1 + len(x) // 160
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)   # periodic Hann
    frames = np.stack([xp[i * 160:i * 160 + 400] * win for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)).T ** 2            # (201, n_frames)
    mel = ref_filters(n_mels, 400) @ power[:, :-1]
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return (log + 4.0) / 4.0


# ---------------------------------------------------------------- log-mel

def test_filterbank_matches_reference_and_rows_have_unit_area():
    np.testing.assert_allclose(data.mel_filters(80), ref_filters(80, 400), rtol=1e-9, atol=1e-12)
    # at a fine frequency grid each Slaney-normalised triangle integrates to 1 (area in Hz)
    fine = data.mel_filters(80, n_fft=16000)   # 1 Hz bins
    np.testing.assert_allclose(fine.sum(1) * 1.0, 1.0, rtol=0.03)


def test_log_mel_equals_float64_reference():
    rng = np.random.default_rng(0)
    t = np.arange(int(1.234 * SR)) / SR
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))
    x[:3000] *= 1e-4   # a quiet stretch so the 8-decade floor is exercised
    got = data.log_mel_spectrogram(x.astype(np.float32))
    want = ref_log_mel(x.astype(np.float32))
    assert got.shape == (80, len(x) // 160) == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=2e-4)


def test_log_mel_batched_is_per_example():
    rng = np.random.default_rng(1)
    a = rng.standard_normal(8000).astype(np.float32)
    b = 1e-3 * rng.standard_normal(8000).astype(np.float32)   # 60 dB quieter
    batch = data.log_mel_spectrogram(torch.tensor(np.stack([a, b])))
    assert batch.shape == (2, 80, 50)
    for i, x in enumerate((a, b)):
        np.testing.assert_allclose(batch[i].numpy(), ref_log_mel(x), atol=2e-4)


@pytest.mark.parametrize("freq", [250.0, 1000.0, 3000.0, 6500.0])
def test_pure_tone_peaks_in_its_mel_bin(freq):
    t = np.arange(SR) / SR
    mel = data.log_mel_spectrogram(np.sin(2 * np.pi * freq * t).astype(np.float32))
    centers = np.array([ref_hz((i + 1) * ref_mel(8000) / 81) for i in range(80)])
    assert int(mel.mean(-1).argmax()) == int(np.abs(centers - freq).argmin())


# ---------------------------------------------------------------- load_audio

def test_load_audio_resamples_stereo_44k(tmp_path):
    t = np.arange(int(0.5 * 44100)) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    path = tmp_path / "tone.wav"
    sf.write(path, np.stack([tone, tone], 1), 44100, subtype="FLOAT")
    x = data.load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and abs(len(x) - 8000) <= 1
    mid = x[1000:-1000].astype(np.float64)   # away from the edges' filter transients
    spec = np.abs(np.fft.rfft(mid * np.hanning(len(mid))))
    peak_hz = spec.argmax() * SR / len(mid)
    assert abs(peak_hz - 1000) < SR / len(mid)
    assert np.sqrt(np.mean(mid ** 2)) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)


def test_resample_removes_content_above_new_nyquist():
    # a 10 kHz tone cannot exist at 16 kHz; linear interpolation would alias it to 6 kHz
    t = np.arange(44100) / 44100
    y = data.resample(np.sin(2 * np.pi * 10000 * t), 44100, SR)
    assert np.sqrt(np.mean(y[500:-500].astype(np.float64) ** 2)) < 0.01


def test_load_audio_upsamples_8k(tmp_path):
    t = np.arange(8000) / 8000
    path = tmp_path / "tone8k.wav"
    sf.write(path, 0.25 * np.sin(2 * np.pi * 440 * t), 8000, subtype="FLOAT")
    x = data.load_audio(path)
    want = 0.25 * np.sin(2 * np.pi * 440 * np.arange(16000) / SR)
    np.testing.assert_allclose(x[500:-500], want[500:-500], atol=2e-3)


def test_load_audio_bad_inputs(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        data.load_audio(missing)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF1234WAVEjunkjunkjunk" * 4)
    with pytest.raises(ValueError, match="garbage.wav"):
        data.load_audio(garbage)
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    with pytest.raises(ValueError, match="notes.txt"):
        data.load_audio(text)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0), SR)
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        data.load_audio(empty)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.0, np.nan, 0.1, np.inf]), SR, subtype="FLOAT")
    with pytest.raises(ValueError, match="nan.wav.*finite"):
        data.load_audio(nan)


# ---------------------------------------------------------------- synthesizer

def autocorr_pitch(x, fmin=60, fmax=400):
    x = x.astype(np.float64) - x.mean()
    n = 1 << int(np.ceil(np.log2(2 * len(x))))
    ac = np.fft.irfft(np.abs(np.fft.rfft(x, n)) ** 2)[:len(x)]
    lo, hi = int(SR / fmax), int(SR / fmin)
    return SR / (lo + int(np.argmax(ac[lo:hi])))


def test_synth_deterministic_under_seed():
    v = data.Voice(pitch_hz=150, noise=0.3, emotion="happy")
    a, b = data.synthesize("three plus four", v, 7), data.synthesize("three plus four", v, 7)
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert not np.array_equal(a, data.synthesize("three plus four", v, 8))


@pytest.mark.parametrize("pitch", [95.0, 140.0, 230.0])
def test_synth_pitch_by_autocorrelation(pitch):
    x = data.synthesize("aoa ooa alla amma", data.Voice(pitch_hz=pitch, tract_scale=1.1), 0)
    assert autocorr_pitch(x) == pytest.approx(pitch, rel=0.05)


def test_synth_duration_scales_with_rate():
    text = "the red fox likes seven green apples"
    slow = len(data.synthesize(text, data.Voice(rate=0.5), 0))
    normal = len(data.synthesize(text, data.Voice(rate=1.0), 0))
    fast = len(data.synthesize(text, data.Voice(rate=2.0), 0))
    assert slow / normal == pytest.approx(2.0, rel=0.05)
    assert normal / fast == pytest.approx(2.0, rel=0.08)


def test_synth_words_have_different_spectra():
    def spectrum(word, seed, pitch=120.0):
        m = data.log_mel_spectrogram(data.synthesize(word, data.Voice(pitch_hz=pitch), seed))
        m = m[:, m.max(0).values > m.max() - 1.0]   # speech frames only
        return m.mean(-1).numpy()
    same = np.abs(spectrum("seven", 0) - spectrum("seven", 1, 125.0)).mean()
    for other in ("blue", "four", "owl"):
        assert np.abs(spectrum("seven", 0) - spectrum(other, 0)).mean() > 3 * same


# ---------------------------------------------------------------- toy world

@pytest.fixture(scope="module")
def toy(tiny_data):
    paths = data.make_toy_data(tiny_data, seed=0, preset="tiny")  # made by conftest: the paths
    train, test = data.read_manifest(paths["train"]), data.read_manifest(paths["test"])
    return paths, train, test, data.load_tokenizer(paths["tokenizer"])


def test_toy_world_families_and_files(toy):
    paths, train, test, _ = toy
    for split in (train, test):
        tasks = {r["task"] for r in split}
        assert set(data.TEXT_TASKS) <= tasks and set(data.AUDIO_TASKS) <= tasks
        for r in split:
            assert os.path.isabs(r["audio"]) and os.path.exists(r["audio"])
            assert (r["teacher"] is None) == (r["kind"] == "audio")
    x = data.load_audio(test[0]["audio"])
    assert 0.5 < len(x) / SR < 6.0


def test_pools_are_disjoint_and_facts_are_taught_under_other_phrasings(toy):
    paths = toy[0]
    pools = {p: data.read_manifest(paths[p]) for p in data.POOLS}
    pools["text"] = data.read_manifest(paths["text"], audio=False)
    assert all(pools.values()) and not any("audio" in r for r in pools["text"])
    # no text-skill prompt lies in two pools (the teacher's unspoken pool included)
    prompts = {p: [r["transcript"] for r in rs if r["kind"] == "text"] for p, rs in pools.items()}
    for p, ps in prompts.items():
        assert len(set(ps)) == len(ps), f"a prompt repeats inside {p}"
    for p in prompts:
        for q in prompts:
            if p < q:
                assert not set(prompts[p]) & set(prompts[q]), f"{p} and {q} share prompts"
    every = [r for rs in pools.values() for r in rs]
    assert len({r["id"] for r in every}) == len(every)
    # unseen voices in val and test; train and align speak with the training speakers only
    heard = {r["voice"]["speaker"] for r in pools["train"]}
    assert {r["voice"]["speaker"] for r in pools["align"]} <= heard
    assert {r["voice"]["speaker"] for r in pools["test"]} - heard
    # facts: every align / val / test fact is taught in train, under a phrasing that pool never uses
    tpl_words = {w for tpls in data.FACT_TEMPLATES.values() for t in tpls for w in t.split()}
    entity = lambda r: [w for w in r["transcript"].split() if w not in tpl_words]
    taught = {(tuple(entity(r)), r["answer"]) for r in pools["train"] if r["task"] == "facts"}
    for p in ("align", "val", "test"):
        facts = [r for r in pools[p] if r["task"] == "facts"]
        assert facts
        for r in facts:
            assert len(entity(r)) == 1 and (tuple(entity(r)), r["answer"]) in taught


def test_toy_world_deterministic():
    a, b = data.build_world(3, "tiny"), data.build_world(3, "tiny")
    assert a == b and a != data.build_world(4, "tiny")


def test_audio_labels_follow_voice(toy):
    """Every audio question's answer is its voice's label, by the thresholds written out here
    (pitch from 160 Hz high, rate from 1.0 fast, noise from 0.1 noisy), not by data's own table."""
    def label(task, v):
        return {"pitch": "high" if v["pitch_hz"] >= 160 else "low",
                "rate": "fast" if v["rate"] >= 1 else "slow",
                "noise": "noisy" if v["noise"] >= 0.1 else "clean", "emotion": v["emotion"]}[task]
    _, train, test, _ = toy
    seen = {}
    for r in train + test:
        if r["kind"] != "audio":
            continue
        if r["task"] == "asr":
            assert r["answer"] == r["reference"] == r["transcript"]
        else:
            assert r["answer"] == r["reference"] == label(r["task"], r["voice"]), r["id"]
            seen.setdefault(r["task"], set()).add(r["answer"])
    # both sides of every threshold are asked about
    assert (seen["pitch"], seen["rate"], seen["noise"]) == ({"high", "low"}, {"fast", "slow"},
                                                            {"noisy", "clean"})
    assert len(seen["emotion"]) > 1
    voice = {"pitch_hz": 210.0, "rate": 0.85, "noise": 0.15, "emotion": "sad"}
    assert data.voice_labels(voice) == \
        {"pitch": "high", "rate": "slow", "noise": "noisy", "emotion": "sad"}
    # only the attributes a voice carries
    assert data.voice_labels({"pitch_hz": 120.0, "emotion": "happy"}) == {"pitch": "low",
                                                                         "emotion": "happy"}


@pytest.mark.parametrize("task, field, at, below, labels", [
    ("pitch", "pitch_hz", 160.0, 159.99, ("high", "low")),
    ("rate", "rate", 1.0, 0.999, ("fast", "slow")),
    ("noise", "noise", 0.1, 0.0999, ("noisy", "clean")),
])
def test_audio_label_thresholds_at_the_boundary(task, field, at, below, labels):
    label = data.AUDIO_LABELS[task]
    assert (label({field: at}), label({field: below})) == labels
    assert data.AUDIO_LABELS["emotion"]({"emotion": "sad"}) == "sad"


def test_scorers_known_values(toy):
    assert data.wer("a b c d", "a x c") == 0.5          # one substitution, one deletion
    assert data.wer("a b", "a b") == 0.0
    assert data.wer("a b", "a b c d e") == 1.5
    asr = {"task": "asr", "answer": "the red fox"}
    assert data.score(asr, "The red fox.") == 1.0
    assert data.score(asr, "a blue cat dog owl") == 0.0   # WER > 1 floors at 0
    assert data.score(asr, "the red box") == pytest.approx(2 / 3)
    rec = {"task": "arith", "answer": "nine"}
    assert data.extract_answer("three is ... . the answer is nine") == "nine"
    assert data.score(rec, "seven plus two is nine . the answer is nine") == 1.0
    assert data.score(rec, "nine") == 1.0
    assert data.score(rec, "the answer is nine . the answer is eight") == 0.0
    assert data.score(rec, "nineteen") == 0.0
    _, train, test, _ = toy
    for r in train + test:   # both response styles are correct answers
        assert data.score(r, r["reference"]) == 1.0
        if r["teacher"]:
            assert data.score(r, r["teacher"]) == 1.0 and r["teacher"] != r["reference"]


def test_arith_teacher_chain_is_correct():
    rng = np.random.default_rng(0)
    words = {data.number_words(k): k for k in range(100)}
    for _ in range(200):
        ex = data.arith_example(rng)
        toks = ex["transcript"][len("what is "):-2].split()
        # parse the words back into numbers and evaluate left to right
        items, cur = [], []
        for w in toks:
            if w in ("plus", "minus", "times"):
                items += [words[" ".join(cur)], w]
                cur = []
            else:
                cur.append(w)
        items.append(words[" ".join(cur)])
        acc = items[0]
        for op, b in zip(items[1::2], items[2::2]):
            acc = acc + b if op == "plus" else acc - b if op == "minus" else acc * b
        assert data.number_words(acc) == ex["answer"]


def test_tokenizer_round_trips_and_unknown_words(toy):
    paths, train, test, tok = toy
    world = data.World(os.path.dirname(paths["tokenizer"]))
    unk = tok.token_to_id(data.UNK)
    for r in train + test:
        for text in (r["transcript"], r["instruction"], r["reference"], r["teacher"]):
            if text:
                ids = tok.encode(text, add_special_tokens=False).ids
                assert unk not in ids
                assert tok.decode(ids) == text
        resp = data.encode_response(tok, r["teacher"] or r["reference"])
        assert world.decode(resp + [5, 6, 7]) == (r["teacher"] or r["reference"])
    ids = tok.encode("Zanzibar, 42 flamingos!", add_special_tokens=False).ids
    assert unk in ids
    assert [tok.token_to_id(s) for s in data.SPECIAL_TOKENS] == list(range(6))


def test_text_and_speech_prompts_share_response_tokens(toy):
    _, train, _, tok = toy
    audio_id, user, asst = (tok.token_to_id(s) for s in (data.AUDIO, data.USER, data.ASSISTANT))
    for r in train[:: max(1, len(train) // 50)] + [x for x in train if x["kind"] == "audio"][:10]:
        text_p, speech_p = data.encode_prompt(tok, r, "text"), data.encode_prompt(tok, r, "speech")
        resp = data.encode_response(tok, r["reference"])
        assert speech_p.count(audio_id) == 1 and audio_id not in text_p
        assert text_p[0] == speech_p[0] == user and text_p[-1] == speech_p[-1] == asst
        inst = tok.encode(r["instruction"], add_special_tokens=False).ids
        inst = inst if r["instruction"] else []
        trans = tok.encode(r["transcript"], add_special_tokens=False).ids
        assert text_p == [user] + trans + inst + [asst]
        assert speech_p == [user, audio_id] + inst + [asst]
        # the response ids, tokenized apart, are the tail of both full sequences
        assert (text_p + resp)[len(text_p):] == (speech_p + resp)[len(speech_p):] == resp
        assert resp[-1] == tok.token_to_id(data.END)


# ---------------------------------------------------------------- manifests and batching

def test_manifest_resolves_paths_and_reports_bad_lines(tmp_path):
    good = {"id": "u1", "audio": "clips/u1.wav", "transcript": "hello there"}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "u2"}) + "\n")
    recs = data.read_manifest(path)
    assert [r["id"] for r in recs] == ["u1", "u2"]
    assert recs[0]["audio"] == os.path.join(str(tmp_path), "clips", "u1.wav")
    assert recs[0]["instruction"] == "" and recs[0]["teacher"] is None
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "u2"}) + "\n"
                    + '{"id": "u3", "audio"\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:3:"):
        data.read_manifest(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "u4"}) + "\n")
    with pytest.raises(ValueError, match=r"mine\.jsonl:2:.*audio"):
        data.read_manifest(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"mine\.jsonl:1:"):
        data.read_manifest(path)


def test_duplicate_ids_are_refused_with_both_lines(tmp_path, tiny_data):
    rec = {"id": "u1", "audio": "a.wav", "transcript": "hi"}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "u2"}) + "\n"
                    + json.dumps(rec) + "\n")
    with pytest.raises(ValueError,
                       match=r"mine\.jsonl:3: id 'u1' is already used at .*mine\.jsonl:1"):
        data.read_manifest(path)
    # across manifests: a test clip with a train clip's id would be given that clip's cached audio
    user = tmp_path / "user"
    shutil.copytree(tiny_data, user)
    train_line = (user / "train.jsonl").read_text().splitlines()[0]
    test_lines = (user / "test.jsonl").read_text().splitlines()
    test_lines[1] = json.dumps({**json.loads(test_lines[1]), "id": json.loads(train_line)["id"]})
    (user / "test.jsonl").write_text("\n".join(test_lines) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:2: id .* already used at .*train\.jsonl:1"):
        data.World(str(user))


def test_collate():
    ids, lens = data.pad([[5, 6, 7], [8], [9, 10]], 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]] and lens.tolist() == [3, 1, 2]
    assert ids.dtype == lens.dtype == torch.long
    a, b = torch.randn(80, 7), torch.randn(80, 4)
    mels, mel_lens = data.collate_mels([a, b])
    assert mels.shape == (2, 80, 7) and mel_lens.tolist() == [7, 4]
    assert torch.equal(mels[0], a) and torch.equal(mels[1, :, :4], b)
    assert torch.all(mels[1, :, 4:] == 0)


def test_world_batches_and_per_encoder_features(toy, tiny_data):
    world = data.World(tiny_data)
    recs = [r for r in world.train if r["kind"] == "text"][:3]
    b = world.batch(recs, [r["reference"] for r in recs])
    assert b.feats is None and b.mel_lens.tolist() == [world.mel(r).shape[-1] for r in recs]
    for i, r in enumerate(recs):  # each row: the clip's own log-mel, then zeros
        mel = data.log_mel_spectrogram(data.load_audio(r["audio"]))
        assert torch.equal(b.mels[i, :, :b.mel_lens[i]], mel)
        assert not b.mels[i, :, mel.shape[-1]:].any()
        text = data.encode_prompt(world.tok, r, "text")
        assert b.text_ids[i].tolist() == text + [world.pad_id] * (b.text_ids.shape[1] - len(text))
    assert b.text_lens.tolist() == [len(data.encode_prompt(world.tok, r, "text")) for r in recs]
    assert (b.speech_ids == world.audio_id).sum(1).tolist() == [1, 1, 1]
    response = data.encode_response(world.tok, recs[0]["reference"])
    assert b.response_ids[0, :b.response_lens[0]].tolist() == response
    assert world.batch(recs, text=False).text_ids is None
    # a frozen encoder's outputs are cached per encoder: a second encoder never reads the first's
    enc_cfg, _, _ = model.make_configs("tiny", world.tok.get_vocab_size())
    torch.manual_seed(0)
    enc_a = model.AudioEncoder(**asdict(enc_cfg)).eval()
    enc_b = model.AudioEncoder(**asdict(enc_cfg)).eval()
    fa = world.batch(recs, text=False, encoder=enc_a)
    fb = world.batch(recs, text=False, encoder=enc_b)
    assert fa.mels is None and fa.feat_lens.tolist() == (b.mel_lens // 2).tolist()
    with torch.no_grad():
        alone, _ = enc_b(b.mels[:1, :, :b.mel_lens[0]])
    torch.testing.assert_close(fb.feats[0, :fb.feat_lens[0]], alone[0], rtol=0, atol=1e-5)
    assert not torch.allclose(fa.feats, fb.feats)
    # the cache, again
    assert torch.equal(world.batch(recs, text=False, encoder=enc_a).feats, fa.feats)



@pytest.mark.parametrize("change, needle", [
    ({"answer": 7}, "field 'answer' is 7; expected a string"),
    ({"voice": "loud"}, "field 'voice' is \"loud\"; expected an object of voice fields"),
    ({"task": None}, "field 'task' is null; expected a string"),
    ({"instruction": 3}, "field 'instruction' is 3; expected a string"),
    ({"teacher": 3}, "field 'teacher' is 3; expected a string or null"),
    ({"reference": ["a"]}, "field 'reference' is [\"a\"]; expected a string or null"),
    ({"voice": {"pitch_hz": "high"}}, "field 'voice.pitch_hz' is \"high\"; expected a number"),
    ({"voice": {"noise": True}}, "field 'voice.noise' is true; expected a number"),
    ({"voice": {"emotion": "angry"}},
     "field 'voice.emotion' is \"angry\"; expected one of neutral, happy, sad"),
])
def test_manifest_fields_of_the_wrong_type_are_refused_by_file_line_and_field(tmp_path, change,
                                                                              needle):
    good = {"id": "u1", "audio": "u1.wav", "transcript": "hello there", "teacher": None,
            "voice": {"pitch_hz": 120}}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "u2", **change}) + "\n")
    with pytest.raises(ValueError) as e:
        data.read_manifest(path)
    assert str(e.value) == f"{path}:2: {needle}"
    path.write_text(json.dumps(good) + "\n")
    assert data.read_manifest(path)[0]["voice"] == {"pitch_hz": 120}  # the good line alone is read


def test_a_manifest_that_is_not_utf8_is_refused_by_line(tmp_path):
    path = tmp_path / "mine.jsonl"
    record = {"id": "u1", "audio": "u1.wav", "transcript": "café"}
    line = json.dumps(record, ensure_ascii=False).encode()
    latin1 = line.replace(b'"u1"', b'"u2"').replace("é".encode(), b"\xe9")
    path.write_bytes(line + b"\n" + latin1 + b"\n")
    column = line.index("é".encode()) + 1  # the same in both lines: "u1" and "u2" are as long
    with pytest.raises(ValueError,
                       match=rf"mine\.jsonl:2: not UTF-8 \(byte 0xe9 at column {column}\)"):
        data.read_manifest(path)
    path.write_bytes(line + b"\n")
    assert data.read_manifest(path)[0]["transcript"] == "café"


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl"])
def test_an_empty_train_or_test_manifest_is_refused_when_read(tmp_path, tiny_data, name):
    user = tmp_path / "user"
    user.mkdir()
    for f in ("train.jsonl", "test.jsonl", "tokenizer.json"):
        shutil.copy(os.path.join(tiny_data, f), user / f)
    (user / name).write_text("\n")
    with pytest.raises(ValueError, match=rf"{name}: no records; expected one JSON object per line"):
        data.World(str(user))


def test_check_clip_bounds_are_what_the_log_mel_and_encoder_take(tmp_path):
    """The shortest clip check_clip passes goes through the log-mel and an encoder (one frame
    out); one sample less is refused; the longest fills the encoder's positions exactly."""
    enc = model.AudioEncoder(**vars(model.make_configs("tiny", 10)[0]))
    for n in (data.MIN_SAMPLES - 1, data.MIN_SAMPLES):
        sf.write(tmp_path / f"{n}.wav", np.zeros(n, dtype=np.float32), data.SAMPLE_RATE)
    data.check_clip(str(tmp_path / f"{data.MIN_SAMPLES}.wav"), "m.jsonl:1", 30)
    too_short = (r"m\.jsonl:1: .*399\.wav: 399 samples at 16000 Hz \(0\.025 s\); "
                 r"expected 25 ms to 30 s")
    with pytest.raises(ValueError, match=too_short):
        data.check_clip(str(tmp_path / f"{data.MIN_SAMPLES - 1}.wav"), "m.jsonl:1", 30)
    x, lens = enc(data.log_mel_spectrogram(np.zeros(data.MIN_SAMPLES))[None])
    assert x.shape[1] == 1 and lens.tolist() == [1]
    longest = round(data.encoder_seconds(enc.n_ctx) * data.SAMPLE_RATE)
    assert longest == 480000  # Whisper's 30 s
    x, _ = enc(data.log_mel_spectrogram(np.zeros(longest))[None])
    assert x.shape[1] == enc.n_ctx


@pytest.mark.parametrize("name", ["bad.flac", "bad.wav"])
def test_a_clip_with_a_valid_header_and_a_corrupt_body_is_found_by_name_before_training(
        tmp_path, tiny_data, name):
    """check_clips(decode=True) decodes every clip in full: a FLAC whose frames are garbage, or a
    float WAV holding NaN, passes the header check and is refused by its manifest's file:line,
    its path and what was expected."""
    user = tmp_path / "user"
    shutil.copytree(tiny_data, user)
    x = (0.3 * np.sin(np.arange(SR) / 10)).astype(np.float32)
    if name == "bad.flac":
        sf.write(user / name, x, SR)
        body = bytearray((user / name).read_bytes())
        body[len(body) // 3:-100] = bytes((7 * b + 13) % 256 for b in body[len(body) // 3:-100])
        (user / name).write_bytes(bytes(body))
        expected = "cannot be read as audio"
    else:
        x[SR // 2] = np.nan
        sf.write(user / name, x, SR, subtype="FLOAT")
        expected = "audio holds NaN or infinite samples; expected finite values"
    lines = (user / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "audio": name})
    (user / "train.jsonl").write_text("\n".join(lines) + "\n")
    world = data.World(str(user))
    world.check_clips(30)  # the header alone is fine
    with pytest.raises(ValueError) as e:
        world.check_clips(30, decode=True)
    assert str(e.value).startswith(f"{user / 'train.jsonl'}:3: {user / name}: {expected}")


def full_disk(f, *args, **kwargs):
    """A writer that gets some bytes out, then finds the disk full."""
    f.write(b"RIFF" + bytes(100))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_leaves_no_partial_file_and_one_error_naming_it(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("the old manifest\n")
    with pytest.raises(OSError) as e:
        data.atomic_write(str(path), full_disk, "wb")
    assert e.value.errno == errno.ENOSPC
    assert str(e.value) == f"[Errno 28] {path}: cannot be written (No space left on device)"
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert os.listdir(tmp_path) == ["train.jsonl"] and path.read_text() == "the old manifest\n"


def test_a_full_disk_while_making_the_clips_stops_the_generation_with_one_error(
        tmp_path, monkeypatch):
    """In this process (one core): the first clip's write fails; the error names that clip, no
    .tmp file is left, and the generation is known as cut short."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(sf, "write", full_disk)
    out = tmp_path / "d"
    first = next(r["audio"] for r in data.build_world(0, "tiny") if "audio" in r)
    with pytest.raises(OSError) as e:
        data.make_toy_data(str(out), seed=0, preset="tiny")
    assert str(e.value) == f"[Errno 28] {out / first}: cannot be written (No space left on device)"
    assert e.value.__cause__ is None
    assert not list(out.rglob("*.tmp")) and not (out / first).exists()
    assert (out / data.UNFINISHED).exists() and not (out / "done.json").exists()


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_clip_a_worker_cannot_write_ends_the_generation_with_one_error_naming_it(
        tmp_path, monkeypatch, capfd):
    """In the clip workers (two, on any machine): a directory where a clip goes makes its
    rename fail there; the error comes back naming the clip, no worker traceback under it, no
    .tmp file left and no worker left running."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    out = tmp_path / "d"
    clip = [r["audio"] for r in data.build_world(0, "tiny") if "audio" in r][40]
    (out / clip).mkdir(parents=True)
    before = set(multiprocessing.active_children())
    with pytest.raises(OSError) as e:
        data.make_toy_data(str(out), seed=0, preset="tiny")
    assert str(e.value) == f"[Errno 21] {out / clip}: cannot be written (Is a directory)"
    assert e.value.__cause__ is None and not list(out.rglob("*.tmp"))
    for w in set(multiprocessing.active_children()) - before:
        w.join(timeout=30)
        assert not w.is_alive()
    assert "Traceback" not in capfd.readouterr().err


def children(pid):
    """The ids of the processes whose parent is pid (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields_after_name = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields_after_name[1]) == pid:
            out.append(int(entry))
    return out


def running(pid):
    """Whether process pid exists and is not a zombie (an ended child nobody has reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_clip_workers_end_when_their_parent_is_killed(tmp_path, sig):
    """kill -9 (or SIGTERM) of a generation once its workers write clips: within a few seconds
    none of its child processes (the clip workers, multiprocessing's resource tracker) is left,
    and no clip is written after."""
    out, script = tmp_path / "d", tmp_path / "gen.py"
    root = os.path.dirname(os.path.abspath(data.__file__))
    script.write_text(f"import os, sys\nsys.path.insert(0, {root!r})\nimport data\n"
                      "if __name__ == '__main__':\n"
                      "    os.sched_getaffinity = lambda pid: {0, 1}  # two workers\n"
                      "    data.PRESETS['long'] = dict(data.PRESETS['tiny'], asr=dict(train=3000, "
                      "test=10))\n"
                      f"    data.make_toy_data({str(out)!r}, seed=0, preset='long')\n")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "wavs").is_dir() or not os.listdir(out / "wavs"):
            assert p.poll() is None and time.time() < deadline
            time.sleep(0.1)
        workers = children(p.pid)
        assert len(workers) >= 2
    finally:
        p.send_signal(sig)
        p.wait()
    deadline = time.time() + 10
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if running(w)]
    made = sorted(os.listdir(out / "wavs"))
    time.sleep(1)
    assert sorted(os.listdir(out / "wavs")) == made


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_ctrl_c_while_the_clip_workers_start_is_held_not_lost(tmp_path, monkeypatch, capfd):
    """A Ctrl-C that arrives while make_toy_data starts its clip workers (sent here right after
    the first submit, when the workers are being born) stops the generation all the same: held
    while they start, then raised, the workers ended, the generation known as cut short, and no
    worker prints a traceback. A thread that does not block SIGINT (as torch's do) may receive
    it; the pause after the kill gives this thread the time to raise KeyboardInterrupt
    mid-start (before the append) if the hold does not hold."""
    submit, sent = ProcessPoolExecutor.submit, []

    def submit_then_ctrl_c(self, *args, **kwargs):
        future = submit(self, *args, **kwargs)
        if not sent:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            sent.append(True)
        return future
    monkeypatch.setattr(ProcessPoolExecutor, "submit", submit_then_ctrl_c)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    before = set(multiprocessing.active_children())
    done = threading.Event()
    other = threading.Thread(target=done.wait)  # born with SIGINT unblocked
    other.start()
    # as in a terminal, even if pytest runs in the background
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            data.make_toy_data(str(tmp_path / "d"), seed=0, preset="tiny")
    finally:
        signal.signal(signal.SIGINT, handler)
        done.set()
        other.join()
    assert sent and (tmp_path / "d" / data.UNFINISHED).exists()
    assert not (tmp_path / "d" / "done.json").exists()
    for w in set(multiprocessing.active_children()) - before:
        w.join(timeout=30)
        assert not w.is_alive()
    assert "Traceback" not in capfd.readouterr().err
