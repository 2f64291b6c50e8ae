"""``selfspeech data import-dir | import-table | import-hf``: manifests from a user's own recordings.

Registered on the ``data`` app of :mod:`selfspeech.commands.data` (``cli.py``
imports this module). Each command prints what it wrote and what it left out
(unreadable files, files without transcript or speaker).
"""
from __future__ import annotations

from pathlib import Path

import typer

from selfspeech.commands.common import console, fail
from selfspeech.commands.data import app
from selfspeech.data.imports import DataImportError, ImportReport, import_dir, import_table
from selfspeech.data.manifest import write_manifest

UNREADABLE_HELP = "A file soundfile cannot read: skip it (listed in the summary) or error (stop, write nothing)."


def _write(out: Path, items, report: ImportReport) -> None:
    """Write the manifest (atomically: an error leaves no file) and print the report."""
    try:
        write_manifest(out, items)
    except (DataImportError, ValueError, OSError) as e:
        fail(str(e))
    lines = report.lines()
    console.print(f"wrote {lines[0]} to {out}", highlight=False, markup=False, soft_wrap=True)
    for line in lines[1:]:  # soft_wrap: paths stay whole, for grep and copy
        console.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command("import-dir")
def import_dir_cmd(
    folder: Path = typer.Argument(..., help="Folder of audio files, searched recursively."),
    out: Path = typer.Argument(..., help="Manifest to write (JSONL)."),
    text_ext: str = typer.Option(None, help="Sidecar transcript extension, e.g. .txt: a.wav + a.txt (UTF-8)."),
    speaker_from: str = typer.Option("none", help="Speaker from the path: parent (DIR/SPEAKER/a.wav), grandparent "
                                     "(DIR/SPEAKER/CHAPTER/a.wav, LibriSpeech) or none."),
    speaker_regex: str = typer.Option(None, help="Speaker from a regex on the relative path with a group named "
                                      "speaker, e.g. '^(?P<speaker>[^_/]+)_'."),
    unreadable: str = typer.Option("skip", help=UNREADABLE_HELP),
) -> None:
    """Import a folder of recordings: one manifest line per audio file, sorted by path.

    Audio is every extension (any case) of a format this libsndfile reads:
    wav, flac, ogg, opus, mp3, aiff, au, caf, w64, rf64, sph, voc. Each line
    gets id (the path below FOLDER without extension, '/' -> '_'),
    audio_filepath (absolute), duration, sample_rate and channels from the
    header, text from a sidecar file, speaker from the path. Two files with the
    same id (a.wav and a.flac) are refused.

    Example: selfspeech data import-dir recordings/ data/mine.jsonl --text-ext .txt --speaker-from parent
    """
    report = ImportReport()
    try:
        items = import_dir(folder, text_ext, speaker_from, speaker_regex, unreadable, report)
    except DataImportError as e:
        fail(str(e))
    _write(out, items, report)


@app.command("import-table")
def import_table_cmd(
    table: Path = typer.Argument(..., help="Table listing the audio: .csv (commas) or .tsv (tabs, Common Voice)."),
    out: Path = typer.Argument(..., help="Manifest to write (JSONL)."),
    audio: str = typer.Option("path", help="Column with the audio file paths."),
    text: str = typer.Option("sentence", help="Transcript column ('' for none)."),
    speaker: str = typer.Option("client_id", help="Speaker column ('' for none)."),
    id_column: str = typer.Option(None, "--id", help="Utterance id column (default: the column id when there is "
                                  "one, else the audio path without extension)."),
    audio_dir: Path = typer.Option(None, help="Folder relative audio paths are resolved against (default: the "
                                   "table's folder; Common Voice keeps its clips in clips/: --audio-dir CV/clips)."),
    unreadable: str = typer.Option("skip", help=UNREADABLE_HELP),
) -> None:
    """Import a CSV/TSV table of recordings; the defaults read a Common Voice TSV (path, sentence, client_id).

    Every other column (age, gender, accents, ...) is kept as metadata; duration,
    sample_rate and channels come from the audio headers.

    Example: selfspeech data import-table cv-corpus/en/train.tsv data/cv_train.jsonl --audio-dir cv-corpus/en/clips
    """
    report = ImportReport()
    try:
        items = import_table(table, audio, text or None, speaker or None, id_column, audio_dir, unreadable, report)
    except DataImportError as e:
        fail(str(e))
    _write(out, items, report)


def _load_saved(dataset: Path, split: str | None):
    try:
        import datasets
    except ImportError:
        fail("needs the datasets package: pip install 'selfspeech[exchange]'")
    ds = datasets.load_from_disk(str(dataset))
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            fail(f"{dataset} is a DatasetDict: give --split, one of {list(ds)}")
        ds = ds[split]
    return ds


@app.command("import-hf")
def import_hf(
    dataset: Path = typer.Argument(..., help="A Hugging Face dataset saved with save_to_disk (a Dataset, or a "
                                   "DatasetDict with --split), or an audiofolder (audio + metadata.csv/.jsonl)."),
    out: Path = typer.Argument(..., help="Manifest to write (JSONL)."),
    audio_dir: Path = typer.Option(None, help="Where audio held in the dataset is written "
                                   "(default: OUT's folder/audio)."),
    split: str = typer.Option(None, help="Split of a DatasetDict or of an audiofolder, e.g. train."),
    audio: str = typer.Option("audio", help="Audio column (an audiofolder's: file_name)."),
    text: str = typer.Option("text", help="Transcript column ('' for none)."),
    speaker: str = typer.Option("speaker", help="Speaker column ('' for none)."),
    id_column: str = typer.Option(None, help="Utterance id column (default: the column id when there is one, "
                                  "else row numbers; an audiofolder's: the file name)."),
) -> None:
    """Import a Hugging Face audio dataset (save_to_disk folder or audiofolder) without decoding it.

    An Audio column is read undecoded (no torchcodec needed): its bytes are
    written once to --audio-dir as they are, file paths are used in place. A
    saved dataset needs the datasets package; an audiofolder is read directly.

    Example: selfspeech data import-hf saved_ds/ data/hf.jsonl --split train --text sentence --speaker client_id
    """
    from selfspeech.data.exchange import from_hf_dataset
    from selfspeech.data.imports import audiofolder_metadata, import_audiofolder

    report = ImportReport()
    saved = (dataset / "state.json").is_file() or (dataset / "dataset_dict.json").is_file()
    try:
        if not saved and audiofolder_metadata(dataset, split) is None:
            fail(f"{dataset}: neither a save_to_disk dataset (state.json, dataset_dict.json) nor an audiofolder "
                 "(metadata.csv, metadata.jsonl); for a plain folder of audio use `selfspeech data import-dir`")
        if not saved:
            items = import_audiofolder(dataset, split, text or None, speaker or None, id_column,
                                       "file_name" if audio == "audio" else audio, report=report)
            _write(out, items, report)
            return
        ds = _load_saved(dataset, split)
        n = write_manifest(out, from_hf_dataset(ds, audio_dir or out.parent / "audio", audio, text or None,
                                                speaker or None, id_column))
    except (DataImportError, ValueError, OSError) as e:
        fail(str(e))
    console.print(f"wrote {n} utterances to {out}")
