"""Low-rank storage of a task vector: a truncated SVD per matrix, rank chosen by retained energy.

A Pseudo2Real tau (Lin et al. 2025, arXiv 2510.08047) is a model-sized file. Each
2-D delta ``D`` (m, n) is stored as ``U_k (m, k)``, ``S_k (k,)``, ``V_k (n, k)`` with
``D ~ U_k diag(S_k) V_k^T``, where k is the smallest rank whose singular values
keep ``energy`` of ``||D||_F^2`` (sum of the first k s_i^2 over the sum of all).
By Eckart-Young this is the best rank-k approximation, and its relative Frobenius
error is ``sqrt(1 - retained)`` <= ``sqrt(1 - energy)``. A tau between LoRA students
(Hu et al. 2021) of rank r has rank <= 2r per matrix, so it keeps (almost) all of
its energy at a small k. Tensors that are not matrices (biases, norms) and
matrices a factorisation would not shrink are stored dense.

File: one safetensors with ``<name>.U``, ``<name>.S``, ``<name>.V`` per factored
matrix and ``<name>`` per dense tensor; its header metadata says
``format: selfspeech.lowrank_task_vector`` and holds the JSON report (energy,
rank and relative error per matrix, sizes).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from selfspeech.arith.task_vector import TaskVector, TaskVectorError
from selfspeech.data.atomic import atomic_path

FORMAT = "selfspeech.lowrank_task_vector"
BYTES = 4  # fp32 values, as TaskVector stores them


@dataclass(frozen=True)
class LowRankTau:
    """Factored matrices ``name -> (U (m, k), S (k,), V (n, k))`` and dense tensors ``name -> tensor``."""

    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: Mapping[str, torch.Tensor] = field(default_factory=dict)
    report: Mapping = field(default_factory=dict)

    def to_task_vector(self) -> TaskVector:
        """The dense tau this stores: ``U diag(S) V^T`` per factored matrix, the dense tensors as they are."""
        out = {n: (u * s) @ v.T for n, (u, s, v) in self.factors.items()}
        return TaskVector({**out, **{n: t.clone() for n, t in self.dense.items()}})

    def numel(self) -> int:
        return sum(u.numel() + s.numel() + v.numel() for u, s, v in self.factors.values()) + \
            sum(t.numel() for t in self.dense.values())

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write as one safetensors file (atomic), the report in its header metadata."""
        from safetensors.torch import save_file

        tensors = {n: t.contiguous() for n, t in self.dense.items()}
        for n, (u, s, v) in self.factors.items():
            tensors |= {f"{n}.U": u.contiguous(), f"{n}.S": s.contiguous(), f"{n}.V": v.contiguous()}
        meta = {"format": FORMAT, "report": json.dumps(self.report), "factored": json.dumps(sorted(self.factors)),
                **(metadata or {})}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LowRankTau":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise TaskVectorError(f"{path}: not a low-rank task vector (make one with `selfspeech arith lowrank`)")
        t = {n: v.float() for n, v in load_file(str(path)).items()}
        factored = json.loads(meta["factored"])
        factors = {n: (t.pop(f"{n}.U"), t.pop(f"{n}.S"), t.pop(f"{n}.V")) for n in factored}
        return cls(factors, t, json.loads(meta.get("report", "{}")))


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest k with ``sum(s[:k]^2) >= energy * sum(s^2)`` for descending singular values ``s`` (p,)."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    return min(int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12)) + 1, s.numel())


def _factor(d: torch.Tensor, energy: float, max_rank: int | None) -> tuple[tuple | None, dict]:
    """One (m, n) matrix -> ((U, S, V) or None to store it dense, its report entry)."""
    m, n = d.shape
    u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
    k = rank_for_energy(s, energy)
    if max_rank is not None:
        k = min(k, max_rank)
    norm2 = float(s.pow(2).sum())
    kept2 = float(s[:k].pow(2).sum())
    err = math.sqrt(max(0.0, norm2 - kept2) / norm2) if norm2 > 0 else 0.0
    entry = {"shape": [m, n], "rank": k, "full_rank": int(s.numel()), "rel_error": err, "sq_norm": norm2,
             "sq_error": max(0.0, norm2 - kept2)}
    if k * (m + n + 1) >= m * n:  # factors as large as the matrix: keep it exact and dense
        return None, {**entry, "rank": int(s.numel()), "dense": True, "rel_error": 0.0, "sq_error": 0.0}
    return (u[:, :k].float(), s[:k].float(), vh[:k].T.float()), entry


def compress(tau: TaskVector, energy: float = 0.99, max_rank: int | None = None) -> LowRankTau:
    """Each 2-D tensor of ``tau`` as a truncated SVD keeping ``energy`` of its squared Frobenius norm
    (at most ``max_rank``); the report gives per-matrix ranks and relative errors, the total relative
    error ``||tau - tau_k|| / ||tau||`` and the sizes (values and bytes, fp32) full vs low rank."""
    if not 0.0 < energy <= 1.0:
        raise TaskVectorError(f"energy {energy!r}: give the fraction of each matrix's energy to keep, in (0, 1]")
    factors, dense, per = {}, {}, {}
    for name, d in sorted(tau.deltas.items()):
        if d.dim() != 2 or min(d.shape) < 2:
            dense[name] = d.clone()
            continue
        f, per[name] = _factor(d, energy, max_rank)
        if f is None:
            dense[name] = d.clone()
        else:
            factors[name] = f
    out = LowRankTau(factors, dense)
    sq = sum(float(d.double().pow(2).sum()) for d in tau.deltas.values())
    sq_err = sum(e["sq_error"] for e in per.values())
    report = {"energy": energy, "max_rank": max_rank, "matrices": per,
              "rel_error": math.sqrt(sq_err / sq) if sq > 0 else 0.0,
              "numel_full": tau.numel(), "numel_lowrank": out.numel(),
              "bytes_full": BYTES * tau.numel(), "bytes_lowrank": BYTES * out.numel(),
              "size_ratio": out.numel() / max(1, tau.numel())}
    return LowRankTau(factors, dense, report)


def load_any(path: str | os.PathLike) -> TaskVector:
    """A task vector file, dense (``selfspeech arith diff``) or low-rank (``selfspeech arith lowrank``)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise TaskVectorError(f"{p}: task vector not found (make one with `selfspeech arith diff`)")
    with safe_open(str(p), "pt") as f:
        fmt = (f.metadata() or {}).get("format")
    return LowRankTau.load(p).to_task_vector() if fmt == FORMAT else TaskVector.load(p)
