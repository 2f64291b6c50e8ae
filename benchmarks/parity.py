"""Parity with reference implementations: one figure per component, checked against its goal.

Each row builds a small random configuration, runs our implementation and the
reference on the same weights and inputs, and reports one number:

- ``ecapa_embedding_max_diff``: SpeechBrain's ``ECAPA_TDNN`` vs our ECAPA-TDNN
  (Desplanques et al. 2020) loaded from its state dict, max |embedding difference|;
- ``bestrq_label_agreement``: SpeechBrain's BEST-RQ random-projection quantiser vs
  ours (Chiu et al. 2022) with the same projection and codebook, fraction of equal labels;
- ``whisper_logmel_max_diff``: our Whisper log-mel vs transformers' ``WhisperFeatureExtractor``
  and faster-whisper's ``FeatureExtractor`` where their conventions agree, max |difference|;
- ``ctc_beam_agreement``: our CTC prefix beam search with pyctcdecode's ranking of beam entries
  (``rank="state"``) vs ``pyctcdecode`` without a language model or pruning, fraction of utterances
  with the same best path, on confident and on flatter posteriors (the share where the beam changes
  greedy's path is in the details); the details also give our default ranking's agreement, which
  of the two is more probable where they differ, and how often each equals the exact best labelling;
- ``wav2vec2_loss_rel_diff``: transformers' ``Wav2Vec2ForPreTraining`` vs our wav2vec 2.0 task
  (Baevski et al. 2020) with the same weights, masks, distractors and Gumbel noise, exported and
  imported, large (XLSR) and base layouts: worst relative difference of the contrastive,
  diversity and total losses (ours are means over masked frames, multiplied by their count to
  compare with transformers' sums; :mod:`selfspeech.objectives.w2v2_hf`).

The figures come from :mod:`selfspeech.eval.parity` (the tests assert the same
goals on smaller draws). Runs in about a minute on a CPU.

Usage: python benchmarks/parity.py [--seed 0]
Writes benchmarks/results/parity.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


@dataclass(frozen=True)
class Row:
    key: str
    measure: Callable[[int], dict]   # seed -> {"value": float, ...details}
    op: str                          # "<=" (a difference) or ">=" (an agreement)
    goal: float

    def met(self, value: float) -> bool:
        return value <= self.goal if self.op == "<=" else value >= self.goal


def rows() -> list[Row]:
    from selfspeech.eval import parity as P
    from selfspeech.objectives import w2v2_hf as W

    return [
        Row("ecapa_embedding_max_diff", P.ecapa_parity, "<=", 1e-4),
        Row("bestrq_label_agreement", P.bestrq_parity, ">=", 0.999),
        Row("whisper_logmel_max_diff", P.whisper_logmel_parity, "<=", 1e-3),
        Row("ctc_beam_agreement", P.ctc_beam_parity, ">=", 0.999),
        Row("wav2vec2_loss_rel_diff", W.wav2vec2_parity_row, "<=", 1e-4),
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from selfspeech.eval.parity import reference_versions

    out: dict = {}
    tolerances, details = {}, {}
    for row in rows():
        t0 = time.perf_counter()
        res = row.measure(args.seed)
        value = float(res.pop("value"))
        out[row.key] = value
        tolerances[row.key] = {"goal": f"{row.op} {row.goal:g}", "met": row.met(value)}
        details[row.key] = {**res, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{row.key}: {value:.3g} (goal {row.op} {row.goal:g}, {'met' if row.met(value) else 'MISSED'})")
    payload = {**out, "tolerances": tolerances, "details": details, "library_versions": reference_versions(),
               "seed": args.seed}
    write_result("parity", payload)
    return payload


if __name__ == "__main__":
    main()
