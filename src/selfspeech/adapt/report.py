"""Score every system of a Pseudo2Real run on the target-eval speakers and write the report."""
from __future__ import annotations

import json
from pathlib import Path

from selfspeech.data.atomic import write_json
from selfspeech.data.manifest import read_manifest
from selfspeech.data.versions import software_versions, versions_line
from selfspeech.eval.report import build_results, read_jsonl

LABELS = {
    "teacher": "teacher", "zero_shot": "student zero-shot", "pseudo_ft": "student FT on target pseudo (baseline)",
    "p2r": "Pseudo2Real", "p2r_sc": "Pseudo2Real-SC", "p2r_sc_random": "Pseudo2Real-SC, random clusters",
    "p2r_sc_error": "Pseudo2Real-SC, clusters by the teacher's error rate",
    "source_real_ft": "student FT on source real", "source_real_plus_target_pseudo": "source real + target pseudo",
    "oracle": "oracle: FT on target real (measurement only)",
    "p2r_union": "Pseudo2Real on source real + target pseudo",
    "pseudo_ft_mixed": "student FT on target pseudo, continued from the source mixed model",
    "p2r_mixed": "Pseudo2Real, continued from the source mixed model",
    "p2r_groups": "Pseudo2Real, one lambda per module group",
    "p2r_iter": "Iterative Pseudo2Real (the corrected student relabels the target)",
}
# (baseline, system): the paired bootstraps a run reports when both were decoded
PAIRS = (("pseudo_ft", "p2r"), ("pseudo_ft", "p2r_sc"), ("p2r", "p2r_sc"), ("p2r_sc_random", "p2r_sc"),
         ("teacher", "p2r"), ("source_real_ft", "p2r"), ("source_real_plus_target_pseudo", "p2r"),
         ("pseudo_ft", "p2r_union"), ("source_real_plus_target_pseudo", "p2r_union"),
         ("pseudo_ft", "p2r_groups"), ("p2r", "p2r_groups"), ("source_real_plus_target_pseudo", "p2r_groups"),
         ("pseudo_ft_mixed", "p2r_mixed"), ("pseudo_ft", "p2r_mixed"), ("source_real_plus_target_pseudo", "p2r_mixed"),
         ("pseudo_ft", "p2r_iter"), ("source_real_plus_target_pseudo", "p2r_iter"), ("p2r", "p2r_iter"),
         ("pseudo_ft", "p2r_sc_error"), ("p2r", "p2r_sc_error"), ("source_real_plus_target_pseudo", "p2r_sc_error"))


def score_systems(eval_manifest: str, hyps: dict[str, str], normalizer: str, seed: int = 0,
                  n_resamples: int = 1000) -> dict:
    """WER/CER with 95% CIs per system, and paired bootstraps of the corrections against their baselines."""
    refs = list(read_manifest(eval_manifest))
    hyp = {k: read_jsonl(v) for k, v in hyps.items()}
    out: dict = {"systems": {}, "paired": {}, "versions": software_versions()}
    for name, h in hyp.items():
        r = build_results(refs, h, normalizer=normalizer, seed=seed, n_resamples=n_resamples)
        g = r["system"]["groups"][0]
        out["systems"][name] = {"wer": g["wer"], "wer_ci95": g["wer_ci"], "cer": g["cer"], "cer_ci95": g["cer_ci"],
                                "utterances": g["utterances"], "speakers": g["speakers"],
                                "missing": r["system"]["missing"]["count"]}
    for a, b in PAIRS:
        if a in hyp and b in hyp:
            r = build_results(refs, hyp[a], compare=hyp[b], normalizer=normalizer, seed=seed, n_resamples=n_resamples)
            t = r["compare"]["paired"][0]
            out["paired"][f"{b}_vs_{a}"] = {"rel_reduction": t["rel_reduction"], "rel_ci95": t["rel_ci"],
                                            "diff": t["diff"], "diff_ci95": t["diff_ci"],
                                            "p_not_better": t["p_not_better"]}
    return out


def plot_systems(systems: dict[str, dict], path: Path) -> Path:
    """Horizontal bars, one per system, WER with its 95% CI; the baseline and Pseudo2Real stand out."""
    import numpy as np
    from matplotlib.figure import Figure

    names = list(systems)
    w = np.array([systems[n]["wer"] * 100 for n in names])
    lo = np.array([systems[n]["wer_ci95"][0] * 100 for n in names])
    hi = np.array([systems[n]["wer_ci95"][1] * 100 for n in names])
    fig = Figure(figsize=(7.5, 0.45 * len(names) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    colors = ["tab:red" if n.startswith("p2r") else "tab:grey" if n == "oracle" else "tab:blue" for n in names]
    y = np.arange(len(names))[::-1]
    ax.barh(y, w, xerr=np.vstack([w - lo, hi - w]), color=colors, capsize=3)
    ax.set_yticks(y, [LABELS.get(n, n) for n in names], fontsize=8)
    for yi, wi in zip(y, w):
        ax.text(wi + 0.5, yi + 0.2, f"{wi:.1f}", fontsize=7)
    ax.set_xlabel("WER (%) on the target-eval speakers, 95% CI over speakers")
    ax.set_xlim(left=0)
    fig.savefig(path, dpi=120)
    return path


def plot_lambda(curves: dict[str, dict], chosen: float, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for name, c in curves.items():
        xs = sorted(float(k) for k in c)
        ax.plot(xs, [c[k] * 100 if k in c else c[str(k)] * 100 for k in xs], marker="o", label=name,
                ls="--" if "oracle" in name else "-")
    ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen lambda = {chosen:g}")
    ax.set_xlabel("lambda")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER of theta_pseudo + lambda * tau")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _pct(x) -> str:
    return "—" if x is None else f"{x * 100:.1f}"


def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 1e6:.1f}"


def _disk_line(disk: dict) -> str:
    """How much the run folder holds, and which stages hold most of it."""
    if disk.get("total") is None:
        return "Disk used by the run folder: not measured."
    top = sorted(disk["stages"].items(), key=lambda kv: -kv[1])[:3]
    return (f"Disk used by the run folder: {_size(disk['total'])} (largest stages: "
            + ", ".join(f"{k} {_size(v)}" for k, v in top) + ").")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _target_lines(result: dict) -> list[str]:
    """What the target let the run know: a scored eval part, or only agreement with the teacher."""
    spk = {"field": "the manifest's speakers",
           "recording": "one pseudo-speaker per recording (the target has no speaker field)"}
    lines = [f"Target speakers: {spk.get(result.get('target_speakers', 'field'), result.get('target_speakers'))}."]
    if result.get("target_labelled", True):
        return lines + ["Scored on the target-eval speakers' transcripts, which no stage trained or chose on."]
    return lines + ["**The target has no transcripts, so no target WER can be measured.** Every target speaker was "
                    "adapted to. The table gives each system's word disagreement with the teacher's labels on the "
                    "target (the teacher is the reference, so a lower figure means closer to the teacher, not "
                    "more accurate); lambda was chosen on held-out source speakers; the teacher's filter counts "
                    "are under Data."]


def _variant_lines(lam: dict) -> list[str]:
    """The lambda each variant's own rehearsal chose, with its held-out source curves."""
    lines = []
    for name, v in lam.get("variants", {}).items():
        if "rounds" in v:  # iterative: rounds and the stop rule's curve (selfspeech.adapt.iterative)
            from selfspeech.adapt.iterative import report_line

            lines.append(report_line(LABELS.get(name, name), v))
            continue
        curves = "; ".join(f"{k.removeprefix('curve_')}: "
                           + ", ".join(f"{float(x):g}: {_pct(w)}%" for x, w in c.items())
                           for k, c in v.items() if k.startswith("curve_"))
        lines.append(f"- {LABELS.get(name, name)}: lambda = {v['lambda']:g}, tau scope `{v['scope']}`"
                     + (f" (its own rehearsal on the held-out source speakers: {curves})" if curves else "") + ".")
    return ["", *lines] if lines else []


def write_report(out: Path, result: dict, scores: dict, title: str) -> Path:
    out = Path(out)
    write_json(out / "scores.json", scores)
    plot_systems(scores["systems"], out / "wer_systems.png")
    lam = result["lambda"]
    curves = {}
    for key, c in lam.items():  # curve_<kind>[_<scope>]
        if not key.startswith("curve_"):
            continue
        kind = "source_sim" if key.startswith("curve_source_sim") else "target_oracle"
        sc = key[len(f"curve_{kind}"):].lstrip("_") or "all"
        who = ("held-out source speakers (real labels): the rule" if kind == "source_sim"
               else "target eval (oracle, not used to choose)")
        curves[f"{who}, tau scope {sc}"] = c
    if curves:
        plot_lambda(curves, lam["lambda"], out / "wer_lambda.png")
    s = scores["systems"]
    labelled = result.get("target_labelled", True)
    metric = "WER" if labelled else "WER against the teacher"
    lines = [f"# {title}", "", *_target_lines(result), "",
             f"lambda = {lam['lambda']:g}, tau scope `{lam.get('scope', 'all')}`, chosen by rule `{lam['rule']}` "
             "(no target transcript used).", *_variant_lines(lam), "", _disk_line(result.get("disk") or {}), "",
             versions_line(scores.get("versions")), "",
             "![WER per system](wer_systems.png)", "",
             f"| system | {metric} % [95% CI] | CER % | utterances | speakers |",
             "| --- | --- | --- | --- | --- |"]
    for k, v in s.items():
        lines.append(f"| {LABELS.get(k, k)} | {_pct(v['wer'])} [{_pct(v['wer_ci95'][0])}, {_pct(v['wer_ci95'][1])}] "
                     f"| {_pct(v['cer'])} | {v['utterances']} | {v['speakers']} |")
    paired = ("## Paired bootstrap over speakers" if labelled else
              "## Paired bootstrap over speakers: disagreement with the teacher, not accuracy\n\nA correction "
              "that fixes the teacher's errors moves a system away from the teacher, so a negative figure here "
              "is expected of Pseudo2Real and says nothing about its accuracy.")
    lines += ["", paired, "", f"| comparison | relative {metric} reduction [95% CI] | P(not better) |",
              "| --- | --- | --- |"]
    for k, v in scores["paired"].items():
        lines.append(f"| {k} | {_pct(v['rel_reduction'])}% [{_pct(v['rel_ci95'][0])}, {_pct(v['rel_ci95'][1])}] "
                     f"| {v['p_not_better']:.3f} |")
    if curves:
        lines += ["", "## WER against lambda", "", "![WER vs lambda](wer_lambda.png)", ""]
        for name, c in curves.items():
            lines.append(f"- {name}: " + ", ".join(f"{float(k):g}: {_pct(w)}%" for k, w in c.items()))
    if lam.get("groups"):  # per-group lambdas with every candidate's sim WER (selfspeech.adapt.lambda_groups)
        from selfspeech.adapt.lambda_groups import report_lines

        lines += report_lines(lam["groups"], out / "wer_lambda_groups.png")
    lines += ["", "## Data", "", "```", json.dumps(result["parts"], indent=1), "```", "",
              f"Teacher labelling: {json.dumps(result['label_stats'])}", "",
              f"Pseudo-labels kept for training: {json.dumps(result['pseudo_counts'])}", ""]
    c = result.get("clusters") or {}
    if c.get("k") is not None:
        lines += [f"Speaker clusters: k = {c.get('k')}, source members {c.get('source_sizes')}, "
                  f"target members {c.get('target_sizes')}, merged {c.get('merged')}.", ""]
    if c.get("teacher_error"):  # p2r_sc_error (selfspeech.cluster.errors)
        e = c["teacher_error"]
        rho = "n/a" if e.get("heldout_spearman") is None else f"{e['heldout_spearman']:.2f}"
        lines += [f"Teacher-error clusters: k = {e['k']}, source members {e['source_sizes']} (measured teacher "
                  f"WER {_rates(e['source_teacher_wer'])}), target members {e['target_sizes']} (predicted "
                  f"teacher WER {_rates(e['target_predicted_wer'])}); rank correlation of predicted and measured "
                  f"teacher WER on {e['heldout_speakers']} held-out source speakers: {rho}.", ""]
    disk = result.get("disk") or {"stages": {}}
    lines += ["## Stages", "", "| stage | seconds | cached | MB on disk |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v:.1f} | {result['cached'].get(k, False)} | {_mb(disk['stages'].get(k))} |"
              for k, v in result["times"].items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rates(by_cluster: dict) -> str:
    return ", ".join(f"{k}: {_pct(v)}%" for k, v in by_cluster.items())
