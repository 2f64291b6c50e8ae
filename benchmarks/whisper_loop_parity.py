"""Whisper student on the shared training loop: losses against a reference run.

Fine-tunes zoo whisper-tiny.en on a fixed slice of speechocean762 adults
(``--n-train`` utterances, a dev set of ``--n-dev`` for early stopping), one
thread, fixed seed, and records every update's loss, learning rate and grad norm
and every dev WER. ``--reference FILE`` compares them with the records of
another checkout of the code (a result file written by this script, e.g. by
``PYTHONPATH=<other>/src python benchmarks/whisper_loop_parity.py --tag reference``):
the figures are the largest absolute and relative loss differences per step.

Why a tolerance and not equality: the reference and the candidate may apply
the same schedule through different code paths (the lr of an update computed
in another order), which moves float32 results in the last bits; over a few
updates of AdamW at lr 1e-5 that stays far below 1e-3 relative.

Usage: python benchmarks/whisper_loop_parity.py [--steps 12] [--tag candidate] [--reference results/x.json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SO762, write_result  # noqa: E402

import torch  # noqa: E402

from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.data.manifest import write_manifest  # noqa: E402
from selfspeech.models.zoo import pull  # noqa: E402
from selfspeech.train.whisper_ft import FinetuneConfig, finetune  # noqa: E402


def slice_of_adults(n_train: int, n_dev: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Speaker-disjoint train/dev utterances of adult speakers (ages from spk2age), seeded."""
    items = [it for it in iter_kaldi_dir(SO762) if it.get("age_group") == "adult" and it["text"].strip()]
    speakers = sorted({it["speaker"] for it in items})
    random.Random(seed).shuffle(speakers)
    dev_spk = set(speakers[:4])
    train = [it for it in items if it["speaker"] not in dev_spk]
    dev = [it for it in items if it["speaker"] in dev_spk]
    rng = random.Random(seed)
    return rng.sample(train, n_train), rng.sample(dev, n_dev)


def read_records(out: Path) -> list[dict]:
    """The run's JSONL log, whichever name the checkout gives it."""
    for name in ("log.jsonl", "train_log.jsonl"):
        if (out / name).is_file():
            return [json.loads(x) for x in (out / name).read_text().splitlines() if x.strip()]
    raise FileNotFoundError(f"{out}: no training log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-dev", type=int, default=12)
    ap.add_argument("--tag", default="candidate")
    ap.add_argument("--reference", type=Path, help="result file of the reference checkout")
    ap.add_argument("--result-name", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    init = pull("whisper-tiny.en").hf_dir
    train, dev = slice_of_adults(a.n_train, a.n_dev, seed=0)
    cfg = FinetuneConfig(lr=1e-5, warmup_steps=3, max_steps=a.steps, max_epochs=3, batch_size=8, eval_every=6,
                         patience=5, log_every=1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_manifest(tmp / "train.jsonl", train)
        write_manifest(tmp / "dev.jsonl", dev)
        finetune(tmp / "train.jsonl", tmp / "dev.jsonl", init, tmp / "run", cfg, progress=False)
        recs = read_records(tmp / "run")
    steps = [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in recs if "loss" in r]
    evals = [{"step": r["step"], "wer": r.get("dev_wer", r.get("metric"))} for r in recs if r.get("event") == "eval"]
    payload = {"tag": a.tag, "module": str(Path(sys.modules["selfspeech"].__file__).parent),
               "protocol": {"model": "whisper-tiny.en", "n_train": a.n_train, "n_dev": a.n_dev, "steps": a.steps,
                            "config": {"lr": 1e-5, "warmup_steps": 3, "batch_size": 8, "eval_every": 6, "seed": 0},
                            "threads": 1},
               "steps": steps, "evals": evals}
    if a.reference:
        ref = json.loads(a.reference.read_text())
        by_step = {s["step"]: s for s in ref["steps"]}
        diffs = [(s["step"], abs(s["loss"] - by_step[s["step"]]["loss"]),
                  abs(s["loss"] - by_step[s["step"]]["loss"]) / abs(by_step[s["step"]]["loss"]))
                 for s in steps if s["step"] in by_step]
        payload["comparison"] = {
            "reference": str(a.reference.name), "reference_tag": ref["tag"], "steps_compared": len(diffs),
            "max_abs_loss_diff": max(d[1] for d in diffs), "max_rel_loss_diff": max(d[2] for d in diffs),
            "lr_equal": all(s["lr"] == by_step[s["step"]]["lr"] for s in steps if s["step"] in by_step),
            "reference_evals": ref["evals"], "evals": evals}
        print(json.dumps(payload["comparison"], indent=1))
    write_result(a.result_name or f"whisper_loop_parity_{a.tag}", payload)


if __name__ == "__main__":
    main()
