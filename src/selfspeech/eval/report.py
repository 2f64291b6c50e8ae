"""Evaluation I/O: tolerant JSONL reading, results JSON, markdown report, WER bar chart.

``build_results`` turns references and hypotheses into one plain dict (the
content of ``eval.json``); ``render_markdown`` and ``plot_wer_bars`` only
present that dict, so the JSON, the table and the chart can never disagree.
Nothing is dropped silently: references without a hypothesis are scored as
all deletions and counted, unknown hypothesis ids and labeller flags are
counted, and every such fact is written into the report.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

from selfspeech.data.atomic import atomic_write
from selfspeech.data.manifest import ManifestError, parse_line
from selfspeech.eval.wer import (
    ErrorCounts, bootstrap_ci, group_indices, group_seed, paired_bootstrap, score,
)
from selfspeech.text.normalize import get_normalizer

SHOW_IDS = 20  # ids listed in full in the report; the counts are always complete
MAX_PLOT_VALUES = 30  # a --by field with more values (e.g. speaker) is left out of the chart


def read_jsonl(path: str | os.PathLike, required: Sequence[str] = ("id",), allow_partial_last: bool = False,
               warn: Callable[[str], None] | None = None, keep: Sequence[str] | None = None) -> list[dict]:
    """Read a JSONL file of objects that need only the ``required`` fields.

    Unlike ``read_manifest`` no ``audio_filepath`` is needed (hypothesis files
    have none). ``id`` becomes a string; duplicate ids are an error. With
    ``allow_partial_last`` an unterminated, unparsable last line (a labeller
    still writing) is skipped with a warning instead of failing.
    Raises ManifestError naming ``path:line``.
    """
    path = Path(path)
    warn = warn or (lambda m: warnings.warn(m, stacklevel=3))
    if not path.is_file():
        raise ManifestError(f"{path}: file not found")
    items, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse_line(line, path, lineno, tuple(required))
            except ManifestError:
                if allow_partial_last and not line.endswith("\n"):
                    warn(f"{path}:{lineno}: ignoring half-written last line (labelling in progress?)")
                    break
                raise
            item["id"] = str(item["id"])
            if keep is not None:
                item = {k: item[k] for k in keep if k in item}
            if item["id"] in seen:
                raise ManifestError(f"{path}:{lineno}: duplicate id {item['id']!r} (first on line {seen[item['id']]})")
            seen[item["id"]] = lineno
            items.append(item)
    return items


def _flags(hyps: Iterable[dict]) -> tuple[int, dict[str, int]]:
    """(hypotheses with at least one flag, count per flag); a bare string counts as one flag."""
    per_flag: Counter = Counter()
    flagged = 0
    for h in hyps:
        fl = h.get("flags") or []
        fl = [fl] if isinstance(fl, str) else [str(x) for x in fl]
        flagged += bool(fl)
        per_flag.update(set(fl))
    return flagged, dict(sorted(per_flag.items(), key=lambda kv: (-kv[1], kv[0])))


def _system(name: str, refs: list[dict], hyps: list[dict], groups, speakers, normalizer,
            n_resamples: int, seed: int):
    """Score one system; returns (summary dict, scored counts)."""
    by_id = {h["id"]: h for h in hyps}
    s = score({r["id"]: r.get("text") for r in refs}, {i: h.get("text") for i, h in by_id.items()}, normalizer)
    flagged, per_flag = _flags(by_id[i] for i in s.ids if i in by_id)
    rows = []
    for g in groups:
        spk = [speakers[i] for i in g.index] if speakers is not None else None
        ci = bootstrap_ci(s.counts[g.index], spk, n_resamples, group_seed(seed, g.name))
        rows.append({
            "name": g.name, "field": g.field, "value": g.value, "utterances": int(len(g.index)),
            "speakers": len({x for x in spk if x is not None}) if spk else 0,
            **ErrorCounts.from_array(s.counts[g.index]).to_dict(),
            "wer_ci": list(ci.wer), "cer_ci": list(ci.cer), "ci_unit": ci.unit, "ci_units": ci.n_units,
        })
    summary = {
        "name": name, "hypotheses": len(hyps),
        "missing": {"count": len(s.missing), "ids": s.missing[:SHOW_IDS]},
        "extra": {"count": len(s.extra), "ids": s.extra[:SHOW_IDS]},
        "flagged": flagged, "flags": per_flag, "groups": rows,
    }
    return summary, s.counts


def build_results(refs: list[dict], hyps: list[dict], *, by: Sequence[str] = (),
                  normalizer: str = "whisper_english", n_resamples: int = 1000, seed: int = 0,
                  compare: list[dict] | None = None, names: tuple[str, str] = ("hyp", "compare"),
                  ref_name: str = "ref", speaker_field: str = "speaker", notes: Sequence[str] = ()) -> dict:
    """Everything ``eval.json`` holds: per-group counts, WER/CER with CIs, and an optional A/B test.

    ``refs`` need ``id`` and ``text``; ``hyps`` need ``id`` and may carry
    ``text`` (None counts as empty) and ``flags``. Raises ValueError for an
    unknown normaliser or a ``by`` field no reference has.
    """
    norm = get_normalizer(normalizer)
    # references are shared by both systems and most hypotheses repeat across
    # them: normalising each distinct string once halves the slowest step
    cached = lru_cache(maxsize=None)(norm)
    groups = group_indices(refs, list(by))
    has_spk = any(speaker_field in r for r in refs)
    speakers = [r.get(speaker_field) for r in refs] if has_spk else None
    notes = list(notes)
    if not has_spk:
        notes.append(f"no {speaker_field!r} field in the reference: intervals resample utterances, "
                     "which is too narrow when speakers have several utterances")
    elif (n_none := sum(s is None for s in speakers)):
        notes.append(f"{n_none} reference lines have no {speaker_field!r}: each is resampled as its own unit "
                     f"{[r['id'] for r in refs if r.get(speaker_field) is None][:5]}")
    empty = [r["id"] for r in refs if not cached(str(r.get("text") or "")).strip()]
    if empty:  # 0 reference words: any hypothesis word is an insertion; say so rather than hide it
        notes.append(f"{len(empty)} reference(s) are empty after normalisation (scored with 0 words; "
                     f"hypothesis words count as insertions): {empty[:5]}")
    mojibake = [r["id"] for r in refs if "\ufffd" in str(r.get("text") or "")]
    if mojibake:
        notes.append(f"{len(mojibake)} reference(s) contain U+FFFD (bytes that were not UTF-8): {mojibake[:5]}")
    a, counts_a = _system(names[0], refs, hyps, groups, speakers, cached, n_resamples, seed)
    out = {
        "reference": {"name": ref_name, "utterances": len(refs),
                      "speakers": len({s for s in speakers if s is not None}) if speakers else 0},
        "normalizer": norm.name, "by": list(by),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile",
                      "unit": "speaker" if has_spk else "utterance"},
        "cer_spaces": "the single space between words counts as a character",
        "system": a, "compare": None, "notes": notes,
    }
    if compare is not None:
        b, counts_b = _system(names[1], refs, compare, groups, speakers, cached, n_resamples, seed)
        tests = []
        for g in groups:
            spk = [speakers[i] for i in g.index] if speakers is not None else None
            p = paired_bootstrap(counts_a[g.index], counts_b[g.index], spk, n_resamples,
                                 group_seed(seed, "paired:" + g.name))
            tests.append({"name": g.name, "wer_a": p.wer_a, "wer_b": p.wer_b, "diff": p.diff,
                          "diff_ci": list(p.diff_ci), "rel_reduction": p.rel_reduction,
                          "rel_ci": list(p.rel_ci), "p_not_better": p.p_not_better,
                          "unit": p.unit, "n_units": p.n_units})
        out["compare"] = {"system": b, "paired": tests}
    return out


def _finite(x):
    """JSON has no nan/inf: write them as null (an undefined rate)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename); nan/inf become null."""
    with atomic_write(path) as f:
        json.dump(_finite(obj), f, indent=2, ensure_ascii=False, allow_nan=False)
        f.write("\n")
    return Path(path)


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return path


def _pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return "∞" if math.isinf(x) else f"{100 * x:.2f}%"


def _ci(ci) -> str:
    lo, hi = ci
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return ""
    return f" [{100 * lo:.2f}, {100 * hi:.2f}]"


def _system_md(s: dict) -> list[str]:
    lines = [f"- Hypotheses: `{s['name']}` ({s['hypotheses']} lines)"]
    m, e = s["missing"], s["extra"]
    if m["count"]:
        more = " …" if m["count"] > len(m["ids"]) else ""
        lines.append(f"- **Missing hypotheses: {m['count']}** reference ids have none; scored as all "
                     f"deletions: {', '.join(m['ids'])}{more}")
    else:
        lines.append("- Missing hypotheses: 0")
    if e["count"]:
        more = " …" if e["count"] > len(e["ids"]) else ""
        lines.append(f"- **Unknown ids: {e['count']}** hypotheses are not in the reference and were "
                     f"not scored: {', '.join(e['ids'])}{more}")
    flags = ", ".join(f"`{k}` {v}" for k, v in s["flags"].items())
    lines.append(f"- Flagged by the labeller: {s['flagged']} scored hypotheses" + (f" ({flags})" if flags else ""))
    lines += ["", "| group | utterances | ref words | WER [95% CI] | CER [95% CI] | sub/del/ins |",
              "|---|---:|---:|---|---|---|"]
    dagger = False
    for g in s["groups"]:
        mark = "†" if g["ci_unit"] == "utterance" and _ci(g["wer_ci"]) else ""
        dagger |= bool(mark)
        lines.append(f"| {g['name'].replace('|', '/')} | {g['utterances']} | {g['ref_words']} | {_pct(g['wer'])}{_ci(g['wer_ci'])}{mark} "
                     f"| {_pct(g['cer'])}{_ci(g['cer_ci'])}{mark} "
                     f"| {g['substitutions']}/{g['deletions']}/{g['insertions']} |")
    if dagger:
        lines += ["", "† interval resamples utterances (fewer than two speakers in the group, or no "
                      "speaker field); it ignores within-speaker correlation and is likely too narrow."]
    return lines


def render_markdown(results: dict) -> str:
    """The report as markdown: provenance, caveats, one table per system, the A/B test."""
    bs, ref = results["bootstrap"], results["reference"]
    out = ["# Evaluation", "",
           f"- Reference: `{ref['name']}` ({ref['utterances']} utterances, {ref['speakers']} speakers)",
           f"- Normaliser: `{results['normalizer']}`, applied to reference and hypothesis alike",
           "- WER = total errors / total reference words (corpus level, not a mean of per-utterance rates)",
           f"- CER on normalised text; {results['cer_spaces']}",
           f"- 95% CIs: {bs['method']} bootstrap, {bs['n_resamples']} resamples of {bs['unit']}s (seed {bs['seed']})"
           if bs["n_resamples"] else "- CIs: not computed (bootstrap off)"]
    out += [f"- Note: {n}" for n in results["notes"]]
    cmp = results.get("compare")
    out += ["", f"## System{' A' if cmp else ''}: {results['system']['name']}", ""] + _system_md(results["system"])
    if cmp:
        out += ["", f"## System B: {cmp['system']['name']}", ""] + _system_md(cmp["system"])
        out += ["", "## A vs B (paired bootstrap)", "",
                "Both systems are scored on the same resampled speakers. Difference = WER_A − WER_B "
                "(positive: B better); relative = 1 − WER_B/WER_A; P(B not better) = fraction of "
                "resamples with WER_B ≥ WER_A.", "",
                "| group | WER A | WER B | A − B [95% CI] | relative [95% CI] | P(B not better) |",
                "|---|---|---|---|---|---|"]
        for t in cmp["paired"]:
            p = "—" if t["p_not_better"] is None or math.isnan(t["p_not_better"]) else f"{t['p_not_better']:.3f}"
            out.append(f"| {t['name'].replace('|', '/')} | {_pct(t['wer_a'])} | {_pct(t['wer_b'])} | {_pct(t['diff'])}{_ci(t['diff_ci'])} "
                       f"| {_pct(t['rel_reduction'])}{_ci(t['rel_ci'])} | {p} |")
    return "\n".join(out) + "\n"


def plot_wer_bars(results: dict[str, dict[str, tuple[float, float, float]]], path: str | os.PathLike,
                  title: str | None = None, ylabel: str = "WER (%)") -> Path:
    """Grouped bar chart: one colour per system, one cluster per group, CI error bars.

    ``results`` maps system -> group -> (wer, lo, hi) as fractions; a nan/inf
    or absent value leaves a gap. Uses the Agg canvas directly (no pyplot
    global state), so it is safe in threads and headless machines.
    """
    import numpy as np
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = list(dict.fromkeys(g for per in results.values() for g in per))
    n_sys = max(1, len(results))
    width = 0.8 / n_sys
    fig = Figure(figsize=(min(2 + 0.35 * len(groups) * max(1, n_sys * 0.6), 40), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    for k, (name, per) in enumerate(results.items()):
        vals = [per.get(g, (math.nan, math.nan, math.nan)) for g in groups]
        w = np.array([v[0] if v[0] is not None else math.nan for v in vals], dtype=float) * 100
        lo = np.array([v[1] if v[1] is not None else math.nan for v in vals], dtype=float) * 100
        hi = np.array([v[2] if v[2] is not None else math.nan for v in vals], dtype=float) * 100
        w[~np.isfinite(w)] = np.nan
        err = np.nan_to_num(np.clip(np.vstack([w - lo, hi - w]), 0, None), nan=0.0)
        # an undefined WER gets no bar at all, not a bar at 0 that reads as perfect
        ax.bar(x + (k - (n_sys - 1) / 2) * width, w, width, yerr=err,
               capsize=2, label=name)
    ax.set_xticks(x, groups, rotation=45 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "WER per group (95% CI)")
    ax.set_ylim(bottom=0)
    if len(results) > 1:
        ax.legend()
    fig.savefig(path, dpi=120)
    return path


def _bars(system: dict, keep: set[str]) -> dict[str, tuple]:
    return {g["name"]: (g["wer"], *g["wer_ci"]) for g in system["groups"] if g["name"] in keep}


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write eval.json, eval.md and wer.png into ``out_dir``; returns their paths.

    The chart shows ``all`` and the fields with at most MAX_PLOT_VALUES
    groups (per-speaker bars would be unreadable; they stay in the table).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = results["system"]["groups"]
    per_field = Counter(g["field"] for g in groups)
    keep = {g["name"] for g in groups if g["field"] is None or per_field[g["field"]] <= MAX_PLOT_VALUES}
    bars = {results["system"]["name"]: _bars(results["system"], keep)}
    if results.get("compare"):
        b = results["compare"]["system"]
        name = b["name"] if b["name"] not in bars else b["name"] + " (B)"
        bars[name] = _bars(b, keep)
    return {
        "json": write_json(out_dir / "eval.json", results),
        "md": _write_text(out_dir / "eval.md", render_markdown(results)),
        "png": plot_wer_bars(bars, out_dir / "wer.png"),
    }
