"""JSONL manifests: one utterance a line, NeMo field names plus free metadata.

A line looks like::

    {"id": "000010011", "audio_filepath": "/abs/a.flac", "duration": 2.4,
     "text": "WE CALL IT BEAR", "speaker": "0001", "age": 6, "group": "child"}

``audio_filepath`` may be relative: it is then resolved against the manifest's
own folder, so a corpus folder can be moved as a whole. ``id`` may be absent
(NeMo manifests have none): it is then derived from the audio path, see
:func:`derived_id`. Reading streams (a
generator), so a manifest of any size never sits in memory with its audio.
Writing is atomic (temp file + rename): a killed writer leaves the old file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePath
from typing import Callable, Iterable, Iterator

from selfspeech.data.atomic import atomic_write

REQUIRED = ("id", "audio_filepath")  # a line without ``id`` gets :func:`derived_id` of its audio path


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names file and line."""


def read_manifest(path: str | os.PathLike, resolve_paths: bool = True,
                  on_bad_line: Callable[[ManifestError], None] | None = None,
                  audio_root: str | os.PathLike | None = None) -> Iterator[dict]:
    """Yield one dict per non-empty line of a JSONL manifest.

    A line without ``id`` gets :func:`derived_id` (same line, same id on every
    read). Raises ManifestError naming ``path:line`` for a line that is not a
    JSON object or lacks ``audio_filepath``; with ``on_bad_line`` the error
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


def safe_id(text: str) -> str:
    """``text`` with path separators and whitespace replaced by ``_``: usable as an id, a Kaldi key and a file name."""
    return re.sub(r"[\s/\\]+", "_", text).strip("_")


def derived_id(audio_filepath: str, root: str | os.PathLike, offset: float | None = None) -> str:
    """The id of a line that has none: its audio path without extension, separators replaced by ``_``.

    The path is taken as written, relative to ``root`` (the manifest's folder)
    when it lies inside it, else without its leading ``/``; ``.``/``..`` parts
    are dropped. With an ``offset`` (seconds) ``_<offset in ms>`` is appended,
    so segments of one file differ: ``spk1/a.wav`` at 1.5 s -> ``spk1_a_1500``.
    Two lines naming the same audio and offset get the same id: a duplicate,
    reported by ``data validate`` and skipped by the trainers like any other.
    """
    p = PurePath(os.path.normpath(audio_filepath))
    if p.is_absolute():
        roots = [r for r in (os.path.abspath(root), os.path.realpath(root)) if p.is_relative_to(r)]
        p = p.relative_to(roots[0]) if roots else PurePath(*p.parts[1:])
    parts = [x for x in p.parts if x not in (".", "..")]
    if parts:
        parts[-1] = os.path.splitext(parts[-1])[0] or parts[-1]
    uid = safe_id("/".join(parts))
    if offset is not None:
        uid = f"{uid}_{int(round(float(offset) * 1000))}"
    return uid


def _add_derived_id(item: dict, path: str | os.PathLike, lineno: int) -> None:
    if "id" in item or not isinstance(item.get("audio_filepath"), str) or not item["audio_filepath"]:
        return
    try:
        uid = derived_id(item["audio_filepath"], Path(path).parent, item.get("offset"))
    except (TypeError, ValueError, OverflowError):
        raise ManifestError(f"{path}:{lineno}: offset must be a number of seconds, got {item.get('offset')!r}") from None
    if not uid or "\ufffd" in uid:
        raise ManifestError(f"{path}:{lineno}: no id can be derived from audio_filepath {item['audio_filepath']!r}; "
                            "add an \"id\" field (or convert the file to UTF-8)")
    item["id"] = uid


def parse_line(line: str, path: str | os.PathLike, lineno: int, required: tuple[str, ...] = REQUIRED) -> dict:
    """One JSONL line -> dict with the ``required`` fields; ManifestError names ``path:line``.

    A line with an ``audio_filepath`` but no ``id`` gets :func:`derived_id`.
    """
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
    _add_derived_id(item, path, lineno)
    missing = [k for k in required if k not in item]
    if missing:
        both = {"id", "audio_filepath"} <= set(missing)
        hint = " (the id is derived from audio_filepath when absent)" if both else ""
        raise ManifestError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}{hint}")
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

