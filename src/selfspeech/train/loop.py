"""One explicit training loop for encoder pretraining and CTC fine-tuning (nanoGPT style).

What differs between methods is passed in: ``loss_fn(batch, step) -> (loss,
record)``, the batch sampler, ``collate(indices, rng)``, and an optional
``evaluate() -> {"metric": lower-is-better, ...}``. The loop owns the rest:
AdamW, linear warm-up then linear or cosine decay, gradient clipping, a JSONL
log (plus TensorBoard scalars when asked and installed), a progress bar with
ETA, periodic atomic checkpoints (weights, AdamW moments, sampler position, RNG)
and resume after a kill to the same weights an uninterrupted run reaches.

Budget: ``max_steps``, or a wall-clock ``budget_seconds`` (the same CPU time for
every method of a comparison); the schedule follows the fraction of the budget
used. A time budget is not bit-reproducible, a step budget is.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from selfspeech.train import checkpoint as ckpt
from selfspeech.train import distributed as D
from selfspeech.train.tracking import make_trackers

RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class LoopConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    warmup_fraction: float = 0.08   # of the budget (wav2vec 2.0 base: 32k of 400k steps)
    schedule: str = "linear"        # after warm-up: linear | cosine decay to 0, or constant
    grad_clip: float = 10.0
    max_steps: int = 1000
    budget_seconds: float | None = None  # if set: stop on time instead (max_steps stays a cap)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_every: int = 0             # also keep the checkpoint of every N-th step as out/keep/step-N (0: none),
    #                                 e.g. to branch a run (train/speaker.py fork) or to compare stages
    eval_every: int = 0             # 0: evaluate only at the end
    patience: int | None = None     # stop after this many evaluations without improvement
    max_bad_steps: int = 5          # non-finite loss/gradient: skip the update; stop after this many in a row
    tensorboard: bool = False       # shorthand for tracking: [tensorboard]
    tracking: tuple = ()            # extra backends mirroring the JSONL log: tensorboard, mlflow (train/tracking.py)

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: choose linear, cosine or constant")
        object.__setattr__(self, "tracking", tuple(self.tracking) + (("tensorboard",) if self.tensorboard
                                                                     and "tensorboard" not in self.tracking else ()))


def loop_config(d: dict) -> LoopConfig:
    """A LoopConfig from a YAML/JSON mapping (lists become the tuples the dataclass holds)."""
    return LoopConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def strict_from_dict(cls, d: dict, what: str):
    """``cls(**d)`` for a config dataclass, refusing unknown keys with the list of known ones."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} config key(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


def lr_at(progress: float, cfg: LoopConfig) -> float:
    """Learning rate at ``progress`` in [0, 1] of the budget."""
    w = cfg.warmup_fraction
    if progress < w:
        return cfg.lr * progress / w
    if cfg.schedule == "constant":
        return cfg.lr
    rest = min(1.0, (progress - w) / max(1e-9, 1 - w))
    return cfg.lr * ((1 - rest) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * rest)))


def make_optimizer(module: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings (1-D parameters)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas))


def config_diff(saved: dict, given: dict, prefix: str = "") -> dict:
    """Differences of two JSON configs as ``{"dotted.key": (saved, given)}``.

    An absent key counts as ``None``: an option added to a config after a run
    started defaults to None (off, e.g. ``CTCConfig.init_seed``), and that run
    must still resume or be reused."""
    diff = {}
    for k in sorted(set(saved) | set(given), key=str):
        a, b = saved.get(k), given.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff |= config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diff[f"{prefix}{k}"] = (a, b)
    return diff


def resolved_configs(**configs) -> dict:
    """``run_config["resolved"]``: each config dataclass with its defaults filled in (None stays None)."""
    return {k: None if c is None else asdict(c) for k, c in configs.items()}


def check_resume(out: Path, saved: dict, run_config: dict) -> str | None:
    """Raise unless the run saved with ``saved`` may continue as ``run_config``.

    Callers put every config with its defaults filled in under ``run_config["resolved"]``
    (the user-facing configs hold overrides only), so a default changed since the run
    started stops the resume instead of silently changing the run half-way. A run saved
    before ``resolved`` was recorded resumes when the rest matches; the returned warning
    says its defaults could not be checked.
    """
    legacy = "resolved" not in saved and "resolved" in run_config
    rest = {k: v for k, v in run_config.items() if k != "resolved"} if legacy else run_config
    diff = config_diff(saved, rest)
    if not diff:
        return (f"{out}: saved before resolved configs were recorded; resuming without checking that "
                "the defaults are those it started with") if legacy else None
    hint = ("; only resolved values differ: a default (or a file the config points to) changed since this "
            "run started; set the saved value explicitly to resume" if diff and all(
                k.startswith("resolved.") for k in diff) else "")
    raise ValueError(f"{out} holds a run with another config {diff} (saved, given){hint}; "
                     "use the same config to resume, or a new output directory")


def train_loop(module: torch.nn.Module, loss_fn: Callable, sampler, collate: Callable, cfg: LoopConfig,
               out_dir: str | Path, write_model: Callable[[Path], None], run_config: dict,
               evaluate: Callable[[], dict] | None = None, warnings: Callable[[dict], list[str]] | None = None,
               progress: bool = True, desc: str = "train", on_step: Callable[[dict], None] | None = None,
               after_update: Callable[[int, float], dict | None] | None = None) -> dict:
    """Train ``module`` in place; returns the final state (``step``, ``best``, ``seconds``...).

    ``out_dir/last`` is the resumable checkpoint, ``out_dir/best`` the best model
    by ``evaluate()["metric"]`` (or the final one without ``evaluate``),
    ``out_dir/log.jsonl`` the log. A rerun with the same ``run_config`` resumes;
    with another it stops with the differences, before any computation
    (:func:`check_resume`; ``run_config["resolved"]`` holds the configs with
    their defaults filled in).

    ``after_update(step, progress)`` runs right after each optimizer step and
    before any checkpoint is written, so state it changes (an EMA teacher, a
    queue, a schedule held in module buffers) is saved consistently with the
    weights; a dict it returns joins that step's log record (logged whatever
    ``log_every``). ``on_step(record)`` runs last and only observes.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last, best, log_path = out / "last", out / "best", out / "log.jsonl"
    run_config = json.loads(json.dumps(run_config))  # JSON-normalised, as it will be compared
    resumed, unchecked = ckpt.resolve(last), None
    if resumed is not None:
        unchecked = check_resume(out, json.loads((resumed / RUN_CONFIG).read_text()), run_config)
        if unchecked and D.current().main:
            print(f"warning: {unchecked}", file=sys.stderr)

    def write(d: Path) -> None:
        write_model(d)
        (d / RUN_CONFIG).write_text(json.dumps(run_config, indent=1) + "\n")

    env = D.current()
    main = env.main  # rank 0 writes logs and checkpoints; one process: always
    optimizer = make_optimizer(module, cfg)
    state = {"step": 0, "seconds": 0.0, "best": None, "best_step": None, "bad_evals": 0, "done": False,
             "skipped_steps": 0, "bad_in_a_row": 0}
    if resumed is not None:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(resumed / "model.safetensors")))
        state = ckpt.load_checkpoint(resumed, optimizer)
        sampler.load_state_dict(state["sampler"])
        if main:
            ckpt.truncate_log(log_path, state["step"])
        if state["done"]:
            return state
    else:
        if main:
            log_path.unlink(missing_ok=True)
        torch.manual_seed(cfg.seed + env.rank)  # per-rank randomness (masks, augmentation) in data parallel
        random.seed(cfg.seed + env.rank)  # the global RNGs are checkpointed too: start them from the seed
        np.random.seed(cfg.seed + env.rank)
    D.broadcast_module(module)
    D.barrier()  # nobody starts while rank 0 may still be truncating the log
    trackers = make_trackers(cfg.tracking, out, run_config) if main else []
    trainable = [p for p in module.parameters() if p.requires_grad]

    def frac_at(step: int, seconds: float) -> float:
        p = step / cfg.max_steps
        if cfg.budget_seconds:
            p = max(p, seconds / cfg.budget_seconds)
        return min(1.0, p)

    def frac() -> float:
        return frac_at(state["step"], state["seconds"])

    total = cfg.max_steps if not cfg.budget_seconds else None
    bar = tqdm(total=total if total else 100, initial=state["step"] if total else int(100 * frac()),
               disable=not progress or not main, desc=desc, unit="step" if total else "%", dynamic_ncols=True)
    module.train()
    t_session = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as logf:
        def emit(rec: dict) -> None:
            if main:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()

        emit({"event": "resume" if resumed else "start", "step": state["step"], "config": run_config,
              **({"warning": unchecked} if unchecked else {})})
        try:
            while not state["done"]:
                for idx in sampler:
                    t0 = time.perf_counter()
                    step = state["step"]
                    lr = lr_at(frac(), cfg)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    batch = collate(idx, random.Random(cfg.seed * 1_000_003 + step))
                    loss, rec = loss_fn(batch, step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    # no-op for one process; "_weight": this rank's share when the loss is a mean over counts
                    lv = float(D.average_gradients(trainable, loss, rec.pop("_weight", None)))
                    gnorm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip))
                    finite = math.isfinite(gnorm) and math.isfinite(lv)
                    if finite:
                        optimizer.step()
                        state["bad_in_a_row"] = 0
                    else:
                        # one bad batch (a corrupt utterance, an overflow) must not cost the run: skip the
                        # update, count it; a streak means divergence, and the last checkpoint stays the good one
                        optimizer.zero_grad(set_to_none=True)
                        state["skipped_steps"] = state.get("skipped_steps", 0) + 1
                        state["bad_in_a_row"] = state.get("bad_in_a_row", 0) + 1
                        emit({"event": "nonfinite", "step": step + 1, "loss": repr(lv), "grad_norm": repr(gnorm),
                              "ids": batch.get("ids") if isinstance(batch, dict) else None,
                              "skipped_steps": state["skipped_steps"]})
                        tqdm.write(f"warning (step {step + 1}): loss {lv} / grad norm {gnorm}: update skipped")
                        if state["bad_in_a_row"] >= cfg.max_bad_steps:
                            raise FloatingPointError(
                                f"step {step + 1}: {state['bad_in_a_row']} non-finite losses/gradients in a row: "
                                f"training diverged; lower the learning rate ({cfg.lr}) or check the input. "
                                f"The last checkpoint ({last}) holds the weights before the streak")
                    state["step"] = step = step + 1
                    extra = None  # after_update may report what it did (e.g. a re-clustering) in this step's record
                    if after_update is not None:
                        with torch.no_grad():
                            extra = after_update(step, frac_at(step, D.all_max(state["seconds"] + time.perf_counter()
                                                                               - t0)))
                    # every rank counts the slowest rank's time, so all stop at the same step
                    state["seconds"] = D.all_max(state["seconds"] + time.perf_counter() - t0)
                    rec = {"step": step, "loss": round(lv, 5), "lr": lr, "grad_norm": round(gnorm, 4),
                           "batch": len(idx), "seconds": round(state["seconds"], 2), "progress": round(frac(), 4),
                           **rec, **(extra or {})}
                    if step % cfg.log_every == 0 or step == 1 or extra:
                        emit(rec)
                        for t in trackers:
                            t.log(rec)
                        for w in (warnings(rec) if warnings else []):
                            emit({"event": "warning", "step": step, "message": w})
                            tqdm.write(f"warning (step {step}): {w}")
                    bar.update(1 if total else int(100 * frac()) - bar.n)
                    bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.1e}", refresh=False)
                    at_end = frac() >= 1.0 or step >= cfg.max_steps
                    if evaluate is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or at_end):
                        better, metric = False, None  # other ranks only learn whether it improved
                        if main:  # the dev set is scored once, by rank 0
                            module.eval()
                            ev = evaluate()
                            module.train()
                            metric = ev["metric"]
                            better = state["best"] is None or metric < state["best"]
                            if better:
                                ckpt.write_dir(best, write)
                            emit({"event": "eval", "step": step, **ev, "improved": better})
                            for t in trackers:
                                t.log({"step": step, **{f"eval_{k}": v for k, v in ev.items()}})
                        better, = D.broadcast_flags(better)
                        state["bad_evals"] = 0 if better else state["bad_evals"] + 1
                        if better:
                            state.update(best=metric, best_step=step)
                        if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
                            at_end = True
                    elif evaluate is None and at_end:
                        state["best_step"] = step
                        if main:
                            ckpt.write_dir(best, write)
                    keep = bool(cfg.keep_every) and step % cfg.keep_every == 0
                    if at_end or step % cfg.ckpt_every == 0 or keep:
                        state.update(done=at_end, sampler=sampler.state_dict())
                        if main:
                            ckpt.save_checkpoint(last, write, optimizer, state)
                            if keep:
                                ckpt.save_checkpoint(out / "keep" / f"step-{step}", write, optimizer, state)
                        D.barrier()
                    if on_step is not None:
                        on_step(rec)
                    if at_end:
                        break
        finally:
            bar.close()
            for t in trackers:
                t.close()
    state["seconds_this_session"] = round(time.perf_counter() - t_session, 2)
    return state

