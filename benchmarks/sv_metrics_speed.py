"""EER + minDCF on 10 M trials: selfspeech.eval.sv_metrics.eer_mindcf vs a scikit-learn roc_curve recipe, side by side.

Data: ``--trials`` synthetic scores, a ``--target-fraction`` of them targets,
non-targets N(0, 1) and targets N(``--shift``, 1) (default 4: EER ~2.3 %, a
VoxCeleb-like operating range), float32 like cosine scores of float32
embeddings (so there are ties), fixed seed. Both methods compute the same
definitions (interpolated EER, normalised minDCF at p_target 0.01, see
selfspeech/eval/sv.py); the sklearn recipe reads them off ``roc_curve``'s
(fpr, tpr) points. Timing: one warm-up call each, then ``--repeats`` interleaved
calls, medians, wall clock, in this process.

Memory: each method runs once in its own fresh subprocess that loads the same
arrays from .npy, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``),
calls the method and reports VmHWM - VmRSS-before: the extra resident memory
the call needed at its peak, input arrays and imports excluded. A second call
under ``tracemalloc`` gives the peak of Python/numpy heap allocations, which is
independent of allocator caching.

Usage: python benchmarks/sv_metrics_speed.py [--threads 1] [--trials 10000000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_result  # noqa: E402

P_TARGET = 0.01


def sklearn_eer_mindcf(scores, labels) -> tuple[float, float]:
    """Interpolated EER and normalised minDCF from sklearn's ROC points (the usual recipe, made exact)."""
    import numpy as np
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    d = fpr - fnr  # -1 (reject all) ... +1 (accept all)
    k = int(np.argmax(d >= 0))
    eer = fnr[k] if d[k] == 0 else fnr[k - 1] - d[k - 1] / (d[k] - d[k - 1]) * (fnr[k] - fnr[k - 1])
    return float(eer), float((P_TARGET * fnr + (1 - P_TARGET) * fpr).min() / min(P_TARGET, 1 - P_TARGET))


def ours_eer_mindcf(scores, labels) -> tuple[float, float]:
    from selfspeech.eval.sv_metrics import eer_mindcf

    m = eer_mindcf(scores, labels, p_target=P_TARGET)
    return m.eer, m.mindcf


METHODS = {"ours": ours_eer_mindcf, "sklearn": sklearn_eer_mindcf}


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def child(method: str, data: Path) -> None:
    """Run one method once on the saved arrays; print its peak memory as JSON."""
    import tracemalloc

    import numpy as np
    import sklearn.metrics  # noqa: F401  (imports are not the call's memory)

    import selfspeech.eval.sv_metrics  # noqa: F401

    scores, labels = np.load(data / "scores.npy"), np.load(data / "labels.npy")
    fn = METHODS[method]
    before = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    fn(scores, labels)
    rss_peak = _status()["VmHWM"] - before
    tracemalloc.start()
    fn(scores, labels)
    heap_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"rss_peak_bytes": rss_peak, "tracemalloc_peak_bytes": heap_peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trials", type=int, default=10_000_000)
    ap.add_argument("--target-fraction", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy loads its BLAS; inherited by the children
    if args.child:
        return child(args.child, args.data)
    import numpy as np

    rng = np.random.default_rng(args.seed)
    labels = rng.random(args.trials) < args.target_fraction
    scores = rng.standard_normal(args.trials, dtype=np.float32)
    scores[labels] += np.float32(args.shift)
    n_distinct = int(np.unique(scores).size)

    results = {k: fn(scores, labels) for k, fn in METHODS.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in METHODS}
    for r in range(args.repeats):
        for k, fn in METHODS.items():
            t = time.perf_counter()
            results[k] = fn(scores, labels)
            times[k].append(time.perf_counter() - t)
            print(f"repeat {r + 1}: {k} {times[k][-1]:.2f} s", flush=True)
    med = {k: median(v) for k, v in times.items()}

    mem = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "scores.npy", scores)
        np.save(Path(tmp) / "labels.npy", labels)
        for k in METHODS:
            out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", k,
                                  "--data", tmp], capture_output=True, text=True, check=True)
            mem[k] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{k}: peak RSS +{mem[k]['rss_peak_bytes'] / 2**20:.0f} MB", flush=True)

    (eer_o, dcf_o), (eer_s, dcf_s) = results["ours"], results["sklearn"]
    agree = abs(eer_o - eer_s) <= 1e-9 and abs(dcf_o - dcf_s) <= 1e-9
    mb = 2 ** 20
    write_result("sv_metrics_speed", {
        "eer_10m_trials_seconds": med["ours"], "sklearn_seconds": med["sklearn"],
        "speedup": med["sklearn"] / med["ours"],
        "peak_mb_ours": mem["ours"]["rss_peak_bytes"] / mb, "peak_mb_sklearn": mem["sklearn"]["rss_peak_bytes"] / mb,
        "tracemalloc_peak_mb_ours": mem["ours"]["tracemalloc_peak_bytes"] / mb,
        "tracemalloc_peak_mb_sklearn": mem["sklearn"]["tracemalloc_peak_bytes"] / mb,
        "input_mb": (scores.nbytes + labels.nbytes) / mb,
        "eer_ours": eer_o, "eer_sklearn": eer_s, "mindcf_ours": dcf_o, "mindcf_sklearn": dcf_s,
        "agree_within_1e-9": agree, "trials": args.trials, "targets": int(labels.sum()),
        "distinct_scores": n_distinct, "seconds": times,
        "peak_mb_meaning": "extra resident memory of one call at its peak (VmHWM after clear_refs minus VmRSS "
                           "before), fresh subprocess, input arrays and imports excluded; tracemalloc_* = peak "
                           "traced heap allocations of a second call",
        "config": {"threads": args.threads, "repeats": args.repeats, "target_fraction": args.target_fraction,
                   "shift": args.shift, "seed": args.seed, "p_target": P_TARGET, "dtype": "float32",
                   "sklearn_recipe": "roc_curve(labels, scores) -> interpolated EER, min normalised DCF"},
    })
    print(f"ours {med['ours']:.2f} s vs sklearn {med['sklearn']:.2f} s (x{med['sklearn'] / med['ours']:.1f}); "
          f"EER {eer_o:.6f} vs {eer_s:.6f}; agree={agree}")
    if not agree:
        raise SystemExit("the two methods disagree")


if __name__ == "__main__":
    main()
