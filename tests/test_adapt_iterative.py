"""Iterative Pseudo2Real on the tiny pipeline: rounds, both stop rules, the labels' origin, no target text, caches."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from test_adapt import WordTeacher, _corpus
from test_adapt_variants import _spec as _variants_spec

from selfspeech.adapt.recipe import RecipeError, recipe_from_dict
from selfspeech.data.manifest import read_manifest, write_manifest
from selfspeech.eval.report import read_jsonl

ITER_STAGES = ("iter", "decode_iter", "ft_iter", "decode_p2r_iter")


def _word_student(model_dir, manifest, out_jsonl, **kw):
    """A stand-in for the student's decoder (a random tiny Whisper emits nothing): two words from the audio
    length and one from the model's weights, so every model labels differently, and never the manifest's text."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(model_dir).glob("*.safetensors"))))
    w = WordTeacher.WORDS
    write_manifest(out_jsonl, [{"id": it["id"], "text": f"{w[int(it['duration'] * 10) % 6]} "
                                f"{w[int(it['duration'] * 70) % 6]} {w[digest.digest()[0] % 6]}"}
                               for it in read_manifest(manifest)])
    return Path(out_jsonl)


def _spec(m, tiny_whisper_dir, systems, **it):
    return {**_variants_spec(m, tiny_whisper_dir, systems), "name": "tiny-iterative",
            "iterative": {"max_rounds": 2, **it}}


def _texts(path) -> dict[str, str]:
    return {h["id"]: h["text"] for h in read_jsonl(path)}


def _stage(run, name) -> dict:
    return json.loads((run / name / "STAGE.json").read_text())


def test_iterative_rounds_rules_label_origin_and_caches(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    monkeypatch.setattr("selfspeech.label.transcribe.transcribe_whisper", _word_student)
    m, run = _corpus(tmp_path), tmp_path / "run"

    def go(systems, **it):
        return run_pseudo2real(recipe_from_dict(_spec(m, tiny_whisper_dir, systems, **it), root=tmp_path), run,
                               log=lambda s: None, progress=False)

    base = go(["pseudo_ft", "p2r"])
    # min_change 0: no round converges, so the loop runs max_rounds
    res = go(["pseudo_ft", "p2r", "p2r_iter"], stop="agreement", min_change=0.0)
    assert all(res["cached"][k] for k in base["cached"]), "p2r_iter recomputed a stage of the run without it"
    v = res["lambda"]["variants"]["p2r_iter"]
    assert (v["rounds"], v["reason"], v["lambda"]) == (2, "max_rounds", res["lambda"]["lambda"])
    assert set(v["curve_agreement"]) == {1, 2} and set(v["labels"]) == {1, 2}
    evals = {i["id"] for i in read_manifest(run / "data" / "target_eval.jsonl")}
    two_rounds = _texts(res["hyps"]["p2r_iter"])
    assert set(two_rounds) == evals
    _labels_come_from_the_previous_round(run, 2)
    assert "p2r_iter_vs_p2r" in res["scores"]["paired"] and "relabelling" in (run / "report.md").read_text()

    # a rerun recomputes nothing
    again = go(["pseudo_ft", "p2r", "p2r_iter"], stop="agreement", min_change=0.0)
    assert all(again["cached"].values()) and again["hyps"] == res["hyps"]

    # the agreement rule: a threshold above round 1's change stops there; the rule keys no round's stage
    change = v["curve_agreement"][1]
    assert change < 1, "round 1 changed every word: the threshold below cannot be above it"
    one = go(["pseudo_ft", "p2r", "p2r_iter"], stop="agreement", min_change=min(1.0, change + 1e-6))
    w = one["lambda"]["variants"]["p2r_iter"]
    assert (w["rounds"], w["reason"]) == (1, "agreement")
    assert not one["cached"]["decode_p2r_iter"] and all(c for k, c in one["cached"].items() if k != "decode_p2r_iter")
    assert _stage(run, "decode_p2r_iter")["config"]["deps"].keys() == {"ft_iter1_target", "tau"}

    _no_target_transcript_is_read(run, go, v, two_rounds)

    # the source_sim rule: the same rounds on the sim speakers, the target runs as many as their lowest WER
    sim = go(["pseudo_ft", "p2r", "p2r_iter"], stop="source_sim")
    s = sim["lambda"]["variants"]["p2r_iter"]
    curve = s["curve_source_sim_iter"]
    assert set(curve) == {0, 1, 2} and s["reason"] == "lowest_sim_wer"
    assert s["rounds"] == min(curve, key=lambda r: (curve[r], r))
    lam_key = f"{res['lambda']['lambda']:g}"
    assert curve[0] == res["lambda"]["curve_source_sim"][res["lambda"]["lambda"]]  # round 0: the sweep's own decode
    assert sim["cached"][f"decode_sim_l{lam_key}"] and sim["cached"]["ft_sim_pseudo"]
    assert not sim["cached"]["ft_iter1_sim"] and not sim["cached"]["decode_iter2_sim"]
    assert all(sim["cached"][f"decode_iter{r}_target"] for r in range(1, s["rounds"] + 1))  # reused from above
    if s["rounds"] == 0:  # no round helped the sim speakers: p2r_iter is p2r
        assert sim["hyps"]["p2r_iter"] == sim["hyps"]["p2r"]
    else:
        assert _stage(run, "decode_p2r_iter")["config"]["deps"].keys() == {f"ft_iter{s['rounds']}_target", "tau"}
    report = (run / "report.md").read_text()
    assert "stopped by the lowest WER of the same rounds" in report and "speakers: round 0: " in report
    assert json.loads((run / "ft_iter1_sim" / "STAGE.json").read_text())["freed"]  # read by its decode only
    ref = _texts(run / "data" / "source_sim.jsonl")  # real labels exist there: the sim labels must not be them
    labs = _texts(run / "iter1_sim_labels" / "fit.jsonl")
    assert labs == {i: t for i, t in _texts(run / f"decode_sim_l{lam_key}" / "hyp.jsonl").items() if i in labs}
    assert any(labs[i] != ref[i] for i in labs)


def _labels_come_from_the_previous_round(run, rounds):
    """Round r's labels are round r-1's corrected model's hypotheses; round r's model is FT on them."""
    prev = run / "decode_iter0_target" / "hyp.jsonl"
    for r in range(1, rounds + 1):
        hyps = _texts(prev)
        for part in ("fit", "stop"):
            labs = _texts(run / f"iter{r}_target_labels" / f"{part}.jsonl")
            assert labs and labs == {i: hyps[i] for i in labs}, (r, part)
        ft = _stage(run, f"ft_iter{r}_target")["config"]["config"]
        assert ft["train"] == str(run / f"iter{r}_target_labels" / "fit.jsonl")
        dec = _stage(run, f"decode_iter{r}_target")["config"]
        assert dec["config"]["base"].startswith(str(run / f"ft_iter{r}_target")) and f"ft_iter{r}_target" in dec["deps"]
        prev = run / f"decode_iter{r}_target" / "hyp.jsonl"
    assert _stage(run, "decode_iter0_target")["config"]["deps"].keys() == {"model_p2r"}


def _no_target_transcript_is_read(run, go, v, before):
    """Garbage in every target transcript, the rounds recomputed: the same rounds, curves and hypotheses."""
    for name in ("target_adapt", "target_adapt_fit", "target_adapt_stop", "target_eval"):
        p = run / "data" / f"{name}.jsonl"
        write_manifest(p, [{**i, "text": "zebra quartz"} for i in read_manifest(p, resolve_paths=False)])
    for d in run.iterdir():
        if d.name.startswith(ITER_STAGES):
            shutil.rmtree(d)
    res = go(["pseudo_ft", "p2r", "p2r_iter"], stop="agreement", min_change=0.0)
    assert not res["cached"]["ft_iter2_target"] and not res["cached"]["iter1_target_labels"]
    assert res["lambda"]["variants"]["p2r_iter"] == v and _texts(res["hyps"]["p2r_iter"]) == before
    assert "zebra" not in (run / "iter1_target_labels" / "fit.jsonl").read_text()


def test_iterative_relabel_filters_and_counts(tmp_path):
    from selfspeech.adapt.iterative import changed_share, relabel

    refs = [{"id": f"u{k}", "audio_filepath": f"u{k}.flac", "text": "real words"} for k in range(4)]
    write_manifest(tmp_path / "fit.jsonl", refs[:3])
    write_manifest(tmp_path / "stop.jsonl", refs[3:])
    hyps = [{"id": "u0", "text": "the cat"}, {"id": "u1", "text": ""},
            {"id": "u2", "text": "la " * 40}, {"id": "u3", "text": "", "status": "failed", "reason": "unreadable"}]
    write_manifest(tmp_path / "hyp.jsonl", hyps)
    out = tmp_path / "lab"
    out.mkdir()
    res = relabel(str(tmp_path / "fit.jsonl"), str(tmp_path / "stop.jsonl"), str(tmp_path / "hyp.jsonl"), True, out)
    assert res["fit"]["kept"] == 1 and res["fit"]["flagged"] == 2 and res["fit"]["flags"] == {"empty": 1,
                                                                                              "repetition": 1}
    assert res["stop"] == {"path": str(out / "stop.jsonl"), "kept": 0, "failed": 1, "flagged": 0, "flags": {},
                           "with_text": 0}
    assert _texts(out / "fit.jsonl") == {"u0": "the cat"}
    kept = relabel(str(tmp_path / "fit.jsonl"), str(tmp_path / "stop.jsonl"), str(tmp_path / "hyp.jsonl"), False, out)
    assert kept["fit"]["kept"] == 3 and kept["fit"]["with_text"] == 2 and kept["stop"]["kept"] == 0  # failed: never
    write_manifest(tmp_path / "next.jsonl", [{"id": "u0", "text": "the dog"}, {"id": "u2", "text": "la " * 40}])
    # u0: 1 of 2 words changed; u2 unchanged (40 words); u1 and u3 are not in both rounds
    assert changed_share(str(tmp_path / "hyp.jsonl"), str(tmp_path / "next.jsonl"), "basic") == pytest.approx(1 / 42)


def test_iterative_section_is_checked():
    r = recipe_from_dict({})
    assert (r.iterative.max_rounds, r.iterative.stop, r.iterative.min_change, r.iterative.drop_flagged) == (
        3, "agreement", 0.01, True)
    with pytest.raises(RecipeError, match="iterative.stop"):
        recipe_from_dict({"iterative": {"stop": "never"}})
    with pytest.raises(RecipeError, match="iterative.min_change"):
        recipe_from_dict({"iterative": {"min_change": 1.5}})
    with pytest.raises(RecipeError, match="iterative.max_rounds"):
        recipe_from_dict({"iterative": {"max_rounds": 0}})
    assert "p2r_iter" in recipe_from_dict({"systems": ["p2r", "p2r_iter"]}).systems


def test_a_student_without_usable_labels_stops_at_round_zero(tmp_path, tiny_whisper_dir, monkeypatch):
    """The random tiny student emits no words: its labels are all filtered, no round runs, p2r_iter is p2r."""
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    spec = _spec(_corpus(tmp_path), tiny_whisper_dir, ["pseudo_ft", "p2r", "p2r_iter"])
    spec["lambda"] |= {"rule": "fixed", "fixed": 1.0}
    res = run_pseudo2real(recipe_from_dict(spec, root=tmp_path), tmp_path / "run", log=lambda s: None,
                          progress=False)
    v = res["lambda"]["variants"]["p2r_iter"]
    assert (v["rounds"], v["reason"], v["labels"], v["curve_agreement"]) == (0, "no_labels", {}, {})
    assert res["hyps"]["p2r_iter"] == res["hyps"]["p2r"] and not (tmp_path / "run" / "ft_iter1_target").exists()
    lab = json.loads((tmp_path / "run" / "iter1_target_labels" / "STAGE.json").read_text())["result"]
    assert lab["fit"]["kept"] == 0 and lab["fit"]["flags"].get("empty", 0) > 0  # counted, not silent
