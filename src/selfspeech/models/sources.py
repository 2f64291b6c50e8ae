"""What a Whisper model directory holds, user-registered model names, and language/task checks.

Everything here reads headers and small JSON files only: no weights are loaded,
nothing is downloaded, so the checks can run before any long computation.

- :func:`inspect_dir` tells a transformers Whisper directory (``config.json`` with
  ``model_type: whisper``) from a CTranslate2 one (``model.bin`` with a ``WhisperSpec``)
  and reads its size, mel bins, layer counts and whether it is multilingual;
  anything else is refused in one line naming the file that does not match.
- :func:`register` / :func:`unregister` / :func:`registered`: names the user gave to
  local model directories (``selfspeech models add NAME PATH``), kept in
  ``<cache>/registered_models.json`` and written atomically.
- :func:`check_language`: Whisper's language and task, refused for ``.en`` models
  unless English transcription.
"""
from __future__ import annotations

import json
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from selfspeech.data.atomic import write_json

REGISTERED_FILE = "registered_models.json"
TASKS = ("transcribe", "translate")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class ModelError(RuntimeError):
    """A model that cannot be resolved: unknown name, bad directory, checksum mismatch, hub offline."""


def cache_root() -> Path:
    return Path(os.environ.get("SELFSPEECH_CACHE") or Path.home() / ".cache" / "selfspeech").expanduser()


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not an existing path: a Hugging Face hub repository id."""
    return bool(_HUB_ID.fullmatch(str(name))) and not Path(name).expanduser().exists()


@dataclass(frozen=True)
class ModelInfo:
    """A Whisper model directory as its headers describe it."""

    path: Path
    kind: str                # "transformers" or "ctranslate2"
    params: int | None       # parameter count (tied output projection counted once); None if unknown
    multilingual: bool
    n_mels: int              # 80, or 128 for large-v3
    encoder_layers: int
    decoder_layers: int      # 2 for distil-whisper's shallow decoders
    vocab_size: int

    @property
    def languages(self) -> str:
        return "multilingual" if self.multilingual else "English"


def format_params(n: int | None) -> str:
    """39_000_000 -> ``39M``; 1_550_000_000 -> ``1.55B``; None -> ``?``."""
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def inspect_dir(d: str | os.PathLike, label: str | None = None, need_weights: bool = True) -> ModelInfo:
    """Describe the Whisper model in directory ``d``; ModelError (one line) if it holds none.

    ``need_weights=False`` accepts a transformers config without weights beside it
    (the tokenizer and config folder of an adapter-only checkpoint).
    """
    d = Path(d).expanduser()
    who = f"{d}" + (f" ({label})" if label and label != str(d) else "")
    if not d.is_dir():
        raise ModelError(f"{who}: no such directory; give a transformers or CTranslate2 Whisper directory")
    if (d / "config.json").is_file() and _hf_model_type(d / "config.json") is not None:
        return _inspect_hf(d, who, need_weights)
    if (d / "model.bin").is_file():
        return _inspect_ct2(d, who)
    raise ModelError(f"{who}: holds no Whisper model: need config.json with model_type whisper (transformers) "
                     "or model.bin (CTranslate2)")


def _read_json(path: Path, who: str) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{who}: {path.name} is not readable JSON ({type(e).__name__}); "
                         "restore it or point at another model directory") from None
    if not isinstance(d, dict):
        raise ModelError(f"{who}: {path.name} is not a JSON object; point at another model directory")
    return d


def _hf_model_type(cfg: Path) -> str | None:
    """``model_type`` of a transformers config.json; None for a CTranslate2 config (which has none)."""
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _inspect_hf(d: Path, who: str, need_weights: bool = True) -> ModelInfo:
    cfg = _read_json(d / "config.json", who)
    if cfg.get("model_type") != "whisper":
        raise ModelError(f"{who}: config.json has model_type {cfg.get('model_type')!r}, not whisper; "
                         "give a Whisper model directory")
    if need_weights and not any((d / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        raise ModelError(f"{who}: config.json but no weights (model.safetensors); copy the weights there")
    vocab = int(cfg.get("vocab_size", 51865))
    gen = _read_json(d / "generation_config.json", who) if (d / "generation_config.json").is_file() else {}
    multilingual = bool(gen["is_multilingual"]) if "is_multilingual" in gen else vocab >= 51865
    return ModelInfo(d, "transformers", _safetensors_params(d), multilingual, int(cfg.get("num_mel_bins", 80)),
                     int(cfg.get("encoder_layers", 0)), int(cfg.get("decoder_layers", 0)), vocab)


def _safetensors_params(d: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (8-byte length, then JSON); no weights read."""
    index = d / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        total = 0
        for f in files:
            with open(d / f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            total += sum(_numel(v["shape"]) for k, v in header.items() if k != "__metadata__")
        return total
    except (OSError, ValueError, KeyError, struct.error):
        return None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def ct2_shapes(path: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """``(spec_name, {tensor name: shape})`` of a CTranslate2 model.bin, aliases included, seeking over the data
    (the layout is documented in :mod:`selfspeech.models.ct2`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    with open(path, "rb") as f:
        def take(fmt: str):
            size = struct.calcsize("<" + fmt)
            raw = f.read(size)
            if len(raw) < size:
                raise ValueError("truncated")
            return struct.unpack("<" + fmt, raw)[0]

        def string() -> str:
            return f.read(take("H")).rstrip(b"\0").decode("utf-8")

        if not 4 <= take("I") <= 6:
            raise ValueError("unsupported CTranslate2 binary version")
        spec = string()
        take("I")
        for _ in range(take("I")):
            name = string()
            shapes[name] = tuple(take("I") for _ in range(take("B")))
            take("B")
            f.seek(take("I"), os.SEEK_CUR)
        aliases = {string(): string() for _ in range(take("I"))}
    # tensors equal to an earlier one are stored once; the tied output projection is not a parameter
    shapes.update({a: shapes[t] for a, t in aliases.items() if t in shapes and a != "decoder/projection/weight"})
    return spec, shapes


def _inspect_ct2(d: Path, who: str) -> ModelInfo:
    try:
        spec, shapes = ct2_shapes(d / "model.bin")
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ModelError(f"{who}: model.bin is not a CTranslate2 model ({e}); "
                         "give a CTranslate2 or transformers Whisper directory") from None
    if spec != "WhisperSpec":
        raise ModelError(f"{who}: model.bin holds a {spec!r} model, not Whisper; give a Whisper model directory")
    try:
        _, n_mels, _ = shapes["encoder/conv1/weight"]
        vocab = shapes["decoder/embeddings/weight"][0]
    except (KeyError, ValueError):
        raise ModelError(f"{who}: model.bin lacks Whisper's encoder/decoder tensors; re-export the model") from None

    def layers(side: str) -> int:
        return len({m.group(1) for k in shapes if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    params = sum(_numel(s) for k, s in shapes.items() if len(s) and not k.endswith("_scale"))
    return ModelInfo(d, "ctranslate2", params, vocab >= 51865, n_mels, layers("encoder"), layers("decoder"), vocab)


# -- language and task ------------------------------------------------------------------

def language_code(language: str) -> str:
    """A Whisper language as its code: ``German`` / ``german`` / ``de`` -> ``de``; ModelError if unknown."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    s = str(language).strip().lower()
    if s in LANGUAGES:
        return s
    if s in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[s]
    raise ModelError(f"language {language!r} is not a Whisper language; use a code such as en, de, fr, es, zh "
                     f"or a name such as german ({len(LANGUAGES)} languages)")


def check_language(model: str, multilingual: bool | None, language: str = "en", task: str = "transcribe") -> str:
    """The language code to decode ``model`` in; ModelError (one line) when the model cannot.

    ``multilingual`` None means not known yet (a hub id not downloaded): only the
    language and task themselves are checked, and a name ending in ``.en`` counts as
    English-only.
    """
    if task not in TASKS:
        raise ModelError(f"task {task!r}: choose transcribe or translate (translate: into English)")
    code = language_code(language)
    english_only = multilingual is False or (multilingual is None and str(model).rstrip("/").endswith(".en"))
    if english_only and code != "en":
        raise ModelError(f"{model} is English-only; it cannot decode language {language!r}: use language en, "
                         "or a multilingual model (whisper-base, openai/whisper-large-v3)")
    if english_only and task == "translate":
        raise ModelError(f"{model} is English-only and has no translate task; use task transcribe, "
                         "or a multilingual model")
    return code


# -- user-registered names ----------------------------------------------------------------

def _registry_file() -> Path:
    return cache_root() / REGISTERED_FILE


def registered() -> dict[str, Path]:
    """Name -> directory of every model registered with :func:`register` (none: empty)."""
    f = _registry_file()
    if not f.is_file():
        return {}
    d = _read_json(f, "model registry")
    return {name: Path(e["path"]) for name, e in (d.get("models") or {}).items()
            if isinstance(e, dict) and "path" in e}


@contextmanager
def file_lock(target: Path):
    """Exclusive lock on ``.<name>.lock`` beside ``target`` (concurrent pulls, concurrent `models add`)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as fh:
        try:
            import fcntl  # POSIX; elsewhere these are simply not serialised
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _registry_lock():
    return file_lock(_registry_file())


def register(name: str, path: str | os.PathLike, reserved: tuple[str, ...] = ()) -> ModelInfo:
    """Register directory ``path`` (checked to hold a Whisper model) as ``name``; replaces an earlier entry."""
    if not _NAME.fullmatch(name):
        raise ModelError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (no '/', which marks "
                         "a hub id or a path)")
    if name in reserved:
        raise ModelError(f"model name {name!r} is built in; choose another name (e.g. my-{name})")
    info = inspect_dir(Path(path).expanduser().resolve(), name)
    with _registry_lock():
        models = {k: {"path": str(v)} for k, v in registered().items()}
        models[name] = {"path": str(info.path)}
        write_json(_registry_file(), {"models": dict(sorted(models.items()))})
    return info


def unregister(name: str) -> Path:
    """Forget registered ``name`` (its directory is left alone); returns that directory."""
    with _registry_lock():
        models = registered()
        if name not in models:
            known = ", ".join(sorted(models)) or "none"
            raise ModelError(f"{name!r} is not a registered model (registered: {known}); see `selfspeech models list`")
        gone = models.pop(name)
        write_json(_registry_file(), {"models": {k: {"path": str(v)} for k, v in sorted(models.items())}})
    return gone
