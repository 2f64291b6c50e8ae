"""The ``selfspeech`` command line: one Typer app, one sub-command module each.

Every command module lives in :mod:`selfspeech.commands` and only calls the
library; nothing here computes.
"""
from __future__ import annotations

import typer

import selfspeech
from selfspeech.commands import adapt as _adapt
from selfspeech.commands import arith as _arith
from selfspeech.commands import data as _data
from selfspeech.commands import demo as _demo
from selfspeech.commands import eval as _eval
from selfspeech.commands import imports as _imports  # noqa: F401  (adds import-dir, import-table, import-hf to data)
from selfspeech.commands import label as _label
from selfspeech.commands import models as _models
from selfspeech.commands import ssl as _ssl
from selfspeech.commands import sv as _sv

app = typer.Typer(
    name="selfspeech",
    help="Learn speech models from audio nobody has transcribed.\n\n"
    "Start with `selfspeech demo` (self-contained) or `selfspeech data import-kaldi`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every sub-command
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"selfspeech {selfspeech.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the package version and exit.")) -> None:
    """Learn speech models from audio nobody has transcribed."""


app.add_typer(_data.app, name="data")
app.add_typer(_models.app, name="models")
app.add_typer(_arith.app, name="arith")
app.add_typer(_sv.app, name="sv")
app.command("label")(_label.label)
app.command("eval")(_eval.evaluate)
app.command("demo")(_demo.demo)
app.command("adapt")(_adapt.adapt)
app.command("export")(_adapt.export)
app.command("finetune-whisper")(_adapt.finetune_whisper)
app.command("pretrain")(_ssl.pretrain)
app.command("finetune-ctc")(_ssl.finetune_ctc)
app.command("decode-ctc")(_ssl.decode_ctc)
app.command("export-ctc")(_ssl.export_ctc)
app.command("units")(_ssl.units)

if __name__ == "__main__":
    app()
