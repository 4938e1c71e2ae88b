"""Data for X-OPD: audio I/O and Whisper's log-mel, a formant speech synthesizer, the toy world
and its scoring, the tokenizer and chat format, manifests, shared helpers, batches and the World."""
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache, reduce

import numpy as np
import soundfile as sf
import torch
from torch.nn.utils.rnn import pad_sequence

# -----------------------------------------------------------------------------
# audio: Whisper's constants, reading clips, the log-mel spectrogram

SAMPLE_RATE = 16000  # Hz; speech has little above 8 kHz, and Whisper was trained at 16 kHz
N_FFT = 400          # 25 ms window at 16 kHz
HOP_LENGTH = 160     # 10 ms at 16 kHz -> 100 mel frames per second
N_MELS = 80          # Whisper v1-v2 and large-v3-turbo use 128; 80 is the classic size
# the shortest clip: 25 ms, two mel frames, one encoder frame (conv2 halves them); a shorter one
# crashes the STFT's reflect padding or leaves the encoder nothing
MIN_SAMPLES = N_FFT
# Slaney's mel scale (librosa's default): 3 mels per 200 Hz below 1 kHz, then 27 per factor 6.4
F_SP, MIN_LOG_HZ = 200.0 / 3, 1000.0
MIN_LOG_MEL, LOGSTEP = MIN_LOG_HZ / F_SP, math.log(6.4) / 27.0


def resample(audio, sr_in, sr_out=SAMPLE_RATE, zero_crossings=16, rolloff=0.95, beta=8.6):
    """Band-limited resampling of a 1-D signal by a Kaiser-windowed sinc, one table per phase."""
    x = np.asarray(audio, dtype=np.float64)
    if sr_in == sr_out:
        return x.astype(np.float32)
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = int(sr_out) // g, int(sr_in) // g
    fc = rolloff * min(1.0, sr_out / sr_in)      # cutoff as a fraction of the input Nyquist
    half = int(math.ceil(zero_crossings / fc))   # filter half-length in input samples
    j = np.arange(-half + 1, half + 1)           # tap offsets around floor(t)
    d = np.arange(up)[:, None] / up - j          # (up, taps) distance from t to each tap
    kaiser = np.i0(beta * np.sqrt(np.clip(1 - (d / half) ** 2, 0, 1))) / np.i0(beta)
    table = fc * np.sinc(fc * d) * kaiser        # (up, taps); DC gain ~1
    n_out = -(-len(x) * up // down)              # ceil
    xp = np.pad(x, (half, half + 1))             # zeros outside the signal
    out = np.empty(n_out)
    for start in range(0, n_out, 8192):          # chunks bound the (n, taps) temporaries
        n = np.arange(start, min(start + 8192, n_out))
        k = (n * down) // up                     # floor(t)
        out[start:start + len(n)] = (xp[k[:, None] + j + half] * table[(n * down) % up]).sum(1)
    return out.astype(np.float32)


def encoder_seconds(n_ctx):
    """The longest clip an encoder of n_ctx positions reads whole: two mel frames per position."""
    return 2 * n_ctx * HOP_LENGTH / SAMPLE_RATE


def _read(path, decode=True):
    """A clip decoded in full -> (float32 (n_samples, channels), rate), or its sf.info header
    when not decode; any failure, or no or non-finite samples, is one error naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such audio file (expected a WAV/FLAC/OGG file)")
    try:
        if not decode:
            return sf.info(path)
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"{path}: cannot be read as audio ({e}); expected a file soundfile "
                         f"can decode (WAV, FLAC, OGG, ...)") from None
    if data.size == 0:
        raise ValueError(f"{path}: audio is empty (0 samples); expected at least one sample")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: audio holds NaN or infinite samples; expected finite values")
    return data, sr


def check_clip(path, where, max_seconds, decode=False):
    """One clip is readable and MIN_SAMPLES to max_seconds (the encoder's window) long; decode:
    its body decodes too (a valid header over a corrupt body). ValueError naming `where`."""
    try:
        info = _read(path, decode=False)
        if decode:
            _read(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    seconds = info.frames / info.samplerate
    if not MIN_SAMPLES / SAMPLE_RATE <= seconds <= max_seconds:
        raise ValueError(f"{where}: {path}: {info.frames} samples at {info.samplerate} Hz "
                         f"({seconds:.3f} s); expected {1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms "
                         f"to {max_seconds:g} s (the audio encoder's window)")


def load_audio(path):
    """Any file soundfile reads -> float32 mono at 16 kHz (channels averaged, resampled)."""
    data, sr = _read(os.fspath(path))
    return resample(data.mean(axis=1), sr)


@lru_cache(maxsize=8)
def mel_filters(n_mels=N_MELS, n_fft=N_FFT, sr=SAMPLE_RATE):
    """(n_mels, n_fft // 2 + 1) Slaney mel filters: Whisper's (librosa.filters.mel's) values."""
    def hz_to_mel(f):
        log_part = MIN_LOG_MEL + np.log(np.maximum(f, 1e-10) / MIN_LOG_HZ) / LOGSTEP
        return np.where(f >= MIN_LOG_HZ, log_part, f / F_SP)

    def mel_to_hz(m):
        log_part = MIN_LOG_HZ * np.exp(LOGSTEP * (m - MIN_LOG_MEL))
        return np.where(m >= MIN_LOG_MEL, log_part, m * F_SP)

    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)                       # (F,)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    lower = (fft_freqs[None, :] - mel_f[:-2, None]) / np.diff(mel_f)[:-1, None]   # rising edge
    upper = (mel_f[2:, None] - fft_freqs[None, :]) / np.diff(mel_f)[1:, None]     # falling edge
    weights = np.maximum(0.0, np.minimum(lower, upper))               # (n_mels, F)
    return weights * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]


def log_mel_spectrogram(audio, n_mels=N_MELS):
    """audio: (..., n_samples) at 16 kHz -> log-mel (..., n_mels, n_samples // 160): Whisper's
    recipe without the 30 s padding; the 8-decade floor is per clip, not per batch."""
    x = torch.as_tensor(audio, dtype=torch.float32)
    lead, n = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, n)                                                  # (B, n_samples)
    window = torch.hann_window(N_FFT, device=x.device)
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                      return_complex=True)                                # (B, F, n // 160 + 1)
    power = stft[..., :-1].abs() ** 2                                     # drop the last frame
    filters = torch.from_numpy(mel_filters(n_mels)).to(x.device, torch.float32)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()            # (B, n_mels, T)
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    log_spec = (log_spec + 4.0) / 4.0
    return log_spec.reshape(*lead, n_mels, log_spec.shape[-1])


# -----------------------------------------------------------------------------
# the formant synthesizer
#
# Each letter is one sound unit ("seven" is s-e-v-e-n): a vowel or sonorant (voiced formants), a
# fricative (a noise band; z v j voiced too, h shaped by the formants) or a stop (a closure, a
# "voice bar" for b d g, then a burst). Units give targets per 8 ms frame, smoothed so formants
# glide. Source-filter: each frame's glottal pulses (at the emotion's pitch contour) and noise
# are shaped in the spectrum by formant resonances (scaled by 1 / tract_scale) or a noise band,
# then overlap-added, leveled and mixed with background noise.

SYN_FRAME, SYN_HOP = 256, 128   # 16 ms frames, 8 ms hop: periodic Hann at 50% overlap sums to 1
# letter: (kind, (F1, F2, F3) Hz, (noise center, noise width) Hz, duration ms)
UNITS = {
    "a": ("vowel", (750, 1200, 2500), None, 95),
    "e": ("vowel", (500, 1900, 2550), None, 90),
    "i": ("vowel", (300, 2300, 3000), None, 85),
    "o": ("vowel", (500, 850, 2400), None, 95),
    "u": ("vowel", (320, 800, 2250), None, 90),
    "y": ("vowel", (400, 1550, 2200), None, 85),
    "l": ("sonorant", (380, 1100, 2800), None, 60),
    "r": ("sonorant", (450, 1250, 1650), None, 60),
    "m": ("sonorant", (280, 950, 2200), None, 65),
    "n": ("sonorant", (280, 1650, 2600), None, 65),
    "w": ("sonorant", (300, 620, 2200), None, 60),
    "z": ("vfricative", (300, 1600, 2500), (5500, 2500), 70),
    "v": ("vfricative", (300, 1200, 2300), (3500, 4000), 65),
    "j": ("vfricative", (300, 2000, 2700), (2800, 1200), 70),
    "s": ("fricative", (500, 1500, 2500), (6000, 2500), 80),
    "f": ("fricative", (500, 1500, 2500), (4500, 6000), 75),
    "h": ("aspirate", (600, 1500, 2500), None, 60),
    "x": ("fricative", (500, 1500, 2500), (3300, 900), 80),
    "c": ("fricative", (500, 1500, 2500), (2400, 700), 70),
    "q": ("fricative", (500, 1500, 2500), (1500, 600), 70),
    "p": ("stop", (400, 1000, 2300), (900, 900), 60),
    "t": ("stop", (400, 1700, 2600), (4500, 2500), 60),
    "k": ("stop", (400, 1500, 2400), (2000, 800), 60),
    "b": ("vstop", (300, 900, 2200), (900, 900), 60),
    "d": ("vstop", (300, 1700, 2600), (4000, 2500), 60),
    "g": ("vstop", (300, 1500, 2400), (2200, 800), 60),
}
BANDWIDTHS = np.array([90.0, 110.0, 160.0])   # formant bandwidths, Hz
FORMANT_GAINS = np.array([1.0, 0.6, 0.35])    # falling spectral tilt of the glottal source
WORD_PAUSE_MS, PUNCT_PAUSE_MS, EDGE_SILENCE_MS = 50, 90, 100
EMOTIONS = ("neutral", "happy", "sad")
EMOTION_ENERGY = {"neutral": 1.0, "happy": 1.4, "sad": 0.6}
# the pitch multiplier at t (n,) in the utterance and w (n,) in the word: neutral declines gently,
# happy is raised with an accent on every word, rising; sad is lowered, flat and falling
PITCH_CONTOURS = {"neutral": lambda t, w: 1.0 + 0.04 * (0.5 - t),
                  "happy": lambda t, w: 1.12 * (1.0 + 0.10 * np.sin(np.pi * w)) * (1.0 + 0.06 * t),
                  "sad": lambda t, w: 0.92 * (1.0 + 0.08 * (0.5 - t))}
# a unit kind's sources: voice amplitude, noise amplitude, noise shaped by the formants (asp)
KIND_SOURCES = {"vowel": (1.0, 0.0, 0.0), "sonorant": (0.45, 0.0, 0.0), "aspirate": (0.0, 0.6, 1.0),
                "vfricative": (0.3, 0.5, 0.0), "fricative": (0.0, 0.7, 0.0)}


@dataclass
class Voice:
    pitch_hz: float = 120.0      # mean fundamental frequency before the emotion's contour
    tract_scale: float = 1.0     # vocal-tract length relative to average; formants scale by 1/this
    rate: float = 1.0            # speaking rate; every duration is divided by it
    emotion: str = "neutral"     # shapes the pitch contour, energy and breathiness
    noise: float = 0.0           # background noise RMS / speech RMS (0 = clean)
    loudness: float = 1.0        # overall level
    speaker: str = ""            # speaker id, for the unseen-speaker test split


def _unit_track(text, rate):
    """Text -> per-frame targets: F (n_frames, 3), av, an, nc, nw, asp and word_pos (n_frames,)."""
    frames = lambda ms: max(2, int(round(ms / 8.0 / rate)))   # 8 ms per frame
    rows = []   # ((F, noise center, noise width, voice amp, noise amp, asp), word_pos)
    silence = ((500, 1500, 2500), 3000, 3000, 0.0, 0.0, 0.0)

    def add(n, spec, word_pos=-1.0):
        pos = np.linspace(*word_pos, n) if isinstance(word_pos, tuple) else np.full(n, word_pos)
        rows.extend((spec, p) for p in pos)

    add(frames(EDGE_SILENCE_MS), silence)
    for token in re.findall(r"[a-z]+|[^a-z\s]", text.lower()):
        if not token.isalpha():   # punctuation (and digits, unknown symbols): a pause
            add(frames(PUNCT_PAUSE_MS), silence)
            continue
        units = [UNITS[c] for c in token]
        total = sum(frames(u[3]) for u in units)
        pos = 0
        for kind, F, band, ms in units:
            n = frames(ms)
            span = (pos / total, (pos + n) / total)   # position in the word, for the contour
            pos += n
            nc, nw = band if band else (3000, 3000)
            if kind in KIND_SOURCES:
                add(n, (F, nc, nw, *KIND_SOURCES[kind]), span)
            else:   # stops: closure (a voice bar for b d g) then burst
                n_burst = max(2, n // 3)
                bar = 0.15 if kind == "vstop" else 0.0
                add(n - n_burst, ((250, 900, 2300), nc, nw, bar, 0.0, 0.0), (span[0], span[0]))
                add(n_burst, (F, nc, nw, 0.0, 0.9, 0.0), (span[1], span[1]))
        add(frames(WORD_PAUSE_MS), silence)
    add(frames(EDGE_SILENCE_MS), silence)
    names = ("F", "nc", "nw", "av", "an", "asp")
    track = {k: np.array([s[i] for s, _ in rows], dtype=np.float64) for i, k in enumerate(names)}
    track["word_pos"] = np.array([p for _, p in rows])
    return track


def _smooth(x, n):
    """Moving average over n frames along axis 0 (edges repeated)."""
    pad = [(n // 2, n - 1 - n // 2)] + [(0, 0)] * (x.ndim - 1)
    c = np.cumsum(np.pad(x, pad, mode="edge"), axis=0)
    c = np.concatenate([np.zeros_like(c[:1]), c])
    return (c[n:] - c[:-n]) / n


def synthesize(text, voice, seed=0):
    """Speak `text` with `voice` -> float32 waveform at 16 kHz. Deterministic for a seed."""
    if voice.emotion not in PITCH_CONTOURS:
        raise ValueError(f"unknown emotion {voice.emotion!r}; expected one of {EMOTIONS}")
    rng = np.random.default_rng(seed)
    tr = _unit_track(text, voice.rate)
    n = len(tr["av"])
    F = _smooth(tr["F"], 5) / voice.tract_scale                         # (n, 3) glide between units
    av, an = _smooth(tr["av"], 3), _smooth(tr["an"], 3)
    if voice.emotion == "sad":                                          # breathy voice
        an = an + 0.12 * av
        tr["asp"] = np.maximum(tr["asp"], (tr["av"] > 0).astype(float))
    # pitch: contour x slow random drift (+-1.5%), interpolated to samples
    t = np.linspace(0.0, 1.0, n)
    drift = 1.0 + 0.015 * _smooth(rng.standard_normal(n), 15) * np.sqrt(15)
    contour = PITCH_CONTOURS[voice.emotion](t, np.clip(tr["word_pos"], 0.0, 1.0))
    f0 = voice.pitch_hz * contour * drift   # (n,)
    n_samples = (n + 1) * SYN_HOP
    f0_s = np.interp(np.arange(n_samples), np.arange(n) * SYN_HOP + SYN_FRAME // 2, f0)
    pulses = np.diff(np.floor(np.cumsum(f0_s / SAMPLE_RATE)), prepend=0.0)  # 1 at each closure
    noise_src = 0.12 * rng.standard_normal(n_samples)
    # frame both sources: (n, SYN_FRAME) -> spectra (n, SYN_FRAME // 2 + 1)
    win = np.hanning(SYN_FRAME + 1)[:-1]                               # periodic Hann
    view = lambda x: np.lib.stride_tricks.sliding_window_view(x, SYN_FRAME)[::SYN_HOP][:n]
    Sv, Sn = np.fft.rfft(view(pulses) * win), np.fft.rfft(view(noise_src) * win)
    f = np.fft.rfftfreq(SYN_FRAME, 1.0 / SAMPLE_RATE)                   # (K,)
    bw = BANDWIDTHS / voice.tract_scale
    res = FORMANT_GAINS / (1.0 + ((f[None, :, None] - F[:, None, :]) / (bw / 2)) ** 2)  # (n, K, 3)
    Ev = 3.0 * res.sum(-1)                                             # formant envelope (n, K)
    band = np.exp(-0.5 * ((f[None, :] - tr["nc"][:, None] / voice.tract_scale)
                          / (tr["nw"][:, None] / 2)) ** 2)
    En = np.where(tr["asp"][:, None] > 0, Ev, 2.0 * band)              # noise shaping (n, K)
    Y = av[:, None] * Sv * Ev + an[:, None] * Sn * En
    y = np.fft.irfft(Y, SYN_FRAME)                                     # (n, SYN_FRAME)
    out = np.zeros(n_samples)                                          # overlap-add, hop = half
    out.reshape(-1, SYN_HOP)[:-1] += y[:, :SYN_HOP]
    out.reshape(-1, SYN_HOP)[1:] += y[:, SYN_HOP:]
    rms = np.sqrt(np.mean(out ** 2)) + 1e-12
    out *= 0.05 * EMOTION_ENERGY.get(voice.emotion, 1.0) * voice.loudness / rms
    out += voice.noise * np.sqrt(np.mean(out ** 2)) * rng.standard_normal(n_samples)  # background
    out *= 0.99 / max(0.99, np.abs(out).max())  # a peak above 0.99 scaled down to it
    return out.astype(np.float32)


# -----------------------------------------------------------------------------
# the toy world: text skills the teacher has, audio skills the speech model has, and the clips
#
# An example's `teacher` response is the teacher's style (a short chain of thought, then "the
# answer is X"); its `reference`, as in real datasets, is the bare answer, which the SFT baseline
# trains on. Both score the same with extract_answer.

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "goat", "horse", "mouse", "duck", "fish",
           "lion"]
CITIES = ["lima", "oslo", "paris", "cairo", "tokyo", "rome", "delhi", "quito", "dakar", "hanoi",
          "perth", "bern"]
ARITH_MAX = 30   # every intermediate result stays in 0..30: ~600 facts a small model learns
# facts: each (entity, attribute) has eight phrasings, a random four of them in train, one each in
# align, val and test: the fact is known, but an align / val / test prompt is never trained on
FACT_TEMPLATES = {
    "city": ["where does {e} live ?", "in which city does {e} live ?",
             "what is the home city of {e} ?", "which city is {e} from ?",
             "tell me the city where {e} lives .", "what city is home to {e} ?",
             "where is the home of {e} ?", "name the city of {e} ."],
    "color": ["what color does {e} like ?", "what is the favorite color of {e} ?",
              "which color is liked by {e} ?", "name the color that {e} likes .",
              "tell me the color {e} likes .", "which color does {e} love ?",
              "what is the color that {e} likes best ?", "what color is the favorite of {e} ?"],
    "pet": ["what pet does {e} have ?", "which animal does {e} keep ?",
            "what is the pet of {e} ?", "name the animal that {e} owns .",
            "tell me the pet of {e} .", "which pet does {e} own ?",
            "what animal lives with {e} ?", "what kind of animal does {e} have ?"],
}
# attribute: (its values, the teacher's sentence before "the answer is")
FACT_VALUES = {"city": (CITIES, "{e} lives in {v}"), "color": (COLORS, "{e} likes {v}"),
               "pet": (ANIMALS, "{e} has a {v}")}
FACT_POOLS = ("train",) * 4 + ("align", "val", "test")   # 7 of the 8 phrasings are used

AUDIO_INSTRUCTIONS = {"asr": "transcribe the speech .",
                      "pitch": "is the voice of the speaker high or low ?",
                      "rate": "is the speaker talking fast or slow ?",
                      "emotion": "does the speaker sound neutral , happy or sad ?",
                      "noise": "is the recording clean or noisy ?"}
# a voice's label for each question (thresholds sit in the gaps between the sampled ranges)
AUDIO_LABELS = {"pitch": lambda v: "high" if v["pitch_hz"] >= 160 else "low",
                "rate": lambda v: "fast" if v["rate"] >= 1.0 else "slow",
                "emotion": lambda v: v["emotion"],
                "noise": lambda v: "noisy" if v["noise"] >= 0.1 else "clean"}
VOICE_FIELDS = {"pitch": "pitch_hz", "rate": "rate", "emotion": "emotion", "noise": "noise"}
# a clip's background noise RMS / speech RMS: noisy is 12-18 dB SNR (chosen on val:
# docs/protocol.md, amendment 6); AUDIO_LABELS' 0.1 lies in the gap between the two ranges
NOISE = {"clean": (0.0, 0.02), "noisy": (0.12, 0.25)}
TEXT_TASKS, AUDIO_TASKS = ("arith", "instruct", "facts"), tuple(AUDIO_INSTRUCTIONS)
# speakers spk00, spk01, ...: (pitch Hz, tract scale) ranges of the even ones and the odd ones
SPEAKER_RANGES = (((80, 125), (1.0, 1.2)), ((190, 260), (0.85, 1.05)))

# Every text prompt lies in one pool: text (unspoken, the teacher's alone), train (spoken, the
# omni stage's; the teacher reads it too), align (the pairs every alignment method uses), val
# (choosing settings) or test (the tables). Audio skills have train and test clips.
POOLS = ("train", "align", "val", "test")   # the spoken pools, one manifest each
PRESETS = {  # text prompts per family and pool, entities, clips per task, speakers seen/unseen
    "tiny": dict(text=dict(text=200, train=40, align=12, val=8, test=12), facts_entities=5,
                 asr=dict(train=30, test=10), audio_q=dict(train=16, test=6), speakers=(6, 3)),
    "cpu": dict(text=dict(text=20000, train=900, align=300, val=100, test=300),
                facts_entities=100, asr=dict(train=3000, test=200),
                audio_q=dict(train=400, test=100), speakers=(24, 8)),
}
WORLD_FORMAT = 4   # bump when build_world changes what a seed produces
UNFINISHED = "generating.json"  # written before the first clip, removed after done.json


def number_words(k):
    """0..99 spelled in words: 42 -> 'forty two'."""
    if k < 20:
        return ONES[k]
    return TENS[k // 10] + ("" if k % 10 == 0 else " " + ONES[k % 10])


def arith_example(rng):
    """'what is three times four plus two ?': two or three operations, a product first if any."""
    for _ in range(1000):
        n_ops = int(rng.integers(2, 4))
        if rng.random() < 0.3:
            a, b = int(rng.integers(2, 6)), int(rng.integers(2, 6))
            steps, acc = [("times", b, a * b)], a * b
        else:
            a = int(rng.integers(0, 21))
            steps, acc = [], a
        while len(steps) < n_ops:
            op = "plus" if rng.random() < 0.5 else "minus"
            b = int(rng.integers(1, 10))
            acc = acc + b if op == "plus" else acc - b
            steps.append((op, b, acc))
        if all(0 <= s[2] <= ARITH_MAX for s in steps):
            break
    expr = number_words(a) + "".join(f" {op} {number_words(b)}" for op, b, _ in steps)
    chain, cur = "", number_words(a)
    for op, b, r in steps:   # the teacher's chain: 'three times four is twelve . ...'
        chain += f"{cur} {op} {number_words(b)} is {number_words(r)} . "
        cur = number_words(r)
    return {"task": "arith", "transcript": f"what is {expr} ?", "answer": cur,
            "teacher": chain + f"the answer is {cur}", "reference": cur}


def instruct_example(rng):
    """Count two to five words, or reverse three or four (too few two-word lists to learn from)."""
    pool = COLORS + ANIMALS
    count = rng.random() < 0.5
    n = int(rng.integers(2, 6) if count else rng.integers(3, 5))
    words = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
    seq = " ".join(words)
    if count:
        prompt, answer = f"how many words are in : {seq} ?", number_words(len(words))
        teacher = " , ".join(f"{w} is {number_words(i + 1)}" for i, w in enumerate(words))
    else:
        prompt, answer = f"reverse the words : {seq} .", " ".join(words[::-1])
        teacher = f"the last word is {words[-1]}" + "".join(f" , then {w}" for w in words[-2::-1])
    return {"task": "instruct", "transcript": prompt, "answer": answer,
            "teacher": teacher + f" . the answer is {answer}", "reference": answer}


def fact_examples(rng, n_entities):
    """-> {pool: [fact questions]} about n_entities made-up names (bako, timu, ...)."""
    names = set()
    while len(names) < n_entities:
        syl = lambda: rng.choice(list("bdgklmnprstvz")) + rng.choice(list("aeiou"))
        names.add(syl() + syl() + (syl() if rng.random() < 0.3 else ""))
    out = {p: [] for p in set(FACT_POOLS)}
    for e in sorted(names):
        facts = {a: (vs[int(rng.integers(len(vs)))], say) for a, (vs, say) in FACT_VALUES.items()}
        for attr, (v, say) in facts.items():
            order = rng.permutation(len(FACT_TEMPLATES[attr]))
            teacher = say.format(e=e, v=v) + f" . the answer is {v}"
            for pool, i in zip(FACT_POOLS, order):
                out[pool].append({"task": "facts", "answer": v, "reference": v, "teacher": teacher,
                                  "transcript": FACT_TEMPLATES[attr][i].format(e=e)})
    return out


def voice_labels(voice):
    """{question: label} for every voice attribute a record's `voice` carries."""
    return {t: AUDIO_LABELS[t](voice) for t, k in VOICE_FIELDS.items() if k in voice}


def sample_voice(rng, speakers, n_seen, pool, noisy_p=0.3):
    """One utterance's voice fields: the pitch and tract of a training speaker (the first n_seen;
    in val and test, half the time, an unseen one), and a rate, emotion, noise and loudness."""
    heard = pool in ("train", "align") or rng.random() < 0.5
    spk = speakers[:n_seen] if heard else speakers[n_seen:]
    speaker = spk[int(rng.integers(len(spk)))]
    fast = rng.random() < 0.5
    noisy = rng.random() < noisy_p
    v = Voice(pitch_hz=round(float(speaker["pitch_hz"]), 2),
              tract_scale=round(float(speaker["tract_scale"]), 3),
              rate=round(float(rng.uniform(1.2, 1.45) if fast else rng.uniform(0.7, 0.85)), 3),
              emotion=EMOTIONS[int(rng.integers(3))],
              noise=round(float(rng.uniform(*NOISE["noisy" if noisy else "clean"])), 3),
              loudness=round(float(rng.uniform(0.8, 1.2)), 3), speaker=speaker["speaker"])
    return asdict(v)


def build_world(seed=0, preset="cpu"):
    """-> list of records (without audio written) for every pool, deterministic in the seed."""
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    seen, text = set(), {p: [] for p in ("text",) + POOLS}   # no prompt in two pools
    for make in (arith_example, instruct_example):
        for pool in ("test", "val", "align", "train", "text"):
            n, out = cfg["text"][pool], text[pool]
            stop = len(out) + n
            for _ in range(200 * n):
                if len(out) == stop:
                    break
                ex = make(rng)
                if ex["transcript"] not in seen:
                    seen.add(ex["transcript"])
                    out.append(ex)
    for pool, exs in fact_examples(rng, cfg["facts_entities"]).items():
        text[pool] += exs
    speakers = [{"speaker": f"spk{i:02d}", "pitch_hz": rng.uniform(*SPEAKER_RANGES[i % 2][0]),
                 "tract_scale": rng.uniform(*SPEAKER_RANGES[i % 2][1])}
                for i in range(sum(cfg["speakers"]))]
    n_seen = cfg["speakers"][0]
    records = []
    for pool in ("text",) + POOLS:
        for i, ex in enumerate(text[pool]):
            r = {"id": f"{pool}-{ex['task']}-{i:05d}", "split": pool, "task": ex["task"],
                 "kind": "text", "transcript": ex["transcript"], "instruction": "",
                 "reference": ex["reference"], "teacher": ex["teacher"], "answer": ex["answer"]}
            if pool != "text":   # the teacher's own pool is never spoken
                r["voice"] = sample_voice(rng, speakers, n_seen, pool)
            records.append(r)
    records += audio_records(rng, cfg, text, speakers, n_seen)
    for r in records:
        if "voice" in r:
            r["audio"] = f"wavs/{r['id']}.wav"
    return records


def audio_records(rng, cfg, text, speakers, n_seen):
    """The train and test pools' transcription and voice-question records."""
    vocab = sorted({w for exs in text.values() for ex in exs for w in ex["transcript"].split()
                    if w.isalpha()})
    seen, records = set(), []
    for pool in ("train", "test"):
        prompts = [ex["transcript"] for ex in text[pool]]
        for task in AUDIO_TASKS:
            for i in range(cfg["asr" if task == "asr" else "audio_q"][pool]):
                for _ in range(100):   # a sentence this task has not used yet
                    if task == "asr" and rng.random() < 0.5:
                        s = prompts[int(rng.integers(len(prompts)))]
                    else:   # 3-6 words
                        n = int(rng.integers(3, 7))
                        s = " ".join(vocab[k] for k in rng.integers(0, len(vocab), n))
                    if (task, s) not in seen:
                        break
                seen.add((task, s))
                voice = sample_voice(rng, speakers, n_seen, pool, 0.5 if task == "noise" else 0.3)
                answer = s if task == "asr" else AUDIO_LABELS[task](voice)
                records.append({"id": f"{pool}-{task}-{i:05d}", "split": pool, "task": task,
                                "kind": "audio", "transcript": s,
                                "instruction": AUDIO_INSTRUCTIONS[task], "reference": answer,
                                "teacher": None, "answer": answer, "voice": voice})
    return records


def make_toy_data(out_dir, seed=0, preset="cpu"):
    """Write the toy world's manifests, wavs/ and tokenizer.json to out_dir, each file atomically,
    unless it holds this (seed, preset, format) already. -> the paths."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(0)  # a spawned worker re-running a guard-less script: its pool breaks
    paths = {p: os.path.join(out_dir, f"{p}.jsonl") for p in ("text",) + POOLS}
    paths.update(tokenizer=os.path.join(out_dir, "tokenizer.json"),
                 wavs=os.path.join(out_dir, "wavs"))
    stamp, mark = os.path.join(out_dir, "done.json"), os.path.join(out_dir, UNFINISHED)
    want = {"seed": seed, "preset": preset, "format": WORLD_FORMAT}
    if os.path.exists(stamp):
        with open(stamp) as fh:
            if json.load(fh) == want:
                return paths
    again = " again: the last generation there was cut short" if os.path.exists(mark) else ""
    print(f"[data] generating the {preset} toy world (seed {seed}) in {out_dir}{again}", flush=True)
    t0 = time.time()
    os.makedirs(paths["wavs"], exist_ok=True)
    # the mark first: a generation cut short is then known as ours
    atomic_write(mark, lambda f: json.dump(want, f))
    if os.path.exists(stamp):
        os.remove(stamp)
    records = build_world(seed, preset)
    # one seed per clip, so any clip can be made alone, by any process, with the same bytes
    jobs = [(r["transcript"], r["voice"], mix_seed(seed, i), os.path.join(out_dir, r["audio"]))
            for i, r in enumerate(records) if "audio" in r]
    progress = Progress("data", "toy world", len(jobs))
    made = speak_in_workers(jobs, progress)
    for job in jobs[len(made):]:
        made += _speak([job])
        progress(len(made))
    for pool in ("text",) + POOLS:
        lines = "".join(json.dumps(r) + "\n" for r in records if r["split"] == pool)
        atomic_write(paths[pool], lambda f: f.write(lines))
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()   # \w+ and runs of punctuation
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)   # ids 0..5
    tok.train_from_iterator(toy_corpus(records), trainer)
    atomic_write(paths["tokenizer"], lambda f: f.write(tok.to_str(pretty=True)))
    atomic_write(stamp, lambda f: json.dump(want, f))
    os.remove(mark)
    print(f"toy data ({preset}, seed {seed}): {len(made)} clips, "
          f"{sum(made) / SAMPLE_RATE / 3600:.2f} h of audio, {len(records) - len(made)} unspoken "
          f"prompts, {time.time() - t0:.1f} s -> {out_dir}")
    return paths


def _speak(jobs):
    """Clips of (transcript, voice fields, seed, path) jobs written -> their lengths in samples."""
    lengths = []
    for text, voice, seed, path in jobs:
        audio = synthesize(text, Voice(**voice), seed=seed)
        atomic_write(path, lambda f: sf.write(f, audio, SAMPLE_RATE, "PCM_16", format="WAV"), "wb")
        lengths.append(len(audio))
    return lengths


def speak_in_workers(jobs, progress):
    """_speak on the jobs in up to 8 spawned workers, 32 jobs a task -> the lengths in job order;
    [] with one core or when the workers cannot start (then the caller makes the clips)."""
    cores = getattr(os, "sched_getaffinity", None)
    workers = min(len(cores(0)) if cores else os.cpu_count() or 1, 8)
    if workers < 2:
        return []
    made, others = [], set(multiprocessing.active_children())
    try:
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                 initializer=_end_with_parent, initargs=(os.getpid(),)) as ex:
            try:  # submit, not map: a future map cancels breaks the pool's own thread
                parts = _holding_ctrl_c(lambda: [ex.submit(_speak, jobs[i:i + 32])
                                                 for i in range(0, len(jobs), 32)])
                for part in parts:
                    made += part.result()
                    progress(len(made))
            except BaseException as e:  # Ctrl-C, a full disk: stop now, not after every task
                for w in set(multiprocessing.active_children()) - others:  # the pool's workers
                    w.terminate()
                    w.join()
                for tmp in [job[3] + ".tmp" for job in jobs if os.path.exists(job[3] + ".tmp")]:
                    os.remove(tmp)   # a clip a terminated worker was writing
                e.__cause__ = None  # a worker's error names its file: no remote traceback under it
                raise
    except BrokenProcessPool:
        print("[data] the clip workers could not start (a script calling data.make_toy_data needs"
              " its code under `if __name__ == \"__main__\":`); making the clips here", flush=True)
        return []
    return made


def _end_with_parent(parent):
    """A clip worker's first step: a thread that ends it once its parent is gone (any signal)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _holding_ctrl_c(start):
    """start() with Ctrl-C held, then raised: the workers it spawns inherit SIGINT blocked, and
    another thread receiving it only notes it (no half-spawned worker)."""
    if threading.current_thread() is not threading.main_thread() or os.name != "posix":
        return start()
    held = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        return start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one is noted now
        signal.signal(signal.SIGINT, handler)
        if held:
            signal.raise_signal(signal.SIGINT)


# -----------------------------------------------------------------------------
# scoring, the tokenizer and the chat format
#
# The tokenizer is word-level on the toy corpus (a closed vocabulary of a few hundred words): one
# token per word keeps sequences short and makes ASR a word choice; an unknown word becomes UNK.

PAD, USER, ASSISTANT, END, AUDIO = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>", "<|audio|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = [PAD, USER, ASSISTANT, END, AUDIO, UNK]   # ids 0..5 in this order


def normalize_text(s):
    """Lower case, punctuation split off, '.' dropped, single spaces."""
    return " ".join(w for w in re.findall(r"\w+|[^\w\s]", s.lower()) if w != ".")


def extract_answer(text):
    """The final answer: what follows the last 'the answer is', else the whole text (normalised)."""
    s = normalize_text(text)
    i = s.rfind("the answer is")
    return s[i + len("the answer is"):].strip() if i >= 0 else s


def spoken_words(text):
    """A transcript's spoken words (punctuation is silent): what hearing is scored against."""
    return " ".join(w for w in normalize_text(text).split() if w.isalpha())


def wer(reference, hypothesis):
    """Word error rate: word-level edit distance / number of reference words."""
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    if not ref:
        return 0.0 if not hyp else 1.0
    d = list(range(len(hyp) + 1))   # one row of the Levenshtein table
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1] / len(ref)


def score(record, prediction):
    """1 - WER (floored at 0) for transcription; exact match of the final answer otherwise."""
    if record["task"] == "asr":
        return max(0.0, 1.0 - wer(record["answer"], prediction))
    return float(extract_answer(prediction) == normalize_text(record["answer"]))


@dataclass(frozen=True)
class ChatFormat:
    """The strings around a turn (see encode_prompt); `end` and `audio` are one token each. A real
    teacher's comes as a JSON file of these fields (--chat_format); `pad` is optional."""
    user: str = USER
    assistant: str = ASSISTANT
    end: str = END
    audio: str = AUDIO
    pad: str = PAD
    source: str = field(default="", compare=False)  # the file it was read from, for error messages


TOY_FORMAT = ChatFormat()


def read_chat_format(path):
    """A chat-format JSON file -> ChatFormat; ValueError naming the file and a bad field."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable chat-format JSON file ({e})") from None
    names = [f.name for f in fields(ChatFormat) if f.name != "source"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object with the fields {names}")
    for k, v in raw.items():
        if k not in names:
            raise ValueError(f"{path}: unknown field {k!r}; expected some of {names}")
        if not isinstance(v, str) or not v:
            raise ValueError(f"{path}: field {k!r} must be a non-empty string, got {v!r}")
    missing = [k for k in ("user", "assistant", "end") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing} (the strings before a user turn "
                         f"and an assistant turn, and the end-of-turn token)")
    return ChatFormat(**raw, source=os.fspath(path))


def toy_corpus(records):
    keys = ("transcript", "instruction", "reference", "teacher")
    return (r[k] for r in records for k in keys if r.get(k))


def load_tokenizer(path):
    from tokenizers import Tokenizer
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: tokenizer not found (a Hugging Face tokenizer.json "
                                f"is expected)")
    return Tokenizer.from_file(os.fspath(path))


def chat_ids(tok, fmt):
    """The one-token ids of fmt's end, audio and pad. The audio placeholder is added when the
    tokenizer lacks it (it is never embedded); a pad that splits is the end id (it is masked)."""
    if tok.token_to_id(fmt.audio) is None:
        tok.add_special_tokens([fmt.audio])
    out = []
    for name in ("end", "audio", "pad"):
        ids = tok.encode(getattr(fmt, name), add_special_tokens=False).ids
        if len(ids) != 1 and name == "pad":
            ids = out[:1]
        elif len(ids) != 1:
            raise ValueError(f"{fmt.source or 'the chat format'}: field {name!r} = "
                             f"{getattr(fmt, name)!r} is {len(ids)} tokens, expected one")
        out += ids
    return out


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids if text else []


def encode_prompt(tok, record, modality, fmt=TOY_FORMAT):
    """Prompt ids, `user transcript instruction assistant` or `user audio instruction assistant`
    by modality; the instruction with the space before it (as a BPE sees it mid-sentence)."""
    if modality not in ("text", "speech"):
        raise ValueError(f"modality must be 'text' or 'speech', got {modality!r}")
    audio = [tok.token_to_id(fmt.audio)]
    content = _ids(tok, record["transcript"]) if modality == "text" else audio
    instruction = record.get("instruction", "")
    return (_ids(tok, fmt.user) + content + _ids(tok, " " + instruction if instruction else "")
            + _ids(tok, fmt.assistant))


def spoken_word_ids(tok, transcript):
    """A transcript's spoken words -> one id list per word (a BPE's pieces, as mid-sentence)."""
    words = [w for w in normalize_text(transcript).split() if w.isalpha()]
    return [_ids(tok, w if i == 0 else " " + w) for i, w in enumerate(words)]


def encode_response(tok, text, fmt=TOY_FORMAT):
    return _ids(tok, text) + [tok.token_to_id(fmt.end)]


# -----------------------------------------------------------------------------
# manifests (JSONL, one record per line)

MANIFEST_DEFAULTS = {"split": "train", "task": "custom", "kind": "text", "instruction": "",
                     "reference": "", "teacher": None, "answer": "", "voice": {}}
# field: (types, said as), checked as a manifest is read; a null response: a record without one
STRING, NUMBER = (str, "a string"), ((int, float), "a number")
OPTIONAL = ((str, type(None)), "a string or null")
FIELD_TYPES = {"split": STRING, "task": STRING, "kind": (str, "'text' or 'audio'"),
               "instruction": STRING, "answer": STRING, "reference": OPTIONAL,
               "teacher": OPTIONAL, "voice": (dict, "an object of voice fields")}
VOICE_TYPES = {"pitch_hz": NUMBER, "tract_scale": NUMBER, "rate": NUMBER, "noise": NUMBER,
               "loudness": NUMBER, "emotion": (str, f"one of {', '.join(EMOTIONS)}"),
               "speaker": STRING}
CHOICES = {"kind": ("text", "audio"), "voice.emotion": EMOTIONS}


def read_manifest(path, audio=True, seen=None, required=False):
    """-> records, defaults filled in, 'audio' made absolute (audio=False: no 'audio'); ids unique
    across the files read with one `seen` {id: file:line}; required: no records is an error."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    seen = {} if seen is None else seen
    records = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1}); expected JSON Lines in UTF-8") from None
            if line.strip():
                r = manifest_record(line, where, audio, seen)
                seen[r["id"]] = where
                if audio:
                    r["audio"] = os.path.join(root, r["audio"])   # absolute paths pass through
                records.append(r)
    if required and not records:
        raise ValueError(f"{path}: no records; expected one JSON object per line (README, "
                         f"'Bring your own audio')")
    return records


def manifest_record(line, where, audio, seen):
    """One manifest line -> its record, defaults filled in; else ValueError '<where>: <what>'."""
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(r, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(r).__name__}")
    needed = ("id", "audio", "transcript") if audio else ("id", "transcript")
    missing = [k for k in needed if not isinstance(r.get(k), str)]
    if missing:
        raise ValueError(f"{where}: missing or non-string field(s) {missing}")
    if r["id"] in seen:
        raise ValueError(f"{where}: id {r['id']!r} is already used at {seen[r['id']]}; ids must be "
                         f"unique across the manifests (audio is cached by id)")
    r = {**MANIFEST_DEFAULTS, **r}
    checks = [(k, r[k], *FIELD_TYPES[k]) for k in FIELD_TYPES]
    if isinstance(r["voice"], dict):
        checks += [(f"voice.{k}", r["voice"][k], *VOICE_TYPES[k])
                   for k in VOICE_TYPES if k in r["voice"]]
    for name, v, types, what in checks:
        if not isinstance(v, types) or isinstance(v, bool) or v not in CHOICES.get(name, [v]):
            shown = json.dumps(v)
            shown = shown if len(shown) < 60 else shown[:57] + "..."
            raise ValueError(f"{where}: field {name!r} is {shown}; expected {what}")
    return r


# -----------------------------------------------------------------------------
# shared small helpers: seeds, progress lines, fingerprints, atomic writes

SEED_MIX = 1_000_003  # a prime larger than any step count: mix_seed's parts never collide


def mix_seed(*parts):
    """One integer seed from several (seed, step, rank, ...): mix_seed(a, b) = a * SEED_MIX + b."""
    return reduce(lambda out, p: out * SEED_MIX + p, parts, 0)


class Progress:
    """Called with the number done: '[name] what: n/total unit, rate unit/s, eta' each `every` s."""

    def __init__(self, name, what, total, unit="clips", every=5.0):
        self.name, self.what, self.total, self.unit, self.every = name, what, total, unit, every
        self.t0 = self.shown = time.time()

    def __call__(self, n):
        now = time.time()
        if now - self.shown >= self.every and n < self.total:
            rate = n / (now - self.t0)
            eta = (self.total - n) / rate if rate > 0 else float("nan")
            print(f"[{self.name}] {self.what}: {n}/{self.total} {self.unit}, "
                  f"{rate:.0f} {self.unit}/s, eta {eta:.0f} s", flush=True)
            self.shown = now


def fingerprint(obj):
    """16 hex digits of a SHA-256 over a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path, head=None):
    """SHA-256 (16 hex digits) of a file's bytes, or of its size and first `head` bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if head is None:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f"{os.fstat(f.fileno()).st_size}:".encode() + f.read(head))
    return h.hexdigest()[:16]


def atomic_write(path, write, mode="w"):
    """write(f) to path + ".tmp", renamed to path; a failure leaves no file: one OSError."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, f"{path}: cannot be written ({e.strerror or e})") from None


# -----------------------------------------------------------------------------
# batches and the World a run reads

RUN_PATHS = ("data", "teacher", "whisper", "chat_format", "student")  # the settings that are paths


def pad(seqs, value=0):
    """(T_i, ...) tensors or id lists -> ((B, T_max, ...) right padded with value, lens (B,))."""
    seqs = [torch.as_tensor(x) for x in seqs]  # an id list becomes int64
    lens = torch.tensor([len(x) for x in seqs], dtype=torch.long)
    return pad_sequence(seqs, batch_first=True, padding_value=value), lens


def collate_mels(mels):
    """list of (n_mels, T_i) -> (mels (B, n_mels, T_max) zero padded, mel_lens (B,))."""
    out, lens = pad([torch.as_tensor(m).T for m in mels])
    return out.transpose(1, 2).contiguous(), lens


@dataclass
class Batch:
    """Prompts, and optionally fixed responses, as xopd.py's steps take them: right padded, each
    *_lens (B,) the rows' lengths, None where not carried. text_ids (B, T_t) and speech_ids
    (B, T_s) prompts; mels (B, n_mels, T_mel), or a frozen encoder's feats (B, T_enc, n_state);
    response_ids (B, L) ending with the end token."""
    text_ids: torch.Tensor | None = None
    text_lens: torch.Tensor | None = None
    speech_ids: torch.Tensor | None = None
    speech_lens: torch.Tensor | None = None
    mels: torch.Tensor | None = None
    mel_lens: torch.Tensor | None = None
    feats: torch.Tensor | None = None
    feat_lens: torch.Tensor | None = None
    response_ids: torch.Tensor | None = None
    response_lens: torch.Tensor | None = None

    def to(self, device):
        """A copy with every tensor on device."""
        present = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device) for k, v in present.items() if v is not None})


def text_families(records, per_family=None, kind="text"):
    """{family: the first per_family of its records of `kind` (text skills, or "audio"
    questions)}, families in sorted order."""
    fams = {}
    for r in records:
        if r["kind"] == kind:
            fams.setdefault(r["task"], []).append(r)
    return {t: rs[:per_family] for t, rs in sorted(fams.items())}


def batch_indices(n_items, batch_size, step, seed):
    """Rows of step `step`: a permutation per epoch seeded by (seed, epoch), so resumable."""
    if n_items < batch_size:  # tiny corpora: draw with replacement
        return np.random.default_rng([seed, step]).integers(0, n_items, batch_size).tolist()
    per_epoch = n_items // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)
    return perm[i * batch_size:(i + 1) * batch_size].tolist()


class World:
    """A data folder read once per run: its manifests (train and test required), a tokenizer and
    chat format, the log-mels of n_mels bands cached by id, and batches of them."""

    def __init__(self, data_dir, tokenizer=None, fmt=TOY_FORMAT, n_mels=N_MELS):
        self.dir, self.fmt, self.n_mels = data_dir, fmt, n_mels
        path = lambda name: os.path.join(data_dir, f"{name}.jsonl")
        self.tok = load_tokenizer(tokenizer or os.path.join(data_dir, "tokenizer.json"))
        self.lines = ids = {}  # id -> 'file:line', one id space for the spoken manifests
        self.train = read_manifest(path("train"), seen=ids, required=True)
        self.test = read_manifest(path("test"), seen=ids, required=True)
        exists = lambda name: os.path.exists(path(name))
        self.align = read_manifest(path("align"), seen=ids) if exists("align") else []
        self.val = read_manifest(path("val"), seen=ids) if exists("val") else []
        self.text = read_manifest(path("text"), audio=False) if exists("text") else []
        # a clip by anyone else is an unseen speaker's
        self.train_speakers = {r["voice"].get("speaker") for r in self.train} - {None, ""}
        self.end_id, self.audio_id, self.pad_id = chat_ids(self.tok, fmt)
        self._mels, self._digests = {}, {}
        self._feats = weakref.WeakKeyDictionary()

    def check_clips(self, max_seconds, pools=POOLS, decode=False):
        """check_clip on every clip of `pools`, before any stage trains."""
        for r in (r for pool in pools for r in getattr(self, pool)):
            check_clip(r["audio"], self.lines[r["id"]], max_seconds, decode)

    def digest(self, pools):
        """16 hex digits over `pools`' manifests, clips' size and header, the tokenizer and chat
        format: the same for two copies of a data folder. Cached."""
        key = tuple(pools)
        if key not in self._digests:
            parts = {"tokenizer": fingerprint(self.tok.to_str()), "chat_format": asdict(self.fmt)}
            for pool in key:
                path = os.path.join(self.dir, f"{pool}.jsonl")
                parts[pool] = file_digest(path) if os.path.exists(path) else None
                parts[f"{pool} clips"] = fingerprint([file_digest(r["audio"], head=64)
                                                      for r in getattr(self, pool) if "audio" in r])
            self._digests[key] = fingerprint(parts)
        return self._digests[key]

    def prompt(self, record, modality):
        return encode_prompt(self.tok, record, modality, self.fmt)

    def decode(self, ids):
        """Ids -> text, stopping at the first end token and dropping special tokens."""
        ids = [int(i) for i in ids] + [self.end_id]  # an end token at the latest
        return self.tok.decode(ids[:ids.index(self.end_id)], skip_special_tokens=True)

    def mel(self, rec):
        if rec["id"] not in self._mels:
            self._mels[rec["id"]] = log_mel_spectrogram(load_audio(rec["audio"]), self.n_mels)
        return self._mels[rec["id"]]

    def features(self, recs, encoder, device):
        """A frozen encoder's outputs (B, T, n_state), lens (B,), cached per clip and encoder (a
        weak key: they go with it); a record's own "feats" (train.spliced_lists) are used as is."""
        cache = self._feats.setdefault(encoder, {})
        todo = [r for r in recs if "feats" not in r and r["id"] not in cache]
        if todo:
            with torch.no_grad():
                mels, mel_lens = collate_mels([self.mel(r) for r in todo])
                x, lens = encoder(mels.to(device), mel_lens.to(device))
            for r, xr, n in zip(todo, x, lens.tolist()):
                cache[r["id"]] = xr[:n].clone()
        feats, lens = pad([r["feats"] if "feats" in r else cache[r["id"]] for r in recs])
        return feats, lens.to(device)

    def batch(self, recs, responses=None, device="cpu", text=True, speech=True, encoder=None):
        """A Batch of recs' text and speech prompts (mels, or an encoder's) and responses."""
        b = Batch()
        prompts = lambda modality: pad([self.prompt(r, modality) for r in recs], self.pad_id)
        if text:
            b.text_ids, b.text_lens = prompts("text")
        if speech:
            b.speech_ids, b.speech_lens = prompts("speech")
            if encoder is None:
                b.mels, b.mel_lens = collate_mels([self.mel(r) for r in recs])
            else:
                b.feats, b.feat_lens = self.features(recs, encoder, device)
        if responses is not None:
            responses = [encode_response(self.tok, t, self.fmt) for t in responses]
            b.response_ids, b.response_lens = pad(responses, self.pad_id)
        return b.to(device)


def world_of(settings, n_mels=N_MELS, data_dir=None):
    """The World of a run's settings: its data, its --teacher's tokenizer and its --chat_format."""
    fmt = read_chat_format(settings["chat_format"]) if settings.get("chat_format") else TOY_FORMAT
    teacher = settings.get("teacher")
    tokenizer = os.path.join(teacher, "tokenizer.json") if teacher else None
    return World(data_dir or settings["data"], tokenizer, fmt, n_mels)


def run_path(settings, key, out):
    """settings[key], a path a run stored, for the run now in folder out: one inside the run
    folder moves with it; any other is returned as stored."""
    p, was = settings.get(key) or "", settings.get("out") or ""
    if not p or not was:
        return p
    rel = os.path.relpath(p, was)
    outside = rel == os.pardir or rel.startswith(os.pardir + os.sep)
    return p if outside else os.path.normpath(os.path.join(out, rel))
