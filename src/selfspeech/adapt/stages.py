"""Cached, resumable pipeline stages.

A stage is a named step with a JSON-able config and an output folder. When it
finishes, ``<out>/<name>/STAGE.json`` records a hash of its config (which
includes the hashes of the stages it depends on) and its result. Running it
again with the same config returns the recorded result at once; a changed
config reruns it from an empty folder; a missing marker (the stage was
killed) reruns it in place. Stages that
can resume internally (labelling, fine-tuning) pick up their own partial
state in the same folder, so a kill costs at most the current batch or
checkpoint interval.

A pipeline declares each step as a :class:`Stage` (name, inputs, the config
slice that keys its cache, the function) and hands it to a
:class:`StageRunner`. A stage may *free* inputs that nothing reads once it is
done (e.g. the two fine-tuned models behind a task vector): their files are
deleted, their markers stay, and they are rebuilt only when a stage that
reads them has to run again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from selfspeech.data.atomic import write_json
from selfspeech.train.runs import RUNTIME_KEYS

MARKER = "STAGE.json"


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-able config (keys sorted), without the keys that only say where a stage
    computes (:data:`~selfspeech.train.runs.RUNTIME_KEYS`): a stage done on a GPU is reused on a CPU."""
    blob = json.dumps(_what(json.loads(json.dumps(config, default=str))), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _what(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _what(v) for k, v in x.items() if k not in RUNTIME_KEYS}
    if isinstance(x, list):
        return [_what(v) for v in x]
    return x


@dataclass(frozen=True)
class Stage:
    """One pipeline step as data: ``fn(stage_dir) -> JSON-able result``.

    ``config`` is the slice of the recipe the output depends on; with the
    hashes of ``inputs`` (the stages whose outputs ``fn`` reads) it keys the
    cache. ``frees``: inputs whose files nothing reads once this stage is done.
    """

    name: str
    fn: Callable[[Path], Any]
    config: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    frees: tuple[str, ...] = ()


@dataclass
class StageRunner:
    """Runs stages under ``root``; remembers wall times and which were cached.

    ``keep_all`` keeps the files of freed stages (for inspecting intermediate models).
    """

    root: Path
    log: Callable[[str], None] = print
    keep_all: bool = False
    times: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    declared: dict[str, Stage] = field(default_factory=dict)

    def run(self, name: str, config: dict, fn: Callable[[Path], Any], deps: tuple[str, ...] = ()) -> Any:
        """Run ``fn(stage_dir)`` unless a finished stage with the same config exists; returns its result."""
        return self(Stage(name, fn, config, tuple(deps)))

    def __call__(self, stage: Stage) -> Any:
        """Run a declared stage unless a finished one with the same config exists; returns its result."""
        h = config_hash(self._key(stage))
        self.hashes[stage.name], self.declared[stage.name] = h, stage
        d = self.root / stage.name
        rec = self._record(stage.name)
        if rec is not None and rec.get("hash") == h:
            self.cached[stage.name], self.times[stage.name] = True, rec.get("seconds", 0.0)
            self.log(f"[cached] {stage.name}")
            result = rec["result"]
        else:
            if rec is not None:
                self.log(f"[rerun] {stage.name}: config changed")
                shutil.rmtree(d)  # outputs of the old config must not be resumed into the new one
            result = self._execute(stage)
        self._free(stage)
        return result

    def _key(self, stage: Stage) -> dict:
        return {"config": dict(stage.config), "deps": {d: self.hashes[d] for d in stage.inputs}}

    def _record(self, name: str) -> dict | None:
        marker = self.root / name / MARKER
        return json.loads(marker.read_text()) if marker.is_file() else None

    def _execute(self, stage: Stage) -> Any:
        for name in stage.inputs:  # an input whose files were freed is rebuilt first
            rec = self._record(name)
            if rec is not None and rec.get("freed"):  # declared: its hash is part of this stage's key
                self.log(f"[rebuild] {name}: {stage.name} reads its freed files")
                shutil.rmtree(self.root / name)
                self._execute(self.declared[name])
        d = self.root / stage.name
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"[run] {stage.name}")
        t = time.perf_counter()
        result = stage.fn(d)
        seconds = time.perf_counter() - t
        full = self._key(stage)
        write_json(d / MARKER, {"hash": config_hash(full), "config": full, "result": result, "seconds": seconds},
                   default=str)
        self.cached[stage.name], self.times[stage.name] = False, seconds
        return result

    def _free(self, stage: Stage) -> None:
        """Delete the files of ``stage.frees`` (markers and JSON logs stay; the marker says ``freed``)."""
        for name in () if self.keep_all else stage.frees:
            rec = self._record(name)
            if rec is None or rec.get("freed"):
                continue
            d = self.root / name
            write_json(d / MARKER, {**rec, "freed": True}, default=str)  # first: a kill mid-delete means rebuild
            size = 0
            for p in sorted(d.iterdir()):
                if p.name == MARKER or (p.is_file() and p.suffix in (".json", ".jsonl")):
                    continue
                size += folder_bytes(p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            self.log(f"[freed] {name}: {size / 1e6:.0f} MB nothing reads any more")


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; links are not followed)."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return p.lstat().st_size if os.path.lexists(p) else 0
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() or f.is_symlink())
