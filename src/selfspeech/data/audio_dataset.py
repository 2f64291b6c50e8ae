"""Audio datasets for encoder training: a sampler picks item indices, this only loads and collates.

Items are manifest dicts. ``kind="mel"`` yields (T, n_mels) log-mel frames (10 ms),
``kind="wave"`` the (T,) waveform. Loaded inputs are kept in memory as float16
(3 h of speech: ~170 MB of log-mel, ~350 MB of waveform), so epochs after the
first cost no I/O. Batches follow the toolkit's convention: a zero-padded
``(B, T[, F])`` float tensor and absolute int64 ``lengths``.

Log-mel features stay computed here, on the CPU: each utterance's are cached at
its first load, so computing them on the training device
(:func:`selfspeech.audio.features.log_mel_torch`) would speed up only the first epoch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from selfspeech.audio.features import log_mel
from selfspeech.audio.io import AudioError, load_item

SR = 16_000


@dataclass(frozen=True)
class Skipped:
    """An item the dataset refused, with the reason (counted in reports, never silently dropped)."""

    id: str
    reason: str


class AudioDataset:
    def __init__(self, items: list[dict], kind: str = "mel", n_mels: int = 80, max_seconds: float | None = None,
                 cache: bool = True):
        if kind not in ("mel", "wave"):
            raise ValueError(f"kind {kind!r}: choose mel or wave")
        self.items, self.kind, self.n_mels = items, kind, n_mels
        self.max_seconds, self.cache = max_seconds, cache
        self._mem: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def durations(self) -> list[float]:
        """Durations as the sampler sees them (capped at ``max_seconds`` when cropping)."""
        d = [float(it.get("duration") or 0.0) for it in self.items]
        return [min(x, self.max_seconds) for x in d] if self.max_seconds else d

    def load(self, i: int) -> np.ndarray:
        if i in self._mem:
            return self._mem[i].astype(np.float32)
        wav = load_item(self.items[i])
        x = log_mel(wav, self.n_mels).T if self.kind == "mel" else wav.astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{self.items[i].get('id')}: non-finite {self.kind} input")
        x16 = x.astype(np.float16)  # what the cache holds: first and later epochs see the same values
        if self.cache:
            self._mem[i] = x16
        return x16.astype(np.float32)

    def screen(self, progress: bool = False, desc: str = "checking audio") -> list[Skipped]:
        """Load every item once; drop (and return) those whose audio cannot be used.

        A truncated, empty, NaN-filled or unreadable file would otherwise stop a
        training run when a batch first reaches it, possibly hours in. With the
        cache on this is the first epoch's I/O done early; the decision is the
        same on every (re)start, so resumed runs see the same item list.
        """
        from tqdm.auto import tqdm

        keep, mem, skipped = [], {}, []
        for i, it in enumerate(tqdm(self.items, desc=desc, disable=not progress, leave=False)):
            try:
                self.load(i)
            except (AudioError, ValueError) as e:
                skipped.append(Skipped(str(it.get("id")), str(e)))
                continue
            if i in self._mem:
                mem[len(keep)] = self._mem.pop(i)
            keep.append(it)
        self.items, self._mem = keep, mem
        return skipped

    def crop(self, x: np.ndarray, rng: random.Random) -> np.ndarray:
        """A random window of ``max_seconds`` (wav2vec 2.0 crops long utterances the same way)."""
        if not self.max_seconds:
            return x
        n = int(self.max_seconds * (100 if self.kind == "mel" else SR))
        if len(x) <= n:
            return x
        s = rng.randrange(len(x) - n + 1)
        return x[s:s + n]

    def collate(self, idx: list[int], rng: random.Random | None = None) -> dict:
        """Item indices -> {"x": (B, T[, F]) float32, "lengths": (B,) int64, "ids": [...], "seeds": [...]}

        ``seeds``: one per item, from the step's ``rng`` and the item's index, for
        everything random about that item (its crop here, its masks and noise in
        the objectives). An item then gets the same draws whichever process and
        batch it lands in, so N data-parallel processes equal one process with the
        combined batch.
        """
        rng = rng or random.Random(0)
        base = rng.getrandbits(62)
        seeds = [(base + 0x9E3779B97F4A7C15 * (i + 1)) % (1 << 62) for i in idx]
        xs = [self.crop(self.load(i), random.Random(s)) for i, s in zip(idx, seeds)]
        return collate_arrays(xs) | {"ids": [self.items[i].get("id") for i in idx], "seeds": seeds}


def collate_arrays(xs: list[np.ndarray]) -> dict:
    """Zero-pad arrays of shape (T_i, ...) into {"x": (B, T_max, ...), "lengths": (B,) int64}."""
    lengths = torch.tensor([len(x) for x in xs], dtype=torch.long)
    out = torch.zeros((len(xs), int(lengths.max())) + tuple(xs[0].shape[1:]), dtype=torch.float32)
    for b, x in enumerate(xs):
        out[b, : len(x)] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return {"x": out, "lengths": lengths}


def check_lengths(items: list[dict], min_seconds: float) -> tuple[list[dict], list[Skipped]]:
    """Split items into usable ones and those shorter than ``min_seconds`` (receptive field or mask span)."""
    keep, skipped = [], []
    for it in items:
        d = float(it.get("duration") or 0.0)
        if d < min_seconds:
            skipped.append(Skipped(str(it.get("id")), f"{d:.2f} s is shorter than the {min_seconds:.2f} s the "
                                                       "encoder needs (receptive field / mask span)"))
        else:
            keep.append(it)
    return keep, skipped
