"""Devices and numeric precision: where a command computes, and in which dtype.

Every command that computes takes ``--device auto|cpu|cuda|cuda:N`` (and a
``device:`` config key); :func:`resolve_device` turns it into a
``torch.device`` or stops with one line saying what this machine has, before
any model is loaded. ``auto`` takes CUDA when present; under torchrun each
process takes ``cuda:LOCAL_RANK``.

Training precision (:func:`resolve_precision`): ``auto`` is bf16 autocast on
GPUs that support it and fp32 elsewhere; ``fp16`` (autocast with a gradient
scaler) is an option on GPUs; ``bf16`` on a CPU runs the same mixed-precision
path there (so CI exercises it). Master weights, optimizer moments and
checkpoints stay fp32 whatever the precision (Micikevicius et al. 2018, "Mixed
Precision Training"): autocast only lowers the matmuls and convolutions.

Usage::

    device = resolve_device("auto")
    prec = resolve_precision("auto", device)
    with prec.autocast(device):
        loss = model(to_device(batch, device))
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class DeviceError(ValueError):
    """A device or precision this machine cannot provide (one line: what was asked, what there is)."""


def cuda_summary() -> str:
    """What this machine offers, for error messages: ``1 CUDA device (cuda:0 NVIDIA H200)`` or why none."""
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        return f"no CUDA device is available (torch {torch.__version__}, {build})"
    n = torch.cuda.device_count()
    names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(n))
    return f"{n} CUDA device{'s' if n != 1 else ''} ({names})"


def local_rank() -> int:
    """This process's index on its machine under torchrun (0 without it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(spec: str | torch.device | None = "auto", key: str = "device") -> torch.device:
    """``auto|cpu|cuda|cuda:N`` -> a ``torch.device`` this machine has; :class:`DeviceError` otherwise.

    ``auto`` and ``cuda`` mean ``cuda:LOCAL_RANK`` under torchrun (one GPU per
    process), ``cuda:0`` otherwise; ``auto`` falls back to the CPU.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    s = (spec or "auto").strip().lower()
    if s == "auto":
        s = "cuda" if torch.cuda.is_available() else "cpu"
    if s == "cpu":
        return torch.device("cpu")
    if s == "cuda" or s.startswith("cuda:"):
        if not torch.cuda.is_available():
            name = key.rsplit(": ", 1)[-1]  # the option or config key without the file that holds it
            raise DeviceError(f"{key} {spec!r}: {cuda_summary()}; use {name} cpu (or auto)")
        index = local_rank() if s == "cuda" else s.split(":", 1)[1]
        try:
            index = int(index)
        except ValueError:
            raise DeviceError(f"{key} {spec!r}: not a device index; use {DEVICE_CHOICES}") from None
        n = torch.cuda.device_count()
        if not 0 <= index < n:
            raise DeviceError(f"{key} {spec!r}: this machine has {cuda_summary()}; use cuda:0"
                              + (f" to cuda:{n - 1}" if n > 1 else ""))
        return torch.device("cuda", index)
    raise DeviceError(f"{key} {spec!r}: not a device; use {DEVICE_CHOICES}")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); True where torch cannot tell."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    if not probes or os.uname().machine in ("arm64", "aarch64"):  # Arm: torch has no probe; bf16 runs there
        return True
    return any(p() for p in probes)


@dataclass(frozen=True)
class Precision:
    """How a training step computes: ``name`` (fp32|bf16|fp16), the autocast dtype, whether fp16's scaler is on."""

    name: str = "fp32"

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def scaled(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        """The autocast context of this precision on ``device`` (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def scaler(self, device: torch.device):
        """A gradient scaler for fp16; None otherwise."""
        return torch.amp.GradScaler(device.type) if self.scaled else None


def resolve_precision(spec: str | None, device: torch.device, key: str = "precision") -> Precision:
    """``auto|fp32|bf16|fp16`` on ``device`` -> a :class:`Precision`; :class:`DeviceError` when unsupported."""
    s = (spec or "auto").strip().lower()
    if s not in PRECISIONS:
        raise DeviceError(f"{key} {spec!r}: not a precision; use {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if s == "auto":
        return Precision("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    if s == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"{key} bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32")
        if device.type == "cpu" and not cpu_has_bf16():
            raise DeviceError(f"{key} bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); use fp32")
    if s == "fp16":
        if not cuda:
            raise DeviceError(f"{key} fp16: float16 training needs a CUDA GPU ({cuda_summary()}); "
                              "on a CPU use bf16 or fp32")
        if torch.cuda.get_device_capability(device) < (5, 3):
            raise DeviceError(f"{key} fp16: {torch.cuda.get_device_name(device)} has no float16 arithmetic; use fp32")
    return Precision(s)


def check_device(device: str | None, precision: str | None = None,
                 prefix: str = "") -> tuple[torch.device, Precision]:
    """Resolve both up front (commands call this before loading anything); errors name ``prefix + "device"``."""
    d = resolve_device(device, key=f"{prefix}device")
    return d, resolve_precision(precision, d, key=f"{prefix}precision")


def enable_fast_matmul() -> None:
    """TF32 for fp32 matmuls and convolutions on Ampere and later (10-bit mantissa, fp32 range): the
    speed the hardware was built for, and what PyTorch's own mixed-precision recipes use."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


def to_device(obj, device: torch.device, non_blocking: bool = False):
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to ``device``; other values as they are.

    ``non_blocking`` pairs with pinned host memory: the copy overlaps the step
    already running on the GPU."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and any(torch.is_tensor(v) or isinstance(v, (dict, list, tuple)) for v in obj):
        return type(obj)(to_device(v, device, non_blocking) for v in obj)
    return obj


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
