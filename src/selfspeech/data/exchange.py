"""Data exchange with the formats users already have: Kaldi directories, Lhotse CutSets, HF datasets.

Our manifest item is ``{"id", "audio_filepath", "duration", "text", "speaker",
"offset"?, "end"?, **metadata}``. The mappings:

- **Kaldi** (export; import is ``data.kaldi.iter_kaldi_dir``): ``wav.scp``,
  ``segments`` when items are segments of longer files, ``text``,
  ``utt2spk``/``spk2utt``, ``spk2age``/``spk2gender``. Kaldi has no place for
  other metadata; those fields go to ``utt2meta.jsonl`` (ours, ignored by Kaldi
  tools), which our importer merges back.
- **Lhotse** (import and export, ``lhotse`` an optional extra): one cut per
  item, a ``Recording`` per audio file and one ``SupervisionSegment`` carrying
  text, speaker, gender and every other field in ``custom``; saved as
  ``cuts.jsonl.gz``.
- **Hugging Face datasets** (import): an ``Audio`` column read undecoded (its
  bytes written once, or its file paths used in place), decoded arrays (written
  to FLAC once), plus text/speaker/id columns; other scalar columns become
  metadata. An ``audiofolder`` is read by ``data.imports.import_audiofolder``.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from selfspeech.data.atomic import atomic_path, atomic_write
from selfspeech.data.imports import audio_extensions
from selfspeech.data.manifest import safe_id

CORE = ("id", "audio_filepath", "duration", "text", "speaker", "offset", "end")


def _check_id(x: str, what: str) -> str:
    if not x or any(c.isspace() for c in str(x)):
        raise ValueError(f"{what} {x!r}: Kaldi ids must be non-empty and contain no whitespace")
    return str(x)


def write_kaldi_dir(items: Iterable[dict], out_dir: str | os.PathLike) -> Path:
    """Manifest items -> Kaldi data directory (absolute audio paths; files sorted, as Kaldi's tools want)."""
    out = Path(out_dir)
    items = list(items)
    seen: set[str] = set()
    rec_of: dict[str, str] = {}          # audio path -> recording id
    wav, seg, text, u2s, meta = {}, {}, {}, {}, {}
    spk_age, spk_gender = {}, {}
    for it in items:
        u = _check_id(it["id"], "utterance")
        if u in seen:
            raise ValueError(f"duplicate utterance id {u!r}")
        seen.add(u)
        path = str(Path(it["audio_filepath"]).resolve())
        spk = _check_id(str(it.get("speaker") or u), f"speaker of {u!r}")
        if it.get("offset") is not None:
            rec = rec_of.setdefault(path, _check_id(str(it.get("recording_id") or Path(path).stem), "recording"))
            end = it.get("end", it["offset"] + (it.get("duration") or 0))
            seg[u] = f"{rec} {float(it['offset']):.3f} {float(end):.3f}"
        else:
            rec = u
        wav[rec] = path
        if "text" in it:
            text[u] = str(it["text"] or "").replace("\n", " ")
        u2s[u] = spk
        if it.get("age") is not None:
            spk_age[spk] = int(it["age"])
        if it.get("gender"):
            spk_gender[spk] = str(it["gender"])
        extra = {k: v for k, v in it.items() if k not in CORE and k not in ("age", "gender", "recording_id")}
        if extra:
            meta[u] = extra
    spk2utt: dict[str, list[str]] = {}
    for u, s in sorted(u2s.items()):
        spk2utt.setdefault(s, []).append(u)
    tables = {"wav.scp": wav, "text": text, "utt2spk": u2s, "spk2utt": {s: " ".join(v) for s, v in spk2utt.items()},
              "segments": seg, "spk2age": spk_age, "spk2gender": spk_gender}
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        if not table:
            (out / name).unlink(missing_ok=True)
            continue
        with atomic_write(out / name) as f:
            for k in sorted(table):
                f.write(f"{k}\t{table[k]}\n" if name in ("wav.scp", "text") else f"{k} {table[k]}\n")
    if meta:
        with atomic_write(out / "utt2meta.jsonl") as f:
            for u in sorted(meta):
                f.write(json.dumps({"id": u, **meta[u]}, ensure_ascii=False) + "\n")
    else:  # an earlier export's would be merged into these items on import
        (out / "utt2meta.jsonl").unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------- Lhotse

def _lhotse():
    try:
        import lhotse
    except ImportError:
        raise ImportError("Lhotse exchange needs lhotse: pip install 'selfspeech[exchange]'") from None
    return lhotse


def to_lhotse_cuts(items: Iterable[dict]):
    """Manifest items -> ``lhotse.CutSet`` (one cut per item, its supervision spanning the cut)."""
    L = _lhotse()
    recs, cuts = {}, []
    for it in items:
        path = str(Path(it["audio_filepath"]).resolve())
        if path not in recs:
            recs[path] = L.Recording.from_file(path, recording_id=str(it.get("recording_id") or it["id"]))
        rec = recs[path]
        start = float(it.get("offset") or 0.0)
        dur = float(it["duration"]) if it.get("duration") is not None else rec.duration - start
        custom = {k: v for k, v in it.items() if k not in CORE and k not in ("gender", "language", "recording_id")}
        sup = L.SupervisionSegment(id=it["id"], recording_id=rec.id, start=start, duration=dur, channel=0,
                                   text=it.get("text"), speaker=it.get("speaker"), gender=it.get("gender"),
                                   language=it.get("language"), custom=custom or None)
        cut = L.MonoCut(id=it["id"], start=start, duration=dur, channel=0, recording=rec, supervisions=[sup])
        cuts.append(cut)
    return L.CutSet.from_cuts(cuts)


def write_lhotse(items: Iterable[dict], path: str | os.PathLike) -> Path:
    """Save items as a Lhotse CutSet (``.jsonl.gz``; lhotse writes it)."""
    path = Path(path)
    with atomic_path(path, suffix="".join(path.suffixes)) as tmp:  # lhotse picks the format from the suffix
        to_lhotse_cuts(items).to_file(tmp)
    return path


def read_lhotse(cuts) -> Iterator[dict]:
    """A CutSet (or the path of one) -> manifest items; a cut must have one file source and one supervision."""
    L = _lhotse()
    if not isinstance(cuts, L.CutSet):
        cuts = L.CutSet.from_file(cuts)
    for cut in cuts:
        rec = cut.recording
        files = [s for s in rec.sources if s.type == "file"]
        if not files:
            raise ValueError(f"cut {cut.id!r}: recording {rec.id!r} has no file source (URL/command sources: "
                             "download or convert them to files first)")
        if len(cut.supervisions) > 1:
            raise ValueError(f"cut {cut.id!r} has {len(cut.supervisions)} supervisions; trim to supervisions first "
                             "(cuts.trim_to_supervisions())")
        sup = cut.supervisions[0] if cut.supervisions else None
        item = {"id": sup.id if sup else cut.id, "audio_filepath": files[0].source, "duration": round(cut.duration, 4)}
        if cut.start:
            item["offset"], item["end"] = cut.start, round(cut.start + cut.duration, 4)
        if sup is not None:
            if sup.text is not None:
                item["text"] = sup.text
            if sup.speaker is not None:
                item["speaker"] = sup.speaker
            for k in ("gender", "language"):
                if getattr(sup, k) is not None:
                    item[k] = getattr(sup, k)
            item.update(sup.custom or {})
        yield item


# ---------------------------------------------------------------- Hugging Face datasets

def _hf_audio_file(a, uid: str, out: Path, where: str) -> tuple[str, float]:
    """(audio file, duration) of one row's audio value; in-memory audio is written to ``out`` once.

    ``{"array", "sampling_rate"}`` -> ``<id>.flac`` (16-bit); ``{"bytes", "path"}``
    (an ``Audio(decode=False)`` column) -> the bytes as they are, ``<id>`` plus
    the path's suffix when soundfile reads it (else decoded to FLAC); a local
    file path -> used in place.
    """
    import numpy as np
    import soundfile as sf

    path = a if isinstance(a, str) else (a.get("path") if isinstance(a, dict) else None)
    if isinstance(a, dict) and a.get("array") is not None:
        wav, sr = np.asarray(a["array"], dtype=np.float32), int(a["sampling_rate"])
        dest = out / f"{safe_id(uid)}.flac"
        if not dest.is_file():  # atomic: a killed import leaves no half file that a rerun would keep
            with atomic_path(dest, suffix=".flac") as tmp:
                sf.write(tmp, wav, sr)
        return str(dest), len(wav) / sr
    if isinstance(a, dict) and a.get("bytes"):
        try:
            info = sf.info(io.BytesIO(a["bytes"]))
        except Exception as e:
            raise ValueError(f"{where}: audio bytes soundfile cannot read ({str(e).strip()[:120]})") from None
        ext = Path(path or "").suffix.lower()
        dest = out / f"{safe_id(uid)}{ext if ext[1:] in audio_extensions() else '.flac'}"
        if not dest.is_file():
            with atomic_path(dest, suffix=dest.suffix) as tmp:
                if dest.suffix == ext:
                    tmp.write_bytes(a["bytes"])
                else:
                    sf.write(tmp, *sf.read(io.BytesIO(a["bytes"]), dtype="float32"))
        return str(dest), info.duration
    if not (path and Path(path).is_file()):
        raise ValueError(f"{where}: neither decoded audio, nor audio bytes, nor a readable file ({str(a)[:80]})")
    return os.path.abspath(path), sf.info(path).duration


def from_hf_dataset(ds, audio_dir: str | os.PathLike, audio: str = "audio", text: str | None = "text",
                    speaker: str | None = "speaker", id_column: str | None = None) -> Iterator[dict]:
    """Rows of a ``datasets.Dataset`` -> manifest items.

    An ``Audio`` column is cast to ``Audio(decode=False)`` and read with
    soundfile (no torchcodec needed); see :func:`_hf_audio_file` for what is
    written to ``audio_dir``. The id is ``id_column`` (default: the column
    ``id`` when there is one, else ``utt<row number>``). Other scalar columns
    are kept as metadata. Missing columns are errors that name the column and
    list the ones that exist.
    """
    cols = list(ds.column_names)
    if id_column is None and "id" in cols and audio != "id":
        id_column = "id"
    for c in (audio, text, speaker, id_column):
        if c is not None and c not in cols:
            raise ValueError(f"dataset has no column {c!r}; columns: {cols}")
    feature = (getattr(ds, "features", None) or {}).get(audio)
    if type(feature).__name__ == "Audio" and getattr(feature, "decode", False):
        ds = ds.cast_column(audio, type(feature)(decode=False))
    out = Path(audio_dir)
    for i, row in enumerate(ds):
        uid = str(row[id_column]) if id_column else f"utt{i:07d}"
        path, dur = _hf_audio_file(row[audio], uid, out, f"row {i} ({uid}): column {audio!r}")
        item = {"id": uid, "audio_filepath": path, "duration": round(dur, 4)}
        if text:
            item["text"] = row[text]
        if speaker:
            item["speaker"] = str(row[speaker])
        for k in cols:
            if k not in (audio, text, speaker, id_column) and isinstance(row[k], (str, int, float, bool)):
                item[k] = row[k]
        yield item
