"""Token inventories for CTC: phones from a pronunciation lexicon, or characters.

The lexicon is ``WORD<TAB>PH1 PH2 ...`` (CMUdict style, as ``lexicon.txt`` of
speechocean762); stress digits are removed (``AH0`` -> ``AH``) and the first
pronunciation of a word is used. A transcript with a word missing from the
lexicon cannot be converted: :meth:`Lexicon.convert` reports the words, and
callers count the utterances skipped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BLANK = "<blank>"
WORD_SEP = "|"


class Lexicon:
    def __init__(self, entries: dict[str, list[str]]):
        self.entries = entries

    @classmethod
    def read(cls, path: str | Path) -> "Lexicon":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: lexicon not found (expected WORD<TAB>PHONES lines)")
        entries: dict[str, list[str]] = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected 'WORD<TAB>PHONES', got {line!r}")
            word, phones = parts[0].upper(), [re.sub(r"\d", "", p) for p in parts[1].split()]
            entries.setdefault(word, phones)  # first pronunciation wins
        return cls(entries)

    @property
    def phones(self) -> list[str]:
        return sorted({p for ph in self.entries.values() for p in ph})

    def words_of(self, text: str) -> list[str]:
        return [w for w in re.sub(r"[^A-Z' ]", " ", text.upper()).split() if w]

    def convert(self, text: str) -> tuple[list[str], list[str]]:
        """Transcript -> (phones, words missing from the lexicon)."""
        out, missing = [], []
        for w in self.words_of(text):
            if w in self.entries:
                out += self.entries[w]
            else:
                missing.append(w)
        return out, missing


@dataclass(frozen=True)
class Vocabulary:
    """CTC output symbols; index 0 is the blank."""

    kind: str                  # phone | char
    symbols: tuple[str, ...]   # without the blank

    @classmethod
    def for_phones(cls, lexicon: Lexicon) -> "Vocabulary":
        return cls("phone", tuple(lexicon.phones))

    @classmethod
    def for_chars(cls) -> "Vocabulary":
        return cls("char", tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ'") + (WORD_SEP,))

    @property
    def size(self) -> int:
        return len(self.symbols) + 1

    def tokens(self, text: str, lexicon: Lexicon | None = None) -> tuple[list[str], list[str]]:
        """Transcript -> (target tokens, problems: missing words or unknown characters)."""
        if self.kind == "phone":
            if lexicon is None:
                raise ValueError("phone targets need a lexicon")
            return lexicon.convert(text)
        words = re.sub(r"[^A-Z' ]", " ", text.upper()).split()
        toks = list(WORD_SEP.join(words))
        return toks, sorted({t for t in toks if t not in self.symbols})

    def encode(self, tokens: list[str]) -> list[int]:
        index = {s: i + 1 for i, s in enumerate(self.symbols)}
        return [index[t] for t in tokens]

    def decode(self, ids: list[int]) -> str:
        """Ids (blanks and repeats already collapsed) -> a space-separated string of words or phones."""
        toks = [self.symbols[i - 1] for i in ids if i > 0]
        if self.kind == "phone":
            return " ".join(toks)
        return " ".join(w for w in "".join(toks).split(WORD_SEP) if w)
