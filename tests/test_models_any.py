"""Models from anywhere: registered names, local folders, hub ids (mocked hub), and the refusals
(a folder without Whisper, a hub id while offline) in one line before any long computation."""
from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner
from whisper_toys import make_toy

from selfspeech.cli import app
from selfspeech.models import sources, zoo
from selfspeech.models.sources import ModelError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy") / "whisper-toy", "base")


@pytest.fixture(scope="module")
def toy_en(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy_en") / "whisper-toy.en", "tiny.en")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEECH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty Hugging Face cache
    return tmp_path / "cache"


def _one_line(r) -> str:
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


def test_add_list_resolve_remove(toy, cache):
    r = CliRunner().invoke(app, ["models", "add", "mine", str(toy)])
    assert r.exit_code == 0, r.output
    assert "mine" in r.output and "multilingual" in r.output and "80 mel bins" in r.output
    saved = json.loads((cache / sources.REGISTERED_FILE).read_text())
    assert saved == {"models": {"mine": {"path": str(toy.resolve())}}}
    r = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    row = next(x for x in r.output.splitlines() if " mine " in x)
    assert "4M" in row and "multilingual" in row and "registered" in row and str(toy) in r.output
    assert "whisper-base" in r.output and "whisper-tiny.en" in r.output  # the built-in ones stay listed
    paths = zoo.resolve_model("mine")
    assert paths.hf_dir == toy.resolve() and (paths.ct2_dir / "model.bin").is_file()
    assert "mine" in zoo.known_names() and zoo.model_languages("mine") is True
    assert CliRunner().invoke(app, ["models", "remove", "mine"]).exit_code == 0
    assert sources.registered() == {} and toy.is_dir()
    with pytest.raises(ModelError, match="'mine' is neither an existing directory nor a known model"):
        zoo.resolve_model("mine")
    assert "not a registered model" in _one_line(CliRunner().invoke(app, ["models", "remove", "mine"]))


def test_add_refuses_what_is_not_a_whisper_folder(tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_line(CliRunner().invoke(app, ["models", "add", "x", str(empty)]))
    assert "holds no Whisper model" in line and str(empty) in line
    w2v = tmp_path / "w2v"
    w2v.mkdir()
    (w2v / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    r = CliRunner().invoke(app, ["models", "add", "x", str(w2v)])
    assert r.exit_code == 2 and "model_type 'wav2vec2', not whisper" in _one_line(r)
    bad = tmp_path / "bad_ct2"
    bad.mkdir()
    (bad / "model.bin").write_bytes(b"\x05\x00\x00\x00garbage")
    assert "model.bin is not a CTranslate2 model" in _one_line(CliRunner().invoke(app, ["models", "add", "x", str(bad)]))
    assert "is built in" in _one_line(CliRunner().invoke(app, ["models", "add", "whisper-base", str(empty)]))
    assert "no '/'" in _one_line(CliRunner().invoke(app, ["models", "add", "a/b", str(empty)]))
    assert sources.registered() == {}


def test_a_folder_without_whisper_is_refused_by_resolve_and_recipes(tmp_path, cache):
    from selfspeech.adapt.recipe import RecipeError, check_model_name

    (tmp_path / "w2v").mkdir()
    (tmp_path / "w2v" / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(ModelError, match="model_type 'wav2vec2', not whisper"):
        zoo.resolve_model(tmp_path / "w2v")
    with pytest.raises(RecipeError, match="r.yaml: student.init: .*not whisper"):
        check_model_name(str(tmp_path / "w2v"), "r.yaml: student.init")
    assert not (cache / "local").exists()


def test_hub_id_offline_is_one_line_listing_what_works(toy, cache):
    sources.register("mine", toy)
    t0 = time.monotonic()
    with pytest.raises(ModelError) as e:
        zoo.resolve_model("openai/whisper-large-v3")
    msg = str(e.value)
    assert time.monotonic() - t0 < 2 and "\n" not in msg
    assert msg.startswith("'openai/whisper-large-v3' is a Hugging Face hub id, but the hub is offline (HF_HUB_OFFLINE")
    assert "whisper-base, whisper-tiny.en (built in" in msg and "mine (registered)" in msg and "model folder" in msg
    r = CliRunner().invoke(app, ["label", "--teacher", "openai/whisper-large-v3", "--in", str(toy / "config.json"),
                                 "--out", str(cache / "l.jsonl"), "--language", "de"])
    assert r.exit_code == 2 and "hub is offline" in _one_line(r)


def test_hub_id_unreachable_without_the_env_var(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(zoo, "_hub_reachable", lambda: False)
    with pytest.raises(ModelError, match=r"hub is offline \(the hub did not answer\)"):
        zoo.model_languages("distil-whisper/distil-large-v3")


def test_hub_id_online_downloads_once_then_works_offline(toy, cache, monkeypatch, tmp_path):
    import huggingface_hub

    from selfspeech.models.catalogue import catalogue

    calls = []
    monkeypatch.setattr(zoo, "_hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(toy))
    paths = zoo.resolve_model("someone/whisper-toy")
    assert paths.source == "hub" and paths.hf_dir == toy and (paths.ct2_dir / "model.bin").is_file()
    assert calls[0][0] == "someone/whisper-toy" and "model.safetensors" in calls[0][1]["allow_patterns"]
    monkeypatch.setattr(zoo, "_hub_reachable", lambda: False)
    assert zoo.resolve_model("someone/whisper-toy") == paths and len(calls) == 1
    assert zoo.model_languages("someone/whisper-toy") is True
    row = next(r for r in catalogue() if r.name == "someone/whisper-toy")
    assert (row.source, row.languages, row.size) == ("hub", "multilingual", "4M")


def test_hub_ctranslate2_repo_gets_its_transformers_half(toy, cache, monkeypatch):
    import huggingface_hub

    ct2 = zoo.resolve_model(toy).ct2_dir
    monkeypatch.setattr(zoo, "_hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(ct2))
    paths = zoo.resolve_model("Systran/faster-whisper-toy")
    assert paths.ct2_dir == ct2 and sources.inspect_dir(paths.hf_dir).kind == "transformers"


def test_hub_repo_without_whisper_is_refused_before_converting(tmp_path, cache, monkeypatch):
    import huggingface_hub

    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").write_text(json.dumps({"model_type": "bert"}))
    monkeypatch.setattr(zoo, "_hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(snap))
    with pytest.raises(ModelError, match=r"\(someone/bert\): config.json has model_type 'bert', not whisper"):
        zoo.resolve_model("someone/bert")
    assert not (cache / "hub" / "someone--bert" / zoo.MARKER).exists()


def test_english_only_teacher_refuses_german_in_label_and_recipes(toy_en, tmp_path, cache, monkeypatch):
    from selfspeech.adapt.recipe import RecipeError, check_model_name
    from selfspeech.label import teacher

    monkeypatch.setattr(teacher, "load_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "u", "audio_filepath": "u.flac", "duration": 1.0}) + "\n")
    for t in ("whisper-tiny.en", str(toy_en)):
        r = CliRunner().invoke(app, ["label", "--teacher", t, "--in", str(m), "--out", str(tmp_path / "l.jsonl"),
                                     "--language", "de"])
        assert r.exit_code == 2 and f"{t} is English-only; it cannot decode language 'de'" in _one_line(r)
    with pytest.raises(RecipeError, match="r: teacher.language: whisper-tiny.en is English-only"):
        check_model_name("whisper-tiny.en", "r: teacher.name", "de", "transcribe", "r: teacher.language")
    check_model_name("whisper-base", "r: teacher.name", "de", "translate")


def test_recipe_takes_teacher_language_and_task(tmp_path, cache):
    from selfspeech.adapt.recipe import RecipeError, recipe_from_dict

    r = recipe_from_dict({"teacher": {"name": "whisper-base", "language": "de", "task": "translate"},
                          "student": {"init": "whisper-base", "finetune": {"language": "de"}}})
    assert (r.teacher.language, r.teacher.task, r.student.finetune.language) == ("de", "translate", "de")
    with pytest.raises(RecipeError, match="teacher.task: 'summarise'"):
        recipe_from_dict({"teacher": {"task": "summarise"}})


def test_default_task_keeps_label_specs_and_configs_as_before():
    from selfspeech.label.resume import labelling_spec
    from selfspeech.label.teacher import DecodeOptions
    from selfspeech.train.whisper_ft import FinetuneConfig

    assert "task" not in labelling_spec("t", "faster-whisper", "int8", DecodeOptions())["options"]
    assert labelling_spec("t", "faster-whisper", "int8", DecodeOptions(task="translate"))["options"]["task"] == \
        "translate"
    assert "task" not in FinetuneConfig().to_dict()
    assert FinetuneConfig.from_dict(FinetuneConfig(task="translate").to_dict()).task == "translate"
