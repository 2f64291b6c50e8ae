"""LoRA students (Hu et al. 2021, arXiv 2106.09685) through ``peft``, and their merged weight deltas.

A LoRA student keeps Whisper's weights frozen and learns, for each targeted
linear layer ``W`` (out, in), two factors ``A`` (r, in) and ``B`` (out, r); the
layer computes ``W x + (alpha / r) * B A x``. Only ``A`` and ``B`` are trained,
so a student is an *adapter folder* (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft`` and ``transformers`` load on top
of the base model it names (``base_model_name_or_path``).

Task arithmetic needs weights, not factors: the *merged delta* of a layer is
``W_merged - W = (alpha / r) * B @ A`` (:func:`merged_delta`), keyed by the base
model's parameter name (``model.encoder.layers.0.self_attn.q_proj.weight``).
Two students' factors never subtract (``B1 A1 - B2 A2`` is not ``(B1 - B2)(A1 - A2)``),
so Pseudo2Real's tau between LoRA students is taken between merged deltas
(:mod:`selfspeech.arith.task_vector`).

Everything here reads the adapter's JSON and safetensors headers before any
tensor, so an adapter that does not fit its base stops with one line first.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from selfspeech.config import check_ranges, checked, invalid

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# the attention projections and the feed-forward layers of every encoder and decoder block
# (Whisper's self-, cross-attention and MLP); the convolutions, embeddings and norms stay frozen
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_PREFIX = "base_model.model."  # peft's prefix of the base model's names in adapter files


class AdapterError(ValueError):
    """An adapter folder that cannot be used as asked; the message names the folder and the fix."""


@dataclass(frozen=True)
class LoraConfig:
    """One LoRA student: ``rank`` r, scale ``alpha / r``, dropout on the adapter's input, the layers it adapts."""

    rank: int = checked(8, ge=1)  # r, the inner dimension of each adapter's two factors
    alpha: float = checked(16.0, gt=0)       # scale alpha / r: 2 at r=8, as peft's Whisper examples (r=32, alpha=64)
    dropout: float = checked(0.05, ge=0, lt=1)  # probability, on the adapter's input during training
    target_modules: tuple[str, ...] = checked(DEFAULT_TARGETS, nonempty=True)  # linear layer names in a block
    where: Literal["encoder", "decoder", "both"] = "both"  # the layers that get adapters

    def __post_init__(self):
        check_ranges(self)
        if self.where not in ("encoder", "decoder", "both"):
            raise invalid("where", self.where, "not a place for adapters", "choose encoder, decoder or both")
        bad = [t for t in self.target_modules if not t.replace("_", "").isalnum()]
        if bad:
            raise invalid("target_modules", bad[0], "not a layer name", f"give names such as {', '.join(DEFAULT_TARGETS)}")

    def regex(self) -> str:
        """peft's ``target_modules`` as one regular expression, full-matched against module names."""
        scope = {"encoder": "encoder", "decoder": "decoder", "both": "(?:encoder|decoder)"}[self.where]
        return rf"model\.{scope}\.layers\.\d+\.(?:.*\.)?(?:{'|'.join(self.target_modules)})"

    def peft_config(self):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              target_modules=self.regex(), bias="none")


def wrap(model, cfg: LoraConfig, base_dir: str | Path, seed: int = 0):
    """``model`` (a transformers Whisper loaded from ``base_dir``) as a peft model whose LoRA factors alone
    are trainable; its adapter folders name ``base_dir`` (absolute) as their base.

    ``A`` is drawn from ``seed`` (``B`` starts at 0, so the student starts at theta0): two students of
    one seed start from the same factors and differ only by their data, which Pseudo2Real's tau needs."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg.peft_config())
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base_dir).resolve())
    return peft_model


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_adapter_weights(peft_model, adapter_dir: str | Path) -> None:
    """An adapter folder's factors into ``peft_model`` (of the same LoRA config), strictly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    res = set_peft_model_state_dict(peft_model, load_file(str(d / ADAPTER_WEIGHTS)))
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    if unexpected:
        raise AdapterError(f"{d}: adapter weights do not fit this LoRA student (unexpected {unexpected[:3]}); "
                           "resume with the LoRA settings the run started with")


# -- adapter folders without peft's machinery: JSON, safetensors headers, B @ A ----------------

def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder says about itself: its base, rank, scale and the factor shapes."""

    path: Path
    base: str                    # base_model_name_or_path
    rank: int
    alpha: float
    targets: str                 # target_modules as written (a regex or a list)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # base weight name -> (A shape, B shape)
    keys: dict[str, tuple[str, str]]  # base weight name -> (lora_A key, lora_B key) in the weights file

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> str:
        return f"rank {self.rank}, alpha {self.alpha:g}, targets {self.targets}"


def read_adapter(path: str | Path) -> AdapterInfo:
    """Config and factor shapes of a LoRA adapter folder; AdapterError for what this toolkit cannot merge."""
    from safetensors import safe_open

    d = Path(path)
    if not is_adapter_dir(d) or not (d / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{d}: not a LoRA adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    c = json.loads((d / ADAPTER_CONFIG).read_text())
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora") or c.get("use_rslora"):
        raise AdapterError(f"{d}: a {c.get('peft_type')} adapter with use_dora={c.get('use_dora')} "
                           f"use_rslora={c.get('use_rslora')}; only plain LoRA adapters merge here")
    if c.get("rank_pattern") or c.get("alpha_pattern") or c.get("fan_in_fan_out"):
        raise AdapterError(f"{d}: per-layer ranks/alphas or fan_in_fan_out are not supported; "
                           "train the adapter with one rank and alpha")
    shapes: dict[str, list] = {}
    keys: dict[str, list] = {}
    with safe_open(str(d / ADAPTER_WEIGHTS), "pt") as f:
        for k in f.keys():
            for part, i in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
                if k.endswith(part):
                    stem = k[: -len(part)]
                    name = (stem[len(_PREFIX):] if stem.startswith(_PREFIX) else stem) + ".weight"
                    shapes.setdefault(name, [None, None])[i] = tuple(f.get_slice(k).get_shape())
                    keys.setdefault(name, [None, None])[i] = k
    if not shapes or any(None in v for v in shapes.values()):
        raise AdapterError(f"{d}: {ADAPTER_WEIGHTS} holds no complete lora_A/lora_B pairs")
    return AdapterInfo(d, str(c.get("base_model_name_or_path") or ""), int(c["r"]), float(c["lora_alpha"]),
                       str(c.get("target_modules")), {n: (a, b) for n, (a, b) in shapes.items()},
                       {n: (a, b) for n, (a, b) in keys.items()})


def check_fits(info: AdapterInfo, base_shapes: dict[str, tuple[int, ...]], base_name: str) -> None:
    """Each factor pair must fit the base weight it adapts: A (r, in), B (out, r) for W (out, in)."""
    for name, (a, b) in sorted(info.shapes.items()):
        w = base_shapes.get(name)
        if w is None:
            raise AdapterError(f"{info.path}: adapts {name!r}, which base model {base_name} does not have; "
                               "the adapter was made for another base model")
        if len(w) != 2 or (b[0], a[1]) != tuple(w) or a[0] != b[1]:
            raise AdapterError(f"{info.path}: factors A{a} B{b} of {name!r} do not fit its shape {tuple(w)} in "
                               f"base model {base_name}; the adapter was made for another base model")


def weight_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``save_pretrained`` folder, from the safetensors headers only."""
    from safetensors import safe_open

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    if not all((d / f).is_file() for f in files):
        raise AdapterError(f"{d}: no model.safetensors (a transformers save_pretrained directory is expected)")
    shapes = {}
    for name in files:
        with safe_open(str(d / name), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def adapter_base(info: AdapterInfo, base: str | Path | None = None) -> Path:
    """The base model folder of an adapter: the one its config names (a folder, or a model zoo name),
    or ``base`` when given; AdapterError when it is missing or the adapter names another existing base."""
    p = Path(info.base).expanduser()
    named = bool(info.base) and (p / "config.json").is_file()
    if base is not None:
        if named and os.path.realpath(p) != os.path.realpath(base):
            raise AdapterError(f"{info.path}: the adapter was made for base model {p}, not {base}; "
                               "give its own base (or leave the base out)")
        return Path(base)
    if named:
        return p
    from selfspeech.models.zoo import REGISTRY, resolve_model

    if info.base in REGISTRY:
        return Path(resolve_model(info.base).hf_dir)
    raise AdapterError(f"{info.path}: its base model {info.base!r} (adapter_config.json base_model_name_or_path) "
                       "is not here; give the base model folder (--base)")


def check_adapter(adapter_dir: str | Path, base: str | Path | None = None) -> tuple[AdapterInfo, Path]:
    """(adapter info, base folder) once every factor is known to fit the base's weights; headers only."""
    info = read_adapter(adapter_dir)
    b = adapter_base(info, base)
    check_fits(info, weight_shapes(b), str(b))
    return info, b


def merged_delta(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Base weight name -> ``W_merged - W`` = ``(alpha / r) * B @ A``, (out, in) fp32, for every adapted layer."""
    from safetensors.torch import load_file

    info = read_adapter(adapter_dir)
    raw = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    out = {}
    for name, (ka, kb) in info.keys.items():
        a, b = raw[ka].float(), raw[kb].float()
        out[name] = (b @ a) * info.scale  # peft's merge: W += scale * B @ A (fan_in_fan_out False)
    return out


def config_folder(model_dir: str | Path) -> Path:
    """Where a model folder's config.json is: the folder itself, or an adapter's base (checked to fit)."""
    return check_adapter(model_dir)[1] if is_adapter_dir(model_dir) else Path(model_dir)


def merge_into(model, adapter_dir: str | Path):
    """``model`` (the adapter's base, loaded) with each adapted weight replaced by W + (alpha / r) B A; in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in merged_delta(adapter_dir).items():
            params[name].add_(delta.to(params[name].dtype))
    return model
