"""LoRA students (models/lora.py) trained by the shared loop, saved as adapter folders, and their merged deltas."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_whisper_ft import TEXTS, corpus, one_thread, read_log  # noqa: F401 (one_thread: autouse fixture)

from selfspeech.models.lora import AdapterError, LoraConfig, check_adapter, merged_delta, read_adapter
from selfspeech.train.whisper_ft import FinetuneConfig, finetune


LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
CFG = FinetuneConfig(lr=1e-2, warmup_steps=0, max_steps=30, max_epochs=None, batch_size=4, eval_every=30,
                     log_every=1, max_new_tokens=6, lora=LORA)


@pytest.fixture(scope="module")
def lora_base(tiny_whisper_dir, tmp_path_factory) -> Path:
    """conftest's tiny random Whisper with token embeddings of unit scale: at init scale (0.02) the frozen,
    tied output projection caps every logit near 1, and no adapter could fit a transcript."""
    import shutil

    from transformers import WhisperForConditionalGeneration

    out = tmp_path_factory.mktemp("lora_base") / "init"
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir)
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight.mul_(50.0)
    model.save_pretrained(out)
    for f in tiny_whisper_dir.iterdir():
        if not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def lora_run(lora_base, tmp_path_factory):
    """A LoRA student overfitting four tones; (corpus folder, best/ adapter folder)."""
    root = tmp_path_factory.mktemp("lora_run")
    train = corpus(root, TEXTS)
    return root, finetune(train, None, lora_base, root / "out", CFG, progress=False)


def test_config_keeps_full_finetuning_mapping_and_checks_lora():
    assert "lora" not in FinetuneConfig().to_dict()  # stage caches of full fine-tunes stay valid
    d = FinetuneConfig.from_dict({"lora": {"rank": 32, "where": "decoder"}})
    assert d.lora == LoraConfig(rank=32, where="decoder") and d.to_dict()["lora"]["rank"] == 32
    with pytest.raises(ValueError, match="lora.rank"):
        FinetuneConfig.from_dict({"lora": {"rank": 0}})
    with pytest.raises(ValueError, match="freeze_encoder.*lora.where: decoder"):
        FinetuneConfig(freeze_encoder=True, lora=LORA)
    assert LoraConfig(where="encoder").regex().startswith(r"model\.encoder\.")


def test_lora_trains_adapters_only_and_loss_falls(lora_run, lora_base):
    from selfspeech.arith.task_vector import load_state

    root, best = lora_run
    losses = [r["loss"] for r in read_log(root / "out") if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] / 3, losses
    assert not (best / "model.safetensors").exists() and (best / "adapter_model.safetensors").is_file()
    summary = json.loads((root / "out" / "summary.json").read_text())
    info = read_adapter(best)
    # q, k, v, out of 1 encoder self-attention + decoder self- and cross-attention, fc1/fc2 of each block
    assert len(info.shapes) == 4 + 8 + 4 and info.rank == 4
    n_lora = sum(a[0] * a[1] + b[0] * b[1] for a, b in info.shapes.values())
    assert summary["trainable_parameters"] == n_lora
    # every base weight is untouched: the merged model differs from theta0 in the adapted matrices only
    base, merged = load_state(lora_base), load_state(best)
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    assert changed == set(info.shapes)


def test_adapter_folder_loads_with_peft_and_transformers(lora_run, lora_base):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from selfspeech.models.whisper import load_for_inference

    root, best = lora_run
    x = torch.randn(1, 80, 60)
    dec = torch.tensor([[50257, 50362]])
    base = WhisperForConditionalGeneration.from_pretrained(lora_base).eval()
    peft_model = PeftModel.from_pretrained(base, best).eval()
    via_hf = WhisperForConditionalGeneration.from_pretrained(best).eval()  # transformers' own peft integration
    ours = load_for_inference(best)
    with torch.no_grad():
        ref = peft_model(input_features=torch.nn.functional.pad(x, (0, 3000 - 60)), decoder_input_ids=dec).logits
        for m in (via_hf, ours):
            out = m(input_features=torch.nn.functional.pad(x, (0, 3000 - 60)), decoder_input_ids=dec).logits
            assert torch.allclose(out, ref, atol=1e-4)
    # decoding a LoRA student through the toolkit's transcriber merges it into its base
    from selfspeech.label.transcribe import transcribe_whisper

    hyp = transcribe_whisper(best, root / "train.jsonl", root / "hyp.jsonl")
    assert len(hyp.read_text().splitlines()) == len(TEXTS)


def test_merged_delta_is_scaled_b_times_a_and_matches_peft_merge(lora_run, lora_base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import WhisperForConditionalGeneration

    _, best = lora_run
    delta = merged_delta(best)
    raw = load_file(str(best / "adapter_model.safetensors"))
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    stem = "base_model.model.model.decoder.layers.0.self_attn.q_proj"
    expect = raw[f"{stem}.lora_B.weight"] @ raw[f"{stem}.lora_A.weight"] * (LORA.alpha / LORA.rank)
    assert torch.allclose(delta[name], expect) and delta[name].abs().sum() > 0
    base = WhisperForConditionalGeneration.from_pretrained(lora_base)
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, best).merge_and_unload().state_dict()
    for n, d in delta.items():
        assert torch.allclose(merged[n] - theta0[n], d, atol=1e-6), n


def test_lora_resume_after_interruption_gives_same_adapter(lora_base, tmp_path):
    from safetensors.torch import load_file

    train = corpus(tmp_path, TEXTS)
    cfg = dataclasses.replace(CFG, max_steps=6, ckpt_every=2, lora=dataclasses.replace(LORA, dropout=0.1))
    ref = finetune(train, None, lora_base, tmp_path / "a", cfg, progress=False)

    def stop(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(train, None, lora_base, tmp_path / "b", cfg, progress=False, on_step=stop)
    resumed = finetune(train, None, lora_base, tmp_path / "b", cfg, progress=False)
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (ref, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_for_another_base_is_refused_in_one_line(lora_run, tmp_path):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    _, best = lora_run
    _, base = check_adapter(best)
    cfg = WhisperConfig.from_pretrained(base)
    other = WhisperForConditionalGeneration(WhisperConfig(**{**cfg.to_dict(), "d_model": 32}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterError, match=r"made for base model .*not .*other") as e:
        check_adapter(best, tmp_path / "other")
    assert "\n" not in str(e.value)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in best.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    c = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**c, "base_model_name_or_path": str(tmp_path / "other")}))
    with pytest.raises(AdapterError, match=r"do not fit its shape .*made for another base model"):
        check_adapter(moved)
    (moved / "adapter_config.json").write_text(json.dumps({**c, "base_model_name_or_path": "/nowhere"}))
    with pytest.raises(AdapterError, match=r"'/nowhere'.*is not here; give the base model folder"):
        check_adapter(moved)


def test_cli_finetune_whisper_lora_options(lora_base, tmp_path):
    from typer.testing import CliRunner

    from selfspeech.cli import app

    train = corpus(tmp_path, TEXTS)
    args = ["finetune-whisper", "max_steps=1", "batch_size=4", "--train", str(train), "--init", str(lora_base),
            "--out", str(tmp_path / "ft"), "--lora-rank", "2", "--lora-targets", "q_proj,v_proj", "--lora-where",
            "decoder"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    info = read_adapter(tmp_path / "ft" / "best")
    assert info.rank == 2 and all(".decoder." in n and n.split(".")[-2] in ("q_proj", "v_proj") for n in info.shapes)
    r = CliRunner().invoke(app, [*args[:-1], "middle"])
    assert r.exit_code == 2 and "lora.where" in r.output and "encoder, decoder, both" in r.output


def test_an_adapter_folder_is_no_init(lora_run):
    root, best = lora_run
    with pytest.raises(ValueError, match="a LoRA adapter folder, not a model to start from; give its base"):
        finetune(root / "train.jsonl", None, best, root / "again", CFG, progress=False)
