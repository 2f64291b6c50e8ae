"""Task vectors between LoRA students: tau in weight space from merged deltas (Pseudo2Real with LoRA).

Pseudo2Real (Lin et al. 2025, arXiv 2510.08047, eq. 3) needs tau = theta_sr - theta_sp.
For two LoRA students (Hu et al. 2021) of one frozen base W, theta = W + delta with
``delta = (alpha / r) B A`` per adapted matrix (:func:`selfspeech.models.lora.merged_delta`),
so tau = delta_sr - delta_sp exactly, over the adapted matrices only: W cancels, and the
factors themselves cannot be subtracted. tau is a :class:`TaskVector` keyed by the
base model's parameter names, so it applies to a full model folder or to a LoRA
target (its merged weights, :func:`merged_state`) alike.

Both students must be the same kind of model: two adapters of one base with one
rank, scale and set of adapted layers, or two full models. What does not match is
named in one line before any tensor is read.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from selfspeech.arith.task_vector import TaskVector, TaskVectorError, _select, load_state
from selfspeech.models.lora import AdapterInfo, check_adapter, is_adapter_dir, merged_delta

# files of an adapter folder that are the adapter itself (a merged model folder gets the base's weights)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def merged_state(adapter_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of a LoRA student: base weights plus its merged deltas (base dtype)."""
    _, b = check_adapter(adapter_dir, base)
    state = load_state(b)
    for name, d in merged_delta(adapter_dir).items():
        state[name] = (state[name].float() + d).to(state[name].dtype)
    return state


def _same_base(ia: AdapterInfo, ib: AdapterInfo, a_base: Path, b_base: Path) -> None:
    if os.path.realpath(a_base) != os.path.realpath(b_base):
        raise TaskVectorError(f"{ia.path} was made for base model {a_base} but {ib.path} for {b_base}; "
                              "tau needs two students of one base model")


def check_pair(a: str | os.PathLike, b: str | os.PathLike, base: str | os.PathLike | None = None) -> None:
    """Refuse, in one line, two students tau cannot be taken between: an adapter and a full model,
    adapters of different bases, ranks, scales or adapted layers. Full-model pairs pass (checked later)."""
    ka, kb = is_adapter_dir(a), is_adapter_dir(b)
    if ka != kb:
        lora, full = (a, b) if ka else (b, a)
        raise TaskVectorError(f"{lora} is a LoRA adapter but {full} a full model: take tau between two students "
                              "of the same kind (both LoRA with one rank, or both fully fine-tuned)")
    if not ka:
        return
    (ia, ba), (ib, bb) = check_adapter(a, base), check_adapter(b, base)
    _same_base(ia, ib, ba, bb)
    for what, va, vb in (("rank", ia.rank, ib.rank), ("alpha", ia.alpha, ib.alpha)):
        if va != vb:
            raise TaskVectorError(f"LoRA {what} differs: {va:g} in {a} but {vb:g} in {b}; "
                                  f"train both students with one LoRA {what}")
    if set(ia.shapes) != set(ib.shapes):
        n = sorted(set(ia.shapes) ^ set(ib.shapes))[0]
        raise TaskVectorError(f"the students adapt different layers ({n!r} is adapted in only one of {a}, {b}); "
                              "train both with the same LoRA target modules and place")


def diff_adapters(a: str | os.PathLike, b: str | os.PathLike, include: str | None = None,
                  exclude: str | None = None, base: str | os.PathLike | None = None) -> TaskVector:
    """tau = delta(a) - delta(b) over the adapted matrices, (out, in) fp32 each; :func:`check_pair` first."""
    check_pair(a, b, base)
    da, db = merged_delta(a), merged_delta(b)
    return TaskVector({n: da[n] - db[n] for n in _select(sorted(da), include, exclude)})


def companion_files(model_dir: str | os.PathLike, base: str | os.PathLike | None = None) -> list[Path]:
    """The files besides the weights that a merged copy of ``model_dir`` needs: the model's configs
    and processor files; for an adapter folder, its base's configs overlaid with its own files."""
    d = Path(model_dir)

    def others(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
        return {f.name: f for f in sorted(folder.iterdir()) if f.is_file() and f.name not in skip
                and not f.name.startswith(("model.safetensors", "model-"))}

    if not is_adapter_dir(d):
        return list(others(d).values())
    _, b = check_adapter(d, base)
    return list({**others(b), **others(d, ADAPTER_FILES)}.values())
