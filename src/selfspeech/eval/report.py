"""Evaluation I/O: tolerant JSONL reading, results JSON, markdown report, WER bar chart.

``build_results`` turns references and hypotheses into one plain dict (the
content of ``eval.json``); ``render_markdown`` and ``plot_wer_bars`` only
present that dict, so the JSON, the table and the chart can never disagree.
Nothing is dropped silently: references without a hypothesis are scored as
all deletions and counted, unknown hypothesis ids and labeller flags are
counted, and every such fact is written into the report.
"""
from __future__ import annotations

import math
import os
import warnings
from array import array
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from selfspeech.data.atomic import atomic_write, write_json
from selfspeech.data.manifest import ManifestError, parse_line
from selfspeech.data.versions import software_versions, versions_line
from selfspeech.eval.coverage import check_coverage, note_subset, subset_of
from selfspeech.eval.sources import JsonlIndex, ListSource
from selfspeech.eval.wer import (
    MISSING, ErrorCounts, Group, as_text, bootstrap_ci, count_errors_batch, field_value, group_seed, group_value_order,
    paired_bootstrap,
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


def _flag_list(h: dict) -> list[str]:
    """A hypothesis' labeller flags; a bare string counts as one flag."""
    fl = h.get("flags") or []
    out = [fl] if isinstance(fl, str) else [str(x) for x in fl]
    return out + ["failed"] if h.get("status") == "failed" and "failed" not in out else out  # decode-ctc's


CHUNK = 1000  # utterances aligned per jiwer call: memory bounded by the chunk, not the corpus


@dataclass
class _Pass:
    """What one pass over the references keeps: per-utterance integers, never texts."""

    n: int
    counts: list[np.ndarray]            # per system, (n, 10) int64 in FIELDS order
    speakers: np.ndarray | None         # (n,) speaker code, -1 for none; None: no speaker field at all
    n_speakers: int
    groups: list[Group]
    missing: list[tuple[int, list[str]]]  # per system: (count, first ids)
    flags: list[tuple[int, dict]]       # per system: hypotheses with a flag, count per flag
    notes: list[str]


def _first(acc: list, uid: str, limit: int) -> None:
    acc[0] += 1
    if len(acc[1]) < limit:
        acc[1].append(uid)


def _score_pass(refs: Iterable[dict], sources: Sequence, by: Sequence[str], speaker_field: str,
                norm: Callable[[str], str]) -> _Pass:
    """Score every system in one streaming pass over ``refs`` (reference order), ``CHUNK`` at a time."""
    k = len(sources)
    counts: list[list[np.ndarray]] = [[] for _ in range(k)]
    buf_r: list[str] = []
    buf_h: list[list[str]] = [[] for _ in range(k)]
    spk_codes, spk_index, has_spk = array("q"), {}, False
    fcodes = {f: array("q") for f in by}
    fvalues: dict[str, dict[str, int]] = {f: {} for f in by}
    present = dict.fromkeys(by, False)
    known: set[str] = set()
    none_spk, empty, moji = [0, []], [0, []], [0, []]
    missing = [[0, []] for _ in range(k)]
    matched_flags = [[0, Counter()] for _ in range(k)]

    def flush() -> None:
        for j in range(k):
            counts[j].append(count_errors_batch(buf_r, buf_h[j]))
            buf_h[j].clear()
        buf_r.clear()

    n = 0
    for r in refs:
        n += 1
        uid, raw = r["id"], r.get("text")
        rt = norm(as_text(raw))
        buf_r.append(rt)
        if not rt.strip():  # 0 reference words: any hypothesis word is an insertion; say so rather than hide it
            _first(empty, uid, 5)
        if "\ufffd" in str(raw or ""):
            _first(moji, uid, 5)
        has_spk = has_spk or speaker_field in r
        v = r.get(speaker_field)
        spk_codes.append(-1 if v is None else spk_index.setdefault(str(v), len(spk_index)))
        if v is None:
            _first(none_spk, uid, 5)
        if by:
            known.update(r)
            if isinstance(r.get("metadata"), Mapping):
                known.update(r["metadata"])
        for f in by:
            fv = field_value(r, f)
            present[f] = present[f] or fv is not None
            fcodes[f].append(fvalues[f].setdefault(MISSING if fv is None else str(fv), len(fvalues[f])))
        for j, src in enumerate(sources):
            h = src.get(uid)
            if h is None:  # scored against nothing: all deletions, and reported
                _first(missing[j], uid, SHOW_IDS)
            else:
                fl = _flag_list(h)
                matched_flags[j][0] += bool(fl)
                matched_flags[j][1].update(set(fl))
            buf_h[j].append(norm(as_text(None if h is None else h.get("text"))))
        if len(buf_r) >= CHUNK:
            flush()
    flush()
    for f in by:
        if n and not present[f]:
            raise ValueError(f"no reference line has field {f!r}; available: {', '.join(sorted(known))}")
    groups = [Group("all", None, None, np.arange(n))]
    for f in by:
        codes = np.array(fcodes[f], dtype=np.int64)
        for v in sorted(fvalues[f], key=group_value_order):
            groups.append(Group(f"{f}={v}", f, v, np.flatnonzero(codes == fvalues[f][v])))
    notes = []
    if not has_spk:
        notes.append(f"no {speaker_field!r} field in the reference: intervals resample utterances, "
                     "which is too narrow when speakers have several utterances")
    elif none_spk[0]:
        notes.append(f"{none_spk[0]} reference lines have no {speaker_field!r}: each is resampled as its own unit "
                     f"{none_spk[1]}")
    if empty[0]:
        notes.append(f"{empty[0]} reference(s) are empty after normalisation (scored with 0 words; "
                     f"hypothesis words count as insertions): {empty[1]}")
    if moji[0]:
        notes.append(f"{moji[0]} reference(s) contain U+FFFD (bytes that were not UTF-8): {moji[1]}")
    speakers = np.array(spk_codes, dtype=np.int64) if has_spk else None
    return _Pass(n, [np.concatenate(c) for c in counts], speakers, len(spk_index) if has_spk else 0, groups,
                 [(m[0], m[1]) for m in missing],
                 [(c, dict(sorted(pf.items(), key=lambda kv: (-kv[1], kv[0])))) for c, pf in matched_flags], notes)


def _speaker_list(p: _Pass, index: np.ndarray) -> list | None:
    """Speaker codes of these rows as a list, None for rows without a speaker (the bootstrap's input)."""
    if p.speakers is None:
        return None
    return [None if c < 0 else c for c in p.speakers[index].tolist()]


def _system(name: str, p: _Pass, j: int, source, n_resamples: int, seed: int) -> dict:
    """Summary of system ``j`` of the pass: per-group counts, rates and speaker-bootstrap intervals."""
    rows = []
    for g in p.groups:
        spk = _speaker_list(p, g.index)
        ci = bootstrap_ci(p.counts[j][g.index], spk, n_resamples, group_seed(seed, g.name))
        rows.append({
            "name": g.name, "field": g.field, "value": g.value, "utterances": int(len(g.index)),
            "speakers": len({x for x in spk if x is not None}) if spk else 0,
            **ErrorCounts.from_array(p.counts[j][g.index]).to_dict(),
            "wer_ci": list(ci.wer), "cer_ci": list(ci.cer), "ci_unit": ci.unit, "ci_units": ci.n_units,
        })
    n_extra, extra = source.unused(SHOW_IDS)
    flagged, per_flag = p.flags[j]
    return {
        "name": name, "hypotheses": source.n,
        "missing": {"count": p.missing[j][0], "ids": p.missing[j][1]},
        "extra": {"count": n_extra, "ids": extra},
        "flagged": flagged, "flags": per_flag, "groups": rows,
    }


def build_results(refs: list[dict], hyps: list[dict], *, by: Sequence[str] = (),
                  normalizer: str = "whisper_english", n_resamples: int = 1000, seed: int = 0,
                  compare: list[dict] | None = None, names: tuple[str, str] = ("hyp", "compare"),
                  ref_name: str = "ref", speaker_field: str = "speaker", notes: Sequence[str] = (),
                  min_coverage: float = 0.0, subset: bool = False) -> dict:
    """Everything ``eval.json`` holds: per-group counts, WER/CER with CIs, and an optional A/B test.

    ``refs`` need ``id`` and ``text``; ``hyps`` need ``id`` and may carry
    ``text`` (None counts as empty) and ``flags``. Raises ValueError for an
    unknown normaliser or a ``by`` field no reference has. For files too large
    to hold, :func:`build_results_files` computes the same dict streaming.

    CoverageError (a ValueError) when a system has hypotheses for less than
    ``min_coverage`` of the reference ids; ``subset`` scores only the
    references with a hypothesis in every system instead, and notes it.
    """
    sources = [ListSource(hyps)] + ([ListSource(compare)] if compare is not None else [])
    return _covered_results(refs, sources, min_coverage, subset, by=by, normalizer=normalizer,
                            n_resamples=n_resamples, seed=seed, names=names, ref_name=ref_name,
                            speaker_field=speaker_field, notes=notes)[0]


def build_results_files(ref: str | os.PathLike, hyp: str | os.PathLike, compare: str | os.PathLike | None = None,
                        *, by: Sequence[str] = (), normalizer: str = "whisper_english", n_resamples: int = 1000,
                        seed: int = 0, names: tuple[str, str] | None = None, speaker_field: str = "speaker",
                        notes: Sequence[str] = (), warn: Callable[[str], None] | None = None,
                        min_coverage: float = 0.0, subset: bool = False, align: str | os.PathLike | None = None) -> dict:
    """:func:`build_results` for JSONL files, in memory bounded by a chunk: texts are read as scored.

    The files are validated first as ``read_jsonl`` would (ManifestError naming
    ``path:line``); a half-written last hypothesis line is skipped with ``warn``.
    ``align``: also write the per-utterance word alignments of ``hyp`` there
    (:mod:`selfspeech.eval.align`).
    """
    refs = JsonlIndex(ref, required=("id", "text"))
    if refs.n == 0:
        raise ValueError(f"{ref}: no reference lines")
    sources = [JsonlIndex(h, required=("id", "text"), allow_partial_last=True, warn=warn,
                          keep=("id", "text", "flags", "status"))
               for h in ([hyp] + ([compare] if compare is not None else []))]
    names = names or (str(hyp), str(compare) if compare is not None else "")
    results, scored = _covered_results(refs, sources, min_coverage, subset, by=by, normalizer=normalizer,
                                       n_resamples=n_resamples, seed=seed, names=names, ref_name=str(ref),
                                       speaker_field=speaker_field, notes=notes)
    if align is not None:
        from selfspeech.eval.align import write_alignments

        n = write_alignments(scored, sources[0], get_normalizer(normalizer), align)
        results["alignments"] = {"path": str(align), "system": names[0], "utterances": n}
    return results


def _covered_results(refs: Iterable[dict], sources: Sequence, min_coverage: float, subset: bool,
                     **kw) -> tuple[dict, Iterable[dict]]:
    """(results, the references scored): all of them, refused below ``min_coverage``; or with ``subset``
    only those with a hypothesis in every system."""
    if subset:
        covered = subset_of(refs, sources, kw["ref_name"])
        return note_subset(_results(covered, sources, **kw), covered, min_coverage), covered
    return check_coverage(_results(refs, sources, **kw), min_coverage), refs


def _results(refs: Iterable[dict], sources: Sequence, *, by, normalizer, n_resamples, seed, names, ref_name,
             speaker_field, notes) -> dict:
    norm = get_normalizer(normalizer)
    # references are shared by both systems and most hypotheses repeat across them: normalising a
    # distinct string once halves the slowest step; bounded, so memory does not grow with the corpus
    cached = lru_cache(maxsize=4096)(norm)
    p = _score_pass(refs, sources, list(by), speaker_field, cached)
    out = {
        "reference": {"name": ref_name, "utterances": p.n, "speakers": p.n_speakers},
        "normalizer": norm.name, "by": list(by),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "level": 0.95, "method": "percentile",
                      "unit": "speaker" if p.speakers is not None else "utterance"},
        "cer_spaces": "the single space between words counts as a character",
        "system": _system(names[0], p, 0, sources[0], n_resamples, seed), "compare": None,
        "notes": list(notes) + p.notes, "versions": software_versions(),
    }
    if len(sources) > 1:
        b = _system(names[1], p, 1, sources[1], n_resamples, seed)
        tests = []
        for g in p.groups:
            pb = paired_bootstrap(p.counts[0][g.index], p.counts[1][g.index], _speaker_list(p, g.index),
                                  n_resamples, group_seed(seed, "paired:" + g.name))
            tests.append({"name": g.name, "wer_a": pb.wer_a, "wer_b": pb.wer_b, "diff": pb.diff,
                          "diff_ci": list(pb.diff_ci), "rel_reduction": pb.rel_reduction,
                          "rel_ci": list(pb.rel_ci), "p_not_better": pb.p_not_better,
                          "unit": pb.unit, "n_units": pb.n_units})
        out["compare"] = {"system": b, "paired": tests}
    return out


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
    if results.get("versions"):  # absent in eval.json files written before it was recorded
        out.append(f"- {versions_line(results['versions'])}")
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
