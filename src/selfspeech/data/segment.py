"""Cut long recordings (lectures, calls) into utterances with a voice-activity detector.

The detector is Silero VAD as faster-whisper ships it (``faster_whisper.vad``:
the ONNX model is inside the wheel, it runs on 16 kHz audio with one CPU
thread). Its speech regions are then shaped for Whisper, whose window is 30 s:

1. the VAD ends a region after 100 ms of silence; regions closer than
   ``merge_gap`` are then joined while the result still fits;
2. a region that does not fit is split at its lowest-energy 10-ms frame, no
   part shorter than ``min_seconds`` (the splitting is done here rather than by
   the VAD's ``max_speech_duration_s``, whose cuts can leave a tail too short to keep);
3. a region shorter than ``min_seconds`` is joined to its nearer neighbour
   (gap at most ``join_gap``; a pair that no longer fits is split again at its
   quietest frame), otherwise dropped and counted (``dropped_regions``,
   ``dropped_seconds``);
4. each region is padded by ``pad_seconds`` on each side, clipped to the file
   and to the middle of the gap to its neighbour, so segments never overlap.

Every segment is at most ``max_seconds`` long, padding included. Segments are
manifest items pointing into the original file with NeMo's ``offset`` and
``duration`` (seconds, on a 1-ms grid); no audio is copied. A segment's id is
``<recording id>_<start ms within the item>``, zero-padded so ids sort in time order, and
``recording`` names the source item, whose other fields (speaker, metadata)
are copied; its ``text`` is not (a recording's transcript does not belong to
one segment). A source item that is already at most ``max_seconds`` long and
holds one speech region passes through unchanged, text included (plus
``recording``).
With ``untouched_up_to`` (``label --segment`` uses 30 s) items at most that
long pass through without running the VAD at all.

A recording is decoded whole at 16 kHz (float32: 230 MB an hour of audio).
Output is written recording by recording (fsync'ed), with one line per
finished recording in ``OUT.recordings.jsonl`` (its counts, and the first line
the options): a killed run, rerun with the same command, keeps the finished
recordings and redoes only the one it was cutting. ``OUT.summary.json`` holds
the totals.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from selfspeech.audio.io import SAMPLE_RATE, AudioError, audio_info, load_item
from selfspeech.data.atomic import atomic_write, write_json
from selfspeech.data.manifest import ManifestError, read_manifest

WHISPER_SECONDS = 30.0    # Whisper's window: the longest segment a teacher sees whole
VAD_MIN_SILENCE_MS = 100  # the VAD ends a region after this much silence; merge_gap then joins regions
SOURCE_ONLY = ("id", "text", "offset", "end", "duration", "recording")  # fields a segment sets or drops


class TooLongError(ManifestError):
    """An utterance longer than Whisper's window where nothing may be truncated."""


@dataclass(frozen=True)
class SegmentConfig:
    """How recordings are cut (seconds; ``threshold`` is the VAD's speech probability)."""

    min_seconds: float = 1.0
    max_seconds: float = WHISPER_SECONDS
    # threshold and padding chosen on long recordings of speechocean762's adult speakers (the
    # highest speech coverage at <= 1.25 s of audio per second of speech; benchmarks/long_form_vad.py):
    # Silero's usual 0.5 and a 0.2-s pad cut the soft onsets and endings of words; the pad is
    # clipped to half the gap to the next region, so a wide one never makes segments overlap
    pad_seconds: float = 0.8
    merge_gap: float = 0.5
    threshold: float = 0.35
    join_gap: float = 2.0  # a short region joins a neighbour at most this far away
    untouched_up_to: float = 0.0  # items at most this long pass through without the VAD (0: every item is cut)

    def __post_init__(self):
        if not 0 < self.max_seconds <= WHISPER_SECONDS:
            raise ValueError(f"--max-seconds {self.max_seconds}: must be in (0, {WHISPER_SECONDS:g}] "
                             "(Whisper's window)")
        if not 0 <= self.pad_seconds <= self.max_seconds / 4:
            raise ValueError(f"--pad-seconds {self.pad_seconds}: must be >= 0 and at most a quarter of "
                             f"--max-seconds ({self.max_seconds:g})")
        if not 0 <= self.min_seconds <= self.core_max / 2:
            raise ValueError(f"--min-seconds {self.min_seconds}: must be >= 0 and at most half of --max-seconds "
                             f"less twice --pad-seconds ({self.core_max / 2:.2f} s), so a split never leaves "
                             "a part too short to keep")
        if self.merge_gap < 0:
            raise ValueError(f"--merge-gap {self.merge_gap}: must be >= 0")
        if self.join_gap < 0:
            raise ValueError(f"join_gap {self.join_gap}: must be >= 0")
        if not 0 < self.threshold < 1:
            raise ValueError(f"--threshold {self.threshold}: the VAD's speech probability must be in (0, 1)")

    @property
    def core_max(self) -> float:
        """Longest region before padding; 2 ms spare for the 1-ms grid."""
        return self.max_seconds - 2 * self.pad_seconds - 0.002


@dataclass
class Cut:
    """One recording's segments as [start, end) sample pairs (16 kHz), and what was dropped."""

    segments: list[tuple[int, int]]
    dropped_regions: int = 0
    dropped_samples: int = 0


def vad_regions(wav: np.ndarray, cfg: SegmentConfig) -> list[tuple[int, int]]:
    """Silero VAD speech regions of (T,) float32 16-kHz ``wav`` as [start, end) samples, unpadded."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    opts = VadOptions(threshold=cfg.threshold, min_speech_duration_ms=0, max_speech_duration_s=float("inf"),
                      min_silence_duration_ms=VAD_MIN_SILENCE_MS, speech_pad_ms=0)
    return [(int(r["start"]), int(r["end"])) for r in get_speech_timestamps(wav, opts, SAMPLE_RATE)
            if r["end"] > r["start"]]


def _merge_close(regions: list[tuple[int, int]], gap: int, limit: int) -> list[tuple[int, int]]:
    """Join neighbours less than ``gap`` samples apart while the joined region is at most ``limit``."""
    out: list[tuple[int, int]] = []
    for s, e in regions:
        if out and s - out[-1][1] < gap and e - out[-1][0] <= limit:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _absorb_short(wav: np.ndarray, regions: list[tuple[int, int]], shortest: int, gap: int,
                  limit: int) -> list[tuple[int, int]]:
    """Join each region shorter than ``shortest`` to its nearer neighbour within ``gap`` samples; when the
    two do not fit in ``limit``, the pair is split again at its quietest frame (both parts long enough).
    A short region with no neighbour that near stays short (the caller drops it)."""
    regs = list(regions)
    i = 0
    while i < len(regs):
        s, e = regs[i]
        if e - s >= shortest:
            i += 1
            continue
        near = [(s - regs[i - 1][1], i - 1)] if i > 0 else []
        near += [(regs[i + 1][0] - e, i + 1)] if i + 1 < len(regs) else []
        near = sorted(c for c in near if c[0] <= gap)
        fits = [c for c in near if max(regs[c[1]][1], e) - min(regs[c[1]][0], s) <= limit]
        if not near:
            i += 1
            continue
        a, b = sorted((i, (fits or near)[0][1]))
        parts = _split_long(wav, regs[a][0], regs[b][1], limit, shortest)
        regs[a:b + 1] = parts
        i = a if len(parts) == 1 else a + len(parts)  # a joined region may still be short; re-split ones are not
    return regs


def _quietest(wav: np.ndarray, lo: int, hi: int) -> int:
    """Centre sample of the lowest-energy 10-ms frame in [lo, hi)."""
    hop = SAMPLE_RATE // 100
    n = (hi - lo) // hop
    if n < 1:
        return (lo + hi) // 2
    frames = wav[lo:lo + n * hop].astype(np.float64).reshape(n, hop)
    return lo + int(np.argmin((frames ** 2).mean(1))) * hop + hop // 2


def _split_long(wav: np.ndarray, s: int, e: int, limit: int, shortest: int) -> list[tuple[int, int]]:
    """[s, e) cut at quiet frames into parts of at most ``limit`` samples, none shorter than ``shortest``
    (``shortest`` <= ``limit`` / 2) where the length allows."""
    out = []
    while e - s > limit:
        lo, hi = max(s + shortest, e - limit), min(e - shortest, s + limit)
        if lo >= hi:  # longer than twice the limit: cut within the first limit, then go on with the rest
            lo, hi = s + shortest, s + limit
        cut = _quietest(wav, lo, hi)
        out.append((s, cut))
        s = cut
    return out + [(s, e)]


def _pad(regions: list[tuple[int, int]], pad: int, n: int) -> list[tuple[int, int]]:
    """Pad each side by ``pad`` samples, clipped to [0, n) and to the middle of each gap; 1-ms grid."""
    ms = SAMPLE_RATE // 1000
    out = []
    for i, (s, e) in enumerate(regions):
        left = 0 if i == 0 else (regions[i - 1][1] + s) // 2
        right = n if i == len(regions) - 1 else (e + regions[i + 1][0]) // 2
        a, b = max(s - pad, left), min(e + pad, right)
        a, b = (a // ms) * ms, min(-(-b // ms) * ms, (n // ms) * ms)
        if i and out and a < out[-1][1]:
            a = out[-1][1]
        if b > a:
            out.append((a, b))
    return out


def cut_recording(wav: np.ndarray, cfg: SegmentConfig = SegmentConfig()) -> Cut:
    """Segments of one (T,) float32 16-kHz recording: VAD regions merged, short ones absorbed or dropped,
    long ones split, then padded; each at most ``cfg.max_seconds``."""
    sr = SAMPLE_RATE
    limit = int(cfg.core_max * sr)
    shortest = round(cfg.min_seconds * sr)
    regions = _merge_close(vad_regions(wav, cfg), int(cfg.merge_gap * sr), limit)
    regions = [p for s, e in regions for p in _split_long(wav, s, e, limit, shortest)]
    regions = _absorb_short(wav, regions, shortest, int(cfg.join_gap * sr), limit)
    kept = [r for r in regions if r[1] - r[0] >= shortest]
    dropped = [r for r in regions if r[1] - r[0] < shortest]
    return Cut(_pad(kept, round(cfg.pad_seconds * sr), len(wav)), len(dropped),
               sum(e - s for s, e in dropped))


def item_seconds(item: dict) -> float:
    """Seconds a reader takes from a manifest item: ``end - offset``, else ``duration``, else the header."""
    offset = float(item.get("offset") or 0.0)
    if item.get("end") is not None:
        return float(item["end"]) - offset
    if item.get("duration") is not None:
        return float(item["duration"])
    return audio_info(item["audio_filepath"]).duration - offset


def check_lengths(manifest: str | os.PathLike, max_seconds: float = WHISPER_SECONDS,
                  limit: int | None = None) -> None:
    """Refuse (TooLongError, one line) a manifest with an utterance longer than ``max_seconds``.

    Durations come from the manifest (``end``/``duration``) or the audio header,
    so nothing is decoded. Unreadable audio is left to the labeller, which records it.
    """
    long, first = 0, None
    for n, item in enumerate(read_manifest(manifest)):
        if limit is not None and n >= limit:
            break
        try:
            sec = item_seconds(item)
        except AudioError:
            continue
        if sec > max_seconds:
            long += 1
            first = first or (item["id"], sec)
    if first:
        more = f" (and {long - 1} more)" if long > 1 else ""
        raise TooLongError(f"{manifest}: utterance {first[0]!r} is {first[1]:.1f} s{more}, longer than Whisper's "
                           f"{max_seconds:g}-s window, so its label would be truncated; cut the recordings first "
                           f"with `selfspeech data segment {manifest} SEGMENTS.jsonl`, or label with --segment")


def segment_items(item: dict, cut: Cut, seconds: float, max_seconds: float = WHISPER_SECONDS) -> list[dict]:
    """Manifest lines of one recording's segments; an item of at most ``max_seconds`` holding one segment
    passes through unchanged (text included), with ``recording`` and, if it had none, ``duration``."""
    rid = str(item["id"])
    if seconds <= max_seconds and len(cut.segments) == 1:
        return [{**item, "recording": rid, "duration": item.get("duration", round(seconds, 4))}]
    base = float(item.get("offset") or 0.0)
    width = max(8, len(str(int(seconds * 1000))))
    rest = {k: v for k, v in item.items() if k not in SOURCE_ONLY and k != "audio_filepath"}
    ms = SAMPLE_RATE // 1000
    return [{"id": f"{rid}_{s // ms:0{width}d}", "audio_filepath": item["audio_filepath"],
             "offset": round(base + s / SAMPLE_RATE, 3), "duration": round((e - s) / SAMPLE_RATE, 3),
             "recording": rid, **rest} for s, e in cut.segments]


# -- the resumable runner ----------------------------------------------------------------

def side_paths(out_path: str | os.PathLike) -> tuple[Path, Path]:
    """(per-recording log, summary) written beside ``out_path``: OUT.recordings.jsonl, OUT.summary.json."""
    out = Path(out_path)
    return out.with_name(out.name + ".recordings.jsonl"), out.with_name(out.name + ".summary.json")


def _complete_rows(path: Path) -> list[dict]:
    """The JSON lines of append-only ``path``, cutting off in place a tail a kill left half-written."""
    if not path.exists():
        return []
    rows, good = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no newline")
                rows.append(json.loads(raw))
            except ValueError:
                break
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return rows


def _resume(out: Path, log: Path, cfg: SegmentConfig) -> dict[str, dict]:
    """The per-recording records of an earlier run (latest per recording); OUT keeps only the segments of
    recordings whose record was written (a kill mid-recording leaves some: that recording is redone)."""
    if out.exists() and out.stat().st_size and not log.exists():
        raise ManifestError(f"{out}: exists but was not written by `selfspeech data segment` (no {log.name}); "
                            "remove it or choose another output")
    rows = _complete_rows(log)
    if rows and rows[0].get("config") != asdict(cfg):
        old = rows[0].get("config") or {}
        diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in asdict(cfg).items() if old.get(k) != v)
        raise ValueError(f"{out}: cut with other options ({diff}); rerun with the same options, or remove "
                         f"{out} and {log} to start again")
    if not rows:
        with open(log, "w", encoding="utf-8") as f:
            _append(f, [{"config": asdict(cfg)}])
    records = {r["recording"]: r for r in rows[1:] if "recording" in r}
    segs = _complete_rows(out)
    if any(records.get(s.get("recording"), {}).get("status") != "ok" for s in segs):
        with atomic_write(out) as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in segs
                         if records.get(s.get("recording"), {}).get("status") == "ok")
    return records


def _append(f, rows: list[dict]) -> None:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())


def _cut_item(item: dict, cfg: SegmentConfig) -> tuple[dict, list[dict]]:
    """(the recording's record, its segment lines); unreadable audio gives a ``failed`` record."""
    rid = str(item["id"])
    if cfg.untouched_up_to:
        try:
            seconds = item_seconds(item)
        except AudioError:  # left to the reader downstream, which records it
            seconds = 0.0
        if seconds <= cfg.untouched_up_to:
            return {"recording": rid, "status": "ok", "seconds": round(seconds, 3), "segments": 1,
                    "passed_through": True, "speech_seconds": round(seconds, 3), "dropped_regions": 0,
                    "dropped_seconds": 0.0}, [{**item, "recording": rid}]
    try:
        wav = load_item(item)
    except AudioError as e:
        return {"recording": rid, "status": "failed", "error": str(e)}, []
    seconds = len(wav) / SAMPLE_RATE
    cut = cut_recording(wav, cfg)
    lines = segment_items(item, cut, seconds, cfg.max_seconds)
    passed = len(lines) == 1 and lines[0]["id"] == rid
    speech = seconds if passed else sum(x["duration"] for x in lines)
    dropped = 0 if passed else cut.dropped_samples  # an item passed through keeps all of its audio
    return {"recording": rid, "status": "ok" if lines else "no_speech", "seconds": round(seconds, 3),
            "segments": len(lines), "passed_through": passed, "speech_seconds": round(speech, 3),
            "dropped_regions": cut.dropped_regions if dropped else 0,
            "dropped_seconds": round(dropped / SAMPLE_RATE, 3)}, lines


def summarise(records: dict[str, dict], cfg: SegmentConfig, duplicate_ids: int = 0, resumed: int = 0) -> dict:
    """Totals over the per-recording records (seconds rounded to 0.01)."""
    rs = list(records.values())

    def total(key: str) -> float:
        return round(sum(r.get(key, 0) for r in rs), 2)

    return {"recordings": len(rs), "segments": int(total("segments")),
            "passed_through": sum(bool(r.get("passed_through")) for r in rs),
            "audio_seconds": total("seconds"), "speech_seconds": total("speech_seconds"),
            "dropped_regions": int(total("dropped_regions")), "dropped_seconds": total("dropped_seconds"),
            "no_speech_recordings": sum(r["status"] == "no_speech" for r in rs),
            "failed_recordings": sum(r["status"] == "failed" for r in rs),
            "failed": [f"{r['recording']}: {r.get('error')}" for r in rs if r["status"] == "failed"][:20],
            "duplicate_ids": duplicate_ids, "resumed": resumed, "config": asdict(cfg)}


def segment_manifest(in_path: str | os.PathLike, out_path: str | os.PathLike,
                     cfg: SegmentConfig = SegmentConfig(), progress: bool = True) -> dict:
    """Cut every recording of ``in_path`` into segments appended to ``out_path``; returns the summary.

    Resumable: recordings already finished in ``out_path`` are skipped, a failed
    one is retried. Duplicate input ids are skipped and counted.
    """
    from tqdm import tqdm

    in_path, out = Path(in_path), Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    log, summary_path = side_paths(out)
    records = _resume(out, log, cfg)
    n_in = sum(1 for _ in read_manifest(in_path))
    seen: set[str] = set()
    dup = resumed = 0
    n_segments = sum(r.get("segments", 0) for r in records.values())
    bar = tqdm(total=n_in, desc="segment", unit="rec", disable=not progress, dynamic_ncols=True)
    with open(out, "a", encoding="utf-8") as fo, open(log, "a", encoding="utf-8") as fl:
        for item in read_manifest(in_path):
            bar.update()
            rid = str(item["id"])
            if rid in seen:
                dup += 1
                continue
            seen.add(rid)
            if records.get(rid, {}).get("status") in ("ok", "no_speech"):
                resumed += 1
                continue
            rec, lines = _cut_item(item, cfg)
            if lines:
                _append(fo, lines)  # segments first, then the record that marks the recording finished
            _append(fl, [rec])
            records[rid] = rec
            if rec["status"] == "failed":
                bar.write(f"{rid}: {rec['error']}")
            n_segments += len(lines)
            bar.set_postfix(segments=n_segments)
    bar.close()
    summary = summarise(records, cfg, dup, resumed)
    write_json(summary_path, summary)
    return summary
