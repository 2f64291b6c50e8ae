"""Every report and result file records the software (and CPU) its figures were computed with."""
from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from selfspeech.data import versions as V

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["python", "selfspeech", "torch", "transformers", "ctranslate2", "faster-whisper", "espeakng-loader", "cpu"]


def test_software_versions_names_the_packages_that_move_the_figures():
    v = V.software_versions()
    assert list(v) == KEYS
    assert v["python"] == platform.python_version()
    for dist in ("torch", "transformers", "ctranslate2", "faster-whisper", "espeakng-loader"):
        assert v[dist] == metadata.version(dist)          # installed here: real versions, not placeholders
    assert v["cpu"] and v["cpu"] != "unknown"
    v["torch"] = "edited"
    assert V.software_versions()["torch"] != "edited"      # a fresh dict: callers cannot corrupt the record


def test_a_missing_package_is_recorded_as_not_installed(monkeypatch):
    real = metadata.version

    def version(dist):
        if dist == "ctranslate2":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(V.metadata, "version", version)
    v = dict(V._versions.__wrapped__())                   # uncached: the cache holds this process's record
    assert v["ctranslate2"] == V.NOT_INSTALLED and v["torch"] == real("torch")


def test_versions_line_lists_every_package_then_the_cpu():
    line = V.versions_line({"python": "3.11.7", "torch": "2.13.0+cpu", "cpu": "Some CPU"})
    assert line == "Software: python 3.11.7, torch 2.13.0+cpu; CPU: Some CPU"
    assert V.versions_line().startswith(f"Software: python {platform.python_version()}, selfspeech ")
    assert f"ctranslate2 {metadata.version('ctranslate2')}" in V.versions_line()


def _refs_hyps():
    refs = [{"id": f"s{s}_{u}", "audio_filepath": "x.flac", "speaker": f"s{s}", "text": "the cat sat on the mat"}
            for s in range(3) for u in range(2)]
    hyps = [{"id": r["id"], "text": "the cat sat on a mat" if r["speaker"] == "s0" else r["text"]} for r in refs]
    return refs, hyps


def test_eval_json_and_markdown_record_the_versions(tmp_path):
    from selfspeech.eval.report import build_results, write_report

    refs, hyps = _refs_hyps()
    paths = write_report(build_results(refs, hyps, n_resamples=50), tmp_path)
    assert json.loads(paths["json"].read_text())["versions"] == V.software_versions()
    assert V.versions_line() in paths["md"].read_text()


def test_pseudo2real_scores_and_report_record_the_versions(tmp_path):
    from selfspeech.adapt.report import score_systems, write_report
    from selfspeech.data.manifest import write_manifest

    refs, hyps = _refs_hyps()
    write_manifest(tmp_path / "eval.jsonl", refs)
    for name in ("teacher", "pseudo_ft", "p2r"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hyps))
    scores = score_systems(str(tmp_path / "eval.jsonl"), {n: str(tmp_path / f"{n}.jsonl")
                                                          for n in ("teacher", "pseudo_ft", "p2r")}, "basic",
                           n_resamples=50)
    result = {"lambda": {"lambda": 1.0, "rule": "source_sim"}, "parts": {}, "label_stats": {}, "pseudo_counts": {},
              "times": {"label": 1.0}, "cached": {}}
    report = write_report(tmp_path, result, scores, "t")
    assert json.loads((tmp_path / "scores.json").read_text())["versions"] == V.software_versions()
    assert V.versions_line() in report.read_text()


def test_sv_score_metrics_and_report_record_the_versions(tmp_path):
    from typer.testing import CliRunner

    from selfspeech.cli import app
    from selfspeech.cluster.speakers import save_embeddings
    from selfspeech.data.manifest import write_manifest

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8))
    emb = {f"s{s}u{u}": centres[s] + 0.1 * rng.standard_normal(8) for s in range(3) for u in range(3)}
    save_embeddings(tmp_path / "u.npz", emb)
    write_manifest(tmp_path / "m.jsonl", [{"id": k, "audio_filepath": "x.flac", "speaker": k[:2]} for k in emb])
    res = CliRunner().invoke(app, ["sv", "score", str(tmp_path / "u.npz"), "--manifest", str(tmp_path / "m.jsonl"),
                                   "--out", str(tmp_path / "score")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "score" / "metrics.json").read_text())["versions"] == V.software_versions()
    assert V.versions_line() in (tmp_path / "score" / "report.md").read_text()


def test_benchmark_result_files_record_the_versions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    sys.modules.pop("common", None)
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    path = common.write_result("probe", {"x": 1})
    out = json.loads(path.read_text())
    assert out["x"] == 1 and out["versions"] == V.software_versions()
    assert out["machine"]["processor"] == V.cpu_model()

