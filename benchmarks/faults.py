"""Fault injection: SIGKILL a long stage at random moments, resume it, compare with an uninterrupted run.

A :class:`Stage` is a command line (usually ``python -m selfspeech.cli ...``)
writing into a run folder, plus the output files that must come out identical.
:func:`kill_campaign` runs the stage once uninterrupted (the reference, timed),
then for each trial runs it in a fresh folder, kills the whole process group
with SIGKILL one or more times at random moments inside the reference's
duration (nothing gets to clean up, as with an OOM kill or a pre-empted node),
reruns the same command until it finishes, and compares the outputs:

- ``*.safetensors``: every tensor bit-identical (``atol`` > 0 only where the
  stage says why its math is not deterministic);
- ``*.jsonl``: the same records in the same order, minus volatile keys (timings)
  and the start/resume markers a training log gets at each process start;
- anything else: the same bytes.

Used by ``benchmarks/reliability.py``, ``bad_inputs.py`` and ``memory_probe.py``
and by ``tests/test_reliability.py`` (a fast subset); :func:`tiny_random_whisper`
gives the tests and the campaigns a Whisper that fine-tunes in seconds on a CPU.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

VOLATILE = frozenset({"decode_seconds", "seconds", "wall_seconds", "rtf", "train_seconds", "time", "date"})


@dataclass(frozen=True)
class Stage:
    """A resumable command: ``argv`` with ``{out}`` standing for the run folder."""

    name: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...]                 # paths under the run folder compared after the run
    atol: float = 0.0                        # tensor tolerance (0: bit-identical)
    why_tolerance: str = ""                  # required when atol > 0
    timeout: float = 900.0
    env: dict = field(default_factory=dict)  # extra environment (e.g. OMP_NUM_THREADS=1 for determinism)

    def command(self, out: Path) -> list[str]:
        return [a.replace("{out}", str(out)) for a in self.argv]


def cli(*args: str) -> tuple[str, ...]:
    """``python -m selfspeech.cli ARGS`` with this interpreter (no shell, no PATH lookup)."""
    return (sys.executable, "-m", "selfspeech.cli", *args)


def one_thread_env(extra: dict | None = None) -> dict:
    """This environment with one OpenMP/MKL thread (CPU results then repeat run to run), plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra or {})}


def run_stage(stage: Stage, out: Path) -> float:
    """Run ``stage`` into ``out`` to completion; its wall seconds. Raises with the output's tail on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(stage.command(out), env=one_thread_env(stage.env), capture_output=True, text=True,
                       timeout=stage.timeout)
    if p.returncode != 0:
        raise RuntimeError(f"stage {stage.name} failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return time.perf_counter() - t0


def kill_after(stage: Stage, out: Path, delay: float) -> tuple[bool, float]:
    """Start ``stage``, SIGKILL its process group after ``delay`` s.

    Returns (killed, seconds): killed is False when it finished (or failed) first."""
    t0 = time.perf_counter()
    p = subprocess.Popen(stage.command(out), env=one_thread_env(stage.env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        p.wait(timeout=delay)
        return False, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return True, time.perf_counter() - t0


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("event") in ("start", "resume"):
                continue  # one per process start: a resumed run has more of them by design
            out.append({k: v for k, v in rec.items() if k not in VOLATILE} if isinstance(rec, dict) else rec)
    return out


def compare_outputs(a: Path, b: Path, outputs, atol: float = 0.0) -> list[str]:
    """Differences between the same ``outputs`` under run folders ``a`` and ``b`` (empty: identical)."""
    diffs = []
    for rel in outputs:
        fa, fb = a / rel, b / rel
        if not fa.is_file() or not fb.is_file():
            diffs.append(f"{rel}: missing in {'reference' if not fa.is_file() else 'resumed run'}")
            continue
        if rel.endswith(".safetensors"):
            import torch
            from safetensors.torch import load_file

            ta, tb = load_file(fa), load_file(fb)
            if ta.keys() != tb.keys():
                diffs.append(f"{rel}: tensor names differ ({sorted(set(ta) ^ set(tb))[:5]})")
                continue
            for k in ta:
                x, y = ta[k], tb[k]
                same = torch.equal(x, y) if atol == 0 or not x.is_floating_point() else \
                    x.shape == y.shape and bool(torch.allclose(x, y, atol=atol, rtol=0))
                if not same:
                    gap = float((x.double() - y.double()).abs().max()) if x.shape == y.shape else "shape"
                    diffs.append(f"{rel}: tensor {k} differs (max |diff| {gap})")
        elif rel.endswith(".jsonl"):
            ra, rb = _records(fa), _records(fb)
            if ra != rb:
                first = next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
                diffs.append(f"{rel}: records differ ({len(ra)} vs {len(rb)} lines; first difference at line "
                             f"{first + 1})")
        elif fa.read_bytes() != fb.read_bytes():
            diffs.append(f"{rel}: bytes differ")
    return diffs


def leftovers(ref: Path, run: Path) -> list[str]:
    """Files a killed-and-resumed run has that the uninterrupted one does not (temp copies, aside dirs)."""
    def names(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*")}

    return sorted(names(run) - names(ref))


def kill_campaign(stage: Stage, work: Path, trials: int = 2, max_kills: int = 2, seed: int = 0,
                  window: tuple[float, float] = (0.3, 0.97), log=print) -> dict:
    """Reference run, then ``trials`` runs each killed 1..``max_kills`` times and resumed; outputs compared.

    Kill moments are uniform in ``window`` x the reference's wall time (process
    start-up included, so early kills land in imports and set-up too). Returns
    counts and every difference found.
    """
    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    ref = work / "reference"
    ref_seconds = run_stage(stage, ref)
    res = {"stage": stage.name, "reference_seconds": round(ref_seconds, 1), "trials": 0, "kills": 0,
           "identical_after_resume": 0, "differences": [], "kill_moments": [], "atol": stage.atol}
    est = ref_seconds  # expected run time; shrinks if runs turn out faster than the (cold) reference
    for t in range(trials):
        run = work / f"trial{t}"
        n_kills = rng.randint(1, max_kills)
        for k in range(n_kills):
            for _ in range(4):
                delay = rng.uniform(*window) * est
                killed, seconds = kill_after(stage, run, delay)
                if killed:
                    res["kills"] += 1
                    res["kill_moments"].append(round(delay, 2))
                    break
                if k > 0:
                    break  # the resumed run finished before this kill: a completed resume all the same
                est = min(est, seconds)  # finished untouched: start again and aim inside its real run time
                shutil.rmtree(run, ignore_errors=True)
        run_stage(stage, run)  # resume to the end
        diffs = compare_outputs(ref, run, stage.outputs, stage.atol)
        diffs += [f"left behind: {p}" for p in leftovers(ref, run)]
        res["trials"] += 1
        res["identical_after_resume"] += not diffs
        res["differences"] += [f"trial {t}: {d}" for d in diffs]
        log(f"  {stage.name} trial {t}: {res['kills']} kill(s) so far -> {'identical' if not diffs else diffs}")
    return res


def tiny_random_whisper(reference_dir: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised 1+1-layer Whisper (d_model 64) with ``reference_dir``'s tokenizer and processor.

    Seconds to fine-tune on a CPU, yet the real vocabulary, feature extractor
    and generation config. Written with ``save_pretrained`` (safetensors) into ``out``.
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    reference_dir, out = Path(reference_dir), Path(out)
    config = WhisperConfig.from_pretrained(reference_dir)
    config.update(dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128))
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(reference_dir)
    model.save_pretrained(out)
    for f in reference_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt") and f.name not in ("config.json", "generation_config.json"):
            shutil.copy2(f, out / f.name)
    return out
