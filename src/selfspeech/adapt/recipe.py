"""The ``selfspeech adapt`` recipe: a YAML file read into typed, frozen dataclasses.

Only plain values live here (paths, rules, numbers); the pipeline builds what
it needs from them. The recipe is loaded by the one strict loader
(:func:`selfspeech.config.from_mapping`): unknown keys, wrong types and values
out of range stop with one line naming the dotted key and the fix, and
:func:`check_recipe` then checks what needs the file system (the data source,
its speakers, the model names) - all before any model is loaded or audio read.
Relative data paths are resolved against the recipe's folder.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from selfspeech.arith.groups import GROUPS
from selfspeech.arith.task_vector import SCOPES
from selfspeech.config import ConfigError, apply_overrides, checked, from_mapping, invalid, to_mapping
from selfspeech.text.normalize import NORMALIZERS
from selfspeech.train.whisper_ft import FinetuneConfig

Scope = Literal[tuple(SCOPES)]
Group = Literal[tuple(GROUPS)]
Normalizer = Literal[NORMALIZERS]
System = Literal["teacher", "zero_shot", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random", "source_real_ft",
                 "source_real_plus_target_pseudo", "oracle", "p2r_union", "pseudo_ft_mixed", "p2r_mixed",
                 "p2r_iter", "p2r_groups", "p2r_sc_error"]
SOURCE_PARTS, TARGET_PARTS = ("train", "dev", "sim"), ("adapt", "eval")


class RecipeError(ConfigError):
    """A recipe that cannot run; raised before any long computation starts."""


def _check_parts(key: str, parts: dict, names: tuple[str, ...]) -> None:
    """Speaker counts (integers >= 1; the last part takes the rest) or fractions in (0, 1] summing to 1."""
    if set(parts) != set(names):
        raise invalid(key, parts, f"not the parts {', '.join(names)}", f"name exactly {', '.join(names)}")
    values = list(parts.values())
    if all(isinstance(v, int) for v in values):
        return
    if not all(0 < v <= 1 for v in values) or abs(sum(values) - 1) > 1e-6:
        raise invalid(key, parts, f"neither speaker counts nor fractions summing to 1 (sum {sum(values):g})",
                      "give fractions in (0, 1] summing to 1, or speaker counts (integers >= 1)")


@dataclass(frozen=True)
class DataSpec:
    kaldi_dir: str | None = None       # one data source, a Kaldi data directory, or
    manifest: str | None = None        # a manifest (JSONL) with speaker and metadata, split by the rules; or
    source_manifest: str | None = None  # two manifests: the labelled source domain (speakers and transcripts)
    target_manifest: str | None = None  # and the target domain (transcripts and speakers optional)
    source_rule: str = "age_group==adult"   # one data source: the source domain (real transcripts usable)
    target_rule: str = "age_group==child"   # one data source: the target domain (transcripts only to measure)
    # target speakers: auto = the speaker field when every target line has one, else recording;
    # recording = one pseudo-speaker per recording (the `recording` field of segments, else the audio file)
    target_speakers: Literal["auto", "field", "recording"] = "auto"
    # source speakers: train (tau), dev (early stopping), sim (the label-free lambda rule)
    source_parts: dict[str, int | float] = checked(
        default_factory=lambda: {"train": 0.6, "dev": 0.15, "sim": 0.25}, gt=0)
    # target speakers: adapt (unlabelled) and eval (measurement only)
    target_parts: dict[str, int | float] = checked(default_factory=lambda: {"adapt": 0.5, "eval": 0.5}, gt=0)
    dev_fraction: float = checked(0.2, gt=0, lt=1)  # speakers of an adapt/sim set held out for early stopping
    max_utts_per_speaker: int | None = checked(None, ge=1)  # subsample (seeded) to bound compute
    seed: int = 0  # seeds the subsampling, the speaker splits, the clusters and the report's bootstraps

    def __post_init__(self):
        from selfspeech.data.select import parse_rule

        _check_parts("source_parts", self.source_parts, SOURCE_PARTS)
        _check_parts("target_parts", self.target_parts, TARGET_PARTS)
        for key in ("source_rule", "target_rule"):
            try:
                parse_rule(getattr(self, key))
            except ValueError:
                raise invalid(key, getattr(self, key), "not a selection rule",
                              "write e.g. age_group==adult or 'age>=18, gender==f'") from None


@dataclass(frozen=True)
class TeacherSpec:
    # the pseudo-labeller, decoded with faster-whisper: a model name (`selfspeech models list`),
    # a Whisper folder, or a hub id
    name: str = checked("whisper-base", nonempty=True)
    batch_size: int = checked(8, ge=1)  # utterances decoded together
    drop_flagged: bool = True          # train only on labels that pass the label-free filters
    max_new_tokens: int = checked(128, ge=1)  # most tokens decoded per utterance (a longer label is cut)
    window_s: float = checked(15.0, gt=0, le=30)  # encoder window, see label.teacher.DecodeOptions
    compute_type: str = "auto"         # faster-whisper's: auto = int8 on a CPU, float16 on a GPU
    language: str = checked("en", nonempty=True)  # of the audio, a code or name; .en teachers take en only
    task: Literal["transcribe", "translate"] = "transcribe"  # translate: into English (multilingual teachers)


@dataclass(frozen=True)
class StudentSpec:
    # the model every student starts from: a model name (`selfspeech models list`), a Whisper folder, or a hub id
    init: str = checked("whisper-tiny.en", nonempty=True)
    # the fine-tune of every student; its normaliser is the recipe's (Recipe.normalizer)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    decode_batch_size: int = checked(16, ge=1)  # utterances per batch when a student decodes (greedy)
    max_new_tokens: int = checked(128, ge=1)  # most tokens a student decodes per utterance
    # a decoding loop (an n-gram of up to 4 tokens repeated this many times in a row) ends the
    # hypothesis with one copy kept (models.whisper.loop_cut); 0: decode to EOT or max_new_tokens
    max_repeats: int = checked(4, ge=0)
    # systems p2r_mixed / pseudo_ft_mixed: fine-tunes that continue from the source "mixed" model run at
    # this times finetune.lr (the Pseudo2Real authors' scripts continue at lr / 10)
    continue_lr_scale: float = checked(0.1, gt=0, le=1)
    # extra fine-tuning seeds of tau: each fine-tunes one more source-real and source-pseudo student
    # (finetune.seed replaced), and tau is the mean over {finetune.seed, *tau_seeds} of their differences,
    # which averages out fine-tuning noise. It is the tau of p2r, the lambda rehearsal, the oracle sweep,
    # p2r_union, p2r_iter and p2r_groups; the cluster taus (p2r_sc) and tau_mixed (p2r_mixed) keep one seed.
    # Each seed keeps its tau on disk (up to a student's size in fp32)
    tau_seeds: tuple[int, ...] = ()

    def __post_init__(self):
        seeds = self.tau_seeds
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise invalid("tau_seeds", seeds, "not a list of integers", "give integer seeds, e.g. [1, 2]")
        if len(set(seeds)) != len(seeds):
            raise invalid("tau_seeds", seeds, "naming a seed twice", "name each seed once")
        if self.finetune.seed in seeds:
            raise invalid("tau_seeds", seeds, f"naming student.finetune.seed ({self.finetune.seed}), which "
                          "tau always uses", "list only the extra seeds")


@dataclass(frozen=True)
class LambdaSpec:
    # the lambdas tried (the weight of tau): by rule source_sim on the sim speakers, and by the oracle sweep
    grid: tuple[float, ...] = checked((0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5), ge=0, nonempty=True)
    # "source_sim": tau from source-train, lambda picked on held-out source speakers (sim part)
    # fine-tuned on their own pseudo-labels and scored with their real labels: the target's
    # situation rehearsed inside the source, never touching target transcripts.
    rule: Literal["source_sim", "fixed"] = "source_sim"
    fixed: float | None = checked(None, ge=0)  # rule "fixed": use this value
    # where tau applies (arith.task_vector.SCOPES); with several, the rule picks the scope
    # together with lambda on the same held-out source speakers
    scopes: tuple[Scope, ...] = checked(("all",), nonempty=True)
    oracle_sweep: bool = True          # also sweep on target labels, reported as an oracle only
    # system p2r_groups (adapt.lambda_groups): one lambda per module group (arith.groups.GROUPS), searched
    # from the chosen (lambda, scope) one group at a time on group_grid, on the same held-out source speakers;
    # a change must lower their WER by more than group_min_gain (absolute), ties go to the smaller lambda
    groups: tuple[Group, ...] = ()
    group_grid: tuple[float, ...] = checked((0.0, 0.5, 1.0, 1.5), ge=0, nonempty=True)  # lambdas tried per group
    group_min_gain: float = checked(0.002, ge=0)  # absolute WER a group change must gain (0.002 = 0.2 points)
    group_passes: int = checked(2, ge=1, le=4)  # passes over the groups (stops once one changes nothing)

    def __post_init__(self):
        if self.rule == "fixed" and self.fixed is None:
            raise invalid("fixed", None, "not set although lambda.rule is fixed",
                          "set lambda.fixed to the lambda to use, or lambda.rule: source_sim")


@dataclass(frozen=True)
class ClusterSpec:
    k: int = checked(2, ge=1)  # k-means clusters, one tau each (fewer once small clusters are merged)
    level: Literal["speaker", "utterance"] = "speaker"  # what is clustered: speakers (mean embedding) or utterances
    extractor: str = checked("melstats", nonempty=True)  # or a speaker-model checkpoint directory
    min_size: int = checked(3, ge=1)   # clusters with fewer source speakers are merged
    random_control: bool = True  # also run p2r_sc_random: clusters of the same sizes, members drawn at random
    # false: no Pseudo2Real-SC (p2r_sc, p2r_sc_random, p2r_sc_error), even when systems lists them;
    # p2r_sc_error clusters speakers by the teacher's error rate (k and min_size apply, the extractor does not)
    enabled: bool = True


@dataclass(frozen=True)
class IterativeSpec:
    """System p2r_iter (selfspeech.adapt.iterative): the corrected student relabels the target each round."""

    max_rounds: int = checked(3, ge=1)  # most relabelling rounds, under either stop rule
    # agreement: stop once a round changes fewer than min_change of the previous labels' words;
    # source_sim: the same rounds on the held-out source speakers, stop at their lowest WER
    stop: Literal["agreement", "source_sim"] = "agreement"
    min_change: float = checked(0.01, ge=0, le=1)  # stop agreement: share of changed words (0..1) that ends it
    drop_flagged: bool = True          # drop the student's empty and repetitive labels (the teacher's filters)


@dataclass(frozen=True)
class Recipe:
    name: str = checked("pseudo2real", nonempty=True)  # the report's title and the default run folder `runs/<name>`
    data: DataSpec = field(default_factory=DataSpec)  # the data source and its speaker-disjoint parts
    teacher: TeacherSpec = field(default_factory=TeacherSpec)  # the Whisper model that pseudo-labels every part
    student: StudentSpec = field(default_factory=StudentSpec)  # the Whisper students: start, fine-tuning, decoding
    lam: LambdaSpec = checked(default_factory=LambdaSpec, key="lambda")  # how lambda, the weight of tau, is chosen
    clusters: ClusterSpec = field(default_factory=ClusterSpec)  # speaker clusters of systems p2r_sc, p2r_sc_random
    iterative: IterativeSpec = field(default_factory=IterativeSpec)  # system p2r_iter
    # the one text normaliser: student fine-tunes (dev WER), the lambda sweeps and the report
    normalizer: Normalizer = "whisper_english"
    # the systems built, decoded and compared in the report; pseudo_ft and p2r always run, oracle needs
    # target transcripts
    systems: tuple[System, ...] = checked(("teacher", "zero_shot", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random",
                                           "source_real_ft", "source_real_plus_target_pseudo", "oracle"),
                                          nonempty=True)
    # where every stage computes (teacher, fine-tunes, decoding, speaker encoder): auto|cpu|cuda|cuda:N;
    # student.finetune.device, when set, places the fine-tunes elsewhere
    device: str = "auto"
    root: str = field(default=".", metadata={"internal": True})  # folder relative data paths start from
    source: str = field(default="recipe", metadata={"internal": True})  # the file, named in messages

    def __post_init__(self):
        ft = self.student.finetune
        if ft.normalizer != self.normalizer:  # the fine-tunes use the recipe's normaliser, nothing else
            ft = dataclasses.replace(ft, normalizer=self.normalizer)
        if ft.device == "auto" and self.device != "auto":
            ft = dataclasses.replace(ft, device=self.device)
        if ft is not self.student.finetune:
            object.__setattr__(self, "student", dataclasses.replace(self.student, finetune=ft))
        _check_groups(self.lam, self.systems)

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (Path(self.root) / q).resolve()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self) -> dict:
        """The recipe with every default filled in, as a mapping ``recipe_from_dict`` reads back
        (data paths made absolute, the normaliser only at the top level)."""
        d = to_mapping(self)
        d["student"]["finetune"].pop("normalizer", None)
        for key in ("kaldi_dir", "manifest", "source_manifest", "target_manifest"):
            if d["data"][key]:
                d["data"][key] = str(self.path(d["data"][key]))
        return d


def _check_groups(lam: LambdaSpec, systems: tuple[str, ...]) -> None:
    """System p2r_groups and lambda.groups go together, and the groups are searched on the sim speakers."""
    if "p2r_groups" in systems and not lam.groups:
        raise invalid("systems", systems, "asking for p2r_groups without lambda.groups",
                      f"set lambda.groups to some of {', '.join(GROUPS)}, or drop p2r_groups")
    if lam.groups and "p2r_groups" not in systems:
        raise invalid("lambda.groups", lam.groups, "set but systems lacks p2r_groups",
                      "add p2r_groups to systems, or remove lambda.groups")
    if lam.groups and lam.rule != "source_sim":
        raise invalid("lambda.groups", lam.groups, f"searched on the sim speakers, which rule {lam.rule!r} skips",
                      "set lambda.rule: source_sim, or remove lambda.groups and p2r_groups")
    if len(set(lam.groups)) != len(lam.groups):
        raise invalid("lambda.groups", lam.groups, "naming a group twice", "name each group once")


def _refuse_second_normalizer(d: Mapping, where: str) -> None:
    student = d.get("student")
    ft = student.get("finetune") if isinstance(student, Mapping) else None
    if isinstance(ft, Mapping) and "normalizer" in ft:
        raise RecipeError(f"{where}: student.finetune.normalizer: {ft['normalizer']!r} is a second normaliser; "
                          "set the recipe's top-level `normalizer:` instead (one normaliser for the fine-tunes, "
                          "the lambda sweeps and the report)")


def recipe_from_dict(d: Mapping[str, Any] | None, root: str | Path = ".", where: str = "recipe",
                     overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """A Recipe from a mapping (plus dotted ``key=value`` overrides); RecipeError names the key."""
    try:
        d = apply_overrides(d or {}, overrides, Recipe, where=f"{where}: override") if overrides else (d or {})
        _refuse_second_normalizer(d, where)
        r = from_mapping(Recipe, d, where)
    except RecipeError:
        raise
    except ConfigError as e:
        raise RecipeError(str(e)) from None
    return dataclasses.replace(r, root=str(root), source=where)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe (and dotted overrides); RecipeError names the file, the key and the fix."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found; give the path of a recipe YAML "
                          "(e.g. recipes/speechocean762/pseudo2real.yaml)")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({' '.join(str(e).split())}); fix the syntax there") from None
    if d is not None and not isinstance(d, dict):
        raise RecipeError(f"{path}: {type(d).__name__} at top level is not a mapping; write sections "
                          "such as data:, teacher:, student:")
    return recipe_from_dict(d or {}, path.resolve().parent, str(path), overrides)


# -- what needs the file system: checked before any model is loaded or audio read ---------------

def check_recipe(recipe: Recipe) -> None:
    """Everything that can be checked before hours of compute; opens no model file, reads no audio."""
    from selfspeech.adapt import prepare as P

    from selfspeech.accel import DeviceError, check_device
    from selfspeech.label.teacher import resolve_compute_type

    where = recipe.source
    device, _ = check_device(recipe.device, None, f"{where}: ")  # a device this machine lacks: refused here
    try:
        resolve_compute_type(recipe.teacher.compute_type, device, key=f"{where}: teacher.compute_type")
    except ValueError as e:
        if isinstance(e, DeviceError):
            raise
        raise RecipeError(str(e)) from None
    ft = recipe.student.finetune
    check_device(ft.device, ft.precision, f"{where}: student.finetune.")
    t = recipe.teacher
    check_model_name(t.name, f"{where}: teacher.name", t.language, t.task, f"{where}: teacher.language")
    check_model_name(recipe.student.init, f"{where}: student.init", ft.language, ft.task,
                     f"{where}: student.finetune.language")
    if recipe.clusters.enabled and {"p2r_sc", "p2r_sc_random"} & set(recipe.systems):
        _check_extractor(where, recipe.clusters.extractor)
    # a Kaldi directory's audio headers are read only when a rule selects by duration
    rules = recipe.data.source_rule + recipe.data.target_rule
    domains = P.load_domains(recipe, durations="duration" in rules)  # the data exists, parses, has speakers
    P.split_parts(recipe, domains)  # every part and early-stopping split gets speakers


def check_model_name(name: str, key: str, language: str = "en", task: str = "transcribe",
                     language_key: str | None = None) -> None:
    """A model name (built-in or registered), a local Whisper folder, or a hub id (online, or downloaded
    before) that can decode ``language`` and ``task``; neither pulls nor opens a model. ``key`` leads
    the message about the model, ``language_key`` the one about its language."""
    import difflib

    from selfspeech.models.sources import ModelError, check_language, is_hub_id
    from selfspeech.models.zoo import known_names, model_languages

    try:
        multilingual = model_languages(name)
    except ModelError as e:
        if Path(name).expanduser().is_dir() or is_hub_id(name):
            raise RecipeError(f"{key}: {e}") from None
        close = difflib.get_close_matches(name, known_names(), n=1)
        raise RecipeError(f"{key}: {name!r} is neither a known model nor a folder; "
                          f"{f'did you mean {close[0]!r}? ' if close else ''}choose one of "
                          f"{', '.join(known_names())} (`selfspeech models list`), give a model folder, "
                          "or a hub id such as openai/whisper-large-v3 (online)") from None
    try:
        check_language(name, multilingual, language, task)
    except ModelError as e:
        raise RecipeError(f"{language_key or key}: {e}") from None


def _check_extractor(where: str, name: str) -> None:
    from selfspeech.models.ecapa_sb import find_speechbrain_checkpoint

    p = Path(name).expanduser()
    if name == "melstats" or find_speechbrain_checkpoint(p) is not None or any(
            (d / "config.json").is_file() and (d / "model.safetensors").is_file() for d in (p, p / "encoder")):
        return
    raise RecipeError(f"{where}: clusters.extractor: {name!r} is not a speaker extractor; use melstats, the "
                      "folder written by `selfspeech sv train` (its encoder/ subfolder) or a SpeechBrain ECAPA "
                      "embedding_model.ckpt (or its folder)")
