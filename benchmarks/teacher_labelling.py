"""Teacher pseudo-labelling on speechocean762: WER per age group and labelling speed.

For whisper-base and whisper-tiny.en (faster-whisper, int8, greedy, batched):
WER/CER per age group with 95% CIs (bootstrap over speakers) on >= 200
utterances of adults and of children, and the real-time factor. Then, side by
side in one run on the same utterances (audio decoded beforehand, excluded
from every timing), the wall time of three ways to label them with the same
model: our batched path, faster-whisper's one-utterance-at-a-time
``WhisperModel.transcribe`` loop, and a transformers ASR ``pipeline`` (fp32,
same batch size). Medians over repeats, methods interleaved per repeat.

Our batched path pads each length-sorted batch to one encoder window of
max(--window, longest + 0.5 s) instead of Whisper's fixed 30 s; the WER it
gives is reported next to the WER of the standard 30-s window on the same
utterances (``wer_window30``), so the speed is not bought with accuracy
unseen.

Usage: python benchmarks/teacher_labelling.py [--per-group 200] [--speed-n 48] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SO762, median, write_result  # noqa: E402

from selfspeech.audio.io import load_item  # noqa: E402
from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.data.manifest import write_manifest  # noqa: E402
from selfspeech.eval.report import build_results, read_jsonl  # noqa: E402
from selfspeech.label.run import label_manifest  # noqa: E402
from selfspeech.label.teacher import DecodeOptions, FasterWhisperTeacher, load_teacher  # noqa: E402
from selfspeech.models.zoo import resolve_model  # noqa: E402
from selfspeech.text.normalize import get_normalizer  # noqa: E402

TEACHERS = ("whisper-base", "whisper-tiny.en")
GROUPS = ("adult", "child")


def sample_group(items: list[dict], group: str, n: int, seed: int) -> list[dict]:
    """At least ``n`` utterances spread over every speaker of ``group`` (same count each)."""
    by_spk: dict[str, list[dict]] = {}
    for it in items:
        if it["age_group"] == group:
            by_spk.setdefault(it["speaker"], []).append(it)
    k = math.ceil(n / len(by_spk))
    rng = random.Random(seed)
    return [u for s in sorted(by_spk) for u in rng.sample(sorted(by_spk[s], key=lambda x: x["id"]), k)]


def time_methods(name: str, items: list[dict], repeats: int, batch_size: int, window: float) -> dict:
    import torch
    from transformers import pipeline

    paths = resolve_model(name)
    wavs = [load_item(it) for it in items]
    audio_s = sum(len(w) for w in wavs) / 16000
    fw = FasterWhisperTeacher(paths.ct2_dir, compute_type="int8", cpu_threads=torch.get_num_threads(),
                              options=DecodeOptions(window_s=window))
    asr = pipeline("automatic-speech-recognition", model=str(paths.hf_dir), device="cpu", dtype=torch.float32)
    gen = {"language": "en", "task": "transcribe"} if "tiny.en" not in name else {}
    gen.update(num_beams=1, do_sample=False, max_new_tokens=128)

    by_len = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))  # as label_manifest batches them

    def batched():
        out = {}
        for k in range(0, len(by_len), batch_size):
            idx = by_len[k:k + batch_size]
            out.update(zip(idx, (h.text for h in fw.transcribe([wavs[i] for i in idx]))))
        return [out[i] for i in range(len(wavs))]

    def sequential():
        return [fw.transcribe_sequential(w) for w in wavs]

    def hf_pipeline():
        res = asr([{"raw": wavs[i], "sampling_rate": 16000} for i in by_len], batch_size=batch_size,
                  generate_kwargs=gen)  # the same length-sorted batches as ours
        out = {i: r["text"].strip() for i, r in zip(by_len, res)}
        return [out[i] for i in range(len(wavs))]

    methods = {"batched": batched, "sequential": sequential, "transformers_pipeline": hf_pipeline}
    times = {k: [] for k in methods}
    texts = {}
    batched()  # warm-up (first CTranslate2 call allocates)
    for r in range(repeats):
        for k, fn in methods.items():
            t = time.perf_counter()
            texts[k] = fn()
            times[k].append(time.perf_counter() - t)
            print(f"  {name} repeat {r + 1}/{repeats} {k}: {times[k][-1]:.1f}s", flush=True)
    norm = get_normalizer()
    import jiwer

    agree = {k: jiwer.wer([norm(t) or "-" for t in texts["batched"]], [norm(t) or "-" for t in texts[k]])
             for k in ("sequential", "transformers_pipeline")}
    med = {k: median(v) for k, v in times.items()}
    return {"utterances": len(wavs), "audio_seconds": round(audio_s, 1), "batch_size": batch_size,
            "window_s": window,
            "repeats": repeats, "seconds": times, "median_seconds": med,
            "rtf_median": {k: v / audio_s for k, v in med.items()},
            "speedup_vs_sequential": med["sequential"] / med["batched"],
            "speedup_vs_transformers_pipeline": med["transformers_pipeline"] / med["batched"],
            "wer_between_outputs_vs_batched": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-group", type=int, default=200, help="at least this many utterances per age group")
    ap.add_argument("--speed-n", type=int, default=48, help="utterances in the side-by-side speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=DecodeOptions().window_s,
                    help="encoder window (s) of the batched path; 30 = Whisper's standard")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_teacher")
    ap.add_argument("--result-name", default="teacher_labelling", help="results/<name>.json")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and CTranslate2 threads; 1 by default: on this shared 2-core machine two "
                         "benchmarks run side by side, one core each, which avoids thread oversubscription")
    args = ap.parse_args()
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: this benchmark needs ../shared/data/speechocean762-train")

    import torch

    torch.set_num_threads(args.threads)
    items = list(iter_kaldi_dir(SO762))
    refs = [u for g in GROUPS for u in sample_group(items, g, args.per_group, args.seed)]
    args.work.mkdir(parents=True, exist_ok=True)
    manifest = args.work / "refs.jsonl"
    write_manifest(manifest, refs)
    print(f"{len(refs)} utterances: " + ", ".join(f"{g} {sum(r['age_group'] == g for r in refs)}" for g in GROUPS))

    def label_wer(name: str, window: float):
        out = args.work / f"labels.{name}.w{window:g}.jsonl"
        out.unlink(missing_ok=True)  # a fresh, uninterrupted run: the RTF covers every utterance
        teacher = load_teacher(name, "faster-whisper", "int8", DecodeOptions(window_s=window), cpu_threads=args.threads)
        stats = label_manifest(manifest, out, teacher, name, args.batch_size)
        res = build_results(refs, read_jsonl(out), by=["age_group"], seed=args.seed)
        return {x["name"].split("=", 1)[-1]: x for x in res["system"]["groups"]}, stats

    teachers = {}
    for name in TEACHERS:
        g, stats = label_wer(name, args.window)
        g30, stats30 = label_wer(name, 30.0) if args.window != 30.0 else (g, stats)
        teachers[name] = {
            "wer": {k: g[k]["wer"] for k in GROUPS}, "wer_ci95": {k: g[k]["wer_ci"] for k in GROUPS},
            "cer": {k: g[k]["cer"] for k in GROUPS}, "cer_ci95": {k: g[k]["cer_ci"] for k in GROUPS},
            "utterances": {k: g[k]["utterances"] for k in GROUPS}, "speakers": {k: g[k]["speakers"] for k in GROUPS},
            "rtf": stats.rtf, "label_stats": stats.as_dict(),
            "backend": f"faster-whisper int8 greedy, encoder window max({args.window:g} s, longest + 0.5 s)",
            "window_s": args.window,
            "wer_window30": {k: g30[k]["wer"] for k in GROUPS}, "wer_window30_ci95": {k: g30[k]["wer_ci"] for k in GROUPS},
            "rtf_window30": stats30.rtf,
        }
        print(f"{name}: WER adult {teachers[name]['wer']['adult']:.3f} child {teachers[name]['wer']['child']:.3f} "
              f"RTF {stats.rtf:.3f} (30-s window: {g30['adult']['wer']:.3f} / {g30['child']['wer']:.3f}, "
              f"RTF {stats30.rtf:.3f})", flush=True)

    rng = random.Random(args.seed)
    speed_items = rng.sample(refs, args.speed_n)
    speed = {name: time_methods(name, speed_items, args.repeats, args.batch_size, args.window) for name in TEACHERS}
    head = speed["whisper-base"]
    write_result(args.result_name, {
        "teachers": teachers,
        "speedup_vs_sequential": head["speedup_vs_sequential"],
        "speedup_vs_transformers_pipeline": head["speedup_vs_transformers_pipeline"],
        "speed": speed,
        "protocol": {"per_group": args.per_group, "seed": args.seed, "normalizer": "whisper_english",
                     "batch_size": args.batch_size, "threads": args.threads, "window_s": args.window,
                     "ci": "95% percentile bootstrap over speakers, 1000 resamples",
                     "speedups_are_for": "whisper-base (both teachers in 'speed')"},
    })


if __name__ == "__main__":
    main()
