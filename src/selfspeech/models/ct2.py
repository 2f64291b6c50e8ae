"""CTranslate2 (faster-whisper) Whisper -> Hugging Face transformers Whisper, losslessly.

``model.bin`` (``ctranslate2/specs/model_spec.py::_serialize``), little-endian; ``str`` is
a u16 length counting a trailing NUL, then the bytes::

    u32 version (4..6); str spec_name; u32 spec_revision
    u32 n; n x [str name, u8 rank, u32 dims[rank], u8 dtype_id, u32 n_bytes, bytes]
    u32 n_aliases; n_aliases x [str alias, str target]

dtype ids: float32, int8, int16, int32, float16, bfloat16. Versions < 4 predate
CTranslate2's Whisper support (3.x writes 5 or 6), so they are refused.

Only float weights are converted: float16/bfloat16 -> float32 is exact, while int8/int16
weights already lost information and would make a silently worse model.
"""
from __future__ import annotations

import json
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from selfspeech.data.atomic import atomic_dir

__all__ = ["Ct2FormatError", "WhisperDims", "ct2_to_hf", "read_ct2_model_bin", "shared_dir"]

_DTYPE_BY_ID = (np.float32, np.int8, np.int16, np.int32, np.float16, "bfloat16")


class Ct2FormatError(ValueError):
    """A model.bin that is not a readable, losslessly convertible CTranslate2 Whisper model."""


@contextmanager
def shared_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """:func:`selfspeech.data.atomic.atomic_dir` for a model cache: refuses an existing ``out`` unless
    ``overwrite``, and leaves files 0644 / directories 0755 so that the cache is shareable."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass overwrite=True to replace it)")
    with atomic_dir(out) as tmp:
        yield tmp
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        tmp.chmod(0o755)


def read_ct2_model_bin(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin``: ``(spec_name, {name: array}, {alias: target})``.

    Arrays keep their stored dtype and shape (bfloat16 is widened to float32, which
    is exact). Aliases, which CTranslate2 writes for tensors equal to an earlier one
    (Whisper's tied output projection, a fresh model's all-zero biases), are resolved
    into the dict as well, pointing at the same array.
    """
    path = Path(path)
    buf = memoryview(path.read_bytes())  # one read, then zero-copy views: ~0.1 s for Whisper base
    pos = 0

    def take(fmt: str, n: int | None = None):
        """Next scalar of struct format ``fmt``, or with ``n`` the next n raw bytes."""
        nonlocal pos
        size = struct.calcsize("<" + fmt) if n is None else n
        if pos + size > len(buf):
            raise Ct2FormatError(f"{path}: truncated at byte {pos}")
        pos += size
        return buf[pos - size:pos] if n is not None else struct.unpack_from("<" + fmt, buf, pos - size)[0]

    def string() -> str:
        return bytes(take("", take("H"))).rstrip(b"\0").decode("utf-8")

    try:
        version = take("I")
        if not 4 <= version <= 6:
            raise Ct2FormatError(f"{path}: CTranslate2 binary version {version} unsupported (know 4-6)")
        spec_name = string()
        take("I")  # spec revision: unused, the weight names below are checked instead
        weights: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = string()
            shape = [take("I") for _ in range(take("B"))]
            dtype = _DTYPE_BY_ID[take("B")]
            raw = take("", take("I"))
            if dtype == "bfloat16":  # bfloat16 is the upper half of a float32
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype)
            weights[name] = arr.reshape(shape)
        aliases = {string(): string() for _ in range(take("I"))}
    except Ct2FormatError:
        raise
    except (struct.error, IndexError, KeyError, ValueError) as e:  # bad dtype id, utf-8, shape
        raise Ct2FormatError(f"{path}: not a CTranslate2 model.bin ({type(e).__name__}: {e})") from None
    for alias, target in aliases.items():
        weights.setdefault(alias, weights[target])
    return spec_name, weights, aliases


@dataclass(frozen=True)
class WhisperDims:
    """Architecture sizes read off the tensors (the CTranslate2 config.json does not carry them)."""

    n_mels: int          # conv1 input channels: 80, or 128 for large-v3
    d_model: int
    encoder_heads: int
    decoder_heads: int
    encoder_layers: int
    decoder_layers: int
    ffn_dim: int
    vocab_size: int      # 51864 English-only, 51865 multilingual, 51866 large-v3
    audio_ctx: int       # encoder positions: 1500 frames = 30 s
    text_ctx: int        # decoder positions: 448 tokens

    @classmethod
    def from_weights(cls, w: dict[str, np.ndarray]) -> "WhisperDims":
        def n_layers(side: str) -> int:
            return len({m.group(1) for k in w if (m := re.match(rf"{side}/layer_(\d+)/", k))})

        def heads(side: str, d_model: int) -> int:
            v = w.get(f"{side}/num_heads")  # absent in old spec revisions: Whisper uses 64-dim heads
            return int(v) if v is not None and v.size == 1 else d_model // 64

        d_model, n_mels, _ = w["encoder/conv1/weight"].shape
        return cls(n_mels=n_mels, d_model=d_model,
                   encoder_heads=heads("encoder", d_model), decoder_heads=heads("decoder", d_model),
                   encoder_layers=n_layers("encoder"), decoder_layers=n_layers("decoder"),
                   ffn_dim=w["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                   vocab_size=w["decoder/embeddings/weight"].shape[0],
                   audio_ctx=w["encoder/position_encodings/encodings"].shape[0],
                   text_ctx=w["decoder/position_encodings/encodings"].shape[0])

    @property
    def is_multilingual(self) -> bool:
        return self.vocab_size >= 51865  # openai/whisper's own rule


# Per layer: (transformers suffix, CTranslate2 scope, row block). CTranslate2 fuses self-attention
# q|k|v into one (3*d_model, d_model) matrix and cross-attention k|v into (2*d_model, d_model);
# block i is rows [i*d_model, (i+1)*d_model). LN marks a layer norm (gamma/beta -> weight/bias).
LN = -1
_SELF = [("self_attn.q_proj", "self_attention/linear_0", 0), ("self_attn.k_proj", "self_attention/linear_0", 1),
         ("self_attn.v_proj", "self_attention/linear_0", 2), ("self_attn.out_proj", "self_attention/linear_1", None),
         ("self_attn_layer_norm", "self_attention/layer_norm", LN)]
_CROSS = [("encoder_attn.q_proj", "attention/linear_0", None), ("encoder_attn.k_proj", "attention/linear_1", 0),
          ("encoder_attn.v_proj", "attention/linear_1", 1), ("encoder_attn.out_proj", "attention/linear_2", None),
          ("encoder_attn_layer_norm", "attention/layer_norm", LN)]
_FFN = [("fc1", "ffn/linear_0", None), ("fc2", "ffn/linear_1", None), ("final_layer_norm", "ffn/layer_norm", LN)]


def ct2_state_dict(w: dict[str, np.ndarray], dims: WhisperDims) -> dict:
    """transformers ``WhisperForConditionalGeneration`` state dict, float32, proj_out left tied.

    Shapes are kept as stored: linear (out, in), conv (d_model, in_channels, 3),
    positions (audio_ctx | text_ctx, d_model), token embeddings (vocab_size, d_model).
    """
    import torch

    def f32(a: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.array(a, dtype=np.float32))  # copy: frombuffer views are read-only

    plan = [("model.encoder.conv1", "encoder/conv1", None), ("model.encoder.conv2", "encoder/conv2", None),
            ("model.encoder.layer_norm", "encoder/layer_norm", LN), ("model.decoder.layer_norm", "decoder/layer_norm", LN)]
    plan += [(f"model.encoder.layers.{i}.{hf}", f"encoder/layer_{i}/{ct}", blk)
             for i in range(dims.encoder_layers) for hf, ct, blk in _SELF + _FFN]
    plan += [(f"model.decoder.layers.{i}.{hf}", f"decoder/layer_{i}/{ct}", blk)
             for i in range(dims.decoder_layers) for hf, ct, blk in _SELF + _CROSS + _FFN]
    sd: dict[str, torch.Tensor] = {}
    for hf, ct, block in plan:
        if block == LN:
            sd[hf + ".weight"], sd[hf + ".bias"] = f32(w[ct + "/gamma"]), f32(w[ct + "/beta"])
            continue
        weight, bias = w[ct + "/weight"], w[ct + "/bias"]
        if block is not None:
            rows = slice(block * dims.d_model, (block + 1) * dims.d_model)
            weight, bias = weight[rows], bias[rows]
        sd[hf + ".weight"] = f32(weight)
        if not hf.endswith("k_proj"):
            sd[hf + ".bias"] = f32(bias)
        elif np.any(bias != 0):  # Whisper keys have no bias: CTranslate2 fused in zeros
            raise Ct2FormatError(f"{ct}: non-zero key bias, not a Whisper model")
    for hf, ct in (("encoder.embed_positions", "encoder/position_encodings/encodings"),
                   ("decoder.embed_positions", "decoder/position_encodings/encodings"),
                   ("decoder.embed_tokens", "decoder/embeddings/weight")):
        sd[f"model.{hf}.weight"] = f32(w[ct])
    proj = w.get("decoder/projection/weight")
    if proj is not None and not np.array_equal(proj, w["decoder/embeddings/weight"]):
        raise Ct2FormatError("output projection is not tied to the token embeddings: not a Whisper model")
    return sd


def _generation_config(dims: WhisperDims, ct2cfg: dict, tok: dict, multilingual: bool):
    """Generation defaults as in openai/whisper-* on the hub; language ids are the tokens
    between <|startoftranscript|> and <|translate|>, so ``generate(language="en")`` works."""
    from transformers import GenerationConfig

    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    ids.update({k: v for k, v in tok["model"]["vocab"].items() if k.startswith("<|")})
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    gen = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
        bos_token_id=eot if multilingual else sot,
        max_length=dims.text_ctx, is_multilingual=multilingual, return_timestamps=False,
        suppress_tokens=list(ct2cfg.get("suppress_ids") or []),  # null when converted from a bare model
        begin_suppress_tokens=list(ct2cfg.get("suppress_ids_begin") or [220, eot]),
        max_initial_timestamp_index=50)
    if heads := ct2cfg.get("alignment_heads"):
        gen.alignment_heads = [list(h) for h in heads]
    for attr, token in (("no_timestamps_token_id", "<|notimestamps|>"), ("prev_sot_token_id", "<|startofprev|>")):
        if token in ids:
            setattr(gen, attr, ids[token])
    if multilingual and "<|translate|>" in ids:
        gen.lang_to_id = {t: i for t, i in sorted(ids.items(), key=lambda x: x[1])
                          if sot < i < ids["<|translate|>"]}
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return gen


def ct2_to_hf(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              multilingual: bool | None = None, overwrite: bool = False) -> Path:
    """Write a transformers Whisper checkpoint for the CTranslate2 model in ``ct2_dir``.

    ``ct2_dir`` holds model.bin, config.json and tokenizer.json (a faster-whisper dir).
    ``out_dir`` gets config.json, generation_config.json, model.safetensors (float32,
    bit-exact upcast), tokenizer and preprocessor files. It is built in a temporary
    sibling and renamed into place, so it either exists complete or not at all.
    ``multilingual`` defaults to Whisper's vocabulary-size rule.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import (WhisperConfig, WhisperFeatureExtractor,
                              WhisperForConditionalGeneration, WhisperTokenizerFast)

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:  # fail before the slow part, shared_dir re-checks
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True to replace it)")
    for f in ("model.bin", "tokenizer.json"):
        if not (ct2_dir / f).is_file():
            raise FileNotFoundError(f"{ct2_dir / f} missing: need a CTranslate2 Whisper directory")
    spec, w, _ = read_ct2_model_bin(ct2_dir / "model.bin")
    if spec != "WhisperSpec":
        raise Ct2FormatError(f"{ct2_dir}: spec {spec!r} is not a Whisper model")
    if quant := sorted(k for k, v in w.items() if k.endswith("_scale") or (k.endswith("/weight") and v.dtype.kind in "iu")):
        raise Ct2FormatError(f"{ct2_dir}: weights are integer-quantized (e.g. {quant[0]!r}); converting them would "
                             "be lossy. Use a float16/float32 CTranslate2 model (quantization=float16).")
    dims = WhisperDims.from_weights(w)
    ct2cfg = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    tok_json = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    multilingual = dims.is_multilingual if multilingual is None else multilingual
    gen = _generation_config(dims, ct2cfg, tok_json, multilingual)

    cfg = WhisperConfig(
        vocab_size=dims.vocab_size, num_mel_bins=dims.n_mels, d_model=dims.d_model, encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers, encoder_attention_heads=dims.encoder_heads,
        decoder_attention_heads=dims.decoder_heads, encoder_ffn_dim=dims.ffn_dim, decoder_ffn_dim=dims.ffn_dim,
        max_source_positions=dims.audio_ctx, max_target_positions=dims.text_ctx, tie_word_embeddings=True,
        **{k: getattr(gen, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                                        "suppress_tokens", "begin_suppress_tokens")})
    sd = ct2_state_dict(w, dims)
    with torch.device("meta"):  # names/shapes only: no random init of a model we overwrite
        expected = WhisperForConditionalGeneration(cfg).state_dict()
    expected.pop("proj_out.weight")  # tied to embed_tokens, not stored (as save_pretrained does)
    wrong = sorted(set(expected) ^ set(sd)) + [k for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if wrong:
        raise Ct2FormatError(f"{ct2_dir}: weights do not fit transformers' Whisper: {wrong[:5]}")

    with shared_dir(out_dir, overwrite) as tmp:
        cfg.save_pretrained(tmp)
        gen.save_pretrained(tmp)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # OpenAI's hub tokenizers pad with <|endoftext|>; without a pad token transformers'
        # ASR pipeline refuses to batch.
        WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"), pad_token="<|endoftext|>",
                             unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>").save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=dims.n_mels).save_pretrained(tmp)
    return out_dir
