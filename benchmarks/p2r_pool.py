"""Pseudo2Real figures over several speaker splits: per split, and pooled over the union of eval speakers.

Each split is one run of the recipe with another ``data.seed`` (other source
train/dev/sim and target adapt/eval speakers). Pooling concatenates the
splits' eval utterances (ids prefixed by the split, speakers kept: a child who
is an eval speaker in two splits is one resampling unit) and runs the same
paired bootstrap over speakers as a single run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from selfspeech.eval.report import build_results, read_jsonl

# the corrections that never read a target transcript
LABEL_FREE = ("p2r", "p2r_sc", "p2r_sc_error", "p2r_union", "p2r_mixed", "p2r_iter", "p2r_groups")
BASELINES = ("source_real_plus_target_pseudo", "pseudo_ft")
# corrected systems with their own rehearsal on the held-out source speakers: the curve each rule read
REHEARSED = {"p2r": "curve_source_sim", "p2r_union": "curve_source_sim_union", "p2r_mixed": "curve_source_sim_mixed"}
AUTO = "p2r_auto"  # per split, the rehearsed system with the lowest held-out source WER


def rehearsal_wers(lam: dict) -> dict[str, float]:
    """Each rehearsed system's WER on the held-out source speakers at the (lambda, scope) its rule chose.

    ``lam``: a run's lambda choice (``run_pseudo2real(...)["lambda"]``, variants under ``variants``).
    """
    out = {}
    for system, prefix in REHEARSED.items():
        info = lam if system == "p2r" else lam.get("variants", {}).get(system)
        if not info or info.get("lambda") is None:
            continue
        scope = info.get("scope", "all")
        curve = info.get(prefix if scope == "all" else f"{prefix}_{scope}")
        if curve:
            out[system] = float({float(k): v for k, v in curve.items()}[float(info["lambda"])])
    return out


def rehearsal_choice(lam: dict) -> str | None:
    """The label-free choice among the corrected systems: the lowest WER in its own source rehearsal."""
    w = rehearsal_wers(lam)
    return min(w, key=w.get) if w else None


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
    refs = [{**r, "id": f"s{seed}:{r['id']}"} for seed, run in runs.items()
            for r in read_jsonl(run["eval_manifest"], required=("id", "text"))]
    hyps = {name: _pooled(runs, name) for name in systems}  # each file read once
    choice = {seed: (run.get("summary") or {}).get("rehearsal_choice") for seed, run in runs.items()}
    if all(c in run["hyps"] for c, run in zip(choice.values(), runs.values())):
        # the label-free system choice: each split contributes the system its source rehearsal picked
        hyps[AUTO] = [{**h, "id": f"s{seed}:{h['id']}"} for seed, run in runs.items()
                      for h in read_jsonl(run["hyps"][choice[seed]])]
    wer = {name: build_results(refs, h, normalizer=normalizer, n_resamples=n_resamples)["system"]["groups"][0]["wer"]
           for name, h in hyps.items()}
    rel = {}
    for x in (k for k in (*LABEL_FREE, AUTO) if k in hyps):
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
    if AUTO in wer:
        out["label_free_choice"] = {
            "rule": "per split, the corrected system (p2r, p2r_union, p2r_mixed) with the lowest WER on the held-out "
                    "source speakers at the lambda its own rehearsal chose; no target transcript read",
            "per_split": {str(s): c for s, c in choice.items()}, "wer": wer[AUTO],
            "oracle_gap_closed": gap_closed(wer, AUTO),
            "vs_source_real_plus_target_pseudo_ci95": rel.get(f"{AUTO}_vs_source_real_plus_target_pseudo"),
            "vs_pseudo_ft_ci95": rel.get(f"{AUTO}_vs_pseudo_ft")}
    return out


def save_split(folder: Path, seed: int, run: dict, summary: dict) -> dict:
    """Keep one split's eval references (id, speaker, text) and every system's hypotheses under ``folder``/split<seed>.

    Pooling reads these, so splits measured by separate runs (or on another day) pool with each other.
    Returns the run entry :func:`pooled` reads, pointing at the kept files.
    """
    d = folder / f"split{seed}"
    d.mkdir(parents=True, exist_ok=True)
    refs = [{k: r[k] for k in ("id", "speaker", "text") if k in r}
            for r in read_jsonl(run["eval_manifest"], required=("id", "text"))]
    (d / "target_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    for name, path in run["hyps"].items():
        shutil.copyfile(path, d / f"{name}.jsonl")
    tmp = d / "split.json.tmp"
    tmp.write_text(json.dumps({**summary, "systems": sorted(run["hyps"])}, indent=2) + "\n")
    tmp.replace(d / "split.json")  # written last: a split folder without it is incomplete
    return load_split(d)


def load_split(d: Path) -> dict:
    info = json.loads((d / "split.json").read_text())
    return {"eval_manifest": str(d / "target_eval.jsonl"), "summary": info,
            "hyps": {name: str(d / f"{name}.jsonl") for name in info["systems"]}}


def load_splits(folder: Path) -> dict[int, dict]:
    """Every complete split kept under ``folder``: seed -> the run entry :func:`pooled` reads."""
    return {int(d.name.removeprefix("split")): load_split(d)
            for d in sorted(folder.glob("split*")) if (d / "split.json").is_file()}
