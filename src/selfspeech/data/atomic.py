"""The package's atomic writers: files, JSON files and whole directories.

Everything is written as a temp sibling of the target and renamed into place,
so a reader never sees a half-written manifest, report, model or stage marker,
and a kill (SIGKILL, OOM, pre-emption) mid-write leaves the previous version.

- :func:`atomic_write`: a text (or, through ``f.buffer``, binary) file; fsync before the rename.
- :func:`atomic_path`: a temp path for libraries that write by file name (safetensors, lhotse, zipfile).
- :func:`write_json`: the one JSON writer (strict JSON: nan/inf become null).
- :func:`atomic_dir` / :func:`write_dir`: a directory. Renaming onto a non-empty
  directory fails, so the old one is renamed aside to ``.<name>.old``, the new
  one renamed in, and the old one deleted. A kill between the two renames
  leaves only ``.<name>.old`` (complete): :func:`resolve_dir` falls back to it,
  and the next write replaces it. (No fsync for directories: this protects
  against SIGKILL, not against power loss.)
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of the temp siblings written before ``path`` is renamed into place.

    It carries the writer's process id, so that :func:`drop_stale` can tell a
    killed writer's leftovers from another live process writing the same file."""
    return f".{Path(path).name}.tmp.{os.getpid()}."


def _live_writer(name: str, base: str) -> bool:
    """True if temp sibling ``name`` belongs to another process that is still running."""
    pid = name[len(base):].split(".", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # a name without a pid, or our own earlier, abandoned write
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # alive, owned by someone else
    return True


def drop_stale(path: str | os.PathLike) -> None:
    """Delete temp siblings of ``path`` that a killed writer left behind.

    They are never read back (only renamed into place when complete), but a
    model-sized one left by every kill would fill the disk. A sibling whose
    writer is another live process is left alone: two benchmark processes may
    write the same manifest at once, and deleting the other's temp file made
    its rename fail. Within one job only rank 0 writes (torchrun).
    """
    path = Path(path)
    base = f".{path.name}.tmp."
    for stale in path.parent.glob(glob.escape(base) + "*"):
        if _live_writer(stale.name, base):
            continue
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """``with atomic_write(p) as f: f.write(...)`` - ``p`` appears only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """``with atomic_path(p) as tmp: lib.save(tmp)`` - ``tmp`` is renamed to ``p`` if the block succeeds.

    For writers that take a file name. ``suffix`` ends the temp name, for
    libraries that choose the format from it (``.jsonl.gz``, ``.flac``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    drop_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _finite(x: Any) -> Any:
    """JSON has no nan/inf: write them as null (an undefined rate, a diverged loss)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as indented, strict JSON atomically; nan/inf become null.

    ``default`` converts what JSON cannot hold (e.g. ``str`` for paths);
    without it such a value raises TypeError and the old file stays.
    """
    with atomic_write(path) as f:
        json.dump(_finite(obj), f, indent=2, ensure_ascii=False, allow_nan=False, sort_keys=sort_keys,
                  default=default)
        f.write("\n")
    return Path(path)


def old_copy(path: str | os.PathLike) -> Path:
    """Where :func:`replace_dir` keeps the previous ``path`` between its two renames."""
    path = Path(path)
    return path.with_name(f".{path.name}.old")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out``, replacing it (see the module doc)."""
    old = old_copy(out)
    if out.exists():
        if old.exists():  # stale: `out` is complete, so the aside copy is not needed
            shutil.rmtree(old)
        out.rename(old)  # rename onto a non-empty directory fails, so move the old one aside first
    # else: a kill left only `old` (complete); it stays until the new one is in place
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(out) as tmp: ...`` - the filled temp directory replaces ``out`` if the block succeeds."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    drop_stale(out)  # a killed writer's half-written copy: never read, only taking space
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dir(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temp sibling of ``out``, then :func:`replace_dir` it into place."""
    with atomic_dir(out) as tmp:
        write(tmp)
    return Path(out)


def resolve_dir(path: str | os.PathLike) -> Path | None:
    """``path`` if it exists, else the complete ``.old`` copy a kill left between the renames, else None."""
    for p in (Path(path), old_copy(path)):
        if p.exists():
            return p
    return None
