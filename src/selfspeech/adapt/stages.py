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
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from selfspeech.data.atomic import write_json

MARKER = "STAGE.json"


def config_hash(config: Any) -> str:
    """Stable short hash of a JSON-able config (keys sorted)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageRunner:
    """Runs stages under ``root``; remembers wall times and which were cached."""

    root: Path
    log: Callable[[str], None] = print
    times: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    def run(self, name: str, config: dict, fn: Callable[[Path], Any], deps: tuple[str, ...] = ()) -> Any:
        """Run ``fn(stage_dir)`` unless a finished stage with the same config exists; returns its result."""
        full = {"config": config, "deps": {d: self.hashes[d] for d in deps}}
        h = config_hash(full)
        self.hashes[name] = h
        d = self.root / name
        marker = d / MARKER
        if marker.is_file():
            rec = json.loads(marker.read_text())
            if rec.get("hash") == h:
                self.cached[name], self.times[name] = True, rec.get("seconds", 0.0)
                self.log(f"[cached] {name}")
                return rec["result"]
            self.log(f"[rerun] {name}: config changed")
            shutil.rmtree(d)  # outputs of the old config must not be resumed into the new one
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"[run] {name}")
        t = time.perf_counter()
        result = fn(d)
        seconds = time.perf_counter() - t
        write_json(marker, {"hash": h, "config": full, "result": result, "seconds": seconds}, default=str)
        self.cached[name], self.times[name] = False, seconds
        return result
