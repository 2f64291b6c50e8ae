"""The shared training loop's numerical-fault policy: skip, count, log; stop on a streak, good checkpoint kept."""
from __future__ import annotations

import json
import math

import pytest
import torch

from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.sampler import BucketBatchSampler


def _run(tmp_path, bad_steps, run_config=None, **cfg):
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
                       tmp_path, write_model, run_config or {"t": 1}, progress=False, on_step=on_step)
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


def test_schedule_first_update_learns_and_warmup_in_steps_or_fraction():
    from selfspeech.train.loop import lr_at

    frac = LoopConfig(lr=1.0, warmup_fraction=0.1, max_steps=100)
    lrs = [lr_at(frac, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == 1.0 and lrs[10] == 1.0    # no update at lr 0
    assert lrs[-1] == pytest.approx(1 / 90) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # decays to ~0
    steps = LoopConfig(lr=1.0, warmup_steps=4, max_steps=20, schedule="cosine")
    assert [lr_at(steps, s, 20) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(LoopConfig(lr=2.0, warmup_steps=0, schedule="constant"), 999, 1000) == 2.0
    timed = LoopConfig(lr=1.0, warmup_fraction=0.5, max_steps=10_000, budget_seconds=100.0)
    assert 0 < lr_at(timed, 0, 10_000, seconds=0.0) < 1e-3 and lr_at(timed, 5, 10_000, seconds=50.0) == 1.0
    with pytest.raises(ValueError, match="step budget"):
        LoopConfig(warmup_steps=3, budget_seconds=10.0)
    with pytest.raises(ValueError, match="budget"):
        LoopConfig(max_steps=None)


def test_epochs_become_steps_through_the_sampler_and_clip_zero_is_off(tmp_path):
    from selfspeech.train.loop import total_steps

    sampler = BucketBatchSampler([1.0] * 8, batch_size=3, seed=0)  # 3 batches an epoch (3 + 3 + 2)
    assert total_steps(LoopConfig(max_epochs=2, max_steps=None), sampler) == 6
    assert total_steps(LoopConfig(max_epochs=2, max_steps=4), sampler) == 4
    state, _ = _run(tmp_path / "a", bad_steps=set(), max_steps=None, max_epochs=3)
    assert state["step"] == 12  # 4 batches of 2 an epoch
    # clip 0: the update uses the raw gradient; a tiny clip shrinks it
    _, free = _run(tmp_path / "b", bad_steps=set(), grad_clip=0.0, max_steps=1, betas=(0.0, 0.0), fused=False)
    _, clipped = _run(tmp_path / "c", bad_steps=set(), grad_clip=1e-6, max_steps=1, betas=(0.0, 0.0), fused=False)
    assert not torch.equal(free[1], clipped[1])


def test_a_finished_run_returns_at_once_and_drops_last_unless_kept(tmp_path):
    state, _ = _run(tmp_path / "drop", bad_steps=set(), keep_last=False)
    assert state["done"] and not (tmp_path / "drop" / "last").exists()
    assert (tmp_path / "drop" / "best" / "model.safetensors").is_file()
    log = (tmp_path / "drop" / "log.jsonl").read_text()
    again, snaps = _run(tmp_path / "drop", bad_steps=set(), keep_last=False)
    assert again["step"] == 8 and snaps == {} and (tmp_path / "drop" / "log.jsonl").read_text() == log
    with pytest.raises(ValueError, match="another config"):
        _run(tmp_path / "drop", bad_steps=set(), run_config={"t": 2}, keep_last=False)
    _run(tmp_path / "keep", bad_steps=set())
    assert (tmp_path / "keep" / "last" / "model.safetensors").is_file()  # keep_last defaults to True


def test_fork_starts_from_a_kept_checkpoint_and_refuses_another_run(tmp_path):
    from selfspeech.train.loop import fork_checkpoint, load_safetensors

    base, _ = _run(tmp_path / "base", bad_steps=set(), keep_every=4)
    module = torch.nn.Linear(2, 1)

    def write(d):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "model.safetensors"))
    step = fork_checkpoint(tmp_path / "base" / "keep" / "step-4", tmp_path / "fork", {"t": 1}, write,
                           load_safetensors(module))
    assert step == 4 and (tmp_path / "fork" / "last" / "train_state.json").is_file()
    events = [json.loads(x) for x in open(tmp_path / "fork" / "log.jsonl")]
    assert events[-1]["event"] == "fork" and max(e.get("step", 0) for e in events) == 4  # history up to the fork
    with pytest.raises(ValueError, match="differs"):
        fork_checkpoint(tmp_path / "base" / "keep" / "step-4", tmp_path / "fork2", {"t": 2}, write,
                        load_safetensors(module))
    fork_checkpoint(tmp_path / "base" / "keep" / "step-4", tmp_path / "fork3", {"t": 2}, write,
                    load_safetensors(module), may_differ=("t",))


def test_a_config_built_in_python_is_range_checked_too():
    from selfspeech.config import ConfigError
    from selfspeech.train.whisper_ft import FinetuneConfig

    with pytest.raises(ConfigError, match=r"^lr: 0 is not above 0; give a number > 0"):
        LoopConfig(lr=0)
    with pytest.raises(ConfigError, match=r"max_duration: 31.0 is above 30"):
        FinetuneConfig(max_duration=31.0)
    with pytest.raises(ConfigError, match=r"warmup_steps: 3 is set with a time budget"):
        LoopConfig(warmup_steps=3, budget_seconds=10.0)


def test_rerunning_a_finished_run_gives_the_module_its_final_weights(tmp_path):
    """A trainer may export the module after the loop (pretraining's encoder/): a rerun must not export
    the freshly initialised weights."""
    from safetensors.torch import load_file, save_file

    x, y = torch.randn(8, 2), torch.randn(8, 1)

    def run(keep_last: bool):
        torch.manual_seed(0)
        module = torch.nn.Linear(2, 1)

        def loss_fn(batch, step):
            return ((module(x[batch["idx"]]) - y[batch["idx"]]) ** 2).mean(), {}

        def write_model(d):
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(d / "model.safetensors"))
        train_loop(module, loss_fn, BucketBatchSampler([1.0] * 8, batch_size=2, seed=0),
                   lambda idx, rng: {"idx": idx}, LoopConfig(max_steps=6, lr=0.1, keep_last=keep_last),
                   tmp_path / str(keep_last), write_model, {"t": 1}, progress=False)
        return module.weight.detach().clone()

    for keep_last in (True, False):
        trained = run(keep_last)
        final = load_file(str(tmp_path / str(keep_last) / "best" / "model.safetensors"))["weight"]
        assert torch.equal(trained, final)
        assert torch.equal(run(keep_last), final)  # returned at once, weights restored
