"""Import a Kaldi data directory into a JSONL manifest.

Files read (``utt_id`` first on each line, as Kaldi has them):

- ``wav.scp`` (required): ``rec_id path``; a path relative to the directory is
  resolved against it. Piped commands (``cmd |``) are refused: we never run a
  shell on data.
- ``text`` (optional): ``utt_id transcript`` (the transcript may be empty).
- ``utt2spk`` (optional): ``utt_id spk_id``; without it each utterance is its own
  speaker, as Kaldi's convention says.
- ``segments`` (optional): ``utt_id rec_id start end`` in seconds.
- ``spk2age``, ``spk2gender`` (optional): per-speaker metadata copied to every
  utterance, with ``age_group`` derived from age (see :func:`age_group`).
- ``utt2meta.jsonl`` (optional, ours): ``{"id": utt_id, ...}`` per line, the fields
  Kaldi has no file for, as ``data.exchange.write_kaldi_dir`` writes them; they
  are merged into the items, so an export and import keep every field.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from selfspeech.audio.io import AudioError, audio_info

CHILD_MAX_AGE = 12  # speechocean762's README: children 12 and under, teens 13-17
ADULT_MIN_AGE = 18


class KaldiError(ValueError):
    """A malformed Kaldi directory; the message names file and line."""


def age_group(age: int) -> str:
    """``child`` (<= 12), ``teen`` (13-17) or ``adult`` (>= 18)."""
    if age <= CHILD_MAX_AGE:
        return "child"
    return "adult" if age >= ADULT_MIN_AGE else "teen"


def _read_table(path: Path, min_fields: int = 2, rest_joined: bool = False) -> dict[str, str | list[str]]:
    """Read a Kaldi table ``key value...``; duplicate keys and short lines are errors."""
    out: dict[str, str | list[str]] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise KaldiError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); "
                                 "convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)") from None
            if not line.strip():
                continue
            if rest_joined:
                parts = line.split(maxsplit=1)
                key, value = parts[0], (parts[1].strip() if len(parts) > 1 else "")
            else:
                parts = line.split()
                if len(parts) < min_fields:
                    raise KaldiError(f"{path}:{lineno}: expected at least {min_fields} fields, got {len(parts)}: {line!r}")
                key, value = parts[0], parts[1:] if min_fields > 2 else parts[1]
            if key in out:
                raise KaldiError(f"{path}:{lineno}: duplicate key {key!r}")
            out[key] = value
    return out


def _read_meta(path: Path) -> dict[str, dict]:
    """``utt2meta.jsonl`` -> ``{utt_id: fields}``."""
    meta: dict[str, dict] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            meta[str(fields.pop("id"))] = fields
        except (ValueError, KeyError, AttributeError, TypeError):
            raise KaldiError(f"{path}:{n}: expected a JSON object with an \"id\" per line; "
                             "fix the line or delete the file") from None
    return meta


def iter_kaldi_dir(data_dir: str | os.PathLike, with_durations: bool = True) -> Iterator[dict]:
    """Yield manifest items (sorted by utterance id) for a Kaldi data directory.

    Raises KaldiError for a missing ``wav.scp``, malformed lines, piped
    commands, or an utterance whose recording is not in ``wav.scp``.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise KaldiError(f"{d}: not a directory")
    if not (d / "wav.scp").is_file():
        raise KaldiError(f"{d}: missing wav.scp; a Kaldi data directory needs at least wav.scp (rec_id path)")
    wavs = _read_table(d / "wav.scp", rest_joined=True)
    for rec, p in wavs.items():
        if not p:
            raise KaldiError(f"{d / 'wav.scp'}: recording {rec!r} has no path (expected `rec_id path`)")
        if p.endswith("|") or p.startswith("|"):
            raise KaldiError(f"{d / 'wav.scp'}: recording {rec!r} is a piped command ({p!r}); "
                             "convert the audio to files first (e.g. with sox) and list their paths")
    texts = _read_table(d / "text", rest_joined=True) if (d / "text").is_file() else {}
    utt2spk = _read_table(d / "utt2spk") if (d / "utt2spk").is_file() else {}
    ages = _read_table(d / "spk2age") if (d / "spk2age").is_file() else {}
    genders = _read_table(d / "spk2gender") if (d / "spk2gender").is_file() else {}
    segments = _read_table(d / "segments", min_fields=4) if (d / "segments").is_file() else None
    meta = _read_meta(d / "utt2meta.jsonl") if (d / "utt2meta.jsonl").is_file() else {}

    if segments is None:
        utts = {u: (u, None, None) for u in wavs}
    else:
        utts = {}
        for u, (rec, start, end) in segments.items():
            try:
                utts[u] = (rec, float(start), float(end))
            except ValueError:
                raise KaldiError(f"{d / 'segments'}: utterance {u!r}: start/end must be seconds, got {start!r} {end!r}") from None
    for spk, a in ages.items():
        if not a.lstrip("-").isdigit():
            raise KaldiError(f"{d / 'spk2age'}: speaker {spk!r}: age must be an integer, got {a!r}")

    for utt in sorted(utts):
        rec, start, end = utts[utt]
        if rec not in wavs:
            raise KaldiError(f"{d / 'segments'}: utterance {utt!r} names recording {rec!r} that is not in wav.scp")
        path = wavs[rec]
        path = path if os.path.isabs(path) else str((d / path).resolve())
        if utt2spk and utt not in utt2spk:  # no utt2spk at all: Kaldi's convention, speaker = utterance
            raise KaldiError(f"{d / 'utt2spk'}: utterance {utt!r} has no speaker line; add `{utt} SPEAKER` "
                             "(speaker-disjoint splits depend on it)")
        spk = utt2spk.get(utt, utt)
        item: dict = {"id": utt, "audio_filepath": path}
        if start is not None:
            item["offset"], item["end"] = start, end
            item["duration"] = round(end - start, 4)
        elif with_durations:
            try:
                item["duration"] = round(audio_info(path).duration, 4)
            except AudioError:
                item["duration"] = None  # reported by `selfspeech data validate`, not hidden
        if utt in texts or texts:
            item["text"] = texts.get(utt, "")
        item["speaker"] = spk
        if spk in ages:
            item["age"] = int(ages[spk])
            item["age_group"] = age_group(int(ages[spk]))
        if spk in genders:
            item["gender"] = genders[spk]
        yield {**item, **meta.get(utt, {})}
