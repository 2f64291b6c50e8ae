"""log_mel_torch (features on the training device) against the numpy log_mel, and the speaker-SSL views."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from selfspeech.audio.features import _torch_constants, log_mel, log_mel_torch
from selfspeech.data.audio_dataset import collate_arrays

TOL = 1e-4  # float32 FFTs in both; measured max difference ~2e-5 on the scaled values


def _waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    voiced = 0.1 * np.sin(2 * np.pi * 150 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    # lengths: full, odd, just over / under one window (400), under one hop, silence, very quiet noise
    ws = [(voiced[:n] + 0.003 * rng.standard_normal(n)) for n in (32000, 20011, 1601, 401, 399, 150)]
    return [w.astype(np.float32) for w in ws] + [np.zeros(5000, np.float32),
                                                 (1e-4 * rng.standard_normal(8000)).astype(np.float32)]


@pytest.mark.parametrize("n_mels", [80, 40])
def test_log_mel_torch_equals_numpy_per_row_of_a_padded_batch(n_mels):
    ws = _waves()
    b = collate_arrays(ws)
    want = collate_arrays([log_mel(w, n_mels).T for w in ws])
    got, frames = log_mel_torch(b["x"], b["lengths"], n_mels)
    assert got.dtype == torch.float32 and frames.dtype == torch.int64
    assert got.shape == want["x"].shape and torch.equal(frames, want["lengths"])
    assert (got - want["x"]).abs().max() < TOL
    one, n = log_mel_torch(torch.from_numpy(ws[1])[None])           # lengths None: the whole row
    assert int(n) == len(log_mel(ws[1], 80).T) and (one[0] - torch.from_numpy(log_mel(ws[1]).T)).abs().max() < TOL


def test_log_mel_torch_ignores_autocast_and_caches_per_device():
    ws = _waves()[:3]
    b = collate_arrays(ws)
    ref, _ = log_mel_torch(b["x"], b["lengths"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = log_mel_torch(b["x"], b["lengths"])
    assert mixed.dtype == torch.float32 and torch.equal(mixed, ref)
    w1, f1 = _torch_constants(torch.device("cpu"), 80)
    w2, f2 = _torch_constants(torch.device("cpu"), 80)
    assert w1 is w2 and f1 is f2 and f1.shape == (201, 80)


def _views_cfg(method: str, ssps: bool):
    from selfspeech.train.speaker import SpeakerSSLConfig

    return SpeakerSSLConfig(
        method=method, ecapa={"preset": "tiny"}, batch_size=3, segment_seconds=1.0, local_seconds=0.5, n_local=2,
        dino_out=32, dino_hidden=32, dino_bottleneck=16, projector=(32, 16), augment={"p_reverb": 0.0},
        ssps={"k": 2, "m": 0, "queue": 8, "start": 0.3, "ref_seconds": 1.5} if ssps else None)


class _Data:
    def __init__(self, ws):
        self.ws = ws

    def load(self, i):
        return self.ws[i]

    def __len__(self):
        return len(self.ws)


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_speaker_views_on_the_device_equal_the_numpy_features(method):
    """Collator waveforms -> task features equal what the numpy path gave for the same augmented crops."""
    from selfspeech.data.augment import Augmenter, random_segment
    from selfspeech.objectives.speaker_ssl import SpeakerSSLTask
    from selfspeech.train.speaker import ViewCollator

    cfg = _views_cfg(method, ssps=True)
    ws = _waves()[:3]
    data = _Data(ws)
    aug = Augmenter(cfg.augment_config(), None, lambda r: ws[int(r.integers(len(ws)))])
    batch = ViewCollator(data, cfg, aug, with_ref=True)([0, 2, 1], random.Random(5))
    task = SpeakerSSLTask(cfg, n_items=3)
    # the numpy path on the same draws: crop, augment, log-mel per utterance, in the collator's order
    g = np.random.default_rng(random.Random(5).getrandbits(63))
    spec = [1.0, 1.0] + ([0.5, 0.5] if method == "dino" else [])
    for s, x, n in zip(spec, batch["views"], batch["view_lengths"]):
        want = collate_arrays([log_mel(aug(random_segment(ws[i], s, g), g), 40).T for i in (0, 2, 1)])["x"]
        assert x.shape == (3, int(s * 16000)) and torch.equal(n, torch.full((3,), int(s * 16000)))
        got = task.features(x, n)
        assert got.shape == want.shape and (got - want).abs().max() < TOL
    g.integers(2**62)  # the SSPS generator's seed
    ref = collate_arrays([log_mel(random_segment(ws[i], 1.5, g), 40).T for i in (0, 2, 1)])["x"]
    assert (task.features(batch["ref"], batch["ref_lengths"]) - ref).abs().max() < TOL
    assert torch.equal(task.features(ref), ref)                       # features given as such pass through
    loss, _ = task.loss(batch)
    assert torch.isfinite(loss)
