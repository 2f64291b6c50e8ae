"""Waveform views and augmentation for self-supervised speaker verification.

Contrastive speaker SSL (SimCLR-style: Zhang et al. 2021, "Contrastive
self-supervised learning for text-independent speaker verification"; the
sslsv framework) makes two random segments of one utterance the positive pair
and relies on augmentation to stop the model matching them by channel: both
views share room, microphone and background, so without noise and reverb the
cheapest "speaker" cue is the recording condition (Huh et al. 2020,
augmentation adversarial training). The usual recipe takes MUSAN noise and
real RIRs (Kaldi x-vector recipe, Snyder et al. 2018); here everything is made
without external corpora: white/coloured noise is synthesised, babble is summed
from other training utterances, and impulse responses come from simulated
shoebox rooms (pyroomacoustics image-source method), built once into a pool.

Everything is float32 mono numpy at 16 kHz, shape (T,). Every random draw
comes from a caller-given ``np.random.Generator``: same generator state, same
output.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import soxr

from ..audio.io import SAMPLE_RATE
from .atomic import atomic_write

NOISE_KINDS = ("white", "coloured", "babble")
_POOL_FORMAT = 1  # bump when build_rir_pool's output changes for the same parameters
_EPS = 1e-12


def _check_range(name: str, r: Sequence[float], lo: float, hi: float) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"AugmentConfig.{name}={r!r}: need (low, high) with {lo} <= low <= high <= {hi}")


@dataclass(frozen=True)
class AugmentConfig:
    """What to augment and how much. Probabilities are per call, independent.

    Defaults follow Kaldi/x-vector practice (Snyder et al. 2018) scaled to SSL:
    SNR 5-20 dB, babble of 3-6 talkers, RT60 0.2-0.8 s (offices to halls),
    Kaldi's speed factors 0.9/1.1 (Ko et al. 2015).
    """
    segment_seconds: float = 2.0          # view length for random_segment
    p_noise: float = 0.6                  # probability of adding noise to a view
    snr_db: tuple[float, float] = (5.0, 20.0)  # (low, high) dB, the SNR drawn uniformly per noisy view
    noise_kinds: tuple[str, ...] = NOISE_KINDS  # drawn from: white, coloured, babble (other training utterances)
    coloured_beta: tuple[float, float] = (0.0, 2.0)   # power ~ 1/f^beta: 0 white, 1 pink, 2 brown
    babble_speakers: tuple[int, int] = (3, 6)         # inclusive
    p_reverb: float = 0.4                 # probability of reverberating a view with an IR from the pool
    rir_pool: int = 64                    # impulse responses simulated once (random shoebox rooms) and reused
    rir_seconds: float = 0.5              # IRs truncated after the direct path: cost of the convolution
    room_min: tuple[float, float, float] = (3.0, 3.0, 2.4)    # shoebox (x, y, z) metres
    room_max: tuple[float, float, float] = (10.0, 8.0, 4.0)  # largest room, metres; sides drawn in between
    rt60: tuple[float, float] = (0.2, 0.8)            # seconds, realised via pyroomacoustics.inverse_sabine
    min_distance: float = 0.5             # source-mic metres; also the distance kept from walls
    p_gain: float = 0.5                   # probability of a random volume change
    gain_db: tuple[float, float] = (-6.0, 6.0)  # (low, high) dB of that change, drawn uniformly
    p_speed: float = 0.3                  # probability of speed perturbation (tempo and pitch), factor from speeds
    speeds: tuple[float, ...] = (0.9, 1.1)  # discrete choices, Kaldi-style

    def __post_init__(self) -> None:
        if not self.segment_seconds > 0:
            raise ValueError(f"AugmentConfig.segment_seconds={self.segment_seconds}: must be > 0")
        for p in ("p_noise", "p_reverb", "p_gain", "p_speed"):
            if not 0.0 <= getattr(self, p) <= 1.0:
                raise ValueError(f"AugmentConfig.{p}={getattr(self, p)}: a probability must be in [0, 1]")
        _check_range("snr_db", self.snr_db, -30.0, 100.0)
        _check_range("coloured_beta", self.coloured_beta, 0.0, 3.0)
        _check_range("babble_speakers", self.babble_speakers, 1, 100)
        _check_range("rt60", self.rt60, 0.05, 3.0)
        _check_range("gain_db", self.gain_db, -40.0, 40.0)
        bad = [k for k in self.noise_kinds if k not in NOISE_KINDS]
        if bad or not self.noise_kinds:
            raise ValueError(f"AugmentConfig.noise_kinds={self.noise_kinds!r}: choose from {NOISE_KINDS}")
        if not (self.rir_pool >= 1 and 0.0 < self.rir_seconds <= 5.0):
            raise ValueError(f"AugmentConfig: rir_pool={self.rir_pool} must be >= 1 and "
                             f"rir_seconds={self.rir_seconds} in (0, 5]")
        if len(self.room_min) != 3 or len(self.room_max) != 3 or not all(
                2 * self.min_distance < lo <= hi for lo, hi in zip(self.room_min, self.room_max)):
            raise ValueError(f"AugmentConfig: room_min={self.room_min} / room_max={self.room_max} need 3 sides "
                             f"each with 2*min_distance ({2 * self.min_distance} m) < min <= max")
        if not self.speeds or not all(0.5 <= s <= 2.0 for s in self.speeds):
            raise ValueError(f"AugmentConfig.speeds={self.speeds!r}: need at least one factor in [0.5, 2]")


# ---- views ----
def _n_samples(seconds: float, sr: int) -> int:
    n = int(round(seconds * sr))
    if n < 1:
        raise ValueError(f"{seconds} s at {sr} Hz is less than one sample")
    return n


def is_short(wav: np.ndarray, seconds: float, sr: int = SAMPLE_RATE) -> bool:
    """True when ``wav`` (T,) has fewer samples than a ``seconds`` view: random_segment would pad it."""
    return len(wav) < _n_samples(seconds, sr)


def _fit_length(x: np.ndarray, n: int, rng: np.random.Generator | None) -> np.ndarray:
    """(T,) -> (n,): a crop if longer, a circular (wrapped) window if shorter.

    Wrapping, as voxceleb_trainer's loadWAV (np.pad mode="wrap"), keeps the view
    all speech: zero padding would give short utterances silence that the model
    could use to match the two views. The window starts at a random phase so
    two views of one short utterance still differ. Without ``rng``: centre crop,
    wrap from sample 0.
    """
    t = len(x)
    if t >= n:
        start = int(rng.integers(0, t - n + 1)) if rng is not None else (t - n) // 2
        return x[start:start + n]
    start = int(rng.integers(0, t)) if rng is not None else 0
    return np.resize(np.roll(x, -start), n)  # np.resize repeats the array cyclically


def random_segment(wav: np.ndarray, seconds: float, rng: np.random.Generator,
                   sr: int = SAMPLE_RATE) -> np.ndarray:
    """A random crop (n,) of ``wav`` (T,), n = round(seconds*sr); a short utterance is wrapped (see is_short)."""
    wav = np.asarray(wav)
    if wav.ndim != 1 or wav.size == 0:
        raise ValueError(f"random_segment needs a non-empty (T,) waveform, got shape {wav.shape}")
    return np.array(_fit_length(wav, _n_samples(seconds, sr), rng), dtype=np.float32)


# ---- pure transforms ----
def active_power(wav: np.ndarray, sr: int = SAMPLE_RATE, frame_ms: float = 20.0, floor_db: float = 40.0) -> float:
    """Mean power of ``wav`` (T,) over frames within ``floor_db`` of the loudest frame.

    A crude ITU-T P.56-style active level: pauses between words do not count,
    so the SNR refers to the speech itself, not to how much silence surrounds
    it. Returns 0.0 for silence.
    """
    x = np.asarray(wav, dtype=np.float64)
    hop = max(1, int(sr * frame_ms / 1000))
    nf = len(x) // hop
    if nf == 0:
        return float(np.mean(x**2)) if x.size else 0.0
    e = np.mean(x[:nf * hop].reshape(nf, hop) ** 2, axis=1)
    top = e.max()
    if top <= 0:
        return 0.0
    return float(e[e >= top * 10 ** (-floor_db / 10)].mean())


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """``wav`` (T,) plus ``noise`` (T,) scaled so active-signal power / noise power = ``snr_db``.

    Noise power is the plain mean (noise is treated as stationary). Silent
    ``wav`` or ``noise`` gives an unchanged copy: an SNR against zero power is
    undefined, and dividing by it would give inf/NaN.
    """
    wav = np.asarray(wav, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape != wav.shape:
        raise ValueError(f"add_noise: noise shape {noise.shape} != wav shape {wav.shape}")
    ps = active_power(wav, sr)
    pn = float(np.mean(noise.astype(np.float64) ** 2)) if noise.size else 0.0
    if ps <= _EPS**2 or pn <= _EPS**2:
        return wav.copy()
    scale = np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    return (wav + np.float32(scale) * noise).astype(np.float32)


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: pocketfft is fastest there (40000 for a 2 s view + 0.5 s IR, ~30% under 65536)."""
    best, p5 = 1 << max(0, n - 1).bit_length(), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35 << max(0, (n - 1) // p35).bit_length()  # times the smallest power of two reaching n
            best, p35 = min(best, m), p35 * 3
        p5 *= 5
    return best


def reverberate(wav: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``wav`` (T,) convolved with ``rir`` (L,), cut to (T,).

    The pool's IRs start at their direct-path peak, so keeping the first T
    output samples keeps the speech aligned with the input (no bulk delay)
    and drops only the tail past the segment end. FFT convolution: one rfft
    pair of ~T+L points, O((T+L) log) instead of O(T*L).
    """
    wav = np.asarray(wav, dtype=np.float32)
    rir = np.asarray(rir, dtype=np.float32)
    t = len(wav)
    if t == 0 or rir.size == 0:
        return wav.copy()
    nfft = _fast_len(t + len(rir) - 1)
    y = np.fft.irfft(np.fft.rfft(wav, nfft) * np.fft.rfft(rir, nfft), nfft)[:t]
    return y.astype(np.float32)


def speed_perturb(wav: np.ndarray, factor: float, sr: int = SAMPLE_RATE,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Play ``wav`` (T,) ``factor`` times faster (pitch and tempo scale together, as sox ``speed``), keep (T,).

    Resampling with soxr from sr*factor to sr gives T/factor samples; the result
    is cropped (random with ``rng``, else centred) or wrapped back to T so views
    keep one shape. Kaldi's speed perturbation (Ko et al. 2015) shifts formants
    and pitch, a plausible "other vocal tract" nuisance as well as a tempo change.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if factor <= 0:
        raise ValueError(f"speed_perturb: factor={factor} must be > 0")
    if factor == 1.0 or wav.size == 0:
        return wav.copy()
    y = soxr.resample(wav, sr * factor, sr)
    if y.size == 0:
        return np.zeros_like(wav)
    return np.array(_fit_length(y, len(wav), rng), dtype=np.float32)


def coloured_noise(n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise (n,) with power spectrum ~ 1/f^beta, shaped in the frequency domain.

    beta 0 is white (hiss), 1 pink (fans, rooms), 2 brown/red (rumble): one
    parameter covers the broadband noises MUSAN's "noise" set mostly holds.
    """
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    spec *= f ** (-beta / 2)  # amplitude ~ f^(-beta/2) -> power ~ f^-beta
    spec[0] = 0.0             # no DC offset
    x = np.fft.irfft(spec, n)
    rms = np.sqrt(np.mean(x**2))
    return (x / rms if rms > _EPS else x).astype(np.float32)


# ---- simulated rooms ----
def _one_rir(pra, rng: np.random.Generator, sr: int, cfg: AugmentConfig) -> np.ndarray:
    """One IR (L,), L = round(rir_seconds*sr): starts at the direct path, direct peak = 1."""
    for _ in range(100):  # a draw can be infeasible (absorption > 1): draw again
        dims = rng.uniform(cfg.room_min, cfg.room_max)
        rt60 = rng.uniform(*cfg.rt60)
        m = cfg.min_distance
        src, mic = rng.uniform(m, dims - m, size=(2, 3))
        if np.linalg.norm(src - mic) < m:
            continue
        try:
            e_abs, _ = pra.inverse_sabine(rt60, dims)
            # Image sources beyond what the truncated IR can hear are wasted work:
            # order from the kept duration (plus the direct delay), not the full RT60.
            _, order = pra.inverse_sabine(min(rt60, cfg.rir_seconds + 0.05), dims)
        except ValueError:
            continue
        room = pra.ShoeBox(dims, fs=sr, materials=pra.Material(e_abs), max_order=order)
        room.add_source(src)
        room.add_microphone(mic)
        room.compute_rir()
        h = np.asarray(room.rir[0][0], dtype=np.float64)
        # The direct path is where geometry puts it (plus pra's fractional-delay
        # filter centre): argmax |h| can land on coinciding reflections instead.
        d0 = int(round(np.linalg.norm(src - mic) / room.c * sr)) + pra.constants.get("frac_delay_length") // 2
        d0 = max(0, d0 - 2) + int(np.argmax(h[max(0, d0 - 2):d0 + 3]))
        if h[d0] <= 0:
            continue
        # Direct peak to 1 (not unit energy): the dry speech keeps its level and
        # the room only adds reflections, so loudness does not jump with the
        # room's direct-to-reverberant ratio; SNR is set after reverb anyway.
        h = h[d0:d0 + _n_samples(cfg.rir_seconds, sr)] / h[d0]
        out = np.zeros(_n_samples(cfg.rir_seconds, sr), dtype=np.float32)
        out[:len(h)] = h
        return out
    raise RuntimeError(f"no feasible room in 100 draws for rt60={cfg.rt60}, rooms {cfg.room_min}-{cfg.room_max}")


def build_rir_pool(n: int, seed: int = 0, sr: int = SAMPLE_RATE,
                   cfg: AugmentConfig = AugmentConfig()) -> list[np.ndarray]:
    """``n`` room impulse responses, each (L,) float32, L = round(cfg.rir_seconds*sr).

    Random shoebox size, RT60, source and mic positions; image-source method.
    IR i depends only on (seed, i), so a larger pool extends a smaller one.
    Takes ~0.01-0.2 s per IR on one core.
    """
    import pyroomacoustics as pra  # heavy import, only needed when building rooms

    return [_one_rir(pra, np.random.default_rng([seed, i]), sr, cfg) for i in range(n)]


def _pool_params(n: int, seed: int, sr: int, cfg: AugmentConfig) -> dict:
    import pyroomacoustics as pra

    keys = ("rir_seconds", "room_min", "room_max", "rt60", "min_distance")
    return {"format": _POOL_FORMAT, "n": n, "seed": seed, "sr": sr, "pyroomacoustics": pra.__version__,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k in keys}}


def load_or_build_rir_pool(path: str | Path, n: int, seed: int = 0, sr: int = SAMPLE_RATE,
                           cfg: AugmentConfig = AugmentConfig()) -> list[np.ndarray]:
    """build_rir_pool cached in one .npz at ``path`` (arrays ``rirs`` (n, L) and ``params`` JSON).

    The file is reused only if its stored parameters (including the
    pyroomacoustics version, whose simulation may change) equal the requested
    ones; otherwise, or if it is unreadable, the pool is rebuilt and rewritten.
    """
    path = Path(path)
    want = _pool_params(n, seed, sr, cfg)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["params"])) == want:
                    return list(z["rirs"].astype(np.float32))
        except (OSError, ValueError, KeyError):
            pass  # unreadable or old layout: rebuild below
    rirs = build_rir_pool(n, seed, sr, cfg)
    buf = io.BytesIO()
    np.savez(buf, rirs=np.stack(rirs), params=np.array(json.dumps(want, sort_keys=True)))
    # atomic_write is text-mode; its .buffer is the underlying binary temp
    # file, so the npz gets the same fsync-then-rename guarantee.
    with atomic_write(path) as f:
        f.buffer.write(buf.getvalue())
    return rirs


# ---- the pipeline ----
BabblePool = Callable[[np.random.Generator], np.ndarray] | Sequence[np.ndarray]


class Augmenter:
    """speed -> reverb -> noise -> gain -> peak limit, each stage with its own probability.

    ``rirs``: IRs from build_rir_pool (starting at the direct path); None or
    empty disables reverb. ``babble_pool``: other utterances, either a list or
    a callable ``rng -> (T,)`` (e.g. loading a random training file); None
    removes "babble" from the noise kinds. ``noise_kinds`` and
    ``reverb_enabled`` tell what is actually on.

    Output is never hard-clipped: a peak above 1 scales the whole view down to
    peak 1. Clipping would add level-dependent harmonic distortion, a
    nuisance no config asked for; scaling keeps the [-1, 1] range audio I/O
    promises (selfspeech.audio.io).
    """

    def __init__(self, cfg: AugmentConfig = AugmentConfig(), rirs: Sequence[np.ndarray] | None = None,
                 babble_pool: BabblePool | None = None, sr: int = SAMPLE_RATE):
        self.cfg, self.sr = cfg, sr
        self.rirs = [np.asarray(r, dtype=np.float32) for r in (rirs if rirs is not None else [])]
        self.babble_pool = babble_pool
        has_babble = babble_pool is not None and (callable(babble_pool) or len(babble_pool) > 0)
        self.noise_kinds = tuple(k for k in cfg.noise_kinds if k != "babble" or has_babble)

    @property
    def reverb_enabled(self) -> bool:
        return bool(self.rirs) and self.cfg.p_reverb > 0

    def _utterance(self, rng: np.random.Generator) -> np.ndarray:
        pool = self.babble_pool
        return np.asarray(pool(rng) if callable(pool) else pool[int(rng.integers(len(pool)))], dtype=np.float32)

    def babble(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) sum of k random pool segments, k in cfg.babble_speakers, each at unit active power first.

        Equal-level talkers (as Kaldi's MUSAN babble, 3-7 speakers) make a
        murmur no single voice dominates; a silent or empty draw is skipped.
        """
        k = int(rng.integers(self.cfg.babble_speakers[0], self.cfg.babble_speakers[1] + 1))
        out = np.zeros(n, dtype=np.float32)
        for _ in range(k):
            u = self._utterance(rng)
            if u.ndim != 1 or u.size == 0:
                continue
            seg = _fit_length(u, n, rng)
            p = active_power(seg, self.sr)
            if p > _EPS**2:
                out += seg / np.float32(np.sqrt(p))
        return out

    def noise(self, kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n,) noise of ``kind`` (one of NOISE_KINDS); its level is set later by add_noise."""
        if kind == "white":
            return rng.standard_normal(n).astype(np.float32)
        if kind == "coloured":
            return coloured_noise(n, rng.uniform(*self.cfg.coloured_beta), rng)
        if kind == "babble":
            return self.babble(n, rng)
        raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")

    def __call__(self, wav: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(T,) -> augmented float32 copy (T,), finite, in [-1, 1]. Raises on non-finite input (a data bug)."""
        x = np.array(wav, dtype=np.float32)  # a copy: the caller's array is never modified
        if x.ndim != 1:
            raise ValueError(f"Augmenter expects a mono (T,) waveform, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("Augmenter: input waveform has NaN/inf samples")
        if x.size == 0:
            return x
        cfg, n = self.cfg, len(x)
        # Every stage draws its coin even when disabled, so the random stream
        # (and so every later draw) does not shift when one stage is toggled.
        if rng.random() < cfg.p_speed:
            x = speed_perturb(x, float(rng.choice(cfg.speeds)), self.sr, rng)
        if rng.random() < cfg.p_reverb and self.rirs:
            x = reverberate(x, self.rirs[int(rng.integers(len(self.rirs)))])
        if rng.random() < cfg.p_noise and self.noise_kinds:
            kind = self.noise_kinds[int(rng.integers(len(self.noise_kinds)))]
            x = add_noise(x, self.noise(kind, n, rng), rng.uniform(*cfg.snr_db), self.sr)
        if rng.random() < cfg.p_gain:
            x *= np.float32(10 ** (rng.uniform(*cfg.gain_db) / 20))
        peak = float(np.max(np.abs(x)))
        if peak > 1.0:
            x /= np.float32(peak)
        return np.nan_to_num(x, copy=False).astype(np.float32, copy=False)
