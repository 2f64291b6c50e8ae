"""wav2vec 2.0 pretraining with transformers checkpoints: import, export, and loss parity.

- :func:`task_from_hf`: a transformers wav2vec 2.0 / XLSR folder -> our :class:`Wav2Vec2Task`
  (continued pretraining on the user's unlabelled audio, or CTC fine-tuning of its encoder);
- :func:`export_task_hf`: our task -> a ``Wav2Vec2ForPreTraining`` folder;
- :func:`compare_with_hf` / :func:`wav2vec2_parity`: both models fed the same weights, input,
  masks, distractors and Gumbel noise; relative differences of encoder outputs and losses.

Differences by design (Baevski et al. 2020, eq. 2-4, computed the same way on both sides):

- Normalisation: transformers' ``contrastive_loss`` is the *sum* over the N masked frames and its
  ``diversity_loss`` is eq. 4 multiplied by N; ours are *means* (per masked frame). fairseq sums
  too, but divides the gradient by N (its ``sample_size``), which is what our mean does: the loss
  scale and a good learning rate then do not depend on the batch size or the mask rate. Kept;
  the comparison multiplies ours by N (the reference's convention applied).
- Diversity outside training: transformers computes the perplexity of the hard (argmax) codes in
  eval mode; ours is always that of the averaged softmax, the quantity eq. 4 trains, so a
  validation loss measures what training optimises (our ``code_perplexity`` monitor is the hard
  one). Kept; parity is measured in training mode (dropout 0).
- Input: ``Wav2Vec2ForPreTraining`` takes the waveform as given (its feature extractor
  normalises); ours normalises each utterance inside the model. The comparison feeds transformers
  our normalised waveform.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from selfspeech.models.hf_wav2vec2 import (
    HEADS,
    QUANT_KEYS,
    HFCheckpoint,
    export_hf_state,
    hf_pretraining_config,
    load_checked,
    read_hf_dir,
)
from selfspeech.models.ssl import EncoderConfig, normalise_input
from selfspeech.objectives import losses as L
from selfspeech.objectives.masking import span_mask
from selfspeech.objectives.quantizers import hard_gumbel
from selfspeech.objectives.tasks import Wav2Vec2Config, Wav2Vec2Task


def task_config_for(cfg: Wav2Vec2Config, quant: dict) -> Wav2Vec2Config:
    """``cfg`` with the quantizer structure of a checkpoint (groups, entries, final_dim); the
    training settings (masking, distractors, temperatures, loss weights) stay the user's."""
    return dataclasses.replace(cfg, **quant)


def task_from_hf(path: str | Path, cfg: Wav2Vec2Config | None = None) -> tuple[Wav2Vec2Task, HFCheckpoint]:
    """A transformers wav2vec 2.0 folder -> (our task with its weights, what was read); ``cfg``: the
    task's training settings (None: the defaults).

    A checkpoint without pretraining heads (a fine-tuned ``Wav2Vec2ForCTC``) or without a mask
    embedding keeps the task's fresh ones; ``ckpt.missing`` names them."""
    ckpt = read_hf_dir(path)
    task = Wav2Vec2Task(ckpt.encoder, task_config_for(cfg or Wav2Vec2Config(), ckpt.quant))
    allowed = ("encoder.mask_emb",) + (HEADS if "quantizer/project_q/final_proj" in ckpt.missing else ())
    load_checked(task, ckpt.state, path, optional=allowed)
    return task, ckpt


def export_task_hf(task: Wav2Vec2Task, out_dir: str | Path) -> Path:
    """Our Wav2Vec2Task -> a folder ``Wav2Vec2ForPreTraining.from_pretrained`` loads (same weights)."""
    quant = {k: getattr(task.cfg, k) for k in QUANT_KEYS}
    return export_hf_state(task.state_dict(), task.enc_cfg, quant, out_dir, dataclasses.asdict(task.cfg))


# -- parity ----------------------------------------------------------------------------------------

def hf_negatives(mask: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Our distractors (N, K), indices into the masked frames -> transformers' ``sampled_negative_indices``
    (B, T, K), indices into the flattened (B*T) frames; rows of unmasked frames point at frame 0."""
    B, T = mask.shape
    flat = mask.flatten().nonzero().squeeze(1)                       # (N,) position of each masked frame
    out = torch.zeros(B * T, neg.shape[1], dtype=torch.long)
    out[flat] = flat[neg]
    return out.view(B, T, -1)


def our_negatives(mask: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """transformers' (B, T, K) flattened-frame indices -> ours (N, K) masked-frame indices."""
    rank = torch.full((mask.numel(),), -1, dtype=torch.long)
    rank[mask.flatten()] = torch.arange(int(mask.sum()))
    return rank[sampled.long()[mask]]


@contextmanager
def fixed_gumbel(noise: torch.Tensor):
    """Within the block, ``F.gumbel_softmax(hard=True)`` (transformers' quantizer) uses ``noise``
    (any shape with as many elements as its logits) instead of drawing it."""
    original = F.gumbel_softmax

    def patched(logits, tau=1.0, hard=False, eps=1e-10, dim=-1):
        if not hard or dim != -1 or noise.numel() != logits.numel():
            return original(logits, tau=tau, hard=hard, eps=eps, dim=dim)
        return hard_gumbel(logits, tau, noise.reshape(logits.shape).to(logits))

    torch.nn.functional.gumbel_softmax = patched
    try:
        yield
    finally:
        torch.nn.functional.gumbel_softmax = original


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative difference of two tensors (scalars: |a - b| / |b|)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def draws(task: Wav2Vec2Task, lengths: torch.Tensor, seed: int = 0) -> dict:
    """One set of random draws for both models: ``mask`` (B, T'), ``negatives`` (N, K), ``noise`` (B, T', G, V)."""
    c, g = task.cfg, torch.Generator().manual_seed(seed)
    flen = task.enc_cfg.out_lengths(lengths)
    mask = span_mask(flen, int(flen.max()), c.mask_prob, c.mask_span, min_spans=2, generator=g)
    groups = torch.arange(len(lengths))[:, None].expand_as(mask)[mask]
    neg = L.sample_negatives(groups, c.negatives, g)
    u = torch.rand(*mask.shape, c.groups, c.entries, generator=g).clamp(1e-10, 1 - 1e-7)
    return {"mask": mask, "negatives": neg, "noise": -torch.log(-torch.log(u))}


def compare_with_hf(task: Wav2Vec2Task, hf, x: torch.Tensor, lengths: torch.Tensor, seed: int = 0,
                    step: int = 0) -> dict:
    """Run our task and ``hf`` (a ``Wav2Vec2ForPreTraining`` with the same weights) on x (B, T) waveforms
    with the same masks, distractors and Gumbel noise, in training mode (set dropout 0 on both).

    Returns the relative differences (``hidden``: encoder outputs on the real frames; ``projected``:
    context vectors; ``contrastive``, ``diversity``, ``loss``: ours times N masked frames against
    transformers' sums) and both values of each loss."""
    d = draws(task, lengths, seed)
    mask, noise = d["mask"], d["noise"]
    task.train(), hf.train()
    tap: dict = {}
    ours = task(x, lengths, step, mask=mask, negatives=d["negatives"], gumbel=noise[mask], tap=tap)
    xn = normalise_input(x, lengths)
    attn = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).long()
    hf.set_gumbel_temperature(task.tau(step))
    with fixed_gumbel(noise):
        out = hf(xn, attention_mask=attn, mask_time_indices=mask, sampled_negative_indices=hf_negatives(mask, d["negatives"]))
        hidden = hf.wav2vec2(xn, attention_mask=attn, mask_time_indices=mask).last_hidden_state
    valid = torch.arange(mask.shape[1])[None, :] < task.enc_cfg.out_lengths(lengths)[:, None]
    n = int(mask.sum())
    con, div = ours["contrastive"] * n, ours["diversity"] * n          # the reference's convention: sums
    w = task.cfg.w_diversity
    return {"hidden": rel(tap["hidden"][valid], hidden[valid]),
            "projected": rel(task.final_proj(tap["hidden"])[valid], out.projected_states[valid]),
            "contrastive": rel(con, out.contrastive_loss), "diversity": rel(div, out.diversity_loss),
            "loss": rel(con + w * div, out.loss), "masked_frames": n,
            "ours": {"contrastive": float(con.detach()), "diversity": float(div.detach())},
            "transformers": {"contrastive": float(out.contrastive_loss.detach()),
                             "diversity": float(out.diversity_loss.detach())}}


def jitter_norms(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Perturb every norm's gain and bias (fresh ones are all 1 and 0, which would hide a swapped mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and m.weight is not None:
                m.weight.add_(scale * torch.randn(m.weight.shape, generator=g))
                m.bias.add_(scale * torch.randn(m.bias.shape, generator=g))


def tiny_waves(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noisy tones of 0.5 s and 0.37 s at 16 kHz, zero-padded: x (2, 8000), lengths (2,)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8000, 5920])
    t = torch.arange(8000) / 16_000
    x = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (180.0, 260.0)]) + 0.1 * torch.randn(2, 8000, generator=g)
    return x * (torch.arange(8000)[None, :] < lengths[:, None]), lengths


TINY_TASK = Wav2Vec2Config(mask_prob=0.65, mask_span=3, groups=2, entries=8, final_dim=16, negatives=5)


def tiny_encoder(layout: str) -> EncoderConfig:
    """The tiny wave encoder (d_model 32, 2 layers, 16 conv channels) in layout ``large`` (XLSR: pre-LN,
    layer-normed convs with bias) or ``base`` (post-LN, group norm on the first conv, no conv bias)."""
    big = layout == "large"
    return EncoderConfig.preset("tiny", frontend="wave", dropout=0.0, pos_kernel=16, pos_norm=not big,
                                post_ln=not big or None, conv_layer_norm=big or None, conv_bias=big or None)


def hf_born(out_dir: str | Path, layout: str = "large", seed: int = 0):
    """A tiny ``Wav2Vec2ForPreTraining`` with transformers' own random init (norms jittered), saved to ``out_dir``."""
    from transformers import Wav2Vec2ForPreTraining

    quant = {k: getattr(TINY_TASK, k) for k in QUANT_KEYS}
    torch.manual_seed(seed)
    hf = Wav2Vec2ForPreTraining(hf_pretraining_config(tiny_encoder(layout), quant, dataclasses.asdict(TINY_TASK)))
    jitter_norms(hf, seed)
    hf.save_pretrained(out_dir)
    return hf


def wav2vec2_parity(out_dir: str | Path, layout: str = "large", seed: int = 0) -> dict:
    """Both directions, :func:`compare_with_hf` each: ``export``: our tiny task exported to
    ``out_dir/ours`` and loaded by ``Wav2Vec2ForPreTraining.from_pretrained``; ``import``: a
    transformers-initialised model saved to ``out_dir/hf`` and read by :func:`task_from_hf`.
    ``rel_diff``: the worst relative loss difference (contrastive, diversity, total)."""
    from transformers import Wav2Vec2ForPreTraining

    out = Path(out_dir)
    torch.manual_seed(seed)
    ours = Wav2Vec2Task(tiny_encoder(layout), TINY_TASK)
    jitter_norms(ours, seed)
    export_task_hf(ours, out / "ours")
    x, lengths = tiny_waves(seed)
    exported = compare_with_hf(ours, Wav2Vec2ForPreTraining.from_pretrained(out / "ours", local_files_only=True,
                                                            use_safetensors=True),
                               x, lengths, seed)
    hf = hf_born(out / "hf", layout, seed + 1)
    imported = compare_with_hf(task_from_hf(out / "hf", TINY_TASK)[0], hf, x, lengths, seed + 1)
    worst = max(r[k] for r in (exported, imported) for k in ("contrastive", "diversity", "loss"))
    return {"export": exported, "import": imported, "rel_diff": worst}


def wav2vec2_parity_row(seed: int = 0) -> dict:
    """The parity benchmark's row: ``value`` = the worst relative loss difference (contrastive,
    diversity, total; ours times N against transformers' sums) over both layouts (large / XLSR and
    base) and both directions; the per-layout figures beside it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        res = {layout: wav2vec2_parity(Path(tmp) / layout, layout, seed) for layout in ("large", "base")}
    return {"value": max(r["rel_diff"] for r in res.values()),
            **{layout: {d: {k: r[d][k] for k in ("hidden", "projected", "contrastive", "diversity", "loss",
                                                 "masked_frames")} for d in ("export", "import")}
               for layout, r in res.items()}}


def wav2vec2_loss_rel_diff(seed: int = 0) -> float:
    """The worst relative loss difference against ``Wav2Vec2ForPreTraining`` (:func:`wav2vec2_parity_row`)."""
    return wav2vec2_parity_row(seed)["value"]
