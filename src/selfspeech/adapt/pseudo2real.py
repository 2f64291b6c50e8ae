"""The Pseudo2Real pipeline (Lin et al. 2025, arXiv 2510.08047) as cached stages.

    theta_sr = FT(theta0, source real)        theta_sp = FT(theta0, source pseudo)
    tau      = theta_sr - theta_sp             (eq. 3: the teacher's systematic error)
    theta_tp = FT(theta0, target pseudo)
    p2r      = theta_tp + lambda * tau         (eq. 4)
    p2r_sc   = theta_tp + lambda * tau_c(u)    (sec. 3.3: tau per speaker cluster)

lambda is chosen without target transcripts (``LambdaSpec.rule``): the
``source_sim`` rule fine-tunes theta0 on pseudo-labels of held-out source
speakers (exactly as the target student is made) and picks the lambda whose
``theta_simp + lambda * tau`` has the lowest WER on those speakers' real
labels. The sweep on target labels is reported as an oracle only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from selfspeech.adapt import prepare as P
from selfspeech.adapt.recipe import Recipe, RecipeError, check_recipe  # noqa: F401 (re-exported)
from selfspeech.adapt.stages import StageRunner
from selfspeech.arith.task_vector import TaskVector, apply_to_dir, diff_dirs
from selfspeech.data.manifest import read_manifest
from selfspeech.eval.report import build_results, read_jsonl


def _ft_config(recipe: Recipe):
    return recipe.student.finetune  # typed by the recipe, with the recipe's normaliser


def wer_of(ref_path: str, hyp_path: str, normalizer: str) -> float:
    res = build_results(list(read_manifest(ref_path)), read_jsonl(hyp_path), normalizer=normalizer, n_resamples=200)
    return res["system"]["groups"][0]["wer"]


def run_pseudo2real(recipe: Recipe, out: str | Path, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run (or resume) every stage into ``out``; returns a dict of hypothesis files and choices."""
    from selfspeech.models.zoo import resolve_model
    from selfspeech.label.transcribe import transcribe_whisper as transcribe_dir
    from selfspeech.train.whisper_ft import finetune

    check_recipe(recipe)
    out = Path(out)
    S = StageRunner(out, log)
    ft_cfg = _ft_config(recipe)
    init = str(resolve_model(recipe.student.init).hf_dir)
    norm = recipe.normalizer
    systems = set(recipe.systems)

    parts = S.run("data", {"data": recipe.to_dict()["data"]}, lambda d: P.make_parts(recipe, d))

    def label(d: Path) -> dict:
        from selfspeech.label.run import label_manifest
        from selfspeech.label.teacher import DecodeOptions, load_teacher

        import torch

        t = load_teacher(recipe.teacher.name, "faster-whisper", cpu_threads=torch.get_num_threads(),
                         options=DecodeOptions(max_new_tokens=recipe.teacher.max_new_tokens,
                                             window_s=recipe.teacher.window_s))
        st = label_manifest(parts["all"], d / "labels.jsonl", t, recipe.teacher.name, recipe.teacher.batch_size,
                            progress=progress)
        return {"labels": str(d / "labels.jsonl"), "stats": st.as_dict()}

    lab = S.run("label", {"teacher": recipe.to_dict()["teacher"]}, label, deps=("data",))

    def pseudo(d: Path) -> dict:
        labels = {r["id"]: r for r in read_jsonl(lab["labels"])}
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
        P.subset(lab["labels"], {i["id"] for i in read_manifest(parts["target_eval"])}, d / "teacher_eval.jsonl")
        res["teacher_eval"] = {"path": str(d / "teacher_eval.jsonl")}
        return res

    ps = S.run("pseudo", {"drop_flagged": recipe.teacher.drop_flagged, "paired_real": True}, pseudo, deps=("label",))

    def ft(name: str, train: str, dev: str, deps=("pseudo",)) -> str:
        return S.run(f"ft_{name}", {"init": init, "ft": ft_cfg.to_dict(), "train": train, "dev": dev},
                     lambda d: str(finetune(train, dev, init, d, ft_cfg, progress=progress)), deps=deps)

    def decode(name: str, model_dir: str, manifest: str, deps: tuple, trim: bool | None = None) -> str:
        return S.run(f"decode_{name}", {"model": model_dir, "manifest": manifest, "trim": trim},
                     lambda d: str(transcribe_dir(model_dir, manifest, d / "hyp.jsonl", trim_input=trim,
                                                  batch_size=recipe.student.decode_batch_size,
                                                  max_new_tokens=recipe.student.max_new_tokens)), deps=deps)

    hyps: dict[str, str] = {"teacher": ps["teacher_eval"]["path"]}
    evalm = parts["target_eval"]
    sr = ft("source_real", ps["source_train_real"]["path"], parts["source_dev"])
    sp = ft("source_pseudo", ps["source_train"]["path"], ps["source_dev"]["path"])
    tp = ft("target_pseudo", ps["target_adapt_fit"]["path"], ps["target_adapt_stop"]["path"])
    tau_path = S.run("tau", {}, lambda d: str(diff_dirs(sr, sp).save(d / "tau.safetensors")),
                     deps=("ft_source_real", "ft_source_pseudo"))
    tau = TaskVector.load(tau_path)

    # ---- lambda (and tau's scope) without target labels
    grid = [float(x) for x in recipe.lam.grid]
    scopes = list(recipe.lam.scopes)

    def sweep(tag: str, base: str, manifest: str, base_dep: str, scope: str) -> dict:
        # stage names of the "all" scope carry no suffix (caches of earlier runs stay valid)
        tag = tag if scope == "all" else f"{tag}_{scope}"
        tau_s, res = tau.scope(scope), {}
        for lam in grid:
            cfg = {"lambda": lam, "base": base} | ({} if scope == "all" else {"scope": scope})
            mdir = S.run(f"model_{tag}_l{lam:g}", cfg,
                         lambda d, lam=lam: str(apply_to_dir(base, tau_s, lam, d / "model")), deps=(base_dep, "tau"))
            h = decode(f"{tag}_l{lam:g}", mdir, manifest, (f"model_{tag}_l{lam:g}",))
            res[lam] = wer_of(manifest, h, norm)
            log(f"  {tag} lambda={lam:g}: WER {res[lam]:.4f}")
        return res

    def curve_key(kind: str, scope: str) -> str:
        return f"curve_{kind}" if scope == "all" else f"curve_{kind}_{scope}"

    choice: dict = {"rule": recipe.lam.rule, "scopes": scopes}
    if recipe.lam.rule == "fixed":
        lam, scope = float(recipe.lam.fixed), scopes[0]
    else:
        simp = ft("sim_pseudo", ps["source_sim_fit"]["path"], ps["source_sim_stop"]["path"])
        cand = []
        for sc in scopes:
            curve = choice[curve_key("source_sim", sc)] = sweep("sim", simp, parts["source_sim"], "ft_sim_pseudo", sc)
            cand += [(w, abs(lam_), scopes.index(sc), lam_, sc) for lam_, w in curve.items()]
        # lowest held-out source WER; ties: the smaller correction, then the scope listed first
        _, _, _, lam, scope = min(cand)
    choice["lambda"], choice["scope"] = lam, scope
    p2r_tau = tau.scope(scope)

    if "zero_shot" in systems:  # un-fine-tuned Whisper decoded the standard way (30-s padded input)
        hyps["zero_shot"] = decode("zero_shot", init, evalm, ("data",), trim=False)
    hyps["pseudo_ft"] = decode("pseudo_ft", tp, evalm, ("ft_target_pseudo",))
    p2r_cfg = {"lambda": lam} | ({} if scope == "all" else {"scope": scope})
    p2r_dir = S.run("model_p2r", p2r_cfg, lambda d: str(apply_to_dir(tp, p2r_tau, lam, d / "model")),
                    deps=("ft_target_pseudo", "tau"))
    hyps["p2r"] = decode("p2r", p2r_dir, evalm, ("model_p2r",))
    if "source_real_ft" in systems:
        hyps["source_real_ft"] = decode("source_real_ft", sr, evalm, ("ft_source_real",))
    if "source_real_plus_target_pseudo" in systems:
        tr = P.concat([parts["source_train"], ps["target_adapt_fit"]["path"]], out / "pseudo" / "union_train.jsonl")
        dv = P.concat([parts["source_dev"], ps["target_adapt_stop"]["path"]], out / "pseudo" / "union_dev.jsonl")
        u = ft("source_real_plus_target_pseudo", tr, dv)
        hyps["source_real_plus_target_pseudo"] = decode("union", u, evalm, ("ft_source_real_plus_target_pseudo",))
    if "oracle" in systems:  # measurement only: real target labels
        o = ft("oracle", parts["target_adapt_fit"], parts["target_adapt_stop"], deps=("data",))
        hyps["oracle"] = decode("oracle", o, evalm, ("ft_oracle",))
    if recipe.lam.oracle_sweep:
        for sc in scopes:
            choice[curve_key("target_oracle", sc)] = sweep("target_oracle", tp, evalm, "ft_target_pseudo", sc)

    clusters_info = {}
    if recipe.clusters.enabled and ({"p2r_sc", "p2r_sc_random"} & systems):
        from selfspeech.adapt.sc import run_sc

        sc_hyps, clusters_info = run_sc(recipe, S, parts, ps, tp, lam, scope, ft, decode, progress)
        hyps.update(sc_hyps)
    result = {"hyps": hyps, "lambda": choice, "clusters": clusters_info, "times": S.times, "cached": S.cached,
              "label_stats": lab["stats"], "pseudo_counts": {k: {kk: vv for kk, vv in v.items() if kk != "path"}
                                                              for k, v in ps.items()},
              "parts": json.loads((out / "data" / "parts.json").read_text())}
    (out / "pipeline.json").write_text(json.dumps(result, indent=2, default=str))
    return result
