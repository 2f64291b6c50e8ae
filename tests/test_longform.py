"""Long recordings joined from utterances: lengths, pauses and the references' offsets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from selfspeech.audio.io import load_item
from selfspeech.data.longform import LongFormConfig, join_recordings
from selfspeech.data.manifest import read_manifest, write_manifest


def _utts(tmp_path, speakers=2, per=6, seconds=1.0):
    items = []
    for s in range(speakers):
        for u in range(per):
            n = int(16000 * (seconds + 0.1 * u))
            t = np.arange(n) / 16000
            wav = (0.3 * np.sin(2 * np.pi * (200 + 50 * s + 10 * u) * t)).astype(np.float32)
            p = tmp_path / f"s{s}u{u}.flac"
            sf.write(p, wav, 16000)
            items.append({"id": f"s{s}u{u}", "audio_filepath": str(p), "duration": n / 16000, "speaker": f"s{s}",
                          "text": f"word {u}"})
    return items


def test_recordings_hold_every_utterance_where_the_reference_says(tmp_path):
    items = _utts(tmp_path)
    cfg = LongFormConfig(min_seconds=3.0, max_seconds=5.0, pause_seconds=(0.3, 0.6), seed=1)
    recs, refs = join_recordings(items, tmp_path / "lf", cfg)
    recs, refs = list(read_manifest(recs)), list(read_manifest(refs))
    assert sorted(r["id"] for r in refs) == sorted(i["id"] for i in items)   # all speech kept, once
    assert all("text" not in r and "speaker" not in r for r in recs)        # what a user's folder gives
    assert all(r["duration"] <= 5.0 + 1e-6 for r in recs)
    assert all(r["recording"].startswith(r["speaker"]) for r in refs)       # one speaker per recording
    # speakers one after another: fewer, longer recordings, every utterance still where the reference says
    mixed = list(read_manifest(join_recordings(items, tmp_path / "mix", LongFormConfig(
        min_seconds=8.0, max_seconds=12.0, pause_seconds=(0.3, 0.6), per_speaker=False, seed=1))[1]))
    assert sorted(r["id"] for r in mixed) == sorted(i["id"] for i in items)
    assert len({r["recording"] for r in mixed}) < len({r["recording"] for r in refs})
    assert any(len({m["speaker"] for m in mixed if m["recording"] == rec}) == 2 for rec in {m["recording"] for m in mixed})
    lengths = [r["duration"] for r in read_manifest(tmp_path / "mix" / "recordings.jsonl")]
    assert all(8.0 <= d <= 12.0 + 1.6 for d in lengths[:-1]), lengths  # the real length, pauses included
    by_id = {i["id"]: i for i in items}
    for r in refs:  # the reference's offset cuts out exactly the original utterance
        assert np.allclose(load_item(r), load_item(by_id[r["id"]]), atol=1e-4), r["id"]
    # consecutive utterances of a recording are separated by a pause in the configured range
    for rec in {r["recording"] for r in refs}:
        spans = sorted((r["offset"], r["offset"] + r["duration"]) for r in refs if r["recording"] == rec)
        gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:])]
        assert all(0.3 - 1e-3 <= g <= 0.6 + 1e-3 for g in gaps), gaps


def test_noise_condition_keeps_offsets_and_is_deterministic(tmp_path):
    items = _utts(tmp_path, speakers=1, per=4)
    cfg = LongFormConfig(min_seconds=2.0, max_seconds=10.0, snr_db=10.0, seed=3)
    a = list(read_manifest(join_recordings(items, tmp_path / "a", cfg)[1]))
    b = list(read_manifest(join_recordings(items, tmp_path / "b", cfg)[1]))
    assert [(r["id"], r["offset"]) for r in a] == [(r["id"], r["offset"]) for r in b]
    wa, _ = sf.read(a[0]["audio_filepath"])
    wb, _ = sf.read(b[0]["audio_filepath"])
    assert np.array_equal(wa, wb) and np.std(wa[:1000]) > 0.01  # the pauses are noisy
    write_manifest(tmp_path / "x.jsonl", a)


def test_speech_coverage_and_recording_wer():
    from selfspeech.eval.longform import recording_texts, recording_wer, speech_coverage

    refs = [{"id": "u1", "audio_filepath": "/r/a.flac", "offset": 1.0, "duration": 2.0, "text": "the cat"},
            {"id": "u2", "audio_filepath": "/r/a.flac", "offset": 4.0, "duration": 2.0, "text": "sat down"},
            {"id": "u3", "audio_filepath": "/r/b.flac", "offset": 0.0, "duration": 1.0, "text": "hello"}]
    segs = [{"id": "a_1", "audio_filepath": "/r/a.flac", "offset": 0.5, "duration": 2.0},   # covers 1.5 of u1
            {"id": "a_2", "audio_filepath": "/r/a.flac", "offset": 2.0, "duration": 5.0},   # the rest of u1, all u2
            {"id": "a_3", "audio_filepath": "/r/a.flac", "offset": 2.5, "duration": 1.0}]   # overlaps: not twice
    assert abs(speech_coverage(refs, segs) - 4.0 / 5.0) < 1e-9   # b.flac's second is not covered
    ref = recording_texts(refs, {r["id"]: r["text"] for r in refs})
    assert ref == {"/r/a.flac": "the cat sat down", "/r/b.flac": "hello"}
    hyp = recording_texts(segs, {"a_1": "the", "a_2": "cat sat down"})  # a sentence cut in two costs nothing
    assert recording_wer(ref, hyp) == 1 / 5                              # b.flac missing: one deletion


def test_speech_span_trims_the_silence_around_a_sentence(tmp_path):
    from selfspeech.eval.longform import speech_span

    wav = np.zeros(16000 * 3, np.float32)
    t = np.arange(16000) / 16000
    wav[16000:32000] = 0.3 * np.sin(2 * np.pi * 220 * t)          # speech from 1 s to 2 s
    wav += 1e-4 * np.random.default_rng(0).standard_normal(len(wav)).astype(np.float32)
    sf.write(tmp_path / "u.wav", wav, 16000)
    sp = speech_span({"id": "u", "audio_filepath": str(tmp_path / "u.wav"), "offset": 0.0, "duration": 3.0})
    assert abs(sp["offset"] - 1.0) < 0.03 and abs(sp["offset"] + sp["duration"] - 2.0) < 0.03


def test_demo_long_form_adapts_to_segments_without_text_or_speakers(tmp_path, tiny_whisper_dir, monkeypatch):
    """``demo --long-form``'s path on a tiny eSpeak corpus: recordings -> import-dir -> segment -> adapt with
    neither transcripts nor speakers; the held-out speakers' recordings scored per recording afterwards."""
    from test_adapt import WordTeacher

    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.recipe import recipe_from_dict
    from selfspeech.data.synth import make_accent_corpus
    from selfspeech.demo import DemoConfig
    from selfspeech.demo_long import adapt_long_form

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    m = make_accent_corpus(tmp_path / "corpus", ("us", "scottish"), 6, 3, seed=0, progress=False)
    recipe = recipe_from_dict({
        "name": "tiny", "device": "cpu",
        "data": {"manifest": str(m), "source_rule": "accent==us", "target_rule": "accent==scottish",
                 "source_parts": {"train": 3, "dev": 1, "sim": 2}, "target_parts": {"adapt": 4, "eval": 2},
                 "dev_fraction": 0.5},
        "teacher": {"name": str(tiny_whisper_dir), "drop_flagged": False},
        "student": {"init": str(tiny_whisper_dir), "max_new_tokens": 6,
                    "finetune": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "max_new_tokens": 6}},
        "lambda": {"grid": [0.0, 1.0], "oracle_sweep": False}, "systems": ["pseudo_ft", "p2r"]})
    md = adapt_long_form(DemoConfig(long_form=True, device="cpu"), recipe, tmp_path / "lf", log=lambda m: None,
                         progress=False)
    target = list(read_manifest(tmp_path / "lf" / "target" / "segments.jsonl"))
    assert target and all("text" not in t and "speaker" not in t and "offset" in t for t in target)
    assert "neither transcripts nor speakers" in md and "| p2r |" in md and "| teacher |" in md
    report = (tmp_path / "lf" / "run" / "report.md").read_text()
    assert "no target WER can be measured" in report


def test_recordings_from_a_relative_folder_are_found_again(tmp_path, monkeypatch):
    items = _utts(tmp_path, speakers=1, per=2)
    monkeypatch.chdir(tmp_path)
    recs, refs = join_recordings(items, "rel", LongFormConfig(min_seconds=1.0, max_seconds=10.0))
    for r in list(read_manifest(recs)) + list(read_manifest(refs)):
        assert Path(r["audio_filepath"]).is_absolute() and Path(r["audio_filepath"]).is_file()
