"""Self-supervised pretraining of a speech encoder on unlabelled audio.

``pretrain(manifest, out_dir, cfg)`` trains the task of ``cfg.objective``
(wav2vec2 | bestrq | birq) through the shared loop and writes:

- ``out_dir/best``: the whole task (encoder, heads, quantizers) as
  ``model.safetensors`` + ``config.json``;
- ``out_dir/encoder``: the encoder alone, what CTC fine-tuning starts from;
- ``out_dir/log.jsonl``, ``out_dir/summary.json`` (skipped utterances with reasons).

XLSR: with ``group_field`` set (e.g. ``age_group``, ``language``), each epoch
resamples utterances by group with p proportional to n^alpha (Conneau et al. 2020).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from selfspeech.config import checked, from_mapping, resolve_sub_config, sub_config, to_mapping, typed_fields
from selfspeech.data.audio_dataset import AudioDataset, Skipped, check_lengths
from selfspeech.data.manifest import read_manifest, unique_ids
from selfspeech.models.ssl import EncoderConfig, load_state, read_config, save_encoder
from selfspeech.objectives.tasks import TASKS, BestRQConfig, Wav2Vec2Config
from selfspeech.train import distributed as D
from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.runs import SECTIONS, write_summary
from selfspeech.train.sampler import BucketBatchSampler, GroupResampledBatchSampler


@dataclass(frozen=True)
class PretrainConfig:
    objective: Literal["wav2vec2", "bestrq", "birq"] = "bestrq"  # the self-supervised task; sets the front-end
    # given as a mapping of EncoderConfig keys ("preset": tiny|small|medium|base); the front-end
    # defaults to the objective's (wave for wav2vec2, mel otherwise)
    encoder: EncoderConfig = sub_config(dict)
    task: Wav2Vec2Config | BestRQConfig = sub_config(dict)  # the objective's config (TASKS), as a mapping
    loop: LoopConfig = field(default_factory=LoopConfig)  # optimiser, schedule, budget, checkpoints, device
    max_batch_seconds: float = checked(60.0, gt=0)  # dynamic batches: padded audio seconds per batch
    crop_seconds: float | None = checked(8.0, gt=0)  # random crop of longer utterances
    group_field: str | None = None                  # XLSR multi-group sampling
    group_alpha: float = checked(0.5, ge=0, le=1)  # group p ~ n^alpha: 1 natural shares, 0 uniform over groups

    def __post_init__(self):
        typed_fields(self)
        # the objective decides the front-end: wav2vec 2.0 quantizes waveform features, BEST-RQ log-mels
        frontend = "wave" if self.objective == "wav2vec2" else "mel"
        resolve_sub_config(self, "encoder", EncoderConfig, {"frontend": frontend})  # bad keys: encoder.*
        resolve_sub_config(self, "task", TASKS[self.objective][1])                  # bad keys: task.*

    def encoder_config(self) -> EncoderConfig:
        return self.encoder

    def loop_config(self) -> LoopConfig:
        return self.loop

    def to_dict(self) -> dict:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        return from_mapping(cls, d, "pretraining config")


SECTIONS["pretrain"] = lambda d: PretrainConfig.from_dict(d).to_dict()


def min_seconds(enc: EncoderConfig, task) -> float:
    """Shortest usable utterance: one mask span of output frames after the front-end."""
    span = task.cfg.mask_span
    units = enc.receptive_field + (span - 1) * enc.stride + 2 * enc.stride
    return units / (16_000 if enc.frontend == "wave" else 100)


def initial_task(cfg: PretrainConfig, init: str | Path | None) -> tuple[PretrainConfig, torch.nn.Module]:
    """The task to train and ``cfg`` with the encoder and quantizer ``init`` brings.

    ``init``: None (fresh weights), a transformers wav2vec 2.0 / XLSR folder (config.json with
    model_type wav2vec2: continued pretraining of e.g. facebook/wav2vec2-xls-r-300m on the user's
    audio) or OUT/best of an earlier ``pretrain --objective wav2vec2``. The checkpoint fixes the
    architecture and the quantizer (groups, entries, final_dim); masking, distractors, temperatures
    and loss weights stay those of ``cfg.task``."""
    if init is None:
        return cfg, TASKS[cfg.objective][0](cfg.encoder_config(), cfg.task)
    if cfg.objective != "wav2vec2":
        raise ValueError(f"init {str(init)!r}: a wav2vec 2.0 checkpoint continues objective wav2vec2, not "
                         f"{cfg.objective!r}; set objective: wav2vec2 (--objective wav2vec2)")
    from selfspeech.models.hf_wav2vec2 import is_hf_dir, load_checked
    from selfspeech.objectives.w2v2_hf import task_config_for, task_from_hf

    if is_hf_dir(init):
        task, _ = task_from_hf(init, cfg.task)
    else:
        meta = read_config(init, "ssl_task:wav2vec2")
        saved = meta.get("pretrain", {}).get("task", {})
        quant = {k: saved[k] for k in ("groups", "entries", "final_dim") if k in saved}
        task = TASKS["wav2vec2"][0](EncoderConfig(**meta["config"]), task_config_for(cfg.task, quant))
        load_checked(task, load_state(init), init)
    return dataclasses.replace(cfg, encoder=task.enc_cfg, task=task.cfg), task


def pretrain(manifest: str | Path, out_dir: str | Path, cfg: PretrainConfig = PretrainConfig(),
             progress: bool = True, init: str | Path | None = None) -> dict:
    """Train ``cfg.objective`` on ``manifest``; ``init``: the starting weights (:func:`initial_task`)."""
    out = Path(out_dir)
    env = D.init_from_env(cfg.loop.device)  # torchrun: data parallel over its processes
    torch.manual_seed(cfg.loop.seed)  # the same initial weights on every (re)start
    cfg, task = initial_task(cfg, init)
    enc_cfg, loop_cfg = cfg.encoder_config(), cfg.loop_config()
    items, dup = unique_ids(read_manifest(manifest))
    items, skipped = check_lengths(items, min_seconds(enc_cfg, task))
    skipped += [Skipped(u, "duplicate id: only its first line is used") for u in dup]
    if not items:
        raise ValueError(f"{manifest}: no utterance is long enough for this encoder ({len(skipped)} skipped, "
                         f"first: {skipped[0] if skipped else None})")
    data = AudioDataset(items, enc_cfg.frontend, enc_cfg.n_mels, max_seconds=cfg.crop_seconds)
    skipped += data.screen(progress and env.main)  # bad audio: skipped and listed, not a crash mid-run
    items = data.items
    if not items:
        raise ValueError(f"{manifest}: no usable utterance ({len(skipped)} skipped, first: {skipped[0]})")
    if cfg.group_field:
        missing = [it.get("id") for it in items if it.get(cfg.group_field) in (None, "")]
        if missing:
            raise ValueError(f"{manifest}: {len(missing)} utterance(s) have no {cfg.group_field!r} field "
                             f"(first: {missing[:3]}); add it or drop group_field")
        sampler = GroupResampledBatchSampler(data.durations(), [str(it[cfg.group_field]) for it in items],
                                             cfg.group_alpha, max_batch_seconds=cfg.max_batch_seconds,
                                             seed=loop_cfg.seed)
    else:
        sampler = BucketBatchSampler(data.durations(), max_batch_seconds=cfg.max_batch_seconds, seed=loop_cfg.seed)

    sampler = D.shard(sampler)

    def write_model(d: Path) -> None:
        save_encoder(task, enc_cfg, d, kind=f"ssl_task:{cfg.objective}", extra={"pretrain": cfg.to_dict()})

    def warn(rec: dict) -> list[str]:  # collapse watch, once warm-up is over (chance is normal before)
        if rec["progress"] < loop_cfg.warmup_fraction:
            return []
        return task.warnings(rec, rec)

    state = train_loop(task, task.loss, sampler, data.collate, loop_cfg, out, write_model,
                       {"pretrain": cfg.to_dict(), "manifest": str(manifest), "n_items": len(items),
                        **({"init": str(init)} if init else {})},
                       warnings=warn, progress=progress, desc=f"pretrain {cfg.objective}")
    if not env.main:
        return {}
    save_encoder(task.encoder, enc_cfg, out / "encoder", kind="ssl_encoder",
                 extra={"objective": cfg.objective, "steps": state["step"]})
    summary = {"objective": cfg.objective, "steps": state["step"], "train_seconds": round(state["seconds"], 1),
               "n_train": len(items), "skipped": [dataclasses.asdict(s) for s in skipped],
               "init": str(init) if init else None,
               "encoder": dataclasses.asdict(enc_cfg), "params": sum(p.numel() for p in task.encoder.parameters()),
               "groups": getattr(sampler, "probs", None)}
    write_summary(out, summary)
    return summary

