"""Bounded memory: peak RSS of labelling, evaluation and embedding extraction at 1k vs 50k utterances.

Each measurement is a fresh process (``ru_maxrss`` of the child), so imports
are included and the growth from 1k to 50k is the figure to read. Audio: 20 distinct 0.3-s files reused by every manifest line
(the pipelines decode each line anyway). Labelling uses a constant-time fake
teacher so that the measurement is the pipeline's (manifest reading, batching,
resumable writing), not Whisper's, which is constant in N.

Used by ``benchmarks/reliability.py``; standalone: python benchmarks/memory_probe.py
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from faults import cli, one_thread_env

LABEL = ("import sys\n"
         "from selfspeech.label.run import label_manifest\n"
         "from selfspeech.label.teacher import Hypothesis\n"
         "class Fake:\n"
         "    backend = 'fake'\n"
         "    def transcribe(self, wavs):\n"
         "        return [Hypothesis('green apples fall', -0.1, 1.2, 0.01, 0.0) for _ in wavs]\n"
         "label_manifest(sys.argv[1], sys.argv[2], Fake(), 'fake', batch_size=16, progress=False)\n")


def make_manifests(work: Path, sizes=(1000, 50000)) -> dict[int, tuple[Path, Path]]:
    """{n: (manifest, hypotheses)} with n lines each over 20 short audio files."""
    audio = work.resolve() / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(20):
        p = audio / f"a{i}.flac"
        sf.write(p, (0.1 * rng.standard_normal(4800)).astype(np.float32), 16000)
        paths.append(str(p))
    out = {}
    for n in sizes:
        m, h = work / f"m{n}.jsonl", work / f"h{n}.jsonl"
        with open(m, "w") as fm, open(h, "w") as fh:
            for i in range(n):
                fm.write(json.dumps({"id": f"u{i:06d}", "audio_filepath": paths[i % 20], "duration": 0.3,
                                     "text": "GREEN APPLES FALL ON THE TREE", "speaker": f"s{i % 500}"}) + "\n")
                fh.write(json.dumps({"id": f"u{i:06d}", "text": "green apple falls on a tree"}) + "\n")
        out[n] = (m, h)
    return out


def peak_mb(argv: list[str], timeout: float = 3600) -> float:
    """Peak resident memory (MB) of a fresh child process running ``argv`` (must succeed)."""
    # ru_maxrss of RUSAGE_CHILDREN is the largest of all waited-for children: run each probe in
    # its own intermediate interpreter so that earlier probes do not mask later ones
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "if p.returncode: sys.exit(p.stdout[-2000:] + p.stderr[-2000:])\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    p = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, timeout=timeout,
                       env=one_thread_env())
    if p.returncode:
        raise RuntimeError(f"memory probe {argv[:4]} failed: {p.stderr[-2000:]}")
    return int(p.stdout.strip().splitlines()[-1]) / 1024  # KB on Linux


def run_memory(work: Path, sizes=(1000, 50000), log=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    man = make_manifests(work, sizes)
    res: dict = {"peak_mb": {}}
    for n, (m, h) in man.items():
        probes = {
            "label": [sys.executable, "-c", LABEL, str(m), str(work / f"labels{n}.jsonl")],
            "eval": list(cli("eval", "--ref", str(m), "--hyp", str(h), "--bootstrap", "200",
                             "--out", str(work / f"eval{n}"))),
            "sv_embed": list(cli("sv", "embed", "melstats", str(m), "--out", str(work / f"emb{n}"), "--no-plot")),
        }
        for name, argv in probes.items():
            (work / f"labels{n}.jsonl").unlink(missing_ok=True)  # labelling resumes: start from nothing
            mb = peak_mb(argv)
            res["peak_mb"].setdefault(name, {})[str(n)] = round(mb, 1)
            log(f"  {name} at {n} utterances: peak {mb:.0f} MB")
    res["max_peak_mb"] = {str(n): max(v[str(n)] for v in res["peak_mb"].values()) for n in sizes}
    res["growth_mb"] = {k: round(v[str(sizes[-1])] - v[str(sizes[0])], 1) for k, v in res["peak_mb"].items()}
    res["growth_kb_per_utterance"] = {k: round(1024 * g / (sizes[-1] - sizes[0]), 2)
                                      for k, g in res["growth_mb"].items()}
    return res


if __name__ == "__main__":
    sys.exit(print(json.dumps(run_memory(Path("runs/memory")), indent=1)))
