"""What every command shares: the error line, config files with dotted overrides, the resolved config.

A command that takes a config (or recipe) reads it with :func:`load_config`:
the YAML/JSON file, then ``key.sub=value`` overrides from the command line
(NeMo/ESPnet style: ``selfspeech pretrain c.yaml loop.lr=3e-4``), then the
strict loader of :mod:`selfspeech.config`. Whatever is wrong stops the command
with one line on stderr and exit code 2 (:func:`refusing`), before any model
is loaded or audio read; a run then writes :data:`RESOLVED` beside its outputs.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from selfspeech.accel import DeviceError, check_device
from selfspeech.config import ConfigError, apply_overrides, from_mapping, save_resolved
from selfspeech.data.atomic import _finite as finite_json

console = Console(stderr=True)  # errors, warnings, progress: stderr
out_console = Console()          # a command's summary: stdout (``--json``: one JSON object there instead)
RESOLVED = "resolved_config.json"  # every default filled in: rerun with `selfspeech <command> OUT/resolved_config.json`
OVERRIDES_HELP = "Dotted overrides of the config's keys, e.g. loop.lr=3e-4 loop.max_steps=200 (values read as YAML)."
DEVICE_HELP = "Where to compute: auto (a CUDA GPU when present, else the CPU), cpu, cuda or cuda:N (overrides the config)."
PRECISION_HELP = ("Training precision: auto (bf16 on GPUs that have it, else fp32), fp32, bf16 (also on CPUs with "
                  "native bfloat16) or fp16 (GPUs, with loss scaling); weights and checkpoints stay fp32.")


JSON_HELP = "Print the summary as one JSON object on stdout (warnings and progress stay on stderr)."


def warn(msg: str) -> None:
    """One warning line on stderr."""
    console.print(f"[yellow]warning:[/] {escape(' '.join(str(msg).split()))}", highlight=False, soft_wrap=True)


def emit(summary: dict, as_json: bool, human: Any = None) -> None:
    """A command's summary on stdout: ``summary`` as one JSON line with ``as_json``, else ``human`` (text or a
    rich renderable; None: the summary as indented JSON)."""
    summary = finite_json(summary)  # nan/inf as null, as the JSON files hold them: strict JSON for parsers
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False, allow_nan=False, default=str))
    elif human is None:
        out_console.print_json(json.dumps(summary, allow_nan=False, default=str))
    else:  # plain text is printed as it is (paths and reasons may hold brackets), a renderable as rich draws it
        out_console.print(human, highlight=False, soft_wrap=True, markup=not isinstance(human, str))


def fail_if_all_failed(done: int, failed: int, what: str, first: str | None = None, fix: str = "") -> None:
    """Exit 1 with one line when a batch command had items and every one failed (partial failures exit 0:
    the summary counts them)."""
    if failed and not done:
        fail(f"all {failed} {what} failed" + (f" (first: {first})" if first else "") + (f"; {fix}" if fix else ""),
             code=1)


def fail(msg: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback: the message says how to fix it)."""
    console.print(f"[bold red]error:[/] {escape(' '.join(str(msg).split()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def refusing(*errors: type[BaseException]) -> Iterator[None]:
    """A :class:`ConfigError` (a recipe's too), a :class:`DeviceError`, or one of ``errors``, becomes the one
    error line and exit 2."""
    try:
        yield
    except (ConfigError, DeviceError, *errors) as e:
        fail(str(e))


def split_overrides(config: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """``config`` may hold the first override when no file is given (``cmd lr=3e-5 --out ...``)."""
    overrides = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        return None, [str(config), *overrides]
    return config, overrides


def read_mapping(path: Path | None) -> dict[str, Any]:
    """A YAML/JSON file of config keys (``{}`` without a file); ConfigError names the file."""
    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"{path}: config not found; give the path of a YAML/JSON config file")
    import yaml

    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON ({' '.join(str(e).split())}); fix the syntax there") from None
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"{path}: {type(d).__name__} at top level is not a mapping; write `key: value` lines")
    return d or {}


def load_config(cls, path: Path | None, overrides: list[str] | None = None, set_keys: dict | None = None):
    """``cls`` from ``path`` + dotted ``overrides`` + the command's own options (``set_keys``: dotted key ->
    value, None left out), checked strictly; ConfigError names the file, the dotted key and the fix."""
    path, overrides = split_overrides(path, overrides)
    where = str(path) if path is not None else "config"
    d = apply_overrides(read_mapping(path), overrides, cls, where=f"{where}: override" if path else "override")
    for key, value in (set_keys or {}).items():
        if value is not None:
            d = _set(d, key.split("."), value)
    return from_mapping(cls, d, where)


def _set(d: dict, path: list[str], value: Any) -> dict:
    node = d
    for part in path[:-1]:
        node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
        node = node[part]
    node[path[-1]] = value
    return d


def need_files(what: str = "manifest", **paths: Path | str | None) -> None:
    """Refuse missing input files before anything is loaded: ``need_files(train=path)`` names ``--train``.

    A key ending in ``_key`` names a config key instead (``lexicon_key=path``)."""
    for name, p in paths.items():
        if p is not None and not Path(p).is_file():
            key = name[:-4] if name.endswith("_key") else f"--{name.replace('_', '-')}"
            raise ConfigError(f"{key}: {str(p)!r} is not found; give the path of an existing {what}")


def need_fields(manifest: Path, wanted: dict[str, str], hint: str = "") -> None:
    """Refuse a field that no line of ``manifest`` has (``wanted``: field -> the option that named it): one
    line naming the option, the fields the lines do have, and ``hint``. Stops reading once all are seen."""
    from selfspeech.data.manifest import read_manifest

    present: set[str] = set()
    for item in read_manifest(manifest):
        present.update(item)
        if all(f in present for f in wanted):
            return
    for field, option in wanted.items():
        if field not in present:
            have = f"its lines have {', '.join(sorted(present))}" if present else "it has no lines"
            fail(f"{option} {field!r}: no line of {manifest} has this field; {have}" + (f"; {hint}" if hint else ""))


def check_model(name: str, option: str, language: str = "en", task: str = "transcribe") -> None:
    """A Whisper model source given on the command line, able to decode ``language`` and ``task``;
    nothing is pulled or opened."""
    from selfspeech.adapt.recipe import check_model_name

    check_model_name(name, option, language, task, "language")


def save_run_config(cfg: Any, out: Path, name: str = RESOLVED) -> Path:
    """Write the fully resolved config beside a run's outputs."""
    return save_resolved(cfg, Path(out) / name)


def need_device(device: str | None, precision: str | None = None, prefix: str = "") -> None:
    """Refuse a device or precision this machine lacks (DeviceError: what there is), before any model loads;
    the message names the config key (``prefix``: its section, e.g. ``loop.``)."""
    check_device(device, precision, prefix)
