"""Self-supervised speaker objectives: SimCLR's NT-Xent and DINO, as pure functions.

- NT-Xent (Chen et al. 2020, eq. 1): two views per utterance; each view's
  positive is the other view, its negatives the 2B-2 other views of the batch.
  sslsv uses temperature 0.03 for speaker SimCLR (Lepage & Dehak).
- DINO (Caron et al. 2021, sec. 3.1): a student matches a teacher's sharpened,
  centred distribution over ``out_dim`` prototypes, across crops (the teacher
  sees only the global crops). The teacher is an EMA of the student with a
  momentum following a cosine from 0.996 to 1; the centre is an EMA (0.9) of
  the teacher outputs and prevents collapse onto one prototype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.03) -> tuple[torch.Tensor, torch.Tensor]:
    """z1, z2: (B, D) projections of two views (row i of both = one utterance) -> (loss, accuracy).

    Symmetric: both views serve as anchors. Cosine similarities (L2-normalised).
    Accuracy: how often the positive is the most similar of the 2B-1 candidates.
    The similarities are fp32 even under autocast: divided by a temperature of a
    few hundredths, a half-precision cosine's rounding would move the logits by ~0.1.
    """
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    with torch.autocast(z.device.type, enabled=False):
        sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    loss = F.cross_entropy(sim, target)
    acc = (sim.argmax(-1) == target).float().mean()
    return loss, acc


class Projector(nn.Sequential):
    """SimCLR's MLP head: Linear -> BN -> ReLU -> Linear (the loss sees its output, the verifier the input)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, dim_out))


class DINOHead(nn.Module):
    """DINO projection head: 3-layer MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    The last layer's weight norm is frozen at 1 (DINO's ``norm_last_layer``), which
    stabilises training with small batches.
    """

    def __init__(self, dim_in: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim_in) -> (B, out_dim) fp32 logits (cosine to each prototype), fp32 under autocast too:
        the losses sharpen them by temperatures of 0.04-0.1."""
        h = F.normalize(self.mlp(x).float(), dim=-1)
        with torch.autocast(h.device.type, enabled=False):
            return h @ F.normalize(self.prototypes, dim=-1).T


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              t_student: float = 0.1, t_teacher: float = 0.04) -> torch.Tensor:
    """Cross-entropy H(teacher_i, student_v) averaged over pairs with v != i (Caron et al. 2021, eq. 3).

    student: V tensors (B, K) of logits (global crops first); teacher: G tensors
    (B, K) for the global crops, detached; center: (K,).
    """
    targets = [torch.softmax((t.detach().float() - center) / t_teacher, dim=-1) for t in teacher]
    logps = [torch.log_softmax(s.float() / t_student, dim=-1) for s in student]
    total, n = 0.0, 0
    for i, q in enumerate(targets):
        for v, lp in enumerate(logps):
            if v == i:
                continue  # the same crop seen by both: trivial
            total = total + (-(q * lp).sum(-1)).mean()
            n += 1
    return total / n


def update_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9) -> None:
    """In place: center <- m * center + (1 - m) * mean teacher logits of the batch."""
    batch_mean = torch.cat([t.detach() for t in teacher]).mean(0)
    center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)


def cosine_momentum(progress: float, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher EMA momentum at ``progress`` in [0, 1]: base -> final along a half cosine."""
    return final - (final - base) * (math.cos(math.pi * min(1.0, max(0.0, progress))) + 1) / 2


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: teacher <- m * teacher + (1 - m) * student, parameters only.

    As in DINO's code, the teacher runs in training mode (batch-norm on batch
    statistics) and its running statistics come from its own forward passes;
    a teacher in inference mode with EMA'd running statistics lags the
    student's activations and drifts to uniform outputs.
    """
    with torch.no_grad():
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def prototype_entropy(teacher: list[torch.Tensor], center: torch.Tensor, t_teacher: float) -> tuple[float, float]:
    """DINO's two collapse monitors (Caron et al. 2021, sec. 5.3), in nats.

    Returns (entropy of the batch-mean teacher distribution, mean per-sample
    entropy). Collapse onto one prototype: both near 0. Collapse to uniform:
    the per-sample entropy reaches log K. Their difference (a KL) is what the
    targets tell the student; it should grow.
    """
    q = torch.cat([torch.softmax((t.float() - center) / t_teacher, -1) for t in teacher])
    p = q.mean(0)
    mean_h = float(-(p * p.clamp(min=1e-12).log()).sum())
    sample_h = float(-(q * q.clamp(min=1e-12).log()).sum(-1).mean())
    return mean_h, sample_h
