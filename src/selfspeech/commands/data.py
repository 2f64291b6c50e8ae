"""``selfspeech data ...``: import, select, split, validate and summarise manifests."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer
from rich.table import Table

from selfspeech.commands.common import JSON_HELP, emit, fail, need_fields, out_console
from selfspeech.data.kaldi import KaldiError, iter_kaldi_dir
from selfspeech.data.manifest import ManifestError, read_manifest, write_manifest
from selfspeech.data.segment import SegmentConfig
from selfspeech.data.select import parse_parts, parse_rule, select, split_by_speaker
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

    Example: selfspeech data import-kaldi speechocean762/train data/so762.jsonl
    """
    try:
        n = write_manifest(out, iter_kaldi_dir(data_dir))
    except (KaldiError, OSError) as e:
        fail(str(e))
    out_console.print(f"wrote {n} utterances to {out}")


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
    out_console.print(f"wrote {out}")


@app.command("export-lhotse")
def export_lhotse(
    manifest: Path = typer.Argument(..., help="Manifest (JSONL)."),
    out: Path = typer.Argument(..., help="CutSet to write (.jsonl.gz)."),
) -> None:
    """Write a Lhotse CutSet (recordings + supervisions; metadata in supervision.custom). Needs lhotse.

    Example: selfspeech data export-lhotse so762.jsonl data/so762_cuts.jsonl.gz
    """
    from selfspeech.data.exchange import write_lhotse

    try:
        write_lhotse(read_manifest(manifest), out)
    except (ManifestError, ValueError, ImportError, OSError) as e:
        fail(str(e))
    out_console.print(f"wrote {out}")


@app.command("import-lhotse")
def import_lhotse(
    cuts: Path = typer.Argument(..., help="Lhotse CutSet (.jsonl.gz), one supervision per cut."),
    out: Path = typer.Argument(..., help="Manifest to write (JSONL)."),
) -> None:
    """Import a Lhotse CutSet into a manifest (text, speaker, gender, language, custom fields). Needs lhotse.

    Example: selfspeech data import-lhotse data/librispeech_cuts_dev-clean.jsonl.gz data/dev-clean.jsonl
    """
    from selfspeech.data.exchange import read_lhotse

    try:
        n = write_manifest(out, read_lhotse(cuts))
    except (ValueError, ImportError, OSError) as e:
        fail(str(e))
    out_console.print(f"wrote {n} utterances to {out}")


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
        need_fields(manifest, {c.field: "--where" for c in parse_rule(where)})
        n = write_manifest(out, select(read_manifest(manifest), where))
    except (ManifestError, ValueError) as e:
        fail(str(e))
    emit({"out": str(out), "utterances": n}, False, f"selected {n} utterances into {out}")


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
        need_fields(manifest, {speaker_field: "--speaker-field"},
                    "splits are by speaker: name the field that holds it with --speaker-field")
        splits = split_by_speaker(read_manifest(manifest), parse_parts(parts), seed, speaker_field)
    except (ManifestError, ValueError) as e:
        fail(str(e))
    lines = []
    for name, items in splits.items():
        write_manifest(out_dir / f"{name}.jsonl", items)
        n_spk = len({i[speaker_field] for i in items})
        lines.append(f"{name}: {len(items)} utterances, {n_spk} speakers -> {out_dir / (name + '.jsonl')}")
    emit({}, False, "\n".join(lines))


@app.command("validate")
def validate_cmd(
    manifest: Path = typer.Argument(..., help="Manifest to check (JSONL)."),
    sample_rate: int = typer.Option(16000, help="Expected sample rate (another one is a warning: resampled on load)."),
    channels: int = typer.Option(1, help="Expected channel count (another one is a warning: mixed down on load)."),
    require_text: bool = typer.Option(True, "--text/--no-text", "--require-text/--no-require-text", help="--no-text for unlabelled audio: a missing or empty transcript is fine (one that is there is still checked)."),
    require_speaker: bool = typer.Option(False, help="Treat a missing speaker field as a problem (splits and CIs are by speaker)."),
    min_seconds: float = typer.Option(0.1, help="Shorter audio is a problem (too_short)."),
    max_seconds: float = typer.Option(30.0, help="Longer audio is a problem (too_long: Whisper sees 30 s)."),
    max_show: int = typer.Option(50, help="Print at most this many problems (all are counted)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check every utterance before anything long runs on it.

    Errors: missing files, unreadable/corrupt, empty or NaN audio, digital
    silence, clipping, too short or too long, empty or non-text transcripts,
    non-UTF-8 ids, missing speakers, duplicate ids, malformed lines (named by
    file and line). Warnings: another sample rate or channel count than
    expected, which the readers convert (soxr resampling, mixdown).

    Prints each problem with utterance id and path (stderr), then the counts;
    exits 1 when there is an error, 0 when there are only warnings.

    Example: selfspeech data validate so762.jsonl (unlabelled audio: --no-text)
    """
    import sys

    from tqdm import tqdm

    if not manifest.is_file():
        fail(f"{manifest}: manifest not found")
    found: dict[bool, Counter[str]] = {False: Counter(), True: Counter()}  # warning? -> kind -> count
    n_items = 0
    with tqdm(desc="validate", unit="utt", disable=None) as bar:
        for x in validate_manifest(manifest, sample_rate, channels, require_text, require_speaker=require_speaker,
                                   min_seconds=min_seconds, max_seconds=max_seconds):
            if isinstance(x, dict):
                n_items += 1
                bar.update()
                continue
            found[x.warning][x.kind] += 1
            if sum(found[False].values()) + sum(found[True].values()) <= max_show:
                bar.write(("warning: " if x.warning else "") + str(x), file=sys.stderr)
    errors, warnings = found[False], found[True]
    summary = {"manifest": str(manifest), "utterances": n_items, "errors": sum(errors.values()),
               "warnings": sum(warnings.values()), "error_kinds": dict(errors.most_common()),
               "warning_kinds": dict(warnings.most_common())}
    emit(summary, as_json, _validate_table(summary) if errors or warnings else
         f"ok: {n_items} utterances, no problems")
    if errors:
        raise typer.Exit(1)


def _validate_table(s: dict) -> Table:
    verdict = "ok (warnings only)" if not s["errors"] else f"{s['errors']} errors"
    t = Table(title=f"{s['manifest']}: {verdict}, {s['warnings']} warnings in {s['utterances']} utterances")
    for c in ("problem", "severity", "count"):
        t.add_column(c, justify="right" if c == "count" else "left")
    for sev, kinds in (("error", s["error_kinds"]), ("warning (converted on load)", s["warning_kinds"])):
        for k, v in kinds.items():
            t.add_row(k, sev, str(v))
    return t


@app.command("stats")
def stats_cmd(
    manifest: Path = typer.Argument(..., help="Manifest (JSONL)."),
    by: str = typer.Option(None, help="Metadata field to group by (default: age_group where the lines have it, else all utterances in one group)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Utterances, speakers and hours per group.

    Example: selfspeech data stats so762.jsonl --by age_group
    """
    key = by or "age_group"
    groups: dict[str, list] = {}
    try:
        if by is not None:
            need_fields(manifest, {by: "--by"})
        for it in read_manifest(manifest):
            g = groups.setdefault(str(it.get(key, "-")), [0, set(), 0.0])
            g[0] += 1
            g[1].add(it.get("speaker"))
            g[2] += float(it.get("duration") or 0)
    except ManifestError as e:
        fail(str(e))
    if by is None and list(groups) == ["-"]:  # no line has age_group: one group of everything
        key, groups = "all", {"all": groups["-"]}
    rows = [{"group": k, "utterances": n, "speakers": len(spk - {None}), "hours": round(dur / 3600, 4)}
            for k, (n, spk, dur) in sorted(groups.items())]
    t = Table(title=str(manifest))
    for c in (key, "utterances", "speakers", "hours"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["group"], str(r["utterances"]), str(r["speakers"]), f"{r['hours']:.2f}")
    emit({"manifest": str(manifest), "by": key, "groups": rows}, as_json, t)


_SEG = SegmentConfig()  # the option defaults are the library's (chosen by benchmarks/long_form_vad.py)


@app.command("segment")
def segment_cmd(
    manifest: Path = typer.Argument(..., help="Manifest of long recordings (JSONL)."),
    out: Path = typer.Argument(..., help="Manifest of segments to write (JSONL; rerun to resume)."),
    min_seconds: float = typer.Option(_SEG.min_seconds, help="Speech regions shorter than this are joined to a neighbour within 2 s when the result fits, else dropped and counted."),
    max_seconds: float = typer.Option(30.0, help="Longest segment, padding included (at most 30: Whisper's window); longer speech is split at its quietest 10-ms frame."),
    pad_seconds: float = typer.Option(_SEG.pad_seconds, help="Padding on each side of a region, clipped to the file and to half the gap to the next one."),
    merge_gap: float = typer.Option(_SEG.merge_gap, help="Regions closer than this (seconds of silence) are joined while they fit in --max-seconds."),
    threshold: float = typer.Option(_SEG.threshold, help="Silero VAD speech probability above which a 32-ms frame is speech."),
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
    from selfspeech.data.segment import segment_manifest, side_paths

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
