"""Label-free quality filters for pseudo-labels.

Defaults are Whisper's own fallback thresholds (Radford et al. 2022, sec. 4.5;
``compression_ratio_threshold=2.4``, ``logprob_threshold=-1.0``,
``no_speech_threshold=0.6`` in openai/whisper's transcribe()). A label that
fails a rule is kept and flagged, so reports can count it and a training
recipe can choose to drop it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FilterConfig:
    max_compression_ratio: float = 2.4  # above: repetition loop
    min_avg_logprob: float = -1.0       # below: the teacher is unsure
    max_no_speech_prob: float = 0.6     # above: probably no speech


def flags_for(text: str, avg_logprob: float, compression_ratio: float, no_speech_prob: float,
              cfg: FilterConfig = FilterConfig()) -> list[str]:
    """Names of the rules a label fails (empty list: a clean label)."""
    flags = []
    if not text.strip():
        flags.append("empty")
    if compression_ratio > cfg.max_compression_ratio:
        flags.append("repetition")
    if avg_logprob < cfg.min_avg_logprob:
        flags.append("low_logprob")
    if no_speech_prob > cfg.max_no_speech_prob:
        flags.append("no_speech")
    return flags
