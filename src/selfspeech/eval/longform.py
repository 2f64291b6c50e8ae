"""Scoring long recordings: how much known speech the segments cover, and WER per recording.

A segmenter's output (``selfspeech data segment``: offsets into the recording)
is compared with a reference of where the utterances really are (the same
files, ``offset`` + ``duration``, with transcripts). Transcripts are compared
per recording: the segments' texts in time order, joined, against the
utterances' texts in time order, joined, so a sentence cut in two or two joined
in one costs nothing, and speech a segmenter dropped counts as deletions.
"""
from __future__ import annotations

from pathlib import Path


def _file(item: dict) -> str:
    return str(Path(item["audio_filepath"]).resolve())


def _span(item: dict) -> tuple[float, float]:
    o = float(item.get("offset") or 0.0)
    return o, o + float(item["duration"])


def speech_coverage(refs: list[dict], segs: list[dict]) -> float:
    """The share of the reference speech seconds that lie inside a segment of the same file (0 to 1)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for s in segs:
        by.setdefault(_file(s), []).append(_span(s))
    inside = total = 0.0
    for r in refs:
        a, b = _span(r)
        total += b - a
        spans = sorted(by.get(_file(r), []))
        covered, reach = 0.0, a  # segments may touch or overlap: count each second once
        for s, e in spans:
            lo, hi = max(s, reach), min(e, b)
            if hi > lo:
                covered += hi - lo
                reach = hi
        inside += covered
    return inside / total if total else 0.0


def recording_texts(items: list[dict], texts: dict[str, str]) -> dict[str, str]:
    """Audio file -> the texts (``texts[item id]``) of its items in time order, joined by spaces."""
    by: dict[str, list[tuple[float, str]]] = {}
    for it in items:
        by.setdefault(_file(it), []).append((_span(it)[0], texts.get(it["id"], "")))
    return {k: " ".join(t for _, t in sorted(v) if t) for k, v in by.items()}


def recording_wer(refs: dict[str, str], hyps: dict[str, str], normalizer: str = "whisper_english") -> float:
    """Corpus WER over recordings (every reference recording counted; a missing one is all deletions)."""
    import jiwer

    from selfspeech.text.normalize import get_normalizer

    norm = get_normalizer(normalizer)
    keys = sorted(k for k in refs if norm(refs[k]))
    out = jiwer.process_words([norm(refs[k]) for k in keys], [norm(hyps.get(k, "")) for k in keys])
    return float(out.wer)
