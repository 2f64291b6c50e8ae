import json

import pytest
import soundfile as sf

from conftest import SO762, needs_shared, tone
from selfspeech.data.manifest import read_manifest, write_manifest
from selfspeech.label.filters import FilterConfig, flags_for
from selfspeech.label.run import label_manifest, recover_done_ids
from selfspeech.label.teacher import Hypothesis, compression_ratio


class FakeTeacher:
    """Returns a text derived from the audio length; counts calls; can fail on demand."""

    backend = "fake"

    def __init__(self, fail_on_len=None):
        self.calls, self.seen, self.fail_on_len = 0, [], fail_on_len

    def transcribe(self, wavs):
        self.calls += 1
        if self.fail_on_len is not None and any(len(w) == self.fail_on_len for w in wavs):
            raise RuntimeError("decoder exploded")
        self.seen += [len(w) for w in wavs]
        return [Hypothesis(f"len {len(w)}", -0.2, 1.1, 0.01, 0.001) for w in wavs]


def _corpus(tmp_path, n=10):
    items = []
    for i in range(n):
        p = tmp_path / f"u{i}.flac"
        sf.write(p, tone(0.5 + 0.1 * i, seed=i), 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(p), "duration": 0.5 + 0.1 * i,
                      "text": "SECRET REFERENCE", "speaker": f"s{i % 3}", "age_group": "child"})
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    return m


def test_label_outputs_fields_and_never_copies_reference(tmp_path):
    m = _corpus(tmp_path)
    out = tmp_path / "l.jsonl"
    st = label_manifest(m, out, FakeTeacher(), "fake", batch_size=4, progress=False)
    assert st.labelled == 10 and st.failed == 0 and st.audio_seconds == pytest.approx(9.5, abs=0.01)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert {r["id"] for r in recs} == {f"u{i}" for i in range(10)}
    for r in recs:
        assert "SECRET" not in json.dumps(r)
        assert r["text"].startswith("len ") and r["status"] == "ok" and r["flags"] == []
        assert r["speaker"] and r["age_group"] == "child" and r["teacher"] == "fake"
        assert {"avg_logprob", "compression_ratio", "no_speech_prob", "decode_seconds"} <= r.keys()


def test_label_resume_after_kill_labels_nothing_twice(tmp_path):
    m = _corpus(tmp_path)
    out = tmp_path / "l.jsonl"
    label_manifest(m, out, FakeTeacher(), "fake", batch_size=4, progress=False, limit=5)
    lines = out.read_text().splitlines()
    assert len(lines) == 5
    # simulate a kill in the middle of writing a 6th line
    with open(out, "a") as f:
        f.write('{"id": "u7", "text": "half')
    t = FakeTeacher()
    st = label_manifest(m, out, t, "fake", batch_size=4, progress=False)
    assert st.already_done == 5 and st.labelled == 5 and len(t.seen) == 5
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(f"u{i}" for i in range(10))
    # a third run has nothing to do
    t3 = FakeTeacher()
    st3 = label_manifest(m, out, t3, "fake", progress=False)
    assert st3.already_done == 10 and t3.calls == 0


def test_recover_truncates_only_the_broken_tail(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": ')
    assert recover_done_ids(p) == {"a", "b"}
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'


def test_bad_audio_recorded_as_failed_and_run_continues(tmp_path):
    m = _corpus(tmp_path, 4)
    items = list(read_manifest(m))
    (tmp_path / "broken.flac").write_bytes(b"not audio")
    items.append({"id": "bad", "audio_filepath": str(tmp_path / "broken.flac"), "speaker": "s9"})
    items.append({"id": "gone", "audio_filepath": str(tmp_path / "gone.flac"), "speaker": "s9"})
    items.append(dict(items[0]))  # duplicate id
    write_manifest(m, items)
    out = tmp_path / "l.jsonl"
    st = label_manifest(m, out, FakeTeacher(), "fake", progress=False)
    recs = {json.loads(l)["id"]: json.loads(l) for l in out.read_text().splitlines()}
    assert st.labelled == 4 and st.failed == 2 and st.duplicate_ids == 1
    assert recs["bad"]["status"] == "failed" and "unreadable" in recs["bad"]["error"]
    assert "not found" in recs["gone"]["error"] and "bad" in recs["bad"]["error"]


def test_batch_failure_is_isolated_to_the_culprit(tmp_path):
    m = _corpus(tmp_path, 4)
    out = tmp_path / "l.jsonl"
    st = label_manifest(m, out, FakeTeacher(fail_on_len=int(0.7 * 16000)), "fake", batch_size=4, progress=False)
    recs = {json.loads(l)["id"]: json.loads(l) for l in out.read_text().splitlines()}
    assert st.failed == 1 and st.labelled == 3
    assert recs["u2"]["status"] == "failed" and "decoder exploded" in recs["u2"]["error"]


def test_filters_defaults():
    cfg = FilterConfig()
    assert flags_for("hello", -0.3, 1.2, 0.1) == []
    assert flags_for("", -0.3, 0.0, 0.1) == ["empty"]
    loop = "the the the the the the the the the the the the the the the the the the"
    assert compression_ratio(loop) > cfg.max_compression_ratio
    assert flags_for(loop, -1.5, compression_ratio(loop), 0.9) == ["repetition", "low_logprob", "no_speech"]


@needs_shared()
@pytest.mark.shared
def test_real_tiny_en_teacher_labels_five_utterances(tmp_path):
    """Integration: the offline tiny.en teacher (PyPI package) on 5 real utterances, both backends."""
    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.label.teacher import load_teacher
    from selfspeech.text.normalize import get_normalizer
    import jiwer

    items = [i for i in iter_kaldi_dir(SO762) if i["age_group"] == "adult"][:5]
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    norm = get_normalizer()
    outs = {}
    for backend in ("faster-whisper", "transformers"):
        out = tmp_path / f"{backend}.jsonl"
        st = label_manifest(m, out, load_teacher("whisper-tiny.en", backend), "whisper-tiny.en", progress=False)
        assert st.labelled == 5 and st.failed == 0
        outs[backend] = {json.loads(l)["id"]: json.loads(l) for l in out.read_text().splitlines()}
    refs = [norm(i["text"]) for i in items]
    hyps = [norm(outs["faster-whisper"][i["id"]]["text"]) for i in items]
    assert jiwer.wer(refs, hyps) < 0.6  # adults, tiny.en: ~43% on the corpus
    for i in items:  # int8 CT2 and fp32 torch agree on most of these short sentences
        a, b = outs["faster-whisper"][i["id"]], outs["transformers"][i["id"]]
        assert -3 < a["avg_logprob"] <= 0 and -3 < b["avg_logprob"] <= 0
    same = sum(norm(outs["faster-whisper"][i]["text"]) == norm(outs["transformers"][i]["text"]) for i in outs["transformers"])
    assert same >= 3


def test_cli_unknown_teacher_and_missing_manifest(tmp_path):
    from typer.testing import CliRunner

    from selfspeech.cli import app

    m = _corpus(tmp_path, 2)
    r = CliRunner().invoke(app, ["label", "--teacher", "whisper-huge-nope", "--in", str(m), "--out", str(tmp_path / "l.jsonl")])
    assert r.exit_code == 2 and "whisper-huge-nope" in r.output and "whisper-base" in r.output
    r = CliRunner().invoke(app, ["label", "--in", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "l.jsonl")])
    assert r.exit_code == 2 and "manifest not found" in r.output


@pytest.mark.slow
@needs_shared()
def test_ray_labelling_matches_the_plain_path(tmp_path):
    """A local Ray run (2 actors, 1 CPU each) writes the records the single-process path writes; resumable."""
    pytest.importorskip("ray")
    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.label.ray_label import TeacherSpec, label_with_ray

    items = [i for i in iter_kaldi_dir(SO762) if i["age_group"] == "child"][:12]
    items.append({"id": "broken", "audio_filepath": str(tmp_path / "missing.flac"), "duration": 1.0})
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    plain = tmp_path / "plain.jsonl"
    # the single-process path as a user runs it, with the threading of a 1-CPU Ray actor: CTranslate2's
    # int8 kernels depend on the OpenMP thread count, and with them a transcript can change
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "selfspeech.cli", "label", "--teacher", "whisper-tiny.en", "--in", str(m),
                        "--out", str(plain), "--batch-size", "4", "--threads", "1"],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ray_out = tmp_path / "ray.jsonl"
    spec = TeacherSpec("whisper-tiny.en", cpu_threads=1)
    st = label_with_ray(m, ray_out, spec, batch_size=4, concurrency=2, progress=False)
    assert st.labelled == 12 and st.failed == 1                                  # the missing file: failed, counted

    def content(p):
        return {r["id"]: {k: v for k, v in r.items() if k != "decode_seconds"}
                for r in map(json.loads, p.read_text().splitlines())}

    # the same batches as the plain path (same windows), so the same records, whatever actor decoded them
    assert content(ray_out) == content(plain)
    again = label_with_ray(m, ray_out, spec, batch_size=4, concurrency=2, progress=False)
    assert again.already_done == 13 and again.labelled == 0                     # a rerun resumes: nothing twice
