import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from conftest import SO762, needs_shared, tone
from selfspeech.audio.io import AudioError, load_audio
from selfspeech.cli import app
from selfspeech.data.kaldi import KaldiError, age_group, iter_kaldi_dir
from selfspeech.data.manifest import ManifestError, read_manifest, write_manifest
from selfspeech.data.select import parse_rule, select, split_by_speaker
from selfspeech.data.validate import validate_manifest

runner = CliRunner()


def test_kaldi_import_fields(kaldi_dir):
    items = list(iter_kaldi_dir(kaldi_dir))
    assert [i["id"] for i in items] == ["A0", "A1", "B0", "B1", "C0", "C1"]
    a1 = items[1]
    assert a1["text"] == "HELLO WORLD 1" and a1["speaker"] == "A" and a1["age"] == 30
    assert a1["age_group"] == "adult" and a1["gender"] == "f"
    assert a1["duration"] == pytest.approx(2.0, abs=1e-3)
    assert items[2]["age_group"] == "child" and items[4]["age_group"] == "teen"


def test_kaldi_segments(kaldi_dir):
    (kaldi_dir / "segments").write_text("seg1 A1 0.5 1.5\n")
    (kaldi_dir / "utt2spk").write_text("seg1 A\n")  # utt2spk is keyed by utterance (segment) ids
    items = list(iter_kaldi_dir(kaldi_dir))
    assert len(items) == 1 and items[0]["offset"] == 0.5 and items[0]["duration"] == 1.0
    from selfspeech.audio.io import load_item
    assert len(load_item(items[0])) == 16000


def test_kaldi_errors(kaldi_dir, tmp_path):
    (kaldi_dir / "wav.scp").unlink()
    with pytest.raises(KaldiError, match="missing wav.scp"):
        list(iter_kaldi_dir(kaldi_dir))
    d = tmp_path / "piped"
    d.mkdir()
    (d / "wav.scp").write_text("u1 sox a.wav -t wav - |\n")
    with pytest.raises(KaldiError, match="piped command"):
        list(iter_kaldi_dir(d))
    (d / "wav.scp").write_text("u1 a.wav\nu1 b.wav\n")
    with pytest.raises(KaldiError, match=r"wav.scp:2: duplicate key 'u1'"):
        list(iter_kaldi_dir(d))


def test_age_group_boundaries():
    assert [age_group(a) for a in (12, 13, 17, 18)] == ["child", "teen", "teen", "adult"]


def test_manifest_roundtrip_and_relative_paths(tmp_path):
    p = tmp_path / "sub" / "m.jsonl"
    n = write_manifest(p, [{"id": 1, "audio_filepath": "a.flac", "text": "x"}])
    assert n == 1
    (item,) = list(read_manifest(p))
    assert item["id"] == "1" and item["audio_filepath"] == str(tmp_path / "sub" / "a.flac")


def test_manifest_bad_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"id": "a", "audio_filepath": "x"}\nnot json\n')
    with pytest.raises(ManifestError, match=r"m.jsonl:2: not valid JSON"):
        list(read_manifest(p))
    p.write_text('{"id": "a"}\n')
    with pytest.raises(ManifestError, match="missing field.*audio_filepath"):
        list(read_manifest(p))
    with pytest.raises(ManifestError, match="not found"):
        list(read_manifest(tmp_path / "nope.jsonl"))


def test_select_rules():
    items = [{"id": str(i), "age": a, "g": g} for i, (a, g) in enumerate([(8, "m"), (18, "f"), (40, "m")])]
    assert [i["id"] for i in select(items, "age>=18")] == ["1", "2"]
    assert [i["id"] for i in select(items, "age>=18, g==m")] == ["2"]
    assert [i["id"] for i in select(items, "g in f|x")] == ["1"]
    assert [i["id"] for i in select(items, "age<10 and g!=f")] == ["0"]
    with pytest.raises(ValueError, match="cannot parse"):
        parse_rule("age >>> 3")


def test_split_by_speaker_disjoint_reproducible():
    items = [{"id": f"{s}_{u}", "speaker": f"s{s}"} for s in range(20) for u in range(3)]
    a = split_by_speaker(items, {"train": 0.75, "dev": 0.25}, seed=1)
    b = split_by_speaker(list(reversed(items)), {"train": 0.75, "dev": 0.25}, seed=1)
    spk = {k: {i["speaker"] for i in v} for k, v in a.items()}
    assert len(spk["train"]) == 15 and len(spk["dev"]) == 5 and not spk["train"] & spk["dev"]
    assert {k: {i["id"] for i in v} for k, v in a.items()} == {k: {i["id"] for i in v} for k, v in b.items()}
    c = split_by_speaker(items, {"train": 0.75, "dev": 0.25}, seed=2)
    assert {i["speaker"] for i in c["dev"]} != spk["dev"]
    counts = split_by_speaker(items, {"a": 3, "b": 1}, seed=0)
    assert len({i["speaker"] for i in counts["a"]}) == 3 and len({i["speaker"] for i in counts["b"]}) == 17


def test_audio_resample_and_mixdown(tmp_path):
    sf.write(tmp_path / "st.wav", np.stack([tone(1.0, 8000), tone(1.0, 8000)], 1), 8000)
    with pytest.warns(UserWarning, match="mixed down"):
        wav = load_audio(tmp_path / "st.wav")
    assert wav.dtype == np.float32 and abs(len(wav) - 16000) <= 2
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000garbage")
    with pytest.raises(AudioError, match="bad.wav: unreadable"):
        load_audio(tmp_path / "bad.wav")
    sf.write(tmp_path / "nan.wav", np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_audio(tmp_path / "nan.wav")


def _bad_corpus(tmp_path):
    sf.write(tmp_path / "ok.flac", tone(), 16000)
    sf.write(tmp_path / "r8k.wav", tone(sr=8000), 8000)
    sf.write(tmp_path / "st.wav", np.stack([tone(), tone()], 1), 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan], np.float32), 16000, subtype="FLOAT")
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC" + b"\x00" * 20)
    rows = [("ok", "ok.flac", "HELLO"), ("ok", "ok.flac", "HELLO"), ("r8k", "r8k.wav", "A"),
            ("st", "st.wav", "A"), ("empty", "empty.wav", "A"), ("nan", "nan.wav", "A"),
            ("corrupt", "corrupt.flac", "A"), ("missing", "missing.flac", "A"), ("notext", "ok.flac", "  "),
            ("punct", "ok.flac", "?!"), ("num", "ok.flac", 5)]
    lines = [json.dumps({"id": i, "audio_filepath": p, "text": t}) for i, p, t in rows] + ["{oops"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.jsonl"


def test_validate_finds_every_problem(tmp_path):
    m = _bad_corpus(tmp_path)
    probs = {(p.kind, p.utt_id) for p in validate_manifest(m) if not isinstance(p, dict)}
    assert probs == {("duplicate_id", "ok"), ("wrong_rate", "r8k"), ("wrong_channels", "st"),
                     ("empty_audio", "empty"), ("nan_samples", "nan"), ("unreadable_audio", "corrupt"),
                     ("missing_file", "missing"), ("empty_text", "notext"), ("non_text", "punct"),
                     ("non_text", "num"), ("bad_line", "line 12")}


def test_validate_cli_exit_codes(tmp_path, kaldi_dir):
    r = runner.invoke(app, ["data", "validate", str(_bad_corpus(tmp_path))])
    assert r.exit_code == 1
    good = tmp_path / "good.jsonl"
    assert runner.invoke(app, ["data", "import-kaldi", str(kaldi_dir), str(good)]).exit_code == 0
    assert runner.invoke(app, ["data", "validate", str(good)]).exit_code == 0


def test_cli_select_split(tmp_path, kaldi_dir):
    m = tmp_path / "m.jsonl"
    runner.invoke(app, ["data", "import-kaldi", str(kaldi_dir), str(m)])
    r = runner.invoke(app, ["data", "select", str(m), str(tmp_path / "ad.jsonl"), "--where", "age>=18"])
    assert r.exit_code == 0 and len(list(read_manifest(tmp_path / "ad.jsonl"))) == 2
    r = runner.invoke(app, ["data", "split", str(m), str(tmp_path / "sp"), "--parts", "a=2,b=1"])
    assert r.exit_code == 0
    assert len(list(read_manifest(tmp_path / "sp" / "a.jsonl"))) == 4
    r = runner.invoke(app, ["data", "import-kaldi", str(tmp_path / "nowhere"), str(m)])
    assert r.exit_code == 2 and "not a directory" in r.output


@needs_shared()
def test_speechocean762_imports_as_is(tmp_path):
    items = list(iter_kaldi_dir(SO762))
    assert len(items) == 2500 and len({i["speaker"] for i in items}) == 125
    groups = {g: sum(i["age_group"] == g for i in items) for g in ("adult", "child", "teen")}
    assert groups == {"adult": 1340, "child": 1040, "teen": 120}
    assert all(i["text"] and i["duration"] > 0 for i in items)
    probs = [p for p in validate_manifest(None, items=items[:20]) if not isinstance(p, dict)]
    assert probs == []


def test_audio_root_keeps_manifest_paths_inside(tmp_path, monkeypatch):
    from selfspeech.data.manifest import ManifestError, read_manifest

    (tmp_path / "corpus").mkdir()
    (tmp_path / "secret.wav").write_bytes(b"x")
    (tmp_path / "corpus" / "link.wav").symlink_to(tmp_path / "secret.wav")
    m = tmp_path / "corpus" / "m.jsonl"
    m.write_text('{"id": "ok", "audio_filepath": "a.wav"}\n{"id": "up", "audio_filepath": "../secret.wav"}\n'
                 '{"id": "abs", "audio_filepath": "/etc/passwd"}\n{"id": "sym", "audio_filepath": "link.wav"}\n')
    assert len(list(read_manifest(m))) == 4                                   # no root: paths as given
    with pytest.raises(ManifestError, match="'up'.*outside the audio root"):
        list(read_manifest(m, audio_root=tmp_path / "corpus"))
    bad = []
    kept = list(read_manifest(m, audio_root=tmp_path / "corpus", on_bad_line=bad.append))
    assert [k["id"] for k in kept] == ["ok"] and len(bad) == 3                # counted, never silently dropped
    monkeypatch.setenv("SELFSPEECH_AUDIO_ROOT", str(tmp_path / "corpus"))
    with pytest.raises(ManifestError, match="outside"):
        list(read_manifest(m))


def test_cli_data_stats_prints_utterances_speakers_and_hours_per_group(tmp_path):
    from typer.testing import CliRunner

    from selfspeech.cli import app

    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps({"id": f"u{i}", "audio_filepath": "x.flac", "duration": 1800.0, "text": "a",
                                     "speaker": f"s{i % 2}", "age_group": "child" if i < 3 else "adult"}) + "\n"
                         for i in range(4)))
    r = CliRunner().invoke(app, ["data", "stats", str(m), "--by", "age_group"])
    assert r.exit_code == 0, r.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in r.output.splitlines() if line.count("│") >= 5}
    assert rows["child"] == ["3", "2", "1.50"] and rows["adult"] == ["1", "1", "0.50"]
