"""How one update computes: the module on its device, the micro-batches' forward and backward in precision.

The loop (:mod:`selfspeech.train.loop`) owns the schedule, the optimizer step
and the checkpoints; this module owns what depends on the hardware: placing
the module (TF32, gradient checkpointing, ``torch.compile`` of its blocks) and running an
update's micro-batches under autocast, with fp16's loss scaling, into
gradients equal to those of the whole batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from selfspeech.accel import Precision, enable_fast_matmul, to_device
from selfspeech.config import invalid


def enable_grad_checkpointing(module: torch.nn.Module) -> None:
    """Recompute activations in backward: activation (gradient) checkpointing of a transformers model, else
    ``grad_checkpointing = True`` on every sub-module that offers it; refused when nothing does."""
    kwargs = {"use_reentrant": False}  # the non-reentrant form: works with frozen inputs and kwargs
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.20 (the older name is deprecated)
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return
    if hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return
    found = [m for m in module.modules() if hasattr(m, "grad_checkpointing")]
    if not found:
        raise invalid("grad_checkpointing", True, f"{type(module).__name__} has no checkpointable layers",
                      "set it to false")
    for m in found:
        m.grad_checkpointing = True


def compile_blocks(module: torch.nn.Module) -> int:
    """``torch.compile`` each repeated block (every member of an ``nn.ModuleList``: Transformer layers,
    Whisper's encoder and decoder layers, ECAPA's blocks); returns how many.

    Regional compilation, as PyTorch recommends for models built of repeated
    blocks: one graph serves every layer, so compilation is quick, and the code
    around the blocks (masking, sampling, losses), whose shapes and control flow
    change per batch, stays eager."""
    n = 0
    for ml in [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]:
        for block in ml:
            # the instance's forward, not the module: its state-dict keys (and so checkpoints) stay as they are
            block.forward = torch.compile(block.forward)
            n += 1
    if n == 0:
        raise invalid("compile", True, f"{type(module).__name__} has no repeated blocks to compile",
                      "set it to false")
    return n


def place_module(module: torch.nn.Module, device: torch.device, grad_checkpointing: bool = False,
                 compile: bool = False) -> None:
    """``module`` on ``device`` in place, with the memory and speed options asked for."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        enable_fast_matmul()
    module.to(device)
    if grad_checkpointing:
        enable_grad_checkpointing(module)
    if compile:
        compile_blocks(module)


def mean_records(recs: list[tuple[float, dict]]) -> dict:
    """Micro-batch log records -> one: numbers averaged with the micro-batches' weights, the rest from the last."""
    total = sum(w for w, _ in recs)
    out = dict(recs[-1][1])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = sum(w * float(r.get(k, 0.0)) for w, r in recs) / total
    return out


class Update:
    """Forward and backward of one update's micro-batches on ``device`` in ``precision``."""

    def __init__(self, loss_fn: Callable, device: torch.device, precision: Precision):
        self.loss_fn, self.device, self.prec = loss_fn, device, precision
        self.scaler = precision.scaler(device)
        self.non_blocking = device.type == "cuda"  # the loader pins host batches for the GPU: copies overlap

    def loss(self, part, step: int) -> tuple[torch.Tensor, dict]:
        batch = to_device(part, self.device, self.non_blocking)
        with self.prec.autocast(self.device):
            return self.loss_fn(batch, step)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def __call__(self, micro: list[tuple[int, object]], step: int,
                 trainable: list[torch.nn.Parameter]) -> tuple[torch.Tensor, dict, float | None]:
        """``[(items, collated micro-batch)]`` -> (mean loss, log record, weight of this rank's batch or None).

        One micro-batch: the loss as the objective gives it. Several: each loss
        is weighted by its count (the objective's ``_weight``, e.g. label tokens
        or masked frames, else its items) and the summed gradients divided by the
        total, so the update equals the one of the whole batch."""
        if len(micro) == 1:
            loss, rec = self.loss(micro[0][1], step)
            self.backward(loss)
            return loss.detach().float(), rec, rec.pop("_weight", None)
        total, summed, recs, weighted = 0.0, 0.0, [], False
        for n, part in micro:
            loss, rec = self.loss(part, step)
            w = rec.pop("_weight", None)
            weighted |= w is not None
            w = float(n if w is None else w)
            self.backward(loss.float() * w)
            total, summed = total + w, summed + loss.detach().float() * w
            recs.append((w, rec))
        for p in trainable:
            if p.grad is not None:
                p.grad.div_(total)
        return summed / total, mean_records(recs), total if weighted else None
