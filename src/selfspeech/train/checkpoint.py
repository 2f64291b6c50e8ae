"""Resumable training checkpoints without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is a directory::

    <dir>/<model files>            written by the caller's ``write_model(dir)`` (e.g. save_pretrained)
    <dir>/train_state.safetensors  optimizer tensors ("optim/<param>/<key>") and RNG tensors ("rng/...")
    <dir>/train_state.json         optimizer param groups and scalars, RNG scalars, the caller's state
                                   (step, sampler position, early-stopping counters, config, ...)

Nothing is unpickled on load (``torch.load`` is never called), so a checkpoint
from elsewhere cannot run code. Directories are replaced atomically against a
killed process (:func:`selfspeech.data.atomic.write_dir`); a kill between its
two renames leaves ``.<name>.old``, which :func:`resolve` falls back to.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selfspeech.data.atomic import old_copy, write_dir
from selfspeech.data.atomic import write_json  # noqa: F401  (re-exported: ckpt.write_json in the loops)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


def resolve(path: Path) -> Path | None:
    """``path`` if it is a complete checkpoint, else its ``.old`` copy left by a kill, else None."""
    for p in (Path(path), old_copy(path)):
        if (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file():
            return p
    return None


# -- optimizer ---------------------------------------------------------------------------

def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors, JSON-able meta). Works for any torch optimizer."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"optim/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    tuples = sorted({k for g in state["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {"param_groups": groups, "scalars": scalars, "tuple_keys": tuples}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim/"):
            _, pid, k = name.split("/", 2)
            state.setdefault(int(pid), {})[k] = t
    for pid, d in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(d)
    groups = [{k: (tuple(v) if k in meta["tuple_keys"] else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- RNG ---------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """torch, numpy and Python global RNG states as (tensors, JSON-able meta)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout and masks drawn on the GPU
        tensors |= {f"rng/cuda/{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())}
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py_version, list(py_internal), py_gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k[9:]))]
    # a checkpoint of another machine: its GPU streams cannot be restored here (the CPU ones are)
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = meta["python"]
    random.setstate((version, tuple(internal), gauss_py))


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step``: a killed run wrote them after its last checkpoint (the last maybe half)."""
    from selfspeech.data.manifest import write_manifest

    if path.is_file():
        recs = []
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:
                continue
        write_manifest(path, (r for r in recs if r.get("step", 0) <= step))


# -- checkpoints -------------------------------------------------------------------------

def save_checkpoint(out: Path, write_model: Callable[[Path], None], optimizer: torch.optim.Optimizer | None,
                    state: dict) -> Path:
    """Atomically write model (``write_model``), optimizer, RNG and ``state`` (JSON-able) to ``out``."""
    def write(tmp: Path) -> None:
        write_model(tmp)
        tensors, meta = capture_rng()
        full = {"rng": meta, "state": state, "optimizer": None}
        if optimizer is not None:
            opt_tensors, full["optimizer"] = flatten_optimizer(optimizer.state_dict())
            tensors.update(opt_tensors)
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(full, indent=1) + "\n")

    return write_dir(out, write)


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore optimizer and RNG states from checkpoint ``path``; returns the caller's ``state``.

    The model is the caller's to load (it wrote it). Raises FileNotFoundError if
    ``path`` is not a complete checkpoint.
    """
    if (p := resolve(path)) is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint ({STATE_JSON} + {STATE_TENSORS})")
    full = json.loads((p / STATE_JSON).read_text())
    tensors = load_file(str(p / STATE_TENSORS))
    if optimizer is not None and full["optimizer"] is not None:
        optimizer.load_state_dict(unflatten_optimizer(tensors, full["optimizer"]))
    restore_rng(tensors, full["rng"])
    return full["state"]
