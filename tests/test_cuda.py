"""What only a CUDA GPU can check: device resolution, mixed-precision training steps, device-free checkpoints.

Every test here is marked ``cuda`` and skipped where ``torch.cuda.is_available()``
is false (tests/conftest.py), so CI runs none of them; on a GPU machine
``pytest -m cuda tests/test_cuda.py`` runs them (benchmarks/run_gpu.sh does).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfspeech.accel import check_device, module_device, resolve_device, resolve_precision
from selfspeech.models.ssl import EncoderConfig
from selfspeech.objectives.tasks import BestRQConfig, BestRQTask, Wav2Vec2Config, Wav2Vec2Task
from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.sampler import BucketBatchSampler

pytestmark = pytest.mark.cuda


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def steps_of(out: Path) -> list[dict]:
    return [r for r in log_of(out) if "loss" in r and "event" not in r]


def ssl_collate(frontend: str, seconds: float = 2.0):
    """Random (B, T, 80) log-mels or (B, N) waveforms of ``seconds``, seeded by the loop's RNG."""
    def collate(idx: list[int], rng: random.Random) -> dict:
        g = torch.Generator().manual_seed(rng.getrandbits(31))
        shape = (len(idx), int(seconds * 100), 80) if frontend == "mel" else (len(idx), int(seconds * 16000))
        return {"x": torch.randn(shape, generator=g), "lengths": torch.full((len(idx),), shape[1]),
                "seeds": [rng.getrandbits(62) for _ in idx], "ids": [str(i) for i in idx]}
    return collate


def write_weights(module: torch.nn.Module):
    def write(d: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  str(d / "model.safetensors"))
    return write


def train_tiny(task, frontend: str, out: Path, on_step=None, **loop) -> dict:
    sampler = BucketBatchSampler([2.0] * 8, batch_size=4, seed=0, num_buckets=1)
    cfg = LoopConfig(**{"lr": 1e-3, "max_steps": 3, "warmup_steps": 0, "log_every": 1, "device": "cuda",
                        "precision": "bf16", **loop})
    return train_loop(task, task.loss, sampler, ssl_collate(frontend), cfg, out, write_weights(task),
                      {"test": "cuda"}, progress=False, on_step=on_step)


def test_resolve_device_and_precision_on_cuda():
    d = resolve_device("cuda")
    assert d.type == "cuda" and d.index == 0
    assert resolve_device("auto") == d and resolve_device("cuda:0") == d
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", d).name == expected
    assert resolve_precision("fp16", d).scaled  # fp16 is offered on GPUs, with a gradient scaler
    dev, prec = check_device("cuda", "bf16")
    assert dev == d and prec.dtype == torch.bfloat16


@pytest.mark.parametrize("objective", ["bestrq", "wav2vec2"])
def test_bf16_autocast_steps_of_a_tiny_encoder_are_finite(tmp_path, objective):
    torch.manual_seed(0)
    if objective == "bestrq":
        task, frontend = BestRQTask(EncoderConfig.preset("tiny"), BestRQConfig(codes=64)), "mel"
    else:
        task, frontend = Wav2Vec2Task(EncoderConfig.preset("tiny", frontend="wave"), Wav2Vec2Config()), "wave"
    state = train_tiny(task, frontend, tmp_path)
    assert state["step"] == 3 and state["skipped_steps"] == 0
    start = log_of(tmp_path)[0]
    assert start["device"] == "cuda:0" and start["precision"] == "bf16"
    recs = steps_of(tmp_path)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in recs)
    assert module_device(task).type == "cuda"
    # autocast lowers the matmuls only: master weights stay fp32
    assert all(p.dtype == torch.float32 for p in task.parameters())


def test_fp16_steps_use_the_loss_scaler(tmp_path):
    torch.manual_seed(0)
    task = BestRQTask(EncoderConfig.preset("tiny"), BestRQConfig(codes=64))
    train_tiny(task, "mel", tmp_path, precision="fp16")
    recs = steps_of(tmp_path)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)
    assert all(r["loss_scale"] > 0 for r in recs)


class Stop(Exception):
    pass


def test_a_run_started_on_cuda_resumes_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    task = BestRQTask(EncoderConfig.preset("tiny"), BestRQConfig(codes=64))

    def kill_after_two(rec: dict) -> None:
        if rec["step"] == 2:
            raise Stop  # after step 2's checkpoint (ckpt_every=1)

    with pytest.raises(Stop):
        train_tiny(task, "mel", tmp_path, on_step=kill_after_two, max_steps=4, ckpt_every=1)
    weights = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert all(t.device.type == "cpu" for t in weights.values())
    on_gpu = {k: v.detach().cpu() for k, v in task.state_dict().items()}
    assert set(weights) == set(on_gpu) and all(torch.equal(weights[k], on_gpu[k]) for k in weights)

    torch.manual_seed(0)
    cpu_task = BestRQTask(EncoderConfig.preset("tiny"), BestRQConfig(codes=64))
    state = train_tiny(cpu_task, "mel", tmp_path, max_steps=4, ckpt_every=1, device="cpu", precision="fp32")
    assert state["step"] == 4
    events = [r.get("event") for r in log_of(tmp_path)]
    assert "resume" in events
    resume = next(r for r in log_of(tmp_path) if r.get("event") == "resume")
    assert resume["step"] == 2 and resume["device"] == "cpu"
    assert module_device(cpu_task).type == "cpu"
    assert all(torch.isfinite(p).all() for p in cpu_task.parameters())


def test_whisper_student_step_on_trimmed_features_in_bf16(tmp_path):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from selfspeech.objectives.seq2seq import WhisperSeq2Seq

    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=120, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    model = WhisperForConditionalGeneration(config)

    def collate(idx: list[int], rng: random.Random) -> dict:
        g = torch.Generator().manual_seed(rng.getrandbits(31))
        labels = torch.randint(3, 120, (len(idx), 8), generator=g)
        labels[:, -2:] = -100
        return {"input_features": torch.randn(len(idx), 80, 300, generator=g), "labels": labels}

    cfg = LoopConfig(lr=1e-4, max_steps=2, warmup_steps=0, log_every=1, device="cuda", precision="bf16")
    sampler = BucketBatchSampler([3.0] * 4, batch_size=2, seed=0, num_buckets=1)
    state = train_loop(model, WhisperSeq2Seq(model), sampler, collate, cfg, tmp_path, lambda d: None,
                       {"test": "whisper"}, progress=False, load_model=lambda d: None)
    assert state["step"] == 2
    recs = steps_of(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in recs) and recs[0]["tokens"] == 12
    assert module_device(model).type == "cuda"
