"""Span masking (wav2vec 2.0, Baevski et al. 2020, sec. 3.1; BEST-RQ, Chiu et al. 2022, sec. 2.1).

For an utterance of ``n`` frames, ``round_random(mask_prob * n / span)`` span starts
are drawn without replacement from ``[0, n - span]`` and each masks ``span``
frames; spans may overlap, so the masked fraction is a little under
``mask_prob`` (about 49% of frames for wav2vec 2.0's 0.65 x 10). Every utterance
of at least ``span`` frames gets at least ``min_spans`` spans.

``generator`` is one ``torch.Generator`` for the batch, or a list with one per
row (per-item randomness: the same masks whatever batch an item is in).

``layout="aligned"`` draws the same number of spans from the ``n // span``
non-overlapping slots at multiples of ``span`` instead, as SpeechBrain's BEST-RQ
masking (``speechbrain.lobes.models.BESTRQ.compute_mask``) does: the masked
fraction is then ``mask_prob`` itself and every run of masked frames a multiple
of ``span``. SpeechBrain also draws one mask for the whole batch, from its
shortest utterance, so longer ones are masked less; ours draws per utterance.
The default stays the papers' overlapping spans (wav2vec 2.0; BEST-RQ, Chiu et
al. 2022, sec. 2.1: every frame may start a span).
"""
from __future__ import annotations

import torch


def row_generator(generator, b: int) -> torch.Generator | None:
    """Row ``b``'s generator: the list's entry, or the one shared generator."""
    return generator[b] if isinstance(generator, (list, tuple)) else generator


def draw_rows(fn, shape: tuple, generator, device: torch.device | None = None) -> torch.Tensor:
    """``fn(shape)`` (torch.randn, torch.rand), drawn row by row when ``generator`` is a per-row list.

    The draws come from the (CPU) generators, so they are the same on every device; the
    result is then moved to ``device`` (None: left on the CPU)."""
    if isinstance(generator, (list, tuple)):
        out = torch.stack([fn(tuple(shape[1:]), generator=g) for g in generator])
    else:
        out = fn(shape, generator=generator)
    return out if device is None else out.to(device)


def span_mask(lengths: torch.Tensor, T: int, mask_prob: float, span: int, min_spans: int = 1,
              generator=None, layout: str = "overlap") -> torch.Tensor:
    """(B,) int64 lengths -> (B, T) bool mask, True on masked frames (never on padding).

    Raises ValueError if an utterance is shorter than ``span`` frames: nothing
    could be masked and predicted there (callers filter such utterances first).
    The spans are drawn on the CPU (from CPU generators: the same masks on every
    device); the mask is returned on the device of ``lengths``.
    """
    device, lengths = lengths.device, lengths.cpu()
    if not 0.0 < mask_prob <= 1.0 or span < 1:
        raise ValueError(f"mask_prob must be in (0, 1] and span >= 1, got {mask_prob}, {span}")
    if layout not in ("overlap", "aligned"):
        raise ValueError(f"mask layout {layout!r}: choose overlap or aligned")
    short = (lengths < span).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"utterance(s) at batch index {short} have fewer frames ({lengths[short].tolist()}) "
                         f"than the mask span ({span}); drop them or shorten the span")
    B = lengths.shape[0]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        n = int(lengths[b])
        expected = mask_prob * n / span
        g = row_generator(generator, b)
        k = int(expected) + int(torch.rand((), generator=g) < expected - int(expected))
        slots = n - span + 1 if layout == "overlap" else n // span
        k = min(max(k, min_spans), slots)
        starts = torch.randperm(slots, generator=g)[:k] * (1 if layout == "overlap" else span)
        idx = (starts[:, None] + torch.arange(span)[None, :]).flatten()
        mask[b, idx] = True
    return mask.to(device)


def upsample_mask(mask: torch.Tensor, factor: int, T_in: int) -> torch.Tensor:
    """(B, T') frame mask -> (B, T_in) mask over the ``factor``-times finer input frames."""
    up = mask.repeat_interleave(factor, dim=1)[:, :T_in]
    if up.shape[1] < T_in:
        up = torch.cat([up, up.new_zeros(up.shape[0], T_in - up.shape[1])], 1)
    return up
