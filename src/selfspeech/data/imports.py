"""Manifests from a user's own recordings: a folder of audio files, or a CSV/TSV table that lists them.

``import_dir`` walks a folder (recursively, sorted, symlinked folders followed
once) for every extension of a format libsndfile reads here
(:func:`audio_extensions`) and writes one line per file::

    {"id": "spk1_a", "audio_filepath": "/abs/DIR/spk1/a.wav", "duration": 2.4,
     "sample_rate": 16000, "channels": 1, "text": "...", "speaker": "spk1"}

The id is the path relative to the folder without extension, separators
replaced by ``_`` (the rule :func:`~selfspeech.data.manifest.derived_id` applies
to a manifest line without an id); two files with one id are refused. The
transcript comes from a sidecar file (``a.wav`` + ``a.txt``), the speaker from a
folder name or a regex on the relative path.

``import_table`` reads a CSV/TSV (Common Voice's ``train.tsv`` as it is: columns
``path``, ``sentence``, ``client_id``; clips in ``clips/``); every other column
is kept as metadata. ``import_audiofolder`` reads a Hugging Face ``audiofolder``
(``metadata.csv`` or ``metadata.jsonl`` with a ``file_name`` column) the same way,
without the ``datasets`` package.

Durations, rates and channels come from the file headers (no decoding). A file
that cannot be read is skipped and recorded in the :class:`ImportReport`
(``on_unreadable="skip"``) or stops the import (``"error"``); never silently.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from selfspeech.audio.io import AudioError, audio_info
from selfspeech.data.manifest import safe_id

# libsndfile format name -> file extensions; only the formats this libsndfile lists count
_FORMAT_EXTENSIONS = {
    "WAV": ("wav",), "WAVEX": ("wav",), "FLAC": ("flac",), "OGG": ("ogg", "oga", "opus"), "MP3": ("mp3",),
    "AIFF": ("aif", "aiff", "aifc"), "AU": ("au", "snd"), "CAF": ("caf",), "W64": ("w64",), "RF64": ("rf64",),
    "NIST": ("sph", "nist"), "VOC": ("voc",),
}
UNREADABLE = ("skip", "error")
SPEAKER_FROM = {"none": 0, "parent": 1, "grandparent": 2}  # folders above the file
CORE = ("id", "audio_filepath", "duration", "sample_rate", "channels", "text", "speaker")


class DataImportError(ValueError):
    """A folder or table that cannot be imported; the message names the file or column and the fix."""


@dataclass
class ImportReport:
    """What an import did besides writing lines; printed by the commands, so nothing is dropped silently."""

    written: int = 0
    no_text: int = 0
    no_speaker: int = 0
    ignored: int = 0  # files that are not audio by extension, or hidden
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def lines(self, max_show: int = 20) -> list[str]:
        out = [f"{self.written} manifest lines (one per audio file or table row)"]
        if self.no_text:
            out.append(f"{self.no_text} without a transcript (no text field)")
        if self.no_speaker:
            out.append(f"{self.no_speaker} without a speaker (no speaker field)")
        if self.ignored:
            out.append(f"{self.ignored} other files ignored (not audio by extension, or hidden)")
        if self.unreadable:
            out.append(f"{len(self.unreadable)} audio files skipped (missing or unreadable):")
            out += [f"  {reason}" for _, reason in self.unreadable[:max_show]]
            if len(self.unreadable) > max_show:
                out.append(f"  ... and {len(self.unreadable) - max_show} more")
        return out


def audio_extensions() -> tuple[str, ...]:
    """Lower-case extensions (no dot) of the audio formats the installed libsndfile reads."""
    import soundfile as sf

    have = set(sf.available_formats())
    return tuple(sorted({e for fmt, exts in _FORMAT_EXTENSIONS.items() if fmt in have for e in exts}))


def header(path: str | os.PathLike, on_unreadable: str, report: ImportReport) -> dict | None:
    """``{"duration", "sample_rate", "channels"}`` from the file header; None (recorded) for an unreadable file."""
    try:
        info = audio_info(path)
        if info.frames <= 0:
            raise AudioError(f"{path}: empty audio (0 samples)")
    except AudioError as e:
        if on_unreadable == "error":
            raise DataImportError(f"{e}; skip such files with --unreadable skip") from None
        report.unreadable.append((str(path), str(e)))
        return None
    return {"duration": round(info.duration, 4), "sample_rate": info.samplerate, "channels": info.channels}


def _check_policy(on_unreadable: str) -> None:
    if on_unreadable not in UNREADABLE:
        raise DataImportError(f"--unreadable {on_unreadable!r}: use one of {', '.join(UNREADABLE)}")


# ---------------------------------------------------------------- folders

def _walk(root: Path, exts: tuple[str, ...], report: ImportReport) -> list[str]:
    """Relative POSIX paths of the audio files under ``root``, sorted; symlinked folders followed once."""
    found, seen = [], set()
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a symlink loop or a folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in files:
            if not name.startswith(".") and "." in name and name.rsplit(".", 1)[1].lower() in exts:
                found.append(Path(d, name).relative_to(root).as_posix())
            else:
                report.ignored += 1
    return sorted(found)


def speaker_rule(speaker_from: str = "none", speaker_regex: str | None = None) -> Callable[[str], str | None]:
    """A function from a relative POSIX path to its speaker (None: no speaker), checked before any file is read.

    ``parent``/``grandparent``: the folder one/two levels above the file, which
    must lie that deep below the imported folder; ``speaker_regex``: the named
    group ``speaker`` of the first match in the relative path.
    """
    if speaker_regex:
        if speaker_from != "none":
            raise DataImportError("give --speaker-from or --speaker-regex, not both")
        try:
            rx = re.compile(speaker_regex)
        except re.error as e:
            raise DataImportError(f"--speaker-regex {speaker_regex!r}: {e}") from None
        if "speaker" not in rx.groupindex:
            raise DataImportError(f"--speaker-regex {speaker_regex!r} has no group named speaker; "
                                  "write one, e.g. '^(?P<speaker>[^/]+)/'")
        return lambda rel: (m.group("speaker") or None) if (m := rx.search(rel)) else None
    if speaker_from not in SPEAKER_FROM:
        raise DataImportError(f"--speaker-from {speaker_from!r}: use one of {', '.join(SPEAKER_FROM)}")
    depth = SPEAKER_FROM[speaker_from]

    def rule(rel: str) -> str | None:
        parts = rel.split("/")
        if depth == 0:
            return None
        if len(parts) <= depth:
            raise DataImportError(f"{rel}: --speaker-from {speaker_from} needs every file {depth} folder(s) deep "
                                  "(DIR/SPEAKER/file); use --speaker-from none or --speaker-regex")
        return parts[-1 - depth]
    return rule


def _sidecar_text(audio: Path, text_ext: str) -> str | None:
    p = audio.with_suffix(text_ext)
    if not p.is_file():
        return None
    try:
        return " ".join(p.read_text(encoding="utf-8-sig").split())
    except UnicodeDecodeError:
        raise DataImportError(f"{p}: transcript is not UTF-8; convert it (e.g. iconv -f LATIN1 -t UTF-8)") from None


def import_dir(root: str | os.PathLike, text_ext: str | None = None, speaker_from: str = "none",
               speaker_regex: str | None = None, on_unreadable: str = "skip",
               report: ImportReport | None = None) -> Iterator[dict]:
    """Manifest items for every audio file under ``root`` (sorted by relative path).

    The folder is scanned, ids and speakers checked (collisions, too-shallow
    files) before this returns; headers are read as the items are consumed.
    ``report`` collects the counts and the unreadable files.
    """
    _check_policy(on_unreadable)
    report = report if report is not None else ImportReport()
    root = Path(root)
    if not root.is_dir():
        raise DataImportError(f"{root}: not a folder of audio files")
    root = root.resolve()
    exts = audio_extensions()
    rels = _walk(root, exts, report)
    if not rels:
        raise DataImportError(f"{root}: no audio files found (looked for .{', .'.join(exts)}, any case, recursively)")
    speaker_of = speaker_rule(speaker_from, speaker_regex)
    owner: dict[str, str] = {}
    planned = []
    for rel in rels:
        uid = safe_id(os.path.splitext(rel)[0])
        if uid in owner:
            raise DataImportError(f"{root}: {owner[uid]} and {rel} both get the id {uid!r}; rename one of them")
        owner[uid] = rel
        planned.append((uid, rel, speaker_of(rel)))
    if text_ext is not None and not text_ext.startswith("."):
        text_ext = "." + text_ext
    return _dir_items(root, planned, text_ext, on_unreadable, report)


def _dir_items(root: Path, planned: list, text_ext: str | None, on_unreadable: str,
               report: ImportReport) -> Iterator[dict]:
    for uid, rel, speaker in planned:
        path = root / rel
        head = header(path, on_unreadable, report)
        if head is None:
            continue
        item = {"id": uid, "audio_filepath": str(path), **head}
        text = _sidecar_text(path, text_ext) if text_ext else None
        if text is None:
            report.no_text += 1
        else:
            item["text"] = text
        if speaker is None:
            report.no_speaker += 1
        else:
            item["speaker"] = speaker
        report.written += 1
        yield item


# ---------------------------------------------------------------- tables

def _scalar(x):
    """A cell as int/float when it reads as one without losing anything (``"0012"`` stays a string)."""
    for cast in (int, float):
        try:
            v = cast(x)
        except ValueError:
            continue
        if str(v) == x:
            return v
    return x


def read_table(path: str | os.PathLike) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """(columns, iterator of (line number, row)) of a ``.csv``, ``.tsv`` or ``.jsonl`` table.

    TSV is read without quote processing, as Common Voice writes it (its
    sentences hold bare quotes). A row with more or fewer fields than the
    header is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataImportError(f"{path}: table not found")
    kind = path.suffix.lower()
    if kind == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataImportError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataImportError(f"{path}:{lineno}: expected a JSON object per line")
                    rows.append((lineno, row))
        return list(dict.fromkeys(k for _, r in rows for k in r)), iter(rows)
    if kind not in (".csv", ".tsv", ".tab"):
        raise DataImportError(f"{path}: unknown table type {kind!r}; name it .csv (commas) or .tsv (tabs)")
    opts = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind != ".csv" else {}
    not_utf8 = f"{path}: not UTF-8; convert the table (e.g. iconv -f LATIN1 -t UTF-8)"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            cols = list(csv.DictReader(f, **opts).fieldnames or [])
    except UnicodeDecodeError:
        raise DataImportError(not_utf8) from None

    def rows() -> Iterator[tuple[int, dict]]:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, **opts)
            try:
                for row in reader:
                    if None in row or None in row.values():
                        raise DataImportError(f"{path}:{reader.line_num}: the row does not have the header's "
                                              f"{len(cols)} fields; fix the line (a stray delimiter?)")
                    yield reader.line_num, row
            except UnicodeDecodeError:
                raise DataImportError(not_utf8) from None
    return cols, rows()


def _check_columns(table: Path, cols: list[str], wanted: dict[str, str | None]) -> None:
    for opt, col in wanted.items():
        if col and col not in cols:
            none = f" or --{opt} '' for none" if opt in ("text", "speaker") else ""
            raise DataImportError(f"{table}: no column {col!r} (--{opt}); columns: {', '.join(cols)}; "
                                  f"pass --{opt} COLUMN{none}")


def import_table(table: str | os.PathLike, audio: str = "path", text: str | None = "sentence",
                 speaker: str | None = "client_id", id_column: str | None = None,
                 audio_dir: str | os.PathLike | None = None, on_unreadable: str = "skip",
                 report: ImportReport | None = None) -> Iterator[dict]:
    """Manifest items for the rows of a CSV/TSV/JSONL table, in table order.

    Relative audio paths are resolved against ``audio_dir`` (default: the
    table's folder). The id is the ``id_column`` (default: the column ``id``
    when there is one), else the audio path as written without extension,
    separators replaced by ``_``; a repeated id is an error. Every other
    non-empty cell becomes metadata (a column named like a field this writes,
    e.g. ``duration``, is kept as ``table_duration``).
    """
    _check_policy(on_unreadable)
    report = report if report is not None else ImportReport()
    table = Path(table)
    cols, rows = read_table(table)
    if id_column is None and "id" in cols and audio != "id":
        id_column = "id"
    _check_columns(table, cols, {"audio": audio, "text": text, "speaker": speaker, "id": id_column})
    base = Path(audio_dir) if audio_dir is not None else table.parent
    if not base.is_dir():
        raise DataImportError(f"{base}: audio folder not found; pass --audio-dir FOLDER")
    return _table_items(table, rows, base.resolve(), audio_dir is None, (audio, text, speaker, id_column),
                        on_unreadable, report)


def _table_items(table: Path, rows, base: Path, default_base: bool, names: tuple, on_unreadable: str,
                 report: ImportReport) -> Iterator[dict]:
    audio, text, speaker, id_column = names
    seen: dict[str, int] = {}
    for lineno, row in rows:
        rel = str(row.get(audio) or "")
        if not rel:
            raise DataImportError(f"{table}:{lineno}: empty {audio!r} cell; every row needs an audio file")
        path = base / rel
        if default_base and not path.exists() and (base / "clips" / rel).is_file():
            raise DataImportError(f"{table}: {rel} is not in {base} but in {base / 'clips'}; pass --audio-dir "
                                  f"{base / 'clips'} (Common Voice keeps its clips there)")
        uid = safe_id(str(row[id_column])) if id_column else safe_id(os.path.splitext(rel)[0])
        if not uid:
            raise DataImportError(f"{table}:{lineno}: empty id (column {id_column or audio!r}); fill it in")
        if uid in seen:
            raise DataImportError(f"{table}:{lineno}: id {uid!r} already on line {seen[uid]}; "
                                  "give a column of unique ids with --id")
        seen[uid] = lineno
        head = header(path, on_unreadable, report)
        if head is None:
            continue
        item = {"id": uid, "audio_filepath": os.path.normpath(path), **head}
        for field_, key in ((text, "text"), (speaker, "speaker")):
            if field_ and row.get(field_) not in (None, ""):
                item[key] = str(row[field_]).strip() if key == "text" else str(row[field_])
            elif key == "text":
                report.no_text += 1
            else:
                report.no_speaker += 1
        for k, v in row.items():
            if k in names or v in (None, "") or isinstance(v, (dict, list)):
                continue
            item[f"table_{k}" if k in CORE else k] = _scalar(v) if isinstance(v, str) else v
        report.written += 1
        yield item


# ---------------------------------------------------------------- Hugging Face audiofolder

def audiofolder_metadata(folder: str | os.PathLike, split: str | None = None) -> Path | None:
    """The ``metadata.csv``/``metadata.jsonl`` of an audiofolder (of ``split``'s subfolder), None when it has none."""
    folder = Path(folder)
    names = ("metadata.csv", "metadata.jsonl")
    if split:
        found = [folder / split / n for n in names if (folder / split / n).is_file()]
        return found[0] if found else None
    top = [folder / n for n in names if (folder / n).is_file()]
    if top:
        return top[0]
    splits = sorted(d.name for d in folder.iterdir() if d.is_dir() and any((d / n).is_file() for n in names)) \
        if folder.is_dir() else []
    if len(splits) > 1:
        raise DataImportError(f"{folder}: an audiofolder with splits {', '.join(splits)}; pass --split NAME")
    return audiofolder_metadata(folder, splits[0]) if splits else None


def import_audiofolder(folder: str | os.PathLike, split: str | None = None, text: str | None = "text",
                       speaker: str | None = "speaker", id_column: str | None = None,
                       audio: str = "file_name", on_unreadable: str = "skip",
                       report: ImportReport | None = None) -> Iterator[dict]:
    """Manifest items of a Hugging Face ``audiofolder`` (``load_dataset("audiofolder", data_dir=folder)``'s
    layout): the metadata table's ``file_name`` is relative to the table's own folder."""
    meta = audiofolder_metadata(folder, split)
    if meta is None:
        raise DataImportError(f"{folder}: no metadata.csv or metadata.jsonl"
                              f"{' in ' + split if split else ''}; for a plain folder of audio use "
                              "`selfspeech data import-dir`")
    return import_table(meta, audio, text, speaker, id_column, meta.parent, on_unreadable, report)
