"""Whisper student fine-tuning on CPU for Pseudo2Real (Lin et al. 2025, arXiv 2510.08047).

theta_sr (real labels) and theta_sp (teacher pseudo-labels) are fine-tuned from one
init by the toolkit's one training loop (:mod:`selfspeech.train.loop`, the loss in
:mod:`selfspeech.objectives.seq2seq`); tau = theta_sr - theta_sp (:mod:`selfspeech.arith.task_vector`)
only means "what the teacher gets wrong" if the two runs differ in nothing but the
labels. Hence:

- both label sets pass through one normaliser (``cfg.normalizer``) before
  tokenising, or tau learns casing and punctuation instead of acoustics;
- batches depend only on durations and ``cfg.seed`` (:mod:`.sampler`), never on
  the text, so the two runs see the same batches in the same order;
- the dev set is scored against whatever its ``text`` holds: a pseudo-label run
  gets a pseudo-labelled dev set and no real label leaks into model selection.

Speed: no 30-s padding; see :mod:`selfspeech.models.whisper` for the trimmed encoder.

Batch: ``input_features`` (B, n_mels, T) log-mel padded per utterance with its
own silence floor (what 30-s padding puts there), ``feature_lengths`` (B,) int64
frames; ``labels`` (B, L) int64 ``<|notimestamps|> text <|endoftext|>`` padded
with -100 (the model prepends ``<|startoftranscript|>`` when shifting right),
``label_lengths`` (B,) int64.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jiwer
import torch

from selfspeech.audio.io import AudioError, audio_info, load_item
from selfspeech.data.manifest import read_manifest
from selfspeech.models.whisper import (MAX_FRAMES, encode, greedy_decode, load_processor, log_mel,  # noqa: F401
                                       pad_features)
from selfspeech.text.normalize import NORMALIZERS, get_normalizer
from selfspeech.config import checked, from_mapping, invalid, omit_defaults, to_mapping, typed_fields
from selfspeech.models.lora import LoraConfig, is_adapter_dir, load_adapter_weights, trainable_parameters
from selfspeech.models.lora import wrap as wrap_lora
from selfspeech.objectives.seq2seq import WhisperSeq2Seq
from selfspeech.train import distributed as D
from selfspeech.train.loop import LoopConfig, finished_state, total_steps, train_loop
from selfspeech.train.runs import write_summary
from selfspeech.train.sampler import BucketBatchSampler

log = logging.getLogger(__name__)
CONFIG_NAME = "finetune_config.json"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                   "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class FinetuneConfig(LoopConfig):
    """The shared loop's settings with Whisper fine-tuning defaults, plus the student's data and decoding."""

    lr: float = checked(1e-5, gt=0)  # peak; 1e-5 / batch 8 / clip 1.0 fine-tune tiny.en well
    weight_decay: float = checked(0.0, ge=0)      # the Hugging Face Whisper recipe
    betas: tuple[float, float] = (0.9, 0.999)     # AdamW's defaults, as transformers' Trainer
    warmup_steps: int | None = checked(20, ge=0)  # linear warm-up, then `schedule` decay to 0 at the last step
    max_epochs: int | None = checked(3, ge=1)
    max_steps: int | None = checked(None, ge=1)   # cap on optimizer updates (the schedule ends there)
    grad_clip: float = checked(1.0, ge=0)         # max global grad norm; 0 disables clipping
    eval_every: int = checked(50, ge=1)           # steps between dev evaluations (each also checkpoints last/)
    patience: int | None = checked(3, ge=1)       # evaluations without dev-WER improvement before stopping
    keep_last: bool = False                       # a finished student keeps best/ only (later stages read it)
    batch_size: int | None = checked(8, ge=1)     # items per batch, and/or ...
    max_batch_seconds: float | None = checked(None, gt=0)  # ... padded seconds per batch (B * longest)
    eval_batch_size: int = checked(16, ge=1)  # utterances per batch of the dev set's greedy decoding
    max_new_tokens: int = checked(128, ge=1)  # most tokens decoded per dev utterance
    max_repeats: int = checked(4, ge=0)       # an n-gram repeated this often in a row ends a dev hypothesis; 0: off
    normalizer: str = "whisper_english"  # of labels and dev WER alike: whisper_english, basic or none
    language: str = "en"             # prefix language of multilingual models; *.en models take en only
    task: str = "transcribe"         # prefix task of multilingual models: transcribe, or translate (into English)
    trim_input: bool = True          # False: 30-s padded features, the stock encoder path
    freeze_encoder: bool = False  # train the decoder only (the encoder's weights stay as loaded)
    min_duration: float = checked(0.1, ge=0)  # seconds; shorter utterances are skipped
    max_duration: float = checked(30.0, gt=0, le=30.0)  # longer utterances are skipped (Whisper sees 30 s at most)
    num_buckets: int = checked(10, ge=1)  # duration buckets batches are cut from (less padding)
    cache_features: bool = True      # log-mels in RAM: 80 x 100 x 4 B = 32 kB per second of audio
    # a LoRA student (models.lora): only the adapters train, best/ is an adapter folder; None: full fine-tuning
    lora: LoraConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        typed_fields(self)  # lora given as a mapping: a LoraConfig, checked like a file's
        if self.lora is not None and self.freeze_encoder:
            raise invalid("freeze_encoder", True, "set with lora (LoRA freezes every base weight already)",
                          "set lora.where: decoder to adapt the decoder only")
        if self.batch_size is None and self.max_batch_seconds is None:
            raise invalid("batch_size", None, "unset and so is max_batch_seconds", "give one or both")
        if self.normalizer not in NORMALIZERS:
            raise invalid("normalizer", self.normalizer, "not a text normaliser", f"choose {', '.join(NORMALIZERS)}")
        if self.task not in ("transcribe", "translate"):
            raise invalid("task", self.task, "not a Whisper task", "choose transcribe or translate")

    def to_dict(self) -> dict:
        # transcription, full fine-tuning and the accelerator options at their defaults compute what a config
        # without them computed: left out, so the mapping (and stage caches) of such configs stay as they were
        # (device, workers and compile never key a cache)
        return omit_defaults(to_mapping(self), {"task": "transcribe", "lora": None, "precision": "auto",
                                                "grad_accum": 1, "grad_checkpointing": False})

    @classmethod
    def from_dict(cls, d: dict, where: str = "finetune config") -> "FinetuneConfig":
        """The strict loader (:func:`selfspeech.config.from_mapping`): names, types and ranges checked."""
        return from_mapping(cls, d, where)


# -- labels ------------------------------------------------------------------------------

def pad_labels(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ((B, L) int64 padded with -100, ignored by the loss, (B,) int64 lengths)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    y = torch.full((len(seqs), int(lengths.max())), -100, dtype=torch.int64)
    for i, s in enumerate(seqs):
        y[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return y, lengths


# -- data ---------------------------------------------------------------------------------

def load_items(manifest: str | Path, cfg: FinetuneConfig) -> tuple[list[dict], Counter]:
    """Usable manifest items with normalised ``text`` and float ``duration``, and the skip counts by reason."""
    norm = get_normalizer(cfg.normalizer)
    items, skipped = [], Counter()
    for it in read_manifest(manifest):
        dur = it.get("duration")
        if dur is None:
            end = it.get("end")
            try:
                dur = (float(end) if end is not None else audio_info(it["audio_filepath"]).duration) \
                    - float(it.get("offset") or 0.0)
            except AudioError as e:
                log.warning("utterance %r skipped: %s", it.get("id"), e)
                skipped["bad_audio"] += 1
                continue
        text = norm(it.get("text") or "")
        if not text:
            skipped["empty_text"] += 1
        elif dur > cfg.max_duration:
            skipped["too_long"] += 1
        elif dur < cfg.min_duration:
            skipped["too_short"] += 1
        else:
            items.append({**it, "text": text, "duration": float(dur)})
    return items, skipped


def label_ids(tokenizer, text: str) -> list[int]:
    """``<|notimestamps|> text <|endoftext|>`` ids (prefix minus SOT, which the model prepends itself).

    A leading space, because Whisper's transcripts start with one: the first word
    keeps the token it had in pre-training.
    """
    return tokenizer(" " + text).input_ids[1:]


class WhisperCollator:
    """Collates the items a sampler picked into a batch (see module doc); caches log-mels if asked."""

    def __init__(self, items: list[dict], processor, trim: bool = True, cache: bool = True):
        self.items, self.processor, self.trim, self.cache = items, processor, trim, cache
        self._feats: dict[int, torch.Tensor] = {}

    def features(self, i: int) -> torch.Tensor:
        if i in self._feats:
            return self._feats[i]
        f = log_mel(self.processor.feature_extractor, load_item(self.items[i]))
        if self.cache:
            self._feats[i] = f
        return f

    def screen(self) -> list[tuple[str, str]]:
        """Compute every item's features once; drop (and return as (id, reason)) those whose audio fails.

        Otherwise a bad file stops the run when a batch first reaches it. With the
        feature cache on, this is the first epoch's work done early.
        """
        keep, feats, bad = [], {}, []
        for i, it in enumerate(self.items):
            try:
                f = self.features(i)
            except AudioError as e:
                bad.append((str(it.get("id")), str(e)))
                continue
            if self.cache:
                feats[len(keep)] = f
            keep.append(it)
        self.items, self._feats = keep, feats
        return bad

    def labels(self, i: int) -> list[int]:
        return label_ids(self.processor.tokenizer, self.items[i]["text"])

    def __call__(self, idx: list[int], with_labels: bool = True) -> dict[str, torch.Tensor]:
        x, xl = pad_features([self.features(i) for i in idx], self.trim)
        batch = {"input_features": x, "feature_lengths": xl, "ids": [str(self.items[i].get("id")) for i in idx]}
        if with_labels:
            batch["labels"], batch["label_lengths"] = pad_labels([self.labels(i) for i in idx])
        return batch


# -- training -----------------------------------------------------------------------------

def evaluate(model, collator: WhisperCollator, cfg: FinetuneConfig) -> tuple[float, list[str]]:
    """Greedy-decode ``collator.items``; (corpus WER against their normalised ``text``, normalised hyps)."""
    norm, tok = get_normalizer(cfg.normalizer), collator.processor.tokenizer
    model.eval()
    hyps = [""] * len(collator.items)
    sampler = BucketBatchSampler([it["duration"] for it in collator.items], cfg.eval_batch_size, shuffle=False)
    for idx in sampler.batches(0):
        x = collator(idx, with_labels=False)["input_features"]
        for i, ids in zip(idx, greedy_decode(model, x, tok.prefix_tokens, cfg.max_new_tokens, cfg.max_repeats)):
            hyps[i] = norm(tok.decode(ids, skip_special_tokens=True))
    return jiwer.wer([it["text"] for it in collator.items], hyps), hyps  # corpus level, as eval/


def finetune(train_manifest: str | Path, dev_manifest: str | Path | None, init_dir: str | Path, out_dir: str | Path,
             cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
             on_step: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune Whisper ``init_dir`` (a transformers dir or zoo name) on ``train_manifest``; returns ``out_dir/best``.

    Runs on the shared loop (:func:`selfspeech.train.loop.train_loop`). Every
    ``cfg.eval_every`` steps: greedy dev WER against the dev manifest's ``text``
    (pseudo-labels for a pseudo-label run), ``out_dir/best`` rewritten on
    improvement, ``out_dir/last`` (model, AdamW moments, step, sampler position,
    RNG, early-stopping counters) rewritten; training stops after
    ``cfg.patience`` evaluations without improvement. Without a dev manifest
    ``best`` is the final model. Rerunning with the same arguments after a kill
    resumes from ``last`` and ends with the weights an uninterrupted run gets;
    rerunning a finished run returns at once. ``on_step(record)`` is called after
    every update (and after any checkpoint of that step). Writes
    ``out_dir/log.jsonl`` and ``out_dir/summary.json``. With ``cfg.lora`` a LoRA student
    trains (only its adapters) and ``best`` is a peft adapter folder on ``init_dir``.
    """
    env = D.init_from_env(cfg.device)  # torchrun: data parallel over its processes (rank 0 logs and checkpoints)
    if is_adapter_dir(init_dir):  # a LoRA student's folder holds factors, not a model to start from
        raise ValueError(f"init {init_dir}: a LoRA adapter folder, not a model to start from; give its base "
                         "model (adapter_config.json base_model_name_or_path) or a fully fine-tuned student")
    init_dir = student_init_dir(init_dir)
    out_dir = Path(out_dir)
    run_config = {"finetune": cfg.to_dict(), "init": str(Path(init_dir).resolve()),
                  "train": str(Path(train_manifest).resolve()),
                  "dev": None if dev_manifest is None else str(Path(dev_manifest).resolve())}
    if finished_state(out_dir, run_config) is not None:
        return out_dir / "best"  # a finished run: nothing to load, nothing to do
    processor = load_processor(init_dir, cfg.language, cfg.task)  # refuses e.g. German for a .en model
    model = student_model(init_dir, cfg)
    data, skipped = {}, {}
    for split, manifest in (("train", train_manifest), ("dev", dev_manifest)):
        if manifest is not None:
            data[split], skipped[split] = student_data(manifest, split, cfg, processor, model.config.max_target_positions)
    train, dev = data["train"], data.get("dev")
    if not train.items or (dev is not None and not dev.items):
        raise ValueError(f"no usable utterances left (skipped: {skipped})")
    sampler = D.shard(BucketBatchSampler([it["duration"] for it in train.items], cfg.batch_size,
                                         cfg.max_batch_seconds, seed=cfg.seed, num_buckets=cfg.num_buckets))

    def write_model(d: Path) -> None:  # a save_pretrained dir (LoRA: an adapter folder) with the processor files
        model.save_pretrained(d)
        for name in PROCESSOR_FILES:
            if (init_dir / name).is_file():
                shutil.copy2(init_dir / name, d / name)
        (d / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    def load_model(d: Path) -> None:
        load_adapter_weights(model, d) if cfg.lora is not None else load_whisper_weights(model, d)

    def dev_wer() -> dict:
        wer, _ = evaluate(model, dev, cfg)
        return {"metric": wer, "dev_wer": wer}

    state = train_loop(model, WhisperSeq2Seq(model), sampler, lambda idx, rng: train(idx), cfg, out_dir,
                       write_model, run_config, evaluate=dev_wer if dev is not None else None, progress=progress,
                       desc="finetune whisper", on_step=on_step, load_model=load_model,
                       info={"n_train": len(train.items), "n_dev": len(dev.items) if dev else 0, "skipped": skipped,
                             "trainable_parameters": trainable_parameters(model)})
    summary = {"best_dir": str(out_dir / "best"), "best_step": state["best_step"], "best_dev_wer": state["best"],
               "steps": state["step"], "total_steps": total_steps(cfg, sampler), "stopped_early": state["stopped_early"],
               "skipped_steps": state["skipped_steps"], "n_train": len(train.items),
               "n_dev": len(dev.items) if dev else 0, "skipped": skipped, "normalizer": cfg.normalizer,
               "trainable_parameters": trainable_parameters(model), "lora": cfg.to_dict().get("lora"),
               "seconds_this_session": state.get("seconds_this_session", 0.0)}
    if env.main:
        write_summary(out_dir, summary)
    return out_dir / "best"


def student_init_dir(init: str | Path) -> Path:
    """The transformers dir of a student init: a transformers folder as it is, any other model source
    (a name, a CTranslate2 folder, a hub id) through :func:`selfspeech.models.zoo.resolve_model`."""
    from selfspeech.models.sources import ModelError, inspect_dir
    from selfspeech.models.zoo import resolve_model

    try:
        if Path(init).is_dir() and inspect_dir(init).kind == "transformers":
            return Path(init)
    except ModelError:
        pass  # resolve_model names what the folder lacks
    return resolve_model(init).hf_dir


def student_model(init_dir: Path, cfg: FinetuneConfig):
    """theta0 in fp32 master weights (never unpickled); with ``cfg.lora`` wrapped by peft so that only
    the LoRA factors train (Hu et al. 2021) - the loop's optimizer gets the trainable parameters only."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(
        str(init_dir), dtype=torch.float32, use_safetensors=True, attn_implementation="sdpa")
    if cfg.lora is not None:
        return wrap_lora(model, cfg.lora, init_dir, cfg.seed)
    if cfg.freeze_encoder:
        model.get_encoder().requires_grad_(False)
    return model


def student_data(manifest: str | Path, split: str, cfg: FinetuneConfig, processor,
                 max_tokens: int) -> tuple["WhisperCollator", dict]:
    """The usable utterances of ``manifest`` as a collator, and the skip counts by reason.

    Every item's audio is decoded once up front (:meth:`WhisperCollator.screen`),
    so a bad file is skipped and counted the same way on every (re)start instead
    of stopping the run when a batch first reaches it.
    """
    items, skip = load_items(manifest, cfg)
    keep = [it for it in items if len(label_ids(processor.tokenizer, it["text"])) <= max_tokens]
    if len(keep) < len(items):
        skip["too_many_tokens"] = len(items) - len(keep)
    coll = WhisperCollator(keep, processor, cfg.trim_input, cfg.cache_features)
    bad = coll.screen()
    if bad:
        skip["bad_audio"] += len(bad)
        log.warning("%s: bad audio, skipped: %s", manifest, bad[:5])
    if skip:
        log.warning("%s: skipped %d %s utterance(s): %s", manifest, sum(skip.values()), split, dict(skip))
    return coll, dict(skip)


def load_whisper_weights(model, d: Path) -> None:
    """A checkpoint's ``model.safetensors`` into ``model``; save_pretrained leaves out tied weights only."""
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict(load_file(str(Path(d) / "model.safetensors")), strict=False)
    tied = {"proj_out.weight"}  # tied to the decoder's token embedding
    if unexpected or set(missing) - tied:
        raise ValueError(f"{d}: weights do not fit this Whisper (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if missing:
        model.tie_weights()
