"""Data for X-OPD: audio front end, a formant speech synthesizer, the toy world, the tokenizer,
manifests and batching.

Read top to bottom: audio constants and I/O, Whisper's log-mel, the synthesizer, the toy world
(text skills the teacher knows, audio skills the speech model has), scoring, the tokenizer and
chat format, manifests, collation, the Batch every training step takes, and the World that
builds batches from a data folder.
"""
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
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch

# -----------------------------------------------------------------------------
# audio constants (Whisper's)

SAMPLE_RATE = 16000  # Hz; speech has little above 8 kHz, and Whisper was trained at 16 kHz
N_FFT = 400          # 25 ms window at 16 kHz
HOP_LENGTH = 160     # 10 ms at 16 kHz -> 100 mel frames per second
N_MELS = 80          # Whisper v1-v2 and large-v3-turbo use 128; 80 is the classic size

# -----------------------------------------------------------------------------
# audio I/O


def resample(audio, sr_in, sr_out=SAMPLE_RATE, zero_crossings=16, rolloff=0.95, beta=8.6):
    """Band-limited resampling of a 1-D signal with a Kaiser-windowed sinc (polyphase).

    Output sample n sits at input time t = n * sr_in / sr_out and is sum_k x[k] h(t - k), with h
    an ideal low-pass (cut at rolloff * the lower Nyquist, so nothing above the new Nyquist aliases
    back) truncated to `zero_crossings` lobes each side by a Kaiser window. t - floor(t) takes only
    `up` distinct values (sr_out / gcd), so the filter is tabulated once per phase."""
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


# the shortest clip: 25 ms, two mel frames, one encoder frame (conv2 halves them); a shorter one
# crashes the STFT's reflect padding or leaves the encoder nothing
MIN_SAMPLES = N_FFT


def encoder_seconds(n_ctx):
    """The longest clip an encoder of n_ctx positions reads whole: two mel frames per position."""
    return 2 * n_ctx * HOP_LENGTH / SAMPLE_RATE


def check_clip(path, where, max_seconds):
    """One clip, by its header alone (soundfile.info: fast, no samples read): it exists, soundfile
    can read it, and at 16 kHz it is at least MIN_SAMPLES long and at most max_seconds (the
    encoder's window). ValueError naming `where` (the manifest's file:line), the clip and what was
    expected."""
    if not os.path.exists(path):
        raise ValueError(f"{where}: {path}: no such audio file (expected a WAV/FLAC/OGG file)")
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"{where}: {path}: cannot be read as audio ({e}); expected a file soundfile "
                         f"can decode (WAV, FLAC, OGG, ...)") from None
    seconds = info.frames / info.samplerate
    if not MIN_SAMPLES / SAMPLE_RATE <= seconds <= max_seconds:
        raise ValueError(f"{where}: {path}: {info.frames} samples at {info.samplerate} Hz ({seconds:.3f} s); expected "
                         f"{1000 * MIN_SAMPLES / SAMPLE_RATE:.0f} ms to {max_seconds:g} s (the audio encoder's window)")


def load_audio(path):
    """Read any file soundfile reads -> float32 mono at 16 kHz (channels averaged, resampled)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such audio file (expected a WAV/FLAC/OGG file)")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)   # (n_samples, channels)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise ValueError(f"{path}: cannot be read as audio ({e}); expected a file soundfile "
                         f"can decode (WAV, FLAC, OGG, ...)") from None
    if data.size == 0:
        raise ValueError(f"{path}: audio is empty (0 samples); expected at least one sample")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: audio holds NaN or infinite samples; expected finite values")
    audio = data.mean(axis=1)   # downmix
    if sr != SAMPLE_RATE:
        audio = resample(audio, sr, SAMPLE_RATE)
    return audio.astype(np.float32)

# -----------------------------------------------------------------------------
# log-mel spectrogram, numerically Whisper's


def hz_to_mel(f):
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep,
                    f / f_sp)


def mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), m * f_sp)


@lru_cache(maxsize=8)
def mel_filters(n_mels=N_MELS, n_fft=N_FFT, sr=SAMPLE_RATE):
    """(n_mels, n_fft // 2 + 1) float64 triangles on the Slaney mel scale from 0 Hz to Nyquist,
    each scaled by 2 / (its width in Hz) so that every filter has unit area ('slaney' norm).
    This is what Whisper's mel_filters.npz holds (librosa.filters.mel(sr=16000, n_fft=400))."""
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)                       # (F,)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    lower = (fft_freqs[None, :] - mel_f[:-2, None]) / np.diff(mel_f)[:-1, None]   # rising edge
    upper = (mel_f[2:, None] - fft_freqs[None, :]) / np.diff(mel_f)[1:, None]     # falling edge
    weights = np.maximum(0.0, np.minimum(lower, upper))               # (n_mels, F)
    return weights * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]


def log_mel_spectrogram(audio, n_mels=N_MELS):
    """audio: array or tensor (..., n_samples) at 16 kHz -> log-mel tensor (..., n_mels, n_samples // 160).

    Whisper's recipe for one clip without the 30 s padding: periodic Hann STFT (centered, reflect
    padded), power spectrum with the last frame dropped, Slaney mel, log10 floored at 1e-10, then
    clamped to 8 decades below the clip's maximum and scaled by (x + 4) / 4. In a batch the
    maximum is taken per example, so a clip's features do not depend on its batch mates."""
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
# How a word becomes sound. Text is lower-cased and split into words; each LETTER of a word is one
# sound unit (the toy language is spoken as it is spelled, so "seven" is five units s-e-v-e-n).
# Every unit has a kind and targets:
#   vowel      voiced, three formants (F1, F2, F3), the longest unit (~90 ms)
#   sonorant   voiced, its own formants at lower energy (l r m n w)
#   fricative  a band of noise at its own center frequency (s high, f broad and weak, h through
#              the formants); voiced fricatives (z v j) add voicing underneath
#   stop       a closure (silence, or a low "voice bar" for b d g) then a short noise burst whose
#              center tells p (low), t (high) and k (mid) apart
# Words are separated by short pauses; punctuation adds a longer one. The units give a piecewise
# constant track of targets, one value per 8 ms frame; formant tracks are smoothed over ~40 ms so
# transitions glide while unit boundaries stay clear.
# Source-filter: a glottal pulse train at the speaker's pitch (times the emotion's contour) and a
# white-noise source are cut into 16 ms frames (Hann, 50% overlap) and each frame's spectrum is
# multiplied by that frame's envelope: voice by a sum of formant resonances (scaled by 1 /
# tract_scale: a longer vocal tract has lower formants), noise by its band. Inverse FFT and
# overlap-add give the waveform, which is leveled by the emotion's energy, then mixed with
# background noise at the voice's noise-to-speech ratio. All of it is vectorised numpy: a few ms
# per clip.

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
    """Text -> per-frame targets. Returns a dict of (n_frames,) / (n_frames, 3) arrays."""
    frames = lambda ms: max(2, int(round(ms / 8.0 / rate)))   # 8 ms per frame
    rows = []   # (F(3), voice_amp, noise_amp, noise_center, noise_width, noise_via_formants, word_pos)
    silence = ((500, 1500, 2500), 0.0, 0.0, 3000, 3000, 0.0)

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
            if kind == "vowel":
                add(n, (F, 1.0, 0.0, nc, nw, 0.0), span)
            elif kind == "sonorant":
                add(n, (F, 0.45, 0.0, nc, nw, 0.0), span)
            elif kind == "vfricative":
                add(n, (F, 0.3, 0.5, nc, nw, 0.0), span)
            elif kind == "fricative":
                add(n, (F, 0.0, 0.7, nc, nw, 0.0), span)
            elif kind == "aspirate":
                add(n, (F, 0.0, 0.6, nc, nw, 1.0), span)
            else:   # stops: closure then burst
                n_burst = max(2, n // 3)
                bar = 0.15 if kind == "vstop" else 0.0
                add(n - n_burst, ((250, 900, 2300), bar, 0.0, nc, nw, 0.0), (span[0], span[0]))
                add(n_burst, (F, 0.0, 0.9, nc, nw, 0.0), (span[1], span[1]))
        add(frames(WORD_PAUSE_MS), silence)
    add(frames(EDGE_SILENCE_MS), silence)
    spec = [r[0] for r in rows]
    return {"F": np.array([s[0] for s in spec], dtype=np.float64),
            "av": np.array([s[1] for s in spec]), "an": np.array([s[2] for s in spec]),
            "nc": np.array([s[3] for s in spec], dtype=np.float64),
            "nw": np.array([s[4] for s in spec], dtype=np.float64),
            "asp": np.array([s[5] for s in spec]), "word_pos": np.array([r[1] for r in rows])}


def _smooth(x, n):
    """Moving average over n frames along axis 0 (edges repeated)."""
    pad = [(n // 2, n - 1 - n // 2)] + [(0, 0)] * (x.ndim - 1)
    c = np.cumsum(np.pad(x, pad, mode="edge"), axis=0)
    c = np.concatenate([np.zeros_like(c[:1]), c])
    return (c[n:] - c[:-n]) / n


def pitch_contour(emotion, t, word_pos):
    """Multiplier on the speaker's pitch. t: (n,) position in the utterance in [0, 1];
    word_pos: (n,) position inside the current word (or -1 in pauses)."""
    w = np.clip(word_pos, 0.0, 1.0)
    if emotion == "neutral":   # gentle declination
        return 1.0 + 0.04 * (0.5 - t)
    if emotion == "happy":     # raised, lively accent on every word, rising at the end
        return 1.12 * (1.0 + 0.10 * np.sin(np.pi * w)) * (1.0 + 0.06 * t)
    if emotion == "sad":       # lowered, flat and falling
        return 0.92 * (1.0 + 0.08 * (0.5 - t))
    raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")


def synthesize(text, voice, seed=0):
    """Speak `text` with `voice` -> float32 waveform at 16 kHz. Deterministic for a seed."""
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
    f0 = voice.pitch_hz * pitch_contour(voice.emotion, t, tr["word_pos"]) * drift   # (n,)
    n_samples = (n + 1) * SYN_HOP
    f0_s = np.interp(np.arange(n_samples), np.arange(n) * SYN_HOP + SYN_FRAME // 2, f0)
    phase = np.cumsum(f0_s / SAMPLE_RATE)
    pulses = np.diff(np.floor(phase), prepend=0.0)                    # 1 at each glottal closure
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
    speech_rms = np.sqrt(np.mean(out ** 2))
    out += voice.noise * speech_rms * rng.standard_normal(n_samples)   # background noise
    peak = np.abs(out).max()
    if peak > 0.99:
        out *= 0.99 / peak
    return out.astype(np.float32)


# labels for the audio-skill questions (thresholds sit in the gaps between the sampled ranges)
def pitch_label(v): return "high" if v["pitch_hz"] >= 160 else "low"
def rate_label(v): return "fast" if v["rate"] >= 1.0 else "slow"
def noise_label(v): return "noisy" if v["noise"] >= 0.1 else "clean"
def emotion_label(v): return v["emotion"]

# -----------------------------------------------------------------------------
# the toy world: words

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "orange"]
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "frog", "goat", "horse", "mouse", "duck", "fish",
           "lion"]
CITIES = ["lima", "oslo", "paris", "cairo", "tokyo", "rome", "delhi", "quito", "dakar", "hanoi",
          "perth", "bern"]


def number_words(k):
    """0..99 spelled in words: 42 -> 'forty two'."""
    if k < 20:
        return ONES[k]
    return TENS[k // 10] + ("" if k % 10 == 0 else " " + ONES[k % 10])


def entity_names(rng, n):
    """n distinct made-up names from consonant-vowel syllables (bako, timu, ...)."""
    cons, vows = "bdgklmnprstvz", "aeiou"
    names = set()
    while len(names) < n:
        syl = lambda: rng.choice(list(cons)) + rng.choice(list(vows))
        names.add(syl() + syl() + (syl() if rng.random() < 0.3 else ""))
    return sorted(names)

# -----------------------------------------------------------------------------
# the toy world: text skills (what the text teacher is good at)
#
# Every example: `transcript` = the prompt (what is spoken), `teacher` = the teacher's style (a
# short chain of thought, then "the answer is X"), `reference` = the dataset's own reference
# response, which, as in real datasets, is a different style: the bare answer, no reasoning. The
# SFT baseline trains on `reference`; both styles score the same with extract_answer.


ARITH_MAX = 30   # every intermediate result stays in 0..30: a table of ~600 facts a small model learns


def arith_example(rng):
    """Two or three operations in words, left to right: 'what is three times four plus two ?'
    Operands of plus / minus are 1..9; a product, when there is one, comes first (2..5 x 2..5)."""
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
    prompt = f"what is {expr} ?"
    chain, cur = [], number_words(a)
    for op, b, r in steps:
        chain.append(f"{cur} {op} {number_words(b)} is {number_words(r)} .")
        cur = number_words(r)
    return {"task": "arith", "transcript": prompt, "answer": cur,
            "teacher": " ".join(chain) + f" the answer is {cur}", "reference": cur}


def instruct_example(rng):
    """Instruction following over a few words: count them (two to five), or reverse their order
    (three or four: the 462 two-word lists are too few for the teacher to learn their pattern
    from). (Repeating words k times was dropped: the cpu-preset teacher could not count its own
    copies.)"""
    pool = COLORS + ANIMALS
    count = rng.random() < 0.5
    words = [pool[i] for i in rng.choice(len(pool), int(rng.integers(2, 6) if count else rng.integers(3, 5)), replace=False)]
    seq = " ".join(words)
    if count:
        prompt, answer = f"how many words are in : {seq} ?", number_words(len(words))
        teacher = " , ".join(f"{w} is {number_words(i + 1)}" for i, w in enumerate(words))
    else:
        prompt, answer = f"reverse the words : {seq} .", " ".join(words[::-1])
        teacher = f"the last word is {words[-1]}" + "".join(f" , then {w}" for w in words[-2::-1])
    return {"task": "instruct", "transcript": prompt, "answer": answer,
            "teacher": teacher + f" . the answer is {answer}", "reference": answer}


# facts: each (entity, attribute) is asked with eight phrasings. Per fact, a random four of them
# are training phrasings (the omni pool, which the teacher also reads) and one each belongs to the
# align, val and test pools: the fact is known, but an align / val / test prompt is never trained on.
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
FACT_TEACHER = {"city": "{e} lives in {v} . the answer is {v}",
                "color": "{e} likes {v} . the answer is {v}",
                "pet": "{e} has a {v} . the answer is {v}"}
FACT_POOLS = ("train",) * 4 + ("align", "val", "test")   # 7 of the 8 phrasings are used


def fact_examples(rng, n_entities):
    """-> {pool: [fact questions]} about generated entities, pools as in FACT_POOLS."""
    out = {p: [] for p in set(FACT_POOLS)}
    for e in entity_names(rng, n_entities):
        facts = {"city": CITIES[int(rng.integers(len(CITIES)))],
                 "color": COLORS[int(rng.integers(len(COLORS)))],
                 "pet": ANIMALS[int(rng.integers(len(ANIMALS)))]}
        for attr, v in facts.items():
            order = rng.permutation(len(FACT_TEMPLATES[attr]))
            for pool, i in zip(FACT_POOLS, order):
                out[pool].append({"task": "facts", "transcript": FACT_TEMPLATES[attr][i].format(e=e),
                                  "answer": v, "teacher": FACT_TEACHER[attr].format(e=e, v=v),
                                  "reference": v})
    return out


def unique_examples(make, rng, n, seen):
    """n examples from make(rng) whose prompts are new (not in `seen`, which is updated)."""
    out = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        ex = make(rng)
        if ex["transcript"] not in seen:
            seen.add(ex["transcript"])
            out.append(ex)
    return out

# -----------------------------------------------------------------------------
# the toy world: audio skills (what the speech model can do that text cannot)

AUDIO_INSTRUCTIONS = {
    "asr": "transcribe the speech .",
    "pitch": "is the voice of the speaker high or low ?",
    "rate": "is the speaker talking fast or slow ?",
    "emotion": "does the speaker sound neutral , happy or sad ?",
    "noise": "is the recording clean or noisy ?",
}
AUDIO_LABELS = {"pitch": pitch_label, "rate": rate_label, "emotion": emotion_label,
                "noise": noise_label}
VOICE_FIELDS = {"pitch": "pitch_hz", "rate": "rate", "emotion": "emotion", "noise": "noise"}


def voice_labels(voice):
    """{question: label} for every voice attribute a record's `voice` carries (all, in the toy world)."""
    return {t: AUDIO_LABELS[t](voice) for t, k in VOICE_FIELDS.items() if k in voice}
TEXT_TASKS, AUDIO_TASKS = ("arith", "instruct", "facts"), tuple(AUDIO_INSTRUCTIONS)


def make_speakers(rng, n):
    """Half low voices (80-125 Hz, longer tracts), half high voices (190-260 Hz, shorter)."""
    speakers = []
    for i in range(n):
        if i % 2 == 0:
            speakers.append({"speaker": "", "pitch_hz": rng.uniform(80, 125),
                             "tract_scale": rng.uniform(1.0, 1.2)})
        else:
            speakers.append({"speaker": "", "pitch_hz": rng.uniform(190, 260),
                             "tract_scale": rng.uniform(0.85, 1.05)})
    return speakers


def sample_voice(rng, speaker, noisy_p=0.3):
    """One utterance's voice: the speaker's pitch and tract, plus a rate class (slow/fast), an
    emotion, a noise level and a loudness drawn per utterance."""
    fast = rng.random() < 0.5
    noisy = rng.random() < noisy_p
    return Voice(pitch_hz=round(float(speaker["pitch_hz"]), 2),
                 tract_scale=round(float(speaker["tract_scale"]), 3),
                 rate=round(float(rng.uniform(1.2, 1.45) if fast else rng.uniform(0.7, 0.85)), 3),
                 emotion=EMOTIONS[int(rng.integers(3))],
                 noise=round(float(rng.uniform(0.2, 0.4) if noisy else rng.uniform(0.0, 0.02)), 3),
                 loudness=round(float(rng.uniform(0.8, 1.2)), 3), speaker=speaker["speaker"])


# The pools. Every text-family prompt lies in exactly one pool:
#   text   unspoken prompts the text teacher alone learns from (text is free to generate)
#   train  what the speech LLM's own (omni) training sees, spoken; the teacher reads these too
#   align  the paired speech / text prompts every alignment method uses (new to the student)
#   val    for choosing settings (learning rates), never for reporting
#   test   for the tables only
# Audio skills (transcription, voice questions) have train and test clips.
POOLS = ("train", "align", "val", "test")   # the spoken pools, one manifest each

PRESETS = {
    # text prompts per family (arith, instruct) and pool; facts: entities, each asked 3 x 4 times
    # in train and 3 times in align, val and test; audio clips per task; speakers seen / unseen
    "tiny": dict(text=dict(text=200, train=40, align=12, val=8, test=12), facts_entities=5,
                 asr=dict(train=30, test=10), audio_q=dict(train=16, test=6), speakers=(6, 3)),
    "cpu": dict(text=dict(text=20000, train=900, align=300, val=100, test=300), facts_entities=100,
                asr=dict(train=3000, test=200), audio_q=dict(train=400, test=100), speakers=(24, 8)),
}


def build_world(seed=0, preset="cpu"):
    """-> list of records (without audio written) for every pool, deterministic in the seed."""
    cfg = PRESETS[preset]
    rng = np.random.default_rng(seed)
    seen = set()   # every prompt string, whatever its pool: pools are disjoint by construction
    text = {p: [] for p in ("text",) + POOLS}
    for task, make in (("arith", arith_example), ("instruct", instruct_example)):
        for pool in ("test", "val", "align", "train", "text"):
            text[pool] += unique_examples(make, rng, cfg["text"][pool], seen)
    for pool, exs in fact_examples(rng, cfg["facts_entities"]).items():
        text[pool] += exs
    vocab = sorted({w for exs in text.values() for ex in exs for w in ex["transcript"].split()
                    if w.isalpha()})

    n_seen, n_unseen = cfg["speakers"]
    speakers = make_speakers(rng, n_seen + n_unseen)
    for i, s in enumerate(speakers):
        s["speaker"] = f"spk{i:02d}"
    seen_spk, unseen_spk = speakers[:n_seen], speakers[n_seen:]

    def pick_speaker(pool):   # val / test: half the utterances from speakers never heard in training
        spk = seen_spk if pool in ("train", "align") or rng.random() < 0.5 else unseen_spk
        return spk[int(rng.integers(len(spk)))]

    def random_sentence():     # 3-6 words of the world's vocabulary, for ASR and voice questions
        return " ".join(vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(3, 7))))

    records = []
    for pool in ("text",) + POOLS:
        for i, ex in enumerate(text[pool]):
            r = {"id": f"{pool}-{ex['task']}-{i:05d}", "split": pool, "task": ex["task"],
                 "kind": "text", "transcript": ex["transcript"], "instruction": "",
                 "reference": ex["reference"], "teacher": ex["teacher"], "answer": ex["answer"]}
            if pool != "text":   # the teacher's own pool is never spoken
                r["voice"] = asdict(sample_voice(rng, pick_speaker(pool)))
            records.append(r)
    seen_audio = set()
    for pool in ("train", "test"):
        prompts = [ex["transcript"] for ex in text[pool]]
        for task in AUDIO_TASKS:
            n = cfg["asr" if task == "asr" else "audio_q"][pool]
            for i in range(n):
                for _ in range(100):   # ASR half spoken prompts of this pool, half random words
                    if task == "asr" and rng.random() < 0.5:
                        s = prompts[int(rng.integers(len(prompts)))]
                    else:
                        s = random_sentence()
                    if (task, s) not in seen_audio:
                        break
                seen_audio.add((task, s))
                voice = asdict(sample_voice(rng, pick_speaker(pool),
                                            noisy_p=0.5 if task == "noise" else 0.3))
                answer = s if task == "asr" else AUDIO_LABELS[task](voice)
                records.append({"id": f"{pool}-{task}-{i:05d}", "split": pool, "task": task,
                                "kind": "audio", "transcript": s,
                                "instruction": AUDIO_INSTRUCTIONS[task], "reference": answer,
                                "teacher": None, "answer": answer, "voice": voice})
    for r in records:
        if "voice" in r:
            r["audio"] = f"wavs/{r['id']}.wav"
    return records


WORLD_FORMAT = 3   # bump when build_world changes what a seed produces
UNFINISHED = "generating.json"   # written before the first clip, removed after done.json: a generation cut short


def _speak(job):
    """One clip of make_toy_data: (transcript, voice fields, seed, path) -> its length in samples."""
    text, voice, seed, path = job
    audio = synthesize(text, Voice(**voice), seed=seed)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return len(audio)


def _speak_all(jobs):
    """A worker's share of make_toy_data: _speak on each job -> their lengths."""
    return [_speak(job) for job in jobs]


def make_toy_data(out_dir, seed=0, preset="cpu"):
    """Write the toy world: out_dir/{train,align,val,test}.jsonl with out_dir/wavs/*.wav, the
    teacher's unspoken prompts out_dir/text.jsonl, and out_dir/tokenizer.json. Skips the work
    when out_dir already holds the same (seed, preset, format). Returns the paths.

    The clips are made by worker processes ('spawn': each imports the calling script); from a
    script without an `if __name__ == "__main__":` guard they cannot start, and the clips are made
    in this process instead, with the same bytes."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # a spawned worker importing a guard-less calling script, which calls this again: leave
        # quietly (the pool breaks and the calling process makes the clips itself)
        raise SystemExit(0)
    paths = {p: os.path.join(out_dir, f"{p}.jsonl") for p in ("text",) + POOLS}
    paths.update(tokenizer=os.path.join(out_dir, "tokenizer.json"), wavs=os.path.join(out_dir, "wavs"))
    stamp = os.path.join(out_dir, "done.json")
    want = {"seed": seed, "preset": preset, "format": WORLD_FORMAT}
    if os.path.exists(stamp):
        with open(stamp) as fh:
            if json.load(fh) == want:
                return paths
    mark = os.path.join(out_dir, UNFINISHED)
    again = " again: the last generation there was cut short" if os.path.exists(mark) else ""
    print(f"[data] generating the {preset} toy world (seed {seed}) in {out_dir}{again}", flush=True)
    t0 = time.time()
    os.makedirs(out_dir, exist_ok=True)
    with open(mark, "w") as fh:  # first, so that a generation cut short is known as this project's own
        json.dump(want, fh)
    if os.path.exists(stamp):  # an older world is being replaced: no longer done
        os.remove(stamp)
    os.makedirs(paths["wavs"], exist_ok=True)
    records = build_world(seed, preset)
    # one seed per clip, so any clip can be made alone: in parallel, one process per core, with the
    # same bytes as one process would write
    jobs = [(r["transcript"], r["voice"], seed * 1_000_003 + i, os.path.join(out_dir, r["audio"]))
            for i, r in enumerate(records) if "audio" in r]
    made, shown = [], time.time()  # made: the clips' lengths, in job order

    def collect(lengths):
        nonlocal shown
        for n in lengths:
            made.append(n)
            if time.time() - shown >= 5 and len(made) < len(jobs):   # a line every 5 s
                shown, rate = time.time(), len(made) / (time.time() - t0)
                print(f"[data] {len(made)}/{len(jobs)} clips, {rate:.0f} clips/s, eta {(len(jobs) - len(made)) / rate:.0f} s", flush=True)
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if workers > 1:
        try:
            others = set(multiprocessing.active_children())
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
                # the workers, started by submit, are born with Ctrl-C blocked (a signal mask is kept
                # through exec): it is this process's to handle, not a traceback in each of them.
                # Blocked, not ignored: a Ctrl-C while they start is held, and raised here after
                hold = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
                if hold:
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                try:
                    parts = [ex.submit(_speak_all, jobs[i:i + 32]) for i in range(0, len(jobs), 32)]
                    if hold:
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
                    collect(n for part in parts for n in part.result())
                except KeyboardInterrupt:  # stop now: a generation cut short is made again from the start
                    for w in set(multiprocessing.active_children()) - others:  # the pool's workers
                        w.terminate()
                    raise
                finally:
                    if hold:
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        except BrokenProcessPool:
            print("[data] the clip workers could not start (a script that calls data.make_toy_data needs its code under "
                  "`if __name__ == \"__main__\":` for them); making the clips in this process", flush=True)
    collect(map(_speak, jobs[len(made):]))
    for pool in ("text",) + POOLS:
        with open(paths[pool], "w") as fh:
            for r in records:
                if r["split"] == pool:
                    fh.write(json.dumps(r) + "\n")
    train_tokenizer(toy_corpus(records)).save(paths["tokenizer"])
    with open(stamp, "w") as fh:
        json.dump(want, fh)
    os.remove(mark)
    print(f"toy data ({preset}, seed {seed}): {len(made)} clips, {sum(made) / SAMPLE_RATE / 3600:.2f} h "
          f"of audio, {len(records) - len(made)} unspoken prompts, {time.time() - t0:.1f} s -> {out_dir}")
    return paths


# -----------------------------------------------------------------------------
# scoring


def normalize_text(s):
    """Lower case, punctuation split off, '.' dropped, single spaces."""
    return " ".join(w for w in re.findall(r"\w+|[^\w\s]", s.lower()) if w != ".")


def extract_answer(text):
    """The final answer: what follows the last 'the answer is', else the whole text (normalised)."""
    s = normalize_text(text)
    key = "the answer is"
    i = s.rfind(key)
    return s[i + len(key):].strip() if i >= 0 else s


def spoken_words(text):
    """The words of a transcript that are spoken (punctuation is silent): what every hearing row
    is scored against, so that no row loses points for punctuation it cannot hear."""
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

# -----------------------------------------------------------------------------
# tokenizer and chat format
#
# Word-level, trained on the toy corpus: the toy language is a closed vocabulary of a few hundred
# words, so one token per word keeps sequences short for tiny CPU models and makes ASR a word
# choice. Text is lower-cased and split into words and punctuation; a word outside the vocabulary
# (a user's own transcript) becomes UNK instead of failing. A BPE would serve a real corpus better.

PAD, USER, ASSISTANT, END, AUDIO = "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>", "<|audio|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = [PAD, USER, ASSISTANT, END, AUDIO, UNK]   # ids 0..5 in this order


@dataclass(frozen=True)
class ChatFormat:
    """The strings around a turn: a prompt is user + content + " " + instruction + assistant, a
    response ends with `end` (one token: the sampler stops on its id), and a speech prompt's content
    is `audio` (one token, replaced by the audio vectors before the decoder reads it). A real
    teacher's format comes as a JSON file of these fields (`--chat_format`); `pad` is optional
    (padding is masked; the end token serves when it is absent)."""
    user: str = USER
    assistant: str = ASSISTANT
    end: str = END
    audio: str = AUDIO
    pad: str = PAD
    source: str = field(default="", compare=False)  # the file it was read from, for error messages


TOY_FORMAT = ChatFormat()


def read_chat_format(path):
    """A chat-format JSON file -> ChatFormat; a missing file, unknown field or non-string value is
    an error naming the file and the field."""
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
        raise ValueError(f"{path}: missing field(s) {missing} (the strings before a user turn and an "
                         f"assistant turn, and the end-of-turn token)")
    return ChatFormat(**raw, source=os.fspath(path))


def toy_corpus(records):
    for r in records:
        for key in ("transcript", "instruction", "reference", "teacher"):
            if r.get(key):
                yield r[key]


def train_tokenizer(corpus):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()   # \w+ and runs of punctuation
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    return tok


def load_tokenizer(path):
    from tokenizers import Tokenizer
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: tokenizer not found (a Hugging Face tokenizer.json is expected)")
    return Tokenizer.from_file(os.fspath(path))


def chat_ids(tok, fmt):
    """The ids of a chat format's single tokens -> {"end", "audio", "pad"}. The audio placeholder is
    added to the tokenizer when it lacks it (a real teacher's never has it); the decoder never
    embeds it, so it needs no row of the vocabulary. The end token and the placeholder must each
    be one token (a string that splits is refused, naming the field)."""
    if tok.token_to_id(fmt.audio) is None:
        tok.add_special_tokens([fmt.audio])
    out = {}
    for name in ("end", "audio", "pad"):
        ids = tok.encode(getattr(fmt, name), add_special_tokens=False).ids
        if len(ids) != 1:
            if name == "pad":
                out["pad"] = out["end"]  # padding is masked: any valid id will do
                continue
            raise ValueError(f"{fmt.source or 'the chat format'}: field {name!r} = {getattr(fmt, name)!r} is {len(ids)} tokens for the "
                             f"tokenizer, expected exactly one")
        out[name] = ids[0]
    return out


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids if text else []


def encode_prompt(tok, record, modality, fmt=TOY_FORMAT):
    """The chat format, for the teacher's text prompt and the student's speech prompt alike:
        text:   user transcript instruction assistant
        speech: user <|audio|>  instruction assistant
    (toy: <|user|> ... <|assistant|>). The instruction is encoded with the space before it, as a
    byte-level BPE sees it mid-sentence (a word-level tokenizer drops the space). The prompt ends
    with the assistant string, so response ids (encode_response) follow directly and are the same
    in both modalities."""
    if modality == "text":
        content = _ids(tok, record["transcript"])
    elif modality == "speech":
        content = [tok.token_to_id(fmt.audio)]
    else:
        raise ValueError(f"modality must be 'text' or 'speech', got {modality!r}")
    instruction = record.get("instruction", "")
    return (_ids(tok, fmt.user) + content + _ids(tok, " " + instruction if instruction else "")
            + _ids(tok, fmt.assistant))


def spoken_word_ids(tok, transcript):
    """The token ids of a transcript's spoken words (punctuation is silent), one list per word:
    one id each with a word-level tokenizer, a word's pieces with a BPE (mid-sentence words with
    the space before them, as they occur in text)."""
    words = [w for w in normalize_text(transcript).split() if w.isalpha()]
    return [_ids(tok, w if i == 0 else " " + w) for i, w in enumerate(words)]


def encode_response(tok, text, fmt=TOY_FORMAT):
    return _ids(tok, text) + [tok.token_to_id(fmt.end)]


def decode_response(tok, ids, fmt=TOY_FORMAT):
    """Ids -> text, stopping at the first end token and dropping special tokens."""
    ids = [int(i) for i in ids]
    end = tok.token_to_id(fmt.end)
    if end in ids:
        ids = ids[:ids.index(end)]
    return tok.decode(ids, skip_special_tokens=True)

# -----------------------------------------------------------------------------
# manifests (JSONL, one record per line)

MANIFEST_DEFAULTS = {"split": "train", "task": "custom", "kind": "text", "instruction": "",
                     "reference": "", "teacher": None, "answer": "", "voice": {}}
# what each field must hold, checked as a manifest is read (not when a stage first uses it):
# (types, said as). reference and teacher may be null: a record without that response.
FIELD_TYPES = {"split": (str, "a string"), "task": (str, "a string"), "instruction": (str, "a string"),
               "answer": (str, "a string"), "reference": ((str, type(None)), "a string or null"),
               "teacher": ((str, type(None)), "a string or null"), "voice": (dict, "an object of voice fields")}
NUMBER = ((int, float), "a number")
VOICE_TYPES = {"pitch_hz": NUMBER, "tract_scale": NUMBER, "rate": NUMBER, "noise": NUMBER, "loudness": NUMBER,
               "emotion": (str, f"one of {', '.join(EMOTIONS)}"), "speaker": (str, "a string")}


def field_error(r):
    """The first field of record r (defaults filled in) that holds the wrong type -> 'field ... is
    ...; expected ...', or None."""
    checks = [(k, r[k], *FIELD_TYPES[k]) for k in FIELD_TYPES]
    if isinstance(r["voice"], dict):
        checks += [(f"voice.{k}", r["voice"][k], *VOICE_TYPES[k]) for k in VOICE_TYPES if k in r["voice"]]
    for name, v, types, what in checks:
        if not isinstance(v, types) or isinstance(v, bool) or (name == "voice.emotion" and v not in EMOTIONS):
            shown = json.dumps(v)
            return f"field {name!r} is {shown if len(shown) < 60 else shown[:57] + '...'}; expected {what}"
    return None


def read_manifest(path, audio=True, seen=None, required=False):
    """-> list of records with 'audio' resolved to an absolute path. Blank lines are skipped;
    a malformed line (not UTF-8, not JSON, a field of the wrong type) raises ValueError naming the
    file, line number and field. audio=False reads unspoken prompts (the teacher's text.jsonl): no
    'audio' field is needed. Ids must be unique (log-mels and encoder features are cached by id):
    within the file, and across the files read with the same `seen` dict ({id: 'file:line'}, updated).
    required: a file without records is an error too (found here, not at the stage that needs them)."""
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    seen = {} if seen is None else seen
    records = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                 f"expected JSON Lines in UTF-8") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(r).__name__}")
            required = ("id", "audio", "transcript") if audio else ("id", "transcript")
            missing = [k for k in required if not isinstance(r.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or non-string field(s) {missing}")
            if r.get("kind", "text") not in ("text", "audio"):
                raise ValueError(f"{path}:{lineno}: kind must be 'text' or 'audio'")
            if r["id"] in seen:
                raise ValueError(f"{path}:{lineno}: id {r['id']!r} is already used at {seen[r['id']]}; ids must "
                                 f"be unique across the manifests (audio is cached by id)")
            r = {**MANIFEST_DEFAULTS, **r}
            wrong = field_error(r)
            if wrong:
                raise ValueError(f"{path}:{lineno}: {wrong}")
            seen[r["id"]] = f"{path}:{lineno}"
            if audio:
                r["audio"] = os.path.join(root, r["audio"])   # absolute paths pass through
            records.append(r)
    if required and not records:
        raise ValueError(f"{path}: no records; expected one JSON object per line (README, 'Bring your own audio')")
    return records

# -----------------------------------------------------------------------------
# shared small helpers: seeds, progress lines, fingerprints

SEED_MIX = 1_000_003  # a prime larger than any step count: mix_seed's parts never collide


def mix_seed(*parts):
    """One integer seed from several (seed, step, rank, ...): mix_seed(a, b) = a * SEED_MIX + b."""
    out = 0
    for p in parts:
        out = out * SEED_MIX + p
    return out


class Progress:
    """A progress line at most every `every` seconds while `total` items are worked through:
    '[name] what: n/total unit, rate unit/s, eta'. Call it with the number done so far."""

    def __init__(self, name, what, total, unit="clips", every=5.0):
        self.name, self.what, self.total, self.unit, self.every = name, what, total, unit, every
        self.t0 = self.shown = time.time()

    def __call__(self, n):
        now = time.time()
        if now - self.shown >= self.every and n < self.total:
            rate = n / (now - self.t0)
            eta = (self.total - n) / rate if rate > 0 else float("nan")
            print(f"[{self.name}] {self.what}: {n}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s, "
                  f"eta {eta:.0f} s", flush=True)
            self.shown = now


def fingerprint(obj):
    """16 hex digits of a SHA-256 over a JSON-able object (keys sorted): equal exactly when what
    went into an output (settings, data digests, the fingerprints of its inputs) is equal."""
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


# -----------------------------------------------------------------------------
# batching


def collate_tokens(seqs, pad_id):
    """list of id lists -> (ids (B, T) right padded with pad_id, lens (B,))."""
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lens.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lens


def collate_mels(mels):
    """list of (n_mels, T_i) -> (mels (B, n_mels, T_max) zero padded, mel_lens (B,))."""
    lens = torch.tensor([m.shape[-1] for m in mels], dtype=torch.long)
    out = torch.zeros(len(mels), mels[0].shape[0], int(lens.max()))
    for b, m in enumerate(mels):
        out[b, :, :m.shape[-1]] = torch.as_tensor(m)
    return out, lens


@dataclass
class Batch:
    """
    One batch of prompts, and optionally of fixed responses, as xopd.py's steps take it. Right
    padded; each *_lens (B,) holds the real length of every row. A field the batch does not
    carry is None.

        text_ids, text_lens          (B, T_t)   text prompts   <|user|> transcript instruction <|assistant|>
        speech_ids, speech_lens      (B, T_s)   speech prompts <|user|> <|audio|> instruction <|assistant|>
        mels, mel_lens               (B, n_mels, T_mel)  log-mels of the speech prompts' audio
        feats, feat_lens             (B, T_enc, n_state) a frozen encoder's outputs for that audio,
                                                in place of mels
        response_ids, response_lens  (B, L)     fixed responses, ending with <|end|>
    """
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
        present = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        return replace(self, **{k: v.to(device) for k, v in present.items()})


def text_families(records, per_family=None):
    """{family: its text-skill records (the first per_family of them)}, families in sorted order."""
    fams = {}
    for r in records:
        if r["kind"] == "text":
            fams.setdefault(r["task"], []).append(r)
    return {t: rs[:per_family] for t, rs in sorted(fams.items())}


def batch_indices(n_items, batch_size, step, seed):
    """Rows of step `step`: a fresh permutation per epoch, seeded by (seed, epoch) only,
    so any step's batch can be rebuilt on resume without replaying the ones before it."""
    if n_items < batch_size:  # tiny corpora: draw with replacement
        return np.random.default_rng([seed, step]).integers(0, n_items, batch_size).tolist()
    per_epoch = n_items // batch_size
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)
    return perm[i * batch_size:(i + 1) * batch_size].tolist()


class World:
    """A data folder loaded once per run: a manifest per pool (train.jsonl and test.jsonl required;
    align.jsonl, val.jsonl and the teacher's unspoken text.jsonl optional), the tokenizer (the
    folder's tokenizer.json, or a real teacher's) with its chat format, the records' log-mels
    (n_mels bands: 80, or what a Whisper checkpoint takes) cached in memory, and batches of them."""

    def __init__(self, data_dir, tokenizer=None, fmt=TOY_FORMAT, n_mels=N_MELS):
        self.dir, self.fmt, self.n_mels = data_dir, fmt, n_mels
        path = lambda name: os.path.join(data_dir, f"{name}.jsonl")
        self.tok = load_tokenizer(tokenizer or os.path.join(data_dir, "tokenizer.json"))
        # one id space for every spoken manifest (the mel and feature caches are keyed by id);
        # id -> 'file:line', where an error about a record points
        self.lines = ids = {}
        self.train = read_manifest(path("train"), seen=ids, required=True)
        self.test = read_manifest(path("test"), seen=ids, required=True)
        self.align = read_manifest(path("align"), seen=ids) if os.path.exists(path("align")) else []
        self.val = read_manifest(path("val"), seen=ids) if os.path.exists(path("val")) else []
        self.text = read_manifest(path("text"), audio=False) if os.path.exists(path("text")) else []
        # the speakers of the train pool: a clip by anyone else is an unseen speaker's
        self.heard = {r["voice"].get("speaker") for r in self.train} - {None, ""}
        special = chat_ids(self.tok, fmt)
        self.pad_id, self.end_id, self.audio_id = special["pad"], special["end"], special["audio"]
        self._mels, self._digests = {}, {}
        # encoder -> {record id: features}; weak, so an encoder's features go with it, and
        # another encoder never reads them
        self._feats = weakref.WeakKeyDictionary()

    def check_clips(self, max_seconds, pools=POOLS):
        """Every clip of the spoken manifests (of `pools`), by its header (check_clip): a bad one is
        found before any stage trains, not at the first that reads it."""
        for r in (r for pool in pools for r in getattr(self, pool)):
            check_clip(r["audio"], self.lines[r["id"]], max_seconds)

    def digest(self, pools):
        """What the records of `pools` hold, for fingerprints: the manifests' bytes, each clip's
        size and header (file_digest), the tokenizer and the chat format. Folder-independent:
        two copies of one data folder give the same digest. -> 16 hex digits, cached per pools."""
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

    def response(self, text):
        return encode_response(self.tok, text, self.fmt)

    def decode(self, ids):
        return decode_response(self.tok, ids, self.fmt)

    def mel(self, rec):
        if rec["id"] not in self._mels:
            self._mels[rec["id"]] = log_mel_spectrogram(load_audio(rec["audio"]), self.n_mels)
        return self._mels[rec["id"]]

    def features(self, recs, encoder, device):
        """A frozen encoder's outputs, computed once per clip and encoder (the omni stage sees each
        clip many times). The encoder is padding invariant, so batching does not change them. A record
        that carries its outputs under "feats" (train.spliced_lists: no clip of its own) uses those.
        -> feats (B, T, n_state), lens (B,)."""
        cache = self._feats.setdefault(encoder, {})
        todo = [r for r in recs if "feats" not in r and r["id"] not in cache]
        if todo:
            with torch.no_grad():
                mels, mel_lens = collate_mels([self.mel(r) for r in todo])
                x, lens = encoder(mels.to(device), mel_lens.to(device))
            for r, xr, n in zip(todo, x, lens.tolist()):
                cache[r["id"]] = xr[:n].clone()
        feats = [r["feats"] if "feats" in r else cache[r["id"]] for r in recs]  # a spliced clip carries its own
        lens = torch.tensor([len(f) for f in feats], device=device)
        out = feats[0].new_zeros(len(feats), int(lens.max()), feats[0].shape[-1])
        for i, f in enumerate(feats):
            out[i, :len(f)] = f
        return out, lens

    def batch(self, recs, responses=None, device="cpu", text=True, speech=True, encoder=None):
        """A Batch of recs: text and/or speech prompts, and optional fixed responses (a list of
        strings, one per record). Speech comes as mels, or, given a frozen encoder, as its
        cached outputs (see features)."""
        b = Batch()
        if text:
            b.text_ids, b.text_lens = collate_tokens([self.prompt(r, "text") for r in recs], self.pad_id)
        if speech:
            b.speech_ids, b.speech_lens = collate_tokens([self.prompt(r, "speech") for r in recs], self.pad_id)
            if encoder is None:
                b.mels, b.mel_lens = collate_mels([self.mel(r) for r in recs])
            else:
                b.feats, b.feat_lens = self.features(recs, encoder, device)
        if responses is not None:
            b.response_ids, b.response_lens = collate_tokens([self.response(t) for t in responses], self.pad_id)
        return b.to(device)


# -----------------------------------------------------------------------------
# a run's world

def world_of(settings, n_mels=N_MELS, data_dir=None):
    """The World a run reads (its TrainConfig settings as a dict): its data folder, the tokenizer of
    its --teacher folder when it had one, its --chat_format, log-mels of n_mels bands."""
    fmt = read_chat_format(settings["chat_format"]) if settings.get("chat_format") else TOY_FORMAT
    tokenizer = os.path.join(settings["teacher"], "tokenizer.json") if settings.get("teacher") else None
    return World(data_dir or settings["data"], tokenizer, fmt, n_mels)


RUN_PATHS = ("data", "teacher", "whisper", "chat_format", "student")  # the settings that are paths


def run_path(settings, key, out):
    """A path a run stored in its checkpoints (settings: its saved TrainConfig), for the run now in
    folder out: a path inside the run folder moves with the folder (a copied or moved run keeps its
    own data); any other is as stored (absolute; an older version stored the path as given, relative
    to the directory it ran in)."""
    p, was = settings.get(key) or "", settings.get("out") or ""
    if not p or not was:
        return p
    rel = os.path.relpath(p, was)
    return p if rel == os.pardir or rel.startswith(os.pardir + os.sep) else os.path.normpath(os.path.join(out, rel))
