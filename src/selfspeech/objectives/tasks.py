"""Self-supervised methods: an encoder, its heads and targets, and named loss terms.

Each task is a small ``nn.Module`` whose ``forward(x, lengths, step)`` returns a
dict of named terms (scalars) and monitors; :meth:`SSLTask.loss` combines the
terms with :func:`losses.weighted_sum` and the task's ``weights`` into the
``(loss, record)`` the training loop takes. Nothing else differs between
methods, so one loop trains them all.

- :class:`Wav2Vec2Task` (Baevski et al. 2020; XLSR, Conneau et al. 2020 is the
  same objective with group-balanced batches, see ``train.sampler``);
- :class:`BestRQTask` (Chiu et al. 2022);
- :class:`BiRQTask` (arXiv 2509.15430): BEST-RQ's anchor labels plus self-labels
  from the model's own intermediate layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from selfspeech.config import invalid
from selfspeech.models.ssl import EncoderConfig, SpeechEncoder, normalise_input, padding_mask
from selfspeech.objectives import losses as L
from selfspeech.objectives.masking import draw_rows, span_mask, upsample_mask
from selfspeech.objectives.quantizers import GumbelQuantizer, RandomProjectionQuantizer, perplexity


@dataclass(frozen=True)
class Wav2Vec2Config:
    mask_prob: float = 0.65         # fraction of frames drawn as span starts x span (spans overlap: ~49% masked)
    mask_span: int = 10             # output frames per masked span
    groups: int = 2                 # G codebooks
    entries: int = 320              # V entries each
    final_dim: int = 128            # wav2vec 2.0 base: 256
    negatives: int = 100            # distractors per masked frame, from the same utterance's masked frames
    logit_temp: float = 0.1         # temperature of the contrastive loss's cosine logits
    tau_max: float = 2.0            # Gumbel temperature: max(tau_max * decay^step, tau_min)
    tau_min: float = 0.5            # floor of the Gumbel temperature
    tau_decay: float = 0.999995     # factor the Gumbel temperature shrinks by per update
    w_diversity: float = 0.1        # weight of the codebook diversity loss (wav2vec 2.0 eq. 4)
    # Feature L2 penalty. 10 is wav2vec 2.0 BASE's weight (fairseq wav2vec2_base_librispeech.yaml), whose
    # CNN sees the raw waveform. We normalise the waveform per utterance (models.ssl.normalise_input) as
    # wav2vec 2.0 LARGE and XLSR do, and their recipe (wav2vec2_large_librivox.yaml) turns the penalty
    # off: loss_weights [0.1, 0]. With normalised input and weight 10 the penalty dominates the early
    # loss and the contrastive loss stayed at chance for 300 updates on random batches of
    # speechocean762, where weight 0 and transformers' Wav2Vec2ForPreTraining (no penalty) both left it
    # after ~220 (benchmarks/w2v2_chance_probe.py). Set 10 for un-normalised input, as base does.
    w_features: float = 0.0


@dataclass(frozen=True)
class BestRQConfig:
    mask_prob: float = 0.4          # fraction of frames drawn as span starts x span (before overlap)
    mask_span: int = 10             # output frames: 400 ms at 40 ms (BEST-RQ sec. 3.1)
    # overlap: spans start at any frame and may overlap (BEST-RQ sec. 3.1, as wav2vec 2.0's masking);
    # aligned: spans fill disjoint slots of mask_span frames, so mask_prob of the frames is masked
    # (SpeechBrain's BEST-RQ recipe; objectives.masking.span_mask)
    mask_layout: Literal["overlap", "aligned"] = "overlap"
    noise_std: float = 0.1          # masked input frames become N(0, 0.1^2) (sec. 2.1)
    code_dim: int = 16              # dimension of the frozen random projection the codes live in
    codes: int = 8192               # entries per codebook: the label vocabulary of each frame
    books: int = 1                  # codebooks; each gives every masked frame one label to predict
    seed: int = 0                   # of the frozen projection and codebook
    # BiRQ only (arXiv 2509.15430; public details thin, the choices below are ours, see README):
    self_layer_frac: float = 0.7    # intermediate layer giving the self-labels, fraction of depth
    # Gumbel-softmax temperature discretising them. 0 = no noise (nearest code). The paper's 0.5
    # on cosine logits over 8192 codes makes the labels noise: the Gumbel maximum over 8192 draws
    # (~log 8192 = 9) dwarfs cosine gaps (< 2): with 0.5, benchmarks/ssl_pretraining.py's self-label
    # accuracy stays 0.000 and its loss at log(8192) after 175 steps. Hence 0 by default.
    self_tau: float = 0.0
    self_logit_scale: float = 1.0   # logits = scale * cosine before the Gumbel noise (when self_tau > 0)
    w_anchor: float = 2.4           # w2: weight of the anchor (input) labels' loss G
    w_self: float = 0.1             # w1: weight of the enhanced (self) labels' loss F

    def __post_init__(self):
        if self.mask_layout not in ("overlap", "aligned"):
            raise invalid("mask_layout", self.mask_layout, "not a mask layout", "choose overlap or aligned")


def stack_frames(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T, F) -> (B, T // k, k * F): the k input frames under each output frame (BEST-RQ sec. 2.2)."""
    B, T, Fd = x.shape
    return x[:, : T // k * k].reshape(B, T // k, k * Fd)


class SSLTask(nn.Module):
    """Base of the tasks: ``forward`` gives named terms and ``monitor``; :meth:`loss` weighs them."""

    weights: dict[str, float]

    def loss(self, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
        """The training loop's ``loss_fn``: batch ``x`` (B, T[, F]), ``lengths`` (B,), ``seeds`` (B,) ints.

        One random stream per utterance (masks, noise, distractors), seeded by the
        batch, gives the same draws in any batch or process. The terms are means
        over masked frames, so data parallel weighs each rank by its count (``_weight``).
        """
        gens = [torch.Generator().manual_seed(s) for s in batch["seeds"]]
        terms = self(batch["x"], batch["lengths"], step, generator=gens)
        mon = terms.pop("monitor")
        loss = L.weighted_sum(terms, self.weights)
        return loss, {**{k: round(float(v.detach()), 5) for k, v in terms.items()}, **mon,
                      "_weight": mon.get("masked_frames")}


class Wav2Vec2Task(SSLTask):
    """Contrastive task over Gumbel-quantized features (waveform front-end)."""

    name = "wav2vec2"

    def __init__(self, enc: EncoderConfig, cfg: Wav2Vec2Config = Wav2Vec2Config()):
        super().__init__()
        if enc.frontend != "wave":
            raise ValueError("wav2vec 2.0 quantizes the waveform feature encoder's output: use frontend 'wave'")
        self.enc_cfg, self.cfg = enc, cfg
        self.encoder = SpeechEncoder(enc)
        self.quantizer = GumbelQuantizer(self.encoder.feat_dim, cfg.final_dim, cfg.groups, cfg.entries)
        self.project_q = nn.Linear(cfg.final_dim, cfg.final_dim)
        self.final_proj = nn.Linear(enc.d_model, cfg.final_dim)
        self.weights = {"contrastive": 1.0, "diversity": cfg.w_diversity, "features": cfg.w_features}

    def tau(self, step: int) -> float:
        c = self.cfg
        return max(c.tau_max * c.tau_decay ** step, c.tau_min)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, step: int = 0,
                generator: torch.Generator | None = None, *, mask: torch.Tensor | None = None,
                negatives: torch.Tensor | None = None, gumbel: torch.Tensor | None = None,
                tap: dict | None = None) -> dict:
        """x (B, T) waveforms, lengths (B,) -> the terms (means over the N masked frames) and monitors.

        Explicit draws replace the generator's (to compare with a reference implementation):
        ``mask`` (B, T') bool, ``negatives`` (N, K) indices into the masked frames in row-major
        order of ``mask``, ``gumbel`` (N, G, V) Gumbel noise. ``tap``: a dict that receives
        ``hidden`` (B, T', D), the encoder's output, and ``mask``.
        """
        c = self.cfg
        feats, flen, raw = self.encoder.features(x, lengths, with_raw=True)
        if mask is None:
            mask = span_mask(flen, feats.shape[1], c.mask_prob, c.mask_span, min_spans=2, generator=generator)
        hidden = self.encoder.encode(feats, flen, mask)[-1]
        context = self.final_proj(hidden[mask])                                         # (N, final_dim)
        qd = self.quantizer(feats[mask], self.tau(step), noise=gumbel)
        targets = self.project_q(qd["q"])
        groups = torch.arange(x.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        neg = L.sample_negatives(groups, c.negatives, generator) if negatives is None else negatives
        con = L.contrastive_loss(context, targets, neg, c.logit_temp)
        if tap is not None:
            tap.update(hidden=hidden, mask=mask)
        return {"contrastive": con["loss"],
                "diversity": L.diversity_loss(qd["prob_perplexity"], c.groups, c.entries),
                "features": L.feature_penalty(raw[~padding_mask(flen, raw.shape[1])]),
                "monitor": {"accuracy": float(con["accuracy"]), "code_perplexity": float(qd["code_perplexity"]),
                            "prob_perplexity": float(qd["prob_perplexity"].detach()), "gumbel_tau": self.tau(step),
                            "masked_frames": con["frames"], "mask_fraction": float(mask.sum() / flen.sum())}}

    def warnings(self, mon: dict, terms: dict) -> list[str]:
        """Collapse watch: contrastive loss at chance, or codebook usage near its floor G."""
        out = []
        if float(terms["contrastive"]) > 0.98 * L.chance_contrastive(self.cfg.negatives):
            out.append(f"contrastive loss {float(terms['contrastive']):.3f} nats is at chance "
                       f"(log({self.cfg.negatives}+1) = {L.chance_contrastive(self.cfg.negatives):.3f})")
        if mon["code_perplexity"] < 1.5 * self.cfg.groups:
            out.append(f"codebook perplexity {mon['code_perplexity']:.1f} is near its floor G={self.cfg.groups}: "
                       "the quantizer is collapsing")
        return out


class BestRQTask(SSLTask):
    """Masked prediction of random-projection labels of the input log-mel (mel front-end)."""

    name = "bestrq"

    def __init__(self, enc: EncoderConfig, cfg: BestRQConfig = BestRQConfig()):
        super().__init__()
        if enc.frontend != "mel":
            raise ValueError(f"{self.name} predicts labels of stacked log-mel frames: use frontend 'mel'")
        self.enc_cfg, self.cfg = enc, cfg
        self.encoder = SpeechEncoder(enc)
        self.rpq = RandomProjectionQuantizer(enc.stride * enc.n_mels, cfg.code_dim, cfg.codes, cfg.books, cfg.seed)
        self.head = nn.Linear(enc.d_model, cfg.books * cfg.codes)
        self.weights = {"anchor": 1.0}

    def anchor_labels(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple:
        """(B, T, n_mels) -> anchor labels (B, T', books), normalised input x_norm, valid lengths T'."""
        xn = normalise_input(x, lengths)  # labels from the normalised log-mel (BEST-RQ sec. 2.2)
        flen = self.enc_cfg.out_lengths(lengths)
        labels = self.rpq(stack_frames(xn, self.enc_cfg.stride))[:, : int(flen.max())]
        return labels, xn, flen.clamp(max=labels.shape[1])

    def masked_pass(self, x: torch.Tensor, lengths: torch.Tensor, generator) -> tuple:
        """Normalise, label, mask the input with noise, encode. Returns (states, mask, anchor labels, x_norm, flen)."""
        c, k = self.cfg, self.enc_cfg.stride
        labels, xn, flen = self.anchor_labels(x, lengths)
        Tp = labels.shape[1]                                                        # T' frames
        mask = span_mask(flen, Tp, c.mask_prob, c.mask_span, generator=generator, layout=c.mask_layout)
        up = upsample_mask(mask, k, xn.shape[1])
        noise = draw_rows(torch.randn, xn.shape, generator, xn.device) * c.noise_std
        xm = torch.where(up[..., None], noise, xn)
        feats, _ = self.encoder.features(xm, lengths)
        states = self.encoder.encode(feats[:, :Tp], flen)
        return states, mask, labels, xn, flen

    def predict(self, h: torch.Tensor, head: nn.Linear, books: int) -> torch.Tensor:
        """(..., d_model) -> (..., books, codes) logits."""
        return head(h).unflatten(-1, (books, -1))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> dict:
        states, mask, labels, _, flen = self.masked_pass(x, lengths, generator)
        # the head (d_model x books*codes: as many weights as the whole "small" encoder) runs on the
        # masked frames only, where the loss is: same loss, a fraction of the head's cost
        out = L.frame_cross_entropy(self.predict(states[-1][mask], self.head, self.cfg.books), labels[mask])
        return {"anchor": out["loss"],
                "monitor": {"accuracy": float(out["accuracy"]), "label_perplexity": float(
                    perplexity(F.one_hot(labels[mask][:, 0], self.cfg.codes).float())),
                    "mask_fraction": float(mask.sum() / flen.sum()), "masked_frames": int(mask.sum())}}

    def warnings(self, mon: dict, terms: dict) -> list[str]:
        if mon["label_perplexity"] < 2.0:
            return [f"anchor labels use ~{mon['label_perplexity']:.1f} codes: check feature normalisation"]
        return []


class BiRQTask(BestRQTask):
    """BEST-RQ + self-labels from layer ~0.7 depth of the unmasked pass (BiRQ).

    First-order bilevel update (the paper's eq.): theta <- theta - eta (w1 dF + w2 dG),
    F = loss on the enhanced (self) labels, G = loss on the anchor labels. The
    self-labels come from a no-grad unmasked pass, i.e. the lower-level solution is
    held fixed within a step (first-order: no gradient through the label path).
    The intermediate states are layer-normalised (no affine), projected by a
    second frozen random projection and discretised by a hard Gumbel-softmax at
    temperature ``self_tau`` over the cosine similarities to its codebook (0 by default: the
    nearest code; see :class:`BestRQConfig` for why).
    """

    name = "birq"

    def __init__(self, enc: EncoderConfig, cfg: BestRQConfig = BestRQConfig()):
        super().__init__(enc, cfg)
        self.self_layer = max(1, min(enc.n_layers, round(cfg.self_layer_frac * enc.n_layers)))
        self.rpq_self = RandomProjectionQuantizer(enc.d_model, cfg.code_dim, cfg.codes, cfg.books, cfg.seed + 1)
        self.head_self = nn.Linear(enc.d_model, cfg.books * cfg.codes)
        self.weights = {"anchor": cfg.w_anchor, "self": cfg.w_self}

    @torch.no_grad()
    def self_labels(self, xn: torch.Tensor, lengths: torch.Tensor, flen: torch.Tensor, Tp: int,
                    generator: torch.Generator | None) -> torch.Tensor:
        was = self.encoder.training
        self.encoder.eval()  # no dropout: the labels are a function of the audio and theta
        feats, _ = self.encoder.features(xn, lengths)
        h = self.encoder.encode(feats[:, :Tp], flen, upto=self.self_layer)[-1]
        self.encoder.train(was)
        sims = self.rpq_self.similarities(F.layer_norm(h, h.shape[-1:]))          # (B, T', books, V)
        if self.cfg.self_tau <= 0:
            return sims.argmax(-1)                                                # nearest code
        logits = sims * self.cfg.self_logit_scale
        g = -torch.log(-torch.log(draw_rows(torch.rand, sims.shape, generator, sims.device).clamp(1e-9, 1 - 1e-9)))
        return (logits + g).argmax(-1)  # hard Gumbel-softmax sample (argmax is unchanged by dividing by tau)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> dict:
        states, mask, labels, xn, flen = self.masked_pass(x, lengths, generator)
        selfl = self.self_labels(xn, lengths, flen, states[-1].shape[1], generator)
        hm = states[-1][mask]   # both heads on the masked frames only (see BestRQTask.forward)
        anchor = L.frame_cross_entropy(self.predict(hm, self.head, self.cfg.books), labels[mask])
        own = L.frame_cross_entropy(self.predict(hm, self.head_self, self.cfg.books), selfl[mask])
        return {"anchor": anchor["loss"], "self": own["loss"],
                "monitor": {"accuracy": float(anchor["accuracy"]), "self_accuracy": float(own["accuracy"]),
                            "label_perplexity": float(perplexity(F.one_hot(labels[mask][:, 0], self.cfg.codes).float())),
                            "self_label_perplexity": float(perplexity(F.one_hot(selfl[mask][:, 0],
                                                                                 self.cfg.codes).float())),
                            "mask_fraction": float(mask.sum() / flen.sum()), "masked_frames": int(mask.sum())}}

    def warnings(self, mon: dict, terms: dict) -> list[str]:
        out = super().warnings(mon, terms)
        if mon["self_label_perplexity"] < 2.0:
            out.append(f"self-labels use ~{mon['self_label_perplexity']:.1f} codes: the intermediate layer collapsed")
        return out


TASKS = {"wav2vec2": (Wav2Vec2Task, Wav2Vec2Config), "bestrq": (BestRQTask, BestRQConfig),
         "birq": (BiRQTask, BestRQConfig)}


def build_task(objective: str, enc: EncoderConfig, overrides: dict | None = None) -> nn.Module:
    if objective not in TASKS:
        raise ValueError(f"unknown objective {objective!r}; choose {', '.join(TASKS)}")
    cls, cfg_cls = TASKS[objective]
    return cls(enc, cfg_cls(**(overrides or {})))
