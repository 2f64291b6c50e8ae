"""wav2vec 2.0 / XLSR against transformers' Wav2Vec2ForPreTraining: same weights, masks, distractors and
Gumbel noise give the same encoder outputs and losses, both ways; transformers folders as init of
pretrain and finetune-ctc; one-line refusals of checkpoints and configs we cannot represent."""
import dataclasses
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from selfspeech.models.hf_wav2vec2 import (
    check_representable,
    from_hf_config,
    hf_pretraining_config,
    is_hf_dir,
    read_hf_dir,
)
from selfspeech.models.ssl import EncoderConfig
from selfspeech.objectives import w2v2_hf as W
from selfspeech.objectives.quantizers import hard_gumbel, perplexity
from selfspeech.objectives.tasks import Wav2Vec2Task

TOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("layout", ["large", "base"])
def test_losses_and_outputs_equal_transformers_both_directions(tmp_path, layout):
    res = W.wav2vec2_parity(tmp_path, layout)
    for direction in ("export", "import"):
        r = res[direction]
        assert r["masked_frames"] > 10
        for k in ("hidden", "projected", "contrastive", "diversity", "loss"):
            assert r[k] <= TOL, (direction, k, r)
        # the reference's sums are ours (means) times the masked frames: both far from 0
        assert r["transformers"]["contrastive"] > r["masked_frames"] and r["transformers"]["diversity"] > 0.1
    assert res["rel_diff"] <= TOL


def test_the_comparison_sees_a_wrong_weight(tmp_path):
    """Negative control: one perturbed LayerNorm (or quantizer) weight on the transformers side shows up."""
    torch.manual_seed(0)
    ours = Wav2Vec2Task(W.tiny_encoder("large"), W.TINY_TASK)
    W.export_task_hf(ours, tmp_path / "hf")
    from transformers import Wav2Vec2ForPreTraining

    hf = Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf", local_files_only=True)
    x, lengths = W.tiny_waves()
    assert W.compare_with_hf(ours, hf, x, lengths)["loss"] <= TOL
    with torch.no_grad():
        hf.wav2vec2.encoder.layers[1].final_layer_norm.weight.mul_(1.5)
    r = W.compare_with_hf(ours, hf, x, lengths)
    assert r["hidden"] > 1e-2 and r["contrastive"] > 1e-4
    with torch.no_grad():
        hf.wav2vec2.encoder.layers[1].final_layer_norm.weight.div_(1.5)
        hf.quantizer.weight_proj.bias.add_(torch.randn(16))   # not a constant shift: the softmax ignores that
    r = W.compare_with_hf(ours, hf, x, lengths)
    assert r["hidden"] <= TOL and r["diversity"] > 1e-3


def test_negative_indices_convert_both_ways():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    ours = torch.tensor([[1, 2], [0, 2], [1, 0], [4, 4], [3, 3]])          # N = 5 masked frames, K = 2
    theirs = W.hf_negatives(mask, ours)
    assert theirs.shape == (2, 5, 2) and theirs[0, 1].tolist() == [2, 4] and theirs[1, 0].tolist() == [6, 6]
    assert torch.equal(W.our_negatives(mask, theirs), ours)


def test_round_trip_keeps_every_weight(tmp_path):
    torch.manual_seed(1)
    ours = Wav2Vec2Task(W.tiny_encoder("large"), W.TINY_TASK)
    W.jitter_norms(ours)
    W.export_task_hf(ours, tmp_path / "hf")
    assert is_hf_dir(tmp_path / "hf") and (tmp_path / "hf" / "preprocessor_config.json").is_file()
    back, ckpt = W.task_from_hf(tmp_path / "hf", W.TINY_TASK)
    assert back.enc_cfg == ours.enc_cfg and ckpt.missing == ()
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_old_weight_norm_names_and_a_bare_encoder_import(tmp_path):
    hf = W.hf_born(tmp_path / "hf", "base", seed=3)
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    pos = "wav2vec2.encoder.pos_conv_embed.conv."
    old = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                             "weight_v"): v for k, v in sd.items()}
    assert pos + "weight_g" in old
    save_file(old, str(tmp_path / "hf" / "model.safetensors"))
    ckpt = read_hf_dir(tmp_path / "hf")
    assert torch.equal(ckpt.state["encoder.pos.conv.weight"], hf.wav2vec2.encoder.pos_conv_embed.conv.weight.detach())
    # Wav2Vec2Model weights (no prefix, no heads, no mask embedding): the encoder, the rest left fresh
    bare = {k[len("wav2vec2."):]: v for k, v in sd.items() if k.startswith("wav2vec2.") and "masked_spec" not in k}
    save_file(bare, str(tmp_path / "hf" / "model.safetensors"))
    task, ckpt = W.task_from_hf(tmp_path / "hf", W.TINY_TASK)
    assert set(ckpt.missing) == {"encoder.mask_emb", "quantizer/project_q/final_proj"}
    assert torch.equal(task.encoder.proj.weight, hf.wav2vec2.feature_projection.projection.weight.detach())


def _hf_dir(path, **change):
    """A tiny transformers folder whose config.json gets ``change``."""
    W.hf_born(path, "large")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, **change}))
    return path


@pytest.mark.parametrize("change,match", [
    ({"model_type": "hubert"}, "model_type 'hubert' is not wav2vec2"),
    ({"conv_kernel": [10, 3, 3, 3, 3, 3, 2]}, "conv_kernel .* differs"),
    ({"conv_dim": [16, 16, 16, 16, 16, 16, 32]}, "conv_dim .* unequal"),
    ({"proj_codevector_dim": 32}, "proj_codevector_dim 32 differs from codevector_dim 16"),
    ({"layer_norm_eps": 1e-6}, "layer_norm_eps"),
    ({"feat_extract_activation": "relu"}, "feat_extract_activation 'relu'"),
    ({"hidden_size": 48}, r"weight wav2vec2\.\S+ has shape \(32,\), config.json implies \(48,\): the weights belong"),
])
def test_refusals_name_the_first_mismatch_in_one_line(tmp_path, change, match):
    d = _hf_dir(tmp_path / "hf", **change)
    with pytest.raises(ValueError, match=match) as e:
        W.task_from_hf(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_our_layouts_without_a_transformers_counterpart_are_refused():
    with pytest.raises(ValueError, match="frontend 'mel'"):
        check_representable(EncoderConfig.preset("tiny"))
    with pytest.raises(ValueError, match="pos_norm: false"):
        check_representable(EncoderConfig.preset("tiny", frontend="wave"))       # our original layout
    with pytest.raises(ValueError, match="post_ln=True .* needs `pos_norm: true`"):
        check_representable(EncoderConfig.preset("tiny", frontend="wave", pos_norm=False, post_ln=True))
    for layout in ("large", "base"):   # config round trip
        enc = W.tiny_encoder(layout)
        cfg = hf_pretraining_config(enc, {"groups": 2, "entries": 8, "final_dim": 16})
        assert from_hf_config(cfg.to_dict()) == (enc, {"groups": 2, "entries": 8, "final_dim": 16})


def test_exact_perplexity_and_explicit_gumbel_noise():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]], requires_grad=True)
    ppl = perplexity(p)
    assert abs(float(ppl.detach()) - 2.0) < 1e-6            # exact; fairseq's log(p + 1e-7): 2 - 4e-7
    ppl.backward()
    assert torch.isfinite(p.grad).all()                     # xlogy(p, p) gives NaN for the unused code
    logits, noise = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    y = hard_gumbel(logits, 0.7, noise)
    assert torch.equal(y.argmax(-1), (logits + noise).argmax(-1)) and torch.allclose(y.sum(-1), torch.ones(6, 2))
    with W.fixed_gumbel(noise):                            # what transformers' quantizer will call
        assert torch.equal(torch.nn.functional.gumbel_softmax(logits.view(12, 8), tau=0.7, hard=True), y.view(12, 8))


def _corpus(tmp_path, n=6, text=False):
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        dur = 1.0 + 0.1 * (i % 3)
        t = np.arange(int(dur * 16000)) / 16000
        w = (0.3 * np.sin(2 * np.pi * (150 + 50 * i) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
        sf.write(tmp_path / f"u{i}.wav", w, 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(tmp_path / f"u{i}.wav"), "duration": dur,
                      "text": "AB"[i % 2] if text else ""})
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(it) + "\n" for it in items))
    return m


def test_pretrain_continues_a_transformers_checkpoint(tmp_path):
    from selfspeech.cli import app
    from selfspeech.train.pretrain import PretrainConfig, initial_task

    hf = W.hf_born(tmp_path / "hf", "large", seed=2)
    cfg = PretrainConfig(objective="wav2vec2", encoder={"preset": "small"}, task={"mask_span": 3, "entries": 320},
                         loop={"max_steps": 2, "lr": 1e-3, "log_every": 1}, max_batch_seconds=4)
    cfg2, task = initial_task(cfg, tmp_path / "hf")
    assert cfg2.encoder == W.tiny_encoder("large") and (cfg2.task.entries, cfg2.task.mask_span) == (8, 3)
    assert torch.equal(task.quantizer.codebook.flatten(), hf.quantizer.codevectors.detach().flatten())
    m = _corpus(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    runner = CliRunner()
    res = runner.invoke(app, ["pretrain", str(tmp_path / "c.json"), "--manifest", str(m), "--out",
                              str(tmp_path / "pt"), "--init", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "pt" / "best" / "config.json").read_text())
    assert saved["config"] == dataclasses.asdict(W.tiny_encoder("large")) and saved["pretrain"]["task"]["entries"] == 8
    # continued: our OUT/best goes on, and exports back to transformers
    cfg3, again = initial_task(cfg, tmp_path / "pt" / "best")
    assert cfg3.encoder == cfg2.encoder
    W.export_task_hf(again, tmp_path / "back")
    assert read_hf_dir(tmp_path / "back").encoder == cfg2.encoder
    res = runner.invoke(app, ["pretrain", "--manifest", str(m), "--out", str(tmp_path / "x"), "--objective",
                              "bestrq", "--init", str(tmp_path / "hf")])
    assert res.exit_code == 2 and "continues objective wav2vec2, not 'bestrq'" in res.output
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"model_type": "hubert"}))
    res = runner.invoke(app, ["pretrain", str(tmp_path / "c.json"), "--manifest", str(m), "--out",
                              str(tmp_path / "y"), "--init", str(tmp_path / "hub")])
    assert res.exit_code == 2 and "model_type 'hubert' is not wav2vec2" in res.output


def test_finetune_ctc_from_a_transformers_checkpoint(tmp_path):
    from selfspeech.train.ctc import CTCConfig, finetune_ctc

    hf = W.hf_born(tmp_path / "hf", "base", seed=4)
    m = _corpus(tmp_path, text=True)
    cfg = CTCConfig(targets="char", loop={"max_steps": 2, "lr": 1e-3, "eval_every": 2, "log_every": 1},
                    freeze_steps=2, mask_time_prob=0.0, mask_channel_prob=0.0, max_batch_seconds=4)
    s = finetune_ctc(m, m, tmp_path / "ctc", cfg, init=tmp_path / "hf", progress=False)
    assert s["steps"] == 2
    from selfspeech.models.ctc import load_ctc

    model, _ = load_ctc(tmp_path / "ctc" / "best")
    assert model.encoder.cfg == W.tiny_encoder("base")       # frozen for both updates: the checkpoint's encoder
    assert torch.equal(model.encoder.layers[0].linear1.weight,
                       hf.wav2vec2.encoder.layers[0].feed_forward.intermediate_dense.weight.detach())
