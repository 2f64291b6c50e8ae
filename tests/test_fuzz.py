"""Property-based fuzzing of the text parsers: any input ends in a result or in the parser's own error.

Manifests (JSONL), Kaldi data directories, trial lists and the text normaliser
get arbitrary bytes/strings; an IndexError, KeyError, TypeError or
AttributeError escaping would be a crash instead of a clear message.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfspeech.data.kaldi import KaldiError, iter_kaldi_dir
from selfspeech.data.manifest import ManifestError, read_manifest
from selfspeech.eval.sv import read_trials
from selfspeech.text.normalize import get_normalizer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# lines that look almost right are the interesting ones: mix JSON-ish and Kaldi-ish fragments with noise
fragments = st.sampled_from(['{"id": "a", "audio_filepath": "x.wav"}', '{"id": 1}', "[1, 2]", "null", '{"id": "a"',
                             "utt1 spk1", "utt1", "utt1\taudio/a.flac", "a b target", "a a target", "a b maybe",
                             "  ", "\t", "é", "\x00", '{"id": "a", "audio_filepath": 3}', "a  b  nontarget extra"])
lines = st.lists(st.one_of(fragments, st.text(max_size=30)), max_size=8)
raw = st.one_of(lines.map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")), st.binary(max_size=200))


def _write(p, data: bytes):
    p.write_bytes(data)
    return p


@FAST
@given(data=raw)
def test_manifest_parser_never_crashes(tmp_path, data):
    try:
        for item in read_manifest(_write(tmp_path / "m.jsonl", data)):
            assert isinstance(item["id"], str) and "audio_filepath" in item
    except ManifestError:
        pass


@FAST
@given(wav=raw, text=raw, utt2spk=raw, spk2age=raw)
def test_kaldi_reader_never_crashes(tmp_path, wav, text, utt2spk, spk2age):
    d = tmp_path / "k"
    d.mkdir(exist_ok=True)
    for name, data in (("wav.scp", wav), ("text", text), ("utt2spk", utt2spk), ("spk2age", spk2age)):
        _write(d / name, data)
    try:
        for item in iter_kaldi_dir(d, with_durations=False):
            assert item["id"] and "audio_filepath" in item
    except KaldiError:
        pass


@FAST
@given(data=raw, known=st.booleans())
def test_trial_list_parser_never_crashes(tmp_path, data, known):
    try:
        trials, skipped = read_trials(_write(tmp_path / "t.txt", data), known_ids={"a", "b"} if known else None,
                                      on_unknown="skip")
        assert all(t.enrol != t.test for t in trials) and skipped >= 0
    except ValueError as e:  # UnicodeDecodeError is one; every message names the file
        assert "t.txt" in str(e)


@FAST
@given(text=st.text(max_size=200), name=st.sampled_from(["whisper_english", "basic", "none"]))
def test_normalisers_are_total(text, name):
    out = get_normalizer(name)(text)
    assert isinstance(out, str) and out == " ".join(out.split())          # one space between words, no edges


def test_whisper_normaliser_keeps_openais_order_on_compatibility_letters():
    # OpenAI's normaliser lower-cases before its NFKD step, so a compatibility capital without a
    # lower-case form (math bold A) comes out as "A"; whisper_english reproduces OpenAI's outputs
    assert get_normalizer()("\U0001d400BC ＤＥＦ") == "Abc def"


eval_fragments = st.sampled_from(['{"id": "a", "text": "x"}', '{"id": "b", "text": null}', '{"id": 1, "text": "y"}',
                                  '{"id": "a", "text": "z"}', '{"id": "c"}', '{"text": "t"}', "[1]", '{"id": "d", "te',
                                  "", "  ", "é", '{"id": "e\\u00e9", "text": "w", "flags": "f"}'])
eval_raw = st.one_of(st.lists(st.one_of(eval_fragments, st.text(max_size=12)), max_size=8).map(
    lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")), st.binary(max_size=120))


@FAST
@given(data=eval_raw, partial=st.booleans())
def test_streaming_eval_index_agrees_with_the_reader(tmp_path, data, partial):
    """The streaming index (selfspeech eval) accepts what read_jsonl accepts, with the same items."""
    from selfspeech.eval.report import read_jsonl
    from selfspeech.eval.sources import JsonlIndex

    p = _write(tmp_path / "h.jsonl", data)
    try:
        expected = read_jsonl(p, required=("id", "text"), allow_partial_last=partial, warn=lambda m: None)
    except (ManifestError, UnicodeDecodeError):
        expected = None
    try:
        idx = JsonlIndex(p, required=("id", "text"), allow_partial_last=partial, warn=lambda m: None)
    except ManifestError:
        assert expected is None
        return
    assert expected is not None and list(idx) == expected and idx.n == len(expected)
    assert all(idx.get(it["id"]) == it for it in expected) and idx.unused(3) == (0, [])
