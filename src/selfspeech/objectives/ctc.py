"""CTC fine-tuning objective (Graves et al. 2006) as wav2vec 2.0 fine-tunes (Baevski et al. 2020, sec. 4.3).

Time masking with the encoder's learned mask embedding and channel masking on
the front-end features regularise the fine-tune; for the first ``freeze_steps``
updates the encoder runs without gradients, so only the new (random) output
layer learns until it no longer sends noise into the pretrained weights.

Batch: ``x`` (B, T[, F]) waveforms or log-mels, ``lengths`` (B,) int64,
``tokens`` a list of B target id lists (blank = 0 is never a target).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from selfspeech.models.ctc import CTCModel
from selfspeech.objectives.masking import span_mask


def channel_mask(B: int, C: int, prob: float, span: int, gen=None,
                 device: torch.device | None = None) -> torch.Tensor | None:
    """(B, C) bool mask on ``device`` of feature channels set to 0 (spans of ``span`` channels);
    None for ``prob`` 0."""
    if prob <= 0:
        return None
    return span_mask(torch.full((B,), C, dtype=torch.long, device=device), C, prob, min(span, C), min_spans=0,
                     generator=gen)


class CTCTask:
    """``loss(batch, step) -> (loss, record)`` for a :class:`CTCModel`.

    ``cfg`` carries the masking and freezing fields of the CTC fine-tuning config
    (``freeze_steps``, ``mask_time_prob``, ``mask_time_span``, ``mask_channel_prob``,
    ``mask_channel_span``). The task holds no weights of its own: the trained and
    saved module is ``model``, so checkpoints hold the model's keys alone.
    """

    def __init__(self, model: CTCModel, cfg):
        self.model, self.cfg = model, cfg

    def loss(self, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
        cfg, model = self.cfg, self.model
        x, lengths = batch["x"], batch["lengths"]
        flen = model.encoder.cfg.out_lengths(lengths)
        tmask = span_mask(flen, int(flen.max()), cfg.mask_time_prob, min(cfg.mask_time_span, int(flen.min())),
                          min_spans=0) if cfg.mask_time_prob > 0 else None
        cmask = channel_mask(x.shape[0], model.encoder.feat_dim, cfg.mask_channel_prob, cfg.mask_channel_span,
                             device=x.device)
        frozen = step < cfg.freeze_steps
        if frozen:
            with torch.no_grad():
                feats, flen = model.encoder.features(x, lengths)
                h = model.encoder.encode(feats, flen, tmask)[-1]
            lp = model.head(h).float().log_softmax(-1)
        else:
            lp, flen = model(x, lengths, tmask, cmask)
        # fp32 log-probabilities under autocast too (CTC sums them over every frame); the targets
        # (python lists in the batch) go to the log-probs' device
        dev = lp.device
        tgt = [torch.tensor(t, dtype=torch.long, device=dev) for t in batch["tokens"]]
        tlen = torch.tensor([len(t) for t in tgt], dtype=torch.long, device=dev)
        loss = F.ctc_loss(lp.float().transpose(0, 1), torch.cat(tgt), flen, tlen, blank=0, zero_infinity=True)
        return loss, {"frozen": frozen}
