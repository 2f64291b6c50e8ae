"""Word and character error counts, corpus WER and speaker-bootstrap intervals.

Everything here works on *counts*, never on rates: a corpus WER is the total
number of errors over the total number of reference words, so long utterances
weigh more than short ones, and an empty reference (whose own rate is
undefined) still contributes its insertions. Averaging per-utterance rates
would give a different, and wrong, number.

Intervals resample *speakers* with replacement (a cluster bootstrap): the
utterances of one speaker share voice, microphone and vocabulary, so treating
them as independent would make the intervals too narrow. The counts of the
drawn speakers are summed and the ratio is taken, as for the point estimate.

CER is computed on the normalised text with the single space between words
counted as a character (as jiwer and HF ``evaluate`` do): a split or merged
word costs one character edit instead of nothing.

Count arrays have shape (n_utterances, 10), columns in the order of ``FIELDS``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import jiwer
import numpy as np

FIELDS = (
    "substitutions", "deletions", "insertions", "hits", "ref_words",
    "char_substitutions", "char_deletions", "char_insertions", "char_hits", "ref_chars",
)
MISSING = "(missing)"  # group value for an utterance without the metadata field
_S, _D, _I, _H, _N, _CS, _CD, _CI, _CH, _CN = range(len(FIELDS))


def rate(errors: float, total: float) -> float:
    """errors / total; 0 for nothing against nothing, inf for insertions into an empty reference."""
    if total:
        return errors / total
    return 0.0 if errors == 0 else math.inf


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts of one utterance or, summed, of a corpus."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0
    ref_words: int = 0
    char_substitutions: int = 0
    char_deletions: int = 0
    char_insertions: int = 0
    char_hits: int = 0
    ref_chars: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def char_errors(self) -> int:
        return self.char_substitutions + self.char_deletions + self.char_insertions

    @property
    def wer(self) -> float:
        return rate(self.errors, self.ref_words)

    @property
    def cer(self) -> float:
        return rate(self.char_errors, self.ref_chars)

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(*(a + b for a, b in zip(self.as_array(), other.as_array())))

    def as_array(self) -> np.ndarray:
        """(10,) int64 in ``FIELDS`` order."""
        return np.array([getattr(self, f) for f in FIELDS], dtype=np.int64)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "ErrorCounts":
        """From a (10,) row, or (n, 10) rows which are summed (corpus counts)."""
        a = np.asarray(a, dtype=np.int64)
        if a.ndim == 2:
            a = a.sum(axis=0)
        return cls(*(int(x) for x in a))

    def to_dict(self) -> dict:
        return {**asdict(self), "wer": self.wer, "cer": self.cer}


def _tally(alignments) -> np.ndarray:
    """(n, 4) substitutions, deletions, insertions, hits from jiwer alignment chunks."""
    out = np.zeros((len(alignments), 4), dtype=np.int64)
    for i, chunks in enumerate(alignments):
        for c in chunks:
            n_ref, n_hyp = c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx
            if c.type == "substitute":
                out[i, 0] += n_ref
            elif c.type == "delete":
                out[i, 1] += n_ref
            elif c.type == "insert":
                out[i, 2] += n_hyp
            else:  # equal
                out[i, 3] += n_ref
    return out


def count_errors_batch(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """(n, 10) counts for already-normalised pairs; one jiwer call per level.

    Per-utterance counts come from jiwer's alignments (jiwer's own totals are
    corpus sums). Empty references and hypotheses are fine.
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    out = np.zeros((len(refs), len(FIELDS)), dtype=np.int64)
    if not refs:
        return out
    refs, hyps = [" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps]
    words = _tally(jiwer.process_words(refs, hyps).alignments)
    chars = _tally(jiwer.process_characters(refs, hyps).alignments)
    out[:, [_S, _D, _I, _H]] = words
    out[:, [_CS, _CD, _CI, _CH]] = chars
    out[:, _N] = words[:, 0] + words[:, 1] + words[:, 3]  # ref length = S + D + H
    out[:, _CN] = chars[:, 0] + chars[:, 1] + chars[:, 3]
    return out


def count_errors(ref: str, hyp: str) -> ErrorCounts:
    """Counts for one already-normalised pair, e.g. ``count_errors("a b", "a c d")``."""
    return ErrorCounts.from_array(count_errors_batch([ref], [hyp])[0])


def as_text(text) -> str:
    return "" if text is None else str(text)  # a failed decode may write null


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True, eq=False)
class Group:
    """A subset of utterances: ``all`` or ``field=value``; ``index`` rows into the counts."""

    name: str
    field: str | None
    value: str | None
    index: np.ndarray


def field_value(item: Mapping, field: str):
    """A metadata value at top level or under a nested ``metadata`` dict, else None."""
    if field in item:
        return item[field]
    meta = item.get("metadata")
    return meta.get(field) if isinstance(meta, Mapping) else None


def group_value_order(v: str):
    # numbers in numeric order (age 6 before 10), the missing group last
    try:
        return (0, float(v), "")
    except ValueError:
        return (1 if v != MISSING else 2, 0.0, v)


def group_seed(seed: int, name: str) -> list[int]:
    """A per-group seed, so adding a ``--by`` field leaves other groups' intervals unchanged."""
    return [int(seed), zlib.crc32(name.encode("utf-8"))]


# --------------------------------------------------------------------------- bootstrap


def _clusters(speakers: Sequence | None, n: int) -> tuple[np.ndarray, str]:
    """(n,) cluster label per utterance and the unit name ("speaker" or "utterance").

    Falls back to utterances when there is no speaker field or only one
    speaker (resampling one speaker would give a zero-width interval).
    Utterances without a speaker become clusters of their own.
    """
    if speakers is not None and len({s for s in speakers if s is not None}) >= 2:
        index: dict[tuple, int] = {}
        labels = np.empty(n, dtype=np.int64)
        for i, s in enumerate(speakers):
            labels[i] = index.setdefault(("s", str(s)) if s is not None else ("u", i), len(index))
        return labels, "speaker"
    return np.arange(n), "utterance"


def _resampled_totals(counts: np.ndarray, labels: np.ndarray, n_resamples: int, rng) -> np.ndarray:
    """(n_resamples, 10) sums of counts over clusters drawn with replacement.

    Each resample is a vector of draw multiplicities per cluster, so the sums
    are one matrix product; done in chunks to bound memory at ~16 MB.
    """
    per_cluster = np.zeros((labels.max() + 1, counts.shape[1]), dtype=np.float64)
    np.add.at(per_cluster, labels, counts)
    c = per_cluster.shape[0]
    out = np.empty((n_resamples, counts.shape[1]))
    step = max(1, 2_000_000 // c)
    for start in range(0, n_resamples, step):
        b = min(step, n_resamples - start)
        draws = rng.integers(0, c, size=(b, c)) + np.arange(b)[:, None] * c
        weights = np.bincount(draws.ravel(), minlength=b * c).reshape(b, c)
        out[start:start + b] = weights @ per_cluster
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # a resample with no reference words has no WER: nan, skipped by nanpercentile
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _interval(x: np.ndarray, level: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return (math.nan, math.nan)
    q = 100 * (1 - level) / 2
    lo, hi = np.percentile(x, [q, 100 - q])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class BootstrapCI:
    """Percentile intervals of corpus WER and CER; ``unit`` is what was resampled."""

    wer: tuple[float, float]
    cer: tuple[float, float]
    unit: str
    n_units: int
    n_resamples: int


def bootstrap_ci(counts: np.ndarray, speakers: Sequence | None = None, n_resamples: int = 1000,
                 seed: int | Sequence[int] = 0, level: float = 0.95) -> BootstrapCI:
    """Cluster-bootstrap interval of corpus WER/CER from (n, 10) counts.

    ``speakers`` (n,) or None; with fewer than two speakers, utterances are
    resampled instead and ``unit`` says so. ``n_resamples=0`` gives nan bounds.
    """
    counts = np.asarray(counts)
    labels, unit = _clusters(speakers, len(counts))
    n_units = int(labels.max() + 1) if len(counts) else 0
    if n_resamples <= 0 or n_units == 0:
        nan = (math.nan, math.nan)
        return BootstrapCI(nan, nan, unit, n_units, 0)
    t = _resampled_totals(counts, labels, n_resamples, np.random.default_rng(seed))
    wer = _ratio(t[:, _S] + t[:, _D] + t[:, _I], t[:, _N])
    cer = _ratio(t[:, _CS] + t[:, _CD] + t[:, _CI], t[:, _CN])
    return BootstrapCI(_interval(wer, level), _interval(cer, level), unit, n_units, n_resamples)


@dataclass(frozen=True)
class PairedComparison:
    """System A vs system B on the same utterances (B better => ``diff`` > 0).

    ``diff`` = WER_A - WER_B (absolute), ``rel_reduction`` = 1 - WER_B / WER_A;
    ``p_not_better`` is the fraction of resamples where WER_B >= WER_A.
    """

    wer_a: float
    wer_b: float
    diff: float
    diff_ci: tuple[float, float]
    rel_reduction: float
    rel_ci: tuple[float, float]
    p_not_better: float
    unit: str
    n_units: int
    n_resamples: int


def paired_bootstrap(counts_a: np.ndarray, counts_b: np.ndarray, speakers: Sequence | None = None,
                     n_resamples: int = 1000, seed: int | Sequence[int] = 0,
                     level: float = 0.95) -> PairedComparison:
    """Paired cluster bootstrap of two systems' (n, 10) counts on the same rows.

    Both systems see the same resampled speakers, so speaker difficulty cancels
    and the interval is on the difference itself.
    """
    counts_a, counts_b = np.asarray(counts_a), np.asarray(counts_b)
    if counts_a.shape != counts_b.shape:
        raise ValueError(f"paired counts differ in shape: {counts_a.shape} vs {counts_b.shape}")
    a, b = ErrorCounts.from_array(counts_a), ErrorCounts.from_array(counts_b)
    wa, wb = a.wer, b.wer
    rel = 1 - wb / wa if wa and math.isfinite(wa) else math.nan
    labels, unit = _clusters(speakers, len(counts_a))
    n_units = int(labels.max() + 1) if len(counts_a) else 0
    nan = (math.nan, math.nan)
    if n_resamples <= 0 or n_units == 0:
        return PairedComparison(wa, wb, wa - wb, nan, rel, nan, math.nan, unit, n_units, 0)
    # one draw for both systems: stack the columns so a single product serves both
    both = np.concatenate([counts_a, counts_b], axis=1)
    t = _resampled_totals(both, labels, n_resamples, np.random.default_rng(seed))
    k = counts_a.shape[1]
    ra = _ratio(t[:, _S] + t[:, _D] + t[:, _I], t[:, _N])
    rb = _ratio(t[:, k + _S] + t[:, k + _D] + t[:, k + _I], t[:, k + _N])
    d = ra - rb
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(ra > 0, 1 - rb / np.where(ra > 0, ra, 1), np.nan)
    ok = np.isfinite(d)
    p = float(np.mean(rb[ok] >= ra[ok])) if ok.any() else math.nan
    return PairedComparison(wa, wb, wa - wb, _interval(d, level), rel, _interval(r, level),
                            p, unit, n_units, n_resamples)
