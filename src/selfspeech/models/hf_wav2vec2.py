"""Our wav2vec 2.0 / XLSR model <-> transformers' Wav2Vec2 (config, weights, checkpoint folders).

Two layouts of wav2vec 2.0 (Baevski et al. 2020, sec. 4.2) exist in transformers
and in :class:`~selfspeech.models.ssl.EncoderConfig`:

========================  ===============================  ===================================
                          base (post-LN)                   large / XLSR ("stable layer norm")
========================  ===============================  ===================================
transformers              do_stable_layer_norm false       do_stable_layer_norm true
ours                      post_ln true, pos_norm true      pos_norm false
feature encoder           group norm (no conv bias)        conv_layer_norm, conv_bias (XLSR)
========================  ===============================  ===================================

(the feature-encoder norm and the layout are independent; any pairing maps). Our
original layout (pre-LN layers *and* a LayerNorm after the positional conv) has
no transformers counterpart and is refused on export, as are front-ends other
than the wav2vec 2.0 feature encoder (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2,
equal channel counts).

Weights (ours, relative to a ``SpeechEncoder`` -> ``Wav2Vec2Model``)::

    frontend.conv.<i> (Conv1d / norm)  -> feature_extractor.conv_layers.<j>.{conv, layer_norm}
    feat_norm, proj                    -> feature_projection.{layer_norm, projection}
    mask_emb                           -> masked_spec_embed
    pos.conv                           -> encoder.pos_conv_embed.conv (weight norm over dim 2: g, v)
    in_norm (base) / out_norm (large)  -> encoder.layer_norm
    layers.<i>.self_attn.in_proj_*     -> encoder.layers.<i>.attention.{q,k,v}_proj (split)
    layers.<i>.self_attn.out_proj      -> encoder.layers.<i>.attention.out_proj
    layers.<i>.norm1, norm2            -> encoder.layers.<i>.layer_norm, final_layer_norm
    layers.<i>.linear1, linear2        -> encoder.layers.<i>.feed_forward.{intermediate,output}_dense

and the pretraining heads of ``Wav2Vec2Task`` -> ``Wav2Vec2ForPreTraining``:
``quantizer.logits`` -> ``quantizer.weight_proj``, ``quantizer.codebook`` (G, V, d) ->
``quantizer.codevectors`` (1, G*V, d), ``project_q`` -> ``project_q``, ``final_proj`` ->
``project_hid``. Dropout rates are training settings, not weights: ours has one rate
(``dropout``, read from ``hidden_dropout``) and no LayerDrop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from selfspeech.models.ssl import WAVE_CONV, EncoderConfig

QUANT_KEYS = ("groups", "entries", "final_dim")   # the task fields a checkpoint's quantizer fixes
HEADS = ("quantizer.", "project_q.", "final_proj.")  # our pretraining heads (Wav2Vec2Task)
WHERE = "set it in the `encoder` config of `selfspeech pretrain` (or of finetune-ctc from scratch)"


def check_representable(cfg: EncoderConfig) -> None:
    """ValueError naming the first config field that has no exact transformers Wav2Vec2 equivalent."""
    if cfg.frontend != "wave":
        raise ValueError(f"encoder frontend {cfg.frontend!r} cannot be exported to transformers' Wav2Vec2, which "
                         f"reads waveforms: needs `frontend: wave`; {WHERE}")
    if not cfg.post_ln and cfg.pos_norm:
        raise ValueError("encoder pos_norm=True (a LayerNorm after the positional conv) with pre-LN layers has no "
                         "counterpart in transformers' Wav2Vec2: needs `pos_norm: false` (large / XLSR layout) "
                         f"or `post_ln: true` (base layout); {WHERE}")
    if cfg.post_ln and not cfg.pos_norm:
        raise ValueError("encoder post_ln=True (post-LN, wav2vec 2.0 base) without pos_norm has no counterpart "
                         f"in transformers' Wav2Vec2, whose base encoder normalises after the positional conv: "
                         f"needs `pos_norm: true`; {WHERE}")


def hf_fields(cfg: EncoderConfig) -> dict:
    """``Wav2Vec2Config`` keyword arguments of an encoder (checked with :func:`check_representable`)."""
    check_representable(cfg)
    return dict(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.ff_dim, hidden_act="gelu",
        # nn.TransformerEncoderLayer uses one dropout for attention, FF activation and residuals;
        # we have none on the feature projection, on the quantizer input, and no LayerDrop
        hidden_dropout=cfg.dropout, activation_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        feat_proj_dropout=0.0, feat_quantizer_dropout=0.0, layerdrop=0.0, layer_norm_eps=1e-5,
        feat_extract_norm="layer" if cfg.conv_layer_norm else "group", feat_extract_activation="gelu",
        conv_bias=bool(cfg.conv_bias),
        conv_dim=[cfg.conv_channels] * len(WAVE_CONV), conv_kernel=[k for k, _ in WAVE_CONV],
        conv_stride=[s for _, s in WAVE_CONV], num_conv_pos_embeddings=cfg.pos_kernel,
        num_conv_pos_embedding_groups=cfg.pos_groups, do_stable_layer_norm=not cfg.post_ln, add_adapter=False)


def quant_fields(quant: dict, task: dict | None = None) -> dict:
    """``Wav2Vec2Config`` keyword arguments of the quantizer ``quant`` ({groups, entries, final_dim})
    and the loss settings of ``task`` (our Wav2Vec2Config as a dict: negatives, logit_temp, w_diversity)."""
    task = task or {}
    return dict(num_codevector_groups=quant["groups"], num_codevectors_per_group=quant["entries"],
                codevector_dim=quant["final_dim"], proj_codevector_dim=quant["final_dim"],
                num_negatives=int(task.get("negatives", 100)),
                contrastive_logits_temperature=float(task.get("logit_temp", 0.1)),
                diversity_loss_weight=float(task.get("w_diversity", 0.1)))


def _refuse(where: str, field: str, value, why: str) -> ValueError:
    return ValueError(f"{where}: {field} {value!r} {why}")


def from_hf_config(d: dict, where: str = "config.json") -> tuple[EncoderConfig, dict]:
    """A transformers ``config.json`` (dict) -> (our EncoderConfig, quantizer {groups, entries, final_dim}).

    ValueError (one line, naming the first field we cannot represent) otherwise."""
    from transformers import Wav2Vec2Config

    if d.get("model_type") != "wav2vec2":
        raise _refuse(where, "model_type", d.get("model_type"), "is not wav2vec2: give a transformers wav2vec 2.0 "
                      "or XLSR checkpoint folder (model_type wav2vec2), or a selfspeech model folder")
    c = Wav2Vec2Config.from_dict({k: v for k, v in d.items() if k != "model_type"})   # defaults filled in
    kernels, strides = [k for k, _ in WAVE_CONV], [s for _, s in WAVE_CONV]
    checks = [("conv_kernel", list(c.conv_kernel) == kernels, f"differs from the wav2vec 2.0 feature encoder's "
               f"{kernels}, the only one selfspeech builds"),
              ("conv_stride", list(c.conv_stride) == strides, f"differs from the wav2vec 2.0 strides {strides}"),
              ("conv_dim", len(set(c.conv_dim)) == 1, "has unequal channel counts; selfspeech has one (conv_channels)"),
              ("feat_extract_norm", c.feat_extract_norm in ("group", "layer"), "is not group or layer"),
              ("feat_extract_activation", c.feat_extract_activation == "gelu", "is not gelu"),
              ("hidden_act", c.hidden_act == "gelu", "is not gelu"),
              ("layer_norm_eps", float(c.layer_norm_eps) == 1e-5, "is not 1e-5, selfspeech's LayerNorm eps"),
              ("add_adapter", not c.add_adapter, "is set: selfspeech has no adapter after the encoder"),
              ("adapter_attn_dim", getattr(c, "adapter_attn_dim", None) is None, "is set: no attention adapters"),
              ("proj_codevector_dim", c.proj_codevector_dim == c.codevector_dim,
               f"differs from codevector_dim {c.codevector_dim}; selfspeech's quantizer has one (final_dim)")]
    for field, ok, why in checks:
        if not ok:
            raise _refuse(where, field, getattr(c, field, None), why)
    try:
        enc = EncoderConfig(frontend="wave", conv_channels=int(c.conv_dim[0]), d_model=c.hidden_size,
                            n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads, ff_dim=c.intermediate_size,
                            dropout=float(c.hidden_dropout), pos_kernel=c.num_conv_pos_embeddings,
                            pos_groups=c.num_conv_pos_embedding_groups, pos_norm=not c.do_stable_layer_norm,
                            conv_bias=bool(c.conv_bias) or None,
                            conv_layer_norm=c.feat_extract_norm == "layer" or None,
                            post_ln=not c.do_stable_layer_norm or None)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return enc, {"groups": c.num_codevector_groups, "entries": c.num_codevectors_per_group,
                 "final_dim": c.codevector_dim}


# -- weights ------------------------------------------------------------------------------------

def _frontend_pairs(cfg: EncoderConfig) -> list[tuple[str, str]]:
    """(our module, transformers module) of the feature encoder, in the Sequential's order."""
    pairs, i = [], 0
    for j in range(len(WAVE_CONV)):   # Sequential(conv, [norm], GELU, conv, [norm], GELU, ...)
        hf = f"feature_extractor.conv_layers.{j}."
        pairs.append((f"frontend.conv.{i}", hf + "conv"))
        normed = bool(cfg.conv_layer_norm) or j == 0
        if normed:
            pairs.append((f"frontend.conv.{i + 1}", hf + "layer_norm"))
        i += 3 if normed else 2
    return pairs


def _param_pairs(cfg: EncoderConfig) -> list[tuple[str, str]]:
    """(our parameter, transformers parameter) of the encoder, except the fused qkv and weight-normed pos conv."""
    mods = [(f"{o}.weight", f"{h}.weight") for o, h in _frontend_pairs(cfg)]
    mods += [(f"{o}.bias", f"{h}.bias") for o, h in _frontend_pairs(cfg) if cfg.conv_bias or not h.endswith(".conv")]
    layer = [("self_attn.out_proj", "attention.out_proj"), ("norm1", "layer_norm"), ("norm2", "final_layer_norm"),
             ("linear1", "feed_forward.intermediate_dense"), ("linear2", "feed_forward.output_dense")]
    blocks = [("feat_norm", "feature_projection.layer_norm"), ("proj", "feature_projection.projection"),
              ("in_norm" if cfg.pos_norm else "out_norm", "encoder.layer_norm")]
    blocks += [(f"layers.{i}.{o}", f"encoder.layers.{i}.{h}") for i in range(cfg.n_layers) for o, h in layer]
    mods += [(f"{o}.{p}", f"{h}.{p}") for o, h in blocks for p in ("weight", "bias")]
    return mods + [("pos.conv.bias", "encoder.pos_conv_embed.conv.bias"), ("mask_emb", "masked_spec_embed")]


POS = "encoder.pos_conv_embed.conv."
G_KEY, V_KEY = POS + "parametrizations.weight.original0", POS + "parametrizations.weight.original1"


def _kernel_norms(w: torch.Tensor) -> torch.Tensor:
    """(D, D/groups, K) -> (1, 1, K) L2 norms per tap, from the fused kernel weight_norm runs (on CPU):
    norm_except_dim sums in another order and can differ by an ulp, so the weight would too."""
    try:
        return torch._weight_norm_interface(w, torch.ones(1, 1, w.shape[2], dtype=w.dtype), 2)[1].reshape(1, 1, -1)
    except (AttributeError, RuntimeError):   # private API gone: equal to ~1e-7 relative
        return torch.norm_except_dim(w, 2, 2)


def encoder_to_hf(sd: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """A ``SpeechEncoder.state_dict()`` -> ``Wav2Vec2Model`` parameter names (no ``wav2vec2.`` prefix)."""
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    out = {h: sd[o] for o, h in _param_pairs(cfg) if o in sd}
    # weight norm over dim 2: weight = v * (g / ||v||), norms over (out, in) per kernel tap. v = w and
    # g = ||w|| as the recombining kernel computes it gives back w bit for bit (g / ||v|| == 1.0)
    w = sd["pos.conv.weight"]                                           # (D, D/groups, K)
    g = _kernel_norms(w)                                                # (1, 1, K)
    out[G_KEY], out[V_KEY] = g, torch.where(g == 0, torch.ones_like(w), w)   # an all-zero tap: g = 0 keeps it 0
    D = cfg.d_model
    for i in range(cfg.n_layers):
        qkv_w, qkv_b = sd[f"layers.{i}.self_attn.in_proj_weight"], sd[f"layers.{i}.self_attn.in_proj_bias"]
        for n, name in enumerate("qkv"):   # nn.MultiheadAttention's fused (3D, D) projection, q then k then v
            out[f"encoder.layers.{i}.attention.{name}_proj.weight"] = qkv_w[n * D:(n + 1) * D].clone()
            out[f"encoder.layers.{i}.attention.{name}_proj.bias"] = qkv_b[n * D:(n + 1) * D].clone()
    return out


def pos_weight(hf: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positional conv weight of a transformers state dict: weight norm (either naming) or plain."""
    if G_KEY in hf:
        g, v = hf[G_KEY], hf[V_KEY]
    elif POS + "weight_g" in hf:                      # checkpoints written with nn.utils.weight_norm
        g, v = hf[POS + "weight_g"], hf[POS + "weight_v"]
    else:
        return hf[POS + "weight"]
    return torch._weight_norm(v, g, 2)               # the parametrization's own arithmetic


def encoder_from_hf(hf: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """``Wav2Vec2Model`` weights (no prefix) -> our ``SpeechEncoder`` names; absent ``masked_spec_embed``
    is left out (the caller keeps its fresh mask embedding)."""
    out = {o: hf[h] for o, h in _param_pairs(cfg) if h in hf}
    out["pos.conv.weight"] = pos_weight(hf)
    for i in range(cfg.n_layers):
        a = f"encoder.layers.{i}.attention."
        out[f"layers.{i}.self_attn.in_proj_weight"] = torch.cat([hf[f"{a}{n}_proj.weight"] for n in "qkv"])
        out[f"layers.{i}.self_attn.in_proj_bias"] = torch.cat([hf[f"{a}{n}_proj.bias"] for n in "qkv"])
    return out


def heads_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Wav2Vec2Task heads -> ``Wav2Vec2ForPreTraining``'s (quantizer, project_q, project_hid)."""
    book = sd["quantizer.codebook"]                                     # (G, V, d)
    out = {"quantizer.codevectors": book.reshape(1, -1, book.shape[-1])}
    for p in ("weight", "bias"):
        out[f"quantizer.weight_proj.{p}"] = sd[f"quantizer.logits.{p}"]
        out[f"project_q.{p}"], out[f"project_hid.{p}"] = sd[f"project_q.{p}"], sd[f"final_proj.{p}"]
    return {k: v.detach().cpu() for k, v in out.items()}


def heads_from_hf(hf: dict[str, torch.Tensor], quant: dict) -> dict[str, torch.Tensor]:
    """``Wav2Vec2ForPreTraining`` heads -> ours; empty when the checkpoint has none (e.g. Wav2Vec2ForCTC)."""
    if "quantizer.codevectors" not in hf:
        return {}
    out = {"quantizer.codebook": hf["quantizer.codevectors"].reshape(quant["groups"], quant["entries"], -1)}
    for p in ("weight", "bias"):
        out[f"quantizer.logits.{p}"] = hf[f"quantizer.weight_proj.{p}"]
        out[f"project_q.{p}"], out[f"final_proj.{p}"] = hf[f"project_q.{p}"], hf[f"project_hid.{p}"]
    return out


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], where, optional: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; ValueError (one line) naming the first weight that has no place
    in it, has another shape, or is missing (unless its name starts with one of ``optional``)."""
    own = module.state_dict()
    for k, v in state.items():
        if k not in own:
            raise ValueError(f"{where}: weight {k} has no place in this model (another architecture?)")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: weight {k} has shape {tuple(v.shape)}, this model's is "
                             f"{tuple(own[k].shape)}: the checkpoint is another model size")
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    if missing:
        raise ValueError(f"{where}: weight {missing[0]} is missing (another architecture?)")
    module.load_state_dict(state, strict=False)


# -- checkpoint folders -------------------------------------------------------------------------

def is_hf_dir(path: str | Path) -> bool:
    """True for a transformers model folder (config.json with ``model_type``, no selfspeech ``kind``)."""
    p = Path(path) / "config.json"
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "kind" not in meta


def _load_weights(d: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its shards (model.safetensors.index.json) or pytorch_model.bin (weights only)."""
    from safetensors.torch import load_file

    if (d / "model.safetensors").is_file():
        return load_file(str(d / "model.safetensors"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(d / shard)))
        return out
    if (d / "pytorch_model.bin").is_file():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{d}: no model.safetensors or pytorch_model.bin beside config.json")


def _expected_shapes(config_dict: dict) -> dict[str, tuple]:
    """Parameter shapes of ``Wav2Vec2ForPreTraining`` for a config, built on the meta device (no memory)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    cfg = Wav2Vec2Config.from_dict({k: v for k, v in config_dict.items() if k != "model_type"})
    cfg.mask_time_prob = max(cfg.mask_time_prob, 0.05)      # so that masked_spec_embed is built
    with torch.device("meta"):
        model = Wav2Vec2ForPreTraining(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class HFCheckpoint:
    """A transformers wav2vec 2.0 folder read into our names.

    ``state``: ``encoder.*`` and (if present) the heads of :class:`Wav2Vec2Task`; ``missing``: our
    parameter prefixes the folder lacks (``encoder.mask_emb``, the heads of a fine-tuned model)."""
    encoder: EncoderConfig
    quant: dict
    state: dict
    missing: tuple[str, ...]
    config: dict


def read_hf_dir(path: str | Path) -> HFCheckpoint:
    """Read a transformers wav2vec 2.0 / XLSR folder (Wav2Vec2ForPreTraining, ForCTC or Model weights).

    ValueError with one line naming the first config field we cannot represent, or the first
    weight whose shape differs from what the config implies (another model size) or that is missing."""
    d = Path(path)
    meta = json.loads((d / "config.json").read_text())
    enc, quant = from_hf_config(meta, f"{d / 'config.json'}")
    raw = _load_weights(d)
    prefixed = any(k.startswith("wav2vec2.") for k in raw)
    body = {k[len("wav2vec2."):]: v for k, v in raw.items() if k.startswith("wav2vec2.")} if prefixed else \
        {k: v for k, v in raw.items() if not k.startswith(("quantizer.", "project_", "lm_head."))}
    heads = {k: v for k, v in raw.items() if k.startswith(("quantizer.", "project_q.", "project_hid."))}
    for old, new in (("weight_g", G_KEY), ("weight_v", V_KEY)):   # nn.utils.weight_norm's names
        if POS + old in body:
            body[new] = body.pop(POS + old)
    expected = _expected_shapes(meta)
    for k, shape in expected.items():
        name = k.removeprefix("wav2vec2.")
        have = body.get(name) if k.startswith("wav2vec2.") else heads.get(name)
        if have is None:
            if name == "masked_spec_embed" or not k.startswith("wav2vec2."):
                continue                                   # optional: our fresh ones are kept
            raise ValueError(f"{d}: weight {k} is missing; the weights do not belong to this config.json")
        if tuple(have.shape) != shape:
            raise ValueError(f"{d}: weight {k} has shape {tuple(have.shape)}, config.json implies {shape}: "
                             "the weights belong to another model size or architecture")
    extra = sorted(set(body) - {k[len("wav2vec2."):] for k in expected if k.startswith("wav2vec2.")})
    if extra:
        raise ValueError(f"{d}: weight wav2vec2.{extra[0]} has no place in a wav2vec 2.0 encoder of this "
                         "config.json (another architecture?)")
    state = {f"encoder.{k}": v for k, v in encoder_from_hf(body, enc).items()}
    state.update(heads_from_hf(heads, quant))
    missing = tuple(p for p, ok in (("encoder.mask_emb", "masked_spec_embed" in body),
                                    ("quantizer/project_q/final_proj", "quantizer.codevectors" in heads)) if not ok)
    return HFCheckpoint(enc, quant, state, missing, meta)


def hf_pretraining_config(enc: EncoderConfig, quant: dict, task: dict | None = None):
    """``Wav2Vec2Config`` of our pretraining task. Its SpecAugment settings (mask_time_prob 0.05,
    span 10: transformers' defaults) are what ``Wav2Vec2ForCTC`` fine-tuning of the export uses;
    pretraining masks are passed to ``Wav2Vec2ForPreTraining`` explicitly (``mask_time_indices``)."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(**hf_fields(enc), **quant_fields(quant, task), apply_spec_augment=True,
                          mask_time_prob=0.05, mask_time_length=10, mask_time_min_masks=2, mask_feature_prob=0.0,
                          architectures=["Wav2Vec2ForPreTraining"])


def export_hf_state(state: dict[str, torch.Tensor], enc: EncoderConfig, quant: dict, out_dir: str | Path,
                    task: dict | None = None) -> Path:
    """Write our Wav2Vec2Task weights (``state``: ``encoder.*`` + heads) as a ``Wav2Vec2ForPreTraining``
    folder (config.json, model.safetensors, preprocessor_config.json) for ``from_pretrained``.

    The folder appears complete or not at all; an existing one is replaced."""
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

    from selfspeech.data.atomic import write_dir

    config = hf_pretraining_config(enc, quant, task)
    enc_sd = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    hf_sd = {f"wav2vec2.{k}": v for k, v in encoder_to_hf(enc_sd, enc).items()}
    hf_sd.update(heads_to_hf(state))
    with torch.random.fork_rng(devices=[]):   # its random init (overwritten) must not move the caller's RNG
        hf = Wav2Vec2ForPreTraining(config).eval()
    hf.load_state_dict(hf_sd, strict=True)   # every parameter mapped, nothing left over

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        # our input normalisation (models.ssl.normalise_input): zero mean, unit variance per utterance
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=True).save_pretrained(tmp)

    return write_dir(out_dir, write)
