"""Device and precision resolution: what a command computes on, and the one-line refusals."""
from __future__ import annotations

import pytest
import torch

from selfspeech.accel import (DeviceError, Precision, check_device, module_device, resolve_device,
                              resolve_precision, to_device)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(" CPU ") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_refused_without_cuda(spec):
    with pytest.raises(DeviceError) as e:
        resolve_device(spec)
    msg = str(e.value)
    assert "\n" not in msg and spec in msg and "no CUDA device" in msg and "cpu" in msg


def test_cuda_index_beyond_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"'cuda:3'.*1 CUDA device \(cuda:0 Fake GPU\).*use cuda:0"):
        resolve_device("cuda:3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process on a one-GPU machine
    with pytest.raises(DeviceError, match="cuda:0"):
        resolve_device("auto")


@pytest.mark.parametrize("spec", ["tpu", "gpu", "cuda:x", "3"])
def test_not_a_device(spec, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


def test_precisions_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == Precision("fp32")  # bf16 on a CPU only when asked
    assert resolve_precision("fp32", cpu).dtype is None
    with pytest.raises(DeviceError, match="fp16.*needs a CUDA GPU.*bf16 or fp32"):
        resolve_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="not a precision"):
        resolve_precision("int4", cpu)
    import selfspeech.accel as A

    monkeypatch.setattr(A, "cpu_has_bf16", lambda: False)
    with pytest.raises(DeviceError, match="no native bfloat16.*fp32"):
        resolve_precision("bf16", cpu)
    monkeypatch.setattr(A, "cpu_has_bf16", lambda: True)
    p = resolve_precision("bf16", cpu)
    assert p.dtype is torch.bfloat16 and not p.scaled and p.scaler(cpu) is None


def test_gpu_precisions(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Old GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (5, 0))
    assert resolve_precision("auto", gpu).name == "fp32"
    with pytest.raises(DeviceError, match="Old GPU has no bfloat16"):
        resolve_precision("bf16", gpu)
    with pytest.raises(DeviceError, match="Old GPU has no float16"):
        resolve_precision("fp16", gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert resolve_precision("auto", gpu).name == "bf16"
    assert resolve_precision("fp16", gpu).scaled


def test_bf16_autocast_on_cpu_lowers_matmuls_only():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with resolve_precision("bf16", torch.device("cpu")).autocast(torch.device("cpu")):
        y = lin(x)
    assert y.dtype is torch.bfloat16 and lin.weight.dtype is torch.float32  # fp32 master weights
    with resolve_precision("fp32", torch.device("cpu")).autocast(torch.device("cpu")):
        assert lin(x).dtype is torch.float32


def test_to_device_moves_nested_tensors_and_keeps_the_rest():
    batch = {"x": torch.zeros(2, 3), "ids": ["a", "b"], "views": [torch.ones(1), torch.ones(2)], "n": 3}
    out = to_device(batch, torch.device("cpu"))
    assert out["ids"] == ["a", "b"] and out["n"] == 3 and isinstance(out["views"], list)
    assert torch.equal(out["x"], batch["x"])
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.Identity()) == torch.device("cpu")


def test_check_device_resolves_both():
    d, p = check_device("cpu", "fp32")
    assert d.type == "cpu" and p.name == "fp32"


@no_cuda
def test_demo_refuses_a_missing_gpu_before_synthesising(tmp_path):
    from typer.testing import CliRunner

    from selfspeech.cli import app

    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--device", "cuda"])
    out = res.output.strip()
    assert res.exit_code == 2 and len(out.splitlines()) == 1 and "--device 'cuda': no CUDA device" in out
    assert not (tmp_path / "d").exists()


def test_recipe_device_places_the_students_unless_they_name_their_own():
    from selfspeech.adapt.recipe import recipe_from_dict

    r = recipe_from_dict({"device": "cpu"})
    assert r.device == "cpu" and r.student.finetune.device == "cpu"
    r = recipe_from_dict({"device": "cpu", "student": {"finetune": {"device": "cuda:1"}}})
    assert r.student.finetune.device == "cuda:1"
    assert recipe_from_dict({}).student.finetune.device == "auto"
    assert recipe_from_dict(r.resolved()).student.finetune.device == "cuda:1"  # reads back


def test_stage_and_run_identity_ignore_where_they_compute():
    from selfspeech.adapt.stages import config_hash
    from selfspeech.train.runs import config_diff

    a = {"finetune": {"lr": 1e-5, "device": "cpu", "num_workers": 0}, "teacher": {"device": "cpu"}}
    b = {"finetune": {"lr": 1e-5, "device": "cuda:0", "num_workers": 4}, "teacher": {"device": "cuda"}}
    assert config_hash(a) == config_hash(b) and config_diff(a, b) == {}
    c = {**b, "finetune": {**b["finetune"], "lr": 2e-5}}
    assert config_hash(a) != config_hash(c) and list(config_diff(a, c)) == ["finetune.lr"]
    assert config_hash({"x": (1, 2)}) == config_hash({"x": [1, 2]})  # as JSON writes it


def test_model_loaders_take_auto(tmp_path, tiny_whisper_dir):
    """The inference loaders resolve device specs themselves: a recipe's or demo's ``auto`` reaches them."""
    from selfspeech.models.whisper import load_for_inference

    model = load_for_inference(tiny_whisper_dir, "auto")
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
