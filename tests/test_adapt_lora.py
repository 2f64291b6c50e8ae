"""Pseudo2Real with LoRA students on the tiny pipeline: adapters per student, tau from merged deltas."""
from __future__ import annotations

import json

import torch
from test_adapt import WordTeacher, _corpus
from test_adapt_variants import _spec

from selfspeech.adapt.recipe import recipe_from_dict
from selfspeech.arith.task_vector import TaskVector
from selfspeech.models.lora import is_adapter_dir, read_adapter


def test_pipeline_with_lora_students(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real

    torch.set_num_threads(1)
    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    m = _corpus(tmp_path)
    spec = _spec(m, tiny_whisper_dir, ["pseudo_ft", "p2r"], scopes=["all", "encoder"])
    spec["student"]["finetune"] |= {"lr": 1e-2, "lora": {"rank": 2, "alpha": 4.0}}
    recipe = recipe_from_dict(spec, root=tmp_path)
    assert recipe.student.finetune.lora.rank == 2
    run = tmp_path / "run"
    res = run_pseudo2real(recipe, run, log=lambda s: None, progress=False)
    assert {"pseudo_ft", "p2r"} <= set(res["hyps"]) and res["lambda"]["lambda"] in (0.0, 1.0)
    for stage in ("ft_source_real", "ft_target_pseudo", "ft_sim_pseudo"):
        best = run / stage / "best"
        assert is_adapter_dir(best) and not (best / "model.safetensors").exists(), stage
    # tau covers exactly the adapted matrices (the frozen base cancels) and is not zero
    tau = TaskVector.load(run / "tau" / "tau.safetensors")
    assert set(tau.deltas) == set(read_adapter(run / "ft_source_real" / "best").shapes) and tau.norm() > 0
    # Pseudo2Real's model is a full model folder: the target adapter merged, plus lambda * tau
    assert (run / "model_p2r" / "model" / "model.safetensors").is_file()
    summary = json.loads((run / "ft_target_pseudo" / "summary.json").read_text())
    assert summary["lora"]["rank"] == 2 and summary["trainable_parameters"] < 50_000
    res2 = run_pseudo2real(recipe, run, log=lambda s: None, progress=False)
    assert all(res2["cached"].values())
