"""A user's own recordings get in: folders, CSV/TSV tables (Common Voice), NeMo manifests without ids, HF data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from selfspeech.cli import app
from selfspeech.data.imports import ImportReport, audio_extensions, import_dir, import_table
from selfspeech.data.manifest import ManifestError, derived_id, read_manifest, unique_ids, write_manifest

from conftest import tone

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, ["data", *map(str, args)])


def _lines(p):
    return [json.loads(x) for x in p.read_text().splitlines()]


def _mp3_writable(tmp_path) -> bool:
    try:
        sf.write(tmp_path / "probe.mp3", tone(0.2), 16000)
        return sf.info(tmp_path / "probe.mp3").frames > 0
    except Exception:
        return False


@pytest.fixture
def recordings(tmp_path):
    """spk1/a.wav (+a.txt), spk1/B.FLAC (8 kHz stereo), spk2/c.ogg (+c.txt), spk2/broken.wav, notes.md."""
    d = tmp_path / "rec"
    (d / "spk1").mkdir(parents=True)
    (d / "spk2").mkdir()
    sf.write(d / "spk1" / "a.wav", tone(1.0), 16000)
    (d / "spk1" / "a.txt").write_text("hello  there\n")
    sf.write(d / "spk1" / "B.FLAC", np.stack([tone(0.5, 8000)] * 2, 1), 8000)
    sf.write(d / "spk2" / "c.ogg", tone(1.5, seed=1), 16000)
    (d / "spk2" / "c.txt").write_text("good morning")
    (d / "spk2" / "broken.wav").write_bytes(b"RIFF0000garbage")
    (d / "notes.md").write_text("not audio")
    return d


def test_audio_extensions_follow_libsndfile():
    exts = audio_extensions()
    assert {"wav", "flac", "ogg"} <= set(exts) and "txt" not in exts
    assert ("mp3" in exts) == ("MP3" in sf.available_formats())


def test_import_dir_formats_sidecars_speakers_and_unreadable(recordings, tmp_path):
    out = tmp_path / "m.jsonl"
    r = _cli("import-dir", recordings, out, "--text-ext", ".txt", "--speaker-from", "parent")
    assert r.exit_code == 0, r.output
    items = _lines(out)
    assert [i["id"] for i in items] == ["spk1_B", "spk1_a", "spk2_c"]  # sorted by relative path
    b, a, c = items
    assert a["audio_filepath"] == str(recordings.resolve() / "spk1" / "a.wav")
    assert (a["duration"], a["sample_rate"], a["channels"]) == (1.0, 16000, 1)
    assert (b["duration"], b["sample_rate"], b["channels"]) == (0.5, 8000, 2)
    assert c["duration"] == pytest.approx(1.5, abs=0.01) and c["text"] == "good morning"
    assert a["text"] == "hello there" and "text" not in b
    assert [i["speaker"] for i in items] == ["spk1", "spk1", "spk2"]
    assert "1 without a transcript" in r.output and "1 audio files skipped (missing or unreadable)" in r.output
    assert "broken.wav" in r.output and "ignored" in r.output
    again = tmp_path / "m2.jsonl"
    assert _cli("import-dir", recordings, again, "--text-ext", "txt", "--speaker-from", "parent").exit_code == 0
    assert again.read_bytes() == out.read_bytes()  # deterministic
    r = _cli("import-dir", recordings, tmp_path / "strict.jsonl", "--unreadable", "error")
    assert r.exit_code == 2 and "broken.wav" in r.output and not (tmp_path / "strict.jsonl").exists()


def test_import_dir_mp3(tmp_path):
    if not _mp3_writable(tmp_path):
        pytest.skip("this libsndfile cannot write MP3, so no MP3 file can be made to read back")
    d = tmp_path / "mp3"
    d.mkdir()
    sf.write(d / "x.MP3", tone(1.0), 16000)
    (item,) = import_dir(d)
    assert item["id"] == "x" and item["sample_rate"] == 16000 and item["duration"] == pytest.approx(1.0, abs=0.1)


def test_speaker_from_grandparent_and_regex(tmp_path):
    d = tmp_path / "libri"
    for spk, ch in (("19", "198"), ("26", "495")):
        (d / spk / ch).mkdir(parents=True)
        sf.write(d / spk / ch / f"{spk}-{ch}-0001.flac", tone(0.3), 16000)
    assert [i["speaker"] for i in import_dir(d, speaker_from="grandparent")] == ["19", "26"]
    got = list(import_dir(d, speaker_regex=r"/(?P<speaker>\d+)-\d+-\d+\.flac$"))
    assert [i["speaker"] for i in got] == ["19", "26"] and got[0]["id"] == "19_198_19-198-0001"
    rep = ImportReport()
    list(import_dir(d, speaker_regex=r"^(?P<speaker>x)", report=rep))
    assert rep.no_speaker == 2 and rep.written == 2
    with pytest.raises(ValueError, match="no group named speaker"):
        import_dir(d, speaker_regex=r"(\d+)")
    sf.write(d / "loose.wav", tone(0.3), 16000)
    with pytest.raises(ValueError, match=r"loose.wav: --speaker-from parent needs every file 1 folder"):
        import_dir(d, speaker_from="parent")


def test_import_dir_refusals(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("x")
    r = _cli("import-dir", d, tmp_path / "m.jsonl")
    assert r.exit_code == 2 and "no audio files found" in r.output and ".flac" in r.output and ".wav" in r.output
    sf.write(d / "a.wav", tone(0.2), 16000)
    sf.write(d / "a.flac", tone(0.2), 16000)
    r = _cli("import-dir", d, tmp_path / "m.jsonl")
    assert r.exit_code == 2 and "a.flac and a.wav both get the id 'a'" in r.output
    assert not (tmp_path / "m.jsonl").exists()
    (d / "a.flac").unlink()
    (d / "x y").mkdir()
    sf.write(d / "x y" / "b.wav", tone(0.2), 16000)
    (d / "x_y").mkdir()
    sf.write(d / "x_y" / "b.wav", tone(0.2), 16000)
    with pytest.raises(ValueError, match=r"x y/b.wav and x_y/b.wav both get the id 'x_y_b'"):
        import_dir(d)


@pytest.fixture
def common_voice(tmp_path):
    """A Common Voice-like folder: train.tsv + clips/ (one clip missing)."""
    d = tmp_path / "cv" / "en"
    (d / "clips").mkdir(parents=True)
    rows = [("c1", "common_voice_en_1.wav", 'He said "hi', "2", "twenties", "female"),
            ("c2", "common_voice_en_2.wav", "Good night.", "0", "", ""),
            ("c1", "common_voice_en_3.wav", "Missing clip.", "1", "twenties", "female")]
    for _, path, *_ in rows[:2]:
        sf.write(d / "clips" / path, tone(0.7), 16000)
    head = "client_id\tpath\tsentence\tup_votes\tage\tgender\tsegment\n"
    (d / "train.tsv").write_text(head + "".join("\t".join(r) + "\t\n" for r in rows))
    return d


def test_import_table_common_voice(common_voice, tmp_path):
    out = tmp_path / "cv.jsonl"
    r = _cli("import-table", common_voice / "train.tsv", out)
    assert r.exit_code == 2 and "--audio-dir" in r.output and "clips" in r.output
    r = _cli("import-table", common_voice / "train.tsv", out, "--audio-dir", common_voice / "clips")
    assert r.exit_code == 0, r.output
    items = _lines(out)
    assert [i["id"] for i in items] == ["common_voice_en_1", "common_voice_en_2"]
    first = items[0]
    assert first["text"] == 'He said "hi' and first["speaker"] == "c1" and first["duration"] == 0.7
    assert first["up_votes"] == 2 and first["age"] == "twenties" and first["gender"] == "female"
    assert "segment" not in first and "age" not in items[1]  # empty cells are no metadata
    assert first["audio_filepath"] == str((common_voice / "clips" / "common_voice_en_1.wav").resolve())
    assert "1 audio files skipped" in r.output and "common_voice_en_3.wav: file not found" in r.output


def test_import_table_missing_column_and_duplicates(common_voice, tmp_path):
    r = _cli("import-table", common_voice / "train.tsv", tmp_path / "x.jsonl", "--text", "transcript",
             "--audio-dir", common_voice / "clips")
    assert r.exit_code == 2 and "no column 'transcript' (--text); columns: client_id, path, sentence" in r.output
    assert len(r.output.strip().splitlines()) == 1
    csv = tmp_path / "t.csv"
    sf.write(tmp_path / "u.wav", tone(0.4), 16000)
    csv.write_text('file,key,note\nu.wav,k1,"a, quoted"\nu.wav,k1,again\n')
    with pytest.raises(ValueError, match=r"t.csv:3: id 'k1' already on line 2"):
        list(import_table(csv, audio="file", text=None, speaker=None, id_column="key"))
    csv.write_text('file,key,note,duration\nu.wav,k1,"a, quoted",9\n')
    (item,) = import_table(csv, audio="file", text=None, speaker=None, id_column="key")
    assert item["id"] == "k1" and item["note"] == "a, quoted" and item["duration"] == 0.4
    assert item["table_duration"] == 9 and "text" not in item
    csv.write_text("file,note\nu.wav,caf\xe9\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"t.csv: not UTF-8"):
        list(import_table(csv, audio="file", text=None, speaker=None))
    csv.write_text("file,note\nu.wav,x,extra\n")
    with pytest.raises(ValueError, match=r"t.csv:2: the row does not have the header's 2 fields"):
        list(import_table(csv, audio="file", text=None, speaker=None))


def test_nemo_manifest_without_ids(tmp_path):
    (tmp_path / "spk1").mkdir()
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / "spk1" / name, tone(2.0), 16000)
    m = tmp_path / "nemo.jsonl"
    lines = [{"audio_filepath": "spk1/a.wav", "duration": 2.0, "text": "x"},
             {"audio_filepath": str(tmp_path / "spk1" / "b.wav"), "duration": 1.0, "offset": 0.5},
             {"audio_filepath": "/elsewhere/c d.flac", "duration": 1.0},
             {"id": "kept", "audio_filepath": "spk1/a.wav"}]
    write_manifest(m, lines)
    first, second = list(read_manifest(m)), list(read_manifest(m))
    assert [i["id"] for i in first] == ["spk1_a", "spk1_b_500", "elsewhere_c_d", "kept"]
    assert first == second
    assert [i["id"] for i in import_dir(tmp_path / "spk1")] == ["a", "b"]  # same rule, relative to the folder
    assert derived_id("spk1/a.wav", tmp_path) == "spk1_a" and derived_id("../x/a.b.wav", tmp_path, 1.25) == "x_a.b_1250"
    write_manifest(m, lines[:1] * 2)
    _, dup = unique_ids(read_manifest(m))
    assert dup == ["spk1_a"]  # same audio, same id: a duplicate, as before
    m.write_text('{"audio_filepath": "a.wav", "offset": "soon"}\n')
    with pytest.raises(ManifestError, match=r"nemo.jsonl:1: offset must be a number"):
        list(read_manifest(m))
    m.write_text('{"duration": 1.0}\n')
    with pytest.raises(ManifestError, match=r"missing field\(s\) id, audio_filepath \(the id is derived"):
        list(read_manifest(m))


def _saved_hf(tmp_path):
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for k in range(3):
        paths.append(str(src / f"clip{k}.wav"))
        sf.write(paths[-1], tone(0.5 + 0.25 * k, seed=k), 16000)
    ds = datasets.Dataset.from_dict({"audio": paths, "sentence": ["a", "b", "c"], "key": ["k0", "k1", "k2"],
                                     "score": [1, 2, 3]}).cast_column("audio", datasets.Audio())
    return datasets, ds, paths


def test_hf_audio_column_without_torchcodec(tmp_path):
    datasets, ds, paths = _saved_hf(tmp_path)
    from selfspeech.data.exchange import from_hf_dataset

    got = list(from_hf_dataset(ds, tmp_path / "unused", text="sentence", speaker=None, id_column="key"))
    assert [g["audio_filepath"] for g in got] == paths and got[2]["duration"] == 1.0  # used in place
    ds.save_to_disk(str(tmp_path / "saved"))  # embeds the bytes: the source files may go
    for p in paths:
        (tmp_path / "src" / p).unlink()
    out = tmp_path / "m" / "hf.jsonl"
    r = _cli("import-hf", tmp_path / "saved", out, "--text", "sentence", "--speaker", "", "--id-column", "key")
    assert r.exit_code == 0, r.output
    items = _lines(out)
    assert [i["id"] for i in items] == ["k0", "k1", "k2"] and items[1]["score"] == 2
    assert items[1]["audio_filepath"] == str(tmp_path / "m" / "audio" / "k1.wav") and items[1]["duration"] == 0.75
    wav, sr = sf.read(items[1]["audio_filepath"], dtype="float32")
    assert sr == 16000 and np.allclose(wav, tone(0.75, seed=1), atol=1e-4)
    with_id = datasets.load_from_disk(str(tmp_path / "saved")).rename_column("key", "id")
    assert [g["id"] for g in from_hf_dataset(with_id, tmp_path / "x", text=None, speaker=None)] == ["k0", "k1", "k2"]


def test_hf_audiofolder(tmp_path):
    d = tmp_path / "af"
    for split, names in (("train", ["a.wav", "sub/b.flac"]), ("test", ["c.wav"])):
        (d / split / "sub").mkdir(parents=True)
        for k, n in enumerate(names):
            sf.write(d / split / n, tone(0.5), 16000)
        (d / split / "metadata.csv").write_text("file_name,transcription,id,speaker\n" + "".join(
            f"{n},words {k},{split}{k},s{k}\n" for k, n in enumerate(names)))
    out = tmp_path / "af.jsonl"
    r = _cli("import-hf", d, out, "--text", "transcription")
    assert r.exit_code == 2 and "splits test, train; pass --split NAME" in r.output
    r = _cli("import-hf", d, out, "--text", "transcription", "--split", "train")
    assert r.exit_code == 0, r.output
    items = _lines(out)
    assert [(i["id"], i["text"], i["speaker"]) for i in items] == [("train0", "words 0", "s0"), ("train1", "words 1", "s1")]
    assert items[1]["audio_filepath"] == str((d / "train" / "sub" / "b.flac").resolve())
    r = _cli("import-hf", d / "train" / "sub", out)
    assert r.exit_code == 2 and "import-dir" in r.output


@pytest.mark.parametrize("command", ["import-dir", "import-table", "import-hf"])
def test_import_help_has_an_example(command):
    r = _cli(command, "--help")
    assert r.exit_code == 0 and "Example: selfspeech data " + command in " ".join(r.output.split())
