"""ECAPA-TDNN speaker encoder (Desplanques et al., Interspeech 2020, arXiv 2005.07143).

Log-mel frames -> instance normalisation -> TDNN(k=5) -> three SE-Res2Net
blocks (k=3, dilations 2/3/4, scale 8) -> multi-layer feature aggregation
(concatenated block outputs, 1x1 conv) -> attentive statistics pooling with
global context (sec. 2.2 of the paper) -> BN -> linear embedding.

Every time reduction (instance norm, SE means, pooling) is masked by
``lengths`` so a padded batch embeds each utterance as it would alone; batch
norm sees padded frames only in training, where the speaker SSL trainer feeds
equal-length segments. Input shape follows the toolkit: ``(B, T, n_mels)`` +
int64 frame ``lengths``.

``grad_checkpointing = True`` recomputes each SE-Res2Block's activations in the
backward pass instead of keeping them (the same gradients, less memory). The
recomputation runs the blocks' batch norms a second time; their running
statistics are put back afterwards, so they advance once per step as without.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from selfspeech.models.ssl import read_config, save_encoder

KIND = "speaker_encoder"


@dataclass(frozen=True)
class ECAPAConfig:
    n_mels: int = 80  # mel bands of the input features (Whisper log-mel or fbank)
    channels: int = 512            # C of the paper: 512 (ECAPA-512) or 1024; 256 for CPU budgets
    embed_dim: int = 192  # size of the speaker embedding
    scale: int = 8                 # Res2Net scale: C splits into `scale` groups
    se_channels: int = 128  # bottleneck of each block's squeeze-excitation
    attention_channels: int = 128  # hidden channels of the attentive statistics pooling
    dilations: tuple = (2, 3, 4)   # one SE-Res2Block per dilation
    mfa_channels: int | None = None  # None: 3 * C (1536 for C=512, as in the paper)
    # The fields below default to our own models; an imported SpeechBrain checkpoint sets them to
    # SpeechBrain's choices (models/ecapa_sb.py), so it computes what SpeechBrain computes.
    features: str = "whisper"      # the front end: Whisper's log-mel, or "fbank" (SpeechBrain's Fbank)
    input_norm: str = "meanstd"    # per-utterance normalisation: "meanstd", "mean" (SpeechBrain's recipes), "none"
    padding: str = "zeros"         # time convolutions' 'same' padding: "zeros", or "reflect" (SpeechBrain's)
    pool_eps: float = 1e-5         # variance floor of the pooled std (SpeechBrain: 1e-12)

    def __post_init__(self):
        if self.channels % self.scale:
            raise ValueError(f"channels ({self.channels}) must be divisible by scale ({self.scale})")
        for name, allowed in (("features", ("whisper", "fbank")), ("input_norm", ("meanstd", "mean", "none")),
                              ("padding", ("zeros", "reflect"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ECAPA {name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        object.__setattr__(self, "dilations", tuple(self.dilations))

    @property
    def mfa(self) -> int:
        return self.mfa_channels or 3 * self.channels

    @classmethod
    def preset(cls, name: str, **kw) -> "ECAPAConfig":
        sizes = {"tiny": dict(channels=32, embed_dim=32, se_channels=16, attention_channels=16, n_mels=40),
                 "small": dict(channels=256), "base": dict(channels=512), "large": dict(channels=1024)}
        if name not in sizes:
            raise ValueError(f"ECAPA preset {name!r}: choose one of {sorted(sizes)}")
        return cls(**{**sizes[name], **kw})


def frame_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B,) lengths -> (B, 1, T) float mask, 1 on valid frames."""
    return (torch.arange(T, device=lengths.device)[None] < lengths[:, None]).float().unsqueeze(1)


def masked_mean_std(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted statistics over time. x: (B, C, T); w: (B, 1|C, T) summing to 1 over T -> (B, C), (B, C)."""
    mean = (x * w).sum(-1)
    var = ((x - mean.unsqueeze(-1)) ** 2 * w).sum(-1)
    return mean, var.clamp(min=eps).sqrt()


def reflect_pad(x: torch.Tensor, p: int, mask: torch.Tensor) -> torch.Tensor:
    """(B, C, T) -> (B, C, T + 2p), each row mirrored at its own ends (``mask`` (B, 1, T) gives its length),
    as padding the utterance alone would; positions past a row's end are masked downstream."""
    T = x.shape[-1]
    n = mask[:, 0].sum(-1).long().clamp(min=1)[:, None]                       # (B, 1) frames
    idx = (torch.arange(-p, T + p, device=x.device)[None, :]).abs()
    idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx).clamp(0, T - 1)      # (B, T + 2p)
    return x.gather(2, idx[:, None, :].expand(-1, x.shape[1], -1))


class TDNN(nn.Sequential):
    """Conv1d -> ReLU -> BatchNorm, 'same' padding (the paper's TDNN layer).

    ``padding="reflect"`` mirrors the frames at the utterance's ends instead of adding zeros,
    as SpeechBrain's ``Conv1d`` does; the weights are the same either way."""

    def __init__(self, cin: int, cout: int, k: int = 1, dilation: int = 1, padding: str = "zeros"):
        self.pad = dilation * (k - 1) // 2
        self.reflect = padding == "reflect" and self.pad > 0
        super().__init__(nn.Conv1d(cin, cout, k, dilation=dilation, padding=0 if self.reflect else self.pad),
                         nn.ReLU(), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.reflect:
            x = reflect_pad(x, self.pad, mask if mask is not None else x.new_ones(x.shape[0], 1, x.shape[-1]))
        return super().forward(x)


class Res2Conv(nn.Module):
    """Res2Net hierarchical convolution (Gao et al. 2019): y1 = x1, y2 = K2(x2), yi = Ki(xi + y(i-1))."""

    def __init__(self, channels: int, scale: int, k: int, dilation: int, padding: str = "zeros"):
        super().__init__()
        self.scale = scale
        self.convs = nn.ModuleList(TDNN(channels // scale, channels // scale, k, dilation, padding)
                                   for _ in range(scale - 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        parts = x.chunk(self.scale, dim=1)
        out, prev = [parts[0]], None
        for conv, p in zip(self.convs, parts[1:]):
            prev = conv(p if prev is None else p + prev, mask) * mask
            out.append(prev)
        return torch.cat(out, dim=1)


class SEBlock(nn.Module):
    """Squeeze-excitation over the masked time mean (Hu et al. 2018; ECAPA sec. 2.1)."""

    def __init__(self, channels: int, bottleneck: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Conv1d(channels, bottleneck, 1), nn.ReLU(),
                                nn.Conv1d(bottleneck, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = (x * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return x * self.fc(s)


class SERes2Block(nn.Module):
    def __init__(self, channels: int, scale: int, dilation: int, se_channels: int, padding: str = "zeros"):
        super().__init__()
        self.pre = TDNN(channels, channels, 1)
        self.res2 = Res2Conv(channels, scale, 3, dilation, padding)
        self.post = TDNN(channels, channels, 1)
        self.se = SEBlock(channels, se_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # masking after every time convolution's input keeps padded frames at zero, as 'same'
        # padding of an unpadded utterance would: a batch embeds each utterance exactly as alone
        h = self.res2(self.pre(x) * mask, mask)
        return (x + self.se(self.post(h), mask)) * mask


class AttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics pooling (ECAPA sec. 2.2, eqs. 1-4).

    The attention sees each frame together with the utterance's global mean and
    std, so it can weigh frames relative to the whole recording.
    """

    def __init__(self, channels: int, attention: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.att = nn.Sequential(TDNN(3 * channels, attention, 1), nn.Tanh(), nn.Conv1d(attention, channels, 1))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h: (B, C, T), mask: (B, 1, T) -> (B, 2C) weighted mean and std."""
        T = h.shape[-1]
        w = mask / mask.sum(-1, keepdim=True).clamp(min=1)
        mean, std = masked_mean_std(h, w, self.eps)
        ctx = torch.cat([h, mean.unsqueeze(-1).expand(-1, -1, T), std.unsqueeze(-1).expand(-1, -1, T)], 1)
        logits = self.att(ctx).masked_fill(mask == 0, float("-inf"))
        mean, std = masked_mean_std(h, torch.softmax(logits, dim=-1), self.eps)
        return torch.cat([mean, std], dim=1)


@contextlib.contextmanager
def _restored_buffers(module: nn.Module):
    """Undo what a recomputed forward pass writes into ``module``'s buffers (batch-norm statistics)."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


class ECAPATDNN(nn.Module):
    grad_checkpointing: bool = False

    def __init__(self, cfg: ECAPAConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.channels
        self.stem = TDNN(cfg.n_mels, C, 5, padding=cfg.padding)
        self.blocks = nn.ModuleList(SERes2Block(C, cfg.scale, d, cfg.se_channels, cfg.padding) for d in cfg.dilations)
        self.mfa = TDNN(C * len(cfg.dilations), cfg.mfa, 1)
        self.pool = AttentiveStatsPool(cfg.mfa, cfg.attention_channels, cfg.pool_eps)
        self.pool_norm = nn.BatchNorm1d(2 * cfg.mfa)
        self.fc = nn.Linear(2 * cfg.mfa, cfg.embed_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, n_mels) log-mel, lengths: (B,) int64 frames -> (B, embed_dim) embeddings."""
        B, T, _ = x.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        mask = frame_mask(lengths, T)
        x = x.transpose(1, 2)
        # instance normalisation of the features over the utterance (sslsv / ECAPA front-ends):
        # removes the channel's spectral tilt and level, which a speaker model must not rely on.
        # SpeechBrain's recipes subtract the mean only, outside the model ("mean")
        if self.cfg.input_norm != "none":
            mean, std = masked_mean_std(x, mask / mask.sum(-1, keepdim=True).clamp(min=1))
            x = x - mean.unsqueeze(-1)
            x = (x / std.unsqueeze(-1) if self.cfg.input_norm == "meanstd" else x) * mask
        h = self.stem(x, mask) * mask
        outs = []
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if ckpt:
                h = checkpoint(block, h, mask, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), _restored_buffers(b)))
            else:
                h = block(h, mask)
            outs.append(h)
        h = self.mfa(torch.cat(outs, dim=1))
        return self.fc(self.pool_norm(self.pool(h, mask)))


# ---------------------------------------------------------------- save / load, embed()

def save_speaker_encoder(model: ECAPATDNN, out_dir: str | Path, extra: dict | None = None) -> Path:
    """safetensors weights + JSON config (``kind: speaker_encoder``); callers wrap it for atomicity."""
    return save_encoder(model, model.cfg, out_dir, kind=KIND, extra=extra)


class SpeakerEncoder:
    """A trained ECAPA-TDNN ready to embed audio: ``SpeakerEncoder.load(dir).embed(wav)``.

    Satisfies the ``SpeakerEmbedder`` protocol of ``selfspeech.cluster.speakers``.
    The network runs on the model's device; features are computed and
    embeddings returned on the CPU.
    """

    def __init__(self, model: ECAPATDNN, name: str = "ecapa"):
        self.model, self.name = model.eval(), name

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "SpeakerEncoder":
        from safetensors.torch import load_file

        path = Path(path)
        from selfspeech.models.ecapa_sb import find_speechbrain_checkpoint, load_speechbrain_ecapa

        sb = find_speechbrain_checkpoint(path)
        if sb is not None:  # a SpeechBrain ECAPA state dict, or the folder holding one
            from selfspeech.accel import resolve_device

            return cls(load_speechbrain_ecapa(sb).to(resolve_device(device)), name="speechbrain-ecapa")
        if (path / "encoder" / "config.json").exists() and not (path / "config.json").exists():
            path = path / "encoder"  # the run directory of `selfspeech sv train` was given
        meta = read_config(path, KIND)
        model = ECAPATDNN(ECAPAConfig(**meta["config"]))
        state, want = load_file(str(path / "model.safetensors")), model.state_dict()
        bad = next((f"unexpected key {k!r}" for k in state if k not in want), None) or next(
            (f"missing key {k!r}" for k in want if k not in state), None) or next(
            (f"key {k!r} has shape {tuple(state[k].shape)}, its config.json needs {tuple(want[k].shape)}"
             for k in want if tuple(state[k].shape) != tuple(want[k].shape)), None)
        if bad:
            raise ValueError(f"{path / 'model.safetensors'}: {bad}: the weights are of another architecture or size")
        model.load_state_dict(state)
        from selfspeech.accel import resolve_device

        return cls(model.to(resolve_device(device)))  # auto|cpu|cuda|cuda:N or a torch.device

    def features(self, wav: np.ndarray) -> np.ndarray:
        """(T,) 16-kHz float32 -> (frames, n_mels) log-mel (Whisper's, or SpeechBrain's Fbank for its checkpoints)."""
        if self.model.cfg.features == "fbank":
            from selfspeech.audio.fbank import speechbrain_fbank

            return speechbrain_fbank(wav, self.model.cfg.n_mels)
        from selfspeech.audio.features import log_mel

        return log_mel(wav, self.model.cfg.n_mels).T

    @torch.no_grad()
    def embed_batch(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Full utterances -> (N, D) float32 embeddings (masked, so padding does not change them)."""
        from selfspeech.accel import module_device, to_device
        from selfspeech.data.audio_dataset import collate_arrays

        b = to_device(collate_arrays([self.features(w) for w in wavs]), module_device(self.model))
        return self.model(b["x"], b["lengths"]).float().cpu().numpy()

    def embed(self, wav: np.ndarray) -> np.ndarray:
        return self.embed_batch([wav])[0]
