"""Speech encoders for self-supervised pretraining and CTC fine-tuning.

Two front-ends feed one Transformer stack:

- ``mel``: log-mel frames (10 ms) through two stride-2 3x3 convolutions (4x
  subsampling, 40 ms frames), as in BEST-RQ (Chiu et al. 2022, sec. 3) and
  Conformer encoders;
- ``wave``: the wav2vec 2.0 feature encoder (Baevski et al. 2020, sec. 2): seven
  temporal convolutions, strides 5,2,2,2,2,2,2 and kernels 10,3,3,3,3,2,2 =
  320x subsampling (20 ms frames, 400-sample receptive field), group norm after
  the first layer (base) or a LayerNorm after each (large / XLSR), GELU.

Both add a convolutional positional embedding (wav2vec 2.0: kernel 128, 16
groups) and run pre-LN (large / XLSR) or post-LN (base) Transformer layers;
:mod:`selfspeech.models.hf_wav2vec2` maps the wav2vec 2.0 layouts to and from
transformers' ``Wav2Vec2Config``. Every module takes ``(B, T, ...)``
tensors with absolute int64 ``lengths`` and returns the output lengths.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

WAVE_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))  # (kernel, stride), wav2vec 2.0


@dataclass(frozen=True)
class EncoderConfig:
    frontend: str = "mel"          # mel | wave
    n_mels: int = 80  # mel: log-mel bands per 10-ms frame of the input (wave: unused)
    conv_channels: int = 64        # mel: channels of the 2-D subsampling convs; wave: of the 1-D convs
    d_model: int = 144  # width of the Transformer (a multiple of n_heads and of pos_groups)
    n_layers: int = 4  # Transformer layers
    n_heads: int = 4  # attention heads per layer
    ff_dim: int = 576  # hidden width of each layer's feed-forward block
    dropout: float = 0.1  # probability, after the positional conv and inside every Transformer layer
    pos_kernel: int = 33           # wav2vec 2.0 uses 128 at 20 ms; smaller models, shorter kernels
    pos_groups: int = 16  # groups of the positional conv (wav2vec 2.0: 16)
    # LayerNorm after the positional conv (our original layout, kept for existing checkpoints).
    # False = wav2vec 2.0 large / transformers' "stable layer norm" encoder, which has none there:
    # only that layout exports exactly to Wav2Vec2ForCTC (selfspeech.train.hf_export)
    pos_norm: bool = True
    # These default to None (off): what a config without them means, so such configs and run folders load as they are.
    # wave front-end: conv biases, and the norm of its convs: off = one group norm (a group per
    # channel) on the first conv (wav2vec 2.0 base); conv_layer_norm = a LayerNorm over the channels
    # after every conv (wav2vec 2.0 large / XLSR, Baevski et al. 2020 sec. 4.2, with conv biases;
    # transformers' feat_extract_norm "layer", conv_bias true)
    conv_bias: bool | None = None
    conv_layer_norm: bool | None = None  # wave: a LayerNorm after every conv instead of one group norm
    # Transformer layers: off = pre-LN (LayerNorm before attention and feed-forward, and a final
    # LayerNorm: wav2vec 2.0 large / XLSR, transformers' do_stable_layer_norm); post_ln = post-LN as
    # wav2vec 2.0 base, which has no final LayerNorm (the last layer's output is already normalised)
    # and goes with pos_norm true (transformers' Wav2Vec2Encoder)
    post_ln: bool | None = None

    def __post_init__(self):
        if self.frontend not in ("mel", "wave"):
            raise ValueError(f"frontend {self.frontend!r}: choose mel or wave")
        if self.d_model % self.n_heads or self.d_model % self.pos_groups:
            raise ValueError(f"d_model {self.d_model} must be divisible by n_heads {self.n_heads} "
                             f"and pos_groups {self.pos_groups}")

    @property
    def stride(self) -> int:
        """Input units (mel frames or samples) per output frame."""
        return 4 if self.frontend == "mel" else math.prod(s for _, s in WAVE_CONV)

    @property
    def receptive_field(self) -> int:
        """Input units one output frame sees; shorter inputs have no output frame."""
        if self.frontend == "mel":
            return 7
        rf, jump = 1, 1
        for k, s in WAVE_CONV:
            rf, jump = rf + (k - 1) * jump, jump * s
        return rf

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames for inputs of ``lengths`` units (int64, same shape)."""
        n = lengths.clone()
        convs = ((3, 2), (3, 2)) if self.frontend == "mel" else WAVE_CONV
        for k, s in convs:
            n = torch.div(n - k, s, rounding_mode="floor") + 1
        return n.clamp(min=0)

    @classmethod
    def preset(cls, name: str, **kw) -> "EncoderConfig":
        sizes = {"tiny": dict(conv_channels=16, d_model=32, n_layers=2, n_heads=2, ff_dim=64, pos_groups=4),
                 "small": dict(conv_channels=64, d_model=144, n_layers=4, n_heads=4, ff_dim=576),
                 # small's front-end under a 6 x 256 stack: 5.3 M encoder parameters (small: 1.3 M);
                 # 1,500 BEST-RQ updates take about 40 minutes of one CPU thread
                 "medium": dict(conv_channels=64, d_model=256, n_layers=6, n_heads=4, ff_dim=1024),
                 "base": dict(conv_channels=512, d_model=768, n_layers=12, n_heads=12, ff_dim=3072,
                              pos_kernel=128)}
        if name not in sizes:
            raise ValueError(f"unknown encoder size {name!r}; choose {', '.join(sizes)}")
        return cls(**{**sizes[name], **kw})


def normalise_input(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-utterance mean 0 / std 1 over the real frames, per channel for (B, T, F) log-mel,
    over all samples for (B, T) waveforms (wav2vec 2.0 large / XLSR normalise the waveform).
    Padding stays 0. Pretraining and fine-tuning see the same scale this way."""
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
    if x.dim() == 3:
        valid = valid.unsqueeze(-1)
    n = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (x * valid).sum(1, keepdim=True) / n
    var = ((x - mean) ** 2 * valid).sum(1, keepdim=True) / n
    return (x - mean) / (var.sqrt() + 1e-5) * valid


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) bool, True on padded positions."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


class MelFrontend(nn.Module):
    """(B, T, n_mels) -> (B, ~T/4, d_model)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        c = cfg.conv_channels
        self.conv = nn.Sequential(nn.Conv2d(1, c, 3, 2), nn.GELU(), nn.Conv2d(c, c, 3, 2), nn.GELU())
        f = ((cfg.n_mels - 3) // 2 + 1 - 3) // 2 + 1
        self.proj = nn.Linear(c * f, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.unsqueeze(1))                      # (B, C, T', F')
        return self.proj(y.permute(0, 2, 1, 3).flatten(2))  # (B, T', C*F') -> (B, T', D)


class WaveFrontend(nn.Module):
    """(B, T samples) -> (B, ~T/320, conv_channels): the wav2vec 2.0 feature encoder."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        c, layers, cin = cfg.conv_channels, [], 1
        for i, (k, s) in enumerate(WAVE_CONV):
            layers += [nn.Conv1d(cin, c, k, s, bias=bool(cfg.conv_bias))]
            if cfg.conv_layer_norm:  # wav2vec 2.0 large: LayerNorm over channels after every conv
                layers += [ChannelLayerNorm(c)]
            elif i == 0:  # wav2vec 2.0 base: group norm (one group per channel) on the first layer only
                layers += [nn.GroupNorm(c, c, affine=True)]
            layers += [nn.GELU()]
            cin = c
        self.conv = nn.Sequential(*layers)
        for m in self.conv:
            if isinstance(m, nn.Conv1d):
                # fairseq's init: with PyTorch's default (variance 1/(3 fan_in)) seven GELU convs shrink the
                # signal ~1e4-fold, the features vanish and the contrastive loss stays at chance (measured)
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(1)).transpose(1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T) conv output (wav2vec 2.0 large's feature encoder)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ConvPositional(nn.Module):
    """wav2vec 2.0's relative positional embedding: a grouped conv over time, added to the input."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, cfg.pos_kernel, padding=cfg.pos_kernel // 2,
                              groups=cfg.pos_groups)
        self.even = cfg.pos_kernel % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.even:  # an even kernel yields one extra frame
            y = y[..., :-1]
        return x + F.gelu(y).transpose(1, 2)


class SpeechEncoder(nn.Module):
    """Front-end + positional conv + Transformer; optionally masks frames with a learned embedding.

    ``features(x, lengths)`` -> ``(feats (B, T', C), lengths')``: the front-end output
    (the quantizer input of wav2vec 2.0). ``encode(feats, lengths', mask)`` -> list of
    hidden states ``[(B, T', D)] * (n_layers + 1)`` (index 0: after positional conv),
    with frames where ``mask`` is True replaced by the mask embedding first.

    ``grad_checkpointing = True``: in training each Transformer layer keeps only its input
    and recomputes its activations in the backward pass (Chen et al. 2016, "Training Deep
    Nets with Sublinear Memory Cost"), the same gradients for about a third more compute.
    The layers' attention runs through ``F.scaled_dot_product_attention`` (PyTorch's
    fused kernels on GPUs) with the key-padding mask.
    """

    grad_checkpointing: bool = False

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.frontend == "mel":
            self.frontend, feat_dim = MelFrontend(cfg), cfg.d_model
        else:
            self.frontend, feat_dim = WaveFrontend(cfg), cfg.conv_channels
        self.feat_dim = feat_dim
        self.feat_norm = nn.LayerNorm(feat_dim)
        self.proj = nn.Linear(feat_dim, cfg.d_model)
        self.mask_emb = nn.Parameter(torch.empty(cfg.d_model).uniform_())
        self.pos = ConvPositional(cfg)
        self.in_norm = nn.LayerNorm(cfg.d_model) if cfg.pos_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ff_dim, cfg.dropout, activation="gelu",
                                       batch_first=True, norm_first=not cfg.post_ln)
            for _ in range(cfg.n_layers))
        self.out_norm = nn.Identity() if cfg.post_ln else nn.LayerNorm(cfg.d_model)

    def features(self, x: torch.Tensor, lengths: torch.Tensor,
                 with_raw: bool = False) -> tuple[torch.Tensor, ...]:
        """(feats, lengths'), or (feats, lengths', raw) with the front-end output before its layer norm
        (wav2vec 2.0's feature penalty applies there: after the norm it would only shrink the norm's gain)."""
        out_len = self.cfg.out_lengths(lengths)
        raw = self.frontend(normalise_input(x, lengths))
        feats = self.feat_norm(raw)
        out_len = out_len.clamp(max=feats.shape[1])
        return (feats, out_len, raw) if with_raw else (feats, out_len)

    def encode(self, feats: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor | None = None,
               upto: int | None = None) -> list[torch.Tensor]:
        h = self.proj(feats)
        if mask is not None:
            h = torch.where(mask[..., None], self.mask_emb.to(h.dtype), h)
        pad = padding_mask(lengths, h.shape[1])
        h = self.drop(self.in_norm(self.pos(h.masked_fill(pad[..., None], 0.0))))
        states = [h]
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers[: upto if upto is not None else len(self.layers)]:
            if ckpt:  # the recomputation replays the saved RNG state: the same dropout masks
                h = checkpoint(layer, h, src_key_padding_mask=pad, use_reentrant=False)
            else:
                h = layer(h, src_key_padding_mask=pad)
            states.append(h)
        if upto is None:
            states[-1] = self.out_norm(h)
        return states

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, ...) -> final hidden states (B, T', D) and their lengths."""
        feats, out_len = self.features(x, lengths)
        return self.encode(feats, out_len)[-1], out_len


# -- save / load: safetensors + config JSON, no pickle ------------------------------------------

def save_encoder(module: nn.Module, cfg, out_dir: str | Path, kind: str, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (``{"kind", "config", **extra}``) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"kind": kind, "config": dataclasses.asdict(cfg), **(extra or {})},
                                                indent=1) + "\n")
    return out


def read_config(model_dir: str | Path, kind: str | tuple[str, ...]) -> dict:
    """The ``config.json`` of a saved model; ValueError when it is another kind of model."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a selfspeech model directory)")
    meta = json.loads(p.read_text())
    kinds = (kind,) if isinstance(kind, str) else kind
    if meta.get("kind") not in kinds:
        raise ValueError(f"{model_dir}: a {meta.get('kind')!r} checkpoint, expected {' or '.join(kinds)}")
    return meta


def load_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))
