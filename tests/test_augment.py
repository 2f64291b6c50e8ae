"""Waveform augmentation (selfspeech.data.augment): synthesised audio only, a few seconds in all."""
from __future__ import annotations

import numpy as np
import pytest

from selfspeech.data.augment import (AugmentConfig, Augmenter, active_power, add_noise, build_rir_pool,
                                     coloured_noise, is_short, load_or_build_rir_pool, random_segment,
                                     reverberate, speed_perturb)

SR = 16000
# Small, short rooms: the image-source method stays fast in tests.
SMALL = AugmentConfig(rir_seconds=0.25, rt60=(0.2, 0.4), room_max=(5.0, 4.0, 3.0))


def sine(freq: float = 440.0, seconds: float = 2.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Harmonic bursts with pauses: loud and silent frames, like speech."""
    x = sine(150, seconds) + sine(300, seconds, 0.2) + sine(1200, seconds, 0.05)
    env = (np.sin(2 * np.pi * 3 * np.arange(x.size) / SR) > 0).astype(np.float32)
    return (x * env + 1e-4 * np.random.default_rng(seed).standard_normal(x.size)).astype(np.float32)


def peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * SR / x.size)


@pytest.fixture(scope="module")
def pool() -> list[np.ndarray]:
    return build_rir_pool(3, seed=1, cfg=SMALL)


# ---- pure transforms ----
@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 25.0])
def test_add_noise_snr(snr):
    wav = sine()
    noise = np.random.default_rng(0).standard_normal(wav.size).astype(np.float32)
    out = add_noise(wav, noise, snr)
    got = 10 * np.log10(active_power(wav) / np.mean((out.astype(np.float64) - wav) ** 2))
    assert out.dtype == np.float32 and abs(got - snr) < 0.1


def test_add_noise_uses_active_power_and_guards_silence():
    wav = speechlike()
    noise = np.random.default_rng(1).standard_normal(wav.size).astype(np.float32)
    assert active_power(wav) > 1.8 * np.mean(wav.astype(np.float64) ** 2)  # pauses do not dilute the level
    silent = np.zeros(SR, np.float32)
    assert np.array_equal(add_noise(silent, noise[:SR], 10.0), silent)
    assert np.array_equal(add_noise(wav, np.zeros_like(wav), 10.0), wav)
    with pytest.raises(ValueError, match="shape"):
        add_noise(wav, noise[:100], 10.0)


def test_reverberate_identity_and_alignment(pool):
    wav = speechlike()
    assert np.allclose(reverberate(wav, np.array([1.0], np.float32)), wav, atol=1e-6)
    echo = reverberate(wav, np.array([1.0, 0.0, 0.0, 0.5], np.float32))
    assert echo.shape == wav.shape and np.allclose(echo[3:], wav[3:] + 0.5 * wav[:-3], atol=1e-5)
    click = np.zeros(2 * SR, np.float32)
    click[1000] = 1.0
    for rir in pool:  # a click comes out as the IR starting on the click: direct path not delayed
        y = reverberate(click, rir)
        assert y.shape == click.shape and np.abs(y[:1000]).max() < 1e-5
        assert np.allclose(y[1000:1000 + rir.size], rir, atol=1e-5) and y[1000] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturb_keeps_length_scales_frequency(factor):
    wav = sine(440.0)
    y = speed_perturb(wav, factor, SR, rng=np.random.default_rng(0))
    assert y.shape == wav.shape and y.dtype == np.float32
    assert abs(peak_hz(y) - 440.0 * factor) < 2.0
    burst = np.zeros(2 * SR, np.float32)
    burst[SR - 800:SR + 800] = sine(300, 0.1)   # 1600-sample burst, centred
    long = speed_perturb(burst, factor, SR)     # centred crop / wrap keeps it in view
    assert abs(np.count_nonzero(np.abs(long) > 1e-3) - 1600 / factor) < 40
    assert np.array_equal(speed_perturb(wav, 1.0, SR), wav)


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_coloured_noise_slope(beta):
    x = coloured_noise(1 << 16, beta, np.random.default_rng(0)).astype(np.float64)
    assert x.shape == (1 << 16,) and abs(np.sqrt(np.mean(x**2)) - 1.0) < 1e-3
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.arange(p.size)
    edges = np.unique(np.geomspace(10, p.size - 1, 30).astype(int))
    fc = [np.sqrt(a * b) for a, b in zip(edges[:-1], edges[1:])]
    pb = [p[a:b].mean() for a, b in zip(edges[:-1], edges[1:])]
    slope = np.polyfit(np.log(fc), np.log(pb), 1)[0]
    assert abs(slope + beta) < 0.15, slope
    assert f.size == p.size


# ---- views ----
def test_random_segment():
    wav = np.arange(3 * SR, dtype=np.float32)
    a = random_segment(wav, 2.0, np.random.default_rng(5))
    b = random_segment(wav, 2.0, np.random.default_rng(5))
    assert a.shape == (2 * SR,) and a.dtype == np.float32 and np.array_equal(a, b)
    assert np.all(np.diff(a) == 1)  # a contiguous crop
    short = np.arange(SR // 2, dtype=np.float32)
    assert is_short(short, 2.0) and not is_short(wav, 2.0) and not is_short(wav[:2 * SR], 2.0)
    s = random_segment(short, 2.0, np.random.default_rng(0))
    assert s.shape == (2 * SR,) and set(np.unique(s)) == set(short)  # wrapped: only the utterance's samples
    assert np.all(np.diff(s) % (SR // 2) == 1)                          # ... in circular order
    assert random_segment(wav, 1.0, np.random.default_rng(0), sr=8000).shape == (8000,)
    with pytest.raises(ValueError, match="non-empty"):
        random_segment(np.zeros(0, np.float32), 2.0, np.random.default_rng(0))


# ---- rooms ----
def test_rir_pool_deterministic_finite_decaying(pool):
    again = build_rir_pool(3, seed=1, cfg=SMALL)
    other = build_rir_pool(1, seed=2, cfg=SMALL)
    assert all(np.array_equal(a, b) for a, b in zip(pool, again))
    assert not np.array_equal(pool[0], other[0])
    assert np.array_equal(build_rir_pool(1, seed=1, cfg=SMALL)[0], pool[0])  # prefix-stable
    n = int(SMALL.rir_seconds * SR)
    for h in pool:
        assert h.shape == (n,) and h.dtype == np.float32 and np.isfinite(h).all()
        assert h[0] == pytest.approx(1.0)  # direct-path peak; coinciding reflections may sum higher
        early, late = np.sum(h[:n // 4] ** 2), np.sum(h[-n // 4:] ** 2)
        assert late < early * 0.1  # > 10 dB decay over the IR


def test_rir_cache_round_trip_and_rebuild(tmp_path, pool, monkeypatch):
    import selfspeech.data.augment as aug
    path = tmp_path / "rirs.npz"
    first = load_or_build_rir_pool(path, 3, seed=1, cfg=SMALL)
    assert path.is_file() and all(np.array_equal(a, b) for a, b in zip(first, pool))
    with np.load(path, allow_pickle=False) as z:
        assert z["rirs"].shape == (3, int(SMALL.rir_seconds * SR))
    calls = []
    monkeypatch.setattr(aug, "build_rir_pool", lambda *a, **k: calls.append(a) or pool[:1])
    cached = load_or_build_rir_pool(path, 3, seed=1, cfg=SMALL)
    assert not calls and all(np.array_equal(a, b) for a, b in zip(cached, pool))
    load_or_build_rir_pool(path, 3, seed=2, cfg=SMALL)            # other seed: rebuilt
    assert len(calls) == 1
    load_or_build_rir_pool(path, 1, seed=2, cfg=SMALL)            # file now holds seed=2, n=3: rebuilt
    assert len(calls) == 2
    path.write_bytes(b"not a zip")                               # corrupt file: rebuilt, no crash
    load_or_build_rir_pool(path, 1, seed=2, cfg=SMALL)
    assert len(calls) == 3 and not list(tmp_path.glob(".rirs.npz.*"))


# ---- the pipeline ----
ALL_ON = AugmentConfig(p_noise=1.0, p_reverb=1.0, p_gain=1.0, p_speed=1.0)


def test_augmenter_shape_dtype_finite(pool):
    babble = [speechlike(1.0, seed=i) * (i + 1) for i in range(4)]
    for cfg in (AugmentConfig(), ALL_ON, AugmentConfig(p_noise=1.0, noise_kinds=("babble",))):
        aug = Augmenter(cfg, pool, babble)
        rng = np.random.default_rng(0)
        for wav in (np.zeros(2 * SR, np.float32), speechlike(), sine(amp=0.99)):
            for _ in range(5):
                y = aug(wav, rng)
                assert y.shape == wav.shape and y.dtype == np.float32
                assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
    assert not Augmenter(ALL_ON)(np.zeros(SR, np.float32), rng).any()  # silence stays silence
    wav = speechlike()
    wav.flags.writeable = False  # the input is never modified in place
    assert Augmenter(ALL_ON, pool, babble)(wav, rng).shape == wav.shape
    with pytest.raises(ValueError, match="NaN"):
        Augmenter()(np.full(10, np.nan, np.float32), rng)


def test_augmenter_changes_and_is_deterministic(pool):
    aug = Augmenter(ALL_ON, pool, lambda rng: speechlike(1.5, seed=int(rng.integers(100))))
    wav = speechlike()
    a = aug(wav, np.random.default_rng(7))
    b = aug(wav, np.random.default_rng(7))
    c = aug(wav, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.allclose(a, wav, atol=1e-3)


def test_augmenter_enabled_parts():
    assert Augmenter(AugmentConfig()).noise_kinds == ("white", "coloured")
    assert Augmenter(AugmentConfig(), babble_pool=[sine()]).noise_kinds == ("white", "coloured", "babble")
    assert not Augmenter(ALL_ON).reverb_enabled and Augmenter(ALL_ON, [np.ones(1)]).reverb_enabled
    only_babble = Augmenter(AugmentConfig(p_noise=1.0, p_gain=0.0, p_speed=0.0, noise_kinds=("babble",)))
    wav = sine()
    assert np.array_equal(only_babble(wav, np.random.default_rng(0)), wav)  # no pool: no babble, nothing else


@pytest.mark.parametrize("kwargs,match", [
    ({"p_noise": 1.5}, "p_noise"),
    ({"snr_db": (20.0, 5.0)}, "snr_db"),
    ({"noise_kinds": ("pink",)}, "noise_kinds"),
    ({"noise_kinds": ()}, "noise_kinds"),
    ({"babble_speakers": (0, 3)}, "babble_speakers"),
    ({"rt60": (0.0, 0.5)}, "rt60"),
    ({"rir_seconds": 0.0}, "rir_seconds"),
    ({"room_min": (0.5, 3.0, 2.4)}, "room_min"),
    ({"room_min": (11.0, 3.0, 2.4)}, "room_min"),
    ({"speeds": ()}, "speeds"),
    ({"speeds": (0.1,)}, "speeds"),
    ({"segment_seconds": 0.0}, "segment_seconds"),
    ({"gain_db": (6.0, -6.0)}, "gain_db"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)
