import json

import pytest
import torch
from typer.testing import CliRunner

from selfspeech.arith.task_vector import (
    TaskVector, TaskVectorError, apply_to_dir, diff_dirs, load_state, tied_aliases,
)
from selfspeech.cli import app


def tiny_whisper(seed: int):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=96, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_source_positions=20, max_target_positions=16,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return WhisperForConditionalGeneration(cfg).eval()


def sd(seed):
    return {k: v.clone() for k, v in tiny_whisper(seed).state_dict().items()}


def test_algebra_identities():
    a, b, c = sd(0), sd(1), sd(2)
    tab, tbc, tac = TaskVector.between(a, b), TaskVector.between(b, c), TaskVector.between(a, c)
    s = tab + tbc
    for n in tac.deltas:
        assert torch.allclose(s.deltas[n], tac.deltas[n], atol=1e-6)
    z = tab - tab
    assert z.norm() == 0.0
    assert (2 * tab).norm() == pytest.approx(2 * tab.norm(), rel=1e-6)
    assert (-tab).norm() == pytest.approx(tab.norm(), rel=1e-6)
    # b + 1 * (a - b) == a exactly in fp32 for fp32 checkpoints up to rounding
    rec = tab.apply(b, 1.0)
    for n in a:
        assert torch.allclose(rec[n], a[n], atol=1e-6), n


def test_lambda_zero_is_identity_and_one_is_full():
    a, b = sd(0), sd(1)
    tau = TaskVector.between(a, b)
    same = tau.apply(b, 0.0)
    assert all(torch.equal(same[n], b[n]) for n in b)
    full = tau.apply(b, 1.0)
    n = "model.encoder.layers.0.fc1.weight"
    assert torch.allclose(full[n], a[n], atol=1e-6)


def test_tied_weights_counted_once():
    m0, m1 = tiny_whisper(0), tiny_whisper(1)
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert tied_aliases(s0).get("proj_out.weight") == "model.decoder.embed_tokens.weight"
    tau = TaskVector.between(s1, s0)
    assert "proj_out.weight" not in tau.deltas and "model.decoder.embed_tokens.weight" in tau.deltas
    new = tau.apply(s0, 1.0)
    emb = "model.decoder.embed_tokens.weight"
    # once, not twice: new == s1 on the shared tensor, and both names agree
    assert torch.allclose(new[emb], s1[emb], atol=1e-6)
    assert torch.equal(new["proj_out.weight"], new[emb])
    m0.load_state_dict(new)
    assert torch.allclose(m0.proj_out.weight, s1[emb], atol=1e-6)


def test_patterns():
    a, b = sd(0), sd(1)
    enc = TaskVector.between(a, b, include=r"encoder")
    assert enc.deltas and all("encoder" in n for n in enc.deltas)
    no_ln = TaskVector.between(a, b, exclude=r"layer_norm")
    assert not any("layer_norm" in n for n in no_ln.deltas)
    assert set(TaskVector.between(a, b).filter(include="decoder").deltas) == {
        n for n in TaskVector.between(a, b).deltas if "decoder" in n}
    new = enc.apply(b, 1.0)
    assert torch.equal(new["model.decoder.layers.0.fc1.weight"], b["model.decoder.layers.0.fc1.weight"])
    # named scopes split the vector in two disjoint halves that add back to the whole
    tau = TaskVector.between(a, b)
    e, d = tau.scope("encoder"), tau.scope("decoder")
    assert set(e.deltas).isdisjoint(d.deltas) and set(e.deltas) | set(d.deltas) == set(tau.deltas)
    assert all(n.startswith("model.encoder.") for n in e.deltas) and len(tau.scope("all")) == len(tau)
    whole = {**e.deltas, **d.deltas}
    assert all(torch.equal(whole[n], tau.deltas[n]) for n in tau.deltas)
    with pytest.raises(TaskVectorError, match="unknown scope"):
        tau.scope("middle")
    with pytest.raises(TaskVectorError, match="selects no parameter"):
        e.scope("decoder")


def test_errors_name_the_tensor():
    a, b = sd(0), sd(1)
    b["model.encoder.layers.0.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(TaskVectorError, match="model.encoder.layers.0.fc1.weight.*shape"):
        TaskVector.between(a, b)
    b = sd(1)
    del b["model.encoder.layers.0.fc2.bias"]
    with pytest.raises(TaskVectorError, match="fc2.bias"):
        TaskVector.between(a, b)
    b = sd(1)
    b["model.encoder.layer_norm.weight"][0] = float("nan")
    with pytest.raises(TaskVectorError, match="layer_norm.weight.*NaN"):
        TaskVector.between(a, b)
    with pytest.raises(TaskVectorError, match="different tensors"):
        TaskVector.between(a, sd(1), include="encoder") + TaskVector.between(a, sd(1))


def test_fp16_checkpoint_arithmetic_in_fp32():
    a, b = sd(0), sd(1)
    b16 = {k: v.half() for k, v in b.items()}
    tau = TaskVector.between(a, b)
    assert all(v.dtype == torch.float32 for v in tau.deltas.values())
    new = tau.apply(b16, 0.5)
    assert all(new[k].dtype == torch.float16 for k in new)


def test_dirs_save_load_and_cli(tmp_path):
    from transformers import WhisperForConditionalGeneration

    for i in range(2):
        tiny_whisper(i).save_pretrained(tmp_path / f"m{i}")
    tau = diff_dirs(tmp_path / "m0", tmp_path / "m1")
    tau.save(tmp_path / "tau.safetensors")
    back = TaskVector.load(tmp_path / "tau.safetensors")
    assert all(torch.equal(back.deltas[n], tau.deltas[n]) for n in tau.deltas)
    out = apply_to_dir(tmp_path / "m1", back, 1.0, tmp_path / "out")
    m = WhisperForConditionalGeneration.from_pretrained(out)
    ref = load_state(tmp_path / "m0")
    for n, p in m.state_dict().items():
        if n in ref:
            assert torch.allclose(p, ref[n], atol=1e-6), n
    assert json.loads((out / "task_arithmetic.json").read_text())["lambda"] == 1.0
    r = CliRunner()
    res = r.invoke(app, ["arith", "diff", str(tmp_path / "m0"), str(tmp_path / "m1"), str(tmp_path / "t2.safetensors"),
                         "--include", "encoder"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["arith", "apply", str(tmp_path / "m1"), str(tmp_path / "t2.safetensors"),
                         str(tmp_path / "o2"), "--lambda", "0.5"])
    assert res.exit_code == 0 and (tmp_path / "o2" / "model.safetensors").is_file()
    res = r.invoke(app, ["arith", "diff", str(tmp_path / "m0"), str(tmp_path / "nowhere"), str(tmp_path / "x")])
    assert res.exit_code == 2 and "no model.safetensors" in res.output
