"""Atomic text writes: a temp file beside the target, fsync, then rename.

A reader never sees a half-written manifest, report or stage marker, and a
kill mid-write leaves the previous version in place (DEVELOPERS.md, checkpoints).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """``with atomic_write(p) as f: f.write(...)`` - ``p`` appears only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
