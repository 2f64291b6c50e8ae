"""Outcomes of `decode-ctc`, `sv embed` and `eval`: every item failed exits 1 in one line, summaries on stdout
(--json: one object), eval's coverage refusal, --subset and --align."""
from __future__ import annotations

import json

import pytest
import soundfile as sf
from conftest import tone
from test_inference_device import _ctc_dir  # a tiny untrained CTC model folder
from typer.testing import CliRunner

from selfspeech.cli import app
from selfspeech.data.manifest import write_manifest


def _manifest(tmp_path, n=3, missing=()):
    """A manifest of ``n`` tones in a folder of its own; the ``missing`` ones have no audio file."""
    tmp_path = tmp_path / f"m{n}-{'-'.join(map(str, missing))}"
    tmp_path.mkdir()
    items = []
    for i in range(n):
        p = tmp_path / f"u{i}.wav"
        if i not in missing:
            sf.write(p, tone(0.8 + 0.2 * i, freq=180 + 60 * i, seed=i), 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(p), "duration": 0.8 + 0.2 * i, "speaker": f"s{i % 2}"})
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    return m


def _error_lines(r) -> list[str]:
    return [x for x in r.stderr.splitlines() if x.startswith("error:")]


def test_decode_ctc_counts_failures_and_exits_1_when_all_failed(tmp_path):
    d = _ctc_dir(tmp_path)
    argv = ["decode-ctc", str(d), "--out", str(tmp_path / "h.jsonl"), "--device", "cpu", "--json", "--in"]
    r = CliRunner().invoke(app, [*argv, str(_manifest(tmp_path, 3, missing=(1,)))])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["utterances"] == 3 and s["failed"] == 1 and s["first_failure"].startswith("u1: ")
    r = CliRunner().invoke(app, [*argv, str(_manifest(tmp_path, 2, missing=(0, 1)))])
    assert r.exit_code == 1, r.output
    assert json.loads(r.stdout)["failed"] == 2
    err = _error_lines(r)
    assert len(err) == 1 and err[0].startswith("error: all 2 utterances failed (first: u0: ")


def test_sv_embed_summary_on_stdout_and_exit_1_when_nothing_embedded(tmp_path):
    argv = ["sv", "embed", "melstats", "--out", str(tmp_path / "emb"), "--no-plot", "--json"]
    r = CliRunner().invoke(app, [*argv[:3], str(_manifest(tmp_path, 3, missing=(2,))), *argv[3:]])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["utterances"] == 2 and [x["id"] for x in s["skipped"]] == ["u2"] and s["out"] == str(tmp_path / "emb")
    r = CliRunner().invoke(app, [*argv[:3], str(_manifest(tmp_path, 2, missing=(0, 1))), *argv[3:]])
    assert r.exit_code == 1, r.output
    err = _error_lines(r)
    assert len(err) == 1 and err[0].startswith("error: all 2 utterances failed (first: u0: ")
    assert not (tmp_path / "emb" / "utterances.npz").exists()


# ------------------------------------------------------------------ eval

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def superset(tmp_path):
    """A reference of 40 utterances and hypotheses for 4 of them (one with an error)."""
    refs = [{"id": f"u{i}", "text": f"the cat number {i} sat", "speaker": f"s{i % 5}"} for i in range(40)]
    hyps = [{"id": f"u{i}", "text": f"the cat number {i} sat"} for i in range(3)]
    hyps.append({"id": "u3", "text": "a cat number 3 sat down"})
    return _write(tmp_path / "ref.jsonl", refs), _write(tmp_path / "hyp.jsonl", hyps)


def test_eval_refuses_hypotheses_covering_too_little_of_the_reference(tmp_path, superset):
    ref, hyp = superset
    r = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(hyp), "--bootstrap", "0"])
    assert r.exit_code == 2, r.output
    err = [x for x in r.output.splitlines() if x.strip()]
    assert len(err) == 1 and "hypotheses for 4 of 40 reference ids" in err[0] and "(10.0%" in err[0]
    assert "--min-coverage 0.95" in err[0] and "--subset" in err[0]
    r = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(hyp), "--bootstrap", "0",
                                 "--min-coverage", "0", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["system"]["groups"][0]["wer"] > 0.8  # the old 90%-deleted WER


def test_eval_subset_scores_only_covered_references_and_says_so(tmp_path, superset):
    ref, hyp = superset
    r = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(hyp), "--bootstrap", "0", "--subset",
                                 "--json", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)                          # stdout: exactly one JSON object, eval.json's content
    assert res == json.loads((tmp_path / "rep" / "eval.json").read_text())
    g = res["system"]["groups"][0]
    assert g["utterances"] == 4 and g["ref_words"] == 20 and (g["substitutions"], g["insertions"]) == (1, 1)
    assert res["system"]["missing"]["count"] == 0 and "reference ids have no hypothesis" not in r.stderr
    assert res["coverage"]["subset"] and res["coverage"]["references"] == 40
    assert any("scored only the 4 of 40" in n for n in res["notes"])
    assert "scored only the 4 of 40" in (tmp_path / "rep" / "eval.md").read_text()
    r = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(hyp), "--bootstrap", "0", "--subset"])
    assert r.exit_code == 0 and "Evaluation" in r.stdout and "scored only" in r.stdout


def test_eval_align_writes_per_utterance_word_operations(tmp_path, superset):
    ref, hyp = superset
    out = tmp_path / "align.jsonl"
    r = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(hyp), "--bootstrap", "0", "--subset",
                                 "--align", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["u0", "u1", "u2", "u3"]
    u3 = rows[3]
    assert u3["ref"] == "the cat number 3 sat" and u3["hyp"] == "a cat number 3 sat down"
    assert u3["ops"] == [["S", "the", "a"], ["C", "cat", "cat"], ["C", "number", "number"], ["C", "3", "3"],
                         ["C", "sat", "sat"], ["I", None, "down"]]
    assert (u3["substitutions"], u3["deletions"], u3["insertions"], u3["hits"]) == (1, 0, 1, 4)
    assert all(x["ops"] == [["C", w, w] for w in x["ref"].split()] for x in rows[:3])


def test_align_scores_a_missing_hypothesis_as_deletions(tmp_path):
    from selfspeech.eval.align import write_alignments
    from selfspeech.eval.sources import ListSource

    n = write_alignments([{"id": "a", "text": "b c"}, {"id": "e", "text": ""}],
                         ListSource([{"id": "e", "text": "uh"}]), str.lower, tmp_path / "al.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "al.jsonl").read_text().splitlines()]
    assert n == 2 and rows[0]["ops"] == [["D", "b", None], ["D", "c", None]] and rows[0]["deletions"] == 2
    assert rows[1]["ops"] == [["I", None, "uh"]]


def test_eval_exits_1_when_every_scored_hypothesis_is_a_failed_decode(tmp_path, superset):
    ref, _ = superset
    hyp = _write(tmp_path / "failed.jsonl", [{"id": f"u{i}", "text": "", "status": "failed", "reason": "unreadable"}
                                             for i in range(40)])
    r = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(hyp), "--bootstrap", "0", "--json"])
    assert r.exit_code == 1, r.output
    assert json.loads(r.stdout)["system"]["flags"] == {"failed": 40}
    err = _error_lines(r)
    assert len(err) == 1 and err[0].startswith("error: all 40 decodes in --hyp failed")
