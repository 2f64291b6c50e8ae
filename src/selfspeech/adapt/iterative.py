"""Iterative Pseudo2Real (system ``p2r_iter``): the corrected student relabels the target.

    round 0:  theta_0 = theta_tp + lambda * tau                      (model_p2r, Lin et al. 2025 eq. 4)
    round r:  labels_r = theta_{r-1}(target-adapt audio), filtered
              theta_r  = FT(theta0, labels_r) + lambda * tau          (the same tau, lambda and scope)

Pseudo2Real corrects the target student once; its labels still carry what the
correction left of the teacher's errors, but fewer of them than the teacher's,
so a student fine-tuned on them and corrected again can improve on it (self-
training with a corrected labeller). Each round's labels pass the teacher's
label-free filters (:mod:`selfspeech.label.filters`: empty and repetitive
outputs; a greedy student gives no log-probabilities, so the other two rules
cannot fire) when ``iterative.drop_flagged``; the drops are counted.

The number of rounds is chosen without target transcripts (``iterative.stop``):

- ``agreement``: the first round whose model changes fewer than ``min_change``
  of the words of the labels it was trained on (relabelling has converged),
  else ``max_rounds``;
- ``source_sim``: the same loop on the held-out source speakers, started from
  the rehearsal student ``theta_simp + lambda * tau`` and relabelling its own
  sim-fit/stop audio, scored at every round with their real labels; the target
  runs as many rounds as the lowest sim WER (ties to fewer rounds; 0 rounds:
  ``p2r_iter`` is ``p2r``).

Each round decodes its whole part once (fit and stop speakers together; the
labels are split by id), so a round is one labels stage, one fine-tune
(``ft_iter<r>_target``, ``ft_iter<r>_sim``) and one decode of the corrected
model that keeps no model. The rule's settings key no stage: a rerun with
another rule or more rounds computes only the rounds that are new. The target
rounds' fine-tunes stay on disk for that reason (the system's model is the
chosen round's ``theta + lambda * tau``, ``selfspeech arith apply``); the sim
rounds' are freed once decoded.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

from selfspeech.adapt import prepare as P
from selfspeech.adapt.stages import Stage, StageRunner
from selfspeech.adapt.student import Output, Student, corrected_decode_stage, decode_stage, finetune_stage, produce
from selfspeech.data.manifest import read_manifest
from selfspeech.eval.report import read_jsonl


class Part(NamedTuple):
    """What one loop relabels: ``audio`` is ``fit`` and ``stop`` together (early stopping by speaker)."""

    tag: str     # "target" or "sim": names the loop's stages
    audio: str
    fit: str
    stop: str


class Round(NamedTuple):
    r: int
    theta: Output | None   # FT(theta0, labels_r); None in round 0
    hyps: Output           # theta_r + lambda * tau decoded on the part's audio: the labels of round r + 1
    labels: dict           # counts of round r's labels (kept, failed, flagged, per flag); {} in round 0


def p2r_iter(S: StageRunner, st: Student, parts: dict, ps: dict, p2r: Output, tau: Output, choice: dict,
             evalm: str) -> tuple[str, dict]:
    """Hypotheses of the iterated corrected student on ``evalm``, and its rounds, curves and label counts."""
    spec, lam, scope = st.recipe.iterative, choice["lambda"], choice["scope"]
    res: dict = {"rule": choice["rule"], "lambda": lam, "scope": scope, "stop": spec.stop,
                 "max_rounds": spec.max_rounds}
    limit = spec.max_rounds
    if spec.stop == "source_sim":
        sim, res["sim_reason"] = _sim_rounds(S, st, parts, ps, tau, lam, scope)
        res["curve_source_sim_iter"] = curve = {x.r: _wer(parts["source_sim"], x.hyps.path, st) for x in sim}
        res["sim_labels"] = {x.r: x.labels for x in sim[1:]}
        limit = min(curve, key=lambda r: (curve[r], r))  # ties to fewer rounds
    target = Part("target", parts["target_adapt"], parts["target_adapt_fit"], parts["target_adapt_stop"])
    # round 0 on the target: model_p2r's labels (the p2r system's own decode when it decodes this part)
    hyps0 = decode_stage(st, "p2r" if evalm == target.audio else "iter0_target", p2r, target.audio)
    converged = partial(_converged, st, spec.min_change) if spec.stop == "agreement" else None
    rounds, reason = run_rounds(S, st, target, Output(hyps0.name, S(hyps0)), tau, lam, scope, limit, converged)
    res["curve_agreement"] = {x.r: changed_share(prev.hyps.path, x.hyps.path, st.recipe.normalizer)
                              for prev, x in pairwise(rounds)}
    res["labels"] = {x.r: x.labels for x in rounds[1:]}
    res |= {"rounds": rounds[-1].r, "reason": reason if spec.stop == "agreement" or reason == "no_labels"
            else "lowest_sim_wer"}
    last = rounds[-1]
    if last.r == 0:
        return S(decode_stage(st, "p2r", p2r, evalm)), res
    res["theta"] = last.theta.stage  # the model is theta + lambda * tau (`selfspeech arith apply`)
    if evalm == target.audio:  # an unlabelled target: the last round's decode is the system's
        return last.hyps.path, res
    return S(corrected_decode_stage(st, "p2r_iter", last.theta, tau, lam, scope, evalm)), res


def _sim_rounds(S: StageRunner, st: Student, parts: dict, ps: dict, tau: Output, lam: float,
                scope: str) -> tuple[list[Round], str]:
    """The same loop on the sim speakers, from the rehearsal student corrected with the chosen lambda."""
    theta_simp = produce(S, finetune_stage(st, "sim_pseudo", ps["source_sim_fit"]["path"],
                                           ps["source_sim_stop"]["path"]))
    # the lambda sweep's own stage when the source_sim lambda rule ran it (same name and config)
    tag = "sim" if scope == "all" else f"sim_{scope}"
    h0 = corrected_decode_stage(st, f"{tag}_l{lam:g}", theta_simp, tau, lam, scope, parts["source_sim"])
    sim = Part("sim", parts["source_sim"], parts["source_sim_fit"], parts["source_sim_stop"])
    return run_rounds(S, st, sim, Output(h0.name, S(h0)), tau, lam, scope, st.recipe.iterative.max_rounds, None,
                      free_fits=True)


def run_rounds(S: StageRunner, st: Student, part: Part, hyps0: Output, tau: Output, lam: float, scope: str,
               max_rounds: int, converged=None, free_fits: bool = False) -> tuple[list[Round], str]:
    """Rounds 0..n of relabel, fine-tune, correct and decode on ``part``; with why they stopped.

    ``converged(prev_hyps, hyps)`` ends the loop after the round it is true of; a round left
    without a non-empty label in its fit or stop speakers ends it before that round (``no_labels``).
    ``free_fits``: a round's fine-tune is freed once its decode exists.
    """
    drop = st.recipe.iterative.drop_flagged
    rounds = [Round(0, None, hyps0, {})]
    for r in range(1, max_rounds + 1):
        prev = rounds[-1].hyps
        name = f"iter{r}_{part.tag}_labels"
        lab = S(Stage(name, partial(relabel, part.fit, part.stop, prev.path, drop),
                      {"drop_flagged": drop, "fit": part.fit, "stop": part.stop}, (prev.stage,)))
        if not lab["fit"]["with_text"] or not lab["stop"]["with_text"]:  # the fine-tune skips empty texts
            S.log(f"  {part.tag} round {r}: no usable label in the fit or stop speakers ({_counts(lab)}); "
                  f"stopping after round {r - 1}")
            return rounds, "no_labels"
        theta = produce(S, finetune_stage(st, f"iter{r}_{part.tag}", lab["fit"]["path"], lab["stop"]["path"],
                                          inputs=(name,)))
        dec = corrected_decode_stage(st, f"iter{r}_{part.tag}", theta, tau, lam, scope, part.audio)
        dec = dataclasses.replace(dec, frees=(theta.stage,) if free_fits else ())
        rounds.append(Round(r, theta, Output(dec.name, S(dec)), _counts(lab)))
        if converged is not None and converged(prev.path, rounds[-1].hyps.path):
            return rounds, "agreement"
    return rounds, "max_rounds"


def relabel(fit: str, stop: str, hyps_path: str, drop_flagged: bool, d: Path) -> dict:
    """The fit and stop manifests with ``text`` replaced by the model's hypotheses; counts per part.

    Failed decodes are always dropped; flagged ones (the teacher's filters on the text) too when
    ``drop_flagged``. The references' own texts are never read.
    """
    labels = {h["id"]: {"text": h.get("text", ""), "status": h.get("status", "ok"),
                        "flags": h.get("flags") or text_flags(h.get("text", ""))} for h in read_jsonl(hyps_path)}
    res = {}
    for name, ref in (("fit", fit), ("stop", stop)):
        ids = {it["id"] for it in read_manifest(ref)}
        flags = Counter(f for i in ids if labels.get(i, {}).get("status") == "ok" for f in labels[i]["flags"])
        res[name] = {"path": str(d / f"{name}.jsonl"),
                     **P.pseudo_manifest(ref, labels, d / f"{name}.jsonl", drop_flagged), "flags": dict(flags)}
        res[name]["with_text"] = sum(bool(it["text"].strip()) for it in read_manifest(d / f"{name}.jsonl"))
    return res


def text_flags(text: str) -> list[str]:
    """The teacher's label-free filters that a hypothesis' text alone can fail (empty, repetition)."""
    from selfspeech.label.filters import flags_for
    from selfspeech.label.teacher import compression_ratio

    return flags_for(text, 0.0, compression_ratio(text), 0.0)


def _counts(lab: dict) -> dict:
    return {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in lab.items()}


def changed_share(prev_path: str, cur_path: str, normalizer: str) -> float:
    """Word edits from one round's labels to the next, over the first one's words (utterances that
    decoded in both rounds)."""
    from selfspeech.eval.wer import ErrorCounts, count_errors_batch
    from selfspeech.text.normalize import get_normalizer

    norm = get_normalizer(normalizer)
    prev, cur = ({h["id"]: h for h in read_jsonl(p) if h.get("status", "ok") == "ok"} for p in (prev_path, cur_path))
    ids = [i for i in prev if i in cur]
    counts = count_errors_batch([norm(prev[i]["text"]) for i in ids], [norm(cur[i]["text"]) for i in ids])
    return ErrorCounts.from_array(counts).wer if ids else 0.0


def _converged(st: Student, min_change: float, prev_path: str, cur_path: str) -> bool:
    return changed_share(prev_path, cur_path, st.recipe.normalizer) < min_change


def _wer(ref: str, hyps: str, st: Student) -> float:
    from selfspeech.adapt.pseudo2real import wer_of  # the pipeline's scorer (imported late: it imports us)

    return wer_of(ref, hyps, st.recipe.normalizer)


_REASONS = {"agreement": "agreement between rounds", "max_rounds": "the round limit",
            "no_labels": "a round without usable labels",
            "lowest_sim_wer": "the lowest WER of the same rounds on the held-out source speakers"}


def report_line(label: str, v: dict) -> str:
    """One line of the report: the rounds run, why they stopped, the rule's curve and the labels kept."""
    def pct(x: float) -> str:
        return f"{x * 100:.1f}%"

    parts = [(f"- {label}: {v['rounds']} round(s) of relabelling{' (Pseudo2Real itself)' * (v['rounds'] == 0)}, "
              f"stopped by {_REASONS.get(v['reason'], v['reason'])} (rule `{v['stop']}`, at most {v['max_rounds']}); "
              f"lambda = {v['lambda']:g}, tau scope `{v['scope']}`")]
    if v.get("curve_agreement"):
        parts.append("words changed from each round's labels: "
                     + ", ".join(f"round {r}: {pct(c)}" for r, c in v["curve_agreement"].items()))
    if v.get("curve_source_sim_iter"):
        parts.append("WER of the same rounds on the held-out source speakers: "
                     + ", ".join(f"round {r}: {pct(w)}" for r, w in v["curve_source_sim_iter"].items()))
    if v.get("labels"):
        parts.append("labels kept (fit/stop): " + ", ".join(
            f"round {r}: {c['fit']['kept']}/{c['stop']['kept']}" for r, c in v["labels"].items()))
    return "; ".join(parts) + "."
