"""Pseudo2Real with LoRA students beside full fine-tuning, on speechocean762 (adults -> children).

Pseudo2Real (Lin et al. 2025, arXiv 2510.08047) with LoRA students (Hu et al. 2021):
every student is a LoRA adapter on tiny.en (rank 8 and 32, alpha = 2 * rank, lr 1e-3
as peft's Whisper examples; the recipe's batches, epochs and early stopping), tau is
taken between the students' merged deltas, lambda and tau's scope are chosen by the
recipe's source_sim rule, and the corrected target student is decoded on the
target-eval speakers. The full fine-tuning systems are read from the cached run of
``recipes/speechocean762/pseudo2real.yaml`` (``--full-run``): its data split,
teacher labels, students, tau and lambda are reused as they are, nothing is
recomputed there. Each tau is also stored in low rank (truncated SVD per matrix at
``--energy``) and Pseudo2Real redone with it, for its size and its WER cost.

Writes ``benchmarks/results/pseudo2real_lora.json``: WER of every system with 95% CIs
(bootstrap over speakers), relative reductions over the pseudo-label baseline with
paired bootstrap CIs, trainable parameters, wall time per stage, tau's size full vs
low rank and its reconstruction error. The headline keys (``p2r_lora``,
``pseudo_ft_lora``, ``relative_reduction_lora``, ``tau_size_ratio_lowrank_vs_full``)
are those of ``--headline-rank``; the size ratio compares the low-rank tau with the
same tau stored dense.

Usage: python benchmarks/pseudo2real_lora.py [--ranks 8 32] [--full-run runs/p2r_so762]
       [--out runs/p2r_so762_lora] [--smoke]   (--smoke: 2 updates per student, lambda grid
       [0, 1], scope all, rank 2: checks the script end to end in minutes; its result is
       written as pseudo2real_lora_smoke.json)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

from selfspeech.adapt.pseudo2real import choose_lambda  # noqa: E402
from selfspeech.adapt.recipe import load_recipe  # noqa: E402
from selfspeech.adapt.stages import Stage, StageRunner  # noqa: E402
from selfspeech.adapt.student import (Output, Student, corrected_decode_stage, corrected_model_stage,  # noqa: E402
                                      decode_stage, finetune_stage, produce, tau_stage)
from selfspeech.models.lora import LoraConfig  # noqa: E402


def read_full_run(run: Path) -> dict:
    """What the LoRA runs reuse of the full fine-tuning run: parts, pseudo-labels, scores, choices, times."""
    rec = {n: json.loads((run / n / "STAGE.json").read_text()) for n in ("data", "pseudo", "tau", "ft_target_pseudo")}
    pipe = json.loads((run / "pipeline.json").read_text())
    return {"parts": rec["data"]["result"], "ps": rec["pseudo"]["result"], "hashes": {n: r["hash"] for n, r in rec.items()},
            "tau": rec["tau"]["result"], "theta_tp": rec["ft_target_pseudo"]["result"], "pipeline": pipe}


def runner(out: Path, full: dict) -> StageRunner:
    """A stage runner whose stages may read the full run's stages (their hashes key the new stages)."""
    S = StageRunner(out, print)
    S.hashes.update(full["hashes"])
    return S


def lowrank_stage(tau: Output, energy: float) -> Stage:
    """``tau_lowrank``: tau as a truncated SVD per matrix; result: the file and the compression report."""
    def fn(d: Path) -> dict:
        from selfspeech.arith.lowrank import compress
        from selfspeech.arith.task_vector import TaskVector

        low = compress(TaskVector.load(tau.path), energy)
        path = low.save(d / "tau_lowrank.safetensors")
        rep = dict(low.report)
        rep["matrices"] = {n: {k: v for k, v in m.items() if k in ("shape", "rank", "rel_error")}
                           for n, m in rep["matrices"].items()}
        return {"path": str(path), "report": rep}
    return Stage("tau_lowrank", fn, {"energy": energy}, (tau.stage,))


def p2r_with_lowrank(S: StageRunner, st: Student, theta_tp: Output, tau: Output, lam: float, scope: str,
                     evalm: str, energy: float) -> tuple[str, dict]:
    low = S(lowrank_stage(tau, energy))
    hyp = S(corrected_decode_stage(st, "p2r_lowrank", theta_tp, Output("tau_lowrank", low["path"]), lam, scope, evalm))
    return hyp, low["report"]


def lora_run(recipe, full: dict, rank: int, out: Path, args) -> dict:
    """Pseudo2Real with LoRA students of ``rank``: the pipeline's student stages on the full run's labels."""
    from selfspeech.models.zoo import resolve_model

    parts, ps = full["parts"], full["ps"]
    ft = dataclasses.replace(recipe.student.finetune, lr=args.lora_lr,
                             lora=LoraConfig(rank=rank, alpha=2.0 * rank, dropout=0.05))
    st = Student(recipe, str(resolve_model(recipe.student.init).hf_dir), ft, progress=False)
    S = runner(out, full)
    theta_sr = produce(S, finetune_stage(st, "source_real", ps["source_train_real"]["path"], parts["source_dev"]))
    theta_sp = produce(S, finetune_stage(st, "source_pseudo", ps["source_train"]["path"], ps["source_dev"]["path"]))
    theta_tp = produce(S, finetune_stage(st, "target_pseudo", ps["target_adapt_fit"]["path"],
                                         ps["target_adapt_stop"]["path"]))
    tau = produce(S, tau_stage("tau", theta_sr, theta_sp))
    choice = choose_lambda(S, st, parts, ps, tau)
    evalm = parts["target_eval"]
    hyps = {"pseudo_ft": S(decode_stage(st, "pseudo_ft", theta_tp, evalm))}
    p2r = produce(S, corrected_model_stage("model_p2r", theta_tp, tau, choice["lambda"], choice["scope"]))
    hyps["p2r"] = S(decode_stage(st, "p2r", p2r, evalm))
    hyps["p2r_lowrank"], low = p2r_with_lowrank(S, st, theta_tp, tau, choice["lambda"], choice["scope"], evalm,
                                                args.energy)
    summary = json.loads((out / "ft_target_pseudo" / "summary.json").read_text())
    return {"hyps": hyps, "lambda": choice, "lowrank": low, "times": dict(S.times), "cached": dict(S.cached),
            "trainable_parameters": summary["trainable_parameters"]}


def full_lowrank(recipe, full: dict, out: Path, args) -> dict:
    """The full fine-tuning run's tau in low rank, and its Pseudo2Real decoded with it."""
    from selfspeech.models.zoo import resolve_model

    st = Student(recipe, str(resolve_model(recipe.student.init).hf_dir), recipe.student.finetune, progress=False)
    S = runner(out, full)
    lam = full["pipeline"]["lambda"]
    hyp, low = p2r_with_lowrank(S, st, Output("ft_target_pseudo", full["theta_tp"]), Output("tau", full["tau"]),
                                lam["lambda"], lam.get("scope", "all"), full["parts"]["target_eval"], args.energy)
    return {"hyp": hyp, "lowrank": low, "times": dict(S.times)}


def score(refs: str, hyps: dict[str, str], normalizer: str, pairs: list[tuple[str, str]]) -> dict:
    """WER with 95% CIs per system, and paired bootstraps ``a`` vs baseline ``b`` (relative reduction of b's WER)."""
    from selfspeech.data.manifest import read_manifest
    from selfspeech.eval.report import build_results, read_jsonl

    ref, hyp = list(read_manifest(refs)), {k: read_jsonl(v) for k, v in hyps.items()}
    out = {"systems": {}, "paired": {}}
    for name, h in hyp.items():
        g = build_results(ref, h, normalizer=normalizer, n_resamples=1000)["system"]["groups"][0]
        out["systems"][name] = {"wer": g["wer"], "wer_ci95": g["wer_ci"], "utterances": g["utterances"]}
    for a, b in pairs:
        t = build_results(ref, hyp[b], compare=hyp[a], normalizer=normalizer, n_resamples=1000)["compare"]["paired"][0]
        out["paired"][f"{a}_vs_{b}"] = {"rel_reduction": t["rel_reduction"], "rel_ci95": t["rel_ci"],
                                        "diff": t["diff"], "diff_ci95": t["diff_ci"]}
    return out


def full_trainable(init: str) -> int:
    from transformers import WhisperForConditionalGeneration

    from selfspeech.models.zoo import resolve_model

    m = WhisperForConditionalGeneration.from_pretrained(str(resolve_model(init).hf_dir), use_safetensors=True)
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def collect(recipe, full: dict, full_low: dict, runs: dict[int, dict], headline: int) -> dict:
    """The result file's payload: every system's WER and CIs, the reductions, sizes and times."""
    pipe = full["pipeline"]
    hyps = {"pseudo_ft_full": pipe["hyps"]["pseudo_ft"], "p2r_full": pipe["hyps"]["p2r"],
            "p2r_full_lowrank": full_low["hyp"]}
    pairs = [("p2r_full", "pseudo_ft_full"), ("p2r_full_lowrank", "p2r_full")]
    for r, res in runs.items():
        hyps |= {f"{k}_lora_r{r}": v for k, v in res["hyps"].items()}
        pairs += [(f"p2r_lora_r{r}", f"pseudo_ft_lora_r{r}"), (f"p2r_lora_r{r}", "p2r_full"),
                  (f"p2r_lowrank_lora_r{r}", f"p2r_lora_r{r}")]
    s = score(full["parts"]["target_eval"], hyps, recipe.normalizer, pairs)
    wer = {k: v["wer"] for k, v in s["systems"].items()}
    h = f"r{headline}"
    wer |= {"p2r_lora": wer[f"p2r_lora_{h}"], "pseudo_ft_lora": wer[f"pseudo_ft_lora_{h}"]}
    low = {f"lora_r{r}": res["lowrank"] for r, res in runs.items()} | {"full": full_low["lowrank"]}
    return {
        "wer": wer, "wer_ci95": {k: v["wer_ci95"] for k, v in s["systems"].items()},
        "relative_reduction_lora": s["paired"][f"p2r_lora_{h}_vs_pseudo_ft_lora_{h}"]["rel_reduction"],
        "relative_reduction_full": s["paired"]["p2r_full_vs_pseudo_ft_full"]["rel_reduction"],
        "p2r_lora_vs_full_relative_gap": wer["p2r_lora"] / wer["p2r_full"] - 1.0,
        "tau_size_ratio_lowrank_vs_full": low[f"lora_{h}"]["size_ratio"],
        "headline_rank": headline, "paired": s["paired"],
        "lowrank_tau": {k: {kk: v[kk] for kk in ("energy", "rel_error", "numel_full", "numel_lowrank",
                                                  "bytes_full", "bytes_lowrank", "size_ratio")} for k, v in low.items()},
        "lowrank_wer_cost": {k: wer[f"p2r_lowrank_lora_r{r}"] - wer[f"p2r_lora_r{r}"] for r in runs
                             for k in [f"lora_r{r}"]} | {"full": wer["p2r_full_lowrank"] - wer["p2r_full"]},
        "trainable_parameters": {"full": full_trainable(recipe.student.init)}
        | {f"lora_r{r}": res["trainable_parameters"] for r, res in runs.items()},
        "lambda": {"full": {k: pipe["lambda"][k] for k in ("lambda", "scope") if k in pipe["lambda"]}}
        | {f"lora_r{r}": {k: res["lambda"][k] for k in ("lambda", "scope")} for r, res in runs.items()},
        "lambda_curves": {f"lora_r{r}": {k: v for k, v in res["lambda"].items() if k.startswith("curve")}
                          for r, res in runs.items()},
        "stage_seconds": {"full": pipe["times"], "full_lowrank": full_low["times"]}
        | {f"lora_r{r}": res["times"] for r, res in runs.items()},
        "stages_cached": {f"lora_r{r}": res["cached"] for r, res in runs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "speechocean762" / "pseudo2real.yaml")
    ap.add_argument("--full-run", type=Path, default=ROOT / "runs" / "p2r_so762",
                    help="the recipe's finished run (selfspeech adapt / benchmarks/pseudo2real.py)")
    ap.add_argument("--out", type=Path, default=None, help="LoRA runs (default runs/p2r_so762_lora[_smoke])")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks (default 8 32; smoke: 2)")
    ap.add_argument("--headline-rank", type=int, default=None, help="rank of the headline keys (default: the first)")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--energy", type=float, default=0.99, help="low-rank tau: energy kept per matrix")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two benchmarks share the 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="2 updates per student, grid [0, 1], scope all")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    smoke = ["student.finetune.max_steps=2", "student.finetune.eval_every=2", "lambda.grid=[0,1]",
             "lambda.scopes=[all]"] if args.smoke else []
    recipe = load_recipe(args.recipe, smoke)
    ranks = args.ranks or ([2] if args.smoke else [8, 32])
    out = args.out or ROOT / "runs" / ("p2r_so762_lora_smoke" if args.smoke else "p2r_so762_lora")
    full = read_full_run(args.full_run)  # a missing or unfinished run stops here, before any training
    full_low = full_lowrank(recipe, full, out / "full", args)
    runs = {r: lora_run(recipe, full, r, out / f"r{r}", args) for r in ranks}
    payload = collect(recipe, full, full_low, runs, args.headline_rank or ranks[0])
    payload |= {"full_run": str(args.full_run), "lora": {"alpha": "2 * rank", "dropout": 0.05, "lr": args.lora_lr,
                                                         "targets": list(LoraConfig().target_modules),
                                                         "where": "both"}, "smoke": args.smoke}
    write_result("pseudo2real_lora_smoke" if args.smoke else "pseudo2real_lora", payload)


if __name__ == "__main__":
    main()
