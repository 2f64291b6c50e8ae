"""The loop's batch loader: the sampler picks, ``collate`` builds, worker processes prepare ahead.

The sampler decides which items form each update's batch; this module only
turns the rest of an epoch's batch list into collated batches, optionally in
``num_workers`` background processes (``torch.utils.data.DataLoader``) with
pinned host memory, so the next batches are decoded, cropped and augmented
while the device trains on the current one.

Resume stays exact with workers: a batch is a pure function of its item
indices and of the update it feeds (the collate RNG is seeded by
``(seed, step, micro-batch)``), and the loop, not the loader, advances the
sampler's ``{"epoch", "position"}`` as it consumes batches, so batches a worker
prepared but the loop never used are simply prepared again after a resume.

With ``grad_accum = k`` an update's batch is cut into k contiguous micro-batches
(the sampler sorts a batch's items by bucket, so each micro-batch stays nearly
pad-free), collated separately: peak memory falls about k-fold while the update
is the one the whole batch gives.
"""
from __future__ import annotations

import multiprocessing
import random
from typing import Callable, Iterator

import torch


def micro_batches(idx: list[int], k: int) -> list[list[int]]:
    """``idx`` cut into ``min(k, len(idx))`` contiguous parts of near-equal size."""
    k = max(1, min(k, len(idx)))
    n, r = divmod(len(idx), k)
    out, start = [], 0
    for j in range(k):
        end = start + n + (1 if j < r else 0)
        out.append(idx[start:end])
        start = end
    return out


def collate_seed(seed: int, step: int, part: int) -> int:
    """The collate RNG seed of micro-batch ``part`` of update ``step`` (part 0: the seed without accumulation)."""
    base = seed * 1_000_003 + step
    return base if part == 0 else base * 1_009 + part


class UpdateBatches:
    """One update's collated micro-batches for each (item indices, step) job; what the workers run."""

    def __init__(self, collate: Callable, seed: int, grad_accum: int):
        self.collate, self.seed, self.grad_accum = collate, seed, grad_accum
        self.jobs: list[tuple[list[int], int]] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, k: int) -> list[tuple[int, object]]:
        """[(items in the micro-batch, collated micro-batch)] of job ``k``."""
        idx, step = self.jobs[k]
        return [(len(part), self.collate(part, random.Random(collate_seed(self.seed, step, j))))
                for j, part in enumerate(micro_batches(idx, self.grad_accum))]


def _as_is(x):
    return x


class BatchLoader:
    """``loader(batches, first_step)`` -> iterator of micro-batch lists, one per update, in order."""

    def __init__(self, collate: Callable, seed: int, grad_accum: int = 1, num_workers: int = 0,
                 pin_memory: bool = False, prefetch: int = 2):
        self.work = UpdateBatches(collate, seed, grad_accum)
        self.num_workers, self.pin_memory, self.prefetch = num_workers, pin_memory, prefetch

    def __call__(self, batches: list[list[int]], first_step: int) -> Iterator[list[tuple[int, object]]]:
        self.work.jobs = [(idx, first_step + n) for n, idx in enumerate(batches)]
        if not self.work.jobs:
            return iter(())
        if self.num_workers == 0 and not self.pin_memory:
            return (self.work[k] for k in range(len(self.work)))  # in-process: the plain CPU path
        # fork shares the collator (its feature cache, closures) with the workers without pickling it
        ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        return iter(torch.utils.data.DataLoader(
            self.work, batch_size=None, shuffle=False, num_workers=self.num_workers, collate_fn=_as_is,
            pin_memory=self.pin_memory, multiprocessing_context=ctx if self.num_workers else None,
            prefetch_factor=self.prefetch if self.num_workers else None))
