"""Data preparation of the Pseudo2Real pipeline: domains, speaker-disjoint parts, pseudo manifests.

Parts (all split by speaker, seeded):

- ``source_train`` / ``source_dev`` / ``source_sim``: source speakers (real labels usable);
  train builds tau, dev early-stops the source fine-tunes, sim rehearses the
  target situation to choose lambda without target labels;
- ``target_adapt`` / ``target_eval``: target speakers; adapt is unlabelled audio
  (its real transcripts are used only by the oracle, a measurement), eval is
  only ever scored.

``<part>_fit``/``<part>_stop`` split an adapt/sim part again by speaker, so a
pseudo-label fine-tune can early-stop on held-out pseudo-labels.
"""
from __future__ import annotations

import random
from pathlib import Path

from selfspeech.adapt.recipe import Recipe, RecipeError
from selfspeech.data.atomic import write_json
from selfspeech.data.kaldi import iter_kaldi_dir
from selfspeech.data.manifest import read_manifest, write_manifest
from selfspeech.data.select import select, split_by_speaker


def load_items(recipe: Recipe, durations: bool = True) -> list[dict]:
    """The data source's items; ``durations=False``: a Kaldi directory's audio is not opened."""
    d, where = recipe.data, recipe.source
    if bool(d.kaldi_dir) == bool(d.manifest):
        raise RecipeError(f"{where}: data: {d.kaldi_dir or d.manifest!r} is not one data source; "
                          "give exactly one of data.kaldi_dir or data.manifest")
    key, p = ("kaldi_dir", recipe.path(d.kaldi_dir)) if d.kaldi_dir else ("manifest", recipe.path(d.manifest))
    if not (p.is_dir() if d.kaldi_dir else p.is_file()):
        raise RecipeError(f"{where}: data.{key}: {str(p)!r} is not found; give an existing "
                          f"{'Kaldi data directory' if d.kaldi_dir else 'manifest (JSONL)'} (relative paths start "
                          "at the recipe's folder)")
    try:
        return list(iter_kaldi_dir(p, with_durations=durations)) if d.kaldi_dir else list(read_manifest(p))
    except ValueError as e:
        raise RecipeError(f"{where}: data.{key}: {' '.join(str(e).split())}") from None


def _subsample(items: list[dict], per_speaker: int | None, seed: int) -> list[dict]:
    if not per_speaker:
        return items
    by: dict[str, list[dict]] = {}
    for it in items:
        by.setdefault(str(it["speaker"]), []).append(it)
    rng = random.Random(seed)
    out = []
    for s in sorted(by):
        u = sorted(by[s], key=lambda x: x["id"])
        out += sorted(rng.sample(u, min(per_speaker, len(u))), key=lambda x: x["id"])
    return out


def split_parts(recipe: Recipe, items: list[dict]) -> dict[str, list[dict]]:
    """Every part (and the fit/stop splits of adapt and sim) as item lists; RecipeError if one is empty."""
    d, where = recipe.data, recipe.source
    source = _subsample(list(select(items, d.source_rule)), d.max_utts_per_speaker, d.seed)
    target = _subsample(list(select(items, d.target_rule)), d.max_utts_per_speaker, d.seed)
    if not source or not target:
        key, rule = ("source_rule", d.source_rule) if not source else ("target_rule", d.target_rule)
        raise RecipeError(f"{where}: data.{key}: {rule!r} selects no utterance (source {len(source)}, target "
                          f"{len(target)}); write a rule the manifest's fields meet, e.g. age_group==adult")
    parts = {}
    for side, its in (("source", source), ("target", target)):
        sizes = dict(getattr(d, f"{side}_parts"))
        try:
            parts.update({f"{side}_{k}": v for k, v in split_by_speaker(its, sizes, d.seed).items()})
        except ValueError as e:  # more speakers asked for than there are
            raise RecipeError(f"{where}: data.{side}_parts: {sizes!r} cannot be split ({e}); give smaller "
                              "speaker counts, or fractions summing to 1") from None
    for need in ("source_train", "source_dev", "source_sim", "target_adapt", "target_eval"):
        if not parts.get(need):
            side = need.split("_")[0]
            raise RecipeError(f"{where}: data.{side}_parts: {dict(getattr(d, f'{side}_parts'))!r} leaves part "
                              f"{need!r} without speakers; give it speakers (more speakers or other sizes)")
    for name in ("target_adapt", "source_sim"):
        sub = split_by_speaker(parts[name], {"fit": 1 - d.dev_fraction, "stop": d.dev_fraction}, d.seed + 1)
        if not sub["stop"] or not sub["fit"]:
            raise RecipeError(f"{where}: data.dev_fraction: {d.dev_fraction!r} holds out no speaker (or all) of "
                              f"{name} for early stopping; give {name} more speakers or change dev_fraction")
        parts[f"{name}_fit"], parts[f"{name}_stop"] = sub["fit"], sub["stop"]
    return parts


def make_parts(recipe: Recipe, out: Path) -> dict[str, str]:
    """Write every part's reference manifest into ``out``; returns name -> path."""
    parts = split_parts(recipe, load_items(recipe))
    paths = {}
    for name, its in parts.items():
        paths[name] = str(out / f"{name}.jsonl")
        write_manifest(paths[name], its)
    write_manifest(out / "all.jsonl", [it for n in ("source_train", "source_dev", "source_sim", "target_adapt",
                                                    "target_eval") for it in parts[n]])
    paths["all"] = str(out / "all.jsonl")
    summary = {n: {"utterances": len(v), "speakers": len({i["speaker"] for i in v})} for n, v in parts.items()}
    write_json(out / "parts.json", summary)
    return paths


def pseudo_manifest(ref_path: str, labels: dict[str, dict], out_path: Path, drop_flagged: bool) -> dict:
    """Copy of the part with ``text`` replaced by the teacher's label; returns counts.

    Failed labels are always dropped; flagged ones (empty, repetition,
    low_logprob, no_speech) too when ``drop_flagged``. Counted, never silent.
    """
    kept, dropped = [], {"failed": 0, "flagged": 0}
    for it in read_manifest(ref_path):
        lab = labels.get(it["id"])
        if lab is None or lab.get("status") != "ok":
            dropped["failed"] += 1
            continue
        if drop_flagged and lab.get("flags"):
            dropped["flagged"] += 1
            continue
        kept.append({**it, "text": lab["text"]})
    write_manifest(out_path, kept)
    return {"kept": len(kept), **dropped}


def concat(paths: list[str], out_path: Path) -> str:
    write_manifest(out_path, (it for p in paths for it in read_manifest(p)))
    return str(out_path)


def subset(path: str, keep_ids: set[str], out_path: Path) -> str:
    write_manifest(out_path, (it for it in read_manifest(path) if it["id"] in keep_ids))
    return str(out_path)
