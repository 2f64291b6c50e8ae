"""The self-supervised parts of benchmarks/gpu.py: pretraining (d) and speaker SSL (e).

Both train through the toolkit's loop (:func:`selfspeech.train.loop.train_loop`
with the objective's task, the trainers' datasets and collators, bf16 autocast,
``num_workers`` loader processes), timed from the end of the warm-up updates to
the end of the last timed one (the loop reads each update's loss, so every
timestamp follows a finished step; data-loading waits are included).

Pretraining: BEST-RQ (log-mel front-end) and wav2vec 2.0 (waveform CNN) with
the ``base`` encoder preset (12 x 768, FFN 3072, 12 heads), every utterance
cropped to ``crop_seconds`` so that all batches have one shape. Model FLOP
utilisation = FLOPs of one update (forward + backward of the task's loss,
counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions
and attention; no optimizer) x updates per second / the measured bf16 matmul peak.

Speaker SSL: ECAPA-TDNN SimCLR (two 2-s views per utterance, log-mel computed
by the task on the GPU) without augmentation, whose numpy/soxr work on the
host depends on the CPU rather than on the GPU being measured.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import time
from pathlib import Path

import torch

from gpu import Ctx, guarded_each, replicate

from selfspeech.accel import resolve_precision, to_device
from selfspeech.data.audio_dataset import AudioDataset
from selfspeech.models.ssl import EncoderConfig
from selfspeech.objectives.tasks import TASKS
from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.sampler import BucketBatchSampler


def timed_loop(module, loss_fn, sampler, collate, cfg: LoopConfig, warmup: int, steps: int, out: Path) -> dict:
    """Train ``warmup + steps + 1`` updates (the last one's checkpoint falls outside the window); the
    seconds of updates ``warmup + 1 .. warmup + steps`` and the losses. A time budget in ``cfg``
    may end it early: then the updates done count, if any were timed."""
    ends: dict[int, tuple[float, float]] = {}
    cfg = dataclasses.replace(cfg, max_steps=warmup + steps + 1, log_every=1, ckpt_every=10**6, keep_last=False)
    shutil.rmtree(out, ignore_errors=True)
    train_loop(module, loss_fn, sampler, collate, cfg, out, lambda d: None, {"benchmark": out.name},
               progress=False, load_model=lambda d: None,
               on_step=lambda rec: ends.__setitem__(rec["step"], (time.perf_counter(), rec["loss"])))
    shutil.rmtree(out, ignore_errors=True)
    last = min(warmup + steps, max(ends))
    if last <= warmup:
        raise RuntimeError(f"the time box ended after {max(ends)} update(s), before any timed one")
    return {"seconds": ends[last][0] - ends[warmup][0], "timed_steps": last - warmup,
            "losses": [round(ends[k][1], 4) for k in sorted(ends)]}


def step_flops(module, loss_fn, batch: dict, ctx: Ctx) -> int:
    """FLOPs of one forward + backward of ``loss_fn`` on ``batch`` under the run's autocast."""
    from torch.utils.flop_counter import FlopCounterMode

    prec = resolve_precision(ctx.precision, ctx.device)
    batch = to_device(batch, ctx.device)
    module.train()
    with FlopCounterMode(display=False) as counter:
        with prec.autocast(ctx.device):
            loss, _ = loss_fn(batch, 0)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def loop_config(ctx: Ctx) -> LoopConfig:
    """The loop's settings for a timed run: no warm-up schedule to speak of, stop at the part's time box."""
    return LoopConfig(lr=5e-4, warmup_fraction=0.0, max_steps=1, budget_seconds=max(5.0, ctx.left() - 10.0),
                      device=str(ctx.device), precision=ctx.precision, num_workers=ctx.sizes["workers"])


def pretrain_one(ctx: Ctx, objective: str) -> dict:
    S = ctx.sizes
    enc = EncoderConfig.preset(S["encoder"], frontend="wave" if objective == "wav2vec2" else "mel")
    torch.manual_seed(0)
    task = TASKS[objective][0](enc, TASKS[objective][1]())
    B, crop = S["pretrain_batch"][objective], S["crop_seconds"]
    data = AudioDataset(replicate(ctx.items, B), enc.frontend, enc.n_mels, max_seconds=crop)
    if data.screen():
        raise RuntimeError("the packed utterances failed to load")
    sampler = BucketBatchSampler(data.durations(), batch_size=B, seed=0, num_buckets=1, drop_last=True)
    ctx.reset_memory()
    t = timed_loop(task, task.loss, sampler, data.collate, loop_config(ctx), S["pretrain_warmup"],
                   S["pretrain_steps"], ctx.work / f"pretrain_{objective}")
    peak = ctx.peak_memory_gib()
    batch = data.collate(sampler.batches(0)[0], random.Random(0))
    units = 16000 if enc.frontend == "wave" else 100  # samples or mel frames per second
    audio_per_step = float(batch["lengths"].sum()) / units
    flops = step_flops(task, task.loss, batch, ctx)
    steps_per_s = t["timed_steps"] / t["seconds"]
    achieved = flops * steps_per_s
    return {"mfu": round(achieved / ctx.peak_flops, 4) if ctx.peak_flops else None,
            "audio_seconds_per_second": round(audio_per_step * steps_per_s, 1),
            "steps_per_second": round(steps_per_s, 3), "achieved_tflops": round(achieved / 1e12, 3),
            "flop_per_step": flops, "batch": B, "crop_seconds": crop,
            "audio_seconds_per_step": round(audio_per_step, 2), "timed_steps": t["timed_steps"],
            "losses": t["losses"], "encoder": dataclasses.asdict(enc),
            "params": sum(p.numel() for p in task.parameters()), "peak_memory_gib": peak,
            "precision": ctx.precision, "loader_workers": ctx.sizes["workers"]}


def pretraining(ctx: Ctx) -> dict:
    if ctx.peak_flops is None:
        raise RuntimeError("no matmul peak measured (part matmul): MFU has no denominator")
    objectives = guarded_each(ctx, ("bestrq", "wav2vec2"), lambda objective: pretrain_one(ctx, objective), 25)
    mfus = {k: v["mfu"] for k, v in objectives.items() if v.get("mfu")}
    peaks = [v["peak_memory_gib"] for v in objectives.values() if v.get("peak_memory_gib")]
    return {"mfu": min(mfus.values()) if mfus else None, "mfu_is": "the lower of: " + ", ".join(mfus),
            "peak_matmul_tflops": round(ctx.peak_flops / 1e12, 1), "objectives": objectives,
            "peak_memory_gib": max(peaks) if peaks else ctx.peak_memory_gib()}


def speaker_ssl(ctx: Ctx) -> dict:
    from selfspeech.objectives.speaker_ssl import SpeakerSSLTask
    from selfspeech.train.speaker import SpeakerSSLConfig, ViewCollator

    S = ctx.sizes
    B = S["ecapa_batch"]
    cfg = SpeakerSSLConfig(method="simclr", ecapa={"preset": S["ecapa"]}, augment=None, batch_size=B,
                           loop=loop_config(ctx))
    data = AudioDataset(replicate(ctx.items, 2 * B), "wave")
    if data.screen():
        raise RuntimeError("the packed utterances failed to load")
    torch.manual_seed(0)
    task = SpeakerSSLTask(cfg, len(data.items))
    sampler = BucketBatchSampler([1.0] * len(data.items), batch_size=B, seed=0, num_buckets=1, drop_last=True)
    collate = ViewCollator(data, cfg, None, with_ref=False)
    t = timed_loop(task, task.loss, sampler, collate, cfg.loop, S["ecapa_warmup"], S["ecapa_steps"],
                   ctx.work / "speaker_ssl")
    return {"steps_per_second": round(t["timed_steps"] / t["seconds"], 2),
            "utterances_per_second": round(B * t["timed_steps"] / t["seconds"], 1), "batch": B,
            "views": 2, "segment_seconds": cfg.segment_seconds, "ecapa": dataclasses.asdict(cfg.ecapa),
            "params": sum(p.numel() for p in task.encoder.parameters()), "timed_steps": t["timed_steps"],
            "losses": t["losses"], "augmentation": "off", "precision": ctx.precision,
            "loader_workers": S["workers"]}
