"""Module groups of a Whisper task vector, and tau applied with one lambda per group.

Pseudo2Real (Lin et al. 2025, eq. 4) scales the whole tau by one lambda. The
teacher's systematic error need not sit evenly in the network: an accent or
age shift is mostly acoustic (encoder), a vocabulary habit mostly in the
language model (decoder, embeddings). :data:`GROUPS` splits a transformers
Whisper checkpoint's parameters into four disjoint groups that together cover
every tensor, and :func:`apply_groups` computes ``state + sum_g lambda_g * tau_g``.

- ``encoder``: the acoustic model: conv front end, (sinusoidal) positions, blocks, final norm;
- ``cross_attention``: the decoder's attention over the encoder (``encoder_attn`` and its norm);
- ``decoder_self``: the rest of the decoder blocks (self-attention, FFN, their norms) and its final norm;
- ``embeddings``: decoder token and position embeddings, and ``proj_out`` (tied to the token
  embedding; a tau keeps the one canonical tensor, see :mod:`.task_vector`).

Each group lies inside one of the tau scopes of :data:`.task_vector.SCOPES`
(``encoder`` in ``encoder``, the other three in ``decoder``), so a global
``(lambda, scope)`` is one point of the per-group space (:func:`scope_lambdas`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch

from selfspeech.arith.task_vector import SCOPES, TaskVector, TaskVectorError, _select, apply_to_dir
from selfspeech.data.atomic import write_json

_DEC = r"^model\.decoder\."
GROUPS: dict[str, tuple[str | None, str | None]] = {
    "encoder": (r"^model\.encoder\.", None),
    "decoder_self": (_DEC, _DEC + r"(embed_(tokens|positions)\.|layers\.\d+\.encoder_attn)"),
    "cross_attention": (_DEC + r"layers\.\d+\.encoder_attn(_layer_norm)?\.", None),
    "embeddings": (r"^(model\.decoder\.embed_(tokens|positions)|proj_out)\.", None),
}
# short names for stage folders (decode_sim_groups_enc1_dec0.5_xatt1_emb0)
SHORT = {"encoder": "enc", "decoder_self": "dec", "cross_attention": "xatt", "embeddings": "emb"}


def group_names(names: Iterable[str]) -> dict[str, list[str]]:
    """Group -> its parameter names (every group listed, possibly empty).

    Raises TaskVectorError naming a tensor that falls in no group or in two
    (the groups are written for transformers Whisper checkpoints).
    """
    names = list(names)
    out = {g: _select(names, *rx) for g, rx in GROUPS.items()}
    seen: dict[str, str] = {}
    for g, ns in out.items():
        for n in ns:
            if n in seen:
                raise TaskVectorError(f"tensor {n!r} falls in groups {seen[n]!r} and {g!r}; "
                                      "arith.groups.GROUPS must be disjoint")
            seen[n] = g
    for n in names:
        if n not in seen:
            raise TaskVectorError(f"tensor {n!r} is in no module group ({', '.join(GROUPS)}); the groups cover "
                                  "transformers Whisper checkpoints, use one lambda (lambda.groups: []) otherwise")
    return out


def scale_groups(tau: TaskVector, lambdas: Mapping[str, float]) -> TaskVector:
    """``sum_g lambda_g * tau_g`` as one task vector; every group tau touches needs a lambda."""
    unknown = sorted(set(lambdas) - set(GROUPS))
    if unknown:
        raise TaskVectorError(f"unknown module group {unknown[0]!r}; choose among {', '.join(GROUPS)}")
    out: dict[str, torch.Tensor] = {}
    for g, ns in group_names(tau.deltas).items():
        if ns and g not in lambdas:
            raise TaskVectorError(f"no lambda for module group {g!r} (tau has {len(ns)} tensors there, "
                                  f"e.g. {ns[0]!r}); give one for each of {', '.join(GROUPS)}")
        out.update({n: tau.deltas[n] * float(lambdas[g]) for n in ns})
    return TaskVector(out)


def apply_groups(state: Mapping[str, torch.Tensor], tau: TaskVector,
                 lambdas: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """A new state dict ``state + sum_g lambda_g * tau_g``; with every lambda equal to ``lam`` it is
    exactly ``tau.apply(state, lam)`` (ties written once, dtypes kept, as :meth:`TaskVector.apply`)."""
    return scale_groups(tau, lambdas).apply(state, 1.0)


def apply_groups_to_dir(base_dir: str | os.PathLike, tau: TaskVector, lambdas: Mapping[str, float],
                        out_dir: str | os.PathLike) -> Path:
    """Write ``base + sum_g lambda_g * tau_g`` as a checkpoint folder (as :func:`.task_vector.apply_to_dir`);
    its ``task_arithmetic.json`` records the per-group lambdas and the norm of the unscaled tau."""
    out = apply_to_dir(base_dir, scale_groups(tau, lambdas), 1.0, out_dir)
    meta = json.loads((out / "task_arithmetic.json").read_text())
    write_json(out / "task_arithmetic.json", meta | {"lambda": None, "lambda_groups": dict(lambdas),
                                                     "tau_norm": tau.norm()})
    return out


def scope_lambdas(tau: TaskVector, lam: float, scope: str) -> dict[str, float]:
    """The per-group lambdas equal to ``lam * tau[scope]``: ``lam`` on the groups inside the scope, 0 elsewhere.

    A group tau does not touch (a LoRA tau) is placed by a Whisper name of that group.
    Raises TaskVectorError for a group that straddles the scope.
    """
    if scope not in SCOPES:
        raise TaskVectorError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    out = {}
    for g, ns in group_names(tau.deltas).items():
        ns = ns or [_PROBE[g]]
        n_in = len(_select(ns, *SCOPES[scope]))
        if 0 < n_in < len(ns):
            raise TaskVectorError(f"module group {g!r} straddles tau scope {scope!r}; "
                                  "every group must lie inside or outside each scope")
        out[g] = float(lam) if n_in else 0.0
    return out


# a name of each group, for deciding the scope of a group that a (e.g. LoRA) tau leaves empty
_PROBE = {"encoder": "model.encoder.layers.0.fc1.weight", "decoder_self": "model.decoder.layers.0.fc1.weight",
          "cross_attention": "model.decoder.layers.0.encoder_attn.q_proj.weight",
          "embeddings": "model.decoder.embed_tokens.weight"}
