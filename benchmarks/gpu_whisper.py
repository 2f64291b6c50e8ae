"""The Whisper parts of benchmarks/gpu.py: student fine-tuning (b) and teacher labelling (c).

Student: per model, the toolkit's loop (``run_ours`` of
benchmarks/whisper_finetune_speed.py: :func:`selfspeech.train.loop.train_loop` with
the Whisper objective on length-bucketed batches of trimmed log-mels, bf16
autocast) against the ``Seq2SeqTrainer`` recipe of the same file (``run_hf``:
30-s padded features, bf16, SDPA attention), the same utterances, token ids,
batch size, lr, warm-up, clipping and fused AdamW, methods alternating over
repeats. Feature extraction is excluded from both timings.

Labelling: the same utterances in the same length-sorted batches through
each method; wall time of a whole pass (feature extraction included, audio
decoded beforehand), medians over repeats, methods interleaved. Methods:
``faster_whisper`` (:class:`~selfspeech.label.teacher.FasterWhisperTeacher`, float16,
encoder window max(15 s, longest + 0.5 s)), ``toolkit_transformers``
(:class:`~selfspeech.label.teacher.TransformersTeacher`, bf16, 30-s features),
``toolkit_greedy_window`` (the trimmed encoder and KV-cache greedy decoder of
:mod:`selfspeech.models.whisper` on the same window as faster-whisper) and the
baseline ``transformers_pipeline`` (bf16, batched, 30-s features). WER against
the corpus transcripts is reported for each, so no speed is bought with accuracy unseen.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from gpu import Ctx, error_record, guarded_each, replicate
from whisper_finetune_speed import recipe_dataset, recipe_processor, run_hf, run_ours

from selfspeech.audio.io import load_item
from selfspeech.label.teacher import DecodeOptions
from selfspeech.train.whisper_ft import FinetuneConfig, WhisperCollator

WER_SLACK = 0.02  # absolute WER a labelling method may lose against the pipeline and still be the headline


# -- b. student -----------------------------------------------------------------------------------

def student_model(ctx: Ctx, name: str) -> dict:
    S = ctx.sizes
    B, warm, steps = S["student_batch"], S["student_warmup"], S["student_steps"]
    hf_dir, weights = ctx.model(name)
    processor = recipe_processor(hf_dir)
    items = replicate(ctx.items, B * (warm + steps))  # every utterance once per run
    wavs = [load_item(it) for it in items]
    coll = WhisperCollator(items, processor, trim=True)
    for i in range(len(items)):
        coll.features(i)  # the feature cache filled before timing
    dataset = recipe_dataset(processor, wavs, items)
    cfg = FinetuneConfig(lr=1e-5, warmup_steps=warm, batch_size=B, grad_clip=1.0, seed=0, device=str(ctx.device),
                         precision=ctx.precision, num_workers=S["workers"])
    hf_args = {"use_cpu": False, "bf16": True} if ctx.cuda else {}
    sps: dict[str, list[float]] = {"ours": [], "seq2seq_trainer": []}
    mem: dict[str, float | None] = {}
    losses: dict[str, list] = {"ours": [], "seq2seq_trainer": []}
    for r in range(S["student_repeats"]):
        if r and ctx.left() < 30:
            break  # the first repeat is the figure; later ones only when time allows
        for method in (("ours", "seq2seq_trainer") if r % 2 == 0 else ("seq2seq_trainer", "ours")):
            ctx.reset_memory()
            if method == "ours":
                secs, loss = run_ours(hf_dir, coll, cfg, warm, steps)
            else:
                secs, loss = run_hf(hf_dir, processor, dataset, cfg, warm, steps, **hf_args)
            sps[method].append(steps * B / secs)
            losses[method].append([round(x, 4) for x in loss])
            mem[method] = max(mem.get(method) or 0.0, ctx.peak_memory_gib() or 0.0) if ctx.cuda else None
    med = {m: statistics.median(v) for m, v in sps.items()}
    durs = [it["duration"] for it in items]
    return {"speedup": round(med["ours"] / med["seq2seq_trainer"], 2),
            "samples_per_second": {m: round(v, 2) for m, v in med.items()},
            "samples_per_second_repeats": {m: [round(x, 2) for x in v] for m, v in sps.items()},
            "peak_memory_gib": mem, "train_losses": losses, "weights": weights, "batch_size": B,
            "warmup_steps_untimed": warm, "timed_steps": steps, "n_utterances": len(items),
            "mean_duration_s": round(sum(durs) / len(durs), 3), "precision": ctx.precision,
            "loader_workers": cfg.num_workers}


def student(ctx: Ctx) -> dict:
    models = guarded_each(ctx, ctx.sizes["student_models"], lambda name: student_model(ctx, name), 40)
    speedups = {n: m["speedup"] for n, m in models.items() if "speedup" in m}
    return {"speedup_vs_seq2seq_trainer": min(speedups.values()) if speedups else None,
            "speedup_is": "the lower of the models measured: " + ", ".join(speedups),
            "models": models,
            "notes": "ours: shared loop, trimmed log-mels (batch's longest), length-bucketed batches, "
                     "bf16 autocast, fused AdamW; seq2seq_trainer: the Hugging Face recipe with 30-s "
                     "features, bf16, SDPA. whisper-base trains from a random initialisation (its weights "
                     "do not travel to the GPU machine): the same time per step as the pretrained model."}


# -- c. labelling ---------------------------------------------------------------------------------

def window_greedy(hf_dir, ctx: Ctx, opts: DecodeOptions):
    """The trimmed encoder + KV-cache greedy decoder on faster-whisper's encoder window."""
    from selfspeech.models.whisper import greedy_decode, load_for_inference, load_processor, log_mel

    model = load_for_inference(hf_dir, ctx.device, torch.bfloat16 if ctx.cuda else torch.float32)
    processor = load_processor(hf_dir)
    tok, fe = processor.tokenizer, processor.feature_extractor

    def run(wavs: list[np.ndarray]) -> list[str]:
        frames = max(len(w) for w in wavs) // 160 + 50
        frames = min(3000, max(frames, round(opts.window_s * 100)))
        frames += frames % 2
        feats = torch.stack([log_mel(fe, np.pad(w, (0, max(0, frames * 160 - len(w)))))[:, :frames] for w in wavs])
        ids = greedy_decode(model, feats, tok.prefix_tokens, opts.max_new_tokens)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return run


def label_methods(hf_dir, ctx: Ctx, opts: DecodeOptions) -> tuple[dict, dict]:
    """name -> fn(list of waveforms) -> texts, and name -> why a method is unavailable."""
    from transformers import pipeline

    from selfspeech.label.teacher import FasterWhisperTeacher, TransformersTeacher

    methods, unavailable = {}, {}
    try:
        import faster_whisper  # noqa: F401

        from selfspeech.models.zoo import resolve_model

        fw = FasterWhisperTeacher(resolve_model(hf_dir).ct2_dir, compute_type="float16" if ctx.cuda else "int8",
                                  options=opts, device=ctx.device)
        methods["faster_whisper"] = lambda ws: [h.text for h in fw.transcribe(ws)]
    except Exception as e:  # not installed here, or its CUDA libraries missing
        unavailable["faster_whisper"] = f"{type(e).__name__}: {e}"[:600]
    tt = TransformersTeacher(hf_dir, opts, dtype="bfloat16" if ctx.cuda else "float32", device=ctx.device)
    methods["toolkit_transformers"] = lambda ws: [h.text for h in tt.transcribe(ws)]
    try:
        methods["toolkit_greedy_window"] = window_greedy(hf_dir, ctx, opts)
    except Exception as e:
        unavailable["toolkit_greedy_window"] = f"{type(e).__name__}: {e}"[:600]
    asr = pipeline("automatic-speech-recognition", model=str(hf_dir), device=ctx.device,
                   dtype=torch.bfloat16 if ctx.cuda else torch.float32)
    gen = {"num_beams": 1, "do_sample": False, "max_new_tokens": opts.max_new_tokens}
    methods["transformers_pipeline"] = lambda ws: [r["text"].strip() for r in asr(
        [{"raw": w, "sampling_rate": 16000} for w in ws], batch_size=len(ws), generate_kwargs=gen)]
    return methods, unavailable


def normaliser():
    from selfspeech.text.normalize import get_normalizer

    try:
        return "whisper_english", get_normalizer("whisper_english")
    except ImportError:  # whisper_english needs transformers' Whisper normaliser module
        return "basic", get_normalizer("basic")


def labelling(ctx: Ctx) -> dict:
    import jiwer

    S = ctx.sizes
    name = "whisper-tiny.en"
    hf_dir, weights = ctx.model(name)
    items = replicate(ctx.items, S["label_n"])
    wavs = [load_item(it) for it in items]
    audio_s = sum(len(w) for w in wavs) / 16000
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))  # as label_manifest batches them
    batches = [order[k:k + S["label_batch"]] for k in range(0, len(order), S["label_batch"])]
    methods, unavailable = label_methods(hf_dir, ctx, DecodeOptions(max_new_tokens=S["max_new_tokens"]))

    def one_pass(fn) -> tuple[float, list[str]]:
        texts = [""] * len(wavs)
        t = time.perf_counter()
        for idx in batches:
            for i, txt in zip(idx, fn([wavs[i] for i in idx])):
                texts[i] = txt
        if ctx.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, texts

    times: dict[str, list[float]] = {m: [] for m in methods}
    texts, mem, failed = {}, {}, {}
    for m, fn in list(methods.items()):
        try:
            fn([wavs[i] for i in batches[0]])  # warm-up: allocations, kernel selection
        except Exception as e:
            failed[m] = error_record(e)
            del methods[m], times[m]
    for r in range(S["label_repeats"]):
        if r and ctx.left() < 20:
            break
        for m, fn in (methods.items() if r % 2 == 0 else reversed(methods.items())):
            ctx.reset_memory()
            secs, texts[m] = one_pass(fn)
            times[m].append(secs)
            mem[m] = ctx.peak_memory_gib()
    norm_name, norm = normaliser()
    refs = [norm(it["text"]) or "-" for it in items]
    wer = {m: round(jiwer.wer(refs, [norm(t) or "-" for t in tx]), 4) for m, tx in texts.items()}
    med = {m: statistics.median(v) for m, v in times.items()}
    rate = {m: audio_s / s for m, s in med.items()}
    base = rate.get("transformers_pipeline")
    speedups = {m: round(v / base, 2) for m, v in rate.items() if base and m != "transformers_pipeline"}
    # the headline: faster-whisper (the toolkit's default teacher) where it ran, else the fastest toolkit
    # method; only methods within WER_SLACK of the pipeline's WER count (no speed bought with accuracy)
    eligible = {m: v for m, v in speedups.items() if wer[m] <= wer["transformers_pipeline"] + WER_SLACK}
    headline = "faster_whisper" if "faster_whisper" in eligible else max(eligible, key=eligible.get, default=None)
    return {"speedup_vs_transformers_pipeline": eligible.get(headline), "speedup_method": headline,
            "speedups_vs_transformers_pipeline": speedups,
            "headline_rule": f"faster_whisper if it ran, else the fastest toolkit method; only methods whose "
                             f"WER is at most the pipeline's + {WER_SLACK}",
            "audio_seconds_per_second": {m: round(v, 1) for m, v in rate.items()},
            "median_seconds": {m: round(v, 3) for m, v in med.items()}, "seconds_repeats": times,
            "wer": wer, "normaliser": norm_name, "peak_memory_gib_by_method": mem, "unavailable": unavailable,
            "failed": failed, "model": name, "weights": weights, "utterances": len(items),
            "audio_seconds": round(audio_s, 1), "batch_size": S["label_batch"],
            "window_s": DecodeOptions().window_s, "max_new_tokens": S["max_new_tokens"]}
