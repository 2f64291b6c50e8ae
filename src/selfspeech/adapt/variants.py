"""Pseudo2Real beside the strongest baseline with the same labels, and the public code's protocol.

Two systems extend the pipeline of :mod:`selfspeech.adapt.pseudo2real`; each
chooses its lambda (and tau scope) with the same label-free rule, rehearsed on
the held-out source speakers exactly as its target student is made:

- ``p2r_union``: the correction on the best student. The student fine-tuned on
  source real plus target pseudo labels (``source_real_plus_target_pseudo``)
  still carries the teacher's errors in its target half, so tau applies to it
  too: ``theta_union + lambda * tau``. Its rehearsal is
  ``FT(theta0, source-train real + sim pseudo)``, swept on the sim speakers' real labels.
- ``p2r_mixed`` (with its baseline ``pseudo_ft_mixed``): the protocol of the
  Pseudo2Real authors' public scripts. A source model is first fine-tuned on
  the source-train utterances with their real and their pseudo labels
  (``theta_mix``); theta_sr, theta_sp, the target student and the rehearsal
  student then continue from it at ``student.continue_lr_scale`` times the
  learning rate (their scripts' "_continue" runs at lr / 10), and tau is the
  difference of the continued pair. Starting every model from a source-adapted
  point keeps the continued fine-tunes short and close together, which is
  what task arithmetic needs (weights from one basin add linearly).

Stage names carry the variant (``ft_mixed_*``, ``decode_sim_union_*``), so a
run folder holds them beside the direct protocol's stages and a rerun
computes only what is new.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from selfspeech.adapt import prepare as P
from selfspeech.adapt.stages import StageRunner
from selfspeech.adapt.student import (Output, Student, corrected_model_stage, decode_stage, finetune_stage, produce,
                                      tau_stage)

VARIANT_SYSTEMS = ("p2r_union", "pseudo_ft_mixed", "p2r_mixed")


def union_student(S: StageRunner, st: Student, parts: dict, ps: dict) -> Output:
    """FT(theta0, source-train real + target-adapt pseudo): the strongest baseline with the same labels."""
    tr = P.concat([parts["source_train"], ps["target_adapt_fit"]["path"]], S.root / "pseudo" / "union_train.jsonl")
    dv = P.concat([parts["source_dev"], ps["target_adapt_stop"]["path"]], S.root / "pseudo" / "union_dev.jsonl")
    return produce(S, finetune_stage(st, "source_real_plus_target_pseudo", tr, dv))


def p2r_union(S: StageRunner, st: Student, parts: dict, ps: dict, tau: Output, evalm: str, rehearse) -> tuple:
    """Hypotheses of theta_union + lambda * tau on ``evalm``, and the (lambda, scope) choice with its curves.

    ``rehearse(tau, theta_sim, tag, kind)`` is the pipeline's lambda rule on the sim speakers
    (:func:`selfspeech.adapt.pseudo2real.rehearse`).
    """
    theta_u = union_student(S, st, parts, ps)
    tr = P.concat([parts["source_train"], ps["source_sim_fit"]["path"]], S.root / "pseudo" / "sim_union_train.jsonl")
    dv = P.concat([parts["source_dev"], ps["source_sim_stop"]["path"]], S.root / "pseudo" / "sim_union_dev.jsonl")
    choice = _choose(st, rehearse, tau, lambda: produce(S, finetune_stage(st, "sim_union", tr, dv)), "sim_union",
                     "source_sim_union")
    model = produce(S, corrected_model_stage("model_p2r_union", theta_u, tau, choice["lambda"], choice["scope"]))
    return S(decode_stage(st, "p2r_union", model, evalm)), choice


def p2r_mixed(S: StageRunner, st: Student, parts: dict, ps: dict, evalm: str, systems: set, rehearse) -> tuple:
    """The public code's protocol: hypotheses of ``pseudo_ft_mixed`` and ``p2r_mixed``, and the choice."""
    d = S.root / "pseudo"
    # one utterance twice, once per label: the pseudo copy's id is suffixed so ids stay unique
    tr = P.concat([ps["source_train_real"]["path"], ps["source_train"]["path"]], d / "mixed_train.jsonl",
                  id_suffixes=("", "~pseudo"))
    dv = P.concat([parts["source_dev"], ps["source_dev"]["path"]], d / "mixed_dev.jsonl", id_suffixes=("", "~pseudo"))
    theta_mix = produce(S, finetune_stage(st, "mixed", tr, dv))
    cont = continued(st, theta_mix)
    after = ("pseudo", theta_mix.stage)
    theta_sr = produce(S, finetune_stage(cont, "mixed_source_real", ps["source_train_real"]["path"],
                                         parts["source_dev"], inputs=after))
    theta_sp = produce(S, finetune_stage(cont, "mixed_source_pseudo", ps["source_train"]["path"],
                                         ps["source_dev"]["path"], inputs=after))
    theta_tp = produce(S, finetune_stage(cont, "mixed_target_pseudo", ps["target_adapt_fit"]["path"],
                                         ps["target_adapt_stop"]["path"], inputs=after))
    tau = produce(S, tau_stage("tau_mixed", theta_sr, theta_sp, frees=(theta_sp.stage,)))
    choice = _choose(st, rehearse, tau, lambda: produce(S, finetune_stage(
        cont, "mixed_sim_pseudo", ps["source_sim_fit"]["path"], ps["source_sim_stop"]["path"], inputs=after)),
        "sim_mixed", "source_sim_mixed")
    hyps = {}
    if "pseudo_ft_mixed" in systems:
        hyps["pseudo_ft_mixed"] = S(decode_stage(st, "pseudo_ft_mixed", theta_tp, evalm))
    if "p2r_mixed" in systems:
        model = produce(S, corrected_model_stage("model_p2r_mixed", theta_tp, tau, choice["lambda"], choice["scope"]))
        hyps["p2r_mixed"] = S(decode_stage(st, "p2r_mixed", model, evalm))
    return hyps, choice


def continued(st: Student, theta: Output) -> Student:
    """The student that continues from ``theta`` at ``student.continue_lr_scale`` times the learning rate."""
    ft = dataclasses.replace(st.ft, lr=st.ft.lr * st.recipe.student.continue_lr_scale)
    return dataclasses.replace(st, init=str(Path(theta.path)), ft=ft)


def _choose(st: Student, rehearse, tau: Output, make_sim, tag: str, kind: str) -> dict:
    """The recipe's lambda rule for one variant: a fixed lambda, or its own rehearsal on the sim speakers."""
    lam = st.recipe.lam
    if lam.rule == "fixed":
        return {"rule": "fixed", "lambda": float(lam.fixed), "scope": lam.scopes[0]}
    return {"rule": lam.rule, **rehearse(tau, make_sim(), tag, kind)}
