"""Evaluation: hand-counted WER/CER, corpus aggregation, bootstrap intervals, report and CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from selfspeech.data.atomic import write_json
from selfspeech.data.manifest import ManifestError
from selfspeech.eval.report import build_results, plot_wer_bars, read_jsonl, render_markdown
from selfspeech.eval.wer import FIELDS, ErrorCounts, bootstrap_ci, count_errors, count_errors_batch, paired_bootstrap

# ------------------------------------------------------------------ counts


@pytest.mark.parametrize("ref,hyp,words,chars", [
    # (S, D, I, H, N) words, (S, D, I, H, N) characters with spaces counted
    ("a b c", "a x c", (1, 0, 0, 2, 3), (1, 0, 0, 4, 5)),   # substitution
    ("a b c", "a c", (0, 1, 0, 2, 3), (0, 2, 0, 3, 5)),     # deletion: "b" and one space
    ("a b", "a b c", (0, 0, 1, 2, 2), (0, 0, 2, 3, 3)),     # insertion: space and "c"
    ("", "a b", (0, 0, 2, 0, 0), (0, 0, 3, 0, 0)),          # empty reference
    ("a b", "", (0, 2, 0, 0, 2), (0, 3, 0, 0, 3)),          # empty hypothesis
    ("", "", (0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
])
def test_hand_counted(ref, hyp, words, chars):
    c = count_errors(ref, hyp)
    assert tuple(c.as_array()) == words + chars


def test_rates_and_empty_reference():
    assert count_errors("a b c", "a x c").wer == pytest.approx(1 / 3)
    assert count_errors("a b c", "a x c").cer == pytest.approx(1 / 5)
    assert count_errors("a b", "").wer == 1.0
    assert count_errors("", "").wer == 0.0
    assert math.isinf(count_errors("", "a").wer)  # undefined alone, but no ZeroDivisionError
    # an empty reference still adds its insertions to a corpus
    total = count_errors("a b", "a b") + count_errors("", "x y")
    assert total.insertions == 2 and total.wer == 1.0


def test_extra_whitespace_ignored():
    assert count_errors("a  b ", " a b").errors == 0


def test_corpus_wer_is_not_mean_of_rates():
    refs = ["a", "a b c d e f g h i j"]
    hyps = ["b", "a b c d e f g h i j"]
    counts = count_errors_batch(refs, hyps)
    mean_rate = np.mean([ErrorCounts.from_array(r).wer for r in counts])
    corpus = ErrorCounts.from_array(counts)
    assert mean_rate == pytest.approx(0.5)
    assert corpus.wer == pytest.approx(1 / 11)
    res = build_results([{"id": str(i), "text": r} for i, r in enumerate(refs)],
                        [{"id": str(i), "text": h} for i, h in enumerate(hyps)], normalizer="none", n_resamples=0)
    assert res["system"]["groups"][0]["wer"] == pytest.approx(1 / 11)


def test_batch_matches_single():
    refs, hyps = ["the cat sat", "", "on the mat"], ["the bat sat down", "uh", ""]
    batch = count_errors_batch(refs, hyps)
    for r, h, row in zip(refs, hyps, batch):
        assert (count_errors(r, h).as_array() == row).all()
    assert batch.shape == (3, len(FIELDS))


# ------------------------------------------------------------------ groups


def _group_words(items, by):
    """Group name -> reference words; item i has 2**i words, so the sum says which items a group holds."""
    refs = [{"id": str(i), "text": " ".join(["w"] * 2 ** i), **it} for i, it in enumerate(items)]
    r = build_results(refs, [{"id": x["id"], "text": x["text"]} for x in refs], by=by, normalizer="none",
                      n_resamples=0)
    return [(g["name"], g["ref_words"]) for g in r["system"]["groups"]]


def test_grouping_each_field_separately_plus_all():
    items = [{"age_group": "child", "speaker": "s1"}, {"age_group": "adult", "speaker": "s1"},
             {"age_group": "child", "speaker": "s2"}, {"speaker": "s3", "metadata": {}}]
    assert dict(_group_words(items, ["age_group", "speaker"])) == {
        "all": 15, "age_group=adult": 2, "age_group=child": 1 + 4, "age_group=(missing)": 8,
        "speaker=s1": 1 + 2, "speaker=s2": 4, "speaker=s3": 8}
    with pytest.raises(ValueError, match="agegroup"):
        _group_words(items, ["agegroup"])


def test_numeric_group_values_sort_numerically():
    items = [{"age": 10}, {"age": 6}, {"age": 8}]
    assert [n for n, _ in _group_words(items, ["age"])] == ["all", "age=6", "age=8", "age=10"]


# ------------------------------------------------------------------ bootstrap


def _synthetic(n_speakers: int, utts: int = 4, seed: int = 1):
    """Counts whose per-speaker error rate varies (0..40%), ten words an utterance."""
    rng = np.random.default_rng(seed)
    rows, speakers = [], []
    for s in range(n_speakers):
        p = rng.uniform(0, 0.4)
        for _ in range(utts):
            e = rng.binomial(10, p)
            rows.append([e, 0, 0, 10 - e, 10, 2 * e, 0, 0, 40 - 2 * e, 40])
            speakers.append(f"spk{s}")
    return np.array(rows), speakers


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    counts, spk = _synthetic(20)
    point = ErrorCounts.from_array(counts)
    ci = bootstrap_ci(counts, spk, n_resamples=500, seed=3)
    assert ci.unit == "speaker" and ci.n_units == 20
    assert ci.wer[0] <= point.wer <= ci.wer[1] and ci.cer[0] <= point.cer <= ci.cer[1]
    assert ci.wer[0] < ci.wer[1]
    assert bootstrap_ci(counts, spk, n_resamples=500, seed=3) == ci
    assert bootstrap_ci(counts, spk, n_resamples=500, seed=4) != ci


def test_bootstrap_width_shrinks_with_more_speakers():
    def width(n):
        counts, spk = _synthetic(n)
        lo, hi = bootstrap_ci(counts, spk, n_resamples=500, seed=0).wer
        return hi - lo
    assert width(100) < width(6)


def test_bootstrap_falls_back_to_utterances():
    counts, _ = _synthetic(5)
    assert bootstrap_ci(counts, None, 100).unit == "utterance"
    one = bootstrap_ci(counts, ["s"] * len(counts), 100)
    assert one.unit == "utterance" and one.n_units == len(counts) and one.wer[0] < one.wer[1]
    off = bootstrap_ci(counts, None, 0)
    assert math.isnan(off.wer[0])


def test_speaker_bootstrap_wider_than_utterance_bootstrap():
    # utterances of one speaker are alike: ignoring that understates uncertainty
    counts, spk = _synthetic(10, utts=20)
    s = bootstrap_ci(counts, spk, 500, seed=0).wer
    u = bootstrap_ci(counts, None, 500, seed=0).wer
    assert s[1] - s[0] > u[1] - u[0]


def test_paired_bootstrap_sign():
    b, spk = _synthetic(12)
    a = b.copy()
    a[:, 0] += 1  # A makes one more substitution on every utterance: B strictly better
    a[:, 3] -= 1
    p = paired_bootstrap(a, b, spk, n_resamples=500, seed=0)
    assert p.diff > 0 and p.diff_ci[0] > 0 and p.rel_ci[0] > 0
    assert p.p_not_better == 0.0
    assert p.rel_reduction == pytest.approx(1 - p.wer_b / p.wer_a)
    q = paired_bootstrap(b, a, spk, n_resamples=500, seed=0)
    assert q.diff_ci[1] < 0 and q.p_not_better == 1.0
    same = paired_bootstrap(b, b, spk, n_resamples=200, seed=0)
    assert same.diff_ci == (0.0, 0.0) and same.p_not_better == 1.0  # a tie is "not better"


# ------------------------------------------------------------------ I/O and report


def _write(path, rows, tail: str = ""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def test_read_jsonl_tolerates_half_written_last_line(tmp_path):
    p = _write(tmp_path / "h.jsonl", [{"id": 1, "text": "a"}], tail='{"id": "2", "te')
    msgs = []
    items = read_jsonl(p, allow_partial_last=True, warn=msgs.append)
    assert [i["id"] for i in items] == ["1"] and "h.jsonl:2" in msgs[0]
    with pytest.raises(ManifestError, match=r"h\.jsonl:2"):
        read_jsonl(p)  # a reference must be complete


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"id": "1", "text": "a"}\nnot json\n{"id": "3"}\n')
    with pytest.raises(ManifestError, match=r"h\.jsonl:2: not valid JSON"):
        read_jsonl(p, allow_partial_last=True)
    p.write_text('{"id": "1", "text": "a"}\n{"text": "b"}\n')
    with pytest.raises(ManifestError, match=r"h\.jsonl:2: missing field\(s\) id"):
        read_jsonl(p)
    p.write_text('{"id": "1"}\n{"id": 1}\n')
    with pytest.raises(ManifestError, match="duplicate id"):
        read_jsonl(p)
    with pytest.raises(ManifestError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_build_results_reports_missing_extra_and_flags():
    refs = [{"id": "1", "text": "a b", "speaker": "x"}, {"id": "2", "text": "c", "speaker": "y"}]
    hyps = [{"id": "1", "text": "a b", "flags": ["low_logprob", "repeat"]}, {"id": "9", "text": "z", "flags": ["repeat"]}]
    r = build_results(refs, hyps, normalizer="none", n_resamples=50)
    s = r["system"]
    assert s["missing"] == {"count": 1, "ids": ["2"]} and s["extra"] == {"count": 1, "ids": ["9"]}
    assert s["flagged"] == 1 and s["flags"] == {"low_logprob": 1, "repeat": 1}  # only scored hypotheses
    assert s["groups"][0]["deletions"] == 1 and s["groups"][0]["wer"] == pytest.approx(1 / 3)
    md = render_markdown(r)
    assert "Missing hypotheses: 1" in md and "Unknown ids: 1" in md and "`repeat` 1" in md
    assert "| all | 2 | 3 | 33.33%" in md


def test_write_json_is_strict_json(tmp_path):
    p = write_json(tmp_path / "r.json", {"wer": math.inf, "ci": [math.nan, 0.5]})
    assert json.loads(p.read_text()) == {"wer": None, "ci": [None, 0.5]}
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp file left


def test_plot_wer_bars_several_systems(tmp_path):
    res = {"whisper": {"all": (0.2, 0.15, 0.25), "child": (0.3, 0.2, 0.4)},
           "adapted": {"all": (0.1, 0.08, 0.12), "child": (math.nan, math.nan, math.nan)}}
    p = plot_wer_bars(res, tmp_path / "sub" / "wer.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ CLI


@pytest.fixture
def corpus(tmp_path):
    """6 speakers x 3 utterances; A substitutes one word in half, B is perfect, one A hyp missing."""
    refs, a, b = [], [], []
    for s in range(6):
        for u in range(3):
            i, text = f"s{s}u{u}", f"The cat number {u} sat on mat {s}."
            refs.append({"id": i, "audio_filepath": f"{i}.wav", "text": text, "speaker": f"s{s}",
                         "age_group": "child" if s < 3 else "adult"})
            b.append({"id": i, "text": text.lower()})
            if i != "s5u2":
                a.append({"id": i, "text": text.replace("cat", "bat") if u % 2 else text,
                          "flags": ["low_logprob"] if u == 1 else []})
    a.append({"id": "stray", "text": "hello"})
    return (_write(tmp_path / "ref.jsonl", refs), _write(tmp_path / "a.jsonl", a, tail='{"id": "s5u2", "te'),
            _write(tmp_path / "b.jsonl", b))


def test_cli_end_to_end(tmp_path, corpus):
    from selfspeech.cli import app

    ref, a, b = corpus
    out = tmp_path / "report"
    # 17 of 18 reference ids have an A hypothesis: below the default --min-coverage 0.95, allowed here
    res = CliRunner().invoke(app, ["eval", "--ref", str(ref), "--hyp", str(a), "--by", "age_group,speaker",
                                   "--compare", str(b), "--out", str(out), "--bootstrap", "200", "--seed", "1",
                                   "--min-coverage", "0.9"])
    assert res.exit_code == 0, res.output
    assert "WER" in res.output and "half-written" in res.output
    r = json.loads((out / "eval.json").read_text())
    assert r["normalizer"] == "whisper_english" and r["bootstrap"]["unit"] == "speaker"
    allg = r["system"]["groups"][0]
    # 6 utterances with one substitution, s5u2 missing (8 words deleted); 18 x 8 words
    assert (allg["substitutions"], allg["deletions"], allg["ref_words"]) == (6, 8, 144)
    assert allg["wer_ci"][0] <= allg["wer"] <= allg["wer_ci"][1]
    assert r["system"]["missing"]["ids"] == ["s5u2"] and r["system"]["extra"]["ids"] == ["stray"]
    assert r["system"]["flags"] == {"low_logprob": 6}
    assert [g["name"] for g in r["system"]["groups"]][:3] == ["all", "age_group=adult", "age_group=child"]
    paired = r["compare"]["paired"][0]
    assert paired["diff"] > 0 and paired["diff_ci"][0] > 0 and paired["p_not_better"] == 0.0
    md = (out / "eval.md").read_text()
    assert "| group | utterances | ref words | WER [95% CI] | CER [95% CI] | sub/del/ins |" in md
    assert "A vs B" in md and "whisper_english" in md
    assert (out / "wer.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_one_line(tmp_path, corpus):
    from selfspeech.cli import app

    ref, a, _ = corpus
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--ref", str(tmp_path / "nope.jsonl"), "--hyp", str(a)])
    assert res.exit_code == 2 and "nope.jsonl: file not found" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "s0u0", "text": "x"}\n{oops\n{"id": "s0u1", "text": "y"}\n')
    res = runner.invoke(app, ["eval", "--ref", str(ref), "--hyp", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["eval", "--ref", str(ref), "--hyp", str(a), "--by", "agegroup"])
    assert res.exit_code == 2 and "agegroup" in res.output
    res = runner.invoke(app, ["eval", "--ref", str(ref), "--hyp", str(a), "--normalizer", "fancy"])
    assert res.exit_code == 2 and "fancy" in res.output


def test_cli_help_has_example():
    from selfspeech.cli import app

    res = CliRunner().invoke(app, ["eval", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "--compare" in res.output
