"""The ``selfspeech adapt`` recipe: a YAML file read into frozen dataclasses.

Only plain values live here (paths, rules, numbers); the pipeline builds what
it needs from them. Unknown keys are an error, so a typo cannot silently fall
back to a default. Relative paths are resolved against the recipe's folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe that cannot run; raised before any long computation starts."""


@dataclass(frozen=True)
class DataSpec:
    kaldi_dir: str | None = None       # a Kaldi data directory, or
    manifest: str | None = None        # a manifest (JSONL) with speaker and metadata
    source_rule: str = "age_group==adult"   # source domain: real transcripts usable
    target_rule: str = "age_group==child"   # target domain: transcripts only to measure
    # source speakers: train (tau), dev (early stopping), sim (the label-free lambda rule)
    source_parts: dict = field(default_factory=lambda: {"train": 0.6, "dev": 0.15, "sim": 0.25})
    # target speakers: adapt (unlabelled) and eval (measurement only)
    target_parts: dict = field(default_factory=lambda: {"adapt": 0.5, "eval": 0.5})
    dev_fraction: float = 0.2          # speakers of an adapt/sim set held out for early stopping
    max_utts_per_speaker: int | None = None  # subsample (seeded) to bound compute
    seed: int = 0


@dataclass(frozen=True)
class TeacherSpec:
    name: str = "whisper-base"
    batch_size: int = 8
    drop_flagged: bool = True          # train only on labels that pass the label-free filters
    max_new_tokens: int = 128
    window_s: float = 15.0             # encoder window, see label.teacher.DecodeOptions


@dataclass(frozen=True)
class StudentSpec:
    init: str = "whisper-tiny.en"
    finetune: dict = field(default_factory=dict)   # FinetuneConfig overrides
    decode_batch_size: int = 16
    max_new_tokens: int = 128


@dataclass(frozen=True)
class LambdaSpec:
    grid: tuple = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    # "source_sim": tau from source-train, lambda picked on held-out source speakers (sim part)
    # fine-tuned on their own pseudo-labels and scored with their real labels: the target's
    # situation rehearsed inside the source, never touching target transcripts.
    rule: str = "source_sim"
    fixed: float | None = None        # rule "fixed": use this value
    # where tau applies (arith.task_vector.SCOPES); with several, the rule picks the scope
    # together with lambda on the same held-out source speakers
    scopes: tuple = ("all",)
    oracle_sweep: bool = True          # also sweep on target labels, reported as an oracle only


@dataclass(frozen=True)
class ClusterSpec:
    k: int = 2
    level: str = "speaker"             # speaker | utterance
    extractor: str = "melstats"        # or a speaker-model checkpoint directory
    min_size: int = 3                  # clusters with fewer source speakers are merged
    random_control: bool = True
    enabled: bool = True


@dataclass(frozen=True)
class Recipe:
    name: str = "pseudo2real"
    data: DataSpec = DataSpec()
    teacher: TeacherSpec = TeacherSpec()
    student: StudentSpec = StudentSpec()
    lam: LambdaSpec = LambdaSpec()
    clusters: ClusterSpec = ClusterSpec()
    normalizer: str = "whisper_english"
    systems: tuple = ("teacher", "zero_shot", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random",
                      "source_real_ft", "source_real_plus_target_pseudo", "oracle")
    root: str = "."                    # folder the recipe's relative paths are resolved against

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (Path(self.root) / q).resolve()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataSpec, "teacher": TeacherSpec, "student": StudentSpec, "lambda": LambdaSpec,
             "clusters": ClusterSpec}
_FIELD_OF = {"lambda": "lam"}


def _build(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if cls is LambdaSpec:
        from selfspeech.arith.task_vector import SCOPES

        bad = [x for x in values.get("scopes", ()) if x not in SCOPES]
        if bad or values.get("scopes") == ():
            raise RecipeError(f"{where}: scopes {list(values.get('scopes'))}: each must be one of {', '.join(SCOPES)}")
    return cls(**values)


def recipe_from_dict(d: dict[str, Any], root: str | Path = ".", where: str = "recipe") -> Recipe:
    d = dict(d or {})
    kw: dict[str, Any] = {"root": str(root)}
    for key, cls in _SECTIONS.items():
        if key in d:
            kw[_FIELD_OF.get(key, key)] = _build(cls, d.pop(key) or {}, f"{where}: {key}")
    for key in ("name", "normalizer", "systems"):
        if key in d:
            kw[key] = tuple(d.pop(key)) if key == "systems" else d.pop(key)
    if d:
        raise RecipeError(f"{where}: unknown section(s) {', '.join(sorted(d))}; known: "
                          f"{', '.join(sorted([*_SECTIONS, 'name', 'normalizer', 'systems']))}")
    return Recipe(**kw)


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe; RecipeError names the file and the problem."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if d is not None and not isinstance(d, dict):
        raise RecipeError(f"{path}: expected a mapping of sections at top level")
    return recipe_from_dict(d or {}, path.resolve().parent, str(path))
