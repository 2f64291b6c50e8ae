"""Whisper model pieces on trimmed input: encoder without 30-s padding, greedy decoding.

transformers' ``WhisperEncoder.forward`` (5.23) raises unless ``input_features``
has exactly ``2 * max_source_positions`` = 3000 frames and always adds all 1500
positional embeddings. :func:`encode` runs the encoder's own modules (conv1,
conv2, layers, layer_norm) on any even number of frames <= 3000 with the first
T/2 positional embeddings, the slice a 30-s input uses for its first T/2
positions; on 3000 frames it equals the stock forward bit for bit (tested).
Nothing in the model is patched: checkpoints stay plain ``save_pretrained``
directories. Zero-shot Whisper must still be decoded on 30-s input (trimmed,
tiny.en falls to ~98% WER); a fine-tuned student adapts within an epoch.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfspeech.accel import module_device, resolve_device

SAMPLE_RATE = 16_000
MAX_FRAMES = 3000  # Whisper's 30-s window at 100 frames/s


def encode(model, input_features: torch.Tensor) -> torch.Tensor:
    """Whisper encoder on (B, n_mels, T) log-mels, T even and <= 3000 -> (B, T/2, d_model).

    Mirrors ``WhisperEncoder.forward`` of transformers 5.23 minus its
    ``T == 3000`` check, with positional embeddings sliced to T/2 (see module doc).
    """
    enc = model.get_encoder()
    T = input_features.shape[-1]
    if T % 2 or T > 2 * enc.embed_positions.num_embeddings:
        raise ValueError(f"need an even number of frames <= {2 * enc.embed_positions.num_embeddings}, got {T}")
    x = F.gelu(enc.conv1(input_features))
    x = F.gelu(enc.conv2(x)).permute(0, 2, 1)                 # (B, T/2, D)
    x = x + enc.embed_positions.weight[: x.shape[1]]
    x = F.dropout(x, p=enc.dropout, training=enc.training)
    for layer in enc.layers:
        if enc.training and enc.layerdrop > 0 and torch.rand([]) < enc.layerdrop:
            continue  # LayerDrop, as the stock forward
        x = layer(x, None)
    return enc.layer_norm(x)


def log_mel(feature_extractor, wav: np.ndarray) -> torch.Tensor:
    """(T,) 16 kHz waveform -> (n_mels, len(wav) // 160) log-mel, no 30-s padding."""
    return torch.from_numpy(feature_extractor(wav, sampling_rate=SAMPLE_RATE, padding="longest",
                                              return_tensors="np").input_features[0])


def pad_features(feats: list[torch.Tensor], trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (n_mels, T_i) -> ((B, n_mels, T) float32, (B,) int64 lengths).

    T = longest rounded up to even (trim) or 3000. Padding uses each utterance's
    own floor, max - 2: the extractor clamps log-mel to max - 8 and maps x ->
    (x + 4) / 4, so that is the value 30-s zero padding gets.
    """
    feats = [f[:, :MAX_FRAMES] for f in feats]
    lengths = torch.tensor([f.shape[-1] for f in feats], dtype=torch.int64)
    T = int(lengths.max()) + int(lengths.max()) % 2 if trim else MAX_FRAMES
    x = torch.stack([F.pad(f, (0, T - f.shape[-1]), value=float(f.max()) - 2.0) for f in feats])
    return x, lengths


def load_for_inference(model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A Whisper checkpoint in eval mode on ``device``, attention through PyTorch's
    ``scaled_dot_product_attention`` (fused flash/memory-efficient kernels on GPUs).

    A LoRA adapter folder (:mod:`selfspeech.models.lora`) is merged into its base:
    decoding then costs what the full model's does."""
    from transformers import WhisperForConditionalGeneration

    from selfspeech.models.lora import config_folder, is_adapter_dir, merge_into

    lora = is_adapter_dir(model_dir)
    model = WhisperForConditionalGeneration.from_pretrained(
        str(config_folder(model_dir)), dtype=torch.float32 if lora else dtype, use_safetensors=True,
        attn_implementation="sdpa")
    if lora:
        model = merge_into(model, model_dir).to(dtype)  # W + (alpha / r) B A in fp32, then the asked dtype
    return model.to(resolve_device(device)).eval()


def load_processor(model_dir: str | Path, language: str = "en", task: str = "transcribe"):
    """WhisperProcessor whose tokenizer prefix is ``<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>``.

    Its feature extractor computes the model's own number of mel bins (``num_mel_bins``:
    80, or 128 for large-v3), also for a folder without ``preprocessor_config.json`` or
    with one copied from another model. An English-only model with another language
    or ``translate`` is refused (ModelError, one line) before any weight is read.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    from selfspeech.models.sources import check_language, inspect_dir

    d = Path(model_dir)
    info = inspect_dir(d, need_weights=False)
    code = check_language(str(d), info.multilingual, language, task)
    n_mels = WhisperConfig.from_pretrained(str(d)).num_mel_bins
    if (d / "preprocessor_config.json").is_file():
        processor = WhisperProcessor.from_pretrained(str(d))
    else:
        processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=n_mels), WhisperTokenizerFast.from_pretrained(str(d)))
    if processor.feature_extractor.feature_size != n_mels:  # 80-bin features would not fit large-v3's conv1
        processor.feature_extractor = WhisperFeatureExtractor(feature_size=n_mels)
    if info.multilingual:
        processor.tokenizer.set_prefix_tokens(language=code, task=task, predict_timestamps=False)
    return processor


# Greedy decoding of a fine-tuned student can fall into a loop on one utterance ("very very very ..."
# up to the token cap): one such hypothesis adds ~127 insertions, several WER points on a few hundred
# short utterances. Whisper's own remedy (Radford et al. 2022, sec. 4.5: compression-ratio check and
# temperature fallback) re-decodes with sampling; a greedy student instead stops at the loop.
MAX_REPEATS = 4   # an n-gram repeated this many times in a row is a loop (speech rarely says a word 4x)
MAX_LOOP_NGRAM = 4


def loop_cut(ids: list[int], max_repeats: int = MAX_REPEATS, max_ngram: int = MAX_LOOP_NGRAM) -> int | None:
    """Tokens to keep if ``ids`` ends in a decoding loop, else None.

    A loop: the last n tokens (1 <= n <= ``max_ngram``, smallest n first) repeated ``max_repeats``
    times in a row. One copy is kept: ``[a, b, b, b, b]`` -> 2 with ``max_repeats=4``. The rule
    reads only the tokens emitted so far, so stopping when it first fires and cutting gives the
    same hypothesis as applying it to the finished token list at the first position it fires.
    ``max_repeats < 2``: never.
    """
    L = len(ids)
    if max_repeats < 2:
        return None
    for n in range(1, max_ngram + 1):
        if n * max_repeats > L:
            break
        gram = ids[L - n:]
        if all(ids[L - (k + 1) * n: L - k * n] == gram for k in range(1, max_repeats)):
            return L - (max_repeats - 1) * n
    return None


def cut_loops(ids: list[int], max_repeats: int = MAX_REPEATS, max_ngram: int = MAX_LOOP_NGRAM) -> list[int]:
    """``ids`` up to where :func:`greedy_decode` would have stopped it: at the first loop, one copy kept."""
    for t in range(1, len(ids) + 1):
        cut = loop_cut(ids[:t], max_repeats, max_ngram)
        if cut is not None:
            return ids[:cut]
    return list(ids)


@torch.inference_mode()
def greedy_decode(model, input_features: torch.Tensor, prefix: list[int], max_new_tokens: int = 128,
                  max_repeats: int = 0) -> list[list[int]]:
    """Greedy decoding with a KV cache: (B, n_mels, T) -> B token lists (prefix and EOT excluded).

    Runs on the model's device and dtype (the features are moved there); the
    token lists come back as plain Python lists. Suppresses
    ``generation_config.suppress_tokens`` at every step and
    ``begin_suppress_tokens`` at the first, as Whisper's decoder does.
    ``max_repeats >= 2``: a row that ends in a loop (:func:`loop_cut`) stops there, one copy
    of the repeated n-gram kept; 0 decodes to EOT or ``max_new_tokens``.
    """
    from transformers.modeling_outputs import BaseModelOutput

    dev = module_device(model)
    gc, B = model.generation_config, input_features.shape[0]
    eot = gc.eos_token_id if isinstance(gc.eos_token_id, int) else gc.eos_token_id[0]
    x = input_features.to(dev, next(model.parameters()).dtype)
    enc = BaseModelOutput(last_hidden_state=encode(model, x))
    suppress = torch.tensor(list(gc.suppress_tokens or []), dtype=torch.long, device=dev)
    begin = torch.tensor(list(gc.begin_suppress_tokens or []), dtype=torch.long, device=dev)
    step_in, cache = torch.tensor([prefix] * B, dtype=torch.long, device=dev), None
    rows: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B   # at EOT, or stopped at a loop: later steps feed EOT
    for t in range(max_new_tokens):
        out = model(encoder_outputs=enc, decoder_input_ids=step_in, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1].float()
        logits[:, suppress] = -math.inf
        if t == 0:
            logits[:, begin] = -math.inf
        nxt = logits.argmax(-1).masked_fill(torch.tensor(finished, device=dev), eot)
        for b, tok in enumerate(nxt.tolist()):
            if finished[b] or tok == eot:
                finished[b] = True
                continue
            rows[b].append(tok)
            cut = loop_cut(rows[b], max_repeats)
            if cut is not None:
                del rows[b][cut:]
                finished[b] = True
        if all(finished):
            break
        step_in, cache = nxt[:, None], out.past_key_values
    return rows
