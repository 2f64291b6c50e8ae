"""Scaling on this machine: 1 vs 2 processes for the CTC trainer (torchrun, gloo) and for labelling (Ray).

- CTC: the same per-process batch (``--batch-seconds``) for ``--steps`` steps,
  1 process vs ``torchrun --nproc_per_node 2`` (which trains on twice the audio
  per step): throughput = training audio seconds per wall second, from the run
  logs (time inside the loop). The 2-process run is also checked against one
  process fed the combined batch (same weights within float tolerance).
- Labelling: ``--utterances`` child utterances of speechocean762 by whisper-tiny.en,
  one process (1 CPU thread) vs Ray with 2 actors (1 thread each); wall time of
  the labelling call (Ray start-up included, reported apart); records compared.

Every process gets one thread, so 2 processes use the 2 cores. Medians over
``--repeats``. Writes ``benchmarks/results/scaling.json``.
Usage: python benchmarks/scaling.py [--steps 30] [--utterances 96] [--repeats 3]
"""
from __future__ import annotations

import os

# one OpenMP thread in this process too, as in the 1-CPU Ray actors and torchrun workers: CTranslate2's
# int8 kernels depend on the thread count, and the labelling comparison needs the same numerics
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SO762, median, write_result  # noqa: E402

CTC_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from selfspeech.train.ctc import CTCConfig, finetune_ctc
train, dev, out, batch_seconds, steps = sys.argv[1:6]
cfg = CTCConfig(targets="char", encoder={"preset": "small", "dropout": 0.0}, mask_time_prob=0.0, mask_channel_prob=0.0,
                max_batch_seconds=float(batch_seconds),
                loop={"max_steps": int(steps), "lr": 1e-3, "log_every": 1, "ckpt_every": 1000, "warmup_fraction": 0.1,
                      "eval_every": 0})
finetune_ctc(train, dev, out, cfg, progress=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ctc(work: Path, train: Path, dev: Path, nproc: int, batch_seconds: float, steps: int, tag: str) -> dict:
    script = work / "ctc_run.py"
    script.write_text(CTC_SCRIPT)
    out = work / f"ctc_{tag}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
        str(script)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd + [str(train), str(dev), str(out), str(batch_seconds), str(steps)], capture_output=True,
                       text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"CTC run failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    log = [json.loads(x) for x in open(out / "log.jsonl") if '"loss"' in x]
    # steady state: skip the first 3 steps (allocation, process-group warm-up)
    secs = log[-1]["seconds"] - log[2]["seconds"]
    return {"loop_seconds": secs, "steps": len(log) - 3, "wall_seconds": round(wall, 2), "out": out,
            "losses": [r_["loss"] for r_ in log]}


def equal_corpus(work: Path) -> tuple[Path, Path]:
    """4 training + 2 dev synthetic utterances of exactly 1.5 s (the tests' construction)."""
    import numpy as np
    import soundfile as sf

    from selfspeech.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        t = np.arange(24_000) / 16_000
        w = (0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
        sf.write(work / f"eq{i}.wav", w, 16_000)
        items.append({"id": f"eq{i}", "audio_filepath": str(work / f"eq{i}.wav"), "duration": 1.5,
                      "text": ["A", "BAD", "CAT", "DOG"][i % 4], "speaker": f"s{i}"})
    write_manifest(work / "eq_train.jsonl", items[:4])
    write_manifest(work / "eq_dev.jsonl", items[4:])
    return work / "eq_train.jsonl", work / "eq_dev.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-seconds", type=float, default=40.0, help="padded audio seconds per process and step")
    ap.add_argument("--utterances", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found")
    from safetensors.torch import load_file

    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.data.manifest import write_manifest
    from selfspeech.label.ray_label import TeacherSpec, label_with_ray
    from selfspeech.label.run import label_manifest
    from selfspeech.label.teacher import load_teacher

    work = Path(tempfile.mkdtemp(prefix="scaling_"))
    items = list(iter_kaldi_dir(SO762))
    adults = [i for i in items if i["age_group"] == "adult"]
    train, dev = work / "train.jsonl", work / "dev.jsonl"
    write_manifest(train, adults[:400])
    write_manifest(dev, adults[400:410])

    # ---- CTC trainer: throughput, and the 2-process run against one process with the combined batch
    ctc = {1: [], 2: []}
    for rep in range(args.repeats):
        for n in (1, 2):
            r = run_ctc(work, train, dev, n, args.batch_seconds, args.steps, f"{n}p_{rep}")
            # audio per step: n processes x their batch (a duration-capped batch holds ~batch_seconds)
            ctc[n].append(r)
            print(f"CTC {n} process(es), repeat {rep}: {r['loop_seconds']:.1f} s for {r['steps']} steps", flush=True)
    sps = {n: median([r["steps"] / r["loop_seconds"] for r in ctc[n]]) for n in (1, 2)}
    # 2 processes train on twice the audio per step
    speedup = 2 * sps[2] / sps[1]
    # equality check on equal-length utterances, one batch per rank per epoch: the union of the two ranks'
    # batches is then exactly the one-process batch (duration-capped batches of real, varied lengths
    # would be cut differently, so that comparison would not be like for like)
    eq_train, eq_dev = equal_corpus(work)
    combined = run_ctc(work, eq_train, eq_dev, 1, 6.0, 6, "combined")
    pair = run_ctc(work, eq_train, eq_dev, 2, 3.0, 6, "pair")
    a = load_file(str(combined["out"] / "best" / "model.safetensors"))
    b = load_file(str(pair["out"] / "best" / "model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    loss_gap = max(abs(x - y) / max(abs(x), 1e-9) for x, y in zip(combined["losses"], pair["losses"]))

    # ---- labelling: plain vs Ray
    kids = [i for i in items if i["age_group"] == "child"][: args.utterances]
    m = work / "kids.jsonl"
    write_manifest(m, kids)
    lab = {"plain": [], "ray": []}
    outs = {}
    for rep in range(args.repeats):
        p = work / f"plain_{rep}.jsonl"
        t0 = time.perf_counter()
        label_manifest(m, p, load_teacher("whisper-tiny.en", cpu_threads=1), "whisper-tiny.en", batch_size=8,
                       progress=False)
        lab["plain"].append(time.perf_counter() - t0)
        q = work / f"ray_{rep}.jsonl"
        t0 = time.perf_counter()
        label_with_ray(m, q, TeacherSpec("whisper-tiny.en", cpu_threads=1), batch_size=8, concurrency=2,
                       progress=False)
        lab["ray"].append(time.perf_counter() - t0)
        outs[rep] = (p, q)
        print(f"labelling repeat {rep}: plain {lab['plain'][-1]:.1f} s, ray {lab['ray'][-1]:.1f} s", flush=True)

    def content(path):
        return {r["id"]: {k: v for k, v in r.items() if k != "decode_seconds"}
                for r in map(json.loads, open(path))}

    ray_same = all(content(p) == content(q) for p, q in outs.values())
    write_result("scaling", {
        "ddp_speedup_2proc": round(speedup, 3),
        "ddp_matches_single_process": bool(worst < 1e-3 and loss_gap < 1e-5),
        "ray_labelling_matches_plain": ray_same,
        "ctc": {"steps_per_second": sps, "batch_seconds_per_process": args.batch_seconds, "steps": args.steps,
                "repeats": args.repeats, "max_weight_gap_vs_combined_batch": worst, "max_rel_loss_gap": loss_gap,
                "note": "throughput = steps/s x processes (each step trains on every process's batch); "
                        "time inside the training loop after 3 warm-up steps, medians over repeats"},
        "labelling": {"utterances": len(kids), "plain_seconds": median(lab["plain"]), "ray_seconds": median(lab["ray"]),
                      "speedup_2_actors": round(median(lab["plain"]) / median(lab["ray"]), 3),
                      "note": "wall time of the call, Ray start-up and model loading in the actors included"},
        "threads_per_process": 1,
    })


if __name__ == "__main__":
    main()
