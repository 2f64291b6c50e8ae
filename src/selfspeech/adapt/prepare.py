"""Data preparation of the Pseudo2Real pipeline: domains, speaker-disjoint parts, pseudo manifests.

Parts (all split by speaker, seeded):

- ``source_train`` / ``source_dev`` / ``source_sim``: source speakers (real labels usable);
  train builds tau, dev early-stops the source fine-tunes, sim rehearses the
  target situation to choose lambda without target labels;
- ``target_adapt`` / ``target_eval``: target speakers; adapt is unlabelled audio
  (its real transcripts are used only by the oracle, a measurement), eval is
  only ever scored. A target without transcripts has no eval part: every target
  speaker is adapted to, and the report can only say how far the systems agree
  with the teacher.

The domains come from one data source split by rules (``data.kaldi_dir`` or
``data.manifest`` with ``source_rule``/``target_rule``) or from two manifests
(``data.source_manifest``, ``data.target_manifest``). The source needs speakers
and transcripts; a target without speakers gets one pseudo-speaker per
recording (``data.target_speakers``), which keeps a recording's segments in one
part.

``<part>_fit``/``<part>_stop`` split an adapt/sim part again by speaker, so a
pseudo-label fine-tune can early-stop on held-out pseudo-labels.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from selfspeech.adapt.recipe import Recipe, RecipeError
from selfspeech.data.atomic import write_json
from selfspeech.data.kaldi import iter_kaldi_dir
from selfspeech.data.manifest import read_manifest, write_manifest
from selfspeech.data.select import select, split_by_speaker


def load_items(recipe: Recipe, durations: bool = True) -> list[dict]:
    """The one data source's items; ``durations=False``: a Kaldi directory's audio is not opened."""
    d, where = recipe.data, recipe.source
    if bool(d.kaldi_dir) == bool(d.manifest):
        raise RecipeError(f"{where}: data: {d.kaldi_dir or d.manifest!r} is not one data source; "
                          "give exactly one of data.kaldi_dir or data.manifest, or data.source_manifest and "
                          "data.target_manifest")
    key, p = ("kaldi_dir", recipe.path(d.kaldi_dir)) if d.kaldi_dir else ("manifest", recipe.path(d.manifest))
    if not (p.is_dir() if d.kaldi_dir else p.is_file()):
        raise RecipeError(f"{where}: data.{key}: {str(p)!r} is not found; give an existing "
                          f"{'Kaldi data directory' if d.kaldi_dir else 'manifest (JSONL)'} (relative paths start "
                          "at the recipe's folder)")
    try:
        return list(iter_kaldi_dir(p, with_durations=durations)) if d.kaldi_dir else list(read_manifest(p))
    except ValueError as e:
        raise RecipeError(f"{where}: data.{key}: {' '.join(str(e).split())}") from None


@dataclass(frozen=True)
class Domains:
    """The source and target items, with what the target lacks."""

    source: list[dict]
    target: list[dict]
    target_speakers: str   # "field" (the manifest's speakers) or "recording" (one pseudo-speaker each)
    target_labelled: bool  # every target line has a transcript: a target-eval part can be scored

    def info(self) -> dict:
        return {"target_speakers": self.target_speakers, "target_labelled": self.target_labelled,
                "source_utterances": len(self.source), "target_utterances": len(self.target)}


def _read(recipe: Recipe, key: str) -> list[dict]:
    p = recipe.path(getattr(recipe.data, key))
    if not p.is_file():
        raise RecipeError(f"{recipe.source}: data.{key}: {str(p)!r} is not found; give an existing manifest (JSONL) "
                          "(relative paths start at the recipe's folder)")
    try:
        return list(read_manifest(p))
    except ValueError as e:
        raise RecipeError(f"{recipe.source}: data.{key}: {' '.join(str(e).split())}") from None


def load_domains(recipe: Recipe, durations: bool = True) -> Domains:
    """Source and target items from one data source and the rules, or from two manifests; checked."""
    d, where = recipe.data, recipe.source
    if d.source_manifest or d.target_manifest:
        if not (d.source_manifest and d.target_manifest) or d.kaldi_dir or d.manifest:
            what = (f"data.{'kaldi_dir' if d.kaldi_dir else 'manifest'} is given beside the two manifests"
                    if d.kaldi_dir or d.manifest else
                    f"data.{'source' if d.source_manifest else 'target'}_manifest is given without "
                    f"data.{'target' if d.source_manifest else 'source'}_manifest")
            raise RecipeError(f"{where}: data: {what}; give both data.source_manifest and data.target_manifest "
                              "(and neither data.kaldi_dir nor data.manifest), or one data source with the rules")
        source, target, src_key = _read(recipe, "source_manifest"), _read(recipe, "target_manifest"), "source_manifest"
    else:
        items = load_items(recipe, durations)
        source, target = list(select(items, d.source_rule)), list(select(items, d.target_rule))
        src_key = "kaldi_dir" if d.kaldi_dir else "manifest"
        if not source or not target:
            key, rule = ("source_rule", d.source_rule) if not source else ("target_rule", d.target_rule)
            raise RecipeError(f"{where}: data.{key}: {rule!r} selects no utterance (source {len(source)}, target "
                              f"{len(target)}); write a rule the manifest's fields meet, e.g. age_group==adult")
    if not source or not target:
        side = "source" if not source else "target"
        raise RecipeError(f"{where}: data.{side}_manifest has no utterance; give a manifest with lines")
    for what, missing in (("a speaker field", [i.get("id") for i in source if i.get("speaker") in (None, "")]),
                          ("a transcript", [i.get("id") for i in source if not str(i.get("text") or "").strip()])):
        if missing:
            raise RecipeError(f"{where}: data.{src_key}: {len(missing)} source utterance(s) without {what} (first: "
                              f"{missing[0]!r}); the source domain's real labels build tau: add it to each line")
    mode = d.target_speakers
    if mode == "auto":
        mode = "field" if all(i.get("speaker") not in (None, "") for i in target) else "recording"
    if mode == "field":
        missing = [i.get("id") for i in target if i.get("speaker") in (None, "")]
        if missing:
            raise RecipeError(f"{where}: data.target_speakers: field, but {len(missing)} target utterance(s) have no "
                              f"speaker (first: {missing[0]!r}); add speakers or set data.target_speakers: recording")
    else:  # a recording's segments stay together in one part, as one speaker's would
        target = [{**i, "speaker": f"rec:{i.get('recording') or i['audio_filepath']}"} for i in target]
    labelled = all(str(i.get("text") or "").strip() for i in target)
    return Domains(_subsample(source, d.max_utts_per_speaker, d.seed),
                   _subsample(target, d.max_utts_per_speaker, d.seed), mode, labelled)


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


def split_parts(recipe: Recipe, domains: Domains) -> dict[str, list[dict]]:
    """Every part (and the fit/stop splits of adapt and sim) as item lists; RecipeError if one is empty.

    An unlabelled target is adapted to whole: ``target_eval`` is empty."""
    d, where = recipe.data, recipe.source
    parts = {}
    for side, its in (("source", domains.source), ("target", domains.target)):
        sizes = dict(getattr(d, f"{side}_parts")) if side == "source" or domains.target_labelled else {"adapt": 1.0}
        try:
            parts.update({f"{side}_{k}": v for k, v in split_by_speaker(its, sizes, d.seed).items()})
        except ValueError as e:  # more speakers asked for than there are
            raise RecipeError(f"{where}: data.{side}_parts: {sizes!r} cannot be split ({e}); give smaller "
                              "speaker counts, or fractions summing to 1") from None
    parts.setdefault("target_eval", [])
    needed = ("source_train", "source_dev", "source_sim", "target_adapt") + (("target_eval",) * domains.target_labelled)
    for need in needed:
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


def make_parts(recipe: Recipe, out: Path) -> dict:
    """Write every part's reference manifest into ``out``; returns name -> path, and ``info``
    (:meth:`Domains.info`: the target's speakers and whether it is labelled)."""
    domains = load_domains(recipe)
    parts = split_parts(recipe, domains)
    paths = {}
    for name, its in parts.items():
        paths[name] = str(out / f"{name}.jsonl")
        write_manifest(paths[name], its)
    write_manifest(out / "all.jsonl", [it for n in ("source_train", "source_dev", "source_sim", "target_adapt",
                                                    "target_eval") for it in parts[n]])
    paths["all"] = str(out / "all.jsonl")
    summary = {n: {"utterances": len(v), "speakers": len({i["speaker"] for i in v})} for n, v in parts.items()}
    write_json(out / "parts.json", summary)
    return {**paths, "info": domains.info()}


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


def concat(paths: list[str], out_path: Path, id_suffixes: tuple[str, ...] | None = None) -> str:
    """The manifests one after another; ``id_suffixes`` (one per path) keep ids unique when a part repeats."""
    sfx = id_suffixes or ("",) * len(paths)
    write_manifest(out_path, ({**it, "id": it["id"] + x} for p, x in zip(paths, sfx, strict=True)
                              for it in read_manifest(p)))
    return str(out_path)


def subset(path: str, keep_ids: set[str], out_path: Path) -> str:
    write_manifest(out_path, (it for it in read_manifest(path) if it["id"] in keep_ids))
    return str(out_path)
