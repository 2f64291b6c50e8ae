"""Quantizers that turn continuous frames into targets.

- :class:`GumbelQuantizer` (wav2vec 2.0, Baevski et al. 2020, sec. 2 and eq. 1):
  G codebooks of V learned entries, hard Gumbel-softmax with a straight-through
  gradient in training, argmax at inference; entries of the G groups are
  concatenated and projected.
- :class:`RandomProjectionQuantizer` (BEST-RQ, Chiu et al. 2022, sec. 2.2): a
  frozen Xavier-initialised projection and a frozen codebook of L2-normalised
  standard-normal vectors; the label of a frame is the nearest code (cosine,
  both sides L2-normalised). Both are buffers, so they are checkpointed and a
  resumed run keeps the same targets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def perplexity(probs: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the mean distribution; probs (..., V) -> summed over leading group dim if 3-D.

    (N, V) -> scalar in [1, V]; (N, G, V) -> sum over groups of each group's perplexity, in [G, G*V].
    """
    if probs.dim() == 2:
        probs = probs[:, None]
    avg = probs.float().mean(0)                               # (G, V)
    # Exact entropy p log p. fairseq's log(p + 1e-7) biases the perplexity by ~V * 1e-7 relative, a
    # 1e-3 relative error on the diversity loss at initialisation, where that loss is near 0;
    # transformers' xlogy(p, p) is exact but its gradient is NaN where a code's mean probability
    # underflows to 0. Clamping the log's argument at the smallest normal float is exact for every
    # p > 0 and keeps the gradient finite (0 log 0 = 0).
    tiny = torch.finfo(avg.dtype).tiny
    return torch.exp(-(avg * torch.log(avg.clamp(min=tiny))).sum(-1)).sum()


def hard_gumbel(logits: torch.Tensor, tau: float, noise: torch.Tensor) -> torch.Tensor:
    """Straight-through hard Gumbel-softmax (Jang et al. 2017) with given Gumbel noise.

    logits, noise: (..., V) -> one-hot (..., V) in the forward pass, softmax((logits + noise) / tau)
    gradients; the same arithmetic as ``F.gumbel_softmax(hard=True)``, whose noise is drawn inside.
    """
    soft = ((logits + noise) / tau).softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


class GumbelQuantizer(nn.Module):
    """(N, in_dim) -> quantized (N, out_dim), plus code probabilities for the diversity loss."""

    def __init__(self, in_dim: int, out_dim: int, groups: int = 2, entries: int = 320):
        super().__init__()
        if out_dim % groups:
            raise ValueError(f"out_dim {out_dim} must be divisible by groups {groups}")
        self.groups, self.entries = groups, entries
        self.logits = nn.Linear(in_dim, groups * entries)
        nn.init.normal_(self.logits.weight, std=1.0)
        nn.init.zeros_(self.logits.bias)
        self.codebook = nn.Parameter(torch.empty(groups, entries, out_dim // groups).uniform_())

    def forward(self, x: torch.Tensor, tau: float, noise: torch.Tensor | None = None) -> dict:
        """x (N, in_dim) -> ``q`` (N, out_dim), ``soft_probs`` (N, G, V), ``codes`` (N, G) and the
        perplexities. ``noise`` (N, G, V): Gumbel noise to use in training (None: drawn from torch's RNG)."""
        N = x.shape[0]
        logits = self.logits(x).float().view(N, self.groups, self.entries)
        soft = logits.softmax(-1)                                   # for the diversity penalty (eq. 4)
        if self.training and noise is not None:
            onehot = hard_gumbel(logits, tau, noise.to(logits))
        elif self.training:
            onehot = F.gumbel_softmax(logits, tau=tau, hard=True)   # straight-through
        else:
            onehot = F.one_hot(logits.argmax(-1), self.entries).float()
        q = torch.einsum("ngv,gvd->ngd", onehot.to(self.codebook.dtype), self.codebook).reshape(N, -1)
        hard = F.one_hot(logits.argmax(-1), self.entries).float()
        return {"q": q, "soft_probs": soft, "codes": logits.argmax(-1),
                "prob_perplexity": perplexity(soft), "code_perplexity": perplexity(hard)}


class RandomProjectionQuantizer(nn.Module):
    """Frozen random projection + codebook(s): (..., in_dim) -> int64 labels (..., n_books)."""

    def __init__(self, in_dim: int, code_dim: int = 16, codes: int = 8192, books: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        proj = torch.empty(books, in_dim, code_dim)
        bound = (6.0 / (in_dim + code_dim)) ** 0.5                 # Xavier uniform
        proj.uniform_(-bound, bound, generator=g)
        book = F.normalize(torch.randn(books, codes, code_dim, generator=g), dim=-1)
        self.register_buffer("proj", proj)
        self.register_buffer("codebook", book)
        self.codes, self.books = codes, books

    @torch.no_grad()
    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., books, codes) cosine similarity to every code.

        In fp32 even under autocast: a half-precision product would move near-ties
        between codes, so the labels would depend on the precision of the run."""
        with torch.autocast(x.device.type, enabled=False):
            z = F.normalize(torch.einsum("...i,bic->...bc", x.float(), self.proj), dim=-1)
            return torch.einsum("...bc,bkc->...bk", z, self.codebook)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.similarities(x).argmax(-1)
