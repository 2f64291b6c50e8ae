"""Per-utterance word alignments of references and hypotheses (``selfspeech eval --align``).

jiwer's ``process_words`` aligns each normalised reference with its hypothesis
(Levenshtein over words); the alignment is written as one JSONL line per
reference utterance, in reference order::

    {"id": "u1", "ref": "the cat sat", "hyp": "the bat", "substitutions": 1, "deletions": 1,
     "insertions": 0, "hits": 1, "ops": [["C", "the", "the"], ["S", "cat", "bat"], ["D", "sat", null]]}

``ops``: C correct, S substituted, D deleted (hyp null), I inserted (ref null),
one entry per word. A reference without a hypothesis is aligned with an empty
one (every word deleted), as it is scored.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

import jiwer

from selfspeech.data.atomic import atomic_write
from selfspeech.eval.wer import as_text

_OP = {"equal": "C", "substitute": "S", "delete": "D", "insert": "I"}
CHUNK = 1000  # utterances aligned per jiwer call


def align_words(ref: list[str], hyp: list[str], chunks) -> list[list]:
    """[op, ref word or None, hyp word or None] per word of jiwer's alignment ``chunks``."""
    ops: list[list] = []
    for c in chunks:
        op = _OP[c.type]
        rw, hw = ref[c.ref_start_idx:c.ref_end_idx], hyp[c.hyp_start_idx:c.hyp_end_idx]
        n = max(len(rw), len(hw))
        ops += [[op, rw[k] if k < len(rw) else None, hw[k] if k < len(hw) else None] for k in range(n)]
    return ops


def _records(uids: list[str], refs: list[str], hyps: list[str]) -> Iterable[dict]:
    refs, hyps = [" ".join(r.split()) for r in refs], [" ".join(h.split()) for h in hyps]
    out = jiwer.process_words(refs, hyps)
    for uid, r, h, rw, hw, chunks in zip(uids, refs, hyps, out.references, out.hypotheses, out.alignments):
        ops = align_words(rw, hw, chunks)
        n = {o: sum(x[0] == o for x in ops) for o in "SDIC"}
        yield {"id": uid, "ref": r, "hyp": h, "substitutions": n["S"], "deletions": n["D"],
               "insertions": n["I"], "hits": n["C"], "ops": ops}


def write_alignments(refs: Iterable[dict], source, norm: Callable[[str], str], path: str | os.PathLike) -> int:
    """Align every reference of ``refs`` with its hypothesis in ``source`` (``get(id)``); returns the count.

    Streams ``CHUNK`` utterances at a time; the file is written atomically."""
    n = 0
    buf: tuple[list, list, list] = ([], [], [])
    with atomic_write(path) as f:
        def flush() -> None:
            if buf[0]:
                f.write("".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in _records(*buf)))
            for b in buf:
                b.clear()

        for r in refs:
            h = source.get(r["id"])
            buf[0].append(r["id"])
            buf[1].append(norm(as_text(r.get("text"))))
            buf[2].append(norm(as_text(None if h is None else h.get("text"))))
            n += 1
            if len(buf[0]) >= CHUNK:
                flush()
        flush()
    return n
