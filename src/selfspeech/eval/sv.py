"""Speaker-verification trials: trial lists, cosine scoring, AS-norm, DET and embedding plots, tables.

The metrics themselves (EER, minDCF, DET curve) and their conventions are in
:mod:`selfspeech.eval.sv_metrics`.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Container, Mapping, Sequence

import numpy as np

from selfspeech.eval.sv_metrics import SVMetrics, det_curve, eer_mindcf

log = logging.getLogger(__name__)
_CHUNK = 1 << 18  # trials per vectorised step: bounds temporaries to a few tens of MB
_LABELS = {"target": True, "nontarget": False}


# ----------------------------------------------------------------------------- trial lists

@dataclass(frozen=True)
class Trial:
    """One verification trial: is ``test`` spoken by the speaker of ``enrol``?"""

    enrol: str
    test: str
    target: bool


def single_utterance_speakers(utt2spk: Mapping[str, str]) -> list[str]:
    """Speakers with one utterance: they can only appear in non-target trials."""
    return sorted(s for s, c in Counter(utt2spk.values()).items() if c == 1)


def _partner_ranges(utt2spk: Mapping[str, str]):
    """Utterances ordered by (speaker, id), (N,); per position i, the partners j > i of its
    target pairs (same speaker block) and non-target pairs (all later blocks) as (start, count)."""
    utts = sorted(utt2spk, key=lambda u: (utt2spk[u], u))
    n, spk = len(utts), [utt2spk[u] for u in utts]
    starts = np.flatnonzero([a != b for a, b in zip(spk, spk[1:])]).astype(np.int64) + 1  # later blocks
    end = np.append(starts, n)[np.searchsorted(starts, np.arange(n), side="right")]
    i = np.arange(n, dtype=np.int64)
    return utts, (i + 1, end - i - 1), (end, n - end)


def _decode(k: np.ndarray, start: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pair numbers k (pairs enumerated by i, then by partner) -> positions (i, j)."""
    offs = np.concatenate([[0], np.cumsum(count)])
    i = np.searchsorted(offs, k, side="right") - 1  # the last i with offs[i] <= k has count > 0
    return i, start[i] + (k - offs[i])


def _quotas(n_tar: int, n_non: int, n_trials: int | None, frac: float | None) -> tuple[int, int] | None:
    """(targets, non-targets) to draw, or None for a uniform draw over all pairs."""
    if frac is not None and not 0 <= frac <= 1:
        raise ValueError(f"target_fraction must be in [0, 1], got {frac}")
    if n_trials is None:
        if frac is None or frac in (0, 1):
            return (n_tar if frac != 0 else 0), (n_non if frac != 1 else 0)
        n = min(n_tar / frac, n_non / (1 - frac))  # the largest list with this fraction
        q = min(n_tar, round(frac * n))
        return q, min(n_non, round(n) - q)
    if n_trials < 0 or n_trials > n_tar + n_non:
        raise ValueError(f"n_trials={n_trials}: only {n_tar + n_non} distinct pairs exist")
    if frac is None:
        return None
    q = round(frac * n_trials)
    if q > n_tar or n_trials - q > n_non:
        raise ValueError(f"{q} target + {n_trials - q} non-target trials asked, "
                         f"{n_tar} target and {n_non} non-target pairs exist")
    return q, n_trials - q


def make_trials(utt2spk: Mapping[str, str], n_trials: int | None, seed: int = 0,
                target_fraction: float | None = None) -> list[Trial]:
    """Verification trials over the utterances of ``utt2spk``, drawn without replacement.

    Every unordered utterance pair can appear once (never swapped, never an
    utterance against itself); enrol/test order is a coin flip. ``n_trials=None``
    takes all pairs (with ``target_fraction``: the largest subset with that
    fraction); otherwise ``n_trials`` pairs, uniform over all pairs, or with
    ``target_fraction`` of them target pairs. Speakers with one utterance give
    only non-target trials; they are logged (``single_utterance_speakers``).
    Deterministic for a seed; sorted by (enrol, test).
    """
    singles = single_utterance_speakers(utt2spk)
    if singles:
        log.warning("%d speaker(s) with a single utterance appear in non-target trials only: %s",
                    len(singles), ", ".join(singles[:5]) + (" ..." if len(singles) > 5 else ""))
    utts, tgt, non = _partner_ranges(utt2spk)
    n_tar, n_non = int(tgt[1].sum()), int(non[1].sum())
    rng = np.random.default_rng(seed)
    quotas = _quotas(n_tar, n_non, n_trials, target_fraction)
    if quotas is None:  # uniform over the union: numbers < n_tar are target pairs
        k = np.sort(rng.choice(n_tar + n_non, n_trials, replace=False))
        picks = (k[k < n_tar], k[k >= n_tar] - n_tar)
    else:
        picks = tuple(np.arange(q) if q == total else np.sort(rng.choice(total, q, replace=False))
                      for q, total in zip(quotas, (n_tar, n_non)))
    trials = []
    for k, (start, count), target in zip(picks, (tgt, non), (True, False)):
        i, j = _decode(k, start, count)
        flip = rng.random(k.size) < 0.5
        for a, b, f in zip(i.tolist(), j.tolist(), flip.tolist()):
            trials.append(Trial(utts[b], utts[a], target) if f else Trial(utts[a], utts[b], target))
    trials.sort(key=lambda t: (t.enrol, t.test))
    return trials


def read_trials(path: str | os.PathLike, known_ids: Container[str] | None = None,
                on_unknown: str = "raise") -> tuple[list[Trial], int]:
    """Parse a trial list; returns (trials, number of lines skipped for unknown ids).

    Blank lines are ignored; anything but three fields ending in target/nontarget,
    or an utterance against itself, is a ValueError naming the line. With
    ``known_ids`` (e.g. the embedding dict), a line naming another id raises
    (``on_unknown="raise"``) or is skipped and counted (``"skip"``).
    """
    if on_unknown not in ("raise", "skip"):
        raise ValueError(f"on_unknown must be 'raise' or 'skip', got {on_unknown!r}")
    trials, skipped = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or fields[2] not in _LABELS:
                raise ValueError(f"{path}:{n}: expected 'enrol test target|nontarget', got {line.strip()!r}")
            enrol, test, lab = fields
            if enrol == test:
                raise ValueError(f"{path}:{n}: utterance {enrol!r} is tested against itself")
            unknown = [] if known_ids is None else [u for u in (enrol, test) if u not in known_ids]
            if unknown and on_unknown == "raise":
                raise ValueError(f"{path}:{n}: unknown utterance id {unknown[0]!r}")
            if unknown:
                skipped += 1
                continue
            trials.append(Trial(enrol, test, _LABELS[lab]))
    return trials, skipped


# ----------------------------------------------------------------------------- scoring

def _unit_rows(emb: Mapping[str, np.ndarray], ids: Sequence[str]) -> np.ndarray:
    """(len(ids), D) float64 L2-normalised embeddings; a zero vector stays zero (scores 0)."""
    missing = [u for u in ids if u not in emb]
    if missing:
        raise KeyError(f"no embedding for {len(missing)} utterance(s), e.g. {missing[:3]}")
    m = np.stack([np.asarray(emb[u], dtype=np.float64).ravel() for u in ids])
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _trial_index(trials: Sequence[Trial]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Distinct ids and (N,) enrol / test row indices into them."""
    index: dict[str, int] = {}
    e = np.fromiter((index.setdefault(t.enrol, len(index)) for t in trials), np.int64, len(trials))
    t = np.fromiter((index.setdefault(t.test, len(index)) for t in trials), np.int64, len(trials))
    return list(index), e, t


def cosine_scores(emb: Mapping[str, np.ndarray], trials: Sequence[Trial]) -> np.ndarray:
    """(N,) cosine similarity of each trial's enrol and test embeddings (L2-normalise, then dot)."""
    ids, e, t = _trial_index(trials)
    m = _unit_rows(emb, ids)
    out = np.empty(len(trials))
    for lo in range(0, len(trials), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        out[sl] = np.einsum("ij,ij->i", m[e[sl]], m[t[sl]])
    return out


def _cohort_stats(m: np.ndarray, cohort: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std, each (U,), of every row's top_n cosine scores against the (C, D) cohort."""
    mu, sd = np.empty(len(m)), np.empty(len(m))
    step = max(1, _CHUNK // max(1, len(cohort)))
    for lo in range(0, len(m), step):
        s = m[lo:lo + step] @ cohort.T
        if top_n < s.shape[1]:
            s = np.partition(s, s.shape[1] - top_n, axis=1)[:, -top_n:]
        mu[lo:lo + step], sd[lo:lo + step] = s.mean(axis=1), s.std(axis=1)
    return mu, np.maximum(sd, 1e-6)


def as_norm(scores, trials: Sequence[Trial], emb: Mapping[str, np.ndarray],
            cohort: np.ndarray | Mapping[str, np.ndarray], top_n: int | None = 300) -> np.ndarray:
    """Adaptive symmetric score normalisation of (N,) cosine ``scores`` of ``trials``.

    Each side x of a trial is scored (cosine) against a (C, D) cohort of
    impostor embeddings (from speakers outside the test set); the mean mu_x and
    std sigma_x of its ``top_n`` highest cohort scores normalise the score::

        s' = ((s - mu_e) / sigma_e + (s - mu_t) / sigma_t) / 2

    Symmetric normalisation (S-norm) averages Z-norm (enrol side) and T-norm
    (test side) so the result does not depend on which side is the enrolment
    (Kenny 2010). Keeping only the cohort closest to x (adaptive S-norm,
    Sturim & Reynolds 2005; Cumani et al. 2011) estimates the statistics of the
    hardest impostors, which is where the threshold operates; Matejka et al.
    (Interspeech 2017) found top-N AS-norm best across languages and channels,
    and N ~ 200-400 is the usual choice for VoxCeleb. ``top_n=None`` (or >= C)
    is plain S-norm.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(trials),):
        raise ValueError(f"scores {s.shape} do not match {len(trials)} trials")
    c = cohort if isinstance(cohort, np.ndarray) else np.stack([np.asarray(v).ravel() for v in cohort.values()])
    c = c.astype(np.float64) / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    top = len(c) if top_n is None else min(int(top_n), len(c))
    if top < 1:
        raise ValueError("cohort is empty or top_n < 1")
    ids, e, t = _trial_index(trials)
    mu, sd = _cohort_stats(_unit_rows(emb, ids), c, top)
    return 0.5 * ((s - mu[e]) / sd[e] + (s - mu[t]) / sd[t])


# ----------------------------------------------------------------------------- plots and tables

_DET_TICKS = (0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9)


def det_plot(results: Mapping[str, tuple], path: str | os.PathLike, title: str = "DET") -> Path:
    """PNG of DET curves (Martin et al. 1997): Pmiss against Pfa on normal-deviate axes.

    ``results`` maps system name -> (scores, labels). Gaussian score
    distributions become straight lines on these axes, so systems compare by
    offset and slope across the whole range. The EER (this module's definition)
    is marked on each curve and given in the legend.
    """
    from matplotlib.figure import Figure
    from scipy.stats import norm

    eers = {name: eer_mindcf(scores, labels).eer for name, (scores, labels) in results.items()}
    # the window follows the systems: weak ones (EER 20-50%) need the upper range, strong ones the lower
    lo = float(np.clip(min(eers.values()) / 50, 5e-5, 0.01))
    hi = float(np.clip(max(eers.values()) * 1.8, 0.5, 0.95))

    def z(p):
        return norm.ppf(np.clip(p, lo, 1 - lo))

    fig = Figure(figsize=(5.5, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for name, (scores, labels) in results.items():
        eer = eers[name]
        pfa, pmiss = det_curve(scores, labels)
        line, = ax.plot(z(pfa), z(pmiss), label=f"{name} (EER {100 * eer:.2f}%)")
        ax.plot(z(eer), z(eer), "o", color=line.get_color())
    ticks = [p for p in _DET_TICKS if lo <= p <= hi]
    ax.set_xticks(z(ticks), [f"{100 * p:g}" for p in ticks], rotation=45)
    ax.set_yticks(z(ticks), [f"{100 * p:g}" for p in ticks])
    ax.plot(z([lo, hi]), z([lo, hi]), ":", color="grey", lw=0.8)
    ax.set(xlim=z([lo, hi]), ylim=z([lo, hi]), xlabel="false alarm rate (%)", ylabel="miss rate (%)", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _project(x: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(n, 2) projection of (n, D) rows: PCA to <= 50 dims, then t-SNE when there are enough points.

    PCA first is the usual t-SNE recipe (van der Maaten & Hinton 2008): it
    removes noise dimensions and makes the neighbour search cheap.
    """
    from sklearn.decomposition import PCA

    n = len(x)
    p = PCA(n_components=min(50, x.shape[1], n), random_state=seed).fit_transform(x)
    if n < 30:  # t-SNE's perplexity needs far more neighbours than that
        return np.pad(p[:, :2], ((0, 0), (0, max(0, 2 - p.shape[1])))), "PCA"
    from sklearn.manifold import TSNE

    return TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(p), "t-SNE"


def embedding_plot(emb: Mapping[str, np.ndarray], utt2spk: Mapping[str, str], path: str | os.PathLike,
                   max_speakers: int = 20, seed: int = 0) -> Path:
    """PNG scatter of L2-normalised embeddings in 2-D, one colour per speaker.

    Shows the ``max_speakers`` speakers with the most embedded utterances
    (ties by name): more colours than that are indistinguishable.
    """
    import matplotlib
    from matplotlib.figure import Figure

    by_spk: dict[str, list[str]] = {}
    for u in sorted(emb):
        if u in utt2spk:
            by_spk.setdefault(utt2spk[u], []).append(u)
    keep = sorted(by_spk, key=lambda s: (-len(by_spk[s]), s))[:max_speakers]
    ids = [u for s in keep for u in by_spk[s]]
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} embedded utterance(s) with a speaker: nothing to plot")
    xy, method = _project(_unit_rows(emb, ids), seed)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab20"]
    at = 0
    for k, s in enumerate(keep):
        n = len(by_spk[s])
        ax.scatter(xy[at:at + n, 0], xy[at:at + n, 1], s=12, color=cmap(k % 20), label=s)
        at += n
    ax.set_title(f"{method} of {len(ids)} embeddings, {len(keep)} speakers")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(keep) <= 20:
        ax.legend(fontsize="x-small", markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def metrics_table(rows: Mapping[str, SVMetrics]) -> str:
    """Markdown table, one row per system: EER (%), minDCF with its p_target, trial counts."""
    out = ["| system | EER (%) | minDCF | p_target | targets | non-targets |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        out.append(f"| {name} | {100 * m.eer:.2f} | {m.mindcf:.4f} | {m.p_target:g} | "
                   f"{m.n_target:,} | {m.n_nontarget:,} |")
    return "\n".join(out) + "\n"
