"""Pipeline stage keys stay what they were when an option is added at a default that computes the same thing."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from selfspeech.adapt import pseudo2real as M
from selfspeech.adapt.recipe import recipe_from_dict
from selfspeech.adapt.stages import StageRunner, config_hash


def _recipe(**over):
    return recipe_from_dict({"data": {"manifest": "m.jsonl", "seed": 3}, **over})


def test_new_options_at_their_defaults_leave_the_keys_as_before(monkeypatch):
    monkeypatch.setattr(M, "teacher_compute_type", lambda r: "cpu:int8")
    r = _recipe()
    assert set(M._data_key(r)) == {"kaldi_dir", "manifest", "source_rule", "target_rule", "source_parts",
                                   "target_parts", "dev_fraction", "max_utts_per_speaker", "seed"}
    assert M._label_key(r) == {"teacher": {"name": "whisper-base", "batch_size": 8, "drop_flagged": True,
                                           "max_new_tokens": 128, "window_s": 15.0}}
    ft = r.student.finetune.to_dict()
    assert not {"precision", "grad_accum", "grad_checkpointing", "task", "lora"} & set(ft)


def test_options_that_change_the_result_change_the_keys(monkeypatch):
    monkeypatch.setattr(M, "teacher_compute_type", lambda r: "cuda:float16")
    r = _recipe(data={"manifest": "m.jsonl", "target_speakers": "recording"},
                teacher={"language": "de", "name": "whisper-base"})
    assert M._data_key(r)["target_speakers"] == "recording"
    key = M._label_key(r)  # float16 labels of a GPU differ from int8 labels of a CPU
    assert key["compute_type"] == "cuda:float16" and key["teacher"]["compute_type"] == "auto"
    assert key["teacher"]["language"] == "de"
    ft = dataclasses.replace(r.student.finetune, precision="bf16", grad_accum=2).to_dict()
    assert ft["precision"] == "bf16" and ft["grad_accum"] == 2


class _Declared(StageRunner):
    """Declares stages as the pipeline does (same keys and hashes) without running or reading any."""

    def __call__(self, stage):
        self.hashes[stage.name], self.declared[stage.name] = config_hash(self._key(stage)), stage
        return str(self.root / stage.name / "out")


def _source_tau(recipe):
    from selfspeech.adapt.student import Output, Student, corrected_model_stage

    S = _Declared(Path("run"), log=lambda m: None)
    S.hashes.update({"ft_source_real": "r0", "ft_source_pseudo": "p0", "ft_target_pseudo": "t0", "pseudo": "l0"})
    st = Student(recipe, "init", recipe.student.finetune, False)
    parts = {"source_dev": "dev.jsonl"}
    ps = {k: {"path": f"{k}.jsonl"} for k in ("source_train_real", "source_train", "source_dev")}
    tau = M.source_tau(S, st, parts, ps, Output("ft_source_real", "sr"), Output("ft_source_pseudo", "sp"))
    S(corrected_model_stage("model_p2r", Output("ft_target_pseudo", "tp"), tau, 1.0, "all"))
    return S, tau


def test_tau_seeds_at_their_default_leave_the_stages_and_keys_as_before():
    S, tau = _source_tau(_recipe())
    assert tau.stage == "tau" and set(S.declared) == {"tau", "model_p2r"}
    t = S.declared["tau"]
    assert S._key(t) == {"config": {}, "deps": {"ft_source_real": "r0", "ft_source_pseudo": "p0"}}
    assert t.frees == ("ft_source_pseudo",) and S.declared["model_p2r"].inputs == ("ft_target_pseudo", "tau")
    # the recipe's fine-tunes do not key on the extra seeds
    assert _recipe(student={"tau_seeds": [1]}).student.finetune.to_dict() == _recipe().student.finetune.to_dict()


def test_tau_seeds_make_the_tau_downstream_stages_key_on():
    S0, _ = _source_tau(_recipe())
    S, tau = _source_tau(_recipe(student={"tau_seeds": [1, 2]}))
    assert tau.stage == "tau_mean" and S.declared["model_p2r"].inputs == ("ft_target_pseudo", "tau_mean")
    assert S.hashes["tau"] == S0.hashes["tau"]  # the recipe seed's tau is reused as it is
    assert S.hashes["model_p2r"] != S0.hashes["model_p2r"]
    mean = S.declared["tau_mean"]
    assert mean.inputs == ("tau", "tau_s1", "tau_s2") and mean.config == {"seeds": [0, 1, 2]}
    for seed in (1, 2):
        real, pseudo = S.declared[f"ft_source_real_s{seed}"], S.declared[f"ft_source_pseudo_s{seed}"]
        assert real.config["ft"]["seed"] == pseudo.config["ft"]["seed"] == seed
        assert real.config["ft"] == {**_recipe().student.finetune.to_dict(), "seed": seed}  # nothing else differs
        assert (real.config["train"], pseudo.config["train"]) == ("source_train_real.jsonl", "source_train.jsonl")
        assert S.declared[f"tau_s{seed}"].frees == (real.name, pseudo.name)
