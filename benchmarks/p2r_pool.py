"""Pseudo2Real figures over several speaker splits: per split, and pooled over the union of eval speakers.

Each split is one run of the recipe with another ``data.seed`` (other source
train/dev/sim and target adapt/eval speakers). Pooling concatenates the
splits' eval utterances (ids prefixed by the split, speakers kept: a child who
is an eval speaker in two splits is one resampling unit) and runs the same
paired bootstrap over speakers as a single run.
"""
from __future__ import annotations

from selfspeech.data.manifest import read_manifest
from selfspeech.eval.report import build_results, read_jsonl

LABEL_FREE = ("p2r", "p2r_sc", "p2r_union", "p2r_mixed")  # corrections that never read a target transcript
BASELINES = ("source_real_plus_target_pseudo", "pseudo_ft")


def gap_closed(wer: dict, system: str) -> float | None:
    """``(pseudo_ft - x) / (pseudo_ft - oracle)``: the share of what perfect target labels would give."""
    p, o, x = wer.get("pseudo_ft"), wer.get("oracle"), wer.get(system)
    if None in (p, o, x) or p == o:
        return None
    return (p - x) / (p - o)


def split_summary(scores: dict) -> dict:
    """One split: every system's WER, the oracle gap each closes, and the paired tests against both baselines."""
    s, paired = scores["systems"], scores["paired"]
    wer = {k: v["wer"] for k, v in s.items()}
    return {"wer": wer, "oracle_gap_closed": {k: gap_closed(wer, k) for k in wer if k in LABEL_FREE},
            "paired": {f"{x}_vs_{b}": paired[f"{x}_vs_{b}"]["rel_ci95"] for x in LABEL_FREE for b in BASELINES
                       if f"{x}_vs_{b}" in paired}}


def _pooled(runs: dict[int, dict], system: str) -> list[dict]:
    """The system's hypotheses of every split, ids prefixed by the split."""
    return [{**h, "id": f"s{seed}:{h['id']}"} for seed, run in runs.items() for h in read_jsonl(run["hyps"][system])]


def pooled(runs: dict[int, dict], normalizer: str, n_resamples: int = 1000) -> dict:
    """WER of every system pooled over the splits, and the best label-free system against both baselines.

    ``runs``: seed -> {"eval_manifest": path, "hyps": {system: path}}; systems decoded in every split only.
    """
    systems = sorted(set.intersection(*(set(r["hyps"]) for r in runs.values())))
    refs = [{**r, "id": f"s{seed}:{r['id']}"} for seed, run in runs.items() for r in read_manifest(run["eval_manifest"])]
    hyps = {name: _pooled(runs, name) for name in systems}  # each file read once
    wer = {name: build_results(refs, h, normalizer=normalizer, n_resamples=n_resamples)["system"]["groups"][0]["wer"]
           for name, h in hyps.items()}
    rel = {}
    for x in (k for k in LABEL_FREE if k in hyps):
        for b in (k for k in BASELINES if k in hyps):
            t = build_results(refs, hyps[b], compare=hyps[x], normalizer=normalizer, n_resamples=n_resamples)
            rel[f"{x}_vs_{b}"] = t["compare"]["paired"][0]["rel_ci"]
    cands = [k for k in LABEL_FREE if k in wer]
    best = min(cands, key=lambda k: wer[k]) if cands else None
    out = {"wer": wer, "paired": rel, "splits": sorted(runs)}
    if best:
        out["best_label_free"] = {
            "system": best, "splits": len(runs), "wer": wer[best], "pseudo_ft_wer": wer.get("pseudo_ft"),
            "oracle_wer": wer.get("oracle"), "oracle_gap_closed": gap_closed(wer, best),
            "vs_source_real_plus_target_pseudo_ci95": rel.get(f"{best}_vs_source_real_plus_target_pseudo"),
            "vs_pseudo_ft_ci95": rel.get(f"{best}_vs_pseudo_ft"),
            "chosen_by": "lowest pooled eval WER among the label-free systems (a summary of what was measured, "
                         "not a recipe choice: the recipe's default is chosen on the source speakers)"}
    return out
