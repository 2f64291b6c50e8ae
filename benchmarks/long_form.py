"""Long-form benchmark: a user's folder of long recordings through import-dir -> segment -> label.

The child speakers of speechocean762 (the target domain of the protocol in
../shared/data/README.md) have their utterances joined into recordings of 2 to 5
minutes with 0.3-1.5 s pauses (:mod:`selfspeech.data.longform`), clean and with
white noise at 10 dB SNR. A child's 20 utterances hold 48 to 108 s of speech, so
one speaker alone never fills 2 minutes: speakers follow one another inside a
recording (speaker by speaker, as in a classroom), and no speaker is split
between recordings more than the length cap forces. Each condition runs the commands a user
would, on the folder of recordings alone:

    selfspeech data import-dir DIR recordings.jsonl
    selfspeech data segment recordings.jsonl segments.jsonl
    selfspeech label --teacher whisper-base --in segments.jsonl --out labels.jsonl

and is scored against where the utterances really are:

- ``speech_coverage``: the share of reference speech seconds inside a segment,
  an utterance's speech running from its first to its last frame within 35 dB
  of its loudest (``eval.longform.speech_span``: the sentence recordings carry
  leading and trailing silence, which a segmenter rightly leaves out);
  ``utterance_coverage``: the same over the whole utterance files;
- ``segments_per_utterance``: segments over reference utterances;
- ``wer_long_form``: the teacher's corpus WER per recording (segment labels
  joined in time order against the utterances' transcripts joined in order);
- ``wer_utterances``: the same teacher's corpus WER on the original utterances
  (labelled by the same command), the figure the long form should stay within
  10% (relative) of.

``--adapt`` then adapts to a long-form target treated as unlabelled and
speakerless. The speaker split of recipes/speechocean762/pseudo2real.yaml gives
the source parts and the target's adapt and eval speakers. The adapt speakers'
utterances become recordings, imported and segmented as above: the target
manifest has no text and no speaker field. `selfspeech adapt` runs on them with
the recipe's settings, the systems cut to the baseline and Pseudo2Real. Only
afterwards, and only for measuring, are the eval speakers' recordings
segmented and decoded by both students. The per-recording WER against the
utterances' transcripts gives ``p2r_relative_reduction`` (1 - WER_p2r /
WER_pseudo); the short-utterance run of the same recipe is its reference.

Usage: python benchmarks/long_form.py [--out runs/long_form] [--teacher whisper-base] [--threads 2] [--adapt]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, SO762, machine, write_result  # noqa: E402

from selfspeech.eval.longform import recording_texts, recording_wer, speech_coverage, speech_span  # noqa: E402

GOALS = {"speech_coverage": 0.98, "wer_long_form_within_relative": 0.10}
CONDITIONS = {"clean": None, "noise_10db": 10.0}


def selfspeech(*args: str, threads: int) -> None:
    """One CLI command, as a user runs it (the summary goes to the log)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "selfspeech.cli", *args]
    print("$ selfspeech " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


def children() -> list[dict]:
    from selfspeech.data.kaldi import iter_kaldi_dir

    return [it for it in iter_kaldi_dir(SO762, with_durations=True) if it.get("age_group") == "child"]


def utterance_wer(utts: list[dict], labels: dict[str, str]) -> float:
    """Corpus WER over the original utterances (a missing label counts as all deletions)."""
    return recording_wer({u["id"]: u["text"] for u in utts}, {u["id"]: labels.get(u["id"], "") for u in utts})


def labels_of(path: Path) -> dict[str, str]:
    """id -> the teacher's text (a failed line counts as empty)."""
    import json

    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r.get("text") or "" for r in recs}


def run_condition(name: str, snr: float | None, utts: list[dict], out: Path, teacher: str, threads: int) -> dict:
    from selfspeech.data.longform import LongFormConfig, join_recordings
    from selfspeech.data.manifest import read_manifest

    d = out / name
    t0 = time.perf_counter()
    _, ref_path = join_recordings(utts, d, LongFormConfig(120.0, 300.0, (0.3, 1.5), snr_db=snr, per_speaker=False,
                                                          seed=0))
    refs = list(read_manifest(ref_path))
    selfspeech("data", "import-dir", str(d / "audio"), str(d / "recordings.jsonl"), threads=threads)
    selfspeech("data", "segment", str(d / "recordings.jsonl"), str(d / "segments.jsonl"), threads=threads)
    selfspeech("label", "--teacher", teacher, "--in", str(d / "segments.jsonl"), "--out", str(d / "labels.jsonl"),
               threads=threads)
    segs = list(read_manifest(d / "segments.jsonl"))
    recs = list(read_manifest(d / "recordings.jsonl"))
    ref_text = recording_texts(refs, {r["id"]: r["text"] for r in refs})
    return {"recordings": len(recs), "recording_minutes": [round(min(float(r["duration"]) for r in recs) / 60, 2),
                                                           round(max(float(r["duration"]) for r in recs) / 60, 2)],
            "reference_utterances": len(refs), "segments": len(segs),
            "speech_minutes": round(sum(float(r["duration"]) for r in refs) / 60, 1),
            "speech_coverage": speech_coverage([speech_span(r) for r in refs], segs),
            "utterance_coverage": speech_coverage(refs, segs),
            "segments_per_utterance": len(segs) / len(refs),
            "wer_long_form": recording_wer(ref_text, recording_texts(segs, labels_of(d / "labels.jsonl"))),
            "seconds": round(time.perf_counter() - t0, 1)}


def long_form_target(name: str, items: list[dict], out: Path, threads: int) -> Path:
    """``items`` as clean recordings, imported and segmented: the segments manifest."""
    from selfspeech.data.longform import LongFormConfig, join_recordings

    d = out / name
    join_recordings(items, d, LongFormConfig(120.0, 300.0, (0.3, 1.5), per_speaker=False, seed=0))
    selfspeech("data", "import-dir", str(d / "audio"), str(d / "recordings.jsonl"), threads=threads)
    selfspeech("data", "segment", str(d / "recordings.jsonl"), str(d / "segments.jsonl"), threads=threads)
    return d


def segment_defaults() -> dict:
    """The settings `selfspeech data segment` cuts with here (its defaults)."""
    from dataclasses import asdict

    from selfspeech.data.segment import SegmentConfig

    return asdict(SegmentConfig())


def adapt_long_form(out: Path, threads: int) -> dict:
    """Pseudo2Real with the target-adapt speakers as unlabelled, speakerless recordings; the eval speakers'
    recordings scored afterwards by the baseline and Pseudo2Real students."""
    import yaml

    from selfspeech.adapt import prepare as P
    from selfspeech.adapt.recipe import load_recipe
    from selfspeech.data.manifest import read_manifest, write_manifest
    from selfspeech.label.transcribe import transcribe_whisper

    src_recipe = ROOT / "recipes" / "speechocean762" / "pseudo2real.yaml"
    recipe = load_recipe(src_recipe)
    parts = P.split_parts(recipe, P.load_domains(recipe))
    d = out / "adapt"
    d.mkdir(parents=True, exist_ok=True)
    write_manifest(d / "source.jsonl", [i for n in ("source_train", "source_dev", "source_sim") for i in parts[n]])
    target = long_form_target("adapt_target", parts["target_adapt"], d, threads)
    evald = long_form_target("eval_target", parts["target_eval"], d, threads)
    spec = yaml.safe_load(src_recipe.read_text())
    spec["name"] = "speechocean762-adults-to-long-form-children"
    spec["data"] = {"source_manifest": str(d / "source.jsonl"), "target_manifest": str(target / "segments.jsonl"),
                    **{k: spec["data"][k] for k in ("source_parts", "dev_fraction", "seed")}}
    spec["systems"] = ["pseudo_ft", "p2r"]  # the comparison measured here; the rest cost hours on a CPU
    spec["lambda"]["oracle_sweep"] = False
    (d / "recipe.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    selfspeech("adapt", str(d / "recipe.yaml"), "--out", str(d / "run"), threads=threads)
    refs = list(read_manifest(evald / "reference.jsonl"))
    ref_text = recording_texts(refs, {r["id"]: r["text"] for r in refs})
    segs = list(read_manifest(evald / "segments.jsonl"))
    wers = {}
    for system, model in (("pseudo_ft", d / "run" / "ft_target_pseudo" / "best"),
                          ("p2r", d / "run" / "model_p2r" / "model")):
        hyp = transcribe_whisper(model, evald / "segments.jsonl", evald / f"{system}.hyp.jsonl")
        wers[system] = recording_wer(ref_text, recording_texts(segs, labels_of(Path(hyp))))
    return {"wer": wers, "p2r_relative_reduction": 1 - wers["p2r"] / wers["pseudo_ft"],
            "segment_config": segment_defaults(),
            "target_recordings": len(list(read_manifest(target / "recordings.jsonl"))),
            "target_segments": len(list(read_manifest(target / "segments.jsonl"))),
            "eval_recordings": len(ref_text), "eval_segments": len(segs),
            "report": str(d / "run" / "report.md")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "long_form")
    ap.add_argument("--teacher", default="whisper-base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapt", action="store_true", help="also adapt to the long-form target (hours on a CPU)")
    a = ap.parse_args()
    a.out = a.out.resolve()  # the adaptation's recipe names its manifests by absolute path
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: this benchmark needs ../shared/data (see ../shared/data/README.md)")
    from selfspeech.data.manifest import write_manifest

    if a.adapt:  # the second part: added to the figures of the first
        adapt = adapt_long_form(a.out, a.threads)
        payload = json.loads((RESULTS / "long_form.json").read_text())
        if payload.get("segment_config") != adapt["segment_config"]:  # the first part is stale: say so
            payload["first_part_note"] = ("the coverage and WER figures were measured with other segmenter "
                                          "settings (segment_config); rerun benchmarks/long_form.py")
        payload["command_first_part"] = payload.get("command")
        payload["adapt"] = adapt
        payload["p2r_relative_reduction"] = payload["adapt"]["p2r_relative_reduction"]
        payload.pop("p2r_note", None)
        print(write_result("long_form", payload))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    utts = children()
    write_manifest(a.out / "utterances.jsonl", utts)
    selfspeech("label", "--teacher", a.teacher, "--in", str(a.out / "utterances.jsonl"),
               "--out", str(a.out / "utterances.labels.jsonl"), threads=a.threads)
    lab = labels_of(a.out / "utterances.labels.jsonl")
    w_utt = utterance_wer(utts, lab)
    conds = {n: run_condition(n, snr, utts, a.out, a.teacher, a.threads) for n, snr in CONDITIONS.items()}
    clean = conds["clean"]
    # either part may run first: an adaptation measured with the same segmenter settings is kept
    old = json.loads((RESULTS / "long_form.json").read_text()) if (RESULTS / "long_form.json").is_file() else {}
    adapt = old.get("adapt") if (old.get("adapt") or {}).get("segment_config") == segment_defaults() else None
    payload = {"speech_coverage": clean["speech_coverage"], "wer_long_form": clean["wer_long_form"],
               "wer_utterances": w_utt, "p2r_relative_reduction": adapt and adapt["p2r_relative_reduction"],
               "segment_config": segment_defaults(),
               "wer_long_form_relative_to_utterances": clean["wer_long_form"] / w_utt - 1,
               "conditions": conds, "teacher": a.teacher, "speakers": len({u["speaker"] for u in utts}),
               "utterances": len(utts), "goals": GOALS,
               "goals_met": {"speech_coverage": clean["speech_coverage"] >= GOALS["speech_coverage"],
                             "wer_long_form": abs(clean["wer_long_form"] / w_utt - 1)
                             <= GOALS["wer_long_form_within_relative"]},
               "machine": machine()}
    if adapt:
        payload["adapt"] = adapt
    else:
        payload["p2r_note"] = "the long-form adaptation (benchmarks/long_form.py --adapt) has not been run"
    print(write_result("long_form", payload))


if __name__ == "__main__":
    main()
