"""GPU benchmark: one run on one CUDA GPU, every figure side by side, written to benchmarks/results/gpu.json.

Parts, in this order, each guarded (an exception is recorded under the part and
the run goes on) and time-boxed (the whole run stays within ``--budget``
seconds; a part that has no time left is recorded as skipped):

a. ``matmul``: the bf16 peak, the median TFLOP/s of 8192^3 products (the
   denominator of every utilisation below);
b. ``student``: Whisper tiny.en and base fine-tuning samples/s, the toolkit's
   loop (bf16 autocast, features cut to the batch's longest utterance) vs the
   transformers ``Seq2SeqTrainer`` recipe (bf16, SDPA, 30-s padded features),
   same data, batch, lr, clipping and optimizer (benchmarks/whisper_finetune_speed.py);
c. ``labelling``: teacher audio-seconds per second, the toolkit's teachers
   (faster-whisper float16 when importable, transformers bf16) vs the
   transformers ASR pipeline in bf16, same model, utterances and batches;
d. ``pretraining``: BEST-RQ and wav2vec 2.0 at base size (12 x 768):
   audio-seconds per second and model FLOP utilisation (FLOPs of one forward +
   backward counted by ``torch.utils.flop_counter.FlopCounterMode``, times
   steps per second, over the measured peak);
e. ``speaker_ssl``: ECAPA-TDNN SimCLR steps per second.

Every part records its peak GPU memory (``torch.cuda.max_memory_allocated``,
reset between parts). The inputs (utterances, Whisper configs and tiny.en
weights) come from the folder benchmarks/gpu_inputs.py builds, since the GPU
machine has no ../shared. The result file is rewritten after every part, so a
killed run leaves the parts it finished. Goals (recorded with the figures):
pretraining MFU >= 40%, student >= 3x Seq2SeqTrainer, labelling >= 2x the pipeline.

``--smoke`` runs every part on the CPU with tiny models and a few steps (a check
that the script works end to end; its figures mean nothing) and writes only to ``--out``.

Usage: python benchmarks/gpu.py [--inputs .gpu_inputs] [--budget 420] [--out PATH]
       python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, git_commit, machine  # noqa: E402

import torch  # noqa: E402

GOALS = {"pretraining_mfu": 0.40, "student_speedup": 3.0, "labelling_speedup": 2.0}
# seconds each part may take at most (the run's own --budget caps the total)
BUDGETS = {"matmul": 15, "student": 150, "labelling": 90, "pretraining": 120, "speaker_ssl": 45}
SIZES = {
    "gpu": {"matmul_n": 8192, "matmul_repeats": 20, "student_models": ("whisper-tiny.en", "whisper-base"),
            "student_batch": 32, "student_warmup": 3, "student_steps": 10, "student_repeats": 2,
            "label_n": 160, "label_batch": 32, "label_repeats": 2, "max_new_tokens": 128,
            "encoder": "base", "pretrain_batch": {"bestrq": 256, "wav2vec2": 128}, "crop_seconds": 4.0,
            "pretrain_warmup": 3, "pretrain_steps": 10, "ecapa": "small", "ecapa_batch": 64,
            "ecapa_warmup": 3, "ecapa_steps": 20, "workers": 4},
    "smoke": {"matmul_n": 256, "matmul_repeats": 3, "student_models": ("whisper-tiny.en", "whisper-base"),
              "student_batch": 2, "student_warmup": 1, "student_steps": 1, "student_repeats": 1,
              "label_n": 4, "label_batch": 2, "label_repeats": 1, "max_new_tokens": 8,
              "encoder": "tiny", "pretrain_batch": {"bestrq": 2, "wav2vec2": 2}, "crop_seconds": 4.0,
              "pretrain_warmup": 1, "pretrain_steps": 1, "ecapa": "tiny", "ecapa_batch": 4,
              "ecapa_warmup": 1, "ecapa_steps": 1, "workers": 0},
}


@dataclass
class Ctx:
    """What every part gets: where to run, how big, the inputs, and until when."""

    device: torch.device
    precision: str                 # the loop's precision: bf16 on the GPU, fp32 in the smoke run
    smoke: bool
    inputs: Path
    work: Path
    sizes: dict
    deadline: float = 0.0          # perf_counter time the current part must end by
    peak_flops: float | None = None
    items: list = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def model(self, name: str) -> tuple[Path, str]:
        """A transformers directory of ``name`` and what its weights are."""
        from gpu_inputs import model_dir

        if not self.smoke:
            d, real = model_dir(self.inputs, name, self.work)
            return d, "pretrained (int8-packed, dequantized)" if real else "random initialisation"
        from faults import tiny_random_whisper

        ref, _ = model_dir(self.inputs, name, self.work / "ref", weights=False)
        out = self.work / "smoke_models" / name
        if not (out / "model.safetensors").is_file():
            tiny_random_whisper(ref, out)
        return out, "tiny random (smoke run)"

    def reset_memory(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None


def replicate(items: list[dict], n: int) -> list[dict]:
    """``n`` items cycling through ``items``, each with its own id (copies share the audio file)."""
    return [{**items[i % len(items)], "id": f"{items[i % len(items)]['id']}#{i // len(items)}"} for i in range(n)]


def error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc(limit=-6)[-4000:]}


def guarded_each(ctx: Ctx, names, fn, min_left: float) -> dict:
    """name -> ``fn(name)`` for each name, an exception recorded in its place; once one has run, a
    later one starts only with ``min_left`` seconds of the part's time box left."""
    out = {}
    for name in names:
        if out and ctx.left() < min_left:
            out[name] = {"skipped": f"time box: {ctx.left():.0f} s of the part's budget left"}
            continue
        try:
            out[name] = fn(name)
        except Exception as e:  # recorded; the next one still runs
            out[name] = error_record(e)
    return out


# -- a. matmul peak ---------------------------------------------------------------------------

def matmul_peak(ctx: Ctx) -> dict:
    """Median TFLOP/s of n^3 products (bf16 on a GPU, fp32 on a CPU), after three warm-ups."""
    n, reps = ctx.sizes["matmul_n"], ctx.sizes["matmul_repeats"]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    g = torch.Generator(device=ctx.device).manual_seed(0)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=ctx.device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    secs = []
    for _ in range(reps):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            secs.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            torch.matmul(a, b, out=c)
            secs.append(time.perf_counter() - t)
    tflops = [2 * n**3 / s / 1e12 for s in secs]
    ctx.peak_flops = statistics.median(tflops) * 1e12
    return {"tflops": round(statistics.median(tflops), 1), "tflops_max": round(max(tflops), 1), "n": n,
            "dtype": str(dtype).removeprefix("torch."), "repeats": reps, "data": "random normal"}


# -- the result file ----------------------------------------------------------------------------

def check_result(d: dict) -> list[str]:
    """Problems with a result dict against the keys the machine check reads (empty: all there)."""
    problems = []
    if not isinstance(d.get("device"), str) or not d["device"]:
        problems.append("device: missing or not a GPU name")
    for part, key in (("pretraining", "mfu"), ("student", "speedup_vs_seq2seq_trainer"),
                      ("labelling", "speedup_vs_transformers_pipeline")):
        sub = d.get(part)
        if not isinstance(sub, dict):
            problems.append(f"{part}: missing")
            continue
        v = sub.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            why = sub.get("error") or sub.get("skipped") or "not a positive number"
            problems.append(f"{part}.{key}: {v!r} ({str(why).splitlines()[0][:200]})")
    return problems


def goals_met(d: dict) -> dict:
    def at_least(part: str, key: str, goal: float):
        v = (d.get(part) or {}).get(key)
        return None if not isinstance(v, (int, float)) else bool(v >= goal)

    return {"pretraining_mfu": at_least("pretraining", "mfu", GOALS["pretraining_mfu"]),
            "student_speedup": at_least("student", "speedup_vs_seq2seq_trainer", GOALS["student_speedup"]),
            "labelling_speedup": at_least("labelling", "speedup_vs_transformers_pipeline",
                                          GOALS["labelling_speedup"])}


def write(path: Path, result: dict) -> None:
    result["goals_met"] = goals_met(result)
    result["problems"] = check_result(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)


def run_part(ctx: Ctx, name: str, fn, result: dict, out: Path, run_deadline: float) -> None:
    """One part, guarded and time-boxed; its record (with seconds and peak memory) goes into ``result``."""
    t0 = time.perf_counter()
    ctx.deadline = min(run_deadline, t0 + BUDGETS[name])
    if ctx.left() < 5:
        result[name] = {"skipped": f"time box: {run_deadline - t0:.0f} s of the run's budget left"}
    else:
        ctx.reset_memory()
        try:
            rec = fn(ctx)
        except Exception as e:  # recorded; the next part still runs
            rec = error_record(e)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        rec["budget_seconds"] = round(ctx.deadline - t0, 1)
        rec.setdefault("peak_memory_gib", ctx.peak_memory_gib())
        result[name] = rec
    result["part_seconds"][name] = round(time.perf_counter() - t0, 1)
    write(out, result)
    print(f"[{name}] {json.dumps({k: v for k, v in result[name].items() if not isinstance(v, (dict, list))})[:400]}",
          flush=True)


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=Path, default=ROOT / ".gpu_inputs", help="folder from benchmarks/gpu_inputs.py")
    ap.add_argument("--out", type=Path, default=None, help="result file (default benchmarks/results/gpu.json)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "gpu_bench", help="scratch folder")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    ap.add_argument("--smoke", action="store_true", help="every part on the CPU, tiny sizes (needs --out)")
    ap.add_argument("--parts", default=",".join(BUDGETS), help="comma-separated subset of " + ",".join(BUDGETS))
    a = ap.parse_args()
    if a.smoke and a.out is None:
        sys.exit("--smoke writes only where --out says (never benchmarks/results/gpu.json)")
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run on a GPU machine (benchmarks/run_gpu.sh), or --smoke --out PATH")
    if not (a.inputs / "inputs.json").is_file():
        sys.exit(f"{a.inputs}/inputs.json not found: build it with python benchmarks/gpu_inputs.py")
    out = a.out or RESULTS / "gpu.json"
    from gpu_inputs import items
    from gpu_ssl import pretraining, speaker_ssl
    from gpu_whisper import labelling, student

    device = torch.device("cpu") if a.smoke else torch.device("cuda", 0)
    ctx = Ctx(device, "fp32" if a.smoke else "bf16", a.smoke, a.inputs, a.work,
              SIZES["smoke" if a.smoke else "gpu"], items=items(a.inputs))
    result = {"device": torch.cuda.get_device_name(0) if ctx.cuda else f"cpu (smoke run: {machine()['processor']})",
              "smoke": a.smoke, "goals": GOALS, "part_seconds": {}, "sizes": ctx.sizes,
              "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "commit": git_commit(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine()}
    try:
        from selfspeech.data.versions import software_versions

        result["versions"] = software_versions()
    except Exception as e:
        result["versions"] = error_record(e)
    fns = {"matmul": matmul_peak, "student": student, "labelling": labelling, "pretraining": pretraining,
           "speaker_ssl": speaker_ssl}
    deadline = t_start + a.budget
    try:
        for name in [p.strip() for p in a.parts.split(",") if p.strip()]:
            run_part(ctx, name, fns[name], result, out, deadline)
    except KeyboardInterrupt:  # a timeout's SIGINT: keep what was measured
        result["interrupted"] = True
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    write(out, result)
    print(f"wrote {out} in {result['seconds']} s; goals met: {result['goals_met']}")
    for p in result["problems"]:
        print(f"problem: {p}")


if __name__ == "__main__":
    main()
