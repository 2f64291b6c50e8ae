"""Speaker clusters by how the teacher fails on them, not by how they sound.

Pseudo2Real-SC (Lin et al. 2025, sec. 3.3) gives each speaker cluster its own
correction vector tau_c. Clusters of voices help only when speakers who sound
alike share the teacher's errors; on a corpus where they do not, the voice
clusters merely split the source data. These clusters group speakers by the
teacher's error rate itself:

- on the source, where real transcripts exist, each speaker's teacher WER is
  measured, and the speakers are ranked by it into ``k`` groups of equal size;
- on the target, which has no transcripts, each speaker's teacher WER is
  *predicted* from the teacher's own confidence (mean log-probability,
  compression ratio, no-speech probability, share of flagged labels, speaking
  rate), by a ridge regression fitted on the source speakers;
- a target speaker joins the group whose WER range holds its prediction.

tau_c then comes from the source speakers the teacher fails on as it fails on
the target speakers of c. The regression's rank correlation on source speakers
it was not fitted on (:func:`heldout_spearman`) says whether the confidence
carries the error at all: near zero, no assignment of target speakers can be
better than chance, which is measured evidence against any error clustering.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

# per-utterance teacher statistics every faster-whisper label carries (label.run); "flagged" and
# "words_per_second" are derived from the label's flags and its text over the audio duration
FEATURES = ("avg_logprob", "compression_ratio", "no_speech_prob", "flagged", "words_per_second")


def confidence_features(label: Mapping) -> np.ndarray:
    """(len(FEATURES),) float64 of one teacher label; ValueError naming the utterance when a field is missing."""
    missing = [k for k in ("avg_logprob", "compression_ratio", "no_speech_prob") if label.get(k) is None]
    if missing:
        raise ValueError(f"utterance {label.get('id')!r}: its teacher label has no {', '.join(missing)}; "
                         "teacher-error clusters need labels written by `selfspeech label` (faster-whisper)")
    words = len(str(label.get("text") or "").split())
    duration = float(label.get("duration") or 0.0)
    return np.array([label["avg_logprob"], label["compression_ratio"], label["no_speech_prob"],
                     float(bool(label.get("flags"))), words / duration if duration > 0 else 0.0], dtype=np.float64)


def speaker_features(items: Iterable[dict], labels: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
    """speaker -> mean :func:`confidence_features` over its utterances that have a teacher label."""
    acc: dict[str, list[np.ndarray]] = {}
    for it in items:
        lab = labels.get(it["id"])
        if lab is not None and lab.get("status", "ok") == "ok":
            acc.setdefault(str(it["speaker"]), []).append(confidence_features(lab))
    return {s: np.mean(v, axis=0) for s, v in acc.items()}


@dataclass(frozen=True)
class ErrorModel:
    """Standardised ridge regression from speaker confidence features to the speaker's teacher WER."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N,) predicted teacher WER."""
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept


def fit_error_model(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> ErrorModel:
    """Ridge fit of ``y`` (N,) on ``x`` (N, F); a strong penalty because N is a few dozen source speakers."""
    from sklearn.linear_model import Ridge

    if len(x) < 3:
        raise ValueError(f"{len(x)} source speakers with teacher labels: at least 3 are needed to fit the "
                         "teacher-error model")
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)  # a constant feature (no flagged label at all) carries nothing
    r = Ridge(alpha=alpha).fit((x - mean) / scale, y)
    return ErrorModel(mean, scale, np.asarray(r.coef_, dtype=np.float64), float(r.intercept_))


def heldout_spearman(model: ErrorModel, x: np.ndarray, y: np.ndarray) -> float | None:
    """Rank correlation of predicted and measured teacher WER on speakers the model was not fitted on."""
    from scipy.stats import spearmanr

    pred = model.predict(x)
    if len(y) < 3 or np.ptp(y) == 0 or np.ptp(pred) == 0:
        return None
    r = spearmanr(pred, y).statistic
    return None if not np.isfinite(r) else float(r)


def quantile_cuts(values: np.ndarray, k: int) -> np.ndarray:
    """(k-1,) WER thresholds cutting ``values`` into ``k`` groups of (nearly) equal size, midway between
    the neighbouring speakers of two groups."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    bounds = [round(i * len(v) / k) for i in range(1, k)]
    return np.array([(v[b - 1] + v[b]) / 2 for b in bounds])


def rank_groups(values: Mapping[str, float], k: int) -> dict[str, int]:
    """key -> group by rank: the (nearly) equal-size groups :func:`quantile_cuts` separates, ties broken by
    key, so every group keeps its share of speakers even when several share a WER."""
    order = sorted(values, key=lambda key: (values[key], key))
    return {key: min(k - 1, i * k // len(order)) for i, key in enumerate(order)}


def assign(values: Mapping[str, float], cuts: np.ndarray) -> dict[str, int]:
    """key -> group index: the number of cuts below its value (group 0: the lowest teacher WER)."""
    return {k: int(np.searchsorted(cuts, v, side="right")) for k, v in values.items()}
