"""Can the teacher's confidence tell which target speakers it fails on? The premise of ``p2r_sc_error``.

For each Pseudo2Real run folder given (one per speaker split), fits the
teacher-error model on the source-train speakers exactly as ``p2r_sc_error``
does (selfspeech.adapt.sc.error_clusters), and reports:

- ``heldout_source_spearman``: rank correlation of predicted and measured
  teacher WER on the source dev and sim speakers (label-free for the target;
  what a user can check on any corpus);
- measurement only, with the target's transcripts: the same correlation on the
  target speakers, and the measured teacher WER of the target speakers placed
  in each cluster (do the clusters separate the target speakers the teacher
  fails on?).

Reads the run folders' data and label stages only: seconds, no model.
Usage: python benchmarks/sc_error_probe.py runs/p2r_so762_seed1 runs/p2r_so762_seed2 [--k 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from selfspeech.adapt.sc import error_clusters, teacher_wer  # noqa: E402
from selfspeech.data.manifest import read_manifest  # noqa: E402


def probe(run: Path, k: int, min_size: int, normalizer: str) -> dict:
    from scipy.stats import spearmanr

    parts = {n: list(read_manifest(run / "data" / f"{n}.jsonl"))
             for n in ("source_train", "source_dev", "source_sim", "target_adapt", "target_eval")}
    labels = run / "label" / "labels.jsonl"
    cl = error_clusters({n: parts[n] for n in ("source_train", "target_adapt", "target_eval")},
                        {n: parts[n] for n in ("source_dev", "source_sim")}, str(labels), k, min_size, normalizer)
    # measurement only: the target's real teacher WER, never read by the clusters above
    from selfspeech.eval.report import read_jsonl

    lab = {r["id"]: r for r in read_jsonl(labels)}
    tgt = parts["target_adapt"] + parts["target_eval"]
    real = teacher_wer(tgt, lab, normalizer)
    pred = cl["target_predicted"]
    keys = sorted(set(real) & set(pred))
    rho = spearmanr([pred[s] for s in keys], [real[s] for s in keys]).statistic
    by_cluster = {c: float(np.mean([real[s] for s in keys if cl["error"][s] == c]))
                  for c in range(cl["k"]) if any(cl["error"][s] == c for s in keys)}
    src_real = teacher_wer(parts["source_train"], lab, normalizer)
    return {"k": cl["k"], "cuts": cl["cuts"], "source_sizes": cl["source_sizes"], "target_sizes": cl["target_sizes"],
            "heldout_source_spearman": cl["heldout_spearman"], "heldout_speakers": cl["heldout_speakers"],
            "source_teacher_wer_mean": float(np.mean(list(src_real.values()))),
            "source_teacher_wer_by_cluster": cl["source_teacher_wer"],
            "target_predicted_wer_by_cluster": cl["target_predicted_wer"],
            "target_teacher_wer_mean": float(np.mean(list(real.values()))),
            "measurement_only": {"target_spearman": float(rho), "target_speakers": len(keys),
                                 "target_teacher_wer_by_cluster": by_cluster},
            "coefficients": cl["coefficients"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="Pseudo2Real run folders (their data and label stages)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--min-size", type=int, default=3)
    ap.add_argument("--normalizer", default="whisper_english")
    args = ap.parse_args()
    res = {r.name: probe(r, args.k, args.min_size, args.normalizer) for r in args.runs}
    for name, r in res.items():
        m = r["measurement_only"]
        print(f"{name}: held-out source rho {r['heldout_source_spearman']}, target rho {m['target_spearman']:.2f}, "
              f"target teacher WER by cluster {m['target_teacher_wer_by_cluster']}, sizes {r['target_sizes']}")
    write_result("pseudo2real_sc_error_probe", {"runs": res})


if __name__ == "__main__":
    main()
