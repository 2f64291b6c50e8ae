"""Pseudo2Real with one lambda per module group (system ``p2r_groups``), chosen without target transcripts.

The global rule (:func:`selfspeech.adapt.pseudo2real.rehearse`) picks one
``(lambda, scope)`` on the held-out source "sim" speakers. Here that choice is
the starting point of a coordinate search over the module groups of
:data:`selfspeech.arith.groups.GROUPS` (``lambda.groups``): one group at a
time, each value of the small ``lambda.group_grid`` is tried with the other
groups held, the model ``theta_simp + sum_g lambda_g * tau_g`` decoded on the
sim speakers (not kept) and scored with their real labels.

A few sim speakers are easy to over-fit, so the search is guarded:

- a change is accepted only when it lowers the sim WER by more than
  ``lambda.group_min_gain`` (absolute WER), or keeps it and shrinks that group's
  correction (ties go to the smaller correction, as in the global rule);
- the grid is small and the passes are few (``lambda.group_passes``, stopping
  early when a pass changes nothing), so at most
  ``passes * len(groups) * len(group_grid)`` models are decoded; points the
  global sweep already scored are read from its curves, not decoded again.

The result (``theta_tp + sum_g lambda_g * tau_g``) is ``model_p2r_groups``,
decoded as ``p2r_groups`` beside the global-lambda ``p2r``, whose stages it
leaves untouched. Every candidate and its sim WER is in ``choice["groups"]``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Mapping

from selfspeech.adapt.stages import Stage, StageRunner
from selfspeech.adapt.student import (Output, Student, decode_built, decode_stage, decoding_key, finetune_stage,
                                      produce)
from selfspeech.arith.groups import GROUPS, SHORT, apply_groups_to_dir, group_names, scope_lambdas
from selfspeech.arith.lowrank import load_any

Lambdas = Mapping[str, float]


def _key(lams: Lambdas) -> tuple:
    return tuple(sorted((g, float(v)) for g, v in lams.items()))


def coordinate_search(start: Lambdas, groups: Iterable[str], grid: Iterable[float], score: Callable[[dict], float],
                      min_gain: float = 0.002, passes: int = 2,
                      known: Iterable[tuple[Lambdas, float]] = ()) -> dict:
    """Coordinate descent of ``score`` (a WER) over ``groups``, each on ``grid``, from ``start``.

    Per group, the candidates are the grid values other than the current one; the best
    (lowest score, then smallest ``|lambda|``) of those that lower the score by more than
    ``min_gain``, or keep it (``<=``) with a smaller ``|lambda|``, replaces the current value.
    ``known``: (lambdas, score) pairs already measured, never scored again. Returns
    ``lambdas``, ``wer``, ``start``, ``start_wer``, ``candidates`` (every trial: pass, group,
    lambdas, wer), ``visits`` (each group's value and score when its trials began), ``steps``
    (accepted changes), ``decodes`` (calls of ``score``), ``reused`` (points read from ``known``)
    and ``passes``.
    """
    seen = {_key(k): float(w) for k, w in known}
    known_keys, reused, calls = set(seen), set(), 0

    def wer(lams: dict) -> float:
        nonlocal calls
        k = _key(lams)
        if k in known_keys:
            reused.add(k)
        elif k not in seen:
            seen[k], calls = float(score(dict(lams))), calls + 1
        return seen[k]

    cur = {g: float(v) for g, v in start.items()}
    w_cur = w_start = wer(cur)
    grid, groups = sorted({float(v) for v in grid}), list(groups)
    candidates, visits, steps, p = [], [], [], 0
    for p in range(1, passes + 1):
        moved = False
        for g in groups:
            visits.append({"pass": p, "group": g, "lambda": cur[g], "wer": w_cur})
            trials = []
            for v in grid:
                if v == cur[g]:
                    continue
                w = wer(cur | {g: v})
                candidates.append({"pass": p, "group": g, "lambdas": cur | {g: v}, "wer": w})
                trials.append((w, abs(v), v))
            ok = [t for t in trials if t[0] < w_cur - min_gain or (t[1] < abs(cur[g]) and t[0] <= w_cur)]
            if ok:
                w, _, v = min(ok)
                steps.append({"pass": p, "group": g, "from": cur[g], "to": v, "wer_from": w_cur, "wer_to": w})
                cur, w_cur, moved = cur | {g: v}, w, True
        if not moved:
            break
    return {"lambdas": cur, "wer": w_cur, "start": {g: float(v) for g, v in start.items()}, "start_wer": w_start,
            "candidates": candidates, "visits": visits, "steps": steps, "decodes": calls, "reused": len(reused),
            "passes": p}


# ----------------------------------------------------------------------------- stages

def _tag(lams: Lambdas) -> str:
    return "_".join(f"{SHORT[g]}{float(lams[g]):g}" for g in GROUPS if g in lams)


def grouped_model_stage(name: str, base: Output, tau: Output, lambdas: Lambdas) -> Stage:
    """``name``: the model folder theta_base + sum_g lambdas[g] * tau_g."""
    lams = {g: float(v) for g, v in lambdas.items()}
    return Stage(name, partial(_grouped, base.path, tau.path, lams), {"lambdas": lams}, (base.stage, tau.stage))


def _grouped(base: str, tau: str, lambdas: dict, d: Path) -> str:
    return str(apply_groups_to_dir(base, load_any(tau), lambdas, d / "model"))


def grouped_decode_stage(st: Student, name: str, base: Output, tau: Output, lambdas: Lambdas,
                         manifest: str) -> Stage:
    """``decode_<name>``: hypotheses of theta_base + sum_g lambdas[g] * tau_g on ``manifest``; model not kept."""
    lams = {g: float(v) for g, v in lambdas.items()}
    return Stage(f"decode_{name}", partial(_decode_grouped, st, base.path, tau.path, lams, manifest),
                 {"base": base.path, "lambdas": lams, "manifest": manifest} | decoding_key(st), (base.stage, tau.stage))


def _decode_grouped(st: Student, base: str, tau: str, lambdas: dict, manifest: str, d: Path) -> str:
    return decode_built(st, partial(_grouped, base, tau, lambdas), manifest, d)


# ----------------------------------------------------------------------------- the pipeline's search

def search_groups(S: StageRunner, st: Student, parts: dict, ps: dict, tau: Output, choice: dict) -> dict:
    """The guarded coordinate search on the sim speakers, from the global ``(lambda, scope)`` of ``choice``
    (which holds the global sweep's curves, read instead of decoded again)."""
    from selfspeech.adapt.pseudo2real import _curve_key, wer_of

    spec, sim = st.recipe.lam, parts["source_sim"]
    theta_sim = produce(S, finetune_stage(st, "sim_pseudo", ps["source_sim_fit"]["path"],
                                          ps["source_sim_stop"]["path"]))  # the global rule's, cached
    vec = load_any(tau.path)
    touched = {g for g, ns in group_names(vec.deltas).items() if ns}
    known = [(scope_lambdas(vec, lam, sc), w) for sc in spec.scopes
             for lam, w in choice[_curve_key("source_sim", sc)].items()]

    def score(lams: dict) -> float:
        h = S(grouped_decode_stage(st, f"sim_groups_{_tag(lams)}", theta_sim, tau, lams, sim))
        w = wer_of(sim, h, st.recipe.normalizer)
        S.log(f"  sim groups {_tag(lams)}: WER {w:.4f}")
        return w

    res = coordinate_search(scope_lambdas(vec, choice["lambda"], choice["scope"]),
                            [g for g in spec.groups if g in touched], spec.group_grid, score,
                            spec.group_min_gain, spec.group_passes, known)
    return res | {"groups": [g for g in spec.groups if g in touched], "grid": [float(x) for x in spec.group_grid],
                  "min_gain": spec.group_min_gain, "max_passes": spec.group_passes}


def p2r_groups(S: StageRunner, st: Student, parts: dict, ps: dict, theta_tp: Output, tau: Output, choice: dict,
               evalm: str) -> tuple[str, dict]:
    """Hypotheses of theta_tp + sum_g lambda_g * tau_g on ``evalm`` and the search that chose the lambdas."""
    res = search_groups(S, st, parts, ps, tau, choice)
    model = produce(S, grouped_model_stage("model_p2r_groups", theta_tp, tau, res["lambdas"]))
    return S(decode_stage(st, "p2r_groups", model, evalm)), res


# ----------------------------------------------------------------------------- report

def _show(lams: Lambdas) -> str:
    return ", ".join(f"{g} {float(v):g}" for g, v in lams.items())


def plot_groups(res: dict, path: Path) -> Path:
    """Sim WER against each searched group's lambda (one line per group and pass); the chosen values marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for p in range(1, res["passes"] + 1):
        for g in res["groups"]:
            pts = sorted([(c["lambdas"][g], c["wer"] * 100) for c in res["candidates"] if c["pass"] == p
                          and c["group"] == g]
                         + [(v["lambda"], v["wer"] * 100) for v in res["visits"] if (v["pass"], v["group"]) == (p, g)])
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if p == 1 else ":", label=f"{g}, pass {p}")
    ax.axhline(res["start_wer"] * 100, color="grey", ls="--", lw=1, label="global lambda (start)")
    ax.axhline(res["wer"] * 100, color="black", ls="-", lw=1, label="chosen per-group lambdas")
    ax.set(xlabel="lambda of the group (the others held)", ylabel="WER (%) on the held-out source speakers",
           title="Per-group lambda search (label-free: source speakers only)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def report_lines(res: dict, plot: Path) -> list[str]:
    """The report's section on ``p2r_groups``: the search, the chosen lambdas and every candidate's sim WER."""
    plot_groups(res, plot)
    lines = ["", "## Lambda per module group (p2r_groups)", "",
             f"Coordinate search over {', '.join(res['groups']) or 'no group'} on the grid "
             f"{', '.join(f'{x:g}' for x in res['grid'])}, scored on the held-out source speakers' real labels "
             f"(no target transcript), from the global choice ({_show(res['start'])}: {res['start_wer'] * 100:.1f}%); "
             f"a change had to lower that WER by more than {res['min_gain'] * 100:g} points (ties: the smaller "
             f"lambda). {res['passes']} of at most {res['max_passes']} passes, {res['decodes']} models decoded "
             f"({res['reused']} more points read from the global sweep).",
             "", f"Chosen: {_show(res['lambdas'])}: {res['wer'] * 100:.1f}% on the held-out source speakers.", ""]
    lines += [f"- pass {s['pass']}, {s['group']}: {s['from']:g} -> {s['to']:g} "
              f"({s['wer_from'] * 100:.1f}% -> {s['wer_to'] * 100:.1f}%)" for s in res["steps"]] or ["- no change kept"]
    lines += ["", f"![per-group lambda search]({plot.name})", "", "| pass | group | lambda | sim WER % |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {c['pass']} | {c['group']} | {c['lambdas'][c['group']]:g} | {_pct(c['wer'])} |"
              for c in res["candidates"]]
    return lines


def _pct(x: float) -> str:
    return f"{x * 100:.1f}"
