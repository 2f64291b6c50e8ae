"""Accelerator paths of the models: gradient checkpointing and fused attention (SDPA)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from selfspeech.models.ecapa import ECAPATDNN, ECAPAConfig
from selfspeech.models.ssl import EncoderConfig, SpeechEncoder


def _grads(model: torch.nn.Module, *inputs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    out = model(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_speech_encoder_checkpointing_gives_the_same_gradients():
    """With dropout on: the recomputation replays the same dropout masks, so the gradients are equal."""
    torch.manual_seed(0)
    enc = SpeechEncoder(EncoderConfig.preset("tiny", n_mels=16, dropout=0.2)).train()
    x, lens = torch.randn(3, 60, 16), torch.tensor([60, 41, 25])
    torch.manual_seed(1)
    plain = _grads(enc, x, lens)
    enc.grad_checkpointing = True
    torch.manual_seed(1)
    ckpt = _grads(enc, x, lens)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(enc.parameters())) - 1  # all but mask_emb
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6, rtol=0), k
    torch.manual_seed(2)  # another dropout draw: other gradients, so the comparison above could fail
    assert not torch.allclose(_grads(enc, x, lens)["layers.0.linear1.weight"], plain["layers.0.linear1.weight"])


def test_speech_encoder_checkpointing_only_in_training_with_grad(monkeypatch):
    import selfspeech.models.ssl as S

    calls = []
    monkeypatch.setattr(S, "checkpoint", lambda fn, *a, **k: calls.append(1) or fn(*a, **{
        n: v for n, v in k.items() if n != "use_reentrant"}))
    enc = SpeechEncoder(EncoderConfig.preset("tiny", n_mels=16))
    enc.grad_checkpointing = True
    x, lens = torch.randn(2, 40, 16), torch.tensor([40, 30])
    enc.eval()(x, lens)
    with torch.no_grad():
        enc.train()(x, lens)
    assert calls == []
    enc.train()(x, lens)
    assert len(calls) == enc.cfg.n_layers


def test_ecapa_checkpointing_gives_the_same_gradients_and_batch_norm_statistics():
    torch.manual_seed(0)
    a = ECAPATDNN(ECAPAConfig.preset("tiny")).train()
    b = copy.deepcopy(a)
    b.grad_checkpointing = True
    x, lens = torch.randn(4, 50, 40), torch.tensor([50, 50, 37, 20])
    for _ in range(2):  # two steps: the statistics advance once per step in both
        ga, gb = _grads(a, x, lens), _grads(b, x, lens)
    assert ga.keys() == gb.keys() and len(ga) == len(list(a.parameters()))
    for k in ga:
        assert torch.allclose(ga[k], gb[k], atol=1e-6, rtol=0), k
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert any(k.startswith("blocks.") for k in bufs_a)
    for k, v in bufs_a.items():
        assert torch.equal(v, bufs_b[k]), k
    assert int(bufs_b["blocks.0.pre.2.num_batches_tracked"]) == 2


def test_transformer_layers_attend_through_sdpa_with_the_padding_mask(monkeypatch):
    """One call of F.scaled_dot_product_attention per layer in training, with the key-padding mask in it."""
    seen = []
    orig = F.scaled_dot_product_attention

    def counting(q, k, v, attn_mask=None, *a, **kw):
        seen.append(attn_mask)
        return orig(q, k, v, attn_mask, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    torch.manual_seed(0)
    enc = SpeechEncoder(EncoderConfig.preset("tiny", n_mels=16)).train()
    x, lens = torch.randn(3, 60, 16), torch.tensor([60, 41, 25])
    y, out_len = enc(x, lens)
    y.sum().backward()
    assert len(seen) == enc.cfg.n_layers
    T = y.shape[1]
    for m in seen:  # (B, 1|H, 1|T, T), -inf (or False) exactly on the padded keys
        assert m is not None
        blocked = ~m if m.dtype == torch.bool else torch.isinf(m)
        want = torch.arange(T)[None, :] >= out_len[:, None]
        assert torch.equal(blocked.reshape(3, -1, T).all(1), want) and torch.equal(blocked.reshape(3, -1, T).any(1), want)
