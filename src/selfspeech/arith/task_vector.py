"""Task vectors (Ilharco et al. 2023) as used by Pseudo2Real (Lin et al. 2025, eq. 3-4).

A :class:`TaskVector` is an immutable map ``parameter name -> fp32 tensor``.
``TaskVector.between(a, b)`` is ``a - b`` (e.g. tau = theta_sr - theta_sp);
vectors add, subtract and scale; ``apply(state, lam)`` returns
``state + lam * tau``. Arithmetic is done in fp32 whatever the checkpoint's
dtype, and the result is cast back to it.

Tied weights are counted once. Whisper's ``proj_out.weight`` *is*
``model.decoder.embed_tokens.weight``; a state dict taken from a live model
lists the one tensor under both names, and adding tau once per name would add
it twice. (The public Pseudo2Real code avoids that: it walks
``named_parameters()``, which lists a tied tensor once; its own bug is in its
precomputed-vector path, which adds ``weight * tau`` and then calls its merge
on the same model, so the whole vector is applied twice.) Here aliases are
detected by storage (same data pointer) or declared by the caller, the vector
keeps one canonical name, and :func:`apply` writes every alias from that one sum.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from selfspeech.data.atomic import atomic_path, write_dir

# Whisper ties its output projection to the decoder's token embedding.
KNOWN_TIES = {"proj_out.weight": "model.decoder.embed_tokens.weight"}

# Named parameter scopes as (include, exclude) regexes for transformers encoder-decoder
# checkpoints: "encoder" = acoustic model, "decoder" = the rest (decoder, tied output).
SCOPES: dict[str, tuple[str | None, str | None]] = {
    "all": (None, None),
    "encoder": (r"^model\.encoder\.", None),
    "decoder": (None, r"^model\.encoder\."),
}


class TaskVectorError(ValueError):
    """Incompatible checkpoints or a non-finite tensor; the message names the tensor."""


def tied_aliases(state: Mapping[str, torch.Tensor], declared: Mapping[str, str] = KNOWN_TIES) -> dict[str, str]:
    """alias -> canonical name: tensors sharing storage, plus declared ties present in ``state``."""
    out: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in first:
            out[name] = first[key]
        elif key is not None:
            first[key] = name
    for alias, canon in declared.items():
        if alias in state and canon in state and alias not in out:
            out[alias] = canon
    return out


def _canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ties = tied_aliases(state)
    return {k: v for k, v in state.items() if k not in ties}


def _check_finite(name: str, t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise TaskVectorError(f"{where}: tensor {name!r} contains NaN or inf")


def _select(names: Iterable[str], include: str | None, exclude: str | None) -> list[str]:
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    return [n for n in names if (inc is None or inc.search(n)) and not (exc and exc.search(n))]


@dataclass(frozen=True)
class TaskVector:
    """Parameter name -> fp32 delta. Build with :meth:`between`; combine with + - *."""

    deltas: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def between(cls, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], include: str | None = None,
                exclude: str | None = None, where: tuple[str, str] = ("a", "b")) -> "TaskVector":
        """``a - b`` over the floating-point tensors of two checkpoints of one architecture.

        ``include``/``exclude`` are regular expressions on parameter names
        (``include="encoder"`` keeps encoder-only). Raises TaskVectorError
        naming the first tensor whose name set, shape or finiteness differs.
        """
        a, b = _canonical(a), _canonical(b)
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_a or only_b:
            n = (only_a or only_b)[0]
            raise TaskVectorError(f"checkpoints differ in architecture: tensor {n!r} is only in "
                                  f"{where[0] if only_a else where[1]} ({len(only_a)} + {len(only_b)} such tensors)")
        deltas = {}
        for name in _select(sorted(a), include, exclude):
            ta, tb = a[name], b[name]
            if ta.shape != tb.shape:
                raise TaskVectorError(f"tensor {name!r} has shape {tuple(ta.shape)} in {where[0]} "
                                      f"but {tuple(tb.shape)} in {where[1]}")
            if not ta.is_floating_point():
                continue  # integer buffers (e.g. position ids) are not learned
            _check_finite(name, ta, where[0])
            _check_finite(name, tb, where[1])
            deltas[name] = ta.detach().float() - tb.detach().float()
        return cls(deltas)

    def filter(self, include: str | None = None, exclude: str | None = None) -> "TaskVector":
        return TaskVector({n: self.deltas[n] for n in _select(self.deltas, include, exclude)})

    def scope(self, name: str) -> "TaskVector":
        """The part of the vector in a named scope of :data:`SCOPES` (``all``, ``encoder``, ``decoder``)."""
        if name not in SCOPES:
            raise TaskVectorError(f"unknown scope {name!r}; choose one of {', '.join(SCOPES)}")
        out = self.filter(*SCOPES[name])
        if not len(out):
            raise TaskVectorError(f"scope {name!r} selects no parameter of this vector")
        return out

    def _zip(self, other: "TaskVector", op) -> "TaskVector":
        if set(self.deltas) != set(other.deltas):
            diff = sorted(set(self.deltas) ^ set(other.deltas))
            raise TaskVectorError(f"task vectors cover different tensors, e.g. {diff[0]!r}")
        for n in self.deltas:
            if self.deltas[n].shape != other.deltas[n].shape:
                raise TaskVectorError(f"tensor {n!r}: shapes {tuple(self.deltas[n].shape)} and "
                                      f"{tuple(other.deltas[n].shape)} differ")
        return TaskVector({n: op(v, other.deltas[n]) for n, v in self.deltas.items()})

    def __add__(self, other: "TaskVector") -> "TaskVector":
        return self._zip(other, torch.add)

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        return self._zip(other, torch.sub)

    def __mul__(self, lam: float) -> "TaskVector":
        if not isinstance(lam, (int, float)) or not math.isfinite(lam):
            return NotImplemented
        return TaskVector({n: v * float(lam) for n, v in self.deltas.items()})

    __rmul__ = __mul__

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __len__(self) -> int:
        return len(self.deltas)

    def norm(self) -> float:
        """Global L2 norm (fp64 accumulation)."""
        return math.sqrt(sum(float(v.double().pow(2).sum()) for v in self.deltas.values()))

    def numel(self) -> int:
        return sum(v.numel() for v in self.deltas.values())

    def apply(self, state: Mapping[str, torch.Tensor], lam: float = 1.0) -> dict[str, torch.Tensor]:
        """A new state dict ``state + lam * tau`` (each tensor in its original dtype).

        Every alias of a tied tensor receives the same single sum. Tensors tau
        does not cover are copied unchanged. Raises TaskVectorError when tau
        names a tensor ``state`` lacks or whose shape differs.
        """
        ties = tied_aliases(state)
        canon_of = {n: ties.get(n, n) for n in state}
        present = set(canon_of.values())
        for n, d in self.deltas.items():
            if n not in present:
                raise TaskVectorError(f"task vector tensor {n!r} is not in the checkpoint")
            if state[n].shape != d.shape:
                raise TaskVectorError(f"tensor {n!r}: checkpoint shape {tuple(state[n].shape)}, "
                                      f"task vector shape {tuple(d.shape)}")
        new: dict[str, torch.Tensor] = {}
        for n in present:
            t = state[n]
            new[n] = (t.float() + float(lam) * self.deltas[n]).to(t.dtype) if n in self.deltas else t.clone()
            _check_finite(n, new[n], "result")
        return {n: new[canon_of[n]] for n in state}

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write as safetensors (atomic: temp file + rename)."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({n: v.contiguous() for n, v in self.deltas.items()}, str(tmp),
                      metadata={"format": "selfspeech.task_vector", **(metadata or {})})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TaskVector":
        from safetensors.torch import load_file

        return cls({n: v.float() for n, v in load_file(str(path)).items()})


# ----------------------------------------------------------------------------- checkpoint directories

def load_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` directory (safetensors only, sharded or not; no pickle);
    of a LoRA adapter folder, its base's weights with the adapter merged in (:mod:`.adapters`)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if (d / "adapter_config.json").is_file():
        from selfspeech.arith.adapters import merged_state

        return merged_state(d)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (d / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise TaskVectorError(f"{d}: no model.safetensors (a transformers save_pretrained directory is expected)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(d / f)))
    return state


def diff_dirs(a_dir: str | os.PathLike, b_dir: str | os.PathLike, include: str | None = None,
              exclude: str | None = None) -> TaskVector:
    """tau = theta(a_dir) - theta(b_dir) for two checkpoints fine-tuned from one init.

    Two LoRA adapter folders give delta(a) - delta(b) over their adapted matrices
    (merged deltas, :func:`selfspeech.arith.adapters.diff_adapters`); an adapter and a
    full model, or adapters of different bases or ranks, are refused in one line."""
    from selfspeech.arith.adapters import check_pair, diff_adapters

    check_pair(a_dir, b_dir)
    if (Path(a_dir) / "adapter_config.json").is_file():
        return diff_adapters(a_dir, b_dir, include, exclude)
    return TaskVector.between(load_state(a_dir), load_state(b_dir), include, exclude, (str(a_dir), str(b_dir)))


def apply_to_dir(base_dir: str | os.PathLike, tau: TaskVector, lam: float, out_dir: str | os.PathLike) -> Path:
    """Write ``base + lam * tau`` as a new checkpoint directory (configs and tokenizer copied).

    ``base_dir`` may be a LoRA adapter folder: tau is added to its merged weights and
    the result is a full model folder (the base's configs, the adapter's processor files).
    The whole directory is built beside ``out_dir`` and renamed into place
    (:func:`selfspeech.data.atomic.write_dir`): a kill never leaves a
    half-written model, and never loses the one ``out_dir`` held before.
    """
    import shutil

    from safetensors.torch import save_file

    from selfspeech.arith.adapters import companion_files

    base = Path(base_dir)
    new = tau.apply(load_state(base), lam)  # an adapter that does not fit its base stops before any tensor
    files = companion_files(base)

    def write(tmp: Path) -> None:
        for f in files:
            shutil.copy2(f, tmp / f.name)
        save_file({k: v.contiguous() for k, v in new.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "task_arithmetic.json").write_text(json.dumps({"base": str(base), "lambda": lam,
                                                              "tau_tensors": len(tau), "tau_norm": tau.norm()}, indent=2))

    return write_dir(out_dir, write)
