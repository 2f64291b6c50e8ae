"""Streaming evaluation (issue 7, bounded memory): the file path gives the in-memory result exactly."""
from __future__ import annotations

import json
import random

import pytest

import selfspeech.eval.report as R
import selfspeech.eval.sources as S
from selfspeech.data.manifest import ManifestError
from selfspeech.eval.report import build_results, build_results_files, read_jsonl

WORDS = "the cat sat on a mat green apples fall tree two 2 don't".split()


def _corpus(tmp_path, n=2300, seed=0):
    """References with speakers (some missing), an age field, empty/odd texts; two systems with
    missing, extra, flagged and shuffled hypotheses."""
    rng = random.Random(seed)
    refs, a, b = [], [], []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))
        r = {"id": f"u{i}", "text": text.upper() if i % 3 else text, "age": rng.choice([6, 10, 30, None])}
        if i % 50:
            r["speaker"] = f"s{rng.randint(0, 40)}"
        if i == 7:
            r["text"] = "caf\ufffd"
        refs.append({k: v for k, v in r.items() if v is not None})
        words = text.split()
        hyp = " ".join(w for w in words if rng.random() > 0.2) + (" uh" if rng.random() < 0.1 else "")
        if i % 97:
            a.append({"id": f"u{i}", "text": hyp, **({"flags": ["repeat"]} if i % 13 == 0 else {})})
        if i % 89:
            b.append({"id": f"u{i}", "text": text if rng.random() < 0.7 else hyp,
                      **({"flags": "low_logprob"} if i % 17 == 0 else {})})
    a += [{"id": f"x{i}", "text": "extra"} for i in range(25)]
    rng.shuffle(a)  # hypotheses in another order than the references
    paths = []
    for name, rows in (("ref", refs), ("a", a), ("b", b)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(p)
    return paths


@pytest.mark.parametrize("by", [(), ("age",)])
def test_streaming_equals_in_memory(tmp_path, monkeypatch, by):
    ref, a, b = _corpus(tmp_path)
    monkeypatch.setattr(R, "CHUNK", 128)  # several chunks, the last one partial
    mem = build_results(read_jsonl(ref, required=("id", "text")), read_jsonl(a, required=("id", "text")),
                        compare=read_jsonl(b, required=("id", "text")), by=by, n_resamples=200,
                        names=(str(a), str(b)), ref_name=str(ref))
    streamed = build_results_files(ref, a, b, by=by, n_resamples=200)
    assert json.dumps(streamed, sort_keys=True) == json.dumps(mem, sort_keys=True)
    sysa = streamed["system"]
    assert sysa["missing"]["count"] == len(range(0, 2300, 97)) and sysa["extra"]["count"] == 25
    assert sysa["flagged"] > 0 and streamed["compare"]["system"]["flags"]["low_logprob"] > 0
    assert any("U+FFFD" in n for n in streamed["notes"]) and any("no 'speaker'" in n for n in streamed["notes"])


def test_hash_collisions_are_resolved_by_reading_the_id(tmp_path, monkeypatch):
    ref, a, b = _corpus(tmp_path, n=300)
    expected = build_results_files(ref, a, b, n_resamples=50)
    monkeypatch.setattr(S, "id_hash", lambda uid: len(uid))  # massive collisions
    assert build_results_files(ref, a, b, n_resamples=50) == expected


def test_index_errors_name_file_and_line(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    with pytest.raises(ManifestError, match=r"h.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        S.JsonlIndex(p, required=("id", "text"))
    p.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=r"h.jsonl:2: not UTF-8"):
        S.JsonlIndex(p, required=("id", "text"))
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')  # a labeller still writing
    warned = []
    idx = S.JsonlIndex(p, required=("id", "text"), allow_partial_last=True, warn=warned.append)
    assert idx.n == 1 and "half-written" in warned[0] and [i["id"] for i in idx] == ["a"]
    assert idx.get("b") is None and idx.get("a") == {"id": "a", "text": "x"} and idx.unused(5) == (0, [])
    with pytest.raises(ManifestError, match="h.jsonl:2"):
        S.JsonlIndex(p, required=("id", "text"))


def test_cli_eval_streams_a_file_it_never_holds(tmp_path, monkeypatch):
    """The CLI takes the streaming path: read_jsonl (which holds every line) is never called."""
    from typer.testing import CliRunner

    from selfspeech.cli import app

    ref, a, b = _corpus(tmp_path, n=400)
    monkeypatch.setattr(R, "read_jsonl", lambda *x, **k: pytest.fail("eval read a whole file into memory"))
    res = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(a), "--compare", str(b), "--by", "age",
                                   "--bootstrap", "50", "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "rep" / "eval.json").read_text())
    assert out["reference"]["utterances"] == 400 and [g["name"] for g in out["system"]["groups"]][:2] == ["all", "age=6"]
