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


def speech_span(item: dict, floor_db: float = 35.0, frame: float = 0.025, hop: float = 0.01) -> dict:
    """``item`` with ``offset``/``duration`` narrowed to its speech: from the first to the last 25-ms frame
    whose energy is within ``floor_db`` of the utterance's loudest (a recorded sentence carries leading and
    trailing silence that no segmenter should be asked to cover). Independent of any VAD."""
    import numpy as np

    from selfspeech.audio.io import SAMPLE_RATE, load_item

    wav = load_item(item)
    win, step = int(frame * SAMPLE_RATE), int(hop * SAMPLE_RATE)
    if len(wav) < win:
        return dict(item)
    n = 1 + (len(wav) - win) // step
    idx = np.arange(win)[None, :] + step * np.arange(n)[:, None]
    db = 10 * np.log10(np.mean(wav[idx].astype(np.float64) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(db >= db.max() - floor_db)
    start, end = loud[0] * step / SAMPLE_RATE, (loud[-1] * step + win) / SAMPLE_RATE
    o = float(item.get("offset") or 0.0)
    return {**item, "offset": o + start, "duration": end - start}


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
