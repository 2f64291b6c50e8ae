"""The one training loop of the toolkit (nanoGPT style): every trainer runs its updates here.

What differs between methods is passed in: ``loss_fn(batch, step) -> (loss,
record)`` (the task modules of :mod:`selfspeech.objectives`), the batch sampler,
``collate(indices, rng)``, an optional ``evaluate() -> {"metric":
lower-is-better, ...}``, and how to write (``write_model(dir)``) and read back
(``load_model(dir)``) the model. The loop owns the rest: AdamW (fused where
available), warm-up in steps or as a fraction of the budget, then linear, cosine
or no decay, gradient clipping (0 = off), budgets in steps, epochs (turned into
steps through the sampler) or seconds, the non-finite loss/gradient guard,
atomic checkpoints (weights, AdamW moments, sampler position, RNG) with
``keep_every`` copies, resume after a kill to the weights an uninterrupted run
reaches, forking from a kept checkpoint, a JSONL log (plus TensorBoard/MLflow
when asked), and a progress bar with ETA.

Device and precision are handled here once for every method
(:mod:`selfspeech.accel`): the module moves to ``cfg.device``, each batch follows
it (pinned, non-blocking), the loss runs under bf16 or fp16 autocast (fp16 with
a gradient scaler) while weights, AdamW moments and checkpoints stay fp32, TF32
matmuls are on for GPUs, and ``grad_accum``, ``grad_checkpointing``, ``compile``
and ``num_workers`` (:mod:`selfspeech.train.loader`) trade memory and host time
for speed. Checkpoints are device-free: a run started on a GPU resumes on a CPU
and the other way round.

A step or epoch budget is bit-reproducible; a time budget is not.

Files in ``out_dir``: ``best/`` (the best model by ``evaluate()["metric"]``, or the
final one), ``last/`` (the resumable checkpoint; removed when the run finishes
unless ``keep_last``), ``keep/step-N/``, ``log.jsonl`` and ``finished.json``
(the final state: a rerun of a finished run returns at once).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from selfspeech.accel import PRECISIONS, resolve_device, resolve_precision
from selfspeech.config import check_ranges, checked, invalid
from selfspeech.train import checkpoint as ckpt
from selfspeech.train import distributed as D
from selfspeech.train.loader import BatchLoader
from selfspeech.train.update import Update, place_module
from selfspeech.train.runs import (FINISHED, RUN_CONFIG, check_resume, config_diff, finished_state,  # noqa: F401
                                   fork_checkpoint, normalised)
from selfspeech.train.tracking import make_trackers


@dataclass(frozen=True)
class LoopConfig:
    lr: float = checked(5e-4, gt=0)  # peak learning rate (AdamW), reached after warm-up
    weight_decay: float = checked(0.01, ge=0)      # AdamW, on >= 2-D weights only (nanoGPT)
    betas: tuple[float, float] = (0.9, 0.98)       # wav2vec 2.0 / BEST-RQ; Whisper fine-tuning uses (0.9, 0.999)
    fused: bool = True                             # fused AdamW kernel where torch has one (one pass over the weights)
    warmup_fraction: float = checked(0.08, ge=0, lt=1)  # of the budget (wav2vec 2.0 base: 32k of 400k steps) ...
    warmup_steps: int | None = checked(None, ge=0)      # ... or in updates (takes precedence; needs a step budget)
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warm-up: decay to 0 at the end, or none
    grad_clip: float = checked(10.0, ge=0)         # max global grad norm; 0 turns clipping off
    max_steps: int | None = checked(1000, ge=1)    # updates (a cap when max_epochs or budget_seconds is set)
    max_epochs: int | None = checked(None, ge=1)   # passes over the sampler, turned into steps up front
    budget_seconds: float | None = checked(None, gt=0)  # stop on time instead (the same CPU time for every method)
    seed: int = 0  # seeds the batch order, the loader and the torch/numpy/random generators
    log_every: int = checked(10, ge=1)  # steps between records of the JSONL log and the trackers
    ckpt_every: int = checked(100, ge=1)  # steps between checkpoints to last/ (also at each evaluation and the end)
    keep_every: int = checked(0, ge=0)             # also keep every N-th step's checkpoint as keep/step-N (0: none),
    #                                                e.g. to fork a run (fork_from) or to compare stages
    keep_last: bool = True                         # keep last/ (weights + AdamW moments) once the run has finished
    eval_every: int = checked(0, ge=0)             # 0: evaluate only at the end
    patience: int | None = checked(None, ge=1)     # stop after this many evaluations without improvement
    max_bad_steps: int = checked(5, ge=1)          # non-finite loss/gradient: skip the update; stop after this many in a row
    tensorboard: bool = False                      # shorthand for tracking: [tensorboard]
    tracking: tuple[str, ...] = ()                 # backends mirroring the JSONL log: tensorboard, mlflow
    device: str = "auto"                           # auto|cpu|cuda|cuda:N; auto: CUDA when present (torchrun: LOCAL_RANK)
    precision: str = "auto"                        # auto|fp32|bf16|fp16 autocast; auto: bf16 on GPUs that have it
    grad_accum: int = checked(1, ge=1)             # micro-batches per update: memory / k, the same update
    num_workers: int = checked(0, ge=0)            # loader processes collating the next batches (0: in-process)
    grad_checkpointing: bool = False               # recompute layer activations in backward: less memory, ~30% slower
    compile: bool = False                          # torch.compile the networks' repeated blocks (layers)

    def __post_init__(self):
        check_ranges(self)
        if self.precision not in PRECISIONS:
            raise invalid("precision", self.precision, "not a precision", f"choose {', '.join(PRECISIONS)}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise invalid("schedule", self.schedule, "not a schedule", "choose linear, cosine or constant")
        if self.max_steps is None and self.max_epochs is None:
            raise invalid("max_steps", None, "unset and so is max_epochs", "give a step or an epoch budget")
        if self.warmup_steps is not None and self.budget_seconds is not None:
            raise invalid("warmup_steps", self.warmup_steps, "set with a time budget (budget_seconds)",
                          "give warmup_fraction instead, or a step budget")
        object.__setattr__(self, "tracking", tuple(self.tracking) + (("tensorboard",) if self.tensorboard
                                                                     and "tensorboard" not in self.tracking else ()))


# -- schedule and optimizer ----------------------------------------------------------------

def total_steps(cfg: LoopConfig, sampler) -> int:
    """Updates the budget allows: ``max_epochs`` of this sampler's batches, capped by ``max_steps``."""
    if cfg.max_epochs is None:
        return int(cfg.max_steps)
    n = sum(len(sampler.batches(e)) for e in range(cfg.max_epochs))
    return min(n, cfg.max_steps) if cfg.max_steps is not None else n


def progress_at(cfg: LoopConfig, step: int, total: int, seconds: float = 0.0) -> float:
    """Fraction of the budget used after ``step`` updates and ``seconds`` of training, in [0, 1]."""
    p = step / total
    if cfg.budget_seconds:
        p = max(p, seconds / cfg.budget_seconds)
    return min(1.0, p)


def lr_at(cfg: LoopConfig, step: int, total: int, seconds: float = 0.0) -> float:
    """Learning rate of update ``step`` (0-based) of ``total``: linear warm-up, then ``cfg.schedule``.

    The warm-up factor counts the update being made, ``(step + 1) / warm-up``, so
    the first update already learns; the decay starts from the peak right after
    warm-up and ends at 0 where the budget ends.
    """
    if cfg.budget_seconds is None:  # a step budget: integer arithmetic, the same on every machine
        warm = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_fraction * total
        if step < warm:
            return min(cfg.lr, cfg.lr * (step + 1) / warm)
        rest = min(1.0, (step - warm) / max(1, total - warm))
    else:
        w, now = cfg.warmup_fraction, progress_at(cfg, step, total, seconds)
        if now < w:
            return cfg.lr * min(1.0, progress_at(cfg, step + 1, total, seconds) / w)
        rest = min(1.0, (now - w) / max(1e-9, 1 - w))
    if cfg.schedule == "constant":
        return cfg.lr
    return cfg.lr * ((1.0 - rest) if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * rest)))


def make_optimizer(module: torch.nn.Module, cfg: LoopConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings (1-D parameters); tied weights listed once."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas)}
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError):  # no fused kernel for this device or torch version
            pass
    return torch.optim.AdamW(groups, foreach=True, **kw)


def load_safetensors(module: torch.nn.Module) -> Callable[[Path], None]:
    """The default ``load_model``: ``model.safetensors`` of a checkpoint into ``module``, strictly."""
    def load(d: Path) -> None:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(d / "model.safetensors")))
    return load


# -- the loop ------------------------------------------------------------------------------

def train_loop(module: torch.nn.Module, loss_fn: Callable, sampler, collate: Callable, cfg: LoopConfig,
               out_dir: str | Path, write_model: Callable[[Path], None], run_config: dict,
               evaluate: Callable[[], dict] | None = None, warnings: Callable[[dict], list[str]] | None = None,
               progress: bool = True, desc: str = "train", on_step: Callable[[dict], None] | None = None,
               after_update: Callable[[int, float], dict | None] | None = None,
               load_model: Callable[[Path], None] | None = None, info: dict | None = None,
               fork_from: str | Path | None = None, fork_may_differ: tuple[str, ...] = ()) -> dict:
    """Train ``module`` in place; returns the final state (``step``, ``best``, ``seconds``...).

    A rerun with the same ``run_config`` resumes (or returns at once if the run
    finished); with another it stops with the differences, before any
    computation (:func:`check_resume`). ``fork_from``: a kept checkpoint of
    another run to start from when ``out_dir`` holds no checkpoint yet
    (:func:`fork_checkpoint`). ``info`` joins the log's start record.

    ``after_update(step, progress)`` runs right after each optimizer step and
    before any checkpoint is written, so state it changes (an EMA teacher, a
    queue, a schedule held in module buffers) is saved consistently with the
    weights; a dict it returns joins that step's log record (logged whatever
    ``log_every``). ``on_step(record)`` runs last and only observes.
    """
    run = _Run(module, loss_fn, sampler, collate, cfg, Path(out_dir), write_model, normalised(run_config),
               evaluate, warnings, progress, desc, on_step, after_update,
               load_model or load_safetensors(module), info or {})
    return run.run(fork_from, fork_may_differ)


class _Run:
    """One session of :func:`train_loop`; each phase of an update is one method."""

    def __init__(self, module, loss_fn, sampler, collate, cfg: LoopConfig, out: Path, write_model, run_config,
                 evaluate, warnings, progress, desc, on_step, after_update, load_model, info):
        self.module, self.sampler, self.cfg = module, sampler, cfg  # loss_fn: the update's; collate: the loader's
        self.out, self.write_model, self.run_config = out, write_model, run_config
        self.evaluate, self.warnings, self.on_step, self.after_update = evaluate, warnings, on_step, after_update
        self.load_model, self.info, self.progress, self.desc = load_model, info, progress, desc
        self.last, self.best, self.log_path = out / "last", out / "best", out / "log.jsonl"
        self.env = D.current()
        self.main = self.env.main  # rank 0 writes logs and checkpoints; one process: always
        self.device = resolve_device(cfg.device)
        self.update = Update(loss_fn, self.device, resolve_precision(cfg.precision, self.device))
        self.prec, self.scaler = self.update.prec, self.update.scaler
        self.loader = BatchLoader(collate, cfg.seed, cfg.grad_accum, cfg.num_workers,
                                  pin_memory=self.device.type == "cuda")  # page-locked: the copy overlaps compute
        self.total = total_steps(cfg, sampler)
        self.evaluated = False
        self.state = {"step": 0, "seconds": 0.0, "best": None, "best_step": None, "bad_evals": 0, "done": False,
                      "stopped_early": False, "skipped_steps": 0, "bad_in_a_row": 0}

    def write(self, d: Path) -> None:
        self.write_model(d)
        (d / RUN_CONFIG).write_text(json.dumps(self.run_config, indent=1) + "\n")

    # -- start: fresh, resumed or forked
    def start(self, fork_from, fork_may_differ) -> tuple[bool, str | None]:
        self.out.mkdir(parents=True, exist_ok=True)
        if fork_from is not None and self.main and ckpt.resolve(self.last) is None:
            fork_checkpoint(fork_from, self.out, self.run_config, self.write, self.load_model, fork_may_differ)
        D.barrier()
        resumed, unchecked = ckpt.resolve(self.last), None
        if resumed is not None:
            unchecked = check_resume(self.out, json.loads((resumed / RUN_CONFIG).read_text()), self.run_config)
            if unchecked and self.main:
                print(f"warning: {unchecked}", file=sys.stderr)
        place_module(self.module, self.device, self.cfg.grad_checkpointing, self.cfg.compile)
        self.optimizer = make_optimizer(self.module, self.cfg)
        if resumed is not None:
            self.load_model(resumed)  # safetensors load on the CPU; load_state_dict copies onto the device
            self.state = ckpt.load_checkpoint(resumed, self.optimizer)  # also restores the RNG states
            self.sampler.load_state_dict(self.state["sampler"])
            if self.scaler is not None and self.state.get("scaler"):
                self.scaler.load_state_dict(self.state["scaler"])
            if self.main:
                ckpt.truncate_log(self.log_path, self.state["step"])
        else:
            if self.main:
                self.log_path.unlink(missing_ok=True)
            seed = self.cfg.seed + self.env.rank  # per-rank randomness (masks, augmentation) in data parallel
            torch.manual_seed(seed)
            random.seed(seed)  # the global RNGs are checkpointed too: start them from the seed
            np.random.seed(seed)
        D.broadcast_module(self.module)
        D.barrier()  # nobody starts while rank 0 may still be truncating the log
        return resumed is not None, unchecked

    def run(self, fork_from=None, fork_may_differ=()) -> dict:
        from tqdm.auto import tqdm

        if (done := finished_state(self.out, self.run_config)) is not None:
            # the caller may export the module after the loop (an encoder, a speaker model): give it the
            # run's final weights, as a resume of a finished checkpoint did (best/ when last/ was dropped)
            final = ckpt.resolve(self.last) or (self.best if (self.best / "model.safetensors").is_file() else None)
            if final is not None:
                self.load_model(final)
            return done
        resumed, unchecked = self.start(fork_from, fork_may_differ)
        if self.state["done"]:
            return self._finish()
        self.trackers = make_trackers(self.cfg.tracking, self.out, self.run_config) if self.main else []
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        timed = bool(self.cfg.budget_seconds)
        self.bar = tqdm(total=100 if timed else self.total,
                        initial=int(100 * self.frac()) if timed else self.state["step"],
                        disable=not self.progress or not self.main, desc=self.desc, unit="%" if timed else "step",
                        dynamic_ncols=True)
        self.module.train()
        t_session = time.perf_counter()
        with open(self.log_path, "a", encoding="utf-8") if self.main else contextlib.nullcontext() as self.logf:
            self.emit({"event": "resume" if resumed else "start", "step": self.state["step"],
                       "total_steps": self.total, "config": self.run_config, **self.info,
                       "device": str(self.device), "precision": self.prec.name,
                       **({"warning": unchecked} if unchecked else {})})
            try:
                while not self.state["done"]:
                    self.epoch()
            finally:
                self.bar.close()
                for t in self.trackers:
                    t.close()
        self.state["seconds_this_session"] = round(time.perf_counter() - t_session, 2)
        return self._finish()

    def epoch(self) -> None:
        """The rest of the sampler's current epoch, or until the run ends.

        The loop advances the sampler's position as it consumes batches (as
        iterating the sampler does), so a checkpoint records exactly the batches
        used, whatever the loader's workers have prepared ahead."""
        s = self.sampler
        todo = s.batches(s.epoch)[s.position:]
        for idx, micro in zip(todo, self.loader(todo, self.state["step"])):
            s.position += 1
            if self.step(idx, micro):
                return
        s.epoch, s.position = s.epoch + 1, 0

    def _finish(self) -> dict:
        """Record the final state; drop last/ (weights + optimizer moments) unless asked to keep it."""
        if self.main:
            ckpt.write_json(self.out / FINISHED, {"state": self.state, "run_config": self.run_config})
            if not self.cfg.keep_last:
                for d in (self.last, self.last.with_name(f".{self.last.name}.old")):
                    shutil.rmtree(d, ignore_errors=True)
        D.barrier()
        return self.state

    def emit(self, rec: dict) -> None:
        if self.main:
            self.logf.write(json.dumps(rec) + "\n")
            self.logf.flush()

    def frac(self, step: int | None = None, seconds: float | None = None) -> float:
        return progress_at(self.cfg, self.state["step"] if step is None else step, self.total,
                           self.state["seconds"] if seconds is None else seconds)

    # -- one update
    def step(self, idx: list[int], micro: list[tuple[int, object]]) -> bool:
        """One update on the batch of items ``idx`` (collated as ``micro``); returns whether the run ends here."""
        t0 = time.perf_counter()
        st, cfg = self.state, self.cfg
        step = st["step"]
        lr = lr_at(cfg, step, self.total, st["seconds"])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, rec, weight = self.update(micro, step, self.trainable)
        # no-op for one process; weight: this rank's share when the loss is a mean over counts
        lv = float(D.average_gradients(self.trainable, loss, weight))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
        if self.scaler is not None and math.isfinite(lv):
            # fp16: an overflowed gradient is the scaler's business (it skips the step and halves the scale)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            st["bad_in_a_row"] = 0
        elif math.isfinite(gnorm) and math.isfinite(lv):
            self.optimizer.step()
            st["bad_in_a_row"] = 0
        else:
            if self.scaler is not None:
                self.scaler.update()
            self.skip(step, lv, gnorm, [b for _, b in micro])
        st["step"] = step = step + 1
        extra = None  # after_update may report what it did (e.g. a re-clustering) in this step's record
        if self.after_update is not None:
            with torch.no_grad():
                extra = self.after_update(step, self.frac(step, D.all_max(st["seconds"] + time.perf_counter() - t0)))
        # every rank counts the slowest rank's time, so all stop at the same step
        st["seconds"] = D.all_max(st["seconds"] + time.perf_counter() - t0)
        rec = {"step": step, "epoch": getattr(self.sampler, "epoch", None), "loss": round(lv, 5), "lr": lr,
               "grad_norm": round(gnorm, 4), "batch": len(idx), "seconds": round(st["seconds"], 2),
               "progress": round(self.frac(), 4), **rec, **(extra or {})}
        if self.scaler is not None:
            rec["loss_scale"] = self.scaler.get_scale()
        if step % cfg.log_every == 0 or step == 1 or extra:
            self.log_record(rec)
        self.bar.update(int(100 * self.frac()) - self.bar.n if cfg.budget_seconds else 1)
        self.bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lr:.1e}", best=st["best"], refresh=False)
        at_end = self.frac() >= 1.0 or step >= self.total
        at_end = self.maybe_evaluate(step, at_end)
        self.maybe_checkpoint(step, at_end)
        if self.on_step is not None:
            self.on_step(rec)
        return at_end

    def skip(self, step: int, lv: float, gnorm: float, batches: list) -> None:
        """A non-finite loss or gradient: no update, counted and logged; a streak stops the run.

        One bad batch (a corrupt utterance, an overflow) must not cost the run; a
        streak means divergence, and the last checkpoint stays the good one."""
        from tqdm.auto import tqdm

        st = self.state
        self.optimizer.zero_grad(set_to_none=True)
        st["skipped_steps"] = st.get("skipped_steps", 0) + 1
        st["bad_in_a_row"] = st.get("bad_in_a_row", 0) + 1
        ids = [i for b in batches if isinstance(b, dict) for i in (b.get("ids") or [])]
        self.emit({"event": "nonfinite", "step": step + 1, "loss": repr(lv), "grad_norm": repr(gnorm),
                   "ids": ids or None, "skipped_steps": st["skipped_steps"]})
        tqdm.write(f"warning (step {step + 1}): loss {lv} / grad norm {gnorm}: update skipped")
        if st["bad_in_a_row"] >= self.cfg.max_bad_steps:
            raise FloatingPointError(
                f"step {step + 1}: {st['bad_in_a_row']} non-finite losses/gradients in a row: training diverged; "
                f"lower the learning rate ({self.cfg.lr}) or check the input. The last checkpoint ({self.last}) "
                "holds the weights before the streak")

    def log_record(self, rec: dict) -> None:
        from tqdm.auto import tqdm

        self.emit(rec)
        for t in self.trackers:
            t.log(rec)
        for w in (self.warnings(rec) if self.warnings else []):
            self.emit({"event": "warning", "step": rec["step"], "message": w})
            tqdm.write(f"warning (step {rec['step']}): {w}")

    def maybe_evaluate(self, step: int, at_end: bool) -> bool:
        """Score the dev set when due, keep the best model; returns whether the run ends (patience)."""
        st, cfg = self.state, self.cfg
        if self.evaluate is None:
            if at_end:
                st["best_step"] = step
                if self.main:
                    ckpt.write_dir(self.best, self.write)
            return at_end
        if not ((cfg.eval_every and step % cfg.eval_every == 0) or at_end):
            return at_end
        self.evaluated = True  # the early-stopping counters just changed: checkpoint them with the weights
        better, metric = False, None  # other ranks only learn whether it improved
        if self.main:  # the dev set is scored once, by rank 0
            self.module.eval()
            ev = self.evaluate()
            self.module.train()
            metric = ev["metric"]
            better = st["best"] is None or metric < st["best"]
            if better:
                ckpt.write_dir(self.best, self.write)
            self.emit({"event": "eval", "step": step, **ev, "improved": better})
            for t in self.trackers:
                t.log({"step": step, **{f"eval_{k}": v for k, v in ev.items()}})
        better, = D.broadcast_flags(better)
        st["bad_evals"] = 0 if better else st["bad_evals"] + 1
        if better:
            st.update(best=metric, best_step=step)
        if cfg.patience is not None and st["bad_evals"] >= cfg.patience and not at_end:
            st["stopped_early"] = True
            return True
        return at_end

    def maybe_checkpoint(self, step: int, at_end: bool) -> None:
        cfg = self.cfg
        keep = bool(cfg.keep_every) and step % cfg.keep_every == 0
        evaluated, self.evaluated = self.evaluated, False
        if at_end or step % cfg.ckpt_every == 0 or keep or evaluated:
            self.state.update(done=at_end, sampler=self.sampler.state_dict())
            if self.scaler is not None:
                self.state["scaler"] = self.scaler.state_dict()
            if self.main:
                ckpt.save_checkpoint(self.last, self.write, self.optimizer, self.state)
                if keep:
                    ckpt.save_checkpoint(self.out / "keep" / f"step-{step}", self.write, self.optimizer, self.state)
            D.barrier()
