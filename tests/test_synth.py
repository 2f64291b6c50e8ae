"""eSpeak NG synthesis and the synthetic accent corpus (small sizes: runs in a few seconds)."""
from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader")

from selfspeech.data import synth  # noqa: E402
from selfspeech.data.manifest import read_manifest  # noqa: E402
from selfspeech.data.sentences import SENTENCES, assign_sentences  # noqa: E402

TEXT = "The kettle is boiling on the stove."
ACCENTS = ("us", "scottish")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return synth.make_accent_corpus(out, ACCENTS, speakers_per_accent=3, utts_per_speaker=2, seed=0,
                                    progress=False)


def test_synthesize_is_plausible_speech():
    wav = synth.synthesize(TEXT)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert np.isfinite(wav).all() and np.abs(wav).max() <= 1.0
    assert np.sqrt(np.mean(wav**2)) > 0.01  # not silent
    assert 1.0 < wav.size / synth.SAMPLE_RATE < 5.0  # seven words


def test_synthesize_rate_and_sample_rate():
    slow = synth.synthesize(TEXT, rate=100)
    fast = synth.synthesize(TEXT, rate=250)
    assert slow.size > 1.5 * fast.size
    native = synth.synthesize(TEXT, sample_rate=22050)
    assert abs(native.size / 22050 - synth.synthesize(TEXT).size / 16000) < 0.01


@pytest.mark.parametrize("voice", ["en-us+m1", "en-us+f2"])  # f2 is breathy: libc rand() noise
def test_synthesize_is_deterministic_whatever_came_before(voice):
    a = synth.synthesize(TEXT, voice, 150, 40, 70)
    synth.synthesize("Something else entirely, in another voice.", "de+f3")
    ctypes.CDLL(None).rand()
    b = synth.synthesize(TEXT, voice, 150, 40, 70)
    np.testing.assert_array_equal(a, b)


def test_synthesize_is_deterministic_across_processes():
    # Another process has another heap and another libc rand() history.
    code = ("import hashlib; from selfspeech.data import synth; "
            "print(hashlib.md5(synth.synthesize(%r, 'en-gb+f2', 150, 40, 70).tobytes()).hexdigest())" % TEXT)
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = hashlib.md5(synth.synthesize(TEXT, "en-gb+f2", 150, 40, 70).tobytes()).hexdigest()
    assert other.stdout.strip() == here


def test_voice_aliases_resolve():
    # espeak_SetVoiceByName itself rejects language codes such as en-gb.
    for voice in ("en-gb", "en-gb+m3", "EN-US", "fr-fr", "en-gb-scotland+f2"):
        assert synth.synthesize("Hello there.", voice).size > 0


@pytest.mark.parametrize("voice", ["xx-nowhere", "en-us+nosuchvariant"])
def test_missing_voice_is_a_clear_error(voice):
    with pytest.raises(synth.VoiceNotFoundError) as err:
        synth.synthesize("Hello.", voice)
    msg = str(err.value)
    assert repr(voice) in msg and "en-us" in msg and "en-gb-scotland" in msg and "m3" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        synth.synthesize("   ")
    with pytest.raises(ValueError, match="unknown accent 'martian'.*scottish"):
        synth.get_accent("martian")


def test_default_accents_exist():
    assert synth.DEFAULT_SOURCE_ACCENT in synth.ACCENTS and synth.DEFAULT_TARGET_ACCENT in synth.ACCENTS
    assert {"en-us", "en-gb-scotland", "en-029", "de"} <= set(synth.available_voices())
    assert {"m1", "f5"} <= set(synth.available_variants())
    for acc in synth.ACCENTS.values():  # every accent's voice loads ("fr" is an alias of fr-fr)
        assert synth.synthesize("Yes.", acc.voice).size > 0


def test_corpus_manifest(corpus):
    items = list(read_manifest(corpus))
    assert len(items) == len(ACCENTS) * 3 * 2
    assert Counter(i["group"] for i in items) == {a: 6 for a in ACCENTS}
    assert len({i["id"] for i in items}) == len(items)
    for acc in ACCENTS:
        mine = [i for i in items if i["accent"] == acc]
        assert len({i["speaker"] for i in mine}) == 3
        assert all(i["group"] == acc and i["voice"].startswith(synth.ACCENTS[acc].voice + "+") for i in mine)
    assert len({i["text"] for i in items}) == len(items)  # small corpus: every sentence once
    for i in items:
        info = sf.info(i["audio_filepath"])
        assert info.samplerate == 16000 and info.channels == 1
        assert i["duration"] == pytest.approx(info.frames / 16000, abs=1e-3) and i["duration"] > 0.5
        assert i["text"] in SENTENCES and 25 <= i["snr_db"] <= 40
    raw = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert all(not r["audio_filepath"].startswith("/") for r in raw)  # relative: folder can move


def test_corpus_is_reproducible_and_resumable(corpus, tmp_path):
    again = synth.make_accent_corpus(tmp_path, ACCENTS, speakers_per_accent=3, utts_per_speaker=2, seed=0,
                                     progress=False)
    assert again.read_text() == corpus.read_text()
    first = [i["audio_filepath"] for i in read_manifest(corpus)]
    second = [i["audio_filepath"] for i in read_manifest(again)]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(sf.read(a)[0], sf.read(b)[0])
    # resume: a missing file is re-made identically, the rest kept
    victim = tmp_path / json.loads(again.read_text().splitlines()[3])["audio_filepath"]
    victim.unlink()
    synth.make_accent_corpus(tmp_path, ACCENTS, speakers_per_accent=3, utts_per_speaker=2, seed=0,
                             progress=False)
    np.testing.assert_array_equal(sf.read(victim)[0], sf.read(first[3])[0])
    with pytest.raises(ValueError, match="other settings"):
        synth.make_accent_corpus(tmp_path, ACCENTS, speakers_per_accent=3, utts_per_speaker=2, seed=1,
                                 progress=False)


def test_speakers_differ_and_are_seeded():
    spk = synth.make_speakers("us", 6, seed=0)
    assert spk == synth.make_speakers("us", 6, seed=0)
    assert len({s.voice for s in spk}) == 6
    assert [s.voice.split("+")[1][0] for s in spk] == ["m", "f"] * 3
    assert spk != synth.make_speakers("us", 6, seed=1)


def test_assign_sentences_keeps_speakers_apart():
    # fits: nothing repeats anywhere
    blocks = assign_sentences(2, 6, 10)
    flat = [s for acc in blocks for spk in acc for s in spk]
    assert len(flat) == 120 and len(set(flat)) == 120
    assert blocks == assign_sentences(2, 6, 10) and blocks != assign_sentences(2, 6, 10, seed=1)
    # too many for disjoint accents: disjoint within an accent, block k shared across accents
    blocks = assign_sentences(3, 10, 20)
    for acc in blocks:
        assert len({s for spk in acc for s in spk}) == 200
    assert blocks[0] == blocks[1]
    # too many even for one accent: warns and wraps
    with pytest.warns(UserWarning, match="share sentences"):
        blocks = assign_sentences(1, 40, 10)
    assert len(blocks[0]) == 40 and all(len(b) == 10 for b in blocks[0])
