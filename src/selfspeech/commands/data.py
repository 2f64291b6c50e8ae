"""``selfspeech data ...``: import, select, split, validate and summarise manifests."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from selfspeech.commands.common import JSON_HELP, console, fail
from selfspeech.data.kaldi import KaldiError, iter_kaldi_dir
from selfspeech.data.manifest import ManifestError, read_manifest, write_manifest
from selfspeech.data.select import parse_parts, select, split_by_speaker
from selfspeech.data.validate import validate_manifest

app = typer.Typer(no_args_is_help=True, help="Manifests: import a folder of recordings, a CSV/TSV table, Kaldi, "
                  "Lhotse or Hugging Face data; select, split by speaker, validate.")


@app.command("import-kaldi")
def import_kaldi(
    data_dir: Path = typer.Argument(..., help="Kaldi data directory (wav.scp; optional text, utt2spk, segments, spk2age, spk2gender)."),
    out: Path = typer.Argument(..., help="Manifest to write (JSONL)."),
) -> None:
    """Import a Kaldi data directory into a JSONL manifest.

    Each line gets id, audio_filepath (absolute), duration, text, speaker and,
    when the directory has them, age, age_group (child <= 12, teen 13-17,
    adult >= 18) and gender.

    Example: selfspeech data import-kaldi ../shared/data/speechocean762-train data/so762.jsonl
    """
    try:
        n = write_manifest(out, iter_kaldi_dir(data_dir))
    except (KaldiError, OSError) as e:
        fail(str(e))
    console.print(f"wrote {n} utterances to {out}")


@app.command("export-kaldi")
def export_kaldi(
    manifest: Path = typer.Argument(..., help="Manifest (JSONL)."),
    out: Path = typer.Argument(..., help="Kaldi data directory to write."),
) -> None:
    """Write a Kaldi data directory: wav.scp, segments (for offset items), text, utt2spk, spk2utt, spk2age, spk2gender.

    Fields Kaldi has no file for go to utt2meta.jsonl.
    Example: selfspeech data export-kaldi so762.jsonl data/kaldi_so762
    """
    from selfspeech.data.exchange import write_kaldi_dir

    try:
        write_kaldi_dir(read_manifest(manifest), out)
    except (ManifestError, ValueError, OSError) as e:
        fail(str(e))
    console.print(f"wrote {out}")


@app.command("export-lhotse")
def export_lhotse(
    manifest: Path = typer.Argument(..., help="Manifest (JSONL)."),
    out: Path = typer.Argument(..., help="CutSet to write (.jsonl.gz)."),
) -> None:
    """Write a Lhotse CutSet (recordings + supervisions; metadata in supervision.custom). Needs lhotse."""
    from selfspeech.data.exchange import write_lhotse

    try:
        write_lhotse(read_manifest(manifest), out)
    except (ManifestError, ValueError, ImportError, OSError) as e:
        fail(str(e))
    console.print(f"wrote {out}")


@app.command("import-lhotse")
def import_lhotse(
    cuts: Path = typer.Argument(..., help="Lhotse CutSet (.jsonl.gz), one supervision per cut."),
    out: Path = typer.Argument(..., help="Manifest to write (JSONL)."),
) -> None:
    """Import a Lhotse CutSet into a manifest (text, speaker, gender, language, custom fields). Needs lhotse."""
    from selfspeech.data.exchange import read_lhotse

    try:
        n = write_manifest(out, read_lhotse(cuts))
    except (ValueError, ImportError, OSError) as e:
        fail(str(e))
    console.print(f"wrote {n} utterances to {out}")


@app.command("select")
def select_cmd(
    manifest: Path = typer.Argument(..., help="Input manifest (JSONL)."),
    out: Path = typer.Argument(..., help="Output manifest with the selected utterances."),
    where: str = typer.Option(..., "--where", "-w", help="Rule, e.g. 'age>=18' or 'age_group in child|teen, gender==f'."),
) -> None:
    """Keep the utterances whose metadata meets a rule.

    Example: selfspeech data select so762.jsonl adults.jsonl --where 'age>=18'
    """
    try:
        n = write_manifest(out, select(read_manifest(manifest), where))
    except (ManifestError, ValueError) as e:
        fail(str(e))
    console.print(f"selected {n} utterances into {out}")


@app.command("split")
def split_cmd(
    manifest: Path = typer.Argument(..., help="Input manifest (JSONL)."),
    out_dir: Path = typer.Argument(..., help="Folder for one manifest per part (<part>.jsonl)."),
    parts: str = typer.Option("train=0.8,dev=0.2", help="Parts as name=fraction of speakers, or name=count (last part takes the rest)."),
    seed: int = typer.Option(0, help="Seed of the speaker shuffle: same seed, same split."),
    speaker_field: str = typer.Option("speaker", help="Field that names the speaker."),
) -> None:
    """Split a manifest by speaker (never by utterance), seeded and reproducible.

    Example: selfspeech data split children.jsonl splits/ --parts adapt=0.5,eval=0.5 --seed 0
    """
    try:
        splits = split_by_speaker(read_manifest(manifest), parse_parts(parts), seed, speaker_field)
    except (ManifestError, ValueError) as e:
        fail(str(e))
    for name, items in splits.items():
        write_manifest(out_dir / f"{name}.jsonl", items)
        n_spk = len({i[speaker_field] for i in items})
        console.print(f"{name}: {len(items)} utterances, {n_spk} speakers -> {out_dir / (name + '.jsonl')}")


@app.command("validate")
def validate_cmd(
    manifest: Path = typer.Argument(..., help="Manifest to check (JSONL)."),
    sample_rate: int = typer.Option(16000, help="Expected sample rate."),
    channels: int = typer.Option(1, help="Expected channel count."),
    require_text: bool = typer.Option(True, help="Treat a missing/empty transcript as a problem (--no-require-text for unlabelled audio)."),
    require_speaker: bool = typer.Option(False, help="Treat a missing speaker field as a problem (splits and CIs are by speaker)."),
    min_seconds: float = typer.Option(0.1, help="Shorter audio is a problem (too_short)."),
    max_seconds: float = typer.Option(30.0, help="Longer audio is a problem (too_long: Whisper sees 30 s)."),
    max_show: int = typer.Option(50, help="Print at most this many problems (all are counted)."),
) -> None:
    """Check every utterance: missing files, unreadable/corrupt, empty or NaN audio,
    digital silence, clipping, too short or too long, wrong rate or channels,
    empty or non-text transcripts, non-UTF-8 ids, missing speakers, duplicate
    ids, malformed lines (named by file and line).

    Prints each problem with utterance id and path; exits 1 when anything is wrong.

    Example: selfspeech data validate so762.jsonl
    """
    from tqdm import tqdm

    if not manifest.is_file():
        fail(f"{manifest}: manifest not found")
    counts: Counter[str] = Counter()
    n_items = 0
    with tqdm(desc="validate", unit="utt", disable=None) as bar:
        for x in validate_manifest(manifest, sample_rate, channels, require_text, require_speaker=require_speaker,
                                   min_seconds=min_seconds, max_seconds=max_seconds):
            if isinstance(x, dict):
                n_items += 1
                bar.update()
                continue
            counts[x.kind] += 1
            if sum(counts.values()) <= max_show:
                bar.write(str(x))
    if not counts:
        console.print(f"[green]ok[/]: {n_items} utterances, no problems")
        return
    t = Table(title=f"{manifest}: {sum(counts.values())} problems in {n_items} utterances")
    t.add_column("problem")
    t.add_column("count", justify="right")
    for k, v in counts.most_common():
        t.add_row(k, str(v))
    console.print(t)
    raise typer.Exit(1)


@app.command("stats")
def stats_cmd(
    manifest: Path = typer.Argument(..., help="Manifest (JSONL)."),
    by: str = typer.Option("age_group", help="Metadata field to group by."),
) -> None:
    """Utterances, speakers and hours per group.

    Example: selfspeech data stats so762.jsonl --by age_group
    """
    groups: dict[str, list] = {}
    try:
        for it in read_manifest(manifest):
            g = groups.setdefault(str(it.get(by, "-")), [0, set(), 0.0])
            g[0] += 1
            g[1].add(it.get("speaker"))
            g[2] += float(it.get("duration") or 0)
    except ManifestError as e:
        fail(str(e))
    t = Table(title=str(manifest))
    for c in (by, "utterances", "speakers", "hours"):
        t.add_column(c)
    for k in sorted(groups):
        n, spk, dur = groups[k]
        t.add_row(k, str(n), str(len(spk)), f"{dur / 3600:.2f}")
    console.print(t)


@app.command("segment")
def segment_cmd(
    manifest: Path = typer.Argument(..., help="Manifest of long recordings (JSONL)."),
    out: Path = typer.Argument(..., help="Manifest of segments to write (JSONL; rerun to resume)."),
    min_seconds: float = typer.Option(1.0, help="Speech regions shorter than this are joined to a neighbour within 2 s when the result fits, else dropped and counted."),
    max_seconds: float = typer.Option(30.0, help="Longest segment, padding included (at most 30: Whisper's window); longer speech is split at its quietest 10-ms frame."),
    pad_seconds: float = typer.Option(0.2, help="Padding on each side of a region, clipped to the file and to half the gap to the next one."),
    merge_gap: float = typer.Option(0.5, help="Regions closer than this (seconds of silence) are joined while they fit in --max-seconds."),
    threshold: float = typer.Option(0.5, help="Silero VAD speech probability above which a 32-ms frame is speech."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Cut long recordings (lectures, calls) into utterances with Silero VAD (as faster-whisper ships it).

    Each output line points into the original file with offset and duration
    (seconds; no audio is copied): id = <recording id>_<start ms, zero-padded>,
    recording = the source id, the source's other fields copied, its text not
    (a recording's transcript does not belong to one segment). An item already
    at most --max-seconds long with one speech region passes through unchanged,
    text included. The summary (recordings, segments, speech and dropped seconds)
    is printed and written to OUT.summary.json; OUT.recordings.jsonl holds one
    line per recording. A killed run resumes: run the same command again.

    Example: selfspeech data segment lectures.jsonl lectures.segments.jsonl --max-seconds 20
    """
    from selfspeech.commands.common import emit, fail_if_all_failed
    from selfspeech.data.segment import SegmentConfig, segment_manifest, side_paths

    if not manifest.is_file():
        fail(f"{manifest}: manifest not found")
    try:
        cfg = SegmentConfig(min_seconds, max_seconds, pad_seconds, merge_gap, threshold)
        s = segment_manifest(manifest, out, cfg)
    except (ManifestError, ValueError) as e:
        fail(str(e))
    def span(sec: float) -> str:
        return f"{sec / 3600:.2f} h" if sec >= 3600 else f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.1f} s"

    line = (f"{out}: {s['segments']} segments ({span(s['speech_seconds'])}) from {s['recordings']} recordings "
            f"({span(s['audio_seconds'])}; {s['passed_through']} passed through unchanged); dropped "
            f"{s['dropped_regions']} regions shorter than --min-seconds ({s['dropped_seconds']:.1f} s); "
            f"{s['no_speech_recordings']} without speech, {s['failed_recordings']} failed; {s['resumed']} already "
            f"there; summary in {side_paths(out)[1]}")
    emit(s, as_json, line)
    fail_if_all_failed(s["recordings"] - s["failed_recordings"], s["failed_recordings"], "recordings",
                       s["failed"][0] if s["failed"] else None, "check the audio paths with `selfspeech data validate`")
