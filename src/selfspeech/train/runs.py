"""Run configs of the training loop: resume checks, finished runs, forks.

A run directory records the config it was started with (``run_config.json``
in every checkpoint, ``finished.json`` once done). A rerun with the same config
resumes or returns at once; one with another config is refused before any
computation, naming the dotted keys that differ.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from selfspeech.train import checkpoint as ckpt

RUN_CONFIG = "run_config.json"
FINISHED = "finished.json"


def config_diff(saved: dict, given: dict, prefix: str = "") -> dict:
    """Differences of two JSON configs as ``{"dotted.key": (saved, given)}``.

    An absent key counts as ``None``: an option added to a config after a run
    started defaults to None (off), and that run must still resume or be reused."""
    diff = {}
    for k in sorted(set(saved) | set(given), key=str):
        a, b = saved.get(k), given.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff |= config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diff[f"{prefix}{k}"] = (a, b)
    return diff


def resolved_configs(**configs) -> dict:
    """``run_config["resolved"]``: each config dataclass with its defaults filled in (None stays None)."""
    return {k: None if c is None else asdict(c) for k, c in configs.items()}


def check_resume(out: Path, saved: dict, run_config: dict) -> str | None:
    """Raise unless the run saved with ``saved`` may continue as ``run_config``.

    Callers put every config with its defaults filled in under ``run_config["resolved"]``,
    so a default changed since the run started stops the resume instead of silently
    changing the run half-way. A run saved before ``resolved`` was recorded resumes
    when the rest matches; the returned warning says its defaults could not be checked.
    """
    legacy = "resolved" not in saved and "resolved" in run_config
    rest = {k: v for k, v in run_config.items() if k != "resolved"} if legacy else run_config
    diff = config_diff(saved, rest)
    if not diff:
        return (f"{out}: saved before resolved configs were recorded; resuming without checking that "
                "the defaults are those it started with") if legacy else None
    hint = ("; only resolved values differ: a default (or a file the config points to) changed since this "
            "run started; set the saved value explicitly to resume" if all(
                k.startswith("resolved.") for k in diff) else "")
    raise ValueError(f"{out} holds a run with another config {diff} (saved, given){hint}; "
                     "use the same config to resume, or a new output directory")


def normalised(run_config: dict) -> dict:
    return json.loads(json.dumps(run_config))  # as it will be compared after a JSON round trip


def finished_state(out_dir: str | Path, run_config: dict) -> dict | None:
    """The final state of a finished run in ``out_dir`` with this config; None if it has not finished.

    Raises (:func:`check_resume`) if a run with another config finished there.
    """
    path = Path(out_dir) / FINISHED
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if warning := check_resume(Path(out_dir), rec["run_config"], normalised(run_config)):
        print(f"warning: {warning}", file=sys.stderr)
    return rec["state"]


def _without(d: dict, dotted: tuple[str, ...]) -> dict:
    d = json.loads(json.dumps(d))
    for key in dotted:
        *path, last = key.split(".")
        node = d
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return d


def fork_checkpoint(base: str | Path, out: Path, run_config: dict, write_model: Callable[[Path], None],
                    load_model: Callable[[Path], None], may_differ: tuple[str, ...] = ()) -> int:
    """Start run ``out`` from checkpoint ``base`` of another run; returns the step it starts at.

    The new run takes the weights (``load_model`` reads them into the caller's
    module and raises if they do not fit), the optimizer, sampler position, RNG
    and log of ``base``, so the two runs share their first steps bit for bit and
    differ only in what comes after. Every config key but the dotted keys in
    ``may_differ`` must match, or the continuation would not be one run.
    """
    src = ckpt.resolve(Path(base))
    if src is None:
        raise FileNotFoundError(f"{base}: no complete checkpoint to fork (train the base run with "
                                "keep_every so its step is kept, or give its 'last' folder)")
    saved = json.loads((src / RUN_CONFIG).read_text())
    ignore = may_differ + (() if "resolved" in saved else ("resolved",))
    diff = config_diff(_without(saved, ignore), _without(run_config, ignore))
    if diff:
        raise ValueError(f"cannot fork {src}: its run differs by more than {list(may_differ)}: {diff} (base, fork)")
    load_model(src)
    step = json.loads((src / ckpt.STATE_JSON).read_text())["state"]["step"]

    def write(d: Path) -> None:
        write_model(d)
        (d / RUN_CONFIG).write_text(json.dumps(run_config, indent=1) + "\n")
        for f in (ckpt.STATE_JSON, ckpt.STATE_TENSORS):
            shutil.copyfile(src / f, d / f)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = src.parent.parent if src.parent.name == "keep" else src.parent
    log = out / "log.jsonl"
    if (run_dir / "log.jsonl").is_file():  # the base run's history up to the fork, as a resume keeps it
        shutil.copyfile(run_dir / "log.jsonl", log)
        ckpt.truncate_log(log, step)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": "fork", "step": step, "from": str(src)}) + "\n")
    ckpt.write_dir(out / "last", write)  # the loop resumes from it
    return step


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """``out_dir/summary.json`` (atomic), with the software versions the run used."""
    from selfspeech.data.versions import software_versions

    path = Path(out_dir) / "summary.json"
    ckpt.write_json(path, {**summary, "versions": software_versions()})
    return path
