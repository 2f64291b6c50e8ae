"""Whisper teachers: one small strategy class per backend, same output.

Both backends take a list of 16 kHz mono float32 waveforms and return one
:class:`Hypothesis` per waveform, with the quantities Whisper's own fallback
rules use (Radford et al. 2022, sec. 4.5): average log-probability of the
tokens, gzip compression ratio of the text, and the no-speech probability.

- :class:`FasterWhisperTeacher`: CTranslate2 (int8 on a CPU, float16 on a
  CUDA GPU by default), batched across utterances through faster-whisper's
  batched pipeline (``BatchedInferencePipeline.generate_segment_batched``),
  greedy by default.
- :class:`TransformersTeacher`: any transformers Whisper checkpoint (a
  fine-tuned student, say), batched ``generate`` with PyTorch's SDPA attention
  (float32 on a CPU, bfloat16 on a CUDA GPU by default).

Both take ``device`` (``cpu``, ``cuda``, ``cuda:N``: :func:`selfspeech.accel.resolve_device`)
and a compute type checked against it by :func:`resolve_compute_type` before
any model file is opened.

Both decode at temperature 0 without fallback: a bad label is flagged by the
filters in :mod:`selfspeech.label.filters`, not silently re-sampled.
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfspeech.accel import DeviceError, cuda_summary, resolve_device

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's window: longer utterances are refused before labelling (data.segment)


@dataclass(frozen=True)
class Hypothesis:
    text: str
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    decode_seconds: float  # this utterance's share of its batch's wall time (by duration)


def compression_ratio(text: str) -> float:
    """len(utf-8 bytes) / len(zlib-compressed bytes): > 2.4 signals a repetition loop."""
    b = text.encode("utf-8")
    return len(b) / len(zlib.compress(b)) if b else 0.0


def _shares(wavs: list[np.ndarray], seconds: float) -> list[float]:
    dur = np.array([max(len(w), 1) for w in wavs], dtype=np.float64)
    return list(seconds * dur / dur.sum())


@dataclass(frozen=True)
class DecodeOptions:
    """How a teacher decodes.

    ``window_s`` is the encoder window of the faster-whisper backend: each batch is
    padded to its longest utterance + 0.5 s, but never below ``window_s`` nor above
    Whisper's 30 s. 30 means the standard fully padded window. Whisper is trained on
    30-s windows only, so very short windows break it (measured on 120 adult
    utterances, whisper-base WER 34% at 30 s, 34% at 10 s, 95% at 5 s; tiny.en 40%,
    44%, 71%); 15 s kept both models' WER at the 30-s level while encoding half the
    frames, hence the default (see benchmarks/RESULTS.md, "encoder window").

    ``language`` and ``task`` (transcribe, or translate into English) go into the
    decoder prompt of multilingual models; English-only (``.en``) models take only
    English transcription (:func:`selfspeech.models.sources.check_language`).
    """

    language: str = "en"
    beam_size: int = 1
    max_new_tokens: int = 128
    window_s: float = 15.0
    task: str = "transcribe"

    def __post_init__(self):
        if not 1.0 <= self.window_s <= 30.0:
            raise ValueError(f"window_s={self.window_s}: the encoder window must be within 1..30 s")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task {self.task!r}: choose transcribe or translate (translate: into English)")


CT2_COMPUTE_TYPES = ("auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16",
                     "float32")
TORCH_COMPUTE_TYPES = ("auto", "float32", "bfloat16", "float16")
CPU_COMPUTE_TYPES = {"faster-whisper": "int8, int8_float32 or float32", "transformers": "float32 or bfloat16"}


def resolve_compute_type(spec: str | None, device: torch.device, backend: str = "faster-whisper",
                         key: str = "compute_type") -> str:
    """The numeric type a teacher decodes in on ``device``; ValueError/DeviceError (one line) when it cannot.

    ``auto``: faster-whisper int8 on a CPU (CTranslate2's fastest CPU kernels) and
    float16 on a GPU; transformers float32 on a CPU and bfloat16 on a GPU that has
    it (float16 otherwise). Half-precision types are refused on a CPU.
    """
    s = (spec or "auto").strip().lower()
    names = CT2_COMPUTE_TYPES if backend == "faster-whisper" else TORCH_COMPUTE_TYPES
    if s not in names:
        hint = " (int8 types are CTranslate2's: use --backend faster-whisper)" if s.startswith("int8") else ""
        raise ValueError(f"{key} {spec!r}: not a {backend} compute type{hint}; use {', '.join(names)}")
    cuda = device.type == "cuda"
    if backend == "faster-whisper":
        supported = _ct2_cuda_types(device) if cuda else None
        if s == "auto":  # float16 where CTranslate2 has its kernels for this GPU (compute capability >= 5.3)
            return ("float16" if supported is None or "float16" in supported else "float32") if cuda else "int8"
        if supported is not None and s not in supported:
            raise DeviceError(f"{key} {s}: CTranslate2 cannot run it on {device} "
                              f"(it can: {', '.join(sorted(supported))}); use auto")
    elif s == "auto":
        return ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32"
    cpu_bf16 = backend == "transformers" and s == "bfloat16"  # torch runs bfloat16 on CPUs; CTranslate2 not
    if not cuda and s.endswith("float16") and not cpu_bf16:  # float16, bfloat16, int8_float16, int8_bfloat16
        raise DeviceError(f"{key} {s} on {device}: half precision needs a CUDA GPU ({cuda_summary()}); "
                          f"on a CPU use {CPU_COMPUTE_TYPES[backend]} (or auto)")
    if cuda and s == "bfloat16" and backend == "transformers" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"{key} bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float16")
    return s


def _ct2_cuda_types(device: torch.device) -> set[str] | None:
    """The compute types CTranslate2 (its own CUDA build and kernels) runs on this GPU; None if it cannot say."""
    import ctranslate2

    try:
        n = ctranslate2.get_cuda_device_count()
        supported = ctranslate2.get_supported_compute_types("cuda", device.index or 0) if n else None
    except RuntimeError:  # its CUDA libraries are missing: WhisperModel names the one when it loads
        return None
    if not n:
        raise DeviceError(f"device {device}: CTranslate2 {ctranslate2.__version__} sees no CUDA device "
                          "(a CPU-only build?); install its CUDA build, use --backend transformers, or --device cpu")
    return set(supported)


class FasterWhisperTeacher:
    """CTranslate2 Whisper through faster-whisper, batched across utterances.

    ``device``: cpu, cuda or cuda:N; ``compute_type``: auto (int8 on a CPU, float16
    on a GPU) or one of :data:`CT2_COMPUTE_TYPES` the device runs.
    """

    backend = "faster-whisper"

    def __init__(self, ct2_dir: str | Path, compute_type: str = "auto", cpu_threads: int = 0,
                 options: DecodeOptions = DecodeOptions(), device: str | torch.device = "cpu"):
        from faster_whisper import BatchedInferencePipeline, WhisperModel
        from faster_whisper.feature_extractor import FeatureExtractor
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import TranscriptionOptions, get_suppressed_tokens

        self.device = resolve_device(device)
        self.compute_type = resolve_compute_type(compute_type, self.device, self.backend)
        self.model = WhisperModel(str(ct2_dir), device=self.device.type, device_index=self.device.index or 0,
                                  compute_type=self.compute_type, cpu_threads=cpu_threads)
        n_mels = self.model.model.n_mels  # a CTranslate2 folder without preprocessor_config.json gets 80 bins
        if self.model.feature_extractor.mel_filters.shape[0] != n_mels:
            self.model.feature_extractor = FeatureExtractor(feature_size=n_mels)
        self.pipeline = BatchedInferencePipeline(self.model)
        multilingual = self.model.model.is_multilingual
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task=options.task,
                                   language=options.language if multilingual else "en")
        # The same values WhisperModel.transcribe uses, at one temperature (no fallback).
        self.options = TranscriptionOptions(
            beam_size=options.beam_size, best_of=1, patience=1.0, length_penalty=1.0, repetition_penalty=1.0,
            no_repeat_ngram_size=0, log_prob_threshold=None, no_speech_threshold=None,
            compression_ratio_threshold=None, condition_on_previous_text=False, prompt_reset_on_temperature=0.5,
            temperatures=[0.0], initial_prompt=None, prefix=None, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(self.tokenizer, [-1]), without_timestamps=True,
            max_initial_timestamp=0.0, word_timestamps=False, prepend_punctuations="\"'“¿([{-",
            append_punctuations="\"'.。,，!！?？:：”)]}、", multilingual=False,
            max_new_tokens=options.max_new_tokens, clip_timestamps="0", hallucination_silence_threshold=None,
            hotwords=None,
        )
        self.decode_options = options

    def features(self, wavs: list[np.ndarray]) -> np.ndarray:
        """(B, n_mels, F) log-mel of a batch, padded with zeros to one window of F frames.

        F = max(window_s, longest + 0.5 s), at most 3000 (30 s): the CTranslate2
        encoder takes any F <= 3000 and slices its positional embeddings, so short
        utterances need not pay for 30 s of padding (the cost that dominates on CPU).
        """
        from faster_whisper.audio import pad_or_trim

        mels = [self.model.feature_extractor(w)[..., :-1] for w in wavs]
        frames = max(m.shape[-1] for m in mels) + 50
        frames = min(3000, max(frames, int(round(self.decode_options.window_s * 100))))
        return np.stack([pad_or_trim(m, frames) for m in mels])

    def transcribe(self, wavs: list[np.ndarray]) -> list[Hypothesis]:
        t0 = time.perf_counter()
        feats = self.features(wavs)
        _, outs = self.pipeline.generate_segment_batched(feats, self.tokenizer, self.options)
        texts = [self.tokenizer.decode([t for t in o["tokens"] if t < self.tokenizer.eot]).strip() for o in outs]
        shares = _shares(wavs, time.perf_counter() - t0)
        return [Hypothesis(t, float(o["avg_logprob"]), compression_ratio(t), float(o["no_speech_prob"]), s)
                for t, o, s in zip(texts, outs, shares)]

    def transcribe_sequential(self, wav: np.ndarray) -> str:
        """One utterance through WhisperModel.transcribe (the one-at-a-time baseline of the benchmark)."""
        segs, _ = self.model.transcribe(wav, language=self.tokenizer.language_code,
                                        task=self.decode_options.task, beam_size=self.decode_options.beam_size,
                                        temperature=0.0, without_timestamps=True,
                                        condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segs).strip()


class TransformersTeacher:
    """Any transformers Whisper checkpoint, batched ``generate`` on 30-s padded features.

    ``dtype``: auto (float32 on a CPU, bfloat16 on a GPU that has it), float32,
    bfloat16 or float16 (GPU only). Attention runs through PyTorch's
    ``scaled_dot_product_attention`` (fused kernels on GPUs).
    """

    backend = "transformers"

    def __init__(self, hf_dir: str | Path, options: DecodeOptions = DecodeOptions(), dtype: str = "auto",
                 device: str | torch.device = "cpu"):
        from selfspeech.models.whisper import load_for_inference, load_processor

        self.device = resolve_device(device)
        self.compute_type = resolve_compute_type(dtype, self.device, self.backend)
        self.dtype = getattr(torch, self.compute_type)
        self.processor = load_processor(hf_dir, options.language, options.task)  # the model's mel bins
        self.model = load_for_inference(hf_dir, self.device, self.dtype)
        self.options = options
        tok = self.processor.tokenizer
        self.multilingual = ".en" not in str(getattr(self.model.config, "_name_or_path", "")) and \
            self.model.config.vocab_size >= 51865
        vocab = tok.get_vocab()
        self.no_speech_id = vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>"))
        self.sot_id = self.model.config.decoder_start_token_id

    def transcribe(self, wavs: list[np.ndarray]) -> list[Hypothesis]:
        t0 = time.perf_counter()
        feats = self.processor.feature_extractor(wavs, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        feats = feats.to(self.device, self.dtype)
        kw = dict(language=self.options.language, task=self.options.task) if self.multilingual else {}
        with torch.inference_mode():
            enc = self.model.get_encoder()(feats)
            out = self.model.generate(encoder_outputs=enc, num_beams=self.options.beam_size, do_sample=False,
                                      max_new_tokens=self.options.max_new_tokens, return_dict_in_generate=True,
                                      output_scores=True, **kw)
            trans = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            n_prompt = out.sequences.shape[1] - trans.shape[1]
            gen = out.sequences[:, n_prompt:]
            eos = self.model.generation_config.eos_token_id
            keep = torch.cumsum((gen == eos).long(), 1) - (gen == eos).long() == 0  # tokens up to and incl. first EOT
            avg_lp = (trans.float().masked_fill(~keep, 0).sum(1) / keep.sum(1).clamp(min=1)).tolist()
            if self.no_speech_id is not None:
                sot = torch.full((len(wavs), 1), self.sot_id, dtype=torch.long, device=self.device)
                logits = self.model(encoder_outputs=enc, decoder_input_ids=sot).logits[:, 0]
                nsp = logits.float().softmax(-1)[:, self.no_speech_id].tolist()
            else:
                nsp = [0.0] * len(wavs)
        texts = [t.strip() for t in self.processor.tokenizer.batch_decode(gen, skip_special_tokens=True)]
        shares = _shares(wavs, time.perf_counter() - t0)
        return [Hypothesis(t, float(a), compression_ratio(t), float(p), s) for t, a, p, s in zip(texts, avg_lp, nsp, shares)]


def load_teacher(name_or_path: str, backend: str = "faster-whisper", compute_type: str = "auto",
                 options: DecodeOptions = DecodeOptions(), cpu_threads: int = 0, device: str | torch.device = "cpu"):
    """A teacher from a zoo name (``whisper-base``) or a model directory, on ``device``.

    ``faster-whisper`` needs a CTranslate2 directory (zoo names have one);
    ``transformers`` takes any Whisper checkpoint directory. The device and the
    compute type are checked before the model is looked up; the language and task
    against the model before its weights are loaded.
    """
    from selfspeech.models.sources import check_language, inspect_dir
    from selfspeech.models.zoo import check_source, resolve_model

    if backend not in CPU_COMPUTE_TYPES:
        raise ValueError(f"unknown backend {backend!r}; choose faster-whisper or transformers")
    device = resolve_device(device)
    compute_type = resolve_compute_type(compute_type, device, backend)
    check_source(name_or_path, options.language, options.task)  # before any download
    paths = resolve_model(name_or_path)
    code = check_language(name_or_path, inspect_dir(paths.hf_dir, name_or_path).multilingual, options.language,
                          options.task)
    options = dataclasses.replace(options, language=code)  # faster-whisper takes codes only: German -> de
    if backend == "faster-whisper":
        if paths.ct2_dir is None:
            raise ValueError(f"{name_or_path}: no CTranslate2 directory; use --backend transformers, or "
                             "`selfspeech export --to ctranslate2` first")
        return FasterWhisperTeacher(paths.ct2_dir, compute_type, cpu_threads, options, device)
    if paths.hf_dir is None:
        raise ValueError(f"{name_or_path}: no transformers checkpoint directory")
    return TransformersTeacher(paths.hf_dir, options=options, dtype=compute_type, device=device)
