"""Reference and hypothesis sources for scoring: a JSONL file indexed on disk, or an in-memory list.

Scoring 50,000 utterances must not hold 50,000 texts: evaluation memory stays
flat from 1k to 50k utterances. :class:`JsonlIndex` reads a JSONL file
once to validate it and remember, per line, a 64-bit hash of its id and the
line's byte offset (25 bytes a line); a lookup by id seeks to the line and
parses it again. Hash collisions are harmless: every candidate line's id is
compared with the one asked for. Both sources answer the same three questions:
``get(id)`` (the item or None), ``n`` (lines) and ``unused()`` (ids never asked
for, in file order: hypotheses the reference does not have).
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from array import array
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from selfspeech.data.manifest import ManifestError, parse_line


_PARTIAL = object()
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # split after a \r that is not part of \r\n


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line) of a binary file, split as text mode splits (universal newlines: \n, \r\n, \r)."""
    off = f.tell()
    for chunk in f:
        for raw in _LONE_CR.split(chunk) if b"\r" in chunk else (chunk,):
            if raw:
                yield off, raw
                off += len(raw)


def id_hash(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class JsonlIndex:
    """A validated JSONL file of objects with ``required`` fields, random access by ``id``.

    The same rules as ``eval.report.read_jsonl``: ``id`` becomes a string,
    duplicate ids are an error naming both lines, and with
    ``allow_partial_last`` an unterminated unparsable last line (a labeller
    still writing) is skipped with a warning. Items are returned with only the
    ``keep`` fields (all if None). Raises ManifestError naming ``path:line``.
    """

    def __init__(self, path: str | os.PathLike, required: Sequence[str] = ("id",), allow_partial_last: bool = False,
                 warn: Callable[[str], None] | None = None, keep: Sequence[str] | None = None):
        self.path, self.required, self.keep = Path(path), tuple(required), keep
        warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
        if not self.path.is_file():
            raise ManifestError(f"{self.path}: file not found")
        hashes, offsets, linenos = array("Q"), array("q"), array("q")
        self._end = 0  # bytes of the file that were read as complete lines (a partial last line is not)
        with open(self.path, "rb") as f:
            for lineno, (off, raw) in enumerate(_lines(f), 1):
                item = self._parse(raw, lineno, allow_partial_last)
                if item is _PARTIAL:
                    warn(f"{self.path}:{lineno}: ignoring half-written last line (labelling in progress?)")
                    break
                if item is not None:
                    hashes.append(id_hash(str(item["id"])))
                    offsets.append(off)
                    linenos.append(lineno)
                self._end = off + len(raw)
        order = np.argsort(np.frombuffer(hashes, np.uint64), kind="stable")  # stable: file order within a hash
        self._hash = np.frombuffer(hashes, np.uint64)[order]
        self._off = np.frombuffer(offsets, np.int64)[order]
        self._line = np.frombuffer(linenos, np.int64)[order]
        self._used = np.zeros(len(order), dtype=bool)
        self.n = len(order)
        self._check_duplicates()

    def _parse(self, raw: bytes, lineno: int, allow_partial: bool = False):
        """The line's item; None for a blank line; _PARTIAL for a tolerated half-written last line."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(f"{self.path}:{lineno}: not UTF-8 (byte {e.start}); re-encode the file "
                                "as UTF-8") from None
        if not line.strip():  # str.strip, as read_jsonl: Unicode whitespace and separators count as blank
            return None
        try:
            item = parse_line(line, self.path, lineno, self.required)
        except ManifestError:
            if allow_partial and not raw.endswith((b"\n", b"\r")):
                return _PARTIAL
            raise
        item["id"] = str(item["id"])
        return item

    def _read(self, j: int) -> dict:
        with open(self.path, "rb") as f:  # ~20 us a lookup: 1 s for 50k, no handle left open
            f.seek(int(self._off[j]))
            return self._parse(next(_lines(f))[1], int(self._line[j]))

    def _check_duplicates(self) -> None:
        same = np.flatnonzero(self._hash[1:] == self._hash[:-1])
        dups = []
        for j in same:  # equal hashes: the same id, or (rarely) a collision
            a, b = self._read(j), self._read(j + 1)
            if a["id"] == b["id"]:
                dups.append((int(self._line[j + 1]), a["id"], int(self._line[j])))
        if dups:
            line, uid, first = min(dups)  # the first duplicate in file order, as a sequential reader finds it
            first = min(int(self._line[k]) for k in np.flatnonzero(self._hash == id_hash(uid)))
            raise ManifestError(f"{self.path}:{line}: duplicate id {uid!r} (first on line {first})")

    def _kept(self, item: dict) -> dict:
        return item if self.keep is None else {k: item[k] for k in self.keep if k in item}

    def _find(self, uid: str) -> tuple[int, dict] | None:
        """(row, item) of the line with this id, or None."""
        h = np.uint64(id_hash(uid))
        j = int(np.searchsorted(self._hash, h))
        while j < self.n and self._hash[j] == h:
            item = self._read(j)
            if item["id"] == uid:
                return j, item
            j += 1
        return None

    def get(self, uid: str) -> dict | None:
        """The item with this id (marked used), or None."""
        found = self._find(uid)
        if found is None:
            return None
        self._used[found[0]] = True
        return self._kept(found[1])

    def __contains__(self, uid: str) -> bool:
        """Whether a line has this id (not marked used: :meth:`unused` still counts it)."""
        return self._find(uid) is not None

    def __iter__(self) -> Iterator[dict]:
        """Every item in file order (the full item: ``keep`` applies to ``get`` only)."""
        with open(self.path, "rb") as f:
            for lineno, (off, raw) in enumerate(_lines(f), 1):
                if off >= self._end:
                    break
                item = self._parse(raw, lineno)
                if item is not None:
                    yield item

    def unused(self, limit: int) -> tuple[int, list[str]]:
        """(count, first ``limit`` ids in file order) of the lines ``get`` never returned."""
        idx = np.flatnonzero(~self._used)
        first = idx[np.argsort(self._line[idx], kind="stable")[:limit]]
        return len(idx), [self._read(int(j))["id"] for j in first]


class ListSource:
    """The same interface over a list of dicts already in memory (the last of repeated ids wins)."""

    def __init__(self, items: Sequence[dict]):
        self.by_id = {str(h["id"]): h for h in items}
        self.n = len(items)
        self._used: set[str] = set()

    def __contains__(self, uid: str) -> bool:
        return uid in self.by_id

    def get(self, uid: str) -> dict | None:
        item = self.by_id.get(uid)
        if item is not None:
            self._used.add(uid)
        return item

    def unused(self, limit: int) -> tuple[int, list[str]]:
        ids = [i for i in self.by_id if i not in self._used]
        return len(ids), ids[:limit]
