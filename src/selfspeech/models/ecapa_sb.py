"""SpeechBrain ECAPA-TDNN checkpoints as our speaker encoder (Desplanques et al. 2020).

SpeechBrain saves its ``ECAPA_TDNN`` as a plain torch state dict
(``embedding_model.ckpt`` of its speaker-recognition models). Its layers are
ours one for one (TDNN, SE-Res2Net blocks, multi-layer aggregation, attentive
statistics pooling with global context, BN, embedding), so the import is a
renaming of keys, with the last layer's 1x1 convolution weight ``(D, 2C, 1)``
becoming our linear layer's ``(D, 2C)``. No SpeechBrain code runs: the file is
read with ``torch.load(weights_only=True)``.

Where SpeechBrain computes something else by design, the imported model is
configured to compute what SpeechBrain computes (see :class:`ECAPAConfig`):

- front end: SpeechBrain's ``Fbank`` (HTK mel, Hamming window, dB with an 80-dB
  floor; :mod:`selfspeech.audio.fbank`), not Whisper's log-mel;
- normalisation: the utterance's mean subtracted per channel, no std division
  (its recipes' ``InputNormalization(norm_type="sentence", std_norm=False)``);
- time convolutions pad by reflection, not zeros; the pooled std's floor is 1e-12.

One difference is kept, as the better one for a user: SpeechBrain's convolutions
see the padded frames of a batch, so an utterance's embedding depends on the
longest one beside it; ours mirrors each utterance at its own end and masks the
rest, so a batch embeds every utterance exactly as alone (as SpeechBrain embeds a
batch of one).

The dilations are not in the state dict: they are read from a ``hyperparams.yaml``
beside the checkpoint when there is one, else SpeechBrain's default 2, 3, 4, ...
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from selfspeech.models.ecapa import ECAPAConfig, ECAPATDNN

CHECKPOINT = "embedding_model.ckpt"  # its name in SpeechBrain's pretrained speaker models
_WB = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def find_speechbrain_checkpoint(path: str | Path) -> Path | None:
    """``path`` if it is a checkpoint file, ``path/embedding_model.ckpt`` if that exists; else None."""
    path = Path(path)
    if path.is_file() and path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return path
    if path.is_dir() and (path / CHECKPOINT).is_file() and not (path / "config.json").exists():
        return path / CHECKPOINT
    return None


def _tdnn(sb: str, ours: str) -> list[tuple[str, str]]:
    """SpeechBrain's TDNNBlock (conv.conv, norm.norm) -> our TDNN (Sequential 0 = conv, 2 = BN)."""
    return [(f"{sb}.conv.conv.{p}", f"{ours}.0.{p}") for p in _WB] + [(f"{sb}.norm.norm.{p}", f"{ours}.2.{p}")
                                                                    for p in _BN]


def key_pairs(cfg: ECAPAConfig) -> list[tuple[str, str]]:
    """(SpeechBrain key, our key) for every tensor of a model of ``cfg``, in SpeechBrain's order."""
    pairs = _tdnn("blocks.0", "stem")
    for i in range(len(cfg.dilations)):
        sb, ours = f"blocks.{i + 1}", f"blocks.{i}"
        pairs += _tdnn(f"{sb}.tdnn1", f"{ours}.pre")
        for j in range(cfg.scale - 1):
            pairs += _tdnn(f"{sb}.res2net_block.blocks.{j}", f"{ours}.res2.convs.{j}")
        pairs += _tdnn(f"{sb}.tdnn2", f"{ours}.post")
        pairs += [(f"{sb}.se_block.conv{a}.conv.{p}", f"{ours}.se.fc.{b}.{p}") for a, b in ((1, 0), (2, 2)) for p in _WB]
    pairs += _tdnn("mfa", "mfa") + _tdnn("asp.tdnn", "pool.att.0")
    pairs += [(f"asp.conv.conv.{p}", f"pool.att.2.{p}") for p in _WB]
    pairs += [(f"asp_bn.norm.{p}", f"pool_norm.{p}") for p in _BN]
    return pairs + [(f"fc.conv.{p}", f"fc.{p}") for p in _WB]


def _shape(sd: dict, key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{where}: missing key {key!r}: not a SpeechBrain ECAPA_TDNN state dict")
    return tuple(sd[key].shape)


def _dilations(where: Path, blocks: int) -> tuple[int, ...]:
    """The SE-Res2Net blocks' dilations from hyperparams.yaml beside the checkpoint, else 2, 3, 4, ..."""
    hp = where.parent / "hyperparams.yaml"
    if hp.is_file():
        m = re.search(r"^\s*dilations:\s*\[([^\]]*)\]", hp.read_text(), re.MULTILINE)
        if m:
            d = tuple(int(v) for v in m.group(1).split(","))
            if len(d) != blocks + 2:
                raise ValueError(f"{hp}: dilations {list(d)} list {len(d)} layers, the checkpoint has {blocks + 2}")
            return d[1:-1]
    return tuple(range(2, 2 + blocks))


def config_from_state(sd: dict, where: str | Path = "checkpoint", dilations: tuple[int, ...] | None = None
                      ) -> ECAPAConfig:
    """The :class:`ECAPAConfig` (SpeechBrain's conventions) of a SpeechBrain ECAPA_TDNN state dict."""
    where = Path(where)
    C, n_mels, k = _shape(sd, "blocks.0.conv.conv.weight", str(where))
    if k != 5:
        raise ValueError(f"{where}: blocks.0.conv.conv.weight has kernel {k}; the ECAPA-TDNN stem has 5")
    blocks = len({m[1] for key in sd if (m := re.match(r"blocks\.(\d+)\.tdnn1\.", key))})
    if blocks == 0:
        raise ValueError(f"{where}: missing key 'blocks.1.tdnn1.conv.conv.weight': no SE-Res2Net block")
    scale = 1 + len({m[1] for key in sd if (m := re.match(r"blocks\.1\.res2net_block\.blocks\.(\d+)\.", key))})
    k2 = _shape(sd, "blocks.1.res2net_block.blocks.0.conv.conv.weight", str(where))[-1]
    if k2 != 3:
        raise ValueError(f"{where}: blocks.1.res2net_block.blocks.0.conv.conv.weight has kernel {k2}; ours takes 3")
    mfa, _, k3 = _shape(sd, "mfa.conv.conv.weight", str(where))
    if k3 != 1:
        raise ValueError(f"{where}: mfa.conv.conv.weight has kernel {k3}; ours takes 1")
    if C % scale:
        raise ValueError(f"{where}: blocks.0.conv.conv.weight: {C} channels do not split into {scale} Res2Net groups")
    return ECAPAConfig(n_mels=n_mels, channels=C, embed_dim=_shape(sd, "fc.conv.weight", str(where))[0], scale=scale,
                       se_channels=_shape(sd, "blocks.1.se_block.conv1.conv.weight", str(where))[0],
                       attention_channels=_shape(sd, "asp.tdnn.conv.conv.weight", str(where))[0],
                       dilations=dilations or _dilations(where, blocks), mfa_channels=mfa,
                       features="fbank", input_norm="mean", padding="reflect", pool_eps=1e-12)


def convert_state(sd: dict, cfg: ECAPAConfig, where: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """SpeechBrain state dict -> ours; ValueError naming the first missing, extra or misshapen key."""
    pairs = key_pairs(cfg)
    names = dict(pairs)
    extra = next((k for k in sd if k not in names), None)
    if extra is not None:
        raise ValueError(f"{where}: unexpected key {extra!r}: not in a SpeechBrain ECAPA_TDNN of this size "
                         f"({cfg.channels} channels, {len(cfg.dilations)} blocks, scale {cfg.scale})")
    missing = next((sb for sb, _ in pairs if sb not in sd), None)
    if missing is not None:
        raise ValueError(f"{where}: missing key {missing!r}: the checkpoint is incomplete or another architecture")
    want = ECAPATDNN(cfg).state_dict()
    out = {}
    for sb, ours in pairs:
        v = sd[sb]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: key {sb!r} holds a {type(v).__name__}, not a tensor")
        v = v.squeeze(-1) if ours == "fc.weight" else v   # 1x1 conv (D, 2C, 1) -> linear (D, 2C)
        if tuple(v.shape) != tuple(want[ours].shape):
            raise ValueError(f"{where}: key {sb!r} has shape {tuple(sd[sb].shape)}, a model of this size needs "
                             f"{tuple(want[ours].shape)}: the layers differ in size")
        out[ours] = v.to(want[ours].dtype)
    return out


def load_speechbrain_ecapa(path: str | Path, dilations: tuple[int, ...] | None = None) -> ECAPATDNN:
    """A SpeechBrain ``embedding_model.ckpt`` (or the folder holding one) -> our ECAPATDNN in eval mode."""
    path = find_speechbrain_checkpoint(path) or Path(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, or refused by weights_only (code, not tensors): one line
        raise ValueError(f"{path}: not a readable torch state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    cfg = config_from_state(sd, path, dilations)
    model = ECAPATDNN(cfg)
    model.load_state_dict(convert_state(sd, cfg, path))
    return model.eval()
