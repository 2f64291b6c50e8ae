"""The Pseudo2Real pipeline (Lin et al. 2025, arXiv 2510.08047) as cached stages.

    theta_sr = FT(theta0, source real)        theta_sp = FT(theta0, source pseudo)
    tau      = theta_sr - theta_sp             (eq. 3: the teacher's systematic error; with
                                                student.tau_seeds, the mean over fine-tuning seeds)
    theta_tp = FT(theta0, target pseudo)
    p2r      = theta_tp + lambda * tau         (eq. 4)
    p2r_sc   = theta_tp + lambda * tau_c(u)    (sec. 3.3: tau per speaker cluster)
    p2r_sc_error                               (the same, clusters by the teacher's error rate, adapt.sc)
    p2r_groups = theta_tp + sum_g lambda_g * tau_g  (one lambda per module group, adapt.lambda_groups)

lambda is chosen without target transcripts (``LambdaSpec.rule``): the
``source_sim`` rule fine-tunes theta0 on pseudo-labels of held-out source
speakers (exactly as the target student is made) and picks the lambda whose
``theta_simp + lambda * tau`` has the lowest WER on those speakers' real
labels. The sweep on target labels is reported as an oracle only.

Each line above is a declared stage (:mod:`selfspeech.adapt.student`) run by a
:class:`~selfspeech.adapt.stages.StageRunner` into the run folder: cached by its
config slice and its inputs, resumed in place after a kill. What stays on disk
is what later stages read: a sweep decodes each ``theta + lambda * tau`` without
keeping it, the fine-tunes that only feed a tau (theta_sp, and both models of
every tau_c and of every extra tau seed) are freed once it exists, and
``model_p2r`` stays for export.
``run_pseudo2real`` then scores every system and writes ``report.md``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Callable

from selfspeech.adapt import prepare as P
from selfspeech.adapt import variants as V
from selfspeech.adapt.recipe import Recipe, RecipeError, check_recipe  # noqa: F401 (re-exported)
from selfspeech.adapt.stages import MARKER, Stage, StageRunner, folder_bytes
from selfspeech.adapt.student import (Output, Student, corrected_decode_stage, corrected_model_stage, decode_stage,
                                      finetune_stage, mean_tau_stage, produce, tau_stage)
from selfspeech.config import omit_defaults
from selfspeech.data.atomic import write_json
from selfspeech.data.manifest import read_manifest
from selfspeech.eval.report import build_results, read_jsonl


def _ft_config(recipe: Recipe):
    return recipe.student.finetune  # typed by the recipe, with the recipe's normaliser


def wer_of(ref_path: str, hyp_path: str, normalizer: str) -> float:
    res = build_results(list(read_manifest(ref_path)), read_jsonl(hyp_path), normalizer=normalizer, n_resamples=200)
    return res["system"]["groups"][0]["wer"]


def run_pseudo2real(recipe: Recipe, out: str | Path, log: Callable[[str], None] = print, progress: bool = True,
                    title: str | None = None, keep_all: bool = False) -> dict:
    """Run (or resume) every stage into ``out``, score every system and write ``out/report.md``.

    Returns each system's hypothesis file (``hyps``), the lambda choice and its
    curves, the clusters, per-stage wall times and cache hits, data and label
    counts, ``scores``, ``disk`` (bytes of the run folder, per stage) and
    ``report`` (the path of report.md). ``keep_all`` keeps the models nothing
    reads any more (the fine-tunes behind each tau), which are deleted otherwise.
    """
    from selfspeech.adapt.report import score_systems, write_report

    check_recipe(recipe)
    out = Path(out)
    _drop_superseded(out, log)
    S = StageRunner(out, log, keep_all=keep_all)
    result = run_stages(recipe, S, progress)
    # an unlabelled target has no WER: the systems are compared with the teacher's labels instead
    refs = out / "data" / "target_eval.jsonl" if result["target_labelled"] else out / "pseudo" / "teacher_adapt.jsonl"
    result["scores"] = score_systems(str(refs), result["hyps"], recipe.normalizer, recipe.data.seed)
    result["disk"] = {"total": folder_bytes(out), "stages": {n: folder_bytes(out / n) for n in S.times}}
    result["report"] = str(write_report(out, result, result["scores"], title or f"Pseudo2Real: {recipe.name}"))
    write_json(out / "pipeline.json", result, default=str)
    return result


def run_stages(recipe: Recipe, S: StageRunner, progress: bool = True) -> dict:
    """Every stage of the module docstring, in order; returns hypotheses, choices and counts."""
    from selfspeech.models.zoo import resolve_model

    st = Student(recipe, str(resolve_model(recipe.student.init).hf_dir), _ft_config(recipe), progress)
    parts = S(Stage("data", partial(P.make_parts, recipe), {"data": _data_key(recipe)}))
    # int8 labels of a CPU and float16 labels of a GPU differ: the resolved type keys the stage
    lab = S(Stage("label", partial(_label, recipe, parts["all"], progress),
                  _label_key(recipe), ("data",)))
    info = parts.get("info", {"target_labelled": True, "target_speakers": "field"})
    labelled = info["target_labelled"]
    ps = S(Stage("pseudo", partial(_pseudo, recipe, parts, lab["labels"]),
                 {"drop_flagged": recipe.teacher.drop_flagged, "paired_real": True}
                 | ({} if labelled else {"labelled": False}), ("label",)))
    theta_sr = produce(S, finetune_stage(st, "source_real", ps["source_train_real"]["path"], parts["source_dev"]))
    theta_sp = produce(S, finetune_stage(st, "source_pseudo", ps["source_train"]["path"], ps["source_dev"]["path"]))
    theta_tp = produce(S, finetune_stage(st, "target_pseudo", ps["target_adapt_fit"]["path"],
                                         ps["target_adapt_stop"]["path"]))
    tau = source_tau(S, st, parts, ps, theta_sr, theta_sp)
    choice = choose_lambda(S, st, parts, ps, tau)
    hyps = {"teacher": ps["teacher_eval"]["path"]} if labelled else {}  # unlabelled: the teacher is the reference
    hyps.update(decode_systems(S, st, parts, ps, theta_sr, theta_tp, tau, choice, labelled))
    clusters: dict = {}
    if recipe.clusters.enabled and {"p2r_sc", "p2r_sc_random", "p2r_sc_error"} & set(recipe.systems):
        from selfspeech.adapt.sc import run_sc

        sc_hyps, clusters = run_sc(S, st, parts, ps, theta_tp, choice["lambda"], choice["scope"],
                                   "target_eval" if labelled else "target_adapt", lab["labels"])
        hyps.update(sc_hyps)
    return {"hyps": hyps, "lambda": choice, "clusters": clusters, "times": S.times, "cached": S.cached,
            "target_labelled": labelled, "target_speakers": info["target_speakers"],
            "label_stats": lab["stats"], "pseudo_counts": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                                                            for k, v in ps.items()},
            "parts": json.loads((S.root / "data" / "parts.json").read_text())}


def source_tau(S: StageRunner, st: Student, parts: dict, ps: dict, theta_sr: Output, theta_sp: Output) -> Output:
    """``tau`` = theta_sr - theta_sp; with ``student.tau_seeds``, ``tau_mean``: the mean of ``tau`` and of each
    extra seed's ``tau_s<seed>`` (its own two fine-tunes, ``ft_source_real_s<seed>`` and
    ``ft_source_pseudo_s<seed>``). ``tau`` keeps its stage and key, so a run adding seeds reuses it."""
    tau = produce(S, tau_stage("tau", theta_sr, theta_sp, frees=(theta_sp.stage,)))  # theta_sp: read by tau only
    seeds = st.recipe.student.tau_seeds
    if not seeds:
        return tau
    taus = [tau]
    for seed in seeds:
        ss = dataclasses.replace(st, ft=dataclasses.replace(st.ft, seed=seed))
        real = produce(S, finetune_stage(ss, f"source_real_s{seed}", ps["source_train_real"]["path"],
                                         parts["source_dev"]))
        pseudo = produce(S, finetune_stage(ss, f"source_pseudo_s{seed}", ps["source_train"]["path"],
                                           ps["source_dev"]["path"]))
        # both read by this tau only (theta_sr of the recipe's seed is the one decoded and exported)
        taus.append(produce(S, tau_stage(f"tau_s{seed}", real, pseudo, frees=(real.stage, pseudo.stage))))
    return produce(S, mean_tau_stage("tau_mean", tuple(taus), {"seeds": [st.ft.seed, *seeds]}))


def _data_key(recipe: Recipe) -> dict:
    """The data section that keys the data stage; the two-manifest keys and the target-speaker rule are
    left out at their defaults (data stages cached before those keys existed stay valid)."""
    return omit_defaults(recipe.to_dict()["data"],
                         {"source_manifest": None, "target_manifest": None, "target_speakers": "auto"})


def _label_key(recipe: Recipe) -> dict:
    """What keys the label stage: the teacher section and the compute type it resolves to. English
    transcription, and int8 on a CPU, which label stages were made with before these keyed them, are left
    out (those stay valid)."""
    cpu_int8 = teacher_compute_type(recipe) == "cpu:int8"
    teacher = omit_defaults(recipe.to_dict()["teacher"],
                            {"language": "en", "task": "transcribe", **({"compute_type": "auto"} if cpu_int8 else {})})
    return {"teacher": teacher} if cpu_int8 else {"teacher": teacher, "compute_type": teacher_compute_type(recipe)}


def teacher_compute_type(recipe: Recipe) -> str:
    """The type the teacher decodes in on the recipe's device (``auto`` resolved)."""
    from selfspeech.accel import resolve_device
    from selfspeech.label.teacher import resolve_compute_type

    device = resolve_device(recipe.device)
    return f"{device.type}:{resolve_compute_type(recipe.teacher.compute_type, device)}"


def _label(recipe: Recipe, manifest: str, progress: bool, d: Path) -> dict:
    """The teacher's pseudo-label of every utterance of every part (resumable)."""
    import torch

    from selfspeech.label.run import label_manifest
    from selfspeech.label.teacher import DecodeOptions, load_teacher

    t = load_teacher(recipe.teacher.name, "faster-whisper", cpu_threads=torch.get_num_threads(),
                     options=DecodeOptions(max_new_tokens=recipe.teacher.max_new_tokens,
                                           window_s=recipe.teacher.window_s, language=recipe.teacher.language,
                                           task=recipe.teacher.task),
                     device=recipe.device, compute_type=recipe.teacher.compute_type)
    st = label_manifest(manifest, d / "labels.jsonl", t, recipe.teacher.name, recipe.teacher.batch_size,
                        progress=progress)
    return {"labels": str(d / "labels.jsonl"), "stats": st.as_dict()}


def _pseudo(recipe: Recipe, parts: dict, labels_path: str, d: Path) -> dict:
    """Pseudo-labelled copies of the parts the students train on, and the teacher's eval hypotheses."""
    labels = {r["id"]: r for r in read_jsonl(labels_path)}
    res = {}
    for name in ("source_train", "source_dev", "source_sim_fit", "source_sim_stop", "target_adapt_fit",
                 "target_adapt_stop"):
        res[name] = {"path": str(d / f"{name}.jsonl"),
                     **P.pseudo_manifest(parts[name], labels, d / f"{name}.jsonl", recipe.teacher.drop_flagged)}
    empty = [n for n, r in res.items() if r["kept"] == 0]
    if empty:
        raise RecipeError(f"teacher {recipe.teacher.name!r} left no usable pseudo-label in {', '.join(empty)} "
                          f"(counts: {res}); check the teacher, or set teacher.drop_flagged: false")
    # tau must differ only in the labels, not in the audio: the real-label run uses exactly
    # the utterances whose pseudo-label survived (Pseudo2Real eq. 3 pairs the same audio).
    kept = {i["id"] for i in read_manifest(res["source_train"]["path"])}
    res["source_train_real"] = {"path": P.subset(parts["source_train"], kept, d / "source_train_real.jsonl"),
                                "kept": len(kept)}
    P.subset(labels_path, {i["id"] for i in read_manifest(parts["target_eval"])}, d / "teacher_eval.jsonl")
    res["teacher_eval"] = {"path": str(d / "teacher_eval.jsonl")}
    # every usable teacher label of the target: the reference of the agreement figures when it has no transcripts
    res["teacher_adapt"] = {"path": str(d / "teacher_adapt.jsonl"),
                            **P.pseudo_manifest(parts["target_adapt"], labels, d / "teacher_adapt.jsonl", False)}
    return res


def _curve_key(kind: str, scope: str) -> str:
    return f"curve_{kind}" if scope == "all" else f"curve_{kind}_{scope}"


def sweep(S: StageRunner, st: Student, tag: str, base: Output, tau: Output, scope: str, manifest: str) -> dict:
    """WER on ``manifest`` of theta_base + lambda * tau[scope] for each lambda of the grid (models not kept)."""
    tag = tag if scope == "all" else f"{tag}_{scope}"
    curve = {}
    for lam in (float(x) for x in st.recipe.lam.grid):
        h = S(corrected_decode_stage(st, f"{tag}_l{lam:g}", base, tau, lam, scope, manifest))
        curve[lam] = wer_of(manifest, h, st.recipe.normalizer)
        S.log(f"  {tag} lambda={lam:g}: WER {curve[lam]:.4f}")
    return curve


def choose_lambda(S: StageRunner, st: Student, parts: dict, ps: dict, tau: Output) -> dict:
    """(lambda, tau scope) by the recipe's rule, without target transcripts; with the curves it read."""
    lam_spec = st.recipe.lam
    scopes = list(lam_spec.scopes)
    choice: dict = {"rule": lam_spec.rule, "scopes": scopes}
    if lam_spec.rule == "fixed":
        return choice | {"lambda": float(lam_spec.fixed), "scope": scopes[0]}
    # source_sim: the target's situation rehearsed on held-out source speakers
    theta_simp = produce(S, finetune_stage(st, "sim_pseudo", ps["source_sim_fit"]["path"],
                                           ps["source_sim_stop"]["path"]))
    return choice | rehearse(S, st, parts, tau, theta_simp, "sim", "source_sim")


def rehearse(S: StageRunner, st: Student, parts: dict, tau: Output, theta_sim: Output, tag: str, kind: str) -> dict:
    """(lambda, tau scope) with the lowest WER of ``theta_sim + lambda * tau[scope]`` on the sim speakers' real
    labels, and the curves it read (``curve_<kind>[_<scope>]``); ties go to the smaller correction, then the
    first scope."""
    res, cand = {}, []
    for i, sc in enumerate(st.recipe.lam.scopes):
        curve = res[_curve_key(kind, sc)] = sweep(S, st, tag, theta_sim, tau, sc, parts["source_sim"])
        cand += [(w, abs(lam), i, lam, sc) for lam, w in curve.items()]
    _, _, _, lam, scope = min(cand)
    return res | {"lambda": lam, "scope": scope}


def decode_systems(S: StageRunner, st: Student, parts: dict, ps: dict, theta_sr: Output, theta_tp: Output,
                   tau: Output, choice: dict, labelled: bool = True) -> dict[str, str]:
    """Hypotheses on the target-eval speakers of Pseudo2Real and the recipe's baselines (and oracle curves);
    on the (unlabelled) target-adapt speakers when the target has no transcripts, without the oracles."""
    r, evalm = st.recipe, parts["target_eval"] if labelled else parts["target_adapt"]
    systems, hyps = set(r.systems) - (set() if labelled else {"oracle"}), {}
    if "zero_shot" in systems:  # un-fine-tuned Whisper decoded the standard way (30-s padded input)
        hyps["zero_shot"] = S(decode_stage(st, "zero_shot", Output("data", st.init), evalm, trim=False))
    hyps["pseudo_ft"] = S(decode_stage(st, "pseudo_ft", theta_tp, evalm))
    # eq. 4; kept on disk: the model a user exports (`selfspeech export`)
    p2r = produce(S, corrected_model_stage("model_p2r", theta_tp, tau, choice["lambda"], choice["scope"]))
    hyps["p2r"] = S(decode_stage(st, "p2r", p2r, evalm))
    if "p2r_iter" in systems:  # the corrected student relabels the target, round by round
        from selfspeech.adapt.iterative import p2r_iter

        hyps["p2r_iter"], choice.setdefault("variants", {})["p2r_iter"] = p2r_iter(S, st, parts, ps, p2r, tau,
                                                                                   choice, evalm)
    if "source_real_ft" in systems:
        hyps["source_real_ft"] = S(decode_stage(st, "source_real_ft", theta_sr, evalm))
    if "source_real_plus_target_pseudo" in systems:
        hyps["source_real_plus_target_pseudo"] = S(decode_stage(st, "union", V.union_student(S, st, parts, ps),
                                                                evalm))
    if "p2r_groups" in systems:  # one lambda per module group, searched on the sim speakers
        from selfspeech.adapt.lambda_groups import p2r_groups

        hyps["p2r_groups"], choice["groups"] = p2r_groups(S, st, parts, ps, theta_tp, tau, choice, evalm)
    hyps.update(variant_systems(S, st, parts, ps, tau, evalm, systems, choice))
    if "oracle" in systems:  # measurement only: real target labels
        oracle = produce(S, finetune_stage(st, "oracle", parts["target_adapt_fit"], parts["target_adapt_stop"],
                                           inputs=("data",)))
        hyps["oracle"] = S(decode_stage(st, "oracle", oracle, evalm))
    if r.lam.oracle_sweep and labelled:
        for sc in r.lam.scopes:
            choice[_curve_key("target_oracle", sc)] = sweep(S, st, "target_oracle", theta_tp, tau, sc, evalm)
    return hyps


def variant_systems(S: StageRunner, st: Student, parts: dict, ps: dict, tau: Output, evalm: str, systems: set,
                    choice: dict) -> dict[str, str]:
    """The correction on the union student and the public code's protocol (:mod:`selfspeech.adapt.variants`);
    their lambda choices go into ``choice["variants"]``."""
    hyps: dict[str, str] = {}
    rule = partial(rehearse, S, st, parts)
    if "p2r_union" in systems:
        hyps["p2r_union"], choice.setdefault("variants", {})["p2r_union"] = V.p2r_union(
            S, st, parts, ps, tau, evalm, rule)
    if {"pseudo_ft_mixed", "p2r_mixed"} & systems:
        mixed_hyps, choice.setdefault("variants", {})["p2r_mixed"] = V.p2r_mixed(
            S, st, parts, ps, evalm, systems, rule)
        hyps.update(mixed_hyps)
    return hyps


# Stage folders of an earlier layout that kept one model per lambda of a sweep (and per speaker
# cluster); sweeps now decode theta + lambda * tau without keeping it, so nothing reads these.
_SUPERSEDED = ("model_sim_*", "model_target_oracle_*", "model_sc_*")


def _drop_superseded(out: Path, log: Callable[[str], None]) -> None:
    for pattern in _SUPERSEDED:
        for d in sorted(out.glob(pattern)):
            if (d / MARKER).is_file():
                size = folder_bytes(d)
                shutil.rmtree(d)
                log(f"[removed] {d.name}: a per-lambda model no stage reads ({size / 1e6:.0f} MB)")
