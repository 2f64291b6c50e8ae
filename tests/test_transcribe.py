"""label/transcribe.py: one decode loop for CTC and Whisper; an unreadable utterance gets a failed line, the rest are decoded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import tone

from selfspeech.audio.io import AudioError
from selfspeech.label.transcribe import transcribe_ctc, transcribe_items, transcribe_whisper


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _manifest(root: Path, name: str, broken_at: int | None) -> tuple[Path, list[dict]]:
    """Three tones (0.6-1.2 s); with ``broken_at``, an empty audio file inserted at that position."""
    items = []
    for i in range(3):
        p = root / f"t{i}.wav"
        sf.write(p, tone(0.6 + 0.3 * i, freq=180 + 90 * i, seed=i), 16000)
        items.append({"id": f"t{i}", "audio_filepath": str(p), "duration": 0.6 + 0.3 * i})
    if broken_at is not None:
        (root / "broken.wav").write_bytes(b"")
        items.insert(broken_at, {"id": "broken", "audio_filepath": str(root / "broken.wav"), "duration": 1.0})
    m = root / f"{name}.jsonl"
    m.write_text("".join(json.dumps(it) + "\n" for it in items))
    return m, items


def _check_failed_line_in_the_middle(hyps: list[dict], clean: list[dict], items: list[dict]) -> None:
    assert [h["id"] for h in hyps] == [it["id"] for it in items]
    assert hyps[1]["status"] == "failed" and hyps[1]["text"] == "" and "broken" in hyps[1]["reason"]
    others = [h for k, h in enumerate(hyps) if k != 1]
    assert all("status" not in h for h in others)
    assert others == clean           # the same text as a run without the broken utterance


def test_transcribe_items_writes_failed_lines_and_decodes_the_rest(tmp_path):
    items = [{"id": f"u{i}"} for i in range(5)]
    calls = []

    def load(i):
        if i in (1, 3, 4):
            raise AudioError(f"u{i}: unreadable audio")
        return f"x{i}"

    def decode(xs):
        calls.append(xs)
        return [x.upper() for x in xs]

    out = transcribe_items(items, load, decode, [[0, 1, 2], [3, 4]], tmp_path / "h.jsonl")
    assert calls == [["x0", "x2"]]                      # a batch with nothing readable is not decoded
    assert _lines(out) == [{"id": "u0", "text": "X0"},
                           {"id": "u1", "text": "", "status": "failed", "reason": "u1: unreadable audio"},
                           {"id": "u2", "text": "X2"},
                           {"id": "u3", "text": "", "status": "failed", "reason": "u3: unreadable audio"},
                           {"id": "u4", "text": "", "status": "failed", "reason": "u4: unreadable audio"}]
    with pytest.raises(ValueError):                     # only the given errors become failed lines
        transcribe_items(items, lambda i: int("x"), decode, [[0]], tmp_path / "h2.jsonl")


def test_ctc_transcription_fails_one_line_and_decodes_the_others(tmp_path):
    from selfspeech.models.ctc import CTCModel
    from selfspeech.models.ssl import EncoderConfig, save_encoder
    from selfspeech.text.phones import Vocabulary

    torch.manual_seed(0)
    vocab, enc = Vocabulary.for_chars(), EncoderConfig.preset("tiny")
    model = CTCModel(enc, vocab.size)
    save_encoder(model, enc, tmp_path / "ctc", kind="ctc",
                 extra={"vocab": {"kind": vocab.kind, "symbols": list(vocab.symbols)}})
    m, items = _manifest(tmp_path, "m", broken_at=1)
    clean, _ = _manifest(tmp_path, "clean", broken_at=None)
    for beam in (0, 3):
        hyps = _lines(transcribe_ctc(tmp_path / "ctc", m, tmp_path / f"h{beam}.jsonl", beam=beam))
        ref = _lines(transcribe_ctc(tmp_path / "ctc", clean, tmp_path / f"c{beam}.jsonl", beam=beam))
        _check_failed_line_in_the_middle(hyps, ref, items)
        assert any(h["text"] for h in ref)               # a random output layer emits non-blank symbols


def test_whisper_transcription_fails_one_line_and_decodes_the_others(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.transcribe as T

    decoded = []   # batch sizes the decoder saw (a random Whisper may well emit empty text)
    orig = T.greedy_decode
    monkeypatch.setattr(T, "greedy_decode", lambda model, x, *a: decoded.append(len(x)) or orig(model, x, *a))
    m, items = _manifest(tmp_path, "m", broken_at=1)
    clean, _ = _manifest(tmp_path, "clean", broken_at=None)
    hyps = _lines(transcribe_whisper(tiny_whisper_dir, m, tmp_path / "h.jsonl", max_new_tokens=4))
    ref = _lines(transcribe_whisper(tiny_whisper_dir, clean, tmp_path / "c.jsonl", max_new_tokens=4))
    _check_failed_line_in_the_middle(hyps, ref, items)
    assert decoded == [3, 3]        # the three readable utterances, in one batch, in both runs
    # trimmed input (the student's default) decodes the same utterances, in the same shape
    trimmed = _lines(transcribe_whisper(tiny_whisper_dir, m, tmp_path / "t.jsonl", trim_input=True, max_new_tokens=4))
    assert [h.get("status") for h in trimmed] == [None, "failed", None, None]
