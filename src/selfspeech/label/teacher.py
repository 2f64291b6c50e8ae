"""Whisper teachers: one small strategy class per backend, same output.

Both backends take a list of 16 kHz mono float32 waveforms and return one
:class:`Hypothesis` per waveform, with the quantities Whisper's own fallback
rules use (Radford et al. 2022, sec. 4.5): average log-probability of the
tokens, gzip compression ratio of the text, and the no-speech probability.

- :class:`FasterWhisperTeacher`: CTranslate2 (int8 on CPU), batched across
  utterances through faster-whisper's batched pipeline
  (``BatchedInferencePipeline.generate_segment_batched``), greedy by default.
- :class:`TransformersTeacher`: any transformers Whisper checkpoint (a
  fine-tuned student, say), batched ``generate``.

Both decode at temperature 0 without fallback: a bad label is flagged by the
filters in :mod:`selfspeech.label.filters`, not silently re-sampled.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
MAX_SECONDS = 30.0  # Whisper's window; longer utterances are flagged, not split


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
    """

    language: str = "en"
    beam_size: int = 1
    max_new_tokens: int = 128
    window_s: float = 15.0

    def __post_init__(self):
        if not 1.0 <= self.window_s <= 30.0:
            raise ValueError(f"window_s={self.window_s}: the encoder window must be within 1..30 s")


class FasterWhisperTeacher:
    """CTranslate2 Whisper through faster-whisper, batched across utterances."""

    backend = "faster-whisper"

    def __init__(self, ct2_dir: str | Path, compute_type: str = "int8", cpu_threads: int = 0,
                 options: DecodeOptions = DecodeOptions()):
        from faster_whisper import BatchedInferencePipeline, WhisperModel
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import TranscriptionOptions, get_suppressed_tokens

        self.model = WhisperModel(str(ct2_dir), device="cpu", compute_type=compute_type, cpu_threads=cpu_threads)
        self.pipeline = BatchedInferencePipeline(self.model)
        multilingual = self.model.model.is_multilingual
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe",
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
        segs, _ = self.model.transcribe(wav, language="en", beam_size=self.decode_options.beam_size,
                                        temperature=0.0, without_timestamps=True,
                                        condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segs).strip()


class TransformersTeacher:
    """Any transformers Whisper checkpoint, batched ``generate`` on 30-s padded features."""

    backend = "transformers"

    def __init__(self, hf_dir: str | Path, options: DecodeOptions = DecodeOptions(), dtype: str = "float32"):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.torch = torch
        self.processor = WhisperProcessor.from_pretrained(str(hf_dir))
        self.model = WhisperForConditionalGeneration.from_pretrained(
            str(hf_dir), dtype=getattr(torch, dtype), use_safetensors=True).eval()
        self.options = options
        tok = self.processor.tokenizer
        self.multilingual = ".en" not in str(getattr(self.model.config, "_name_or_path", "")) and \
            self.model.config.vocab_size >= 51865
        vocab = tok.get_vocab()
        self.no_speech_id = vocab.get("<|nospeech|>", vocab.get("<|nocaptions|>"))
        self.sot_id = self.model.config.decoder_start_token_id

    def transcribe(self, wavs: list[np.ndarray]) -> list[Hypothesis]:
        torch = self.torch
        t0 = time.perf_counter()
        feats = self.processor.feature_extractor(wavs, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        kw = dict(language=self.options.language, task="transcribe") if self.multilingual else {}
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
            avg_lp = (trans.masked_fill(~keep, 0).sum(1) / keep.sum(1).clamp(min=1)).tolist()
            if self.no_speech_id is not None:
                sot = torch.full((len(wavs), 1), self.sot_id, dtype=torch.long)
                logits = self.model(encoder_outputs=enc, decoder_input_ids=sot).logits[:, 0]
                nsp = logits.float().softmax(-1)[:, self.no_speech_id].tolist()
            else:
                nsp = [0.0] * len(wavs)
        texts = [t.strip() for t in self.processor.tokenizer.batch_decode(gen, skip_special_tokens=True)]
        shares = _shares(wavs, time.perf_counter() - t0)
        return [Hypothesis(t, float(a), compression_ratio(t), float(p), s) for t, a, p, s in zip(texts, avg_lp, nsp, shares)]


def load_teacher(name_or_path: str, backend: str = "faster-whisper", compute_type: str = "int8",
                 options: DecodeOptions = DecodeOptions(), cpu_threads: int = 0):
    """A teacher from a zoo name (``whisper-base``) or a model directory.

    ``faster-whisper`` needs a CTranslate2 directory (zoo names have one);
    ``transformers`` takes any Whisper checkpoint directory.
    """
    from selfspeech.models.zoo import resolve_model

    paths = resolve_model(name_or_path)
    if backend == "faster-whisper":
        if paths.ct2_dir is None:
            raise ValueError(f"{name_or_path}: no CTranslate2 directory; use --backend transformers, or "
                             "`selfspeech export --to ctranslate2` first")
        return FasterWhisperTeacher(paths.ct2_dir, compute_type=compute_type, cpu_threads=cpu_threads, options=options)
    if backend == "transformers":
        if paths.hf_dir is None:
            raise ValueError(f"{name_or_path}: no transformers checkpoint directory")
        return TransformersTeacher(paths.hf_dir, options=options)
    raise ValueError(f"unknown backend {backend!r}; choose faster-whisper or transformers")
