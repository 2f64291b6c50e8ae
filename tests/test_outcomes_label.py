"""`selfspeech label` outcomes: exit codes that say what happened, summaries on stdout (--json for machines),
and resuming refused when the output was written by another teacher or decoding config."""
from __future__ import annotations

import json

import pytest
import soundfile as sf
from conftest import tone
from typer.testing import CliRunner

from selfspeech.cli import app
from selfspeech.data.manifest import write_manifest
from selfspeech.label.resume import ResumeError, check_resume, labelling_spec, sidecar_path
from selfspeech.label.teacher import DecodeOptions, Hypothesis


class FakeTeacher:
    backend = "fake"

    def __init__(self):
        self.calls = 0

    def transcribe(self, wavs):
        self.calls += 1
        return [Hypothesis(f"len {len(w)}", -0.2, 1.1, 0.01, 0.001) for w in wavs]


@pytest.fixture
def fake(monkeypatch):
    """``load_teacher`` replaced by one that returns a FakeTeacher (no model is opened)."""
    import selfspeech.label.teacher as teacher

    made = []

    def load(name, backend="faster-whisper", compute_type="auto", options=None, cpu_threads=0, device="cpu"):
        made.append((name, backend, compute_type))
        made.append(FakeTeacher())
        return made[-1]

    monkeypatch.setattr(teacher, "load_teacher", load)
    return made


def _manifest(tmp_path, n=3, missing=()):
    items = []
    for i in range(n):
        p = tmp_path / f"u{i}.flac"
        if i not in missing:
            sf.write(p, tone(0.5 + 0.1 * i, seed=i), 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(p), "duration": 0.5 + 0.1 * i, "speaker": f"s{i}"})
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    return m


def _label(m, out, *extra):
    return CliRunner().invoke(app, ["label", "--teacher", "fake-a", "--in", str(m), "--out", str(out),
                                    "--device", "cpu", *extra])


def test_every_utterance_failing_exits_1_with_one_line_on_stderr(tmp_path, fake):
    m = _manifest(tmp_path, 3, missing=(0, 1, 2))
    r = _label(m, tmp_path / "l.jsonl", "--json")
    assert r.exit_code == 1, r.output
    err = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("label ")]  # tqdm bar aside
    assert len(err) == 1 and err[0].startswith("error: all 3 utterances of this run failed (first: u")
    assert "data validate" in err[0]
    summary = json.loads(r.stdout)                      # the summary still reaches stdout, as one object
    assert summary["failed"] == 3 and summary["labelled"] == 0 and summary["first_error"].startswith("u")


def test_partial_failure_exits_0_and_counts_the_failures(tmp_path, fake):
    m = _manifest(tmp_path, 3, missing=(1,))
    r = _label(m, tmp_path / "l.jsonl", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["labelled"] == 2 and summary["failed"] == 1 and summary["first_error"].startswith("u1: ")
    assert summary["out"] == str(tmp_path / "l.jsonl")
    r = _label(_manifest(tmp_path, 3, missing=(1,)), tmp_path / "l2.jsonl")
    assert r.exit_code == 0 and "2 labelled, 1 failed, 0 already there (3 utterances)" in r.stdout
    assert "first failure: u1" in r.stdout and "error" not in r.stderr


def test_resume_with_the_same_teacher_labels_only_the_rest(tmp_path, fake):
    m, out = _manifest(tmp_path, 4), tmp_path / "l.jsonl"
    assert _label(m, out, "--limit", "2").exit_code == 0
    spec = json.loads(sidecar_path(out).read_text())
    assert spec == {"teacher": "fake-a", "backend": "faster-whisper", "compute_type": "int8",
                    "options": {"language": "en", "beam_size": 1, "max_new_tokens": 128, "window_s": 15.0}}
    r = _label(m, out, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["already_done"] == 2 and s["labelled"] == 2 and len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("change,named", [
    (["--teacher", "fake-b"], "fake-b (faster-whisper, int8"),
    (["--beam-size", "5"], "beam_size 5"),
    (["--backend", "transformers"], "fake-a (transformers, float32"),
    (["--compute-type", "float32"], "fake-a (faster-whisper, float32"),
    (["--window", "30"], "window_s 30.0"),
])
def test_resume_with_another_teacher_or_decoding_config_is_refused_before_loading(tmp_path, fake, change, named):
    m, out = _manifest(tmp_path, 4), tmp_path / "l.jsonl"
    assert _label(m, out, "--limit", "2").exit_code == 0
    before, n_loaded = out.read_text(), len(fake)
    argv = ["label", "--teacher", "fake-a", "--in", str(m), "--out", str(out), "--device", "cpu", *change]
    if change[0] == "--teacher":
        argv = argv[:1] + argv[3:]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {out} holds labels by fake-a (faster-whisper, int8")
    assert named in lines[0] and "give another --out, or delete" in lines[0] and "l.jsonl.teacher.json" in lines[0]
    assert out.read_text() == before and len(fake) == n_loaded          # nothing decoded, no teacher loaded


def test_output_without_sidecar_is_compared_by_its_records_teacher(tmp_path, fake):
    m, out = _manifest(tmp_path, 3), tmp_path / "l.jsonl"
    out.write_text(json.dumps({"id": "u0", "audio_filepath": "x", "teacher": "whisper-base", "text": "a",
                               "status": "ok", "flags": []}) + "\n")
    r = _label(m, out)
    assert r.exit_code == 2 and "holds labels by whisper-base; this run asks for fake-a" in r.output
    spec = labelling_spec("whisper-base", "faster-whisper", "int8", DecodeOptions())
    check_resume(out, spec)                         # the same teacher name: resumable (no sidecar to compare)
    check_resume(tmp_path / "new.jsonl", spec)      # nothing written yet: anything goes
    sidecar_path(out).write_text(json.dumps(spec))
    with pytest.raises(ResumeError, match="beam_size 1.*beam_size 2"):
        check_resume(out, labelling_spec("whisper-base", "faster-whisper", "int8", DecodeOptions(beam_size=2)))
