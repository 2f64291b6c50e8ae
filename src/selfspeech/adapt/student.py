"""Stage declarations for the Whisper student, shared by Pseudo2Real and Pseudo2Real-SC.

Each function returns a :class:`~selfspeech.adapt.stages.Stage` (name, inputs,
the config slice that keys its cache, the function); the pipeline hands it to
its :class:`~selfspeech.adapt.stages.StageRunner`:

- :func:`finetune_stage`   theta = FT(theta0, manifest), early-stopped on a dev manifest;
- :func:`tau_stage`        tau = theta_real - theta_pseudo (Lin et al. 2025, eq. 3); for LoRA students
  the difference of their merged deltas (:mod:`selfspeech.arith.adapters`);
- :func:`mean_tau_stage`   the mean of several taus (one per fine-tuning seed: less fine-tuning noise);
- :func:`corrected_model_stage`  theta + lambda * tau written as a model folder (eq. 4; exported by users);
- :func:`decode_stage`     greedy hypotheses of a model folder on a manifest;
- :func:`corrected_decode_stage` hypotheses of theta + lambda * tau without keeping that model:
  it is built in the stage folder and deleted once decoded, so a lambda sweep keeps only its
  hypotheses (a model of the student's size per lambda otherwise).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

from selfspeech.adapt.recipe import Recipe
from selfspeech.adapt.stages import Stage, StageRunner
from selfspeech.arith.lowrank import load_any
from selfspeech.arith.task_vector import apply_to_dir, diff_dirs


class Output(NamedTuple):
    """A stage's name and the path it produced (a model folder, a task vector file)."""

    stage: str
    path: str


def produce(S: StageRunner, stage: Stage) -> Output:
    """Run (or find cached) ``stage``; its result named for the stages that read it."""
    return Output(stage.name, S(stage))


@dataclass(frozen=True)
class Student:
    """What the student stages are built from: the recipe, theta0's folder and the fine-tune config."""

    recipe: Recipe
    init: str            # theta0: a transformers Whisper folder
    ft: Any              # FinetuneConfig
    progress: bool = True


def _scoped(scope: str) -> dict:
    # the "all" scope adds no key, so the cache keys of runs without scopes stay as they were
    return {} if scope == "all" else {"scope": scope}


def finetune_stage(st: Student, name: str, train: str, dev: str, inputs: tuple[str, ...] = ("pseudo",)) -> Stage:
    """``ft_<name>``: FT(theta0, train) early-stopped on dev; result: the best model's folder."""
    return Stage(f"ft_{name}", partial(_finetune, st, train, dev),
                 {"init": st.init, "ft": st.ft.to_dict(), "train": train, "dev": dev}, inputs)


def _finetune(st: Student, train: str, dev: str, d: Path) -> str:
    from selfspeech.train.whisper_ft import finetune

    return str(finetune(train, dev, st.init, d, st.ft, progress=st.progress))


def tau_stage(name: str, real: Output, pseudo: Output, frees: tuple[str, ...] = ()) -> Stage:
    """``name``: tau = theta_real - theta_pseudo as ``tau.safetensors``; ``frees``: inputs nothing else reads."""
    return Stage(name, partial(_tau, real.path, pseudo.path), {}, (real.stage, pseudo.stage), frees)


def _tau(real: str, pseudo: str, d: Path) -> str:
    return str(diff_dirs(real, pseudo).save(d / "tau.safetensors"))


def mean_tau_stage(name: str, taus: tuple[Output, ...], config: dict) -> Stage:
    """``name``: the mean of the task vectors ``taus`` as ``tau.safetensors`` (they stay: a rerun with other
    seeds reads them again)."""
    return Stage(name, partial(_mean_tau, tuple(t.path for t in taus)), config, tuple(t.stage for t in taus))


def _mean_tau(paths: tuple[str, ...], d: Path) -> str:
    total = load_any(paths[0])
    for p in paths[1:]:  # one tau in memory besides the sum
        total = total + load_any(p)
    return str((total * (1.0 / len(paths))).save(d / "tau.safetensors"))


def corrected_model_stage(name: str, base: Output, tau: Output, lam: float, scope: str) -> Stage:
    """``name``: the model folder theta_base + lam * tau[scope]."""
    return Stage(name, partial(_corrected, base.path, tau.path, lam, scope), {"lambda": lam} | _scoped(scope),
                 (base.stage, tau.stage))


def _corrected(base: str, tau: str, lam: float, scope: str, d: Path) -> str:
    # tau dense or low-rank (arith.lowrank); base a full student or a LoRA adapter folder (merged first)
    return str(apply_to_dir(base, load_any(tau).scope(scope), lam, d / "model"))


def decoding_key(st: Student) -> dict:
    """The decoding options a decode stage keys on: changing them re-decodes."""
    r = st.recipe.student
    return {"max_new_tokens": r.max_new_tokens, "max_repeats": r.max_repeats}


def decode_stage(st: Student, name: str, model: Output, manifest: str, trim: bool | None = None) -> Stage:
    """``decode_<name>``: greedy hypotheses (``hyp.jsonl``) of the model folder ``model`` on ``manifest``."""
    return Stage(f"decode_{name}", partial(_decode, st, model.path, manifest, trim),
                 {"model": model.path, "manifest": manifest, "trim": trim} | decoding_key(st), (model.stage,))


def corrected_decode_stage(st: Student, name: str, base: Output, tau: Output, lam: float, scope: str,
                           manifest: str, inputs: tuple[str, ...] = ()) -> Stage:
    """``decode_<name>``: hypotheses of theta_base + lam * tau[scope] on ``manifest``; the model is not kept."""
    return Stage(f"decode_{name}", partial(_decode_corrected, st, base.path, tau.path, lam, scope, manifest),
                 {"base": base.path, "lambda": lam, "manifest": manifest} | _scoped(scope) | decoding_key(st),
                 (base.stage, tau.stage, *inputs))


def _decode_corrected(st: Student, base: str, tau: str, lam: float, scope: str, manifest: str, d: Path) -> str:
    return decode_built(st, partial(_corrected, base, tau, lam, scope), manifest, d)


def decode_built(st: Student, build: Callable[[Path], str], manifest: str, d: Path) -> str:
    """Hypotheses of the model ``build(d)`` writes into ``d/model``, which is deleted once decoded."""
    try:  # a kill leaves the model behind: the rerun replaces it, and deletes it once decoded
        return _decode(st, build(d), manifest, None, d)
    finally:
        shutil.rmtree(d / "model", ignore_errors=True)


def _decode(st: Student, model_dir: str, manifest: str, trim: bool | None, d: Path) -> str:
    from selfspeech.accel import resolve_device
    from selfspeech.label.transcribe import transcribe_whisper

    r = st.recipe.student
    return str(transcribe_whisper(model_dir, manifest, d / "hyp.jsonl", trim_input=trim,
                                  batch_size=r.decode_batch_size, max_new_tokens=r.max_new_tokens,
                                  max_repeats=r.max_repeats, device=resolve_device(st.recipe.device)))
