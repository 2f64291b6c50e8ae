"""Export a wav2vec 2.0 CTC model to a transformers ``Wav2Vec2ForCTC`` directory.

The export is exact (same logits up to float rounding) for the two wav2vec 2.0
layouts transformers has (:mod:`selfspeech.models.hf_wav2vec2`): "stable layer
norm" (``do_stable_layer_norm=True``, wav2vec 2.0 large / XLSR: ``pos_norm: false``,
pre-LN layers) and base (``post_ln: true``, ``pos_norm: true``), with the
waveform front-end (``frontend: wave``, group or layer norm, with or without conv
bias). GELU (erf), eps 1e-5 and 1/sqrt(head_dim) attention scaling are the same.

Module mapping (ours -> ``Wav2Vec2ForCTC``, large layout; see models.hf_wav2vec2)::

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

from selfspeech.models.hf_wav2vec2 import check_representable, encoder_to_hf, hf_fields
from selfspeech.models.ssl import EncoderConfig, read_config
from selfspeech.text.phones import WORD_SEP, Vocabulary
from selfspeech.train.checkpoint import write_dir
from selfspeech.models.ctc import load_ctc

PAD = "<pad>"   # transformers' name for the CTC blank (pad_token_id, id 0 like our blank)


def check_exportable(cfg: EncoderConfig) -> None:
    """ValueError naming the config field when ``cfg`` has no exact ``Wav2Vec2ForCTC`` equivalent."""
    check_representable(cfg)


def hf_config(cfg: EncoderConfig, vocab_size: int, ctc: dict | None = None):
    """The ``Wav2Vec2Config`` of ``cfg``; ``ctc`` (CTCConfig dict) carries time masking over for further fine-tuning."""
    from transformers import Wav2Vec2Config

    ctc = ctc or {}
    mask_p = float(ctc.get("mask_time_prob", 0.05))
    return Wav2Vec2Config(
        **hf_fields(cfg), vocab_size=vocab_size, final_dropout=0.0,   # no dropout before our head
        # our fine-tuning: span masks with the learned embedding, no minimum count; our channel masks
        # act on the front-end features, theirs after the projection, so those are not carried over
        apply_spec_augment=mask_p > 0, mask_time_prob=mask_p, mask_time_length=int(ctc.get("mask_time_span", 5)),
        mask_time_min_masks=0, mask_feature_prob=0.0,
        ctc_loss_reduction="mean", ctc_zero_infinity=True,   # F.ctc_loss(reduction="mean", zero_infinity=True)
        pad_token_id=0, bos_token_id=None, eos_token_id=None)


def map_state(model, with_mask_emb: bool) -> dict[str, torch.Tensor]:
    """Our ``CTCModel.state_dict()`` under ``Wav2Vec2ForCTC`` parameter names."""
    enc = {k: v for k, v in model.encoder.state_dict().items() if with_mask_emb or k != "mask_emb"}
    out = {f"wav2vec2.{k}": v for k, v in encoder_to_hf(enc, model.encoder.cfg).items()}
    out.update({f"lm_head.{p}": model.head.state_dict()[p].detach().cpu() for p in ("weight", "bias")})
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
