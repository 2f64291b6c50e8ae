"""The Pseudo2Real pipeline: stage cache, recipe checks, and one end-to-end run on tiny random models."""
import json

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
    from selfspeech.adapt.report import score_systems, write_report

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
    scores = score_systems(str(tmp_path / "run" / "data" / "target_eval.jsonl"), res["hyps"], "whisper_english",
                           n_resamples=50)
    assert "p2r_vs_pseudo_ft" in scores["paired"]
    report = write_report(tmp_path / "run", res, scores, "tiny")
    assert (tmp_path / "run" / "wer_systems.png").is_file() and (tmp_path / "run" / "wer_lambda.png").is_file()
    assert "Pseudo2Real" in report.read_text()
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
