"""``selfspeech label``: pseudo-label a manifest with a Whisper teacher."""
from __future__ import annotations

from pathlib import Path

import typer

from selfspeech.accel import DEVICE_CHOICES
from selfspeech.commands.common import JSON_HELP, emit, fail, fail_if_all_failed, refusing
from selfspeech.data.manifest import ManifestError
from selfspeech.label.filters import FilterConfig


def label(
    teacher: str = typer.Option("whisper-base", help="A model name (whisper-base, whisper-tiny.en, or one added with `selfspeech models add`; see `selfspeech models list`), a transformers or CTranslate2 model folder, or a hub id such as openai/whisper-large-v3 (online)."),
    in_path: Path = typer.Option(..., "--in", help="Manifest of the audio to label (JSONL)."),
    out_path: Path = typer.Option(..., "--out", help="Labels (JSONL, append-only; rerun to resume)."),
    backend: str = typer.Option("faster-whisper", help="faster-whisper (CTranslate2, batched) or transformers (any Whisper checkpoint)."),
    device: str = typer.Option("auto", help=f"Where the teacher decodes: {DEVICE_CHOICES} (auto: the GPU when there is one; with --ray and CUDA: one actor per GPU)."),
    batch_size: int = typer.Option(8, help="Utterances decoded together (sorted by length first)."),
    window: float = typer.Option(15.0, help="faster-whisper encoder window in seconds: a batch is padded to its longest utterance + 0.5 s, at least this, at most 30 (30 = Whisper's standard window; below ~10 s Whisper breaks, see benchmarks/RESULTS.md)."),
    compute_type: str = typer.Option("auto", help="auto: faster-whisper int8 on a CPU, float16 on a GPU; transformers float32 on a CPU, bfloat16 on a GPU. faster-whisper also takes int8_float16, float16 (GPU), int8_float32, float32; transformers float32, bfloat16, float16 (GPU)."),
    beam_size: int = typer.Option(1, help="1 = greedy."),
    language: str = typer.Option("en", help="Language of the audio, a code or name (en, de, german); multilingual teachers only: .en models take en."),
    task: str = typer.Option("transcribe", help="transcribe, or translate (into English; multilingual teachers)."),
    max_compression_ratio: float = typer.Option(2.4, help="Flag labels above this gzip ratio (repetition loops)."),
    min_avg_logprob: float = typer.Option(-1.0, help="Flag labels whose mean token log-prob is below this."),
    max_no_speech_prob: float = typer.Option(0.6, help="Flag labels whose no-speech probability is above this."),
    limit: int = typer.Option(None, help="Label only the first N utterances."),
    ray_actors: int = typer.Option(0, "--ray", help="Decode with N Ray actors (pip install 'selfspeech\\[ray]'; RAY_ADDRESS joins a cluster); the same records as one process."),
    threads: int = typer.Option(0, help="CPU threads per teacher (0 = CTranslate2's default; with --ray: 1 if 0)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
    segment: bool = typer.Option(False, "--segment", help="Cut utterances longer than 30 s with the VAD first (`selfspeech data segment` defaults; into OUT.segments.jsonl, resumable) and label the segments; without it such a manifest is refused."),
) -> None:
    """Pseudo-label every utterance of a manifest with a teacher.

    Each output line is the input item (audio path, speaker, metadata, never the
    reference text) with text = the teacher's transcript, avg_logprob,
    compression_ratio, no_speech_prob, decode_seconds, status (ok|failed, with
    the reason) and flags (empty, repetition, low_logprob, no_speech,
    truncated_30s: the audio ran past 30 s although its manifest said less).
    Flagged labels are kept so reports can count them. An utterance longer
    than Whisper's 30-s window is refused before any model opens; --segment
    cuts such utterances into segments (one output line each, with offset and
    duration into the recording) and labels those.
    A killed run resumes where it stopped: run the same command again. An
    output written by another teacher, backend, compute type or decoding
    option is refused (OUT.teacher.json records them). Exit 1 when every
    utterance of the run failed; failures of some are counted in the summary.

    A multilingual teacher decodes --language with --task; an English-only
    (.en) one is refused any other language before it loads.

    Example: selfspeech label --teacher whisper-base --in children.jsonl --out children.labels.jsonl
    """
    from selfspeech.accel import resolve_device
    from selfspeech.data.segment import check_lengths
    from selfspeech.label.resume import ResumeError, check_resume, labelling_spec, record_spec
    from selfspeech.label.run import label_manifest
    from selfspeech.label.teacher import DecodeOptions, load_teacher, resolve_compute_type
    from selfspeech.models.zoo import ModelError, check_source

    with refusing(ValueError):  # device and compute type first: before any model file is opened
        dev = resolve_device(device, key="--device")
        if backend not in ("faster-whisper", "transformers"):
            fail(f"--backend {backend!r}: choose faster-whisper or transformers")
        compute_type = resolve_compute_type(compute_type, dev, backend, key="--compute-type")
    if not in_path.is_file():
        fail(f"{in_path}: manifest not found")
    if (language, task) != ("en", "transcribe"):  # every Whisper transcribes English; others are checked now
        with refusing(ModelError):
            check_source(teacher, language, task)
    with refusing(ValueError):
        options = DecodeOptions(language=language, beam_size=beam_size, window_s=window, task=task)
    filters = FilterConfig(max_compression_ratio, min_avg_logprob, max_no_speech_prob)
    spec = labelling_spec(teacher, backend, compute_type, options)
    with refusing(ResumeError):  # before any model is opened: a resumed file keeps one teacher
        check_resume(out_path, spec)
    in_path = _segmented(in_path, out_path) if segment else in_path
    with refusing(ManifestError):  # Whisper sees 30 s: a longer utterance is refused, never truncated
        check_lengths(in_path, limit=limit)
    if ray_actors > 0:
        import dataclasses

        from selfspeech.label.ray_label import TeacherSpec, label_with_ray

        ray_spec = TeacherSpec(teacher, backend, compute_type, threads or 1, dataclasses.asdict(options), str(dev))
        try:
            ray_spec.load()  # fail here, clearly, rather than inside a remote actor
            record_spec(out_path, spec)
            stats = label_with_ray(in_path, out_path, ray_spec, batch_size, ray_actors, filters, limit)
        except (ValueError, FileNotFoundError, ModelError, ImportError, ManifestError) as e:
            fail(f"teacher {teacher!r}: {e}")
        _summary(stats, out_path, as_json)
        return
    try:
        t = load_teacher(teacher, backend, compute_type, options, cpu_threads=threads, device=dev)
    except (ValueError, FileNotFoundError, ModelError) as e:
        fail(f"teacher {teacher!r}: {e}")
    record_spec(out_path, spec)
    try:
        stats = label_manifest(in_path, out_path, t, teacher, batch_size, filters, limit)
    except ManifestError as e:
        fail(str(e))
    _summary(stats, out_path, as_json)


def _segmented(in_path: Path, out_path: Path) -> Path:
    """``in_path`` with every utterance over 30 s cut by the VAD, as OUT.segments.jsonl (resumable)."""
    from selfspeech.commands.common import console
    from selfspeech.data.segment import WHISPER_SECONDS, SegmentConfig, segment_manifest

    seg_path = out_path.with_name(out_path.name + ".segments.jsonl")
    with refusing(ManifestError, ValueError):
        s = segment_manifest(in_path, seg_path, SegmentConfig(untouched_up_to=WHISPER_SECONDS))
    console.print(f"--segment: {s['recordings']} utterances -> {s['segments']} segments in {seg_path} "
                  f"({s['dropped_regions']} speech regions under 1 s dropped, {s['no_speech_recordings']} "
                  f"without speech, {s['failed_recordings']} unreadable)", highlight=False)
    return seg_path


def _summary(stats, out_path: Path, as_json: bool) -> None:
    """The run's counts on stdout; exit 1 (one line on stderr) when every utterance of the run failed."""
    d = {"out": str(out_path), **stats.as_dict()}
    flags = ", ".join(f"{k} {v}" for k, v in sorted(stats.flags.items()))
    line = (f"{out_path}: {stats.labelled} labelled, {stats.failed} failed, {stats.already_done} already there "
            f"({stats.total} utterances)" + (f"; flagged: {flags}" if flags else "")
            + (f"; first failure: {stats.first_error}" if stats.failed else "")
            + (f"; RTF {stats.rtf:.3f} on {stats.device} ({stats.compute_type})" if stats.audio_seconds else ""))
    emit(d, as_json, line)
    fail_if_all_failed(stats.labelled, stats.failed, "utterances of this run", stats.first_error,
                       "check the audio paths with `selfspeech data validate`")
