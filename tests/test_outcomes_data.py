"""`data validate|stats|select|split` outcomes: warnings vs errors, unlabelled audio, fields no line has,
summaries on stdout (--json: one object)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import tone
from typer.testing import CliRunner

from selfspeech.cli import app

runner = CliRunner()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def unlabelled(tmp_path):
    """Unlabelled audio as importers write it: no text, or text null; one 8 kHz file, one stereo file."""
    sf.write(tmp_path / "a.flac", tone(1.0), 16000)
    sf.write(tmp_path / "r8k.wav", tone(1.0, sr=8000), 8000)
    sf.write(tmp_path / "st.wav", np.stack([tone(1.0), tone(1.0, seed=1)], 1), 16000)
    rows = [{"id": "a", "audio_filepath": str(tmp_path / "a.flac")},
            {"id": "n", "audio_filepath": str(tmp_path / "a.flac"), "text": None},
            {"id": "r8k", "audio_filepath": str(tmp_path / "r8k.wav")},
            {"id": "st", "audio_filepath": str(tmp_path / "st.wav"), "text": ""}]
    return _write(tmp_path / "m.jsonl", rows)


def test_validate_no_text_accepts_unlabelled_audio_and_counts_conversions_as_warnings(unlabelled):
    r = runner.invoke(app, ["data", "validate", str(unlabelled), "--no-text", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)                              # stdout: the summary only, as one object
    assert s["utterances"] == 4 and s["errors"] == 0 and s["error_kinds"] == {}
    assert s["warnings"] == 2 and s["warning_kinds"] == {"wrong_rate": 1, "wrong_channels": 1}
    assert "warning: wrong_rate: utterance 'r8k'" in r.stderr and "resampled on load" in r.stderr
    r = runner.invoke(app, ["data", "validate", str(unlabelled), "--no-text"])
    assert r.exit_code == 0 and "ok (warnings only)" in r.stdout and "converted on load" in r.stdout
    r = runner.invoke(app, ["data", "validate", str(unlabelled), "--json"])     # texts required: errors
    s = json.loads(r.stdout)
    assert r.exit_code == 1 and s["error_kinds"] == {"non_text": 3, "empty_text": 1}


def test_validate_no_text_still_checks_a_text_that_is_there_and_unreadable_audio_is_an_error(tmp_path):
    sf.write(tmp_path / "a.flac", tone(1.0), 16000)
    (tmp_path / "bad.flac").write_bytes(b"fLaC" + b"\x00" * 20)
    m = _write(tmp_path / "m.jsonl", [{"id": "a", "audio_filepath": str(tmp_path / "a.flac"), "text": "?!"},
                                      {"id": "bad", "audio_filepath": str(tmp_path / "bad.flac")}])
    r = runner.invoke(app, ["data", "validate", str(m), "--no-text", "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["error_kinds"] == {"non_text": 1, "unreadable_audio": 1}
    r = runner.invoke(app, ["data", "validate", str(m), "--no-require-text"])     # the older spelling
    assert r.exit_code == 1 and "unreadable_audio" in r.stdout and "2 errors" in r.stdout


@pytest.fixture
def meta(tmp_path):
    rows = [{"id": f"u{i}", "audio_filepath": "x.flac", "duration": 900.0, "spk": f"s{i % 2}", "age": 8 + i}
            for i in range(4)]
    return _write(tmp_path / "m.jsonl", rows)


def _one_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_a_field_no_line_has_is_an_error_listing_the_fields_there(tmp_path, meta):
    have = "its lines have age, audio_filepath, duration, id, spk"
    line = _one_error(runner.invoke(app, ["data", "stats", str(meta), "--by", "age_group"]))
    assert "--by 'age_group': no line of" in line and have in line
    line = _one_error(runner.invoke(app, ["data", "select", str(meta), str(tmp_path / "o.jsonl"),
                                          "--where", "age>=9, gender==f"]))
    assert "--where 'gender': no line of" in line and have in line and not (tmp_path / "o.jsonl").exists()
    line = _one_error(runner.invoke(app, ["data", "split", str(meta), str(tmp_path / "sp")]))
    assert "--speaker-field 'speaker'" in line and have in line and "with --speaker-field" in line
    r = runner.invoke(app, ["data", "split", str(meta), str(tmp_path / "sp"), "--speaker-field", "spk",
                            "--parts", "a=1,b=1"])
    assert r.exit_code == 0 and "a: 2 utterances, 1 speakers" in r.stdout
    r = runner.invoke(app, ["data", "select", str(meta), str(tmp_path / "o.jsonl"), "--where", "age>=10"])
    assert r.exit_code == 0 and "selected 2 utterances" in r.stdout


def test_stats_json_and_the_default_grouping_without_age_group(meta):
    r = runner.invoke(app, ["data", "stats", str(meta), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["by"] == "all" and s["groups"] == [{"group": "all", "utterances": 4, "speakers": 0, "hours": 1.0}]
    r = runner.invoke(app, ["data", "stats", str(meta), "--by", "spk", "--json"])
    assert [(g["group"], g["utterances"], g["hours"]) for g in json.loads(r.stdout)["groups"]] == [
        ("s0", 2, 0.5), ("s1", 2, 0.5)]
