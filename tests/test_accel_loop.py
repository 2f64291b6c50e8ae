"""The shared loop's device, precision, accumulation and loader plumbing, on the CPU.

bf16 autocast runs on CPUs too, so every trainer's mixed-precision path is
exercised here; a GPU run differs only in the device the same code names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfspeech.accel import DeviceError, cpu_has_bf16
from selfspeech.config import ConfigError, to_mapping
from selfspeech.train.loader import BatchLoader, collate_seed, micro_batches
from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.update import mean_records
from selfspeech.train.sampler import BucketBatchSampler

bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


# -- a regression small enough to compare updates exactly ------------------------------------

class Reg(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 1)


X = torch.randn(24, 3, generator=torch.Generator().manual_seed(1))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3


def run_reg(out: Path, weighted: bool = False, **loop) -> tuple[Reg, dict]:
    m = Reg()
    sampler = BucketBatchSampler([1.0] * len(X), batch_size=8, seed=0, num_buckets=1)

    def collate(idx, rng):
        return {"x": X[idx], "y": Y[idx], "ids": [str(i) for i in idx]}

    def loss_fn(b, step):
        err = (m.lin(b["x"]) - b["y"]) ** 2
        rec = {"mse": float(err.detach().mean())}
        if weighted:  # a loss that is a mean over unequal counts: only the first two items count
            return err[:2].mean(), {**rec, "_weight": float(min(2, len(err)))}
        return err.mean(), rec

    cfg = LoopConfig(**{"lr": 0.05, "max_steps": 6, "warmup_steps": 0, "log_every": 1, "schedule": "constant",
                        **loop})
    state = train_loop(m, loss_fn, sampler, collate, cfg, out, lambda d: None, {"loop": to_mapping(cfg)}, progress=False,
                       load_model=lambda d: None)
    return m, state


def test_micro_batches_cover_the_batch_in_order():
    assert micro_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert micro_batches([4, 5], 4) == [[4], [5]]          # never an empty micro-batch
    assert micro_batches([1, 2, 3], 1) == [[1, 2, 3]]
    assert collate_seed(0, 5, 0) == 5                       # part 0: the seed without accumulation
    assert len({collate_seed(0, 5, j) for j in range(4)}) == 4


def test_grad_accum_gives_the_update_of_the_whole_batch(tmp_path):
    whole, _ = run_reg(tmp_path / "a")
    parts, _ = run_reg(tmp_path / "b", grad_accum=2)
    assert torch.allclose(whole.lin.weight, parts.lin.weight, atol=1e-6)
    four, _ = run_reg(tmp_path / "c", grad_accum=4)
    assert torch.allclose(whole.lin.weight, four.lin.weight, atol=1e-6)
    # the logged loss is the whole batch's too
    la = [r["loss"] for r in log_of(tmp_path / "a") if "loss" in r]
    lb = [r["loss"] for r in log_of(tmp_path / "b") if "loss" in r]
    assert np.allclose(la, lb, atol=1e-4)


def test_grad_accum_weighs_micro_batches_by_the_objectives_count(tmp_path):
    # each micro-batch's loss is a mean over 2 items: equal weights, so the update is the mean of the
    # micro-batch gradients; with item counts instead it would differ for unequal micro-batches
    a, _ = run_reg(tmp_path / "a", weighted=True, grad_accum=3)
    b, _ = run_reg(tmp_path / "b", weighted=True)
    assert not torch.allclose(a.lin.weight, b.lin.weight, atol=1e-4)  # a different loss (6 items vs 2 count)
    rec = mean_records([(1.0, {"mse": 1.0, "tag": "x"}), (3.0, {"mse": 3.0, "tag": "y"})])
    assert rec == {"mse": 2.5, "tag": "y"}


def test_loop_records_device_and_precision_and_refuses_fp16_on_cpu(tmp_path):
    run_reg(tmp_path / "a", device="cpu")
    start = log_of(tmp_path / "a")[0]
    assert start["device"] == "cpu" and start["precision"] == "fp32"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="fp16.*CUDA"):
            run_reg(tmp_path / "b", precision="fp16")
        with pytest.raises(DeviceError, match="no CUDA device"):
            run_reg(tmp_path / "c", device="cuda")
        assert not (tmp_path / "b" / "log.jsonl").exists() and not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="precision"):
        LoopConfig(precision="half")


def test_a_run_resumes_and_is_reused_on_other_runtime_settings(tmp_path):
    _, s1 = run_reg(tmp_path / "a", num_workers=0)
    _, s2 = run_reg(tmp_path / "a", num_workers=2, device="cpu", compile=False)  # finished: returned at once
    assert s1["step"] == s2["step"] == 6
    with pytest.raises(ValueError, match="another config"):
        run_reg(tmp_path / "a", lr=0.1)


def test_grad_checkpointing_needs_checkpointable_layers(tmp_path):
    with pytest.raises(ConfigError, match="grad_checkpointing.*no checkpointable layers"):
        run_reg(tmp_path / "a", grad_checkpointing=True)


def test_compile_needs_repeated_blocks(tmp_path):
    with pytest.raises(ConfigError, match="compile.*no repeated blocks"):
        run_reg(tmp_path / "a", compile=True)


def test_compiled_encoder_layers_give_the_eager_losses(tmp_path):
    """Regional compilation (inductor, on this CPU) of the encoder's layers; stated tolerance 1e-4."""
    a, b = _pretrain(tmp_path, "eager", steps=3), _pretrain(tmp_path, "compiled", steps=3, compile=True)
    la = [r["loss"] for r in log_of(a) if "loss" in r and "event" not in r]
    lb = [r["loss"] for r in log_of(b) if "loss" in r and "event" not in r]
    assert len(la) == 3 and np.allclose(la, lb, atol=1e-4), (la, lb)


def test_loader_workers_prepare_the_same_batches():
    def collate(idx, rng):
        return {"x": torch.tensor(idx), "draw": torch.tensor([rng.random()])}

    batches = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    plain = list(BatchLoader(collate, seed=3, grad_accum=2)(batches, first_step=10))
    workers = list(BatchLoader(collate, seed=3, grad_accum=2, num_workers=2)(batches, first_step=10))
    assert len(plain) == len(workers) == 3
    for a, b in zip(plain, workers):
        assert [n for n, _ in a] == [n for n, _ in b]
        for (_, x), (_, y) in zip(a, b):
            assert torch.equal(x["x"], y["x"]) and torch.equal(x["draw"], y["draw"])
    assert list(BatchLoader(collate, 0)([], 0)) == []


# -- every trainer through bf16 autocast, and workers with resume ------------------------------

def _pretrain(tmp_path, name, objective="bestrq", steps=4, **loop):
    from test_ssl import _corpus, _cfg

    from selfspeech.train.pretrain import pretrain

    m = _corpus(tmp_path) if not (tmp_path / "m.jsonl").exists() else tmp_path / "m.jsonl"
    pretrain(m, tmp_path / name, _cfg(objective, steps, **loop), progress=False)
    return tmp_path / name


def _ctc(tmp_path, name, **loop):
    from test_ssl import _corpus

    from selfspeech.train.ctc import CTCConfig, finetune_ctc

    m = _corpus(tmp_path, text=True) if not (tmp_path / "m.jsonl").exists() else tmp_path / "m.jsonl"
    cfg = CTCConfig(targets="char", encoder={"preset": "tiny", "dropout": 0.0}, max_batch_seconds=12,
                    loop={"max_steps": 4, "lr": 1e-3, "log_every": 1, "warmup_fraction": 0.1, **loop})
    finetune_ctc(m, m, tmp_path / name, cfg, progress=False)
    return tmp_path / name


def _speaker(tmp_path, name, **loop):
    from test_speaker_ssl import _speaker_corpus, _sv_cfg

    from selfspeech.train.speaker import train_speaker

    m = _speaker_corpus(tmp_path) if not (tmp_path / "m.jsonl").exists() else tmp_path / "m.jsonl"
    base = _sv_cfg("simclr", 4, ssps=False)
    cfg = type(base).from_dict({**base.to_dict(), "loop": {**base.to_dict()["loop"], **loop}})
    train_speaker(m, tmp_path / name, cfg, progress=False)
    return tmp_path / name


def _whisper(tmp_path, name, tiny_whisper_dir=None, **loop):
    from test_whisper_ft import corpus

    from selfspeech.train.whisper_ft import FinetuneConfig, finetune

    m = tmp_path / "train.jsonl"
    if not m.exists():
        corpus(tmp_path, ["a cat", "the dog", "a big cat sat", "dogs run", "cats sit", "one two"])
    cfg = FinetuneConfig(lr=1e-3, batch_size=3, max_epochs=None, max_steps=4, warmup_steps=0, log_every=1,
                         eval_every=4, **loop)
    finetune(m, None, tiny_whisper_dir, tmp_path / name, cfg, progress=False)
    return tmp_path / name


def _dino(tmp_path, name, **loop):
    from test_speaker_ssl import _speaker_corpus, _sv_cfg

    from selfspeech.train.speaker import train_speaker

    m = _speaker_corpus(tmp_path) if not (tmp_path / "m.jsonl").exists() else tmp_path / "m.jsonl"
    base = _sv_cfg("dino", 4, ssps=False)
    base = type(base).from_dict({**base.to_dict(), "ssps": {"k": 2, "m": 0, "queue": 16, "start": 0.0,
                                                             "ref_seconds": 1.5}})
    cfg = type(base).from_dict({**base.to_dict(), "loop": {**base.to_dict()["loop"], **loop}})
    train_speaker(m, tmp_path / name, cfg, progress=False)
    return tmp_path / name


TRAINERS = {"bestrq": _pretrain, "wav2vec2": lambda t, n, **k: _pretrain(t, n, "wav2vec2", **k),
            "birq": lambda t, n, **k: _pretrain(t, n, "birq", **k),
            "ctc": _ctc, "speaker_simclr": _speaker, "speaker_dino_ssps": _dino, "whisper": None}


@bf16
@pytest.mark.parametrize("trainer", sorted(TRAINERS))
def test_bf16_autocast_trains_every_trainer_close_to_fp32(tmp_path, trainer, tiny_whisper_dir):
    """Stated tolerance: the first loss (before any update, so the same weights and batch) within 3%
    of fp32, every loss and gradient finite, and the checkpoint still fp32."""
    fn = TRAINERS[trainer] or (lambda t, n, **k: _whisper(t, n, tiny_whisper_dir, **k))
    a, b = fn(tmp_path, "fp32", precision="fp32"), fn(tmp_path, "bf16", precision="bf16")
    la = [r for r in log_of(a) if "loss" in r and "event" not in r]
    lb = [r for r in log_of(b) if "loss" in r and "event" not in r]
    assert log_of(b)[0]["precision"] == "bf16" and log_of(a)[0]["precision"] == "fp32"
    assert len(la) == len(lb) >= 1 and all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in lb)
    assert abs(lb[0]["loss"] - la[0]["loss"]) <= 0.03 * abs(la[0]["loss"]) + 1e-3, (la[0], lb[0])
    weights = load_file(str(next((b / "best").glob("*.safetensors"))))
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())


def test_workers_resume_to_the_weights_of_an_in_process_run(tmp_path):
    import selfspeech.train.pretrain as P

    from selfspeech.models.ssl import load_state

    full = _pretrain(tmp_path, "full", "birq", steps=8)

    class Kill(Exception):
        pass

    orig = P.train_loop

    def killing(*a, **k):
        k["on_step"] = lambda rec: (_ for _ in ()).throw(Kill()) if rec["step"] == 6 else None
        return orig(*a, **k)

    P.train_loop = killing
    try:
        with pytest.raises(Kill):
            _pretrain(tmp_path, "cut", "birq", steps=8, num_workers=2)
    finally:
        P.train_loop = orig
    cut = _pretrain(tmp_path, "cut", "birq", steps=8, num_workers=2)  # resumes from step 5, with workers
    a, b = load_state(full / "best"), load_state(cut / "best")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in log_of(full) if "loss" in r and "event" not in r]
    lb = [r["loss"] for r in log_of(cut) if "loss" in r and "event" not in r]
    assert la == lb


def test_speaker_views_with_workers_equal_in_process(tmp_path):
    a, b = _speaker(tmp_path, "a"), _speaker(tmp_path, "b", num_workers=2)
    wa, wb = load_file(str(a / "best" / "model.safetensors")), load_file(str(b / "best" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fp16_loss_scaling_path_steps_checkpoints_and_resumes(tmp_path, monkeypatch):
    """fp16 is refused on a CPU, but its loop path (scale, unscale before clipping, scaler step and update,
    the scale in the checkpoint) is device-independent: run it here under CPU float16 autocast."""
    import selfspeech.train.loop as L
    from selfspeech.accel import Precision

    monkeypatch.setattr(L, "resolve_precision", lambda *a, **k: Precision("fp16"))
    m16, st = run_reg(tmp_path / "a", ckpt_every=2)
    recs = [r for r in log_of(tmp_path / "a") if "loss" in r and "event" not in r]
    assert st["step"] == 6 and all("loss_scale" in r for r in recs) and "scaler" in st
    assert log_of(tmp_path / "a")[0]["precision"] == "fp16"
    m32, _ = run_reg(tmp_path / "b", precision="fp32")
    assert torch.allclose(m16.lin.weight, m32.lin.weight, atol=2e-2)  # float16 products, fp32 weights
    assert m16.lin.weight.dtype is torch.float32


def test_whisper_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_whisper_dir):
    a = _whisper(tmp_path, "plain", tiny_whisper_dir)
    b = _whisper(tmp_path, "ckpt", tiny_whisper_dir, grad_checkpointing=True)
    la = [r["loss"] for r in log_of(a) if "loss" in r and "event" not in r]
    lb = [r["loss"] for r in log_of(b) if "loss" in r and "event" not in r]
    assert len(la) == 4 and np.allclose(la, lb, atol=1e-4), (la, lb)


def test_encoder_gradient_checkpointing_through_the_loop(tmp_path):
    a, b = _pretrain(tmp_path, "plain"), _pretrain(tmp_path, "ckpt", grad_checkpointing=True)
    la = [r["loss"] for r in log_of(a) if "loss" in r and "event" not in r]
    lb = [r["loss"] for r in log_of(b) if "loss" in r and "event" not in r]
    assert np.allclose(la, lb, atol=1e-4), (la, lb)
