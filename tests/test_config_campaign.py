"""Refused configs: every config-taking command stops at once with one line naming the key and the fix.

Each case runs a real command (``selfspeech adapt``, ``finetune-whisper``,
``pretrain``, ``finetune-ctc``, ``sv train``) on an invalid recipe, config or
override and checks: exit code 2, a single output line naming the dotted key
and saying how to fix it, under 2 seconds, and that no model file was opened
and no audio read (the functions that would do it are replaced by recorders,
the model cache points at an empty folder).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time

import pytest
import yaml

ADULTS, CHILDREN = 12, 8


@pytest.fixture(scope="module")
def cli():
    """The app, with every module of the package imported first: so each case times the refusal, not
    imports, and no module first imported under the recorders below keeps a recorder after the test."""
    import importlib
    import pkgutil

    import selfspeech
    from selfspeech.cli import app

    for m in pkgutil.walk_packages(selfspeech.__path__, "selfspeech."):
        try:
            importlib.import_module(m.name)
        except ImportError:  # an optional extra that is not installed
            pass
    return app


@pytest.fixture
def opened(monkeypatch, tmp_path):
    """Everything that would open a model file, pull a model or read audio, recorded instead."""
    import faster_whisper
    import safetensors
    import safetensors.torch
    import soundfile
    import torch
    import transformers

    from selfspeech.models import zoo

    # resolved before anything is replaced: transformers imports its modules on first attribute access,
    # and a module imported under the recorders would keep one
    model_classes = (transformers.PreTrainedModel, transformers.WhisperForConditionalGeneration)
    calls: list[str] = []

    def recorder(name):
        def record(*a, **k):
            calls.append(f"{name}{a[:1]}")
            raise RuntimeError(f"{name} called")
        return record

    targets = {safetensors.torch.load_file: "safetensors.load_file", safetensors.safe_open: "safetensors.safe_open",
               torch.load: "torch.load", soundfile.read: "soundfile.read", soundfile.info: "soundfile.info",
               soundfile.SoundFile: "soundfile.SoundFile",
               zoo.pull: "zoo.pull"}
    for mod in [m for name, m in list(sys.modules.items()) if name.startswith(("selfspeech", "safetensors",
                                                                                "soundfile", "torch"))]:
        for attr, val in list(vars(mod).items()):
            try:
                hit = val in targets
            except TypeError:
                continue
            if hit:
                monkeypatch.setattr(mod, attr, recorder(targets[val]))
    for cls in model_classes:
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: recorder("from_pretrained")(*a)))
    monkeypatch.setattr(faster_whisper.WhisperModel, "__init__", recorder("faster_whisper.WhisperModel"))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SELFSPEECH_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield calls
    assert not any(cache.iterdir()), "the model cache was written"


@pytest.fixture
def ws(tmp_path):
    """A manifest whose audio files do not exist (so any audio read would fail) and a valid recipe."""
    items = [{"id": f"{g}{s:02d}u{u}", "audio_filepath": f"audio/{g}{s:02d}u{u}.flac", "duration": 1.0 + u,
              "speaker": f"{g}{s:02d}", "age_group": "adult" if g == "a" else "child", "text": "red cat"}
             for g, n in (("a", ADULTS), ("c", CHILDREN)) for s in range(n) for u in range(2)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    nospk = [{k: v for k, v in it.items() if not (k == "speaker" and it["age_group"] == "child")} for it in items]
    (tmp_path / "nospk.jsonl").write_text("".join(json.dumps(it) + "\n" for it in nospk))
    srcnospk = [{k: v for k, v in it.items() if not (k == "speaker" and it["age_group"] == "adult")} for it in items]
    (tmp_path / "srcnospk.jsonl").write_text("".join(json.dumps(it) + "\n" for it in srcnospk))
    (tmp_path / "train.jsonl").write_text((tmp_path / "m.jsonl").read_text())
    return tmp_path


BASE = {"name": "campaign", "data": {"manifest": "m.jsonl"}, "teacher": {"name": "whisper-base"},
        "student": {"init": "whisper-tiny.en", "finetune": {"lr": 1e-5, "max_steps": 10}},
        "lambda": {"grid": [0, 0.5, 1]}, "clusters": {"k": 2}}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) and v else v
    return out


def recipe(**sections):
    """argv of ``adapt`` on BASE changed by ``sections`` (a value of None deletes the key)."""
    def build(ws):
        d = _merge(BASE, sections)
        (ws / "r.yaml").write_text(yaml.safe_dump(d))
        return ["adapt", str(ws / "r.yaml"), "--out", str(ws / "run")]
    return build


def raw_recipe(text: str, *overrides: str):
    def build(ws):
        (ws / "r.yaml").write_text(text)
        return ["adapt", str(ws / "r.yaml"), *overrides, "--out", str(ws / "run")]
    return build


def adapt_override(*overrides: str):
    def build(ws):
        (ws / "r.yaml").write_text(yaml.safe_dump(BASE))
        return ["adapt", str(ws / "r.yaml"), *overrides, "--out", str(ws / "run")]
    return build


def command(name: str, config: dict | None, *args: str, inputs=("--manifest", "train.jsonl")):
    """argv of a training command with ``config`` written to c.yaml (None: no config file)."""
    def build(ws):
        files = [str(ws / "c.yaml")] if config is not None else []
        if config is not None:
            (ws / "c.yaml").write_text(yaml.safe_dump(config))
        opts = [str(ws / x) if x.endswith(".jsonl") else x for x in inputs]
        return [*name.split(), *files, *args, *opts, "--out", str(ws / "out")]
    return build


WHISPER = ("--train", "train.jsonl", "--dev", "train.jsonl")
CTC = ("--train", "train.jsonl", "--dev", "train.jsonl")

NO_CUDA = not __import__("torch").cuda.is_available()
# devices this machine lacks, refused before any model loads (on a GPU machine only the device-free ones run)
DEVICE_CASES = {
    "device_not_a_device": (command("sv train", None, "--device", "tpu"), ["loop.device 'tpu': not a device",
                                                                          "cuda:N"]),
    "precision_not_one": (command("pretrain", None, "loop.precision=half"), ["loop.precision: 'half'",
                                                                             "fp32, bf16"]),
    "teacher_compute_type_unknown": (adapt_override("teacher.compute_type=int4"),
                                     ["teacher.compute_type 'int4': not a faster-whisper compute type", "int8"]),
} | ({
    "adapt_device_cuda_without_cuda": (adapt_override("--device", "cuda"),
                                       ["r.yaml: device 'cuda': no CUDA device", "; use device cpu (or auto)"]),
    "adapt_student_fp16_on_cpu": (adapt_override("--device", "cpu", "--precision", "fp16"),
                                  ["student.finetune.precision fp16: float16 training needs a CUDA GPU"]),
    "teacher_float16_on_cpu": (adapt_override("device=cpu", "teacher.compute_type=float16"),
                               ["teacher.compute_type float16 on cpu: half precision needs a CUDA GPU", "int8"]),
    "device_cuda_without_cuda": (command("pretrain", None, "--device", "cuda"),
                                 ["loop.device 'cuda': no CUDA device is available", "cpu"]),
    "device_cuda1_without_cuda": (command("finetune-whisper", None, "--device", "cuda:1", inputs=WHISPER),
                                  ["device 'cuda:1': no CUDA device", "use device cpu"]),
    "fp16_on_cpu": (command("finetune-ctc", None, "targets=char", "loop.precision=fp16", inputs=CTC),
                    ["loop.precision fp16: float16 training needs a CUDA GPU", "bf16 or fp32"]),
} if NO_CUDA else {})

CASES = {
    **DEVICE_CASES,
    # adapt: wrong types
    "lr_not_a_number": (recipe(student={"finetune": {"lr": "abc"}}), ["student.finetune.lr: 'abc' is not a number",
                                                                      "write a number"]),
    "max_steps_float": (recipe(student={"finetune": {"max_steps": 2.5}}), ["student.finetune.max_steps: 2.5",
                                                                            "whole number"]),
    "max_utts_word": (recipe(data={"max_utts_per_speaker": "one"}), ["data.max_utts_per_speaker: 'one' is not an "
                                                                     "integer", "whole number"]),
    "max_utts_zero": (recipe(data={"max_utts_per_speaker": 0}), ["data.max_utts_per_speaker: 0 is below 1",
                                                                 ">= 1"]),
    "enabled_string": (recipe(clusters={"enabled": "yes"}), ["clusters.enabled: 'yes' is not true or false",
                                                             "write true or false"]),
    # adapt: unknown or misspelled keys and sections
    "misspelled_lr": (recipe(student={"finetune": {"learning_rate": 1e-5}}),
                      ["student.finetune.learning_rate", "did you mean 'lr'"]),
    "unknown_section": (recipe(studnet={"init": "whisper-tiny.en"}), ["studnet:", "did you mean 'student'"]),
    "second_normalizer": (recipe(student={"finetune": {"normalizer": "basic"}}),
                          ["student.finetune.normalizer", "top-level `normalizer:`"]),
    # adapt: lambda grids
    "grid_negative": (recipe(**{"lambda": {"grid": [0, -0.5]}}), ["lambda.grid[1]: -0.5 is below 0",
                                                                   "a number >= 0"]),
    "grid_empty": (recipe(**{"lambda": {"grid": []}}), ["lambda.grid: [] is empty", "at least one"]),
    "grid_string": (recipe(**{"lambda": {"grid": "0,0.5,1"}}), ["lambda.grid: '0,0.5,1' is not a list",
                                                                 "write a list"]),
    "grid_word": (recipe(**{"lambda": {"grid": [0, "half"]}}), ["lambda.grid[1]: 'half' is not a number"]),
    "fixed_unset": (recipe(**{"lambda": {"rule": "fixed"}}), ["lambda.fixed: None is not set", "set lambda.fixed"]),
    "scope_unknown": (recipe(**{"lambda": {"scopes": ["all", "middle"]}}),
                      ["lambda.scopes[1]: 'middle' is not a known choice", "encoder"]),
    # adapt: ranges and choices
    "parts_sum": (recipe(data={"source_parts": {"train": 0.6, "dev": 0.3, "sim": 0.3}}),
                  ["data.source_parts:", "summing to 1"]),
    "parts_names": (recipe(data={"target_parts": {"adapt": 0.5, "test": 0.5}}), ["data.target_parts:",
                                                                                  "name exactly adapt, eval"]),
    "dev_fraction": (recipe(data={"dev_fraction": 1.5}), ["data.dev_fraction: 1.5 is not below 1", "< 1"]),
    "batch_zero": (recipe(teacher={"batch_size": 0}), ["teacher.batch_size: 0 is below 1", ">= 1"]),
    "level_unknown": (recipe(clusters={"level": "cluster"}), ["clusters.level: 'cluster' is not a known choice",
                                                              "speaker, utterance"]),
    "normalizer_unknown": (recipe(normalizer="fancy"), ["normalizer: 'fancy'", "whisper_english"]),
    "system_unknown": (recipe(systems=["p2r", "sparkles"]), ["systems[1]: 'sparkles'", "choose one of"]),
    "rule_syntax": (recipe(data={"source_rule": "age_group=>adult"}), ["data.source_rule:", "not a selection rule",
                                                                       "write e.g."]),
    # adapt: what needs the file system
    "manifest_missing": (recipe(data={"manifest": "gone.jsonl"}), ["data.manifest:", "gone.jsonl' is not found",
                                                                   "give an existing manifest"]),
    "teacher_unknown": (recipe(teacher={"name": "whisper-bse"}), ["teacher.name: 'whisper-bse'",
                                                                  "did you mean 'whisper-base'"]),
    "student_missing_dir": (recipe(student={"init": "models/none"}), ["student.init: 'models/none'",
                                                                      "give a model folder"]),
    "extractor_unknown": (recipe(clusters={"extractor": "ecapa-nowhere"}), ["clusters.extractor:", "sv train"]),
    # a target without speakers gets one pseudo-speaker per recording, unless the recipe asks for the field
    "target_speakers_field_missing": (recipe(data={"manifest": "nospk.jsonl", "target_speakers": "field"}),
                                      ["data.target_speakers: field, but 16 target utterance(s) have no speaker",
                                       "set data.target_speakers: recording"]),
    "source_without_speakers": (recipe(data={"manifest": "srcnospk.jsonl"}),
                                ["data.manifest:", "source utterance(s) without a speaker field", "add it"]),
    "two_manifests_half_given": (recipe(data={"manifest": None, "source_manifest": "train.jsonl"}),
                                 ["data: data.source_manifest is given without data.target_manifest",
                                  "give both data.source_manifest and data.target_manifest"]),
    "rule_selects_nothing": (recipe(data={"target_rule": "age_group==elder"}),
                             ["data.target_rule: 'age_group==elder' selects no utterance"]),
    "parts_too_many": (recipe(data={"target_parts": {"adapt": 9, "eval": 1}}),
                       ["data.target_parts: {'adapt': 9, 'eval': 1} cannot be split", "give smaller"]),
    # adapt: the file itself and overrides
    "not_a_mapping": (raw_recipe("- data\n- teacher\n"), ["r.yaml: list at top level is not a mapping"]),
    "yaml_broken": (raw_recipe("data: {manifest: [\n"), ["r.yaml: not valid YAML", "fix the syntax"]),
    "override_bad_lr": (adapt_override("student.finetune.lr=abc"), ["student.finetune.lr: 'abc' is not a number"]),
    "override_bad_grid": (adapt_override("lambda.grid=[0,-1]"), ["lambda.grid[1]: -1.0 is below 0"]),
    "override_typo": (adapt_override("lamda.grid=[0,1]"), ["override: lamda.grid", "did you mean 'lambda'"]),
    "override_form": (adapt_override("student.finetune.lr"), ["'student.finetune.lr' is not a dotted override",
                                                              "key.sub=value"]),
    "override_yaml": (adapt_override("lambda.grid=[0,"), ["lambda.grid: '[0,' is not a YAML value",
                                                          "write lists as [a, b]"]),
    "override_into_scalar": (adapt_override("name.x=1"), ["override: name: 'campaign' is not a section"]),
    # finetune-whisper
    "ft_lr_word": (command("finetune-whisper", {"lr": "abc"}, inputs=WHISPER), ["lr: 'abc' is not a number"]),
    "ft_misspelled": (command("finetune-whisper", {"learning_rate": 1e-3}, inputs=WHISPER),
                      ["learning_rate", "did you mean 'lr'"]),
    "ft_override_steps": (command("finetune-whisper", None, "max_steps=0", inputs=WHISPER),
                          ["max_steps: 0 is below 1", ">= 1"]),
    "ft_schedule": (command("finetune-whisper", {"schedule": "cosin"}, inputs=WHISPER),
                    ["schedule: 'cosin' is not a known choice", "cosine"]),
    "ft_unknown_init": (command("finetune-whisper", None, "--init", "whisper-nope", inputs=WHISPER),
                        ["--init: 'whisper-nope' is neither a known model", "choose one of"]),
    "ft_manifest_missing": (command("finetune-whisper", None, inputs=("--train", "nope.jsonl")),
                            ["--train: '", "nope.jsonl' is not found", "give the path of an existing manifest"]),
    # pretrain
    "pt_batch_word": (command("pretrain", {"max_batch_seconds": "lots"}), ["max_batch_seconds: 'lots' is not a number"]),
    "pt_misspelled": (command("pretrain", {"objectiv": "bestrq"}), ["objectiv", "did you mean 'objective'"]),
    "pt_override_form": (command("pretrain", {}, "loop.lr"), ["'loop.lr' is not a dotted override"]),
    "pt_config_missing": (lambda ws: ["pretrain", str(ws / "none.yaml"), "--manifest", str(ws / "train.jsonl"),
                                      "--out", str(ws / "o")], ["none.yaml: config not found"]),
    "pt_manifest_missing": (command("pretrain", {}, inputs=("--manifest", "gone.jsonl")),
                            ["--manifest: '", "gone.jsonl' is not found"]),
    "pt_objective": (command("pretrain", {"objective": "bestrk"}), ["objective: 'bestrk' is not a known choice",
                                                                     "wav2vec2, bestrq, birq"]),
    "pt_loop_lr": (command("pretrain", {}, "loop.lr=abc"), ["loop.lr: 'abc' is not a number"]),
    "pt_loop_steps": (command("pretrain", {"loop": {"max_steps": -5}}), ["loop.max_steps: -5 is below 1"]),
    "pt_encoder_key": (command("pretrain", {"encoder": {"preset": "tiny", "d_modle": 32}}),
                       ["encoder.d_modle", "did you mean 'd_model'"]),
    "pt_encoder_preset": (command("pretrain", {"encoder": {"preset": "huge"}}),
                          ["encoder.preset: 'huge' is not a known preset", "tiny, small"]),
    "pt_task_key": (command("pretrain", {"objective": "wav2vec2", "task": {"negatves": 3}}),
                    ["task.negatves", "did you mean 'negatives'"]),
    # finetune-ctc
    "ctc_targets": (command("finetune-ctc", {"targets": "word", "lexicon": "x"}, inputs=CTC),
                    ["targets: 'word' is not a known choice", "phone, char"]),
    "ctc_no_lexicon": (command("finetune-ctc", {}, inputs=CTC), ["lexicon: None is not set although targets is "
                                                                "phone", "--lexicon"]),
    "ctc_mask_prob": (command("finetune-ctc", {"targets": "char"}, "mask_time_prob=1.5", inputs=CTC),
                      ["mask_time_prob: 1.5 is above 1", "<= 1"]),
    "ctc_loop_patience": (command("finetune-ctc", {"targets": "char", "loop": {"patience": 0}}, inputs=CTC),
                          ["loop.patience: 0 is below 1"]),
    "ctc_freeze_word": (command("finetune-ctc", {"freeze_steps": "many"}, inputs=CTC),
                        ["freeze_steps: 'many' is not an integer"]),
    "ctc_lexicon_missing": (command("finetune-ctc", {"lexicon": "no_lexicon.txt"}, inputs=CTC),
                            ["lexicon: 'no_lexicon.txt' is not found", "existing lexicon"]),
    "ctc_unknown_key": (command("finetune-ctc", None, "lexicn=x.txt", inputs=CTC),
                        ["override: lexicn", "did you mean 'lexicon'"]),
    # sv train
    "sv_segment_word": (command("sv train", {"segment_seconds": "two"}), ["segment_seconds: 'two' is not a number"]),
    "sv_projector_scalar": (command("sv train", {"projector": 512}), ["projector: 512 is not a list"]),
    "sv_unknown_override": (command("sv train", None, "bogus=1"), ["override: bogus", "known keys"]),
    "sv_method": (command("sv train", {"method": "moco"}), ["method: 'moco' is not a known choice", "simclr, dino"]),
    "sv_batch_one": (command("sv train", {"batch_size": 1}), ["batch_size: 1 is below 2", ">= 2"]),
    "sv_ssps_key": (command("sv train", {}, "--ssps", "ssps.kk=3"), ["ssps.kk: 3 is set under an unknown key",
                                                                      "did you mean 'k'"]),
    "sv_ecapa_preset": (command("sv train", {"ecapa": {"preset": "giant"}}),
                        ["ecapa.preset: 'giant' is not a known preset", "small"]),
    "sv_loop_lr": (command("sv train", {"loop": {"lr": -1e-3}}), ["loop.lr: -0.001 is not above 0"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_config(case, cli, opened, ws, monkeypatch):
    from typer.testing import CliRunner

    build, expected = CASES[case]
    monkeypatch.chdir(ws)
    argv = build(ws)
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, argv)
    seconds = time.perf_counter() - t0
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, out, res.exception)
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error: "), out
    for piece in expected:
        assert piece in out, (piece, out)
    assert ";" in out  # what is wrong; how to fix it
    assert seconds < 2.0, seconds
    assert opened == [], opened
    assert not (ws / "run").exists() and not (ws / "out").exists()  # nothing written before the refusal


def test_campaign_covers_every_config_command(tmp_path):
    names = [tuple(build(tmp_path)[:2]) for build, _ in CASES.values()]
    used = {n[0] if n[0] != "sv" else "sv train" for n in names}
    assert len(CASES) >= 25
    assert used == {"adapt", "finetune-whisper", "pretrain", "finetune-ctc", "sv train"}


def test_the_guard_sees_model_and_audio_reads(cli, opened):
    """The recorders are in place where the package would open a model or read audio."""
    import soundfile
    import transformers

    from selfspeech.audio import io
    from selfspeech.models import zoo
    from selfspeech.train import checkpoint

    for call in (lambda: checkpoint.load_file("model.safetensors"), lambda: zoo.pull("whisper-base"),
                 lambda: transformers.WhisperForConditionalGeneration.from_pretrained("x"),
                 lambda: io.sf.read("a.flac"), lambda: soundfile.SoundFile("a.flac")):
        with pytest.raises(RuntimeError, match="called"):
            call()
    assert len(opened) == 5
    opened.clear()


def test_valid_configs_run_with_overrides_and_save_the_resolved_config(cli, opened, ws, monkeypatch):
    """The same commands on valid configs reach the trainer (stubbed) with the overrides applied, and
    leave OUT/resolved_config.json, which reads back into the same config."""
    from typer.testing import CliRunner

    import selfspeech.adapt.pseudo2real as p2r
    import selfspeech.train.ctc as ctc
    import selfspeech.train.pretrain as pt
    import selfspeech.train.speaker as spk
    import selfspeech.train.whisper_ft as wft
    from selfspeech.adapt.recipe import recipe_from_dict
    from selfspeech.config import from_mapping

    got = {}
    monkeypatch.setattr(pt, "pretrain", lambda m, o, cfg, init=None: got.setdefault("pretrain", cfg) and {"skipped": []})
    monkeypatch.setattr(ctc, "finetune_ctc", lambda t, d, o, cfg, init=None: got.setdefault("ctc", cfg) and {})
    monkeypatch.setattr(spk, "train_speaker", lambda m, o, cfg, fork_from=None: got.setdefault("sv", cfg) and {})
    monkeypatch.setattr(wft, "finetune", lambda t, d, i, o, cfg: got.setdefault("ft", cfg) and o)
    monkeypatch.setattr(p2r, "run_pseudo2real", lambda r, o, log: got.setdefault("adapt", r) and {"report": o})
    monkeypatch.chdir(ws)
    (ws / "lex.txt").write_text("RED\tR EH1 D\nCAT\tK AE1 T\n")
    runs = {
        "pretrain": ["pretrain", "loop.lr=3e-4", "encoder.preset=tiny", "--manifest", "train.jsonl", "--out", "pt"],
        "ctc": ["finetune-ctc", "loop.max_steps=7", "--lexicon", "lex.txt", "--train", "train.jsonl", "--dev",
                "train.jsonl", "--out", "ctc"],
        "sv": ["sv", "train", "ssps.k=8", "--ssps", "--steps", "5", "--manifest", "train.jsonl", "--out", "sv"],
        "ft": ["finetune-whisper", "lr=3e-5", "--train", "train.jsonl", "--out", "ft"],
    }
    (ws / "r.yaml").write_text(yaml.safe_dump(BASE))
    runs["adapt"] = ["adapt", "r.yaml", "student.finetune.lr=3e-5", "lambda.grid=[0,0.5,1]", "--out", "p2r"]
    for name, argv in runs.items():
        res = CliRunner().invoke(cli, argv)
        assert res.exit_code == 0, (name, res.output, res.exception)
    assert got["pretrain"].loop.lr == 3e-4 and got["pretrain"].encoder_config().d_model == 32
    assert got["ctc"].loop.max_steps == 7 and got["ctc"].lexicon == "lex.txt"
    assert got["sv"].ssps.k == 8 and got["sv"].loop.max_steps == 5
    assert got["ft"].lr == 3e-5
    r = got["adapt"]
    assert r.student.finetune.lr == 3e-5 and r.lam.grid == (0.0, 0.5, 1.0)
    for out, name in (("pt", "pretrain"), ("ctc", "ctc"), ("sv", "sv"), ("ft", "ft")):
        saved = json.loads((ws / out / "resolved_config.json").read_text())
        assert from_mapping(type(got[name]), saved) == got[name], name
    saved = json.loads((ws / "p2r" / "resolved_config.json").read_text())
    again = recipe_from_dict(saved, root="/elsewhere", where=r.source)  # data paths are absolute there
    assert saved["data"]["manifest"] == str(ws / "m.jsonl") and again.path(again.data.manifest) == ws / "m.jsonl"
    assert dataclasses.replace(again, data=r.data, root=r.root) == r
    assert opened == []
