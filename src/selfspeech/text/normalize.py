"""One text normaliser for references and hypotheses alike.

WER is only comparable when both sides pass through the same function, and
Pseudo2Real needs real and pseudo transcripts in one style before training,
or the task vector learns casing and punctuation instead of acoustics.

``whisper_english`` (default) is OpenAI Whisper's English normaliser from the
whisper-normalizer package (spelling standardisation, numbers, contractions);
``basic`` lower-cases, strips punctuation and collapses spaces; ``none`` keeps
the text as it is.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

NORMALIZERS = ("whisper_english", "basic", "none")


@dataclass(frozen=True)
class Normalizer:
    name: str
    fn: Callable[[str], str]

    def __call__(self, text: str) -> str:
        return " ".join(self.fn(text or "").split())


def _basic(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # quotes, not apostrophes


@lru_cache(maxsize=None)
def get_normalizer(name: str = "whisper_english") -> Normalizer:
    """Return the named normaliser; raises ValueError for an unknown name."""
    if name == "whisper_english":
        from whisper_normalizer.english import EnglishTextNormalizer

        whisper = EnglishTextNormalizer()
        # NFKC first: Whisper's normaliser lower-cases before its own NFKC step, so compatibility
        # letters (math bold, full-width) would come out upper-case (found by fuzzing)
        return Normalizer(name, lambda t: whisper(unicodedata.normalize("NFKC", t)))
    if name == "basic":
        return Normalizer(name, _basic)
    if name == "none":
        return Normalizer(name, lambda t: t)
    raise ValueError(f"unknown normaliser {name!r}; choose one of {', '.join(NORMALIZERS)}")
