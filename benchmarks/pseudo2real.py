"""Pseudo2Real on speechocean762 (adults -> children): every system side by side.

Runs ``recipes/speechocean762/pseudo2real.yaml`` through the same library code
as ``selfspeech adapt`` (cached stages: a rerun only recomputes what changed),
scores every system on the target-eval speakers with 95% CIs (bootstrap over
speakers) and paired bootstraps, and writes ``benchmarks/results/pseudo2real.json``.

With ``--seeds 0 1 2`` the recipe runs once per speaker split (``data.seed``;
split 0 in ``--out``, split n in ``--out``_seed<n>). Each split's eval
references and hypotheses are kept in ``benchmarks/results/<result name>_splits/``,
and the result adds every kept split's figures (``splits``) and the figures
pooled over the union of their eval speakers (``pooled``, with
``best_label_free``; benchmarks/p2r_pool.py), so splits run separately (two
processes side by side, or another day) pool together; ``--pool-only`` just
re-pools. The top-level keys are those of split 0, kept from the existing
result when split 0 is not rerun.

With ``--ft-seeds 0 1 2`` split 0 also runs once per fine-tuning seed
(``student.finetune.seed``; the recipe's seed in ``--out``, seed n in
``--out``_ft<n>), and the result adds ``ft_seed_spread``: per system, the WER of
each seed, their mean and standard deviation. ``--tau-seeds 1 2`` sets
``student.tau_seeds`` (tau averaged over those extra fine-tuning seeds) for every run.

Usage: python benchmarks/pseudo2real.py [--recipe R.yaml] [--out runs/p2r_so762] [--seeds 0 1 2 [--lean-splits]] [--pool-only]
       [--ft-seeds 0 1 2] [--tau-seeds 1 2] [--set student.max_repeats=0 ...]
       [--systems p2r_union p2r_mixed ...]   (added to the recipe's systems)
       [--extractor DIR --result-name pseudo2real_sc_ecapa]   (SC with a trained speaker encoder;
       only the SC stages are recomputed)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_result  # noqa: E402
from p2r_pool import load_splits, pooled, rehearsal_choice, rehearsal_wers, save_split, split_summary  # noqa: E402

from selfspeech.adapt.pseudo2real import run_pseudo2real  # noqa: E402
from selfspeech.adapt.recipe import load_recipe  # noqa: E402
from selfspeech.data.versions import cpu_model  # noqa: E402

KEYS = ("teacher", "zero_shot", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random", "source_real_ft",
        "source_real_plus_target_pseudo", "oracle", "p2r_union", "pseudo_ft_mixed", "p2r_mixed", "p2r_sc_error")
LEAN_SKIP = ("zero_shot", "p2r_sc", "p2r_sc_random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "speechocean762" / "pseudo2real.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "p2r_so762")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and CTranslate2 threads; 1 by default: on this shared 2-core machine two "
                         "benchmarks run side by side, one core each, which avoids thread oversubscription")
    ap.add_argument("--extractor", default=None,
                    help="speaker extractor for Pseudo2Real-SC (melstats or a `selfspeech sv train` folder); "
                         "default: the recipe's")
    ap.add_argument("--result-name", default="pseudo2real",
                    help="benchmarks/results/<name>.json; the splits are kept in <name>_splits/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="speaker splits (data.seed), one run each")
    ap.add_argument("--systems", nargs="+", default=[], help="systems added to the recipe's")
    ap.add_argument("--ft-seeds", type=int, nargs="+", default=[],
                    help="fine-tuning seeds (student.finetune.seed) split 0 runs with, one run each: "
                         "the result's ft_seed_spread")
    ap.add_argument("--tau-seeds", type=int, nargs="+", default=None,
                    help="student.tau_seeds of every run: tau averaged over these extra fine-tuning seeds")
    ap.add_argument("--lean-splits", action="store_true",
                    help="splits other than split 0 (and fine-tuning seeds other than the recipe's) skip what "
                         "the pooled figures do not read (zero-shot, SC, the oracle lambda sweep): hours less on "
                         "a CPU")
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="recipe overrides of every run, as `selfspeech adapt --set` (e.g. student.max_repeats=0)")
    ap.add_argument("--pool-only", action="store_true",
                    help="run nothing: rebuild `splits` and `pooled` from the kept splits")
    args = ap.parse_args()
    import dataclasses

    import torch

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.extractor:
        recipe = dataclasses.replace(recipe, clusters=dataclasses.replace(recipe.clusters, extractor=args.extractor))
    recipe = dataclasses.replace(recipe, systems=tuple(dict.fromkeys((*recipe.systems, *args.systems))))
    if args.tau_seeds is not None:
        recipe = dataclasses.replace(recipe, student=dataclasses.replace(recipe.student,
                                                                         tau_seeds=tuple(args.tau_seeds)))
    base_ft = recipe.student.finetune.seed
    # each run's tau uses its own fine-tuning seed and the tau seeds: refused now, not after hours of runs
    if clash := sorted(set(args.ft_seeds) & set(recipe.student.tau_seeds)):
        ap.error(f"--ft-seeds {clash} are also tau seeds ({list(recipe.student.tau_seeds)}); give disjoint seeds")
    splits_dir = RESULTS / f"{args.result_name}_splits"  # pseudo2real_splits for the default result
    runs = {}
    for seed in ([] if args.pool_only else args.seeds):
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seed=seed))
        if seed != 0 and args.lean_splits:
            r = dataclasses.replace(r, systems=tuple(x for x in r.systems if x not in LEAN_SKIP),
                                    lam=dataclasses.replace(r.lam, oracle_sweep=False))
        out = args.out if seed == 0 else args.out.with_name(f"{args.out.name}_seed{seed}")
        runs[seed] = run_pseudo2real(r, out)  # scores every system and writes out/report.md
        runs[seed]["eval_manifest"] = str(Path(out) / "data" / "target_eval.jsonl")
        save_split(splits_dir, seed, runs[seed], split_record(runs[seed]))
    ft_runs = {}
    for ft_seed in ([] if args.pool_only else args.ft_seeds):  # split 0 with another fine-tuning seed
        if ft_seed == base_ft and 0 in runs:
            ft_runs[ft_seed] = runs[0]
            continue
        ft = dataclasses.replace(recipe.student.finetune, seed=ft_seed)
        r = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, seed=0),
                                student=dataclasses.replace(recipe.student, finetune=ft))
        if ft_seed != base_ft and args.lean_splits:
            r = dataclasses.replace(r, systems=tuple(x for x in r.systems if x not in LEAN_SKIP),
                                    lam=dataclasses.replace(r.lam, oracle_sweep=False))
        out = args.out if ft_seed == base_ft else args.out.with_name(f"{args.out.name}_ft{ft_seed}")
        ft_runs[ft_seed] = run_pseudo2real(r, out)
    previous = RESULTS / f"{args.result_name}.json"
    before = json.loads(previous.read_text()) if previous.is_file() else {}
    top = first_split(runs[0], recipe, args) if 0 in runs else {
        k: v for k, v in before.items() if k not in ("splits", "pooled", "ft_seed_spread", "command", "date",
                                                     "commit", "machine", "versions")}
    if 0 not in runs and before and "split0_provenance" not in top:
        # the top-level figures stay split 0's: so do the command, date and machine that measured them
        top["split0_provenance"] = {k: before.get(k) for k in ("command", "date", "commit", "machine")}
    kept = load_splits(splits_dir)
    # a split measured before its hypotheses were kept keeps its figures but cannot pool
    # (the command and CPU of the file that measured it stay with it)
    carried = {"command": before.get("command"), "cpu": (before.get("machine") or {}).get("processor")}
    splits = {**{s: {**carried, **v, "hypotheses_kept": False} for s, v in before.get("splits", {}).items()
                 if int(s) not in kept},
              **{str(s): {**k["summary"], "hypotheses_kept": True} for s, k in kept.items()}}
    spread = ft_seed_spread(ft_runs, recipe.student.tau_seeds) if ft_runs else before.get("ft_seed_spread")
    write_result(args.result_name, {
        **top,
        "splits": dict(sorted(splits.items(), key=lambda kv: int(kv[0]))),
        "pooled": pooled(kept, recipe.normalizer) if kept else {},
        **({"ft_seed_spread": spread} if spread else {}),
    })


def ft_seed_spread(ft_runs: dict, tau_seeds: tuple[int, ...]) -> dict:
    """Split 0 per fine-tuning seed: each system's WER per seed, their mean and (sample) standard deviation;
    systems that some seed's run lacks are left out."""
    seeds = sorted(ft_runs)
    systems = [k for k in KEYS if all(k in ft_runs[s]["scores"]["systems"] for s in seeds)]
    out = {}
    for k in systems:
        wers = [ft_runs[s]["scores"]["systems"][k]["wer"] for s in seeds]
        out[k] = {"wer": dict(zip(map(str, seeds), wers)), "mean": statistics.fmean(wers),
                  "std": statistics.stdev(wers) if len(wers) > 1 else None}
    return {"data_seed": 0, "ft_seeds": seeds, "tau_seeds": list(tau_seeds), "systems": out}


def split_record(r: dict) -> dict:
    """One split's figures: WERs, oracle gap closed, paired tests, chosen lambdas, stage times, the command."""
    return {**split_summary(r["scores"]), "lambda": r["lambda"]["lambda"],
            "lambda_variants": {k: v["lambda"] for k, v in r["lambda"].get("variants", {}).items()},
            "rehearsal_wer": rehearsal_wers(r["lambda"]), "rehearsal_choice": rehearsal_choice(r["lambda"]),
            "stage_seconds": r["times"], "command": " ".join(["python", *sys.argv]), "cpu": cpu_model()}


def first_split(result: dict, recipe, args) -> dict:
    """The top-level keys: split 0's full figures (every system, curves, clusters, label statistics)."""
    report = Path(result["report"])
    s, p = result["scores"]["systems"], result["scores"]["paired"]
    rr = p.get("p2r_vs_pseudo_ft", {})
    return {
        "wer": {k: s[k]["wer"] if k in s else None for k in KEYS},
        "wer_ci95": {k: s[k]["wer_ci95"] if k in s else None for k in KEYS},
        "relative_reduction": rr.get("rel_reduction"),
        "relative_reduction_ci95": rr.get("rel_ci95"),
        "lambda": result["lambda"]["lambda"],
        "tau_scope": result["lambda"].get("scope", "all"),
        "lambda_rule": "source_sim: tau from source-train speakers; (lambda, tau scope) minimising WER of "
                       "theta(sim pseudo) + lambda*tau[scope] on held-out source speakers' real labels; "
                       "no target transcript used",
        "lambda_curves": {k: v for k, v in result["lambda"].items() if k.startswith("curve")},
        "paired": p,
        "clusters": {k: v for k, v in result["clusters"].items() if k != "assignment"},
        "sc_extractor": recipe.clusters.extractor,
        "stage_seconds": result["times"],
        "stages_cached": result["cached"],
        "disk_bytes": result["disk"]["total"],
        "data": result["parts"],
        "label_stats": result["label_stats"],
        "pseudo_counts": result["pseudo_counts"],
        "recipe": str(args.recipe.relative_to(ROOT)) if args.recipe.is_relative_to(ROOT) else str(args.recipe),
        "report": str(report.relative_to(ROOT)) if report.is_relative_to(ROOT) else str(report),
        "lambda_variants": result["lambda"].get("variants", {}),
    }


if __name__ == "__main__":
    main()
