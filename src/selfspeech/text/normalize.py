"""One text normaliser for references and hypotheses alike.

WER is only comparable when both sides pass through the same function, and
Pseudo2Real needs real and pseudo transcripts in one style before training,
or the task vector learns casing and punctuation instead of acoustics.

``whisper_english`` (default) is OpenAI Whisper's English normaliser
(Radford et al. 2022, appendix C; ``whisper/normalizers/english.py``), rule for
rule: lower-casing, bracketed and parenthesised spans and the fillers hmm, mm,
mhm, mmm, uh, um removed, OpenAI's list of contractions and titles expanded
(won't, y'all, mr, ...; nothing else, e.g. the noun "cause" stays), symbols and
diacritics dropped, spelled-out numbers and currencies written as digits
("twenty five" -> 25, "five dollars and fifty cents" -> $5.50), British spellings made
American with OpenAI's table. The rules are transformers'
``EnglishTextNormalizer`` (a verbatim port of OpenAI's code); the spelling
table is OpenAI's ``english.json``, shipped here as
``whisper_english_spelling.json`` (MIT licence beside it), so the output does
not depend on which normaliser packages are installed. The only difference from
OpenAI's function is that leading and trailing spaces are dropped (every
normaliser here joins words with one space). Tested against OpenAI's own
outputs (tests/data/whisper_english_reference.json).

``basic`` lower-cases, strips punctuation and collapses spaces; ``none`` keeps
the text as it is.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable

NORMALIZERS = ("whisper_english", "basic", "none")
SPELLING_TABLE = "whisper_english_spelling.json"  # OpenAI Whisper's whisper/normalizers/english.json


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


def _whisper_english() -> Callable[[str], str]:
    """OpenAI Whisper's English normaliser: transformers' port of its rules with OpenAI's spelling table."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    path = resources.files(__package__).joinpath(SPELLING_TABLE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: OpenAI's spelling table is missing from this selfspeech install; "
                                "reinstall selfspeech from a build that includes its package data")
    return EnglishTextNormalizer(json.loads(path.read_text(encoding="utf-8")))


@lru_cache(maxsize=None)
def get_normalizer(name: str = "whisper_english") -> Normalizer:
    """Return the named normaliser; raises ValueError for an unknown name."""
    if name == "whisper_english":
        return Normalizer(name, _whisper_english())
    if name == "basic":
        return Normalizer(name, _basic)
    if name == "none":
        return Normalizer(name, lambda t: t)
    raise ValueError(f"unknown normaliser {name!r}; choose one of {', '.join(NORMALIZERS)}")
