"""The Pseudo2Real pipeline: stage cache, recipe checks, and one end-to-end run on tiny random models."""
import json
import re

import numpy as np
import pytest
import soundfile as sf

from selfspeech.adapt.recipe import RecipeError, load_recipe, recipe_from_dict
from selfspeech.adapt.stages import StageRunner
from selfspeech.data.manifest import read_manifest, write_manifest


def test_stage_cache_reruns_only_on_change(tmp_path):
    calls = []

    def fn(tag):
        def run(d):
            calls.append(tag)
            (d / "out.txt").write_text(tag)
            return {"tag": tag}
        return run

    S = StageRunner(tmp_path, log=lambda m: None)
    assert S.run("a", {"x": 1}, fn("a1")) == {"tag": "a1"}
    S.run("b", {}, fn("b1"), deps=("a",))
    S2 = StageRunner(tmp_path, log=lambda m: None)
    assert S2.run("a", {"x": 1}, fn("a2")) == {"tag": "a1"} and S2.cached["a"]
    S2.run("b", {}, fn("b2"), deps=("a",))
    assert calls == ["a1", "b1"]
    S3 = StageRunner(tmp_path, log=lambda m: None)
    (tmp_path / "a" / "stale.txt").write_text("old")
    S3.run("a", {"x": 2}, fn("a3"))          # config changed: reruns from an empty folder ...
    assert not (tmp_path / "a" / "stale.txt").exists()
    S3.run("b", {}, fn("b3"), deps=("a",))   # ... and so does what depends on it
    assert calls == ["a1", "b1", "a3", "b3"]
    (tmp_path / "b" / "STAGE.json").unlink()  # a kill before the marker: rerun in place (partial state kept)
    StageRunner(tmp_path, log=lambda m: None).run("b", {}, lambda d: calls.append((d / "out.txt").read_text()), deps=())
    assert calls[-1] == "b3"


def _writer(calls, tag):
    def fn(d):
        calls.append(tag)
        (d / "weights.bin").write_bytes(b"w" * 100)
        (d / "log.jsonl").write_text("{}\n")
        return str(d / "weights.bin")
    return fn


def test_stage_declarations_rerun_a_changed_stage_and_its_dependants_only(tmp_path):
    from selfspeech.adapt.stages import Stage

    calls = []

    def graph(b):  # a -> b -> c, a -> d
        return [Stage("a", _writer(calls, "a"), {"n": 1}), Stage("b", _writer(calls, "b"), {"n": b}, ("a",)),
                Stage("c", _writer(calls, "c"), {}, ("b",)), Stage("d", _writer(calls, "d"), {"m": 0}, ("a",))]

    def run(stages):
        S = StageRunner(tmp_path, log=lambda m: None)
        return S, [S(st) for st in stages]

    S, results = run(graph(1))
    assert calls == ["a", "b", "c", "d"] and results[2] == str(tmp_path / "c" / "weights.bin")
    S, _ = run(graph(2))
    assert calls[4:] == ["b", "c"] and S.cached == {"a": True, "b": False, "c": False, "d": True}
    S, _ = run(graph(2))
    assert len(calls) == 6 and all(S.cached.values())


def test_freed_files_go_and_come_back_only_when_read_again(tmp_path):
    from selfspeech.adapt.stages import Stage

    calls, logs = [], []
    stages = [Stage("a", _writer(calls, "a")), Stage("b", _writer(calls, "b"), {}, ("a",), frees=("a",))]
    S = StageRunner(tmp_path, log=logs.append)
    for st in stages:
        S(st)
    rec = json.loads((tmp_path / "a" / "STAGE.json").read_text())
    assert rec["freed"] and not (tmp_path / "a" / "weights.bin").exists() and (tmp_path / "a" / "log.jsonl").is_file()
    assert (tmp_path / "b" / "weights.bin").is_file() and any(m.startswith("[freed] a") for m in logs)
    S = StageRunner(tmp_path, log=logs.append)
    for st in stages:  # nothing to rerun: the freed stage stays cached, its files are not rebuilt
        S(st)
    assert calls == ["a", "b"] and all(S.cached.values())
    (tmp_path / "b" / "STAGE.json").unlink()  # b must run again (a kill): it reads a, so a is rebuilt first
    S = StageRunner(tmp_path, log=logs.append)
    for st in stages:
        S(st)
    assert calls == ["a", "b", "a", "b"] and "[rebuild] a: b reads its freed files" in logs
    assert json.loads((tmp_path / "a" / "STAGE.json").read_text())["freed"]  # and freed again once b is done
    keep = StageRunner(tmp_path / "keep", log=logs.append, keep_all=True)
    for st in stages:
        keep(st)
    assert (tmp_path / "keep" / "a" / "weights.bin").is_file()


def test_recipe_errors_before_compute(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("data: {manifest: nowhere.jsonl, bogus: 1}\n")
    with pytest.raises(RecipeError, match=r"data\.bogus: 1 is set under an unknown key; .*known keys of data: dev_fraction"):
        load_recipe(p)
    p.write_text("lambda: {grid: [0, 1]}\nstudnet: {}\n")
    with pytest.raises(RecipeError, match="studnet: {} is set under an unknown key; did you mean 'student'"):
        load_recipe(p)
    p.write_text("lambda: {scopes: [all, middle]}\n")
    with pytest.raises(RecipeError, match="scopes.*encoder"):
        load_recipe(p)
    p.write_text("data: {manifest: nowhere.jsonl}\n")
    r = load_recipe(p)
    assert r.data.manifest == "nowhere.jsonl" and r.path(r.data.manifest) == tmp_path / "nowhere.jsonl"
    from selfspeech.adapt.pseudo2real import check_recipe

    with pytest.raises(RecipeError, match=r"r\.yaml: data\.manifest: '.*nowhere\.jsonl' is not found; give an existing manifest"):
        check_recipe(r)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "nowhere.jsonl").write_text("")
    p.write_text("data: {manifest: nowhere.jsonl}\nclusters: {extractor: no_such_model}\n")
    with pytest.raises(RecipeError, match="clusters.extractor.*sv train"):
        check_recipe(load_recipe(p))


def _corpus(root):
    items = []
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cat", "dog", "sun"]
    for s in range(14):
        grp = "adult" if s < 8 else "child"
        for u in range(2):
            uid = f"s{s:02d}u{u}"
            n = int(16000 * (0.6 + 0.2 * u))
            t = np.arange(n) / 16000
            wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * s + 15 * u) * t) + 0.02 * rng.standard_normal(n)
            sf.write(root / f"{uid}.flac", wav.astype(np.float32), 16000)
            items.append({"id": uid, "audio_filepath": f"{uid}.flac", "duration": n / 16000, "speaker": f"s{s:02d}",
                          "age_group": grp, "text": f"{words[s % 6]} {words[(s + u) % 6]}"})
    write_manifest(root / "m.jsonl", items)
    return root / "m.jsonl"


class WordTeacher:
    """A stand-in teacher: two words chosen from the audio length (a random tiny Whisper emits nothing usable)."""

    backend = "fake"
    WORDS = ["red", "green", "blue", "cat", "dog", "sun"]

    def transcribe(self, wavs):
        from selfspeech.label.teacher import Hypothesis

        return [Hypothesis(f"{self.WORDS[len(w) % 6]} {self.WORDS[len(w) // 7 % 6]}", -0.3, 1.2, 0.01, 0.0)
                for w in wavs]


def test_pipeline_end_to_end_tiny(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())

    m = _corpus(tmp_path)
    spec = {
        "name": "tiny",
        "data": {"manifest": str(m), "source_parts": {"train": 4, "dev": 2, "sim": 2},
                 "target_parts": {"adapt": 3, "eval": 3}, "dev_fraction": 0.34},
        "teacher": {"name": str(tiny_whisper_dir), "drop_flagged": False},
        "student": {"init": str(tiny_whisper_dir), "max_new_tokens": 6,
                    "finetune": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_new_tokens": 6}},
        "lambda": {"grid": [0.0, 1.0], "oracle_sweep": False, "scopes": ["all", "encoder"]},
        "clusters": {"k": 2, "min_size": 1},
        "systems": ["teacher", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random"],
    }
    recipe = recipe_from_dict(spec, root=tmp_path)
    logs = []
    res = run_pseudo2real(recipe, tmp_path / "run", log=logs.append, progress=False)
    assert set(res["hyps"]) == {"teacher", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random"}
    lam = res["lambda"]
    assert lam["lambda"] in (0.0, 1.0) and set(lam["curve_source_sim"]) == {0.0, 1.0}
    # the rule's (lambda, scope) is the minimum over both curves on held-out source speakers
    best = min((w, abs(l_), i, l_, sc) for i, sc in enumerate(["all", "encoder"])
               for l_, w in lam["curve_source_sim" if sc == "all" else "curve_source_sim_encoder"].items())
    assert (lam["lambda"], lam["scope"]) == (best[3], best[4])
    evals = {i["id"] for i in read_manifest(tmp_path / "run" / "data" / "target_eval.jsonl")}
    for name, h in res["hyps"].items():
        assert {json.loads(line)["id"] for line in open(h)} == evals, name  # every eval utterance decoded once
    spk = {p: {i["speaker"] for i in read_manifest(tmp_path / "run" / "data" / f"{p}.jsonl")}
           for p in ("source_train", "source_dev", "source_sim", "target_adapt", "target_eval")}
    names = list(spk)
    assert all(not (spk[a] & spk[b]) for i, a in enumerate(names) for b in names[i + 1:])
    # the pipeline scores every system and writes its own report
    assert "p2r_vs_pseudo_ft" in res["scores"]["paired"] and set(res["scores"]["systems"]) == set(res["hyps"])
    report = tmp_path / "run" / "report.md"
    assert res["report"] == str(report) and "Pseudo2Real: tiny" in report.read_text()
    assert (tmp_path / "run" / "wer_systems.png").is_file() and (tmp_path / "run" / "wer_lambda.png").is_file()
    _assert_disk_kept_small(tmp_path / "run", res)
    # a rerun recomputes nothing
    logs.clear()
    res2 = run_pseudo2real(recipe, tmp_path / "run", log=logs.append, progress=False)
    assert all(res2["cached"].values()) and res2["hyps"] == res["hyps"]
    # other clusters (here: utterance level) redo every SC stage that reads them, and nothing else
    recipe3 = recipe_from_dict({**spec, "clusters": {"k": 2, "min_size": 1, "level": "utterance"}}, root=tmp_path)
    res3 = run_pseudo2real(recipe3, tmp_path / "run", log=logs.append, progress=False)
    sc = {k: v for k, v in res3["cached"].items() if k.startswith(("ft_sc_", "decode_sc_", "sc_clusters"))}
    assert sc and not any(sc.values()), sc
    assert res3["cached"]["ft_target_pseudo"] and res3["cached"]["sc_embed"]
    _assert_disk_kept_small(tmp_path / "run", res3)
    _finer_grid_and_rebuild(tmp_path, spec)


def test_sc_error_clusters_tiny(tmp_path, tiny_whisper_dir, monkeypatch):
    """p2r_sc_error: source speakers grouped by measured teacher WER, target speakers by predicted WER."""
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    spec = {
        "name": "tiny-error",
        "data": {"manifest": str(_corpus(tmp_path)), "source_parts": {"train": 4, "dev": 2, "sim": 2},
                 "target_parts": {"adapt": 3, "eval": 3}, "dev_fraction": 0.34},
        "teacher": {"name": str(tiny_whisper_dir), "drop_flagged": False},
        "student": {"init": str(tiny_whisper_dir), "max_new_tokens": 6,
                    "finetune": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_new_tokens": 6}},
        "lambda": {"grid": [0.0, 1.0], "oracle_sweep": False},
        "clusters": {"k": 2, "min_size": 2},
        "systems": ["pseudo_ft", "p2r", "p2r_sc_error"],
    }
    res = run_pseudo2real(recipe_from_dict(spec, root=tmp_path), tmp_path / "run", log=lambda m: None,
                          progress=False)
    assert set(res["hyps"]) == {"teacher", "pseudo_ft", "p2r", "p2r_sc_error"}
    assert not any(k.startswith(("sc_embed", "sc_clusters")) for k in res["times"])  # no voice clustering
    evals = [json.loads(line)["id"] for line in open(res["hyps"]["p2r_sc_error"])]
    assert sorted(evals) == sorted(i["id"] for i in read_manifest(tmp_path / "run" / "data" / "target_eval.jsonl"))
    e = res["clusters"]["teacher_error"]
    assert e["k"] == 2 and e["source_sizes"] == {0: 2, 1: 2}  # 4 source-train speakers, min_size 2 each
    assert e["source_teacher_wer"][0] <= e["source_teacher_wer"][1]  # group 0: the teacher's easier speakers
    tgt = {i["speaker"] for p in ("target_adapt", "target_eval")
           for i in read_manifest(tmp_path / "run" / "data" / f"{p}.jsonl")}
    assert tgt <= set(e["assignment"]) and sum(e["target_sizes"].values()) == len(tgt)
    # a tau only for the clusters that hold target-eval speakers
    decoded = {e["assignment"][i["speaker"]] for i in read_manifest(tmp_path / "run" / "data" / "target_eval.jsonl")}
    taus = {int(m.group(1)) for k in res["times"] if (m := re.fullmatch(r"sc_error_c(\d+)_tau", k))}
    assert taus == decoded
    assert "Teacher-error clusters: k = 2" in (tmp_path / "run" / "report.md").read_text()
    res2 = run_pseudo2real(recipe_from_dict(spec, root=tmp_path), tmp_path / "run", log=lambda m: None,
                           progress=False)
    assert all(res2["cached"].values()) and res2["hyps"] == res["hyps"]


def _assert_disk_kept_small(run, res):
    """Sweeps keep hypotheses only, fine-tunes read by a tau alone are freed, the report states the disk used."""
    import re

    from selfspeech.adapt.stages import folder_bytes

    holders = {p.relative_to(run).parts[0] for p in run.rglob("*.safetensors")}
    sc_taus = {n for n in res["cached"] if n.startswith("sc_") and n.endswith("_tau")}
    assert {n.split("_")[1] for n in sc_taus} == {"kmeans", "random"}
    assert holders == {"ft_source_real", "ft_target_pseudo", "ft_sim_pseudo", "tau", "model_p2r"} | sc_taus, holders
    assert [p.name for p in run.glob("model_*")] == ["model_p2r"] and not list(run.glob("decode_*/model"))
    freed = [n for n in res["cached"] if n.startswith("ft_sc_")] + ["ft_source_pseudo"]
    for n in freed:  # the marker stays (the stage stays cached) and says so; the training log stays
        assert json.loads((run / n / "STAGE.json").read_text())["freed"] and list((run / n).glob("*.jsonl"))
        assert not (run / n / "best").exists() and not (run / n / "last").exists()
    text = (run / "report.md").read_text()
    m = re.search(r"Disk used by the run folder: ([\d.]+) MB \(largest stages: ", text)
    assert m and float(m.group(1)) == round(res["disk"]["total"] / 1e6, 1), text[:400]
    assert res["disk"]["total"] <= folder_bytes(run) < res["disk"]["total"] + 2_000_000  # + report, charts, json
    assert res["disk"]["stages"]["ft_target_pseudo"] > 10 * res["disk"]["stages"]["ft_source_pseudo"]
    assert "| MB on disk |" in text


def _finer_grid_and_rebuild(tmp_path, spec):
    """Through `selfspeech adapt`: a finer lambda grid decodes only the new lambdas; a tau to redo rebuilds
    the freed model it reads; the command prints the report the pipeline wrote."""
    import yaml
    from typer.testing import CliRunner

    from selfspeech.cli import app

    run = tmp_path / "run"
    stale = run / "model_sim_l0.25"  # a per-lambda model folder of an earlier layout: removed
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"0" * 1000)
    (stale / "STAGE.json").write_text("{}")
    (run / "tau" / "STAGE.json").unlink()  # as if killed before tau finished
    spec = {**spec, "clusters": {"k": 2, "min_size": 1, "level": "utterance"},
            "lambda": {**spec["lambda"], "grid": [0.0, 0.5, 1.0]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, ["adapt", str(tmp_path / "r.yaml"), "--out", str(run)])
    assert out.exit_code == 0, out.output
    assert "done" in out.output and str(run / "report.md") in out.output.replace("\n", "")
    res = json.loads((run / "pipeline.json").read_text())
    c = res["cached"]
    assert not c["decode_sim_l0.5"] and not c["decode_sim_encoder_l0.5"]
    assert c["decode_sim_l0"] and c["decode_sim_l1"] and c["decode_sim_encoder_l1"]
    assert not c["tau"] and "[rebuild] ft_source_pseudo: tau reads its freed files" in out.output
    assert c["ft_source_real"] and c["ft_target_pseudo"] and c["ft_sim_pseudo"] and c["sc_kmeans_c0_tau"]
    assert not stale.exists() and "[removed] model_sim_l0.25" in out.output
    assert set(map(float, res["lambda"]["curve_source_sim"])) == {0.0, 0.5, 1.0}
    _assert_disk_kept_small(run, res)


def test_pipeline_stops_clearly_when_teacher_gives_nothing(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real
    from selfspeech.label.teacher import Hypothesis

    class Silent:
        backend = "fake"

        def transcribe(self, wavs):
            return [Hypothesis("", -0.1, 0.0, 0.9, 0.0) for _ in wavs]

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: Silent())
    recipe = recipe_from_dict({
        "data": {"manifest": str(_corpus(tmp_path)), "source_parts": {"train": 4, "dev": 2, "sim": 2},
                 "target_parts": {"adapt": 3, "eval": 3}, "dev_fraction": 0.34},
        "teacher": {"name": str(tiny_whisper_dir)}, "student": {"init": str(tiny_whisper_dir)},
    }, root=tmp_path)
    with pytest.raises(RecipeError, match="no usable pseudo-label in source_train"):
        run_pseudo2real(recipe, tmp_path / "run", log=lambda m: None, progress=False)


def test_unlabelled_speakerless_target_from_its_own_manifest(tmp_path, tiny_whisper_dir, monkeypatch):
    """Source and target as two manifests; the target has neither transcripts nor speakers (segments of
    recordings): every target speaker is adapted to, one pseudo-speaker per recording, and the report
    says plainly that no target WER can be measured."""
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    items = list(read_manifest(_corpus(tmp_path)))
    write_manifest(tmp_path / "source.jsonl", [i for i in items if i["age_group"] == "adult"])
    # the target: 6 recordings' segments, no text, no speaker
    target = [{"id": i["id"], "audio_filepath": i["audio_filepath"], "duration": i["duration"],
               "recording": f"rec{n // 2}"} for n, i in enumerate(i for i in items if i["age_group"] == "child")]
    write_manifest(tmp_path / "target.jsonl", target)
    spec = {
        "name": "unlabelled",
        "data": {"source_manifest": "source.jsonl", "target_manifest": "target.jsonl",
                 "source_parts": {"train": 4, "dev": 2, "sim": 2}, "dev_fraction": 0.34},
        "teacher": {"name": str(tiny_whisper_dir), "drop_flagged": False},
        "student": {"init": str(tiny_whisper_dir), "max_new_tokens": 6,
                    "finetune": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_new_tokens": 6}},
        "lambda": {"grid": [0.0, 1.0]},
        "clusters": {"k": 2, "min_size": 1},
        "systems": ["teacher", "pseudo_ft", "p2r", "p2r_sc", "oracle"],
    }
    recipe = recipe_from_dict(spec, root=tmp_path)
    res = run_pseudo2real(recipe, tmp_path / "run", progress=False)
    assert res["target_labelled"] is False and res["target_speakers"] == "recording"
    assert set(res["hyps"]) == {"pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random"}  # no teacher (the reference), no oracle
    data = tmp_path / "run" / "data"
    assert list(read_manifest(data / "target_eval.jsonl")) == []
    adapt = list(read_manifest(data / "target_adapt.jsonl"))
    assert {i["id"] for i in adapt} == {t["id"] for t in target}                # every target utterance adapted to
    assert {i["speaker"] for i in adapt} == {f"rec:rec{k}" for k in range(6)}   # one pseudo-speaker per recording
    for name, h in res["hyps"].items():
        assert {json.loads(line)["id"] for line in open(h)} == {t["id"] for t in target}, name
    assert "curve_target_oracle" not in res["lambda"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "no target WER can be measured" in report and "one pseudo-speaker per recording" in report
    assert "WER against the teacher" in report and "disagreement with the teacher, not accuracy" in report


def test_target_speakers_and_labels_are_checked_up_front(tmp_path):
    from selfspeech.adapt import prepare as P
    from selfspeech.adapt.recipe import RecipeError

    items = list(read_manifest(_corpus(tmp_path)))
    write_manifest(tmp_path / "source.jsonl", [i for i in items if i["age_group"] == "adult"])
    write_manifest(tmp_path / "target.jsonl", [{k: v for k, v in i.items() if k != "speaker"}
                                               for i in items if i["age_group"] == "child"])
    data = {"source_manifest": "source.jsonl", "target_manifest": "target.jsonl"}
    d = P.load_domains(recipe_from_dict({"data": data}, root=tmp_path))
    assert d.target_speakers == "recording" and d.target_labelled and len(d.target) == 12
    with pytest.raises(RecipeError, match="target_speakers: field, but 12 target utterance"):
        P.load_domains(recipe_from_dict({"data": {**data, "target_speakers": "field"}}, root=tmp_path))
    write_manifest(tmp_path / "nolabel.jsonl", [{**i, "text": ""} for i in items if i["age_group"] == "adult"])
    with pytest.raises(RecipeError, match="source_manifest: 16 source utterance.*without a transcript"):
        P.load_domains(recipe_from_dict({"data": {**data, "source_manifest": "nolabel.jsonl"}}, root=tmp_path))


def test_tau_seeds_are_checked():
    for seeds, msg in (([0], r"student\.tau_seeds: \[0\] is naming student\.finetune\.seed \(0\)"),
                       ([1, 1], r"student\.tau_seeds: \[1, 1\] is naming a seed twice"),
                       (["a"], r"student\.tau_seeds")):
        with pytest.raises(RecipeError, match=msg):
            recipe_from_dict({"student": {"tau_seeds": seeds}})
    r = recipe_from_dict({"student": {"tau_seeds": [0, 2], "finetune": {"seed": 1}}})
    assert r.student.tau_seeds == (0, 2)


def test_tau_averaged_over_fine_tuning_seeds(tmp_path, tiny_whisper_dir, monkeypatch):
    """tau_seeds: one more source-real and source-pseudo student per seed, and tau is the mean of the seeds' taus."""
    import torch
    from safetensors.torch import load_file

    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    spec = {
        "name": "tau_seeds",
        "data": {"manifest": str(_corpus(tmp_path)), "source_parts": {"train": 4, "dev": 2, "sim": 2},
                 "target_parts": {"adapt": 3, "eval": 3}, "dev_fraction": 0.34},
        "teacher": {"name": str(tiny_whisper_dir), "drop_flagged": False},
        "student": {"init": str(tiny_whisper_dir), "max_new_tokens": 6, "tau_seeds": [1],
                    "finetune": {"max_steps": 2, "eval_every": 2, "batch_size": 2, "max_new_tokens": 6}},
        "lambda": {"grid": [0.0, 1.0], "oracle_sweep": False},
        "clusters": {"enabled": False},
        "systems": ["pseudo_ft", "p2r"],
    }
    recipe = recipe_from_dict(spec, root=tmp_path)
    run = tmp_path / "run"
    res = run_pseudo2real(recipe, run, log=lambda m: None, progress=False)
    marker = {n: json.loads((run / n / "STAGE.json").read_text())
              for n in ("ft_source_real", "ft_source_real_s1", "ft_source_pseudo_s1", "tau_mean", "model_p2r")}
    assert marker["ft_source_real"]["config"]["config"]["ft"]["seed"] == 0
    for n in ("ft_source_real_s1", "ft_source_pseudo_s1"):  # the extra seed's students, freed once tau_s1 exists
        assert marker[n]["config"]["config"]["ft"]["seed"] == 1 and marker[n]["freed"]
        done = json.loads((run / n / "finished.json").read_text())  # what the training loop itself ran with
        assert done["run_config"]["finetune"]["seed"] == done["state"]["sampler"]["seed"] == 1
    assert set(marker["tau_mean"]["config"]["deps"]) == {"tau", "tau_s1"}
    assert "tau_mean" in marker["model_p2r"]["config"]["deps"]  # the correction reads the mean
    taus = [load_file(str(run / n / "tau.safetensors")) for n in ("tau", "tau_s1")]
    mean = load_file(str(run / "tau_mean" / "tau.safetensors"))
    assert set(mean) == set(taus[0]) == set(taus[1])
    for name, t in mean.items():
        torch.testing.assert_close(t, (taus[0][name] + taus[1][name]) / 2)
    assert any(not torch.equal(taus[0][n], taus[1][n]) for n in mean)  # the seeds fine-tuned differently
    res2 = run_pseudo2real(recipe, run, log=lambda m: None, progress=False)
    assert all(res2["cached"].values()) and res2["hyps"] == res["hyps"]
