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
    """Name prefix of the temp siblings written before ``path`` is renamed into place."""
    return f".{Path(path).name}.tmp."


def drop_stale(path: str | os.PathLike) -> None:
    """Delete temp siblings of ``path`` that a killed writer left behind.

    They are never read back (only renamed into place when complete), but a
    model-sized one left by every kill would fill the disk. Callers are the
    only writer of ``path`` (rank 0 under torchrun).
    """
    path = Path(path)
    for stale in path.parent.glob(glob.escape(temp_prefix(path)) + "*"):
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
