"""The GPU benchmark's machine-checked result keys and its packed Whisper weights, without a GPU.

benchmarks/gpu.py itself runs on a GPU machine (its ``--smoke`` mode runs every
part on a CPU in ~15 s and needs ../shared to build its inputs); here only the
pieces whose mistakes would go unnoticed until the GPU run: the schema check
and the int8 packing of the weights that travel there.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu import GOALS, check_result, goals_met  # noqa: E402
from gpu_inputs import GROUP, dequantize, quantize  # noqa: E402


def complete() -> dict:
    return {"device": "NVIDIA H200", "pretraining": {"mfu": 0.43, "objectives": {}},
            "student": {"speedup_vs_seq2seq_trainer": 3.4}, "labelling": {"speedup_vs_transformers_pipeline": 2.5}}


def test_a_complete_result_passes_and_meets_the_goals():
    d = complete()
    assert check_result(d) == []
    assert goals_met(d) == {"pretraining_mfu": True, "student_speedup": True, "labelling_speedup": True}
    d["pretraining"]["mfu"] = GOALS["pretraining_mfu"] - 0.01
    assert goals_met(d)["pretraining_mfu"] is False and check_result(d) == []


@pytest.mark.parametrize("part,key,value", [
    ("pretraining", "mfu", None), ("pretraining", "mfu", 0), ("pretraining", "mfu", "0.4"),
    ("student", "speedup_vs_seq2seq_trainer", True), ("labelling", "speedup_vs_transformers_pipeline", -1.0)])
def test_a_missing_or_non_positive_figure_is_a_problem(part, key, value):
    d = complete()
    d[part][key] = value
    problems = check_result(d)
    assert len(problems) == 1 and problems[0].startswith(f"{part}.{key}")


def test_a_failed_part_names_its_error_and_the_device_must_be_named():
    d = complete()
    d["labelling"] = {"error": "RuntimeError: CUDA out of memory\nmore", "speedup_vs_transformers_pipeline": None}
    del d["student"]
    d["device"] = ""
    problems = check_result(d)
    assert problems[0].startswith("device")
    assert "student: missing" in problems
    assert any("labelling" in p and "CUDA out of memory" in p and "more" not in p for p in problems)
    assert goals_met(d) == {"pretraining_mfu": True, "student_speedup": None, "labelling_speedup": None}


def test_int8_packing_round_trips_within_half_a_step_per_group():
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(8, 4 * GROUP, generator=g) * torch.logspace(-4, 1, 8)[:, None],
             "conv": torch.randn(6, 8, 3 * GROUP // 8, generator=g), "bias": torch.randn(5, generator=g),
             "zeros": torch.zeros(2, GROUP)}
    packed = quantize(state)
    assert packed["w"].dtype == torch.int8 and packed["w.scale"].dtype == torch.float32
    assert packed["bias"].dtype == torch.float16  # 1-D tensors stay float16
    back = dequantize(packed)
    assert set(back) == set(state) and all(back[k].dtype == torch.float32 for k in back)
    for k in ("w", "conv"):
        w = state[k].reshape(-1, GROUP)
        step = w.abs().amax(1, keepdim=True) / 127
        assert ((back[k].reshape(-1, GROUP) - w).abs() <= 0.5 * step * 1.01 + 1e-7).all()
    assert torch.equal(back["zeros"], state["zeros"])  # an all-zero group: no division by a zero scale
