"""Shared helpers of the benchmark scripts: where ../shared is, machine facts, result writing."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from selfspeech.data.versions import cpu_model, software_versions

ROOT = Path(__file__).resolve().parents[1]
SO762 = ROOT.parent / "shared" / "data" / "speechocean762-train"
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": cpu_model()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_result(name: str, payload: dict) -> Path:
    payload = {**payload, "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_commit(), "machine": machine(), "versions": software_versions()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path
