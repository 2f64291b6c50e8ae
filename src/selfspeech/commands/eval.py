"""``selfspeech eval``: WER/CER per group with speaker-bootstrap intervals, optionally A vs B."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markdown import Markdown
from rich.markup import escape

from selfspeech.commands.common import JSON_HELP, console, emit, fail, fail_if_all_failed
from selfspeech.commands.common import warn as warn_line
from selfspeech.data.manifest import ManifestError
from selfspeech.eval.report import build_results_files, render_markdown, write_report
from selfspeech.text.normalize import NORMALIZERS


def evaluate(
    ref: Path = typer.Option(..., "--ref", help="Reference manifest (JSONL: id, text, speaker, any metadata)."),
    hyp: Path = typer.Option(..., "--hyp", help="Hypotheses (JSONL: id, text; optional flags), e.g. `selfspeech label` output."),
    by: str = typer.Option("", "--by", help="Comma list of reference fields to group by, each on its own, e.g. age_group,speaker."),
    normalizer: str = typer.Option("whisper_english", "--normalizer", help=f"Text normaliser for both sides: {', '.join(NORMALIZERS)}."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json, eval.md and wer.png (default: print only)."),
    compare: Optional[Path] = typer.Option(None, "--compare", help="Second hypothesis file B: paired bootstrap of --hyp (A) vs B."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples of speakers for 95% CIs (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed: same seed, same intervals."),
    min_coverage: float = typer.Option(0.95, "--min-coverage", min=0.0, max=1.0, help="Refuse when a hypothesis file has hypotheses for less than this fraction of the reference ids (0: never)."),
    subset: bool = typer.Option(False, "--subset", help="Score only the references that have a hypothesis (in every system); the report says how many were left out."),
    align: Optional[Path] = typer.Option(None, "--align", help="Write per-utterance word alignments of --hyp here (JSONL: id, ref, hyp, counts, ops of C/S/D/I with the words)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP + " The object is eval.json's content."),
) -> None:
    """Score hypotheses against a reference: corpus WER and CER with 95% CIs, per group.

    WER is total errors / total reference words (not a mean of per-utterance
    rates), after the same normaliser on both sides. Intervals resample
    speakers (the `speaker` field) with replacement. A reference id without a
    hypothesis counts as all deletions and is reported; hypothesis ids not in
    the reference, and labeller flags, are counted in the report. A
    half-written last hypothesis line (labelling in progress) is skipped with a
    warning. Hypotheses covering less than --min-coverage of the reference ids
    are refused (a reference that is a superset of what was decoded), unless
    --subset scores only the covered references. Exit 1 when every scored
    hypothesis is a failed decode.

    Example: selfspeech eval --ref eval.jsonl --hyp labels/whisper.jsonl --by age_group,speaker --out reports/whisper --compare labels/adapted.jsonl
    """
    if normalizer not in NORMALIZERS:
        raise typer.BadParameter(f"{normalizer!r} is not one of {', '.join(NORMALIZERS)}", param_hint="--normalizer")
    fields = [f.strip() for f in by.split(",") if f.strip()]
    notes: list[str] = []

    def warn(msg: str) -> None:
        warn_line(msg)
        notes.append(msg)

    try:  # streaming: texts are read as they are scored, so memory does not grow with the files
        results = build_results_files(ref, hyp, compare, by=fields, normalizer=normalizer, n_resamples=bootstrap,
                                      seed=seed, notes=notes, warn=warn, min_coverage=min_coverage, subset=subset,
                                      align=align)
    except (ManifestError, ValueError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or align}: {e.strerror or e}; check the path and its permissions")

    for label, s in (("", results["system"]), (" (B)", (results["compare"] or {}).get("system"))):
        if s and s["missing"]["count"]:
            warn_line(f"{s['missing']['count']} reference ids have no hypothesis{label}; scored as all deletions")
    if out is not None:
        try:
            paths = write_report(results, out)
        except OSError as e:
            fail(f"{out}: cannot write the report ({e.strerror or e})")
        _wrote(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    if align is not None:
        _wrote(f"wrote {results['alignments']['utterances']} alignments to {align}")
    emit(results, as_json, Markdown(render_markdown(results)))
    s = results["system"]
    failed = s["flags"].get("failed", 0)
    fail_if_all_failed(s["groups"][0]["utterances"] - s["missing"]["count"] - failed, failed, "decodes in --hyp",
                       fix="every scored hypothesis is empty: fix the decoding run (its failed records give the reasons)")


def _wrote(msg: str) -> None:
    """What was written: stderr, so that stdout holds only the report (or its JSON)."""
    console.print(escape(msg), highlight=False, soft_wrap=True)
