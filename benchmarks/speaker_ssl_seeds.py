"""Pool speaker_ssl_branch.py result files of several training seeds: mean, spread, per-seed SSPS effect.

One branch run is one draw of the training randomness; the SSPS effect of a
single seed moved by 6 points of relative EER between seeds 0 and 1. This reads
the ``--part report`` files of runs that differ only in ``--train-seed`` (same
split, trials and protocol; checked) and writes, per trial condition, the
base and SSPS EER of every seed, their means and sample standard deviations,
and the relative EER reduction per seed and of the means.

    python benchmarks/speaker_ssl_seeds.py \
        results/speaker_ssl_branch_simclr_noproj.json \
        results/speaker_ssl_branch_simclr_noproj_seed1.json \
        results/speaker_ssl_branch_simclr_noproj_seed2.json \
        --result-name speaker_ssl_branch_simclr_noproj_seeds
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

# protocol fields that must agree for the files to be seeds of one experiment
SAME = ("method", "projector", "steps", "fork_at", "ssps", "ecapa_channels", "batch_size",
        "train_utterances", "eval_utterances")


def seeds(protocol: dict) -> tuple[int, int]:
    """(split seed, training seed); files from before --train-seed lack both fields: seed 0 for both."""
    split = protocol.get("seed", 0)
    return split, split if protocol.get("train_seed") is None else protocol["train_seed"]


def load(paths: list[Path]) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in paths]
    ref = runs[0]
    for p, r in zip(paths[1:], runs[1:], strict=True):
        diff = [k for k in SAME if r["protocol"].get(k) != ref["protocol"].get(k)]
        diff += ["trials"] * (r["trials"] != ref["trials"]) + ["split seed"] * (
            seeds(r["protocol"])[0] != seeds(ref["protocol"])[0])
        if diff:
            sys.exit(f"{p} is not the protocol of {paths[0]} (differs in {diff}): "
                     "pool only runs that differ in --train-seed")
    train = [seeds(r["protocol"])[1] for r in runs]
    if len(set(train)) < len(train):
        sys.exit(f"training seeds {train}: each file must come from another --train-seed")
    return runs


def pool(runs: list[dict], base: str, ssps: str) -> dict:
    """Per condition: EERs per seed, mean and sd over seeds, relative reduction per seed and of the means."""
    out = {}
    for cond in runs[0]["conditions"][base]:
        b = np.array([r["conditions"][base][cond]["eer"] for r in runs])
        s = np.array([r["conditions"][ssps][cond]["eer"] for r in runs])
        out[cond] = {"eer_base": b.tolist(), "eer_ssps": s.tolist(),
                     "mean_base": float(b.mean()), "mean_ssps": float(s.mean()),
                     "sd_base": float(b.std(ddof=1)), "sd_ssps": float(s.std(ddof=1)),  # main: >= 2 seeds
                     "relative_reduction_per_seed": (1 - s / b).tolist(),
                     "relative_reduction_of_means": float(1 - s.mean() / b.mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", type=Path, nargs="+", help="speaker_ssl_branch.py result files, one per training seed")
    ap.add_argument("--result-name", required=True)
    args = ap.parse_args()
    if len(args.files) < 2:
        sys.exit("give at least two result files (one per training seed)")
    runs = load(args.files)
    method = runs[0]["protocol"]["method"] + ("" if runs[0]["protocol"]["projector"] else "_noproj")
    pooled = pool(runs, method, f"{method}_ssps")
    acc = [r["ssps_speaker_acc"]["mean"] for r in runs]
    payload = {"files": [str(p) for p in args.files], "train_seeds": [seeds(r["protocol"])[1] for r in runs],
               "system": method, "conditions": pooled, "ssps_speaker_acc_per_seed": acc,
               "trials": runs[0]["trials"], "protocol": runs[0]["protocol"]}
    for cond, v in pooled.items():
        per = ", ".join(f"{x:.1%}" for x in v["relative_reduction_per_seed"])
        print(f"{cond:13s} base {v['mean_base']:.2%} (sd {v['sd_base']:.2%})  ssps {v['mean_ssps']:.2%} "
              f"(sd {v['sd_ssps']:.2%})  reduction of means {v['relative_reduction_of_means']:.1%}; per seed {per}")
    write_result(args.result_name, payload)


if __name__ == "__main__":
    main()
