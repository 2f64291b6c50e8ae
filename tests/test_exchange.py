"""Round trips with Kaldi directories, Lhotse CutSets and Hugging Face datasets keep ids, text, speaker, metadata."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from selfspeech.data.exchange import from_hf_dataset, read_lhotse, write_kaldi_dir, write_lhotse
from selfspeech.data.kaldi import KaldiError, iter_kaldi_dir
from selfspeech.data.manifest import write_manifest

from conftest import tone


def _items(tmp_path):
    items = []
    for k, (spk, age) in enumerate([("A", 30), ("B", 8)]):
        for u in range(2):
            p = tmp_path / f"{spk}{u}.flac"
            sf.write(p, tone(1.0 + 0.5 * u, seed=k * 2 + u), 16000)
            items.append({"id": f"{spk}-{u}", "audio_filepath": str(p), "duration": 1.0 + 0.5 * u,
                          "text": f"HELLO {spk} {u}", "speaker": spk, "age": age, "gender": "f",
                          "accent": "mandarin", "score": 7.5})
    return items


def _same(a: dict, b: dict, keys):
    return {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


def test_kaldi_round_trip(tmp_path):
    items = _items(tmp_path)
    d = write_kaldi_dir(items, tmp_path / "kaldi")
    assert (d / "spk2utt").read_text().splitlines()[0] == "A A-0 A-1"
    back = list(iter_kaldi_dir(d))
    keys = ("id", "text", "speaker", "age", "gender", "accent", "score", "duration")
    assert len(back) == 4 and all(_same(a, b, keys) for a, b in zip(items, back))
    write_kaldi_dir([{k: v for k, v in it.items() if k not in ("accent", "score")} for it in items], d)
    assert not (d / "utt2meta.jsonl").exists()  # nothing left for the importer to merge into other items
    assert "accent" not in next(iter_kaldi_dir(d))
    (d / "utt2meta.jsonl").write_text('{"id": "A-0", "accent": "x"}\n[1, 2]\n')
    with pytest.raises(KaldiError, match=r"utt2meta.jsonl:2: expected a JSON object"):
        list(iter_kaldi_dir(d))
    with pytest.raises(ValueError, match="whitespace"):
        write_kaldi_dir([{**items[0], "id": "has space"}], tmp_path / "bad")
    with pytest.raises(ValueError, match="duplicate"):
        write_kaldi_dir([items[0], items[0]], tmp_path / "bad")


def test_kaldi_segments_round_trip(tmp_path):
    p = tmp_path / "long.flac"
    sf.write(p, tone(3.0), 16000)
    items = [{"id": f"seg{i}", "audio_filepath": str(p), "offset": float(i), "end": i + 0.8, "duration": 0.8,
              "text": "X", "speaker": "S"} for i in range(3)]
    d = write_kaldi_dir(items, tmp_path / "k")
    assert len((d / "wav.scp").read_text().splitlines()) == 1 and (d / "segments").is_file()
    back = list(iter_kaldi_dir(d))
    assert [(b["id"], b["offset"], b["end"]) for b in back] == [(f"seg{i}", float(i), i + 0.8) for i in range(3)]


def test_lhotse_round_trip(tmp_path):
    pytest.importorskip("lhotse")
    items = _items(tmp_path)
    items.append({"id": "seg", "audio_filepath": items[3]["audio_filepath"], "offset": 0.5, "end": 1.0,
                  "duration": 0.5, "text": "CUT", "speaker": "B"})
    path = write_lhotse(items, tmp_path / "cuts.jsonl.gz")
    back = list(read_lhotse(path))
    keys = ("id", "audio_filepath", "text", "speaker", "gender", "age", "accent", "score", "offset")
    assert len(back) == 5 and all(_same(a, b, keys) for a, b in zip(items, back)), back[0]
    assert back[-1]["duration"] == pytest.approx(0.5)


def test_hf_dataset_import_arrays_and_paths(tmp_path):
    datasets = pytest.importorskip("datasets")
    items = _items(tmp_path)
    decoded = datasets.Dataset.from_dict({
        "audio": [{"array": sf.read(it["audio_filepath"])[0].tolist(), "sampling_rate": 16000} for it in items],
        "sentence": [it["text"] for it in items], "client": [it["speaker"] for it in items],
        "key": [it["id"] for it in items], "up_votes": [3, 1, 0, 2]})
    got = list(from_hf_dataset(decoded, tmp_path / "hf_audio", text="sentence", speaker="client", id_column="key"))
    assert [g["id"] for g in got] == [it["id"] for it in items] and got[0]["up_votes"] == 3
    assert got[1]["duration"] == pytest.approx(1.5) and got[1]["text"] == "HELLO A 1"
    wav, sr = sf.read(got[1]["audio_filepath"])
    assert sr == 16000 and np.allclose(wav, sf.read(items[1]["audio_filepath"])[0], atol=1e-4)
    by_path = datasets.Dataset.from_dict({"audio": [it["audio_filepath"] for it in items],
                                          "text": [it["text"] for it in items]})
    got = list(from_hf_dataset(by_path, tmp_path / "unused", speaker=None))
    assert got[0]["audio_filepath"] == items[0]["audio_filepath"] and got[3]["text"] == "HELLO B 1"
    with pytest.raises(ValueError, match="no column 'speaker'"):
        list(from_hf_dataset(by_path, tmp_path / "x"))
    write_manifest(tmp_path / "m.jsonl", got)
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4 and json.loads(
        (tmp_path / "m.jsonl").read_text().splitlines()[0])["id"] == "utt0000000"


def test_exchange_cli_round_trip(tmp_path):
    pytest.importorskip("lhotse")
    from typer.testing import CliRunner

    from selfspeech.cli import app
    from selfspeech.data.manifest import read_manifest

    items = _items(tmp_path)
    write_manifest(tmp_path / "m.jsonl", items)
    r = CliRunner()
    assert r.invoke(app, ["data", "export-lhotse", str(tmp_path / "m.jsonl"), str(tmp_path / "c.jsonl.gz")]).exit_code == 0
    assert r.invoke(app, ["data", "import-lhotse", str(tmp_path / "c.jsonl.gz"), str(tmp_path / "m2.jsonl")]).exit_code == 0
    assert r.invoke(app, ["data", "export-kaldi", str(tmp_path / "m2.jsonl"), str(tmp_path / "k")]).exit_code == 0
    back = list(iter_kaldi_dir(tmp_path / "k"))
    assert [(b["id"], b["text"], b["speaker"], b["accent"]) for b in back] == \
        [(i["id"], i["text"], i["speaker"], i["accent"]) for i in read_manifest(tmp_path / "m.jsonl")]
