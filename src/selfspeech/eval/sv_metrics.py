"""Speaker-verification metrics: EER, minDCF and the DET curve of scored trials.

Conventions (used by every function here)
-----------------------------------------
A trial is *accepted* iff ``score >= t``. For a threshold t::

    Pmiss(t) = #{target scores < t} / n_target
    Pfa(t)   = #{non-target scores >= t} / n_nontarget

Equal scores always fall on the same side of a threshold, so there is one
*operating point* per distinct score value (t = that value; the lowest accepts
everything) plus t = +inf (rejects everything). These are exactly the points
of scikit-learn's ``roc_curve`` (fpr = Pfa, tpr = 1 - Pmiss).

EER. Walking the operating points by increasing t, Pmiss rises and Pfa falls,
and every step changes at least one of them, so Pfa - Pmiss decreases strictly
from +1 (accept all) to -1 (reject all). It changes sign between two adjacent
points A and B; the EER is where the straight segment AB meets Pmiss = Pfa.
Every point of AB is attained by picking threshold A or B at random per trial,
so the EER is an error rate a system can actually run at, and ties need no
special case (all scores equal -> 0.5; perfectly separated -> 0). This is the
interpolated DET-curve EER; the ROC-convex-hull EER of BOSARIS (Brummer & de
Villiers 2011) can only be lower.

Relation to Kaldi's ``compute-eer`` (src/ivectorbin/compute-eer.cc): same
threshold convention (targets below x are misses, non-targets above x false
alarms), but it only tries x at sorted target scores and returns the miss rate
i / n_target at the first target position i where the false-alarm rate is no
longer above it, without interpolation. With distinct scores that is the upper
end of the target step containing our crossing, so 0 <= Kaldi - ours <=
1 / n_target (tested): 0.02 % absolute on VoxCeleb1-O's 4,874 targets.

minDCF (NIST SRE detection cost, as in Kaldi's sid/compute_min_dcf.py)::

    min_t [c_miss p_target Pmiss(t) + c_fa (1 - p_target) Pfa(t)] / min(c_miss p_target, c_fa (1 - p_target))

The denominator is the cost of the better trivial system (accept or reject
all), so a useful system has minDCF < 1; both trivial points are operating
points here, so minDCF <= 1 always. Kaldi's script cuts after every sorted
score, one at a time: with distinct scores its points are ours minus
"accept all" (equal minimum whenever c_miss p_target <= c_fa (1 - p_target), the
usual case); with ties it splits a group of equal scores in input order, a
threshold no real system can apply. Here equal scores stay together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 18  # operating points per vectorised step: bounds temporaries to a few tens of MB


# ----------------------------------------------------------------------------- metrics

@dataclass(frozen=True)
class SVMetrics:
    """EER and normalised minDCF (fractions), their thresholds (accept iff score >= t; inf = reject all), counts."""

    eer: float
    mindcf: float
    eer_threshold: float
    mindcf_threshold: float
    n_target: int
    n_nontarget: int
    p_target: float = 0.01
    c_miss: float = 1.0
    c_fa: float = 1.0


def _check_scores(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validated (N,) float scores and (N,) bool labels (1/True = target)."""
    s, lab = np.asarray(scores), np.asarray(labels)
    if s.ndim != 1 or lab.ndim != 1 or s.shape != lab.shape:
        raise ValueError(f"scores {s.shape} and labels {lab.shape} must be 1-D of the same length")
    if s.dtype.kind not in "fiu":
        raise ValueError(f"scores must be numeric, got {s.dtype}")
    s = s if s.dtype.kind == "f" else s.astype(np.float64)
    if not np.isfinite(s).all():
        bad = ~np.isfinite(s)
        raise ValueError(f"{int(bad.sum())} non-finite scores (NaN/inf), first at index {int(np.argmax(bad))}: "
                         f"{s[np.argmax(bad)]}")
    if lab.dtype != bool:
        if not ((lab == 0) | (lab == 1)).all():
            raise ValueError("labels must be bool or 0/1 (1 = target)")
        lab = lab.astype(bool)
    nt = int(np.count_nonzero(lab))
    if nt == 0:
        raise ValueError("no target trials: EER/minDCF are undefined")
    if nt == lab.size:
        raise ValueError("no non-target trials: EER/minDCF are undefined")
    return s, lab


def _sorted_split(s: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted target scores (Nt,) and non-target scores (Nn,): one N-sized copy, no argsort index array."""
    tar, non = s[lab], s[~lab]
    tar.sort()
    non.sort()
    return tar, non


def _points(own: np.ndarray, other: np.ndarray, own_is_target: bool, lo: int, hi: int):
    """Operating points at the distinct values of own[lo:hi]: (thresholds, n_miss, n_fa), each (K,).

    The first occurrence of a value at index i has exactly i own scores below it;
    the other class is counted by binary search (``side="left"``: strictly below).
    """
    v = own[lo:hi]
    first = np.empty(v.size, bool)
    first[0] = lo == 0 or own[lo - 1] != v[0]
    np.not_equal(v[1:], v[:-1], out=first[1:])
    idx = np.flatnonzero(first)
    t = v[idx]
    below_own, below_other = idx + lo, np.searchsorted(other, t, side="left")
    if own_is_target:
        return t, below_own, other.size - below_other
    return t, below_other, own.size - below_own


def _sweep(tar: np.ndarray, non: np.ndarray, a: float, b: float):
    """Scan every operating point; returns (min cost point, EER bracket A, EER bracket B).

    Points are (key, threshold, n_miss, n_fa). The EER bracket uses the exact integer
    sign of Pfa - Pmiss, n_fa*Nt - n_miss*Nn: A is the point with the smallest
    value >= 0, B the one with the largest value < 0. Strict monotonicity makes
    them adjacent, so scanning the two classes' points in any order is enough.
    A chunk inside a run of equal scores holds no first occurrence, hence no point.
    """
    nt, nn = tar.size, non.size
    best = (a, np.inf, nt, 0)  # reject all: cost c_miss p_target
    A, B = (np.inf, np.inf, 0, 0), (-nt * nn, np.inf, nt, 0)
    for own, other, is_tar in ((tar, non, True), (non, tar, False)):
        for lo in range(0, own.size, _CHUNK):
            t, miss, fa = _points(own, other, is_tar, lo, min(lo + _CHUNK, own.size))
            if t.size == 0:  # the chunk continues a run of one value: its point came with the run's start
                continue
            cost = miss * (a / nt)
            cost += fa * (b / nn)
            k = int(np.argmin(cost))
            if cost[k] < best[0] or (cost[k] == best[0] and t[k] < best[1]):
                best = (float(cost[k]), float(t[k]), int(miss[k]), int(fa[k]))
            d = fa * nt - miss * nn  # decreasing along the sorted chunk
            n_pos = int(np.count_nonzero(d >= 0))
            if n_pos and d[n_pos - 1] < A[0]:
                A = (int(d[n_pos - 1]), float(t[n_pos - 1]), int(miss[n_pos - 1]), int(fa[n_pos - 1]))
            if n_pos < d.size and d[n_pos] > B[0]:
                B = (int(d[n_pos]), float(t[n_pos]), int(miss[n_pos]), int(fa[n_pos]))
    return best, A, B


def eer_mindcf(scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> SVMetrics:
    """EER and normalised minDCF of (N,) scores with (N,) labels (bool or 0/1, 1 = target).

    Definitions in the module docstring. O(N log N): one sorted copy of the
    scores split by class (no argsort index array, no N-sized cumsums: the
    count below a score is its position or a binary search), then chunked
    sweeps. 10 M float32 trials: ~0.3 s and ~60 MB extra on one core, ~10x
    faster and ~8x leaner than sklearn's roc_curve (benchmarks/sv_metrics_speed.py).
    """
    if not 0 < p_target < 1 or c_miss <= 0 or c_fa <= 0:
        raise ValueError("need 0 < p_target < 1, c_miss > 0 and c_fa > 0")
    tar, non = _sorted_split(*_check_scores(scores, labels))
    nt, nn = tar.size, non.size
    a, b = c_miss * p_target, c_fa * (1 - p_target)
    best, A, B = _sweep(tar, non, a, b)
    ma, fa_, mb, fb = A[2] / nt, A[3] / nn, B[2] / nt, B[3] / nn
    if A[0] == 0:
        eer = ma
    else:
        lam = (fa_ - ma) / ((fa_ - ma) - (fb - mb))
        eer = ma + lam * (mb - ma)
    # the threshold reported is the bracketing point nearer to equal error rates
    eer_t = A[1] if abs(fa_ - ma) <= abs(fb - mb) else B[1]
    return SVMetrics(eer=float(eer), mindcf=best[0] / min(a, b), eer_threshold=eer_t, mindcf_threshold=best[1],
                     n_target=nt, n_nontarget=nn, p_target=p_target, c_miss=c_miss, c_fa=c_fa)


def det_curve(scores, labels, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(Pfa, Pmiss), each (K,), at exact operating points ordered by threshold, K <= ~max_points + 1.

    Large sets are thinned by taking thresholds at probit-spaced quantiles of
    *both* classes, so both tails of the DET plot keep their resolution.
    """
    tar, non = _sorted_split(*_check_scores(scores, labels))
    t = np.unique(np.concatenate([tar, non]))
    if t.size > max_points:
        from scipy.stats import norm

        q = norm.cdf(np.linspace(-5, 5, max_points // 2))
        t = np.unique(np.concatenate([np.quantile(tar, q, method="lower"), np.quantile(non, q, method="lower")]))
    pmiss = np.append(np.searchsorted(tar, t, side="left") / tar.size, 1.0)
    pfa = np.append((non.size - np.searchsorted(non, t, side="left")) / non.size, 0.0)
    return pfa, pmiss
