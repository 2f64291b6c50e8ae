"""Check a manifest before anything long runs on it.

Each problem is a :class:`Problem` naming the utterance, its path and what is
wrong. Audio is decoded one utterance at a time (memory stays flat).
"""
from __future__ import annotations

import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import soundfile as sf

from selfspeech.audio.io import SAMPLE_RATE, item_span
from selfspeech.data.manifest import ManifestError, read_manifest

KINDS = ("missing_file", "unreadable_audio", "empty_audio", "nan_samples", "wrong_rate",
         "wrong_channels", "silent_audio", "clipped_audio", "too_short", "too_long", "empty_text", "non_text",
         "bad_id", "no_speaker", "duplicate_id", "bad_line")
# differences the audio readers convert on load (soxr resampling, mixdown to mono): the audio is usable as it
# is, so these are warnings; every other kind is an error
WARNING_KINDS = ("wrong_rate", "wrong_channels")
SILENCE_PEAK = 1e-4      # peak |x| below this: digital silence (-80 dBFS)
CLIP_LEVEL, CLIP_FRACTION = 0.999, 0.01  # more than 1% of samples at full scale: clipped


@dataclass(frozen=True)
class Problem:
    kind: str
    utt_id: str
    path: str
    detail: str

    @property
    def warning(self) -> bool:
        """True for a difference the readers convert (:data:`WARNING_KINDS`), False for an error."""
        return self.kind in WARNING_KINDS

    def __str__(self) -> str:
        if self.kind == "bad_line":  # utt_id holds "line N": the line has no usable id
            return f"{self.kind}: {self.path}, {self.utt_id}: {self.detail}"
        return f"{self.kind}: utterance {self.utt_id!r} ({self.path}): {self.detail}"


def text_problem(text) -> tuple[str, str] | None:
    """(kind, detail) if ``text`` is not a usable transcript, else None."""
    if not isinstance(text, str):
        return "non_text", f"transcript is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty_text", "transcript is empty"
    if "\ufffd" in text:
        return "non_text", "transcript contains U+FFFD (bytes that were not valid UTF-8)"
    if any(unicodedata.category(c) == "Cc" and c not in "\t\n" for c in text):
        return "non_text", "transcript contains control characters"
    if not any(c.isalnum() for c in text):
        return "non_text", f"transcript has no letters or digits: {text[:40]!r}"
    return None


def check_item(item: dict, sample_rate: int = SAMPLE_RATE, channels: int = 1, require_text: bool = True,
               require_speaker: bool = False, min_seconds: float = 0.1, max_seconds: float = 30.0) -> list[Problem]:
    """All problems of one manifest item (decodes its audio)."""
    uid, path = item["id"], item["audio_filepath"]
    out = []
    if "\ufffd" in uid:
        out.append(Problem("bad_id", uid, path, "id contains U+FFFD (bytes that were not valid UTF-8)"))
    if require_speaker and not str(item.get("speaker") or "").strip():
        out.append(Problem("no_speaker", uid, path, "no speaker field (speaker-disjoint splits and CIs need it)"))
    text = item.get("text")
    if require_text or not (text is None or (isinstance(text, str) and not text.strip())):  # unlabelled: no text
        tp = text_problem(text)
        if tp:
            out.append(Problem(tp[0], uid, path, tp[1]))
    if not os.path.exists(path):
        return out + [Problem("missing_file", uid, path, "file not found")]
    try:
        with sf.SoundFile(path) as f:
            sr, ch = f.samplerate, f.channels
            offset, end = item_span(item)
            start = int(round(offset * sr))
            f.seek(start)
            wav = f.read(-1 if end is None else max(0, int(round((end - offset) * sr))), dtype="float32")
    except Exception as e:
        msg = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
        return out + [Problem("unreadable_audio", uid, path, msg)]
    if sr != sample_rate:
        out.append(Problem("wrong_rate", uid, path, f"{sr} Hz, expected {sample_rate} Hz (resampled on load)"))
    if ch != channels:
        out.append(Problem("wrong_channels", uid, path, f"{ch} channels, expected {channels} (mixed down on load)"))
    if wav.size == 0:
        out.append(Problem("empty_audio", uid, path, "0 samples"))
    elif not np.isfinite(wav).all():
        out.append(Problem("nan_samples", uid, path, f"{int((~np.isfinite(wav)).sum())} NaN/inf samples"))
    else:
        peak, seconds = float(np.abs(wav).max()), len(wav) / sr
        if peak < SILENCE_PEAK:
            out.append(Problem("silent_audio", uid, path, f"digital silence (peak {peak:.1e})"))
        clipped = float((np.abs(wav) >= CLIP_LEVEL).mean())
        if clipped > CLIP_FRACTION:
            out.append(Problem("clipped_audio", uid, path, f"{100 * clipped:.1f}% of samples at full scale"))
        if seconds < min_seconds:
            out.append(Problem("too_short", uid, path, f"{seconds:.3f} s (< {min_seconds} s)"))
        if seconds > max_seconds:
            out.append(Problem("too_long", uid, path, f"{seconds:.1f} s (> {max_seconds} s: Whisper sees 30 s; "
                               "segment it or raise --max-seconds)"))
    return out


def validate_manifest(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, channels: int = 1,
                      require_text: bool = True, items: Iterable[dict] | None = None,
                      **limits) -> Iterator[Problem | dict]:
    """Yield every item checked (as the dict) and every Problem found, streaming.

    Malformed lines are reported as ``bad_line`` problems and checking goes on
    with the following lines.
    """
    seen: Counter[str] = Counter()
    bad: list[ManifestError] = []
    it = items if items is not None else read_manifest(path, on_bad_line=bad.append)
    for item in it:
        yield from map(_bad_line, bad)
        bad.clear()
        seen[item["id"]] += 1
        if seen[item["id"]] == 2:
            yield Problem("duplicate_id", item["id"], item["audio_filepath"], "id appears more than once")
        yield from check_item(item, sample_rate, channels, require_text, **limits)
        yield item
    yield from map(_bad_line, bad)


def _bad_line(e: ManifestError) -> Problem:
    where, _, what = str(e).partition(": ")  # "file:line: what"
    return Problem("bad_line", f"line {where.rsplit(':', 1)[-1]}", where.rsplit(":", 1)[0], what[:160])
