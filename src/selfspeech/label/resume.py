"""Which teacher wrote a label file, so that a resumed run never mixes two teachers' labels in one file.

A label file is resumed by running the same command again (:mod:`selfspeech.label.run`). Resuming it with
another teacher, backend, compute type or decoding option would append labels of a different system to
the ones already there, and nothing downstream could tell them apart. Beside ``OUT`` a sidecar
``OUT.teacher.json`` records the settings that decoded it; a run compares its own settings with the
sidecar (or, for a file written without one, with the ``teacher`` field of its first record) before any
model is opened, and refuses a mismatch in one line that names both and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from selfspeech.data.atomic import write_json

SIDECAR_SUFFIX = ".teacher.json"


class ResumeError(ValueError):
    """The output holds labels of another teacher or decoding config."""


def sidecar_path(out_path: str | os.PathLike) -> Path:
    """``labels.jsonl`` -> ``labels.jsonl.teacher.json``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + SIDECAR_SUFFIX)


def labelling_spec(teacher: str, backend: str, compute_type: str, options: Any) -> dict:
    """The settings that decide a label: teacher name, backend, resolved compute type, decoding options
    (a dataclass such as ``DecodeOptions``, or a dict)."""
    opts = asdict(options) if is_dataclass(options) else dict(options)
    if opts.get("task") == "transcribe":  # the default task is left out: label files recorded without one still resume
        opts.pop("task")
    spec = {"teacher": str(teacher), "backend": backend, "compute_type": compute_type, "options": opts}
    return json.loads(json.dumps(spec))  # as the sidecar reads back (tuples become lists), so they compare equal


def describe(spec: dict) -> str:
    """``whisper-base (faster-whisper, int8; beam_size 1, language en, ...)``; unknown parts are left out."""
    parts = [str(spec[k]) for k in ("backend", "compute_type") if spec.get(k)]
    opts = ", ".join(f"{k} {v}" for k, v in sorted((spec.get("options") or {}).items()))
    inner = ", ".join(parts) + (f"; {opts}" if opts else "")
    return f"{spec.get('teacher')}" + (f" ({inner})" if inner else "")


def _first_record(out_path: Path) -> dict | None:
    """The first complete record of ``out_path``; None when it has none."""
    with open(out_path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                return None
            if raw.strip():
                try:
                    rec = json.loads(raw)
                except ValueError:
                    return None
                return rec if isinstance(rec, dict) else None
    return None


def written_by(out_path: str | os.PathLike) -> dict | None:
    """The settings that wrote ``out_path``: its sidecar, else ``{"teacher"}`` from its first record; None
    for a missing or empty output (nothing to resume)."""
    out_path = Path(out_path)
    if not out_path.is_file():
        return None
    rec = _first_record(out_path)
    if rec is None:
        return None
    side = sidecar_path(out_path)
    if side.is_file():
        try:
            saved = json.loads(side.read_text(encoding="utf-8"))
        except ValueError:
            raise ResumeError(f"{side}: not valid JSON; delete it (and {out_path.name}) to label afresh") from None
        if isinstance(saved, dict):
            return saved
    return {"teacher": rec["teacher"]} if "teacher" in rec else None


def check_resume(out_path: str | os.PathLike, spec: dict) -> None:
    """Refuse (ResumeError) to append to ``out_path`` when it was written by other settings than ``spec``.

    Without a sidecar only the teacher name can be compared (records carry it); with one, every setting."""
    old = written_by(out_path)
    if old is None:
        return
    same = old == spec if set(old) != {"teacher"} else old["teacher"] == spec["teacher"]
    if not same:
        raise ResumeError(f"{out_path} holds labels by {describe(old)}; this run asks for {describe(spec)}: "
                          f"give another --out, or delete {out_path} and {sidecar_path(out_path).name} to "
                          "label it afresh")


def record_spec(out_path: str | os.PathLike, spec: dict) -> Path:
    """Write the sidecar of ``out_path`` (call after :func:`check_resume`, before decoding)."""
    side = sidecar_path(out_path)
    side.parent.mkdir(parents=True, exist_ok=True)
    return write_json(side, spec)
