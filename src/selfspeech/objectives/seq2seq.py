"""Whisper sequence-to-sequence fine-tuning objective: token cross-entropy on (pseudo-)transcripts.

The loss is the mean over label tokens that transformers' Whisper computes from
``labels`` (-100 = padding, ignored); the encoder runs on features cut to the
batch's longest utterance (:func:`selfspeech.models.whisper.encode`), so no
compute goes to 30-s padding. With a frozen encoder no graph is built for it.

Batch: ``input_features`` (B, n_mels, T) float log-mel, ``labels`` (B, L) int64
``<|notimestamps|> text <|endoftext|>`` padded with -100 (the model prepends
``<|startoftranscript|>`` when shifting right).
"""
from __future__ import annotations

import torch

from selfspeech.models.whisper import encode


class WhisperSeq2Seq:
    """``loss(batch, step) -> (loss, record)`` for a ``WhisperForConditionalGeneration``."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
        return self.loss(batch)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        model = self.model
        with torch.set_grad_enabled(any(p.requires_grad for p in model.get_encoder().parameters())):
            h = encode(model, batch["input_features"])  # (B, T/2, D)
        loss = model(encoder_outputs=(h,), labels=batch["labels"]).loss  # mean over non -100 tokens
        tokens = int((batch["labels"] != -100).sum())
        # "_weight": data parallel averages ranks by their label tokens, i.e. one process's combined batch
        return loss, {"tokens": tokens, "_weight": float(tokens)}
