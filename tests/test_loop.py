"""The shared training loop's numerical-fault policy: skip, count, log; stop on a streak, good checkpoint kept."""
from __future__ import annotations

import json
import math

import pytest
import torch

from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.sampler import BucketBatchSampler


def _run(tmp_path, bad_steps, **cfg):
    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    snapshots = {}

    def loss_fn(batch, step):
        loss = ((module(x[batch["idx"]]) - y[batch["idx"]]) ** 2).mean()
        return (loss * math.nan if step + 1 in bad_steps else loss), {}

    def write_model(d):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "model.safetensors"))

    def on_step(rec):
        snapshots[rec["step"]] = module.weight.detach().clone()

    sampler = BucketBatchSampler([1.0] * 8, batch_size=2, seed=0)
    state = train_loop(module, loss_fn, sampler, lambda idx, rng: {"idx": idx, "ids": [f"u{i}" for i in idx]},
                       LoopConfig(**{"max_steps": 8, "lr": 0.1, "log_every": 1, "ckpt_every": 2, **cfg}),
                       tmp_path, write_model, {"t": 1}, progress=False, on_step=on_step)
    return state, snapshots


def test_nonfinite_step_is_skipped_counted_and_logged(tmp_path):
    state, snap = _run(tmp_path, bad_steps={3, 4})
    assert state["step"] == 8 and state["skipped_steps"] == 2
    assert torch.equal(snap[2], snap[3]) and torch.equal(snap[3], snap[4])   # no update on bad steps
    assert not torch.equal(snap[4], snap[5])                                  # training goes on
    events = [json.loads(x) for x in open(tmp_path / "log.jsonl") if "nonfinite" in x]
    assert [e["step"] for e in events] == [3, 4] and events[0]["ids"]          # names the batch's utterances


def test_a_streak_of_nonfinite_steps_stops_with_the_good_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from selfspeech.train.checkpoint import STATE_JSON

    good = _run(tmp_path / "ref", bad_steps=set())[1][4]      # weights after 4 good steps (same schedule)
    with pytest.raises(FloatingPointError, match="3 non-finite .* in a row"):
        _run(tmp_path / "run", bad_steps={5, 6, 7, 8}, max_bad_steps=3)
    saved = load_file(str(tmp_path / "run" / "last" / "model.safetensors"))
    st = json.loads((tmp_path / "run" / "last" / STATE_JSON).read_text())["state"]
    # the checkpoint of step 6 was written mid-streak: its weights are still those of step 4
    assert st["step"] == 6 and st["skipped_steps"] == 2 and torch.equal(saved["weight"], good)


def test_mlflow_run_in_sqlite_is_written_and_read_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _run(tmp_path, bad_steps=set(), tracking=("mlflow", "tensorboard"))
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run((tmp_path / "mlflow_run_id").read_text().strip())
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == list(range(1, 9)) and run.data.params["t"] == "1"
    logged = [json.loads(x)["loss"] for x in open(tmp_path / "log.jsonl") if '"loss"' in x]
    assert [m.value for m in hist] == pytest.approx(logged)               # the same numbers as the JSONL log
    assert run.info.status == "FINISHED" and any((tmp_path / "tensorboard").iterdir())


def test_unknown_tracking_backend_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="tracking.*wandb"):
        _run(tmp_path, bad_steps=set(), tracking=("wandb",))
    assert not (tmp_path / "last").exists()
