"""Regenerate whisper_english_reference.json: OpenAI Whisper's own English normaliser run on test strings.

The expected outputs come from the ``openai-whisper`` package's ``whisper/normalizers``
(english.py, english.json, basic.py), loaded on their own: the package itself is not a
dependency (it pulls torch, tiktoken and numba), and its ``whisper/__init__`` is never run.

    pip download openai-whisper==20250625 --no-deps -d /tmp/ow && tar xzf /tmp/ow/openai_whisper-*.tar.gz -C /tmp/ow
    python tests/data/make_whisper_english_reference.py /tmp/ow/openai_whisper-20250625 [speechocean762 text file]

Needs ``regex`` and ``more_itertools`` (both come with transformers). The transcripts of a
Kaldi ``text`` file are summarised by the SHA-256 of their normalised lines (spaces
collapsed, as selfspeech's normalisers return them) plus the lines whose output is not just
the lower-cased input.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

TRICKY = [
    # numbers, ordinals, years, decimals
    "twenty five", "twenty-five", "one hundred and twenty three", "two thousand and nineteen", "nineteen ninety nine",
    "nineteen eighty four", "twenty twenty three", "in 2023", "three point one four", "3.14", "one and a half",
    "a hundred", "zero three five one", "ZERO THREE FIVE ONE", "oh five", "one two three", "1,000,000", "1.5 million",
    "version 2.0.1", "1st", "2nd", "twenty first", "the 3rd of may", "the 21st century", "first second third",
    "sixty-six", "minus five", "one", "ones", "1 dollar", "the 1990s", "the nineties", "double o seven",
    # percentages and currencies
    "10%", "ten percent", "$5.50", "five dollars and fifty cents", "£3", "€20", "fifty cents", "$0.75", "¢5",
    "100 dollars", "one dollar", "two pounds fifty", "$2 and ¢7",
    # times and units
    "it's 5 o'clock", "3 pm", "10am", "5km", "A.M.", "half past two", "CO2",
    # contractions and informal forms
    "won't", "WON'T", "can't", "y'all", "let's", "ain't", "wanna", "gonna", "gotta", "i'ma", "imma", "ma'am",
    "he's been", "she'd gone", "it's got", "it's", "they're", "i'd", "we'll", "i've", "i'm", "don't", "don’t",
    "rock 'n' roll", "'cause", "cause", "the cause of it", "because of the cause", "kinda", "sorta", "dunno",
    "woulda coulda shoulda", "he 's here",
    # British spellings
    "colour", "favourite", "realise", "organisation", "travelled", "centre", "grey", "programme", "aeroplane",
    "mum", "The COLOUR of the Centre",
    # titles and abbreviations
    "Mr. Smith", "Mrs. Jones", "Dr. Who", "St. Louis", "Prof. X", "John Smith Jr.", "Sr", "U.S.A.", "e.g. this",
    # hyphens, punctuation, brackets, fillers
    "well-known", "e-mail", "co-operate", "hello, world!", "Hello... world?", "(laughs) okay", "[noise] yes",
    "<unk> no", "hmm yes um", "uh-huh", "mm-hmm", "“quoted” text", "a - b", "x/y", "a & b", "#1 fan",
    # accents and other letters
    "café", "naïve", "Beyoncé", "crème brûlée", "Zoë", "straße", "Ærø", "œuvre", "façade", "smörgåsbord",
    "łódź", "ðþ",
    # unicode forms and whitespace
    "\U0001d400BC ＤＥＦ", "１２３", "½", "x²", "ﬁne", "a\tb\nc", "", "   ", "  padded  ",
    "WE CALL IT BEAR", "I'M GOING TO THE STORE",
]


def load_openai(root: Path):
    """OpenAI's whisper.normalizers as a standalone package (whisper/__init__ imports torch)."""
    pkg = root / "whisper" / "normalizers"
    spec = importlib.util.spec_from_file_location("openai_whisper_normalizers", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.EnglishTextNormalizer()


def main(root: str, text_file: str | None = None) -> None:
    norm = load_openai(Path(root))
    out = {"generator": "tests/data/make_whisper_english_reference.py", "source": Path(root).name,
           "english_json_sha256": hashlib.sha256((Path(root) / "whisper/normalizers/english.json").read_bytes())
           .hexdigest(), "pairs": [[s, norm(s)] for s in TRICKY]}
    if text_file:
        lines = [ln.split(None, 1) for ln in Path(text_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        texts = [t[1] if len(t) > 1 else "" for t in lines]
        outs = [norm(t) for t in texts]
        out["transcripts"] = {
            "file": "speechocean762-train/text", "count": len(texts),
            "sha256": hashlib.sha256("\n".join(" ".join(o.split()) for o in outs).encode()).hexdigest(),
            "not_lowercase": [[t, o] for t, o in zip(texts, outs) if o != t.lower()]}
    dst = Path(__file__).with_name("whisper_english_reference.json")
    dst.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {dst}: {len(out['pairs'])} pairs" + (f", {len(texts)} transcripts" if text_file else ""))


if __name__ == "__main__":
    main(*sys.argv[1:])
