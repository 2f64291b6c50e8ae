"""Pipeline stage keys stay what they were when an option is added at a default that computes the same thing."""
from __future__ import annotations

import dataclasses

from selfspeech.adapt import pseudo2real as M
from selfspeech.adapt.recipe import recipe_from_dict


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
