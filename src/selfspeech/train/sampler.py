"""Length-bucketed batch sampler: picks which items form a batch; a dataset only collates them.

Padding is wasted compute: a batch costs ``B * longest``. Sorting every item by
duration and cutting batches out of the sorted list would waste almost nothing,
but every epoch would then see the same batches. As in lhotse's bucketing
samplers, items are grouped into ``num_buckets`` buckets of similar duration
(quantiles). Each epoch, with ``Random(seed + epoch)``: the items inside each
bucket are shuffled, the buckets laid end to end and cut into batches (a
bucket's leftovers share a batch with the next, similar bucket, so there is one
short batch an epoch at most), and the batches shuffled. Batches stay nearly
pad-free and change from epoch to epoch.

The batches of an epoch are a pure function of ``(durations, seed, epoch)``, so
the whole sampler state is ``{"epoch", "position"}`` (JSON): a resumed run sees
exactly the batches an uninterrupted one would.

Usage::

    sampler = BucketBatchSampler(durations, batch_size=8, seed=0)
    sampler.load_state_dict(saved)        # optional: resume
    for batch in sampler:                  # one epoch, from the saved position on
        ...                                # batch: list[int] item indices
        saved = sampler.state_dict()       # position counts the batches consumed
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence


class EpochBatchSampler:
    """Iteration shared by the batch samplers: the rest of epoch ``epoch`` from ``position`` on.

    A subclass gives ``batches(epoch)``, a pure function of its settings and the
    epoch, so ``{"epoch", "position"}`` is the whole resumable state.
    """

    epoch: int = 0
    position: int = 0

    def batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch (the current epoch's count)."""
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; afterwards the sampler moves to the next epoch."""
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1  # counted before the yield: state_dict() taken after a step includes it
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0


class BucketBatchSampler(EpochBatchSampler):
    """Batches of item indices with similar durations; seeded, resumable.

    ``batch_size`` caps the number of items a batch; ``max_batch_seconds`` caps
    its padded duration ``len(batch) * longest`` (at least one item a batch).
    Give one or both. ``shuffle=False`` yields batches in order of duration
    (for evaluation), the same every epoch.
    """

    def __init__(self, durations: Sequence[float], batch_size: int | None = None,
                 max_batch_seconds: float | None = None, seed: int = 0, shuffle: bool = True,
                 num_buckets: int = 10, drop_last: bool = False):
        if batch_size is None and max_batch_seconds is None:
            raise ValueError("give batch_size or max_batch_seconds (or both)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_seconds is not None and max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be > 0, got {max_batch_seconds}")
        self.durations = [float(d) for d in durations]
        self.batch_size, self.max_batch_seconds = batch_size, max_batch_seconds
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        order = sorted(range(len(self.durations)), key=lambda i: (self.durations[i], i))
        k = max(1, min(num_buckets, len(order)))
        self.buckets = [order[len(order) * b // k: len(order) * (b + 1) // k] for b in range(k)]
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _cut(self, items: list[int]) -> list[list[int]]:
        """Greedy cut of the bucket-ordered items into batches respecting both caps."""
        out: list[list[int]] = []
        cur: list[int] = []
        longest = 0.0
        for i in items:
            new_longest = max(longest, self.durations[i])
            full = (self.batch_size is not None and len(cur) >= self.batch_size) or (
                self.max_batch_seconds is not None and cur and (len(cur) + 1) * new_longest > self.max_batch_seconds)
            if full:
                out.append(cur)
                cur, new_longest = [], self.durations[i]
            cur.append(i)
            longest = new_longest
        if cur and not (self.drop_last and self.batch_size is not None and len(cur) < self.batch_size):
            out.append(cur)
        return out

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` in the order they are yielded (deterministic)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(self.seed + epoch)
        items: list[int] = []
        for bucket in self.buckets:
            bucket = list(bucket)
            if self.shuffle:
                rng.shuffle(bucket)  # new batch compositions each epoch, still similar lengths
            items.extend(bucket)
        out = self._cut(items)  # one pass: a bucket's leftovers share a batch with the next (similar) bucket
        if self.shuffle:
            rng.shuffle(out)
        self._cache = (epoch, out)
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": len(self.durations)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_items", len(self.durations)) != len(self.durations) or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state is for {state.get('n_items')} items / seed {state.get('seed')}, "
                             f"this sampler has {len(self.durations)} items / seed {self.seed}: not the same data")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def group_probabilities(counts: dict[str, float], alpha: float) -> dict[str, float]:
    """XLSR's multilingual sampling (Conneau et al. 2020, sec. 3.1): p_l proportional to (n_l / N)^alpha.

    alpha = 1 keeps the natural proportions, alpha -> 0 approaches uniform over groups;
    ``counts`` may be utterance counts or hours.
    """
    if not counts or any(v <= 0 for v in counts.values()):
        raise ValueError(f"group sizes must be positive, got {counts}")
    total = sum(counts.values())
    w = {g: (n / total) ** alpha for g, n in counts.items()}
    z = sum(w.values())
    return {g: v / z for g, v in w.items()}


class GroupResampledBatchSampler(BucketBatchSampler):
    """Duration-capped batches over a per-epoch resampling of the items by group (XLSR).

    Each epoch draws as many items as there are, ``round(p_g * N)`` from group g
    (:func:`group_probabilities`): a group above its natural share is upsampled
    (its items repeat), one below is subsampled; which items is seeded by
    ``(seed, epoch)``. Batches are then cut as :class:`BucketBatchSampler` does,
    whose iteration and ``{"epoch", "position"}`` state this shares.
    """

    def __init__(self, durations: Sequence[float], groups: Sequence[str], alpha: float = 0.5,
                 max_batch_seconds: float | None = None, batch_size: int | None = None, seed: int = 0):
        if len(groups) != len(durations):
            raise ValueError("one group per item")
        super().__init__(durations, batch_size, max_batch_seconds, seed=seed)
        self.groups, self.alpha = list(groups), alpha
        self.members: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            self.members.setdefault(g, []).append(i)
        self.probs = group_probabilities({g: len(m) for g, m in self.members.items()}, alpha)

    def draw(self, epoch: int) -> list[int]:
        rng, n, out = random.Random(self.seed * 1_000_003 + epoch), len(self.durations), []
        for g in sorted(self.members):
            m, k = self.members[g], max(1, round(self.probs[g] * n))
            reps, rest = divmod(k, len(m))
            out += m * reps + rng.sample(m, rest)
        return out

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            idx = self.draw(epoch)
            inner = BucketBatchSampler([self.durations[i] for i in idx], self.batch_size, self.max_batch_seconds,
                                       seed=self.seed + epoch)
            self._cache = (epoch, [[idx[j] for j in b] for b in inner.batches(0)])
        return self._cache[1]
