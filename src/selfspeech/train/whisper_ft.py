"""Whisper student fine-tuning on CPU for Pseudo2Real (Lin et al. 2025, arXiv 2510.08047).

theta_sr (real labels) and theta_sp (teacher pseudo-labels) are fine-tuned from one
init with this one loop; tau = theta_sr - theta_sp (:mod:`selfspeech.arith.task_vector`)
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

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jiwer
import torch

from selfspeech.audio.io import AudioError, audio_info, load_item
from selfspeech.data.manifest import read_manifest, write_manifest
from selfspeech.models.whisper import (MAX_FRAMES, encode, greedy_decode, load_processor, log_mel,  # noqa: F401
                                       pad_features)
from selfspeech.text.normalize import NORMALIZERS, get_normalizer
from selfspeech.train import checkpoint as ckpt
from selfspeech.train import distributed as D
from selfspeech.train.sampler import BucketBatchSampler

log = logging.getLogger(__name__)
CONFIG_NAME = "finetune_config.json"
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json",
                   "added_tokens.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 1e-5                 # peak; 1e-5 / batch 8 / clip 1.0 fine-tuned tiny.en well in a probe
    warmup_steps: int = 20           # linear warm-up from 0, then `schedule` decay to 0 at the last step
    schedule: str = "linear"         # "linear" or "cosine"
    max_epochs: int = 3
    max_steps: int | None = None     # cap on optimizer updates (the schedule ends there)
    batch_size: int | None = 8       # items per batch, and/or ...
    max_batch_seconds: float | None = None  # ... padded seconds per batch (B * longest)
    grad_clip: float = 1.0           # max global grad norm; 0 disables clipping
    weight_decay: float = 0.0        # AdamW, on >= 2-D weights only (nanoGPT); 0 = HF Whisper recipe
    eval_every: int = 50             # steps between dev evaluations (and `last` checkpoints)
    patience: int = 3                # evaluations without dev-WER improvement before stopping
    eval_batch_size: int = 16
    max_new_tokens: int = 128
    seed: int = 0
    normalizer: str = "whisper_english"
    language: str = "en"             # prefix language of multilingual models; unused by *.en
    trim_input: bool = True          # False: 30-s padded features, the stock encoder path
    freeze_encoder: bool = False
    min_duration: float = 0.1
    max_duration: float = 30.0       # longer utterances are skipped (Whisper sees 30 s at most)
    num_buckets: int = 10
    cache_features: bool = True      # log-mels in RAM: 80 x 100 x 4 B = 32 kB per second of audio
    log_every: int = 10

    def __post_init__(self):
        if self.batch_size is None and self.max_batch_seconds is None:
            raise ValueError("set batch_size or max_batch_seconds")
        if not 0 < self.max_duration <= 30.0:
            raise ValueError(f"max_duration must be in (0, 30] s (Whisper's window), got {self.max_duration}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {self.normalizer!r}; choose one of {', '.join(NORMALIZERS)}")
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.eval_every < 1 or self.patience < 1:
            raise ValueError("eval_every and patience must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - names:
            raise ValueError(f"unknown FinetuneConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**d)


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
        batch = {"input_features": x, "feature_lengths": xl}
        if with_labels:
            batch["labels"], batch["label_lengths"] = pad_labels([self.labels(i) for i in idx])
        return batch


# -- training -----------------------------------------------------------------------------

def lr_at(step: int, cfg: FinetuneConfig, total: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then linear or cosine decay to 0 at ``total``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * ((1.0 - p) if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p)))


def make_optimizer(model, cfg: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on >= 2-D weights only (biases and LayerNorm gains are not shrunk).

    Fused kernel (one pass over the weights; torch >= 2.4 on CPU, transformers'
    default too): the per-tensor loop took a quarter of a tiny.en step.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights listed once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)
    except (RuntimeError, ValueError):  # older torch: no fused CPU kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=True)


def train_step(model, optimizer: torch.optim.Optimizer, batch: dict, lr: float, grad_clip: float = 1.0) -> tuple[float, float]:
    """One AdamW update on a collated batch; returns (mean token loss, grad norm before clipping)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    model.train()
    with torch.set_grad_enabled(any(p.requires_grad for p in model.get_encoder().parameters())):
        h = encode(model, batch["input_features"])  # (B, T/2, D); no graph when the encoder is frozen
    loss = model(encoder_outputs=(h,), labels=batch["labels"]).loss  # mean over non -100 tokens
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # data parallel (torchrun): the token-weighted mean over ranks = one process's combined batch
    loss = D.average_gradients(params, loss, weight=float((batch["labels"] != -100).sum()))
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    return loss.item(), norm.item()


def evaluate(model, collator: WhisperCollator, cfg: FinetuneConfig) -> tuple[float, list[str]]:
    """Greedy-decode ``collator.items``; (corpus WER against their normalised ``text``, normalised hyps)."""
    norm, tok = get_normalizer(cfg.normalizer), collator.processor.tokenizer
    model.eval()
    hyps = [""] * len(collator.items)
    sampler = BucketBatchSampler([it["duration"] for it in collator.items], cfg.eval_batch_size, shuffle=False)
    for idx in sampler.batches(0):
        x = collator(idx, with_labels=False)["input_features"]
        for i, ids in zip(idx, greedy_decode(model, x, tok.prefix_tokens, cfg.max_new_tokens)):
            hyps[i] = norm(tok.decode(ids, skip_special_tokens=True))
    return jiwer.wer([it["text"] for it in collator.items], hyps), hyps  # corpus level, as eval/


def finetune(train_manifest: str | Path, dev_manifest: str | Path | None, init_dir: str | Path, out_dir: str | Path,
             cfg: FinetuneConfig = FinetuneConfig(), progress: bool = True,
             on_step: Callable[[dict], None] | None = None) -> Path:
    """Fine-tune Whisper ``init_dir`` (a transformers dir or zoo name) on ``train_manifest``; returns ``out_dir/best``.

    Every ``cfg.eval_every`` steps: greedy dev WER against the dev manifest's
    ``text`` (pseudo-labels for a pseudo-label run), ``out_dir/best`` rewritten on
    improvement, ``out_dir/last`` (model, AdamW moments, step, sampler position,
    RNG, early-stopping counters) rewritten always; training stops after
    ``cfg.patience`` evaluations without improvement. Without a dev manifest
    ``best`` is the final model. Rerunning with the same arguments after a kill
    resumes from ``last`` and ends with the weights an uninterrupted run gets;
    rerunning a finished run returns at once. ``on_step(record)`` is called after
    every update (and after any checkpoint of that step). Writes
    ``out_dir/train_log.jsonl`` and ``out_dir/summary.json``.
    """
    from tqdm.auto import tqdm
    from transformers import WhisperForConditionalGeneration

    from selfspeech.models.zoo import resolve_model

    env = D.init_from_env()  # torchrun: data parallel over its processes (rank 0 logs and checkpoints)
    init_dir, out_dir = resolve_model(init_dir).hf_dir if not Path(init_dir).is_dir() else Path(init_dir), Path(out_dir)
    last, best, log_path = out_dir / "last", out_dir / "best", out_dir / "train_log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    resumed = ckpt.resolve(last)
    if resumed is not None and (saved := FinetuneConfig.from_dict(json.loads((resumed / CONFIG_NAME).read_text()))) != cfg:
        diff = {k: (v, getattr(cfg, k)) for k, v in saved.to_dict().items() if v != getattr(cfg, k)}
        raise ValueError(f"{out_dir} holds a run with another config {diff} (saved, given); "
                         "pass the same config to resume or use a new out_dir")
    if resumed is not None and json.loads((resumed / ckpt.STATE_JSON).read_text())["state"].get("done"):
        return best  # a finished run: nothing to do
    processor = load_processor(init_dir, cfg.language)
    model = WhisperForConditionalGeneration.from_pretrained(str(resumed or init_dir), dtype=torch.float32,
                                                            use_safetensors=True)  # never unpickle
    if cfg.freeze_encoder:
        model.get_encoder().requires_grad_(False)

    data, skipped = {}, {}
    for split, manifest in (("train", train_manifest), ("dev", dev_manifest)):
        if manifest is None:
            continue
        items, skip = load_items(manifest, cfg)
        keep = [it for it in items if len(label_ids(processor.tokenizer, it["text"])) <= model.config.max_target_positions]
        if len(keep) < len(items):
            skip["too_many_tokens"] = len(items) - len(keep)
        data[split] = WhisperCollator(keep, processor, cfg.trim_input, cfg.cache_features)
        bad = data[split].screen()  # the same decision on every (re)start
        if bad:
            skip["bad_audio"] += len(bad)
            log.warning("%s: bad audio, skipped: %s", manifest, bad[:5])
        skipped[split] = dict(skip)
        if skip:
            log.warning("%s: skipped %d %s utterance(s): %s", manifest, sum(skip.values()), split, dict(skip))
    train, dev = data["train"], data.get("dev")
    if not train.items or (dev is not None and not dev.items):
        raise ValueError(f"no usable utterances left (skipped: {skipped})")
    sampler = D.shard(BucketBatchSampler([it["duration"] for it in train.items], cfg.batch_size,
                                         cfg.max_batch_seconds, seed=cfg.seed, num_buckets=cfg.num_buckets))
    total = sum(len(sampler.batches(e)) for e in range(cfg.max_epochs))
    total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    optimizer = make_optimizer(model, cfg)
    state = {"step": 0, "best_wer": None, "best_step": None, "bad_evals": 0, "done": False, "stopped_early": False}
    if resumed is not None:
        state = ckpt.load_checkpoint(resumed, optimizer)  # also restores the RNG states
        sampler.load_state_dict(state["sampler"])
        if env.main:
            ckpt.truncate_log(log_path, state["step"])
    else:
        if env.main:
            log_path.unlink(missing_ok=True)
        torch.manual_seed(cfg.seed + env.rank)
    D.broadcast_module(model)
    D.barrier()  # nobody appends to the log while rank 0 may still be truncating it

    def write_model(d: Path) -> None:  # a save_pretrained dir that WhisperProcessor also loads
        model.save_pretrained(d)
        for name in PROCESSOR_FILES:
            if (init_dir / name).is_file():
                shutil.copy2(init_dir / name, d / name)
        (d / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=state["step"], disable=not progress or not env.main, unit="step",
               dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") if env.main else contextlib.nullcontext() as logf:
        def emit(rec: dict) -> None:
            if env.main:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()

        emit({"event": "resume" if resumed else "start", "step": state["step"], "total_steps": total,
              "n_train": len(train.items), "n_dev": len(dev.items) if dev else 0, "skipped": skipped})
        try:
            while not state["done"]:
                for idx in sampler:
                    step = state["step"]
                    lr = lr_at(step, cfg, total)
                    loss, gnorm = train_step(model, optimizer, train(idx), lr, cfg.grad_clip)
                    state["step"] = step = step + 1
                    rec = {"step": step, "epoch": sampler.epoch, "loss": round(loss, 5), "lr": lr,
                           "grad_norm": round(gnorm, 4), "batch_size": len(idx),
                           "seconds": round(time.perf_counter() - t0, 2)}
                    if step % cfg.log_every == 0:
                        emit(rec)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", best_wer=state["best_wer"], refresh=False)
                    at_end = step >= total
                    if step % cfg.eval_every == 0 or at_end:
                        if dev is not None:
                            improved, wer = False, None  # the dev set is decoded once, by rank 0
                            if env.main:
                                wer, _ = evaluate(model, dev, cfg)
                                improved = state["best_wer"] is None or wer < state["best_wer"]
                            improved, = D.broadcast_flags(improved)
                            state["bad_evals"] = 0 if improved else state["bad_evals"] + 1
                            if improved:
                                state.update(best_wer=wer, best_step=step)
                                if env.main:
                                    ckpt.write_dir(best, write_model)
                            emit({"event": "eval", "step": step, "dev_wer": wer, "best_wer": state["best_wer"],
                                  "improved": improved})
                        elif at_end:
                            state["best_step"] = step
                            if env.main:
                                ckpt.write_dir(best, write_model)
                        early = dev is not None and state["bad_evals"] >= cfg.patience
                        state.update(done=at_end or early, stopped_early=early and not at_end,
                                     sampler=sampler.state_dict())
                        if env.main:
                            ckpt.save_checkpoint(last, write_model, optimizer, state)
                        D.barrier()
                    if on_step is not None:
                        on_step(rec)
                    if state["done"]:
                        break
        finally:
            bar.close()
    summary = {"best_dir": str(best), "best_step": state["best_step"], "best_dev_wer": state["best_wer"],
               "steps": state["step"], "total_steps": total, "stopped_early": state["stopped_early"],
               "n_train": len(train.items), "n_dev": len(dev.items) if dev else 0, "skipped": skipped,
               "normalizer": cfg.normalizer, "seconds_this_session": round(time.perf_counter() - t0, 2)}
    if env.main:
        ckpt.write_json(out_dir / "summary.json", summary)
    return best


def transcribe_dir(model_dir: str | Path, manifest: str | Path, out_jsonl: str | Path, trim_input: bool | None = None,
                   batch_size: int = 16, max_new_tokens: int = 128) -> Path:
    """Greedy transcripts of every item of ``manifest`` by checkpoint ``model_dir`` -> JSONL ``{"id", "text"}``.

    ``trim_input=None`` uses the student's own setting from its ``finetune_config.json``;
    a directory without one (a zoo model) is decoded on 30-s padded input, the
    standard way. Text is Whisper's raw output (``selfspeech eval`` normalises);
    audio beyond 30 s is not seen (Whisper's window).
    """
    from transformers import WhisperForConditionalGeneration

    cfg_file = Path(model_dir) / CONFIG_NAME
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    trim = saved.get("trim_input", False) if trim_input is None else trim_input
    processor = load_processor(model_dir, saved.get("language", "en"))
    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                            use_safetensors=True).eval()
    items = list(read_manifest(manifest))
    coll = WhisperCollator(items, processor, trim, cache=False)
    order = BucketBatchSampler([float(it.get("duration") or 0.0) for it in items], batch_size, shuffle=False)
    texts: dict[int, str] = {}
    failed: dict[int, str] = {}
    for idx in order.batches(0):
        for i in idx:  # an unreadable utterance keeps its line (empty text, status, reason): scored as deletions
            try:
                coll.features(i)
            except AudioError as e:
                failed[i], texts[i] = str(e), ""
        idx = [i for i in idx if i not in failed]
        if not idx:
            continue
        x = coll(idx, with_labels=False)["input_features"]
        for i, ids in zip(idx, greedy_decode(model, x, processor.tokenizer.prefix_tokens, max_new_tokens)):
            texts[i] = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    write_manifest(out_jsonl, ({"id": it["id"], "text": texts[i]} | ({"status": "failed", "reason": failed[i]}
                                                                      if i in failed else {})
                               for i, it in enumerate(items)))
    return Path(out_jsonl)
