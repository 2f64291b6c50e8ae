"""Loss terms as pure functions of model outputs (no parameters, no state).

A method's criterion is a weighted sum of these terms (:func:`weighted_sum`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_negatives(groups: torch.Tensor, k: int, generator=None) -> torch.Tensor:
    """Distractor indices for wav2vec 2.0's contrastive task (sec. 3.2).

    ``groups`` (N,) int64: the utterance of each masked frame, frames of one
    utterance contiguous. Returns (N, k) indices into the N frames: each row drawn
    uniformly with replacement from the *other* masked frames of the same
    utterance (never the frame itself). An utterance with a single masked frame
    has no distractor: its row is -1 (the caller drops it). The draws run on the
    CPU (CPU generators: the same distractors on every device); the indices are
    returned on the device of ``groups``.
    """
    device, groups = groups.device, groups.cpu()
    N = groups.shape[0]
    out = torch.full((N, k), -1, dtype=torch.long)
    counts = torch.bincount(groups) if N else torch.zeros(0, dtype=torch.long)
    start = 0
    for g in range(counts.shape[0]):
        n = int(counts[g])
        if n >= 2:
            own = torch.arange(n)[:, None]
            gen = generator[g] if isinstance(generator, (list, tuple)) else generator  # per-utterance streams
            r = torch.randint(0, n - 1, (n, k), generator=gen)
            out[start:start + n] = start + r + (r >= own).long()  # skip the anchor itself
        start += n
    return out.to(device)


def contrastive_loss(context: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                     temperature: float = 0.1) -> dict:
    """wav2vec 2.0 eq. 3: -log exp(sim(c, q+)/k) / sum over {q+, distractors}.

    context, targets: (N, D) for the N masked frames; negatives: (N, K) indices into
    targets (-1 rows are dropped). sim is cosine. Distractors equal to the positive
    are ignored, as in fairseq. Returns mean loss in nats, accuracy, frames used.
    """
    keep = negatives[:, 0] >= 0
    c, q, neg = context[keep], targets[keep], negatives[keep]
    if c.shape[0] == 0:
        z = context.sum() * 0.0
        return {"loss": z, "accuracy": z.detach(), "frames": 0}
    cand = torch.cat([q[:, None], targets[neg]], 1)                      # (n, 1 + K, D)
    logits = F.cosine_similarity(c[:, None].float(), cand.float(), dim=-1) / temperature
    same = (targets[neg] == q[:, None]).all(-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    target = torch.zeros(c.shape[0], dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(-1) == 0).float().mean()
    return {"loss": loss, "accuracy": acc.detach(), "frames": int(c.shape[0])}


def chance_contrastive(k: int) -> float:
    """Loss (nats) of a model that cannot tell the positive from k distractors: log(k + 1)."""
    return math.log(k + 1)


def diversity_loss(prob_perplexity: torch.Tensor, groups: int, entries: int) -> torch.Tensor:
    """wav2vec 2.0 eq. 4: (GV - perplexity of the averaged softmax) / GV, in [0, 1)."""
    gv = groups * entries
    return (gv - prob_perplexity) / gv


def feature_penalty(features: torch.Tensor) -> torch.Tensor:
    """L2 penalty on the feature encoder's output (wav2vec 2.0, sec. 4.2): mean of squares."""
    return features.float().pow(2).mean()


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict:
    """BEST-RQ's loss: cross-entropy on masked frames only.

    logits (B, T, books, V), labels (B, T, books) int64, mask (B, T) bool.
    Returns mean loss (nats) over masked frames and books, and the accuracy.
    """
    return frame_cross_entropy(logits[mask], labels[mask])


def frame_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Cross-entropy of already selected frames: logits (n, books, V), labels (n, books) int64.

    Mean loss (nats) over frames and books, and the accuracy; 0 (still in the graph) when n = 0.
    """
    if logits.shape[0] == 0:
        z = logits.sum() * 0.0
        return {"loss": z, "accuracy": z.detach()}
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    acc = (logits.argmax(-1) == labels).float().mean()
    return {"loss": loss, "accuracy": acc.detach()}


def weighted_sum(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The one criterion every method uses: sum of weight * term over the weighted terms."""
    missing = [k for k in weights if k not in terms]
    if missing:
        raise KeyError(f"criterion weights name terms the method does not produce: {missing}")
    return sum(w * terms[k] for k, w in weights.items() if w)
