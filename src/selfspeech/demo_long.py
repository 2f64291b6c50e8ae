"""``selfspeech demo --long-form``: the demo's target accent as a folder of long, untranscribed recordings.

What a user with their own recordings runs, end to end, on audio whose truth
the demo knows: the target speakers' sentences are joined per speaker into
recordings with pauses (:mod:`selfspeech.data.longform`); the adapt speakers'
recordings go through ``data import-dir`` and ``data segment`` and become the
target of ``adapt`` with neither transcripts nor speakers (one pseudo-speaker
per recording); the eval speakers' recordings are segmented the same way and,
only afterwards and only to measure, decoded by the teacher, the pseudo-label
student and Pseudo2Real and scored per recording against the sentences they
were made of.
"""
from __future__ import annotations

from pathlib import Path

from selfspeech.data.manifest import read_manifest, write_manifest


def _recordings(items: list[dict], d: Path) -> tuple[Path, list[dict]]:
    """``items`` as recordings in ``d``, imported and segmented: (segments manifest, reference utterances)."""
    from selfspeech.data.imports import import_dir
    from selfspeech.data.longform import LongFormConfig, join_recordings
    from selfspeech.data.segment import segment_manifest

    _, ref = join_recordings(items, d, LongFormConfig(min_seconds=20.0, max_seconds=60.0, seed=0))
    write_manifest(d / "recordings.jsonl", import_dir(d / "audio"))
    if not (d / "segments.jsonl").is_file() or not (d / "segments.jsonl.summary.json").is_file():
        segment_manifest(d / "recordings.jsonl", d / "segments.jsonl", progress=False)
    return d / "segments.jsonl", list(read_manifest(ref))


def adapt_long_form(cfg, recipe, out: Path, log, progress: bool) -> str:
    """Run the long-form adaptation into ``out``; returns the report section (markdown)."""
    from selfspeech.adapt import prepare as P
    from selfspeech.adapt.pseudo2real import run_pseudo2real
    from selfspeech.adapt.recipe import recipe_from_dict
    from selfspeech.eval.longform import recording_texts, recording_wer, speech_coverage
    from selfspeech.label.transcribe import transcribe_whisper

    parts = P.split_parts(recipe, P.load_domains(recipe))
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "source.jsonl", [i for n in ("source_train", "source_dev", "source_sim") for i in parts[n]])
    target, _ = _recordings(parts["target_adapt"], out / "target")
    evals, refs = _recordings(parts["target_eval"], out / "eval")
    spec = recipe.resolved()
    spec["data"] = {"source_manifest": str(out / "source.jsonl"), "target_manifest": str(target),
                    **{k: spec["data"][k] for k in ("source_parts", "dev_fraction", "seed")}}
    run = out / "run"
    log(f"      {len(list(read_manifest(target)))} target segments, no transcript, no speaker -> adapt")
    result = run_pseudo2real(recipe_from_dict(spec), run, log=log, progress=progress,
                             title=f"Pseudo2Real demo, long form: {cfg.accents[0]} -> {cfg.accents[-1]}")
    segs = list(read_manifest(evals))
    ref_text = recording_texts(refs, {r["id"]: r["text"] for r in refs})
    wers = {"teacher": recording_wer(ref_text, recording_texts(segs, _teacher_texts(cfg, evals, out)), cfg.normalizer)}
    for name, model in (("pseudo_ft", run / "ft_target_pseudo" / "best"), ("p2r", run / "model_p2r" / "model")):
        hyp = transcribe_whisper(model, evals, out / f"eval_{name}.hyp.jsonl", batch_size=16, max_new_tokens=48,
                                 device=cfg.device)
        wers[name] = recording_wer(ref_text, recording_texts(segs, _texts(hyp)), cfg.normalizer)
    rel = 1 - wers["p2r"] / wers["pseudo_ft"] if wers["pseudo_ft"] else float("nan")
    return (f"\n## Pseudo2Real on long recordings: {cfg.accents[0]} -> {cfg.accents[-1]}\n\n"
            f"The {cfg.accents[-1]} adapt speakers' sentences, joined into {len(ref_text)} eval and "
            f"{len(list(read_manifest(out / 'target' / 'recordings.jsonl')))} target recordings, went through "
            "`data import-dir` and `data segment`; `adapt` saw the target segments with neither transcripts nor "
            f"speakers (lambda = {result['lambda']['lambda']:g}, chosen on held-out source speakers). The segments "
            f"cover {speech_coverage(refs, segs) * 100:.1f}% of the eval recordings' speech. Measured afterwards, "
            "per recording, on the held-out speakers' recordings:\n\n| system | WER % |\n| --- | --- |\n"
            + "".join(f"| {n} | {w * 100:.1f} |\n" for n, w in wers.items())
            + f"\nPseudo2Real's relative WER reduction against the pseudo-label student: {rel * 100:.1f}%. "
            "Full report: [long_form/run/report.md](long_form/run/report.md).\n")


def _teacher_texts(cfg, segments: Path, out: Path) -> dict[str, str]:
    from selfspeech.label.run import label_manifest
    from selfspeech.label.teacher import load_teacher

    labels = out / f"eval_teacher.{cfg.teacher}.jsonl"
    label_manifest(segments, labels, load_teacher(cfg.teacher, "faster-whisper", device=cfg.device), cfg.teacher,
                   cfg.batch_size, progress=False)
    return _texts(labels)


def _texts(path) -> dict[str, str]:
    import json

    return {r["id"]: r.get("text") or "" for r in map(json.loads, Path(path).read_text().splitlines()) if r}
