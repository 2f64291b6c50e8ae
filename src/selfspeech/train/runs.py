"""Run configs of the training loop: resume checks, finished runs, forks.

A run directory records the config it was started with (``run_config.json``
in every checkpoint, ``finished.json`` once done), fully resolved: every
sub-config with its presets and defaults filled in (``to_mapping`` of the
trainer's config). A rerun with the same config resumes or returns at once; one
with another config is refused before any computation, naming the dotted keys
that differ, so a default changed since the run started stops the resume
instead of silently changing the run half-way.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from selfspeech.train import checkpoint as ckpt

RUN_CONFIG = "run_config.json"
FINISHED = "finished.json"
# where a run computes, not what it computes: a run may resume, or be reused, with other values of
# these keys (at any depth): a checkpoint written on a GPU resumes on a CPU
RUNTIME_KEYS = frozenset({"device", "num_workers", "compile"})


def config_diff(saved: dict, given: dict, prefix: str = "") -> dict:
    """Differences of two JSON configs as ``{"dotted.key": (saved, given)}``.

    An absent key counts as ``None``: an option added to a config after a run
    started defaults to None (off), and that run must still resume or be reused.
    :data:`RUNTIME_KEYS` are not compared."""
    diff = {}
    for k in sorted(set(saved) | set(given), key=str):
        if k in RUNTIME_KEYS:
            continue
        a, b = saved.get(k), given.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff |= config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            diff[f"{prefix}{k}"] = (a, b)
    return diff


# run-config section (``"pretrain"``) -> its saved mapping as the trainer's config resolves it today;
# each trainer registers its own, so run configs of older versions (sub-configs as overrides, the
# configs with defaults filled in under ``resolved``) compare in the current layout
SECTIONS: dict[str, Callable[[dict], dict]] = {}


def _legacy(run_config: dict) -> dict:
    """An older version's run config without its ``resolved`` part, each registered section resolved."""
    out = {}
    for k, v in json.loads(json.dumps(run_config)).items():
        if k in SECTIONS and isinstance(v, dict):
            try:
                v = json.loads(json.dumps(SECTIONS[k](v)))
            except (ValueError, TypeError):
                pass  # no longer a valid config: compared as saved, so the resume is refused
        if k != "resolved":
            out[k] = v
    return out


def check_resume(out: Path, saved: dict, run_config: dict) -> str | None:
    """Raise unless the run saved with ``saved`` may continue as ``run_config``.

    Both are fully resolved configs, so a default changed since the run started
    differs too. A run saved by an older version (overrides, and the configs
    with defaults under ``resolved``) is compared without its ``resolved`` key,
    its sections resolved by today's defaults (:data:`SECTIONS`); it resumes when
    they match, and the returned warning says its defaults could not be checked.
    """
    legacy = "resolved" in saved and "resolved" not in run_config
    diff = config_diff(_legacy(saved) if legacy else saved, run_config)
    if not diff:
        return (f"{out}: saved by an older version (with a 'resolved' part); resuming without checking that "
                "the defaults are those it started with") if legacy else None
    raise ValueError(f"{out} holds a run with another config {diff} (saved, given); a value not written in "
                     "the config may come from a default that changed since the run started: set the saved "
                     "value explicitly to resume, or use a new output directory")


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
    if "resolved" in saved and "resolved" not in run_config:
        saved = _legacy(saved)
    diff = config_diff(_without(saved, may_differ), _without(run_config, may_differ))
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
