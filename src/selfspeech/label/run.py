"""Resumable pseudo-labelling of a manifest with a teacher.

The output is append-only JSONL, one line per input utterance, written and
fsync'ed batch by batch. A killed run restarts where it stopped: ids already in
the output are not labelled again, and a half-written last line (the kill
landed mid-write) is cut off before appending. Each line is itself a manifest
item (audio path, speaker, metadata) whose ``text`` is the teacher's label, so
it feeds training directly; the input's reference ``text`` is never copied,
so no real label can leak into a pseudo-label run.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from selfspeech.audio.io import AudioError, load_item
from selfspeech.data.manifest import read_manifest
from selfspeech.data.segment import check_lengths
from selfspeech.label.filters import FilterConfig, flags_for
from selfspeech.label.teacher import MAX_SECONDS, Hypothesis

CHUNK = 256  # utterances read ahead and sorted by duration, so batches hold similar lengths


class Teacher(Protocol):
    backend: str

    def transcribe(self, wavs: list[np.ndarray]) -> list[Hypothesis]: ...


@dataclass
class LabelStats:
    total: int = 0
    already_done: int = 0
    labelled: int = 0
    failed: int = 0
    duplicate_ids: int = 0
    flags: Counter = field(default_factory=Counter)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    device: str | None = None        # where the teacher decoded (cpu, cuda:0) and in which compute type:
    compute_type: str | None = None  # int8 and float16 kernels can choose a different word now and then
    first_error: str | None = None   # "id: reason" of the first utterance that failed in this run

    @property
    def rtf(self) -> float:
        """Real-time factor: wall seconds per audio second (lower is faster)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")

    def as_dict(self) -> dict:
        return {"total": self.total, "already_done": self.already_done, "labelled": self.labelled,
                "failed": self.failed, "duplicate_ids": self.duplicate_ids, "flags": dict(self.flags),
                "audio_seconds": round(self.audio_seconds, 2), "wall_seconds": round(self.wall_seconds, 2),
                "rtf": round(self.rtf, 4) if self.audio_seconds else None,
                "device": self.device, "compute_type": self.compute_type, "first_error": self.first_error}

    def note_teacher(self, teacher) -> None:
        """Record the teacher's device and compute type (teachers without them leave None)."""
        dev = getattr(teacher, "device", None)
        self.device = str(dev) if dev is not None else None
        self.compute_type = getattr(teacher, "compute_type", None)


def recover_done_ids(out_path: Path) -> set[str]:
    """Ids already in ``out_path``; truncates a trailing half-written line in place."""
    if not out_path.exists():
        return set()
    done: set[str] = set()
    good_end = 0
    with open(out_path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a kill mid-write: the last line never got its newline
            try:
                done.add(str(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError):
                break  # a corrupt line: everything from here is redone
            good_end += len(raw)
    if good_end != out_path.stat().st_size:
        with open(out_path, "r+b") as f:
            f.truncate(good_end)
    return done


def _chunks(items: Iterator[dict], n: int) -> Iterator[list[dict]]:
    buf: list[dict] = []
    for it in items:
        buf.append(it)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _record(item: dict, teacher_name: str, hyp: Hypothesis | None, error: str | None,
            duration: float, filters: FilterConfig) -> dict:
    rec = {k: v for k, v in item.items() if k != "text"}  # never carry the reference
    rec.update(teacher=teacher_name, duration=round(duration, 4))
    if hyp is None:
        rec.update(text="", status="failed", error=error, flags=["failed"])
        return rec
    flags = flags_for(hyp.text, hyp.avg_logprob, hyp.compression_ratio, hyp.no_speech_prob, filters)
    if duration > MAX_SECONDS:
        flags.append("truncated_30s")
    rec.update(text=hyp.text, status="ok", avg_logprob=round(hyp.avg_logprob, 5),
               compression_ratio=round(hyp.compression_ratio, 4), no_speech_prob=round(hyp.no_speech_prob, 5),
               decode_seconds=round(hyp.decode_seconds, 5), flags=flags)
    return rec


def _transcribe_isolating(teacher: Teacher, wavs: list[np.ndarray]) -> list[Hypothesis | Exception]:
    """Batch decode; if the batch raises, decode one by one so only the culprit fails."""
    try:
        return list(teacher.transcribe(wavs))
    except Exception:
        out: list[Hypothesis | Exception] = []
        for w in wavs:
            try:
                out.append(teacher.transcribe([w])[0])
            except Exception as e:  # recorded as a failed utterance with its reason
                out.append(e)
        return out


def plan_batches(in_path: Path, done: set[str], batch_size: int, stats: "LabelStats",
                 limit: int | None = None) -> Iterator[list[dict]]:
    """The batches still to label, in the order the plain path decodes them.

    Items are read in chunks of ``CHUNK`` and sorted by duration inside a chunk
    (a batch's padding follows its longest item), so any runner that decodes
    these batches (one process, Ray actors) gets the same windows and texts.
    Duplicate ids and ids already in the output are counted in ``stats``.
    """
    ids_seen: set[str] = set()

    def pending() -> Iterator[dict]:
        for item in read_manifest(in_path):
            if limit is not None and stats.total >= limit:
                return
            stats.total += 1
            if item["id"] in ids_seen:
                stats.duplicate_ids += 1  # counted and reported, never labelled twice
                continue
            ids_seen.add(item["id"])
            if item["id"] in done:
                stats.already_done += 1
                continue
            yield item

    for chunk in _chunks(pending(), CHUNK):
        chunk.sort(key=lambda it: float(it.get("duration") or 0.0))
        for i in range(0, len(chunk), batch_size):
            yield chunk[i:i + batch_size]


def label_batch(teacher: Teacher, teacher_name: str, batch: list[dict], filters: FilterConfig) -> list[dict]:
    """Output records of one batch: unreadable audio and decoder failures become ``failed`` records."""
    recs, ok_items, wavs = [], [], []
    for item in batch:
        try:
            wavs.append(load_item(item))
            ok_items.append(item)
        except AudioError as e:
            recs.append(_record(item, teacher_name, None, str(e), 0.0, filters))
    if wavs:
        for item, wav, hyp in zip(ok_items, wavs, _transcribe_isolating(teacher, wavs)):
            dur = len(wav) / 16_000
            if isinstance(hyp, Exception):
                recs.append(_record(item, teacher_name, None, f"{type(hyp).__name__}: {hyp}", dur, filters))
            else:
                recs.append(_record(item, teacher_name, hyp, None, dur, filters))
    return recs


def write_records(out, recs: list[dict], stats: "LabelStats") -> None:
    """Append records durably (fsync: a kill loses at most the batch being written) and count them."""
    out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    out.flush()
    os.fsync(out.fileno())
    for r in recs:
        stats.failed += r["status"] == "failed"
        if r["status"] == "failed" and stats.first_error is None:
            stats.first_error = f"{r['id']}: {r.get('error')}"
        stats.labelled += r["status"] == "ok"
        if r["status"] == "ok":
            stats.audio_seconds += r["duration"]
        stats.flags.update(f for f in r["flags"] if f != "failed")


def label_manifest(in_path: str | os.PathLike, out_path: str | os.PathLike, teacher: Teacher,
                   teacher_name: str, batch_size: int = 8, filters: FilterConfig = FilterConfig(),
                   limit: int | None = None, progress: bool = True) -> LabelStats:
    """Label every utterance of ``in_path`` not yet in ``out_path``; returns counts and timing.

    A manifest with an utterance over 30 s is refused (TooLongError, before any
    decoding): cut it with :func:`selfspeech.data.segment.segment_manifest` first."""
    from tqdm import tqdm

    in_path, out_path = Path(in_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_lengths(in_path, MAX_SECONDS, limit)  # before decoding: Whisper would truncate a longer utterance
    done = recover_done_ids(out_path)
    stats = LabelStats()
    stats.note_teacher(teacher)
    n_in = sum(1 for _ in read_manifest(in_path))
    n_in = min(n_in, limit) if limit is not None else n_in
    bar = tqdm(total=max(n_in - len(done), 0), desc=f"label {teacher_name}", unit="utt", disable=not progress,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as out:
        for batch in plan_batches(in_path, done, batch_size, stats, limit):
            recs = label_batch(teacher, teacher_name, batch, filters)
            write_records(out, recs, stats)
            stats.wall_seconds = time.perf_counter() - t_start
            bar.update(len(recs))
            if stats.audio_seconds:
                bar.set_postfix(rtf=f"{stats.rtf:.3f}", x_realtime=f"{1 / max(stats.rtf, 1e-9):.1f}")
    bar.close()
    stats.wall_seconds = time.perf_counter() - t_start
    return stats
