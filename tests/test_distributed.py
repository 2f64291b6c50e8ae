"""Data parallel from the torchrun environment: sharded sampler, 2-process gloo runs equal to one process."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from selfspeech.train.distributed import ShardedBatchSampler
from selfspeech.train.sampler import BucketBatchSampler


def test_sharded_sampler_gives_every_rank_the_same_number_of_batches():
    rng = np.random.default_rng(0)
    durations = np.concatenate([rng.uniform(0.5, 1.0, 90), rng.uniform(10, 30, 7)])  # skewed lengths
    inner = [BucketBatchSampler(durations, max_batch_seconds=40, seed=3) for _ in range(3)]
    shards = [ShardedBatchSampler(inner[r], r, 3) for r in range(3)]
    for epoch in range(4):
        per_rank = [list(s) for s in shards]
        assert len({len(b) for b in per_rank}) == 1                      # equal step counts: no hang
        seen = sorted(i for b in per_rank for batch in b for i in batch)
        full = inner[0].batches(epoch)
        kept = full[: len(full) // 3 * 3]
        assert seen == sorted(i for batch in kept for i in batch) and shards[0].dropped(epoch) == len(full) % 3
    s = ShardedBatchSampler(BucketBatchSampler(durations, max_batch_seconds=40, seed=3), 1, 3)
    it = iter(s)
    next(it), next(it)
    st = s.state_dict()
    s2 = ShardedBatchSampler(BucketBatchSampler(durations, max_batch_seconds=40, seed=3), 1, 3)
    s2.load_state_dict(st)
    assert list(s2) == list(s)                                             # resumes at the same batch
    with pytest.raises(ValueError, match="resume with the same count"):
        ShardedBatchSampler(BucketBatchSampler(durations, batch_size=4), 0, 2).load_state_dict(st)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctc_setup(tmp_path):
    items = []
    rng = np.random.default_rng(0)
    words = ["A", "BAD", "CAT", "DOG"]
    for i in range(6):
        t = np.arange(int(1.5 * 16000)) / 16000
        w = (0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
        sf.write(tmp_path / f"u{i}.wav", w, 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(tmp_path / f"u{i}.wav"), "duration": 1.5,
                      "text": words[i % 4], "speaker": f"s{i}"})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items[:4]))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items[4:]))


SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from selfspeech.train.ctc import CTCConfig, finetune_ctc
d, out, batch_seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
cfg = CTCConfig(targets="char", encoder={"preset": "tiny", "dropout": 0.0}, mask_time_prob=0.0, mask_channel_prob=0.0,
                max_batch_seconds=batch_seconds,
                loop={"max_steps": 6, "lr": 3e-3, "log_every": 1, "ckpt_every": 3, "warmup_fraction": 0.2})
finetune_ctc(d + "/train.jsonl", d + "/dev.jsonl", out, cfg, progress=False)
"""


@pytest.mark.slow
def test_two_process_gloo_ctc_equals_one_process_with_the_combined_batch(tmp_path):
    """torchrun, 2 ranks x 2 utterances a step == 1 process x 4 utterances a step (same weights)."""
    from safetensors.torch import load_file

    _ctc_setup(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "one"), "6.0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), str(tmp_path), str(tmp_path / "two"), "3.0"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "best" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in b)
    # the all-reduced gradient equals the combined batch's up to float summation order; Adam's
    # m / sqrt(v) turns such 1e-7 differences on near-zero gradients into up to ~lr-sized steps,
    # hence a tolerance of a fraction of lr (3e-3) on the weights and a tight one on the losses
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-3, worst
    log1 = [json.loads(x) for x in open(tmp_path / "one" / "log.jsonl") if '"loss"' in x]
    log = [json.loads(x) for x in open(tmp_path / "two" / "log.jsonl") if '"loss"' in x]
    assert [r["step"] for r in log] == list(range(1, 7))                    # rank 0 alone logs, once a step
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in log1], rel=1e-5)
    assert [r["grad_norm"] for r in log] == pytest.approx([r["grad_norm"] for r in log1], rel=1e-4)
    state = json.loads((tmp_path / "two" / "last" / "train_state.json").read_text())["state"]
    assert state["sampler"]["world"] == 2


WHISPER_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from selfspeech.train.whisper_ft import FinetuneConfig, finetune
d, init, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = FinetuneConfig(lr=5e-3, warmup_steps=1, max_epochs=4, max_steps=4, batch_size=batch, num_buckets=1,
                     eval_every=2, patience=9, max_new_tokens=4, log_every=1, keep_last=True)
finetune(d + "/train.jsonl", d + "/dev.jsonl", init, out, cfg, progress=False)
"""


@pytest.mark.slow
def test_two_process_whisper_student_equals_one_process_with_the_combined_batch(tmp_path, tiny_whisper_dir):
    """The Whisper student under torchrun: token-weighted gradients, so 2 x 2 utterances == 1 x 4."""
    from safetensors.torch import load_file

    _ctc_setup(tmp_path)
    texts = ["a", "the bad cat sat down", "dog", "a cat and a dog and a bad cat"]  # unequal token counts
    items = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({**it, "text": t}) + "\n" for it, t in zip(items, texts)))
    script = tmp_path / "run_whisper.py"
    script.write_text(WHISPER_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path), str(tiny_whisper_dir)]
    one = subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one"), "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), *args, str(tmp_path / "two"), "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    log1 = [json.loads(x) for x in open(tmp_path / "one" / "log.jsonl") if '"loss"' in x]
    log2 = [json.loads(x) for x in open(tmp_path / "two" / "log.jsonl") if '"loss"' in x]
    assert [r["step"] for r in log2] == [1, 2, 3, 4] and [r["batch"] for r in log2] == [2] * 4
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], rel=1e-5)
    assert [r["grad_norm"] for r in log2] == pytest.approx([r["grad_norm"] for r in log1], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-3  # Adam on ~1e-7 gradient noise: < lr
    evals = [json.loads(x) for x in open(tmp_path / "two" / "log.jsonl") if '"eval"' in x]
    assert [e["step"] for e in evals] == [2, 4]  # rank 0 alone decodes the dev set and logs


PRETRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from selfspeech.train.pretrain import PretrainConfig, pretrain
d, out, batch_seconds, objective = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
cfg = PretrainConfig(objective=objective, encoder={"preset": "tiny", "dropout": 0.0}, max_batch_seconds=batch_seconds,
                     crop_seconds=1.2, loop={"max_steps": 4, "lr": 3e-3, "log_every": 1, "ckpt_every": 2,
                                             "warmup_fraction": 0.25})
pretrain(d + "/all.jsonl", out, cfg, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["bestrq", "birq"])
def test_two_process_pretraining_equals_one_process_with_the_combined_batch(tmp_path, objective):
    """Per-utterance random streams (crop, masks, noise) and masked-frame-weighted gradients make
    2 ranks x 2 utterances == 1 process x 4 utterances, masks and all."""
    from safetensors.torch import load_file

    _ctc_setup(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
    script = tmp_path / "run_pt.py"
    script.write_text(PRETRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path), str(tmp_path / "one"), "4.8", objective],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(script), str(tmp_path), str(tmp_path / "two"), "2.4",
                          objective], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    log1 = [json.loads(x) for x in open(tmp_path / "one" / "log.jsonl") if '"loss"' in x]
    log2 = [json.loads(x) for x in open(tmp_path / "two" / "log.jsonl") if '"loss"' in x]
    assert [r["batch"] for r in log1] == [4] * 4 and [r["batch"] for r in log2] == [2] * 4
    assert [r["loss"] for r in log2] == pytest.approx([r["loss"] for r in log1], rel=1e-5)
    a = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3
