"""Export a wav2vec 2.0 CTC model to a transformers ``Wav2Vec2ForCTC`` directory.

The export is exact (same logits up to float rounding) for the encoder layout
transformers calls "stable layer norm" (``do_stable_layer_norm=True``, as
wav2vec 2.0 large / XLSR): the waveform front-end (``frontend: wave``, group
norm on the first conv, no conv bias) and no LayerNorm after the positional conv
(``pos_norm: false``). Our pre-LN Transformer layers, final LayerNorm, GELU
(erf), eps 1e-5 and 1/sqrt(head_dim) attention scaling are the same as theirs.

Module mapping (ours -> ``Wav2Vec2ForCTC``)::

    encoder.frontend.conv.{0,3,5,..}  -> wav2vec2.feature_extractor.conv_layers.{0..6}.conv
    encoder.frontend.conv.1 (group)   -> wav2vec2.feature_extractor.conv_layers.0.layer_norm
    encoder.feat_norm, encoder.proj   -> wav2vec2.feature_projection.{layer_norm, projection}
    encoder.mask_emb                  -> wav2vec2.masked_spec_embed (only if mask_time_prob > 0)
    encoder.pos.conv                  -> wav2vec2.encoder.pos_conv_embed.conv (weight norm, dim=2: g, v)
    encoder.layers.i.self_attn        -> .encoder.layers.i.attention.{q,k,v,out}_proj (fused qkv split)
    encoder.layers.i.norm1/norm2      -> .encoder.layers.i.layer_norm / final_layer_norm
    encoder.layers.i.linear1/linear2  -> .encoder.layers.i.feed_forward.intermediate_dense / output_dense
    encoder.out_norm                  -> wav2vec2.encoder.layer_norm
    head                              -> lm_head (blank = id 0 = pad_token_id)

Input normalisation: we divide by ``std + 1e-5``, ``Wav2Vec2FeatureExtractor``
by ``sqrt(var + 1e-7)``. The scale differs by ~1e-5/std, but the first conv has
no bias and is followed by a per-channel group norm, which removes any input
scale up to its own eps: log-probs agree to ~2e-6 (tiny models; tests use atol 1e-4).

Padding: the processor returns an attention mask (``return_attention_mask``),
unlike the wav2vec2-base checkpoints: our model was trained with lengths, i.e.
padded frames zeroed before the positional conv and never attended to, which is
what the mask does in transformers. The group norm sees the zero padding in
both. Char transcripts: transformers keeps a double space where two word
delimiters are decoded in a row; our decoder collapses it (same words).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from selfspeech.models.ssl import WAVE_CONV, EncoderConfig, read_config
from selfspeech.text.phones import WORD_SEP, Vocabulary
from selfspeech.train.checkpoint import write_dir
from selfspeech.models.ctc import load_ctc

PAD = "<pad>"   # transformers' name for the CTC blank (pad_token_id, id 0 like our blank)


def check_exportable(cfg: EncoderConfig) -> None:
    """ValueError naming the config field when ``cfg`` has no exact ``Wav2Vec2ForCTC`` equivalent."""
    where = "set it in the `encoder` config of `selfspeech pretrain` (or of finetune-ctc from scratch)"
    if cfg.frontend != "wave":
        raise ValueError(f"encoder frontend {cfg.frontend!r} cannot be exported to Wav2Vec2ForCTC, which reads "
                         f"waveforms: needs `frontend: wave`; {where}")
    if cfg.pos_norm:
        raise ValueError("encoder pos_norm=True (a LayerNorm after the positional conv) has no counterpart in "
                         f"Wav2Vec2ForCTC's stable-layer-norm encoder: needs `pos_norm: false`; {where}")


def hf_config(cfg: EncoderConfig, vocab_size: int, ctc: dict | None = None):
    """The ``Wav2Vec2Config`` of ``cfg``; ``ctc`` (CTCConfig dict) carries time masking over for further fine-tuning."""
    from transformers import Wav2Vec2Config

    ctc = ctc or {}
    mask_p = float(ctc.get("mask_time_prob", 0.05))
    return Wav2Vec2Config(
        vocab_size=vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.ff_dim, hidden_act="gelu",
        # nn.TransformerEncoderLayer uses one dropout for attention, FF activation and residuals;
        # we have none on the feature projection or before the head
        hidden_dropout=cfg.dropout, activation_dropout=cfg.dropout, attention_dropout=cfg.dropout,
        feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0, layer_norm_eps=1e-5,
        feat_extract_norm="group", feat_extract_activation="gelu", conv_bias=False,
        conv_dim=[cfg.conv_channels] * len(WAVE_CONV), conv_kernel=[k for k, _ in WAVE_CONV],
        conv_stride=[s for _, s in WAVE_CONV], num_conv_pos_embeddings=cfg.pos_kernel,
        num_conv_pos_embedding_groups=cfg.pos_groups, do_stable_layer_norm=True,
        # our fine-tuning: span masks with the learned embedding, no minimum count; our channel masks
        # act on the front-end features, theirs after the projection, so those are not carried over
        apply_spec_augment=mask_p > 0, mask_time_prob=mask_p, mask_time_length=int(ctc.get("mask_time_span", 5)),
        mask_time_min_masks=0, mask_feature_prob=0.0,
        ctc_loss_reduction="mean", ctc_zero_infinity=True,   # F.ctc_loss(reduction="mean", zero_infinity=True)
        pad_token_id=0, bos_token_id=None, eos_token_id=None, add_adapter=False)


def _kernel_norms(w: torch.Tensor) -> torch.Tensor:
    """(D, D/groups, K) -> (1, 1, K) L2 norms per tap, from the fused kernel weight_norm runs (on CPU):
    norm_except_dim sums in another order and can differ by an ulp, so the weight would too."""
    try:
        return torch._weight_norm_interface(w, torch.ones(1, 1, w.shape[2], dtype=w.dtype), 2)[1].reshape(1, 1, -1)
    except (AttributeError, RuntimeError):   # private API gone: equal to ~1e-7 relative
        return torch.norm_except_dim(w, 2, 2)


def map_state(model, with_mask_emb: bool) -> dict[str, torch.Tensor]:
    """Our ``CTCModel.state_dict()`` under ``Wav2Vec2ForCTC`` parameter names."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    w2v = "wav2vec2."
    convs = [i for i, m in enumerate(model.encoder.frontend.conv) if isinstance(m, torch.nn.Conv1d)]
    for j, i in enumerate(convs):   # Sequential(conv, group norm, GELU, conv, GELU, ...)
        out[f"{w2v}feature_extractor.conv_layers.{j}.conv.weight"] = sd[f"encoder.frontend.conv.{i}.weight"]
    for p in ("weight", "bias"):
        out[f"{w2v}feature_extractor.conv_layers.0.layer_norm.{p}"] = sd[f"encoder.frontend.conv.1.{p}"]
        out[f"{w2v}feature_projection.layer_norm.{p}"] = sd[f"encoder.feat_norm.{p}"]
        out[f"{w2v}feature_projection.projection.{p}"] = sd[f"encoder.proj.{p}"]
        out[f"{w2v}encoder.layer_norm.{p}"] = sd[f"encoder.out_norm.{p}"]
        out[f"lm_head.{p}"] = sd[f"head.{p}"]
    if with_mask_emb:
        out[f"{w2v}masked_spec_embed"] = sd["encoder.mask_emb"]
    # weight norm over dim 2: weight = v * (g / ||v||), norms over (out, in) per kernel tap. v = w and
    # g = ||w|| as the recombining kernel computes it gives back w bit for bit (g / ||v|| == 1.0)
    w = sd["encoder.pos.conv.weight"]                                   # (D, D/groups, K)
    g = _kernel_norms(w)                                                # (1, 1, K)
    v = torch.where(g == 0, torch.ones_like(w), w)                      # an all-zero tap: g = 0 keeps it 0
    pos = f"{w2v}encoder.pos_conv_embed.conv."
    out[pos + "parametrizations.weight.original0"], out[pos + "parametrizations.weight.original1"] = g, v
    out[pos + "bias"] = sd["encoder.pos.conv.bias"]
    D = model.encoder.cfg.d_model
    for i in range(model.encoder.cfg.n_layers):
        src, dst = f"encoder.layers.{i}.", f"{w2v}encoder.layers.{i}."
        qkv_w, qkv_b = sd[src + "self_attn.in_proj_weight"], sd[src + "self_attn.in_proj_bias"]   # (3D, D), (3D,)
        for n, name in enumerate("qkv"):
            out[f"{dst}attention.{name}_proj.weight"] = qkv_w[n * D:(n + 1) * D].clone()
            out[f"{dst}attention.{name}_proj.bias"] = qkv_b[n * D:(n + 1) * D].clone()
        for ours, theirs in (("self_attn.out_proj", "attention.out_proj"), ("norm1", "layer_norm"),
                             ("norm2", "final_layer_norm"), ("linear1", "feed_forward.intermediate_dense"),
                             ("linear2", "feed_forward.output_dense")):
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = sd[f"{src}{ours}.{p}"]
    return out


def hf_vocab(vocab: Vocabulary) -> dict[str, int]:
    """``vocab.json``: our ids, blank (0) named ``<pad>``."""
    if PAD in vocab.symbols:
        raise ValueError(f"symbol {PAD!r} is in the vocabulary; it names the CTC blank in transformers")
    return {PAD: 0, **{s: i + 1 for i, s in enumerate(vocab.symbols)}}


def hf_processor(vocab: Vocabulary, vocab_file: Path):
    """``Wav2Vec2Processor``: a CTC tokenizer decoding like :meth:`Vocabulary.decode` + the feature extractor."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    # no unk/bos/eos: they are not model outputs, and extra added tokens would make len(tokenizer) > vocab_size
    special = {"pad_token": PAD, "unk_token": None, "bos_token": None, "eos_token": None}
    if vocab.kind == "char":
        # "|" between words like ours; upper case in and out (our Vocabulary upper-cases transcripts)
        tok = Wav2Vec2CTCTokenizer(str(vocab_file), word_delimiter_token=WORD_SEP, do_lower_case=False, **special)
    else:
        from transformers.models.wav2vec2_phoneme import Wav2Vec2PhonemeCTCTokenizer

        # phones are multi-letter: the phoneme tokenizer splits and joins them with spaces, as our decode;
        # labels are phone strings already (no espeak)
        tok = Wav2Vec2PhonemeCTCTokenizer(str(vocab_file), do_phonemize=False, phone_delimiter_token=" ",
                                          word_delimiter_token=None, **special)
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    return Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok)


def _guard_out(out: Path, sources: list[Path]) -> None:
    """The export replaces ``out`` as a whole: refuse a folder that is not a previous export."""
    if any(out.resolve() == s.resolve() or s.resolve().is_relative_to(out.resolve()) for s in sources):
        raise ValueError(f"{out}: would replace the model being exported; choose a new folder")
    if out.exists() and any(out.iterdir()):
        cfg = out / "config.json"
        is_export = cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "wav2vec2"
        if not is_export:
            raise ValueError(f"{out}: exists and is not a Wav2Vec2 export; refusing to replace it")


def export_wav2vec2_ctc(model, out_dir: str | Path, vocab: Vocabulary | None = None,
                        ctc: dict | None = None) -> Path:
    """Write ``out_dir`` for ``Wav2Vec2ForCTC.from_pretrained`` + ``Wav2Vec2Processor.from_pretrained``.

    ``model``: a CTC model folder (``OUT/best`` of finetune-ctc), or a ``CTCModel`` with ``vocab``
    (and optionally its ``ctc`` config dict). Files: ``config.json``, ``model.safetensors``,
    ``vocab.json``, ``tokenizer_config.json``, ``preprocessor_config.json``, ``processor_config.json``.
    The folder appears complete or not at all (written beside it, then renamed).
    """
    from transformers import Wav2Vec2ForCTC


    out, sources = Path(out_dir), []
    if isinstance(model, (str, Path)):
        sources.append(Path(model))
        meta = read_config(model, "ctc")
        check_exportable(EncoderConfig(**meta["config"]))   # before loading weights: the clear error first
        model, vocab = load_ctc(model)
        ctc = ctc if ctc is not None else meta.get("ctc")
    elif vocab is None:
        raise ValueError("exporting a CTCModel object needs its Vocabulary (vocab=...)")
    enc = model.encoder.cfg
    check_exportable(enc)
    if vocab.size != model.head.out_features:
        raise ValueError(f"vocabulary of {vocab.size} symbols (with blank) for a head of {model.head.out_features}")
    _guard_out(out, sources)

    config = hf_config(enc, vocab.size, ctc)
    with torch.random.fork_rng(devices=[]):   # its random init (overwritten) must not move the caller's RNG
        hf = Wav2Vec2ForCTC(config).eval()
    state = map_state(model, with_mask_emb=hasattr(hf.wav2vec2, "masked_spec_embed"))
    hf.load_state_dict(state, strict=True)   # every parameter mapped, nothing left over

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        (tmp / "vocab.json").write_text(json.dumps(hf_vocab(vocab), ensure_ascii=False, indent=1) + "\n",
                                        encoding="utf-8")
        proc = hf_processor(vocab, tmp / "vocab.json")
        proc.save_pretrained(tmp)
        proc.feature_extractor.save_pretrained(tmp)   # preprocessor_config.json, for AutoFeatureExtractor alone

    return write_dir(out, write)
