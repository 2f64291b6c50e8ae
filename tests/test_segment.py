"""`selfspeech data segment`: Silero VAD cuts long recordings into utterances of at most --max-seconds,
segments point into the file with offset + duration (read the same by every reader), resumable; `label`
refuses an utterance over 30 s up front or cuts it with --segment."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import SO762, needs_shared
from typer.testing import CliRunner

from selfspeech.audio.io import load_item
from selfspeech.data.manifest import ManifestError, read_manifest, write_manifest
from selfspeech.data.segment import (
    SegmentConfig,
    TooLongError,
    check_lengths,
    cut_recording,
    segment_manifest,
    side_paths,
)

SR = 16_000
SENTENCES = ["today we will talk about the fourier transform and its uses in signal processing",
             "please open your books at page twelve", "the quick brown fox jumps over the lazy dog",
             "any questions so far", "let us continue with the next example which is a little longer"]


def _speech(text: str, rate: int = 150) -> np.ndarray:
    """eSpeak NG speech, trimmed to its first and last non-silent sample."""
    from selfspeech.data.synth import SynthError, synthesize

    try:
        w = synthesize(text, rate=rate)
    except (SynthError, OSError) as e:
        pytest.skip(f"eSpeak NG unavailable: {e}")
    nz = np.flatnonzero(np.abs(w) > 1e-3)
    return w[nz[0]:nz[-1] + 1]


def _recording(pieces: list[np.ndarray], seed: int = 0, gaps=(0.8, 3.0)) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pieces separated by low noise (-50 dBFS) of random length; (audio, known speech regions in samples)."""
    rng = np.random.default_rng(seed)
    parts, known, t = [], [], 0
    for w in pieces:
        sil = int(rng.uniform(*gaps) * SR)
        parts += [np.zeros(sil, np.float32), w]
        known.append((t + sil, t + sil + len(w)))
        t += sil + len(w)
    parts.append(np.zeros(SR, np.float32))
    wav = np.concatenate(parts)
    return (wav + 0.003 * rng.standard_normal(len(wav))).astype(np.float32), known


def _coverage(known, spans) -> float:
    n = max(e for _, e in known + spans)
    mask = np.zeros(n, bool)
    for s, e in spans:
        mask[s:e] = True
    return sum(mask[s:e].sum() for s, e in known) / sum(e - s for s, e in known)


@pytest.fixture(scope="module")
def lecture():
    """A 60-s 'lecture': 12 synthetic sentences (1-7 s) between 0.8-3 s pauses."""
    return _recording([_speech(SENTENCES[i % len(SENTENCES)]) for i in range(12)])


def _spans(segs) -> list[tuple[int, int]]:
    return [(round(s["offset"] * SR), round((s["offset"] + s["duration"]) * SR)) for s in segs]


def _corpus(tmp_path, lecture, extra=()):
    wav, known = lecture
    sf.write(tmp_path / "lecture.flac", wav, SR)
    short = _speech("we call it bear")
    sf.write(tmp_path / "short.flac", np.concatenate([np.zeros(SR // 4), short, np.zeros(SR // 4)]), SR)
    items = [{"id": "lec", "audio_filepath": str(tmp_path / "lecture.flac"), "duration": len(wav) / SR,
              "text": "THE WHOLE LECTURE", "speaker": "prof", "course": "dsp"},
             {"id": "short", "audio_filepath": str(tmp_path / "short.flac"), "text": "WE CALL IT BEAR",
              "speaker": "kid"}, *extra]
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    return m, known


def test_segments_cover_the_speech_and_point_into_the_file(tmp_path, lecture):
    m, known = _corpus(tmp_path, lecture, [{"id": "gone", "audio_filepath": str(tmp_path / "nope.flac")}])
    out = tmp_path / "seg.jsonl"
    s = segment_manifest(m, out, progress=False)
    segs = list(read_manifest(out))
    lec = [x for x in segs if x["recording"] == "lec"]
    n = len(lecture[0])
    assert _coverage(known, _spans(lec)) >= 0.95
    assert 6 <= len(lec) <= 12 and all(0 < x["duration"] <= 30.0 for x in lec)
    assert all(0 <= x["offset"] and x["offset"] + x["duration"] <= n / SR + 1e-9 for x in lec)
    spans = _spans(lec)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))               # in time order, no overlap
    assert [x["id"] for x in lec] == sorted(x["id"] for x in lec)             # ids sort in time order
    assert all(x["id"] == f"lec_{round(x['offset'] * 1000):08d}" for x in lec)
    assert all(x["speaker"] == "prof" and x["course"] == "dsp" and "text" not in x for x in lec)
    short = [x for x in segs if x["recording"] == "short"]
    assert len(short) == 1 and short[0]["id"] == "short" and short[0]["text"] == "WE CALL IT BEAR"  # unchanged
    assert "offset" not in short[0] and short[0]["duration"] > 1.0
    summary = json.loads(side_paths(out)[1].read_text())
    assert summary == s and s["recordings"] == 3 and s["failed_recordings"] == 1 and "gone" in s["failed"][0]
    assert s["segments"] == len(segs) and s["passed_through"] == 1
    assert s["speech_seconds"] == pytest.approx(sum(x["duration"] for x in segs), abs=0.05)


def test_no_segment_longer_than_max_seconds_and_continuous_speech_is_split(lecture):
    wav, known = lecture
    for cfg in (SegmentConfig(max_seconds=8, merge_gap=3.0), SegmentConfig(max_seconds=4, min_seconds=1.0,
                                                                          pad_seconds=0.5)):
        cut = cut_recording(wav, cfg)
        lens = [(e - s) / SR for s, e in cut.segments]
        assert max(lens) <= cfg.max_seconds and min(lens) >= cfg.min_seconds
        assert _coverage(known, cut.segments) >= 0.95
    talk = np.concatenate([_speech(" ".join(SENTENCES), rate=170) for _ in range(2)])  # ~35 s, no long pause
    cut = cut_recording(talk, SegmentConfig(max_seconds=10))
    assert len(cut.segments) >= 4 and max(e - s for s, e in cut.segments) <= 10 * SR
    assert _coverage([(0, len(talk))], cut.segments) >= 0.95


def test_short_isolated_speech_is_dropped_and_counted(lecture):
    yes = _speech("yes")
    wav, _ = _recording([_speech(SENTENCES[0]), yes, _speech(SENTENCES[1])], gaps=(4.0, 4.5))
    cut = cut_recording(wav, SegmentConfig(min_seconds=1.0))
    assert len(cut.segments) == 2 and cut.dropped_regions == 1
    assert 0.1 < cut.dropped_samples / SR < 1.0
    silent = np.random.default_rng(0).standard_normal(10 * SR).astype(np.float32) * 0.003
    assert cut_recording(silent).segments == []


@pytest.mark.parametrize("kw, named", [({"max_seconds": 40}, "--max-seconds"), ({"min_seconds": 20}, "--min-seconds"),
                                       ({"pad_seconds": -1}, "--pad-seconds"), ({"threshold": 1.5}, "--threshold"),
                                       ({"merge_gap": -0.1}, "--merge-gap")])
def test_bad_options_are_refused_naming_the_option(kw, named):
    with pytest.raises(ValueError, match=named):
        SegmentConfig(**kw)


def test_resume_after_a_kill_keeps_finished_recordings(tmp_path, lecture, monkeypatch):
    import selfspeech.data.segment as S

    wav, _ = lecture
    items = []
    for i in range(3):
        sf.write(tmp_path / f"r{i}.flac", wav[i * SR * 5:], SR)
        items.append({"id": f"r{i}", "audio_filepath": str(tmp_path / f"r{i}.flac"), "speaker": "x"})
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    full = tmp_path / "full.jsonl"
    segment_manifest(m, full, progress=False)
    out = tmp_path / "seg.jsonl"
    real, cut = S.cut_recording, []

    def killed_on_third(w, cfg):
        cut.append(len(w))
        if len(cut) == 3:
            raise KeyboardInterrupt  # the kill lands while the third recording is being cut
        return real(w, cfg)

    monkeypatch.setattr(S, "cut_recording", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        segment_manifest(m, out, progress=False)
    first_two = out.read_text().splitlines()
    assert {json.loads(x)["recording"] for x in first_two} == {"r0", "r1"}
    with open(out, "a") as f:  # and a kill mid-write: r2's first line complete, its second half-written
        f.write(full.read_text().splitlines()[len(first_two)] + "\n" + '{"id": "r2_000')
    monkeypatch.setattr(S, "cut_recording", real)
    cut.clear()
    s = segment_manifest(m, out, progress=False)
    assert out.read_text() == full.read_text()                           # the same lines, nothing twice
    assert s["resumed"] == 2 and s["recordings"] == 3 and s == json.loads(side_paths(full)[1].read_text()) | {"resumed": 2}
    again = segment_manifest(m, out, progress=False)
    assert again["resumed"] == 3 and out.read_text() == full.read_text()


def test_resume_refuses_other_options_and_foreign_outputs(tmp_path, lecture):
    m, _ = _corpus(tmp_path, lecture)
    out = tmp_path / "seg.jsonl"
    segment_manifest(m, out, progress=False)
    with pytest.raises(ValueError, match=r"other options \(max_seconds 30.0 -> 20"):
        segment_manifest(m, out, SegmentConfig(max_seconds=20), progress=False)
    foreign = tmp_path / "hand.jsonl"
    foreign.write_text('{"id": "a", "audio_filepath": "a.flac"}\n')
    with pytest.raises(ManifestError, match="not written by `selfspeech data segment`"):
        segment_manifest(m, foreign, progress=False)
    assert foreign.read_text() == '{"id": "a", "audio_filepath": "a.flac"}\n'  # left as it was


class RecordingTeacher:
    backend = "fake"

    def __init__(self):
        self.wavs = []

    def transcribe(self, wavs):
        from selfspeech.label.teacher import Hypothesis

        self.wavs += [np.array(w) for w in wavs]
        return [Hypothesis(f"len {len(w)}", -0.2, 1.1, 0.01, 0.001) for w in wavs]


def test_every_reader_gets_the_segment_samples(tmp_path, lecture):
    """A segmented manifest read through load_item, the encoder dataset, the labeller, validate and the
    Kaldi export gives the samples [offset, offset + duration) of the recording."""
    from selfspeech.data.audio_dataset import AudioDataset
    from selfspeech.data.exchange import write_kaldi_dir
    from selfspeech.data.validate import check_item
    from selfspeech.label.filters import FilterConfig
    from selfspeech.label.run import label_batch

    m, _ = _corpus(tmp_path, lecture)
    out = tmp_path / "seg.jsonl"
    segment_manifest(m, out, SegmentConfig(max_seconds=12), progress=False)
    segs = [x for x in read_manifest(out) if x["recording"] == "lec"]
    wav = sf.read(tmp_path / "lecture.flac", dtype="float32")[0]
    direct = [wav[s:e] for s, e in _spans(segs)]
    assert all(np.array_equal(load_item(x), d) for x, d in zip(segs, direct))
    data = AudioDataset(segs, kind="wave", cache=False)
    assert all(np.allclose(data.load(i), d, atol=1e-3) and len(data.load(i)) == len(d)
               for i, d in enumerate(direct))
    assert data.durations() == [x["duration"] for x in segs]
    t = RecordingTeacher()
    recs = label_batch(t, "fake", segs, FilterConfig())
    assert all(np.array_equal(w, d) for w, d in zip(t.wavs, direct))
    assert [r["duration"] for r in recs] == pytest.approx([x["duration"] for x in segs], abs=1e-4)
    for x, d in zip(segs, direct):  # validate reads the segment, not the file: its length is the segment's
        probs = check_item(x, require_text=False, max_seconds=len(d) / SR - 0.01)
        assert [p.kind for p in probs] == ["too_long"] and f"{len(d) / SR:.1f} s" in probs[0].detail
    write_kaldi_dir(segs, tmp_path / "kaldi")
    lines = (tmp_path / "kaldi" / "segments").read_text().split("\n")
    assert f"{segs[0]['id']} lecture {segs[0]['offset']:.3f} {segs[0]['offset'] + segs[0]['duration']:.3f}" in lines


@needs_shared()
@pytest.mark.shared
def test_real_speech_utterances_are_found(tmp_path):
    """Twelve real speechocean762 utterances (their own leading/trailing silence kept) joined by pauses."""
    from selfspeech.data.kaldi import iter_kaldi_dir

    items = [i for i in iter_kaldi_dir(SO762) if i["age_group"] == "adult"][:12]
    wav, known = _recording([load_item(i) for i in items], seed=1, gaps=(1.0, 2.5))
    cut = cut_recording(wav)
    voiced = []  # the 10-ms frames of each utterance within 30 dB of its loudest: the words
    for s, e in known:
        rms = np.sqrt((wav[s:e - (e - s) % 160].reshape(-1, 160) ** 2).mean(1))
        voiced += [(s + 160 * j, s + 160 * (j + 1)) for j in np.flatnonzero(rms > rms.max() * 10 ** (-30 / 20))]
    assert _coverage(voiced, cut.segments) >= 0.95
    assert all(e - s <= 30 * SR for s, e in cut.segments) and cut.dropped_regions <= 1


# -- label: nothing over 30 s is truncated ------------------------------------------------

@pytest.fixture
def fake_teacher(monkeypatch):
    import selfspeech.label.teacher as teacher

    made = []

    def load(name, backend="faster-whisper", compute_type="auto", options=None, cpu_threads=0, device="cpu"):
        made.append(RecordingTeacher())
        return made[-1]

    monkeypatch.setattr(teacher, "load_teacher", load)
    return made


def test_label_refuses_an_utterance_over_30_s_before_the_teacher_runs(tmp_path, lecture, fake_teacher):
    from selfspeech.label.run import label_manifest

    m, _ = _corpus(tmp_path, lecture)
    t = RecordingTeacher()
    with pytest.raises(TooLongError, match=r"utterance 'lec' is 6\d\.\d s, longer than Whisper's 30-s window"):
        label_manifest(m, tmp_path / "l.jsonl", t, "fake", progress=False)
    assert t.wavs == [] and not (tmp_path / "l.jsonl").exists()
    r = CliRunner().invoke(app(), ["label", "--teacher", "fake", "--in", str(m), "--out", str(tmp_path / "l.jsonl"),
                                   "--device", "cpu"])
    assert r.exit_code == 2 and "selfspeech data segment" in r.output and "--segment" in r.output
    assert fake_teacher == [] and not (tmp_path / "l.jsonl").exists()      # no model was even loaded
    no_duration = tmp_path / "nd.jsonl"                                    # the header says how long it is
    write_manifest(no_duration, [{"id": "lec", "audio_filepath": str(tmp_path / "lecture.flac")}])
    with pytest.raises(TooLongError, match="'lec'"):
        check_lengths(no_duration)
    check_lengths(no_duration, limit=0)


def test_label_segment_labels_each_segment_with_its_offsets(tmp_path, lecture, fake_teacher):
    m, _ = _corpus(tmp_path, lecture)
    out = tmp_path / "l.jsonl"
    r = CliRunner().invoke(app(), ["label", "--teacher", "fake", "--in", str(m), "--out", str(out), "--device", "cpu",
                                   "--segment", "--json"])
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    segs = list(read_manifest(tmp_path / "l.jsonl.segments.jsonl"))
    assert {x["id"] for x in recs} == {x["id"] for x in segs} and len(recs) >= 7
    lec = [x for x in recs if x.get("recording") == "lec"]
    assert all(x["duration"] <= 30 and "truncated_30s" not in x["flags"] and x["status"] == "ok" for x in lec)
    assert all(x["text"] == f"len {round(x['duration'] * SR)}" for x in lec)   # the teacher saw each segment
    short = next(x for x in recs if x["id"] == "short")
    assert "offset" not in short and short["status"] == "ok"                  # under 30 s: labelled as it was
    seen = sorted(len(w) for w in fake_teacher[0].wavs)
    assert max(seen) <= 30 * SR and len(seen) == len(recs)


def app():
    from selfspeech.cli import app as cli

    return cli
