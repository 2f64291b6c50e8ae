"""Atomic text writes: a temp file beside the target, fsync, then rename.

A reader never sees a half-written manifest, report or stage marker, and a
kill mid-write leaves the previous version in place (DEVELOPERS.md, checkpoints).
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def temp_prefix(path: str | os.PathLike) -> str:
    """Name prefix of the temp siblings written before ``path`` is renamed into place.

    It carries the writer's process id, so that :func:`drop_stale` can tell a
    killed writer's leftovers from another live process writing the same file."""
    return f".{Path(path).name}.tmp.{os.getpid()}."


def _live_writer(name: str, base: str) -> bool:
    """True if temp sibling ``name`` belongs to another process that is still running."""
    pid = name[len(base):].split(".", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False  # a name without a pid (older versions) or our own earlier, abandoned write
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
