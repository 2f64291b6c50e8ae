"""The correction on the union student and the public code's "mixed" protocol, on the tiny pipeline."""
from __future__ import annotations

import json

from test_adapt import WordTeacher, _corpus

from selfspeech.adapt.recipe import recipe_from_dict
from selfspeech.data.manifest import read_manifest


def _spec(m, tiny_whisper_dir, systems, **lam):
    return {
        "name": "tiny-variants",
        "data": {"manifest": str(m), "source_parts": {"train": 4, "dev": 2, "sim": 2},
                 "target_parts": {"adapt": 3, "eval": 3}, "dev_fraction": 0.34},
        "teacher": {"name": str(tiny_whisper_dir), "drop_flagged": False},
        "student": {"init": str(tiny_whisper_dir), "max_new_tokens": 6, "continue_lr_scale": 0.5,
                    "finetune": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_new_tokens": 6}},
        "lambda": {"grid": [0.0, 1.0], "oracle_sweep": False, **lam},
        "clusters": {"enabled": False},
        "systems": systems,
    }


def test_union_correction_and_mixed_protocol(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    m = _corpus(tmp_path)
    systems = ["pseudo_ft", "p2r", "source_real_plus_target_pseudo", "p2r_union", "pseudo_ft_mixed", "p2r_mixed"]
    recipe = recipe_from_dict(_spec(m, tiny_whisper_dir, systems), root=tmp_path)
    res = run_pseudo2real(recipe, tmp_path / "run", log=lambda s: None, progress=False)
    run = tmp_path / "run"
    assert set(res["hyps"]) == set(systems) | {"teacher"}  # a labelled target always scores its teacher
    evals = {i["id"] for i in read_manifest(run / "data" / "target_eval.jsonl")}
    for name, h in res["hyps"].items():
        assert {json.loads(line)["id"] for line in open(h)} == evals, name
    # each variant chose its own lambda on its own rehearsal, from the grid, without target labels
    var = res["lambda"]["variants"]
    assert set(var) == {"p2r_union", "p2r_mixed"}
    for v in var.values():
        assert v["lambda"] in (0.0, 1.0) and set(v[next(k for k in v if k.startswith("curve_"))]) == {0.0, 1.0}
    assert "curve_source_sim_union" in var["p2r_union"] and "curve_source_sim_mixed" in var["p2r_mixed"]
    # the mixed model saw each source-train utterance twice, once per label, under distinct ids
    mixed = list(read_manifest(run / "pseudo" / "mixed_train.jsonl"))
    real = list(read_manifest(run / "pseudo" / "source_train_real.jsonl"))
    assert len(mixed) == 2 * len(real) and len({i["id"] for i in mixed}) == len(mixed)
    # the continued fine-tunes start from the mixed model at the scaled learning rate
    cfg = json.loads((run / "ft_mixed_target_pseudo" / "STAGE.json").read_text())["config"]["config"]
    assert cfg["init"].startswith(str(run / "ft_mixed")) and abs(cfg["ft"]["lr"] - 0.5 * 1e-5) < 1e-12
    assert {"p2r_union_vs_source_real_plus_target_pseudo", "p2r_mixed_vs_pseudo_ft_mixed"} <= set(res["scores"]["paired"])
    report = (run / "report.md").read_text()
    assert "continued from the source mixed model" in report and "its own rehearsal" in report
    # the direct protocol's stages are untouched by the variants: a run without them reuses every stage
    base = recipe_from_dict(_spec(m, tiny_whisper_dir, ["pseudo_ft", "p2r"]), root=tmp_path)
    res2 = run_pseudo2real(base, run, log=lambda s: None, progress=False)
    assert all(res2["cached"].values()) and res2["hyps"]["p2r"] == res["hyps"]["p2r"]


def test_fixed_lambda_applies_to_the_variants(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    spec = _spec(_corpus(tmp_path), tiny_whisper_dir, ["pseudo_ft", "p2r", "p2r_union"], rule="fixed", fixed=0.5)
    res = run_pseudo2real(recipe_from_dict(spec, root=tmp_path), tmp_path / "run", log=lambda s: None,
                          progress=False)
    assert res["lambda"]["variants"]["p2r_union"] == {"rule": "fixed", "lambda": 0.5, "scope": "all"}
    assert not (tmp_path / "run" / "ft_sim_union").exists()  # no rehearsal without the source_sim rule
