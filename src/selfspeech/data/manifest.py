"""JSONL manifests: one utterance a line, NeMo field names plus free metadata.

A line looks like::

    {"id": "000010011", "audio_filepath": "/abs/a.flac", "duration": 2.4,
     "text": "WE CALL IT BEAR", "speaker": "0001", "age": 6, "group": "child"}

``audio_filepath`` may be relative: it is then resolved against the manifest's
own folder, so a corpus folder can be moved as a whole. Reading streams (a
generator), so a manifest of any size never sits in memory with its audio.
Writing is atomic (temp file + rename): a killed writer leaves the old file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from selfspeech.data.atomic import atomic_write

REQUIRED = ("id", "audio_filepath")


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names file and line."""


def read_manifest(path: str | os.PathLike, resolve_paths: bool = True,
                  on_bad_line: Callable[[ManifestError], None] | None = None,
                  audio_root: str | os.PathLike | None = None) -> Iterator[dict]:
    """Yield one dict per non-empty line of a JSONL manifest.

    Raises ManifestError naming ``path:line`` for a line that is not a JSON
    object or lacks ``id``/``audio_filepath``; with ``on_bad_line`` the error
    is handed to it instead and reading goes on (``data validate`` does this).
    ``audio_root`` (or the environment's ``SELFSPEECH_AUDIO_ROOT``): every audio
    path must resolve inside it (symlinks and ``..`` included), so a manifest
    from elsewhere cannot make a job read arbitrary files.
    """
    audio_root = audio_root or os.environ.get("SELFSPEECH_AUDIO_ROOT")
    jail = Path(audio_root).resolve() if audio_root else None
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (create one with `selfspeech data import-kaldi`)")
    root = path.resolve().parent
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes reach validate as U+FFFD
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse_line(line, path, lineno)
            except ManifestError as e:
                if on_bad_line is None:
                    raise
                on_bad_line(e)
                continue
            item["id"] = str(item["id"])
            if resolve_paths and not os.path.isabs(item["audio_filepath"]):
                item["audio_filepath"] = str(root / item["audio_filepath"])
            if jail is not None:
                real = (root / item["audio_filepath"]).resolve()
                if not real.is_relative_to(jail):
                    err = ManifestError(f"{path}:{lineno}: utterance {item['id']!r}: audio {item['audio_filepath']!r} "
                                        f"resolves outside the audio root {jail}")
                    if on_bad_line is None:
                        raise err
                    on_bad_line(err)
                    continue
            yield item


def parse_line(line: str, path: str | os.PathLike, lineno: int, required: tuple[str, ...] = REQUIRED) -> dict:
    """One JSONL line -> dict with the ``required`` fields; ManifestError names ``path:line``."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
    missing = [k for k in required if k not in item]
    if missing:
        raise ManifestError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
    if "audio_filepath" in item and (not isinstance(item["audio_filepath"], str) or not item["audio_filepath"]):
        raise ManifestError(f"{path}:{lineno}: audio_filepath must be a non-empty string, got "
                            f"{item['audio_filepath']!r}")
    if "id" in item and (not isinstance(item["id"], (str, int)) or isinstance(item["id"], bool) or item["id"] == ""):
        raise ManifestError(f"{path}:{lineno}: id must be a non-empty string (or integer), got {item['id']!r}")
    if isinstance(item.get("id"), str) and "\ufffd" in item["id"]:
        raise ManifestError(f"{path}:{lineno}: id {item['id']!r} holds bytes that are not valid UTF-8; "
                            "convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)")
    return item


def unique_ids(items: Iterable[dict]) -> tuple[list[dict], list[str]]:
    """(items with the first occurrence of each id, ids seen again). Trainers skip and count repeats:
    a second line would weigh that utterance twice and break id-keyed outputs."""
    seen, keep, dup = set(), [], []
    for it in items:
        if it["id"] in seen:
            dup.append(str(it["id"]))
        else:
            seen.add(it["id"])
            keep.append(it)
    return keep, dup


def write_manifest(path: str | os.PathLike, items: Iterable[dict]) -> int:
    """Write ``items`` as JSONL atomically; returns the number of lines."""
    n = 0
    with atomic_write(path) as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
            n += 1
    return n

