"""Transcribe a manifest with a trained model: CTC (greedy or beam search) or a Whisper checkpoint.

Both write JSONL ``{"id", "text"}``, one line per manifest item in manifest
order. An utterance whose audio cannot be read keeps its line, with empty
text, ``"status": "failed"`` and the reason, and the run goes on: scoring then
counts it as all deletions instead of silently dropping it. The model runs on
``device`` (cpu, cuda, cuda:N); audio is read and features computed on the
CPU, and the texts come back there.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from selfspeech.audio.io import AudioError, load_item
from selfspeech.data.audio_dataset import AudioDataset
from selfspeech.data.manifest import read_manifest, write_manifest
from selfspeech.models.ctc import load_ctc, transcribe_arrays
from selfspeech.models.whisper import (MAX_REPEATS, greedy_decode, load_for_inference, load_processor, log_mel,
                                       pad_features)
from selfspeech.train.sampler import BucketBatchSampler


def transcribe_items(items: Sequence[dict], load: Callable[[int], Any], decode_batch: Callable[[list], list[str]],
                     batches: Iterable[list[int]], out_jsonl: str | Path,
                     errors: tuple[type[Exception], ...] = (AudioError,)) -> Path:
    """Decode ``items`` batch by batch -> JSONL ``{"id", "text"}`` in item order.

    ``batches``: lists of item indices covering every item once; ``load(i)``: the
    model input of item ``i``, raising one of ``errors`` when its audio is
    unreadable; ``decode_batch(inputs)``: one text per input. An item whose
    ``load`` fails gets ``{"id", "text": "", "status": "failed", "reason"}``.
    """
    texts: dict[int, str] = {}
    failed: dict[int, str] = {}
    for idx in batches:
        inputs, ok = [], []
        for i in idx:
            try:
                inputs.append(load(i))
                ok.append(i)
            except errors as e:
                failed[i], texts[i] = str(e), ""
        if ok:
            texts.update(zip(ok, decode_batch(inputs)))
    write_manifest(out_jsonl, ({"id": it["id"], "text": texts[i]}
                               | ({"status": "failed", "reason": failed[i]} if i in failed else {})
                               for i, it in enumerate(items)))
    return Path(out_jsonl)


def transcribe_ctc(model_dir: str | Path, manifest, out_jsonl, beam: int = 0,
                   max_batch_seconds: float = 120.0, device: torch.device | str = "cpu") -> Path:
    """CTC output of every utterance -> JSONL ``{"id", "text"}`` (phones or words, space-separated).

    ``beam`` 0: greedy (best path); > 0: prefix beam search of that width (no LM)."""
    model, vocab = load_ctc(model_dir, device)
    items = list(read_manifest(manifest))
    data = AudioDataset(items, model.encoder.cfg.frontend, model.encoder.cfg.n_mels, cache=False)
    order = BucketBatchSampler(data.durations(), max_batch_seconds=max_batch_seconds, shuffle=False)
    return transcribe_items(items, data.load, lambda xs: transcribe_arrays(model, vocab, xs, beam), order.batches(0),
                            out_jsonl, errors=(AudioError, ValueError))


def transcribe_whisper(model_dir: str | Path, manifest: str | Path, out_jsonl: str | Path,
                       trim_input: bool | None = None, batch_size: int = 16, max_new_tokens: int = 128,
                       max_repeats: int = MAX_REPEATS,
                       device: torch.device | str = "cpu") -> Path:
    """Greedy transcripts of every item of ``manifest`` by Whisper checkpoint ``model_dir`` -> JSONL ``{"id", "text"}``.

    ``trim_input=None`` uses the student's own setting from its ``finetune_config.json``;
    a directory without one (a zoo model) is decoded on 30-s padded input, the
    standard way. Text is Whisper's raw output (``selfspeech eval`` normalises);
    audio beyond 30 s is not seen (Whisper's window). ``max_repeats``: a decoding loop ends the
    hypothesis (:func:`selfspeech.models.whisper.loop_cut`); 0 decodes to EOT or ``max_new_tokens``.
    """
    from selfspeech.models.lora import config_folder
    from selfspeech.train.whisper_ft import CONFIG_NAME

    cfg_file = Path(model_dir) / CONFIG_NAME
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    trim = saved.get("trim_input", False) if trim_input is None else trim_input
    # a LoRA student's folder holds only its adapter: the tokenizer and config are its base model's
    # the student decodes in the language and task it was fine-tuned for (its config leaves out the defaults)
    processor = load_processor(config_folder(model_dir), saved.get("language", "en"), saved.get("task", "transcribe"))
    model = load_for_inference(model_dir, device)
    tok = processor.tokenizer
    items = list(read_manifest(manifest))
    order = BucketBatchSampler([float(it.get("duration") or 0.0) for it in items], batch_size, shuffle=False)

    def load(i: int) -> torch.Tensor:  # (n_mels, frames) log-mel
        return log_mel(processor.feature_extractor, load_item(items[i]))

    def decode_batch(feats: list[torch.Tensor]) -> list[str]:
        x = pad_features(feats, trim)[0]
        return [tok.decode(ids, skip_special_tokens=True).strip()
                for ids in greedy_decode(model, x, tok.prefix_tokens, max_new_tokens, max_repeats)]

    return transcribe_items(items, load, decode_batch, order.batches(0), out_jsonl)
