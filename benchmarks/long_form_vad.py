"""Choosing the segmenter's settings on the source speakers, then applying them to the target.

The protocol (../shared/data/README.md) forbids tuning on the child speakers, so
the VAD's threshold and padding are chosen on long recordings of the *adult*
speakers, built the same way as in benchmarks/long_form.py: every setting of a
small grid segments them, and the rule picks the highest speech coverage whose
segments hold at most 1.25 s of audio per second of reference speech (padding
buys coverage with silence, which costs the teacher nothing but time). The
chosen setting then segments the children's clean recordings of
benchmarks/long_form.py, and those segments are labelled and scored as there.

Usage: python benchmarks/long_form_vad.py [--out runs/long_form_vad] [--children runs/long_form3/clean]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SO762, write_result  # noqa: E402
from long_form import labels_of, selfspeech, utterance_wer  # noqa: E402

from selfspeech.eval.longform import recording_texts, recording_wer, speech_coverage, speech_span  # noqa: E402

GRID = {"threshold": (0.5, 0.35, 0.25, 0.15), "pad_seconds": (0.2, 0.4, 0.6, 0.8)}
MAX_AUDIO_PER_SPEECH = 1.25


def score(refs: list[dict], spans: list[dict], segs: list[dict]) -> dict:
    speech = sum(float(r["duration"]) for r in spans)
    return {"speech_coverage": speech_coverage(spans, segs), "utterance_coverage": speech_coverage(refs, segs),
            "segments_per_utterance": len(segs) / len(refs),
            "audio_per_speech": sum(float(s["duration"]) for s in segs) / speech}


def sweep(recordings: Path, refs: list[dict], out: Path) -> dict[str, dict]:
    from selfspeech.data.manifest import read_manifest
    from selfspeech.data.segment import SegmentConfig, segment_manifest

    spans = [speech_span(r) for r in refs]
    res = {}
    for t, p in itertools.product(GRID["threshold"], GRID["pad_seconds"]):
        name = f"threshold{t}_pad{p}"
        segment_manifest(recordings, out / f"{name}.jsonl", SegmentConfig(threshold=t, pad_seconds=p), progress=False)
        res[name] = {"threshold": t, "pad_seconds": p, **score(refs, spans, list(read_manifest(out / f"{name}.jsonl")))}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "long_form_vad")
    ap.add_argument("--children", type=Path, default=ROOT / "runs" / "long_form3" / "clean")
    ap.add_argument("--teacher", default="whisper-base")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from selfspeech.data.imports import import_dir
    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.data.longform import LongFormConfig, join_recordings
    from selfspeech.data.manifest import read_manifest, write_manifest

    out = a.out.resolve()
    adults = [it for it in iter_kaldi_dir(SO762, with_durations=True) if it.get("age_group") == "adult"]
    _, ref_path = join_recordings(adults, out / "adults", LongFormConfig(120.0, 300.0, (0.3, 1.5), per_speaker=False))
    write_manifest(out / "adults" / "recordings.jsonl", import_dir(out / "adults" / "audio"))
    grid = sweep(out / "adults" / "recordings.jsonl", list(read_manifest(ref_path)), out / "adults")
    allowed = {k: v for k, v in grid.items() if v["audio_per_speech"] <= MAX_AUDIO_PER_SPEECH}
    chosen = max(allowed, key=lambda k: (allowed[k]["speech_coverage"], -allowed[k]["audio_per_speech"]))
    c = grid[chosen]
    # the children: their clean recordings of benchmarks/long_form.py, cut with the adults' choice
    kids = a.children.resolve()
    segs_path = out / f"children.{chosen}.segments.jsonl"  # one file per setting: a changed grid may choose anew
    selfspeech("data", "segment", str(kids / "recordings.jsonl"), str(segs_path), "--threshold", str(c["threshold"]),
               "--pad-seconds", str(c["pad_seconds"]), threads=a.threads)
    selfspeech("label", "--teacher", a.teacher, "--in", str(segs_path), "--out", str(out / f"children.{chosen}.labels.jsonl"),
               threads=a.threads)
    refs = list(read_manifest(kids / "reference.jsonl"))
    segs = list(read_manifest(segs_path))
    ref_text = recording_texts(refs, {r["id"]: r["text"] for r in refs})
    w_long = recording_wer(ref_text, recording_texts(segs, labels_of(out / f"children.{chosen}.labels.jsonl")))
    w_utt = utterance_wer(refs, labels_of(kids.parent / "utterances.labels.jsonl"))
    children = {**score(refs, [speech_span(r) for r in refs], segs), "wer_long_form": w_long,
                "wer_utterances": w_utt, "wer_long_form_relative_to_utterances": w_long / w_utt - 1}
    print(write_result("long_form_vad", {"grid_on_adults": grid, "rule": f"highest speech coverage with audio per "
                                         f"speech second <= {MAX_AUDIO_PER_SPEECH}", "chosen": chosen,
                                         "children_with_chosen": children, "adult_utterances": len(adults)}))


if __name__ == "__main__":
    main()
