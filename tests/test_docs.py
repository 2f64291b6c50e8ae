"""The documentation site: the generated references cover every command and config field, the
benchmarks page is read from the result files, and the site builds with ``mkdocs build --strict``."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "gen"))

import bench  # noqa: E402
import cli_ref  # noqa: E402
import config_ref  # noqa: E402


def test_cli_reference_has_every_command_with_its_options_and_example():
    page = cli_ref.page()
    cmds = cli_ref.commands()
    assert len(cmds) >= 30
    for path, cmd in cmds:
        section = page.split(f"## selfspeech {' '.join(path)}\n", 1)[1].split("\n## selfspeech ", 1)[0]
        assert "Example:" in section, path
        rows = {ln.split(" | ")[0]: ln for ln in section.splitlines() if ln.startswith("| `-")}
        for p in cmd.params:
            if p.param_type_name != "option" or p.hidden:
                continue
            row = next((r for k, r in rows.items() if p.opts[0] in k.replace(",", " ").split()
                        or f"`{p.opts[0]}" in k), None)
            assert row is not None, (path, p.opts)
            if isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
                assert f"| `{p.default}` |" in row, (path, p.opts, row)


def test_config_reference_lists_every_field_with_its_default():
    for cls, keys in config_ref.all_keys().items():
        for name in config_ref.documented_fields(cls):
            assert name in keys, f"{cls.__name__}.{name} missing from the config reference"
    page = config_ref.page()
    assert "| `lambda.grid` |" in page and "| `data.target_manifest` |" in page
    assert "| `keep_every` | int | `0` |" in page


def test_field_comments_are_read_from_the_source():
    from selfspeech.train.loop import LoopConfig

    f = {f.name: f for f in dataclasses.fields(LoopConfig)}
    assert "micro-batches" in config_ref.field_doc(LoopConfig, f["grad_accum"])
    # a comment continued on the next line belongs to the field above, not the one below
    assert "fork" in config_ref.field_doc(LoopConfig, f["keep_every"])
    assert "fork" not in config_ref.field_doc(LoopConfig, f["keep_last"])


def test_every_listed_field_says_what_it_is_for():
    # a shared section's row always carries its "See [...]" link, so that alone counts as empty
    empty = [f"{cls.__name__}: {key}" for cls in config_ref.all_keys() for key, _, _, doc in config_ref.rows(cls)
             if not doc.strip() or doc.startswith("See [")]
    assert not empty, f"config fields without a comment beside them in the source: {', '.join(empty)}"


def test_every_result_file_is_on_the_benchmarks_page():
    page = bench.page()
    for name in bench.result_files():
        assert bench.area_of(name), f"benchmarks/results/{name}.json belongs to no area of docs/gen/bench.py"
        assert name in page or bench.load(name)["command"].split()[1] in page, name
        assert {"command", "date", "machine"} <= set(bench.load(name)), name


def test_benchmarks_page_regenerates_from_the_result_files(tmp_path, monkeypatch):
    src = bench.RESULTS / "parity.json"
    d = json.loads(src.read_text())
    d["ctc_beam_agreement"] = 0.5
    (tmp_path / "parity.json").write_text(json.dumps(d))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.load.cache_clear()
    try:
        table = bench.area_table("parity")
        assert "| 50.0% |" in table
        del d["ctc_beam_agreement"]
        (tmp_path / "parity.json").write_text(json.dumps(d))
        bench.load.cache_clear()
        with pytest.raises(ValueError, match="parity.json"):
            bench.area_table("parity")
    finally:
        bench.load.cache_clear()


def test_rows_of_split_0_cite_the_run_that_measured_it(tmp_path, monkeypatch):
    d = json.loads((bench.RESULTS / "pseudo2real.json").read_text())
    d["command"], d["machine"] = "python benchmarks/pseudo2real.py --seeds 7", {"processor": "Later CPU"}
    d["split0_provenance"] = {"command": "python benchmarks/pseudo2real.py --threads 1", "date": "2020-01-02",
                              "machine": {"processor": "Split0 CPU", "cpu_count": 2}}
    for name in bench.result_files():
        shutil.copyfile(bench.RESULTS / f"{name}.json", tmp_path / f"{name}.json")
    (tmp_path / "pseudo2real.json").write_text(json.dumps(d))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.load.cache_clear()
    try:
        rows = [r for r in bench.area_table("pseudo2real").splitlines() if "pseudo2real.py" in r]
        split0 = [r for r in rows if "held-out children (speechocean762" in r]
        assert split0 and all("--threads 1`" in r and "Split0 CPU" in r and "2020-01-02" in r for r in split0)
        pooled = [r for r in rows if "pooled speaker splits" in r]   # written by the latest run
        assert pooled and all("--seeds 7`" in r and "Later CPU" in r for r in pooled)
    finally:
        bench.load.cache_clear()


def test_guides_embed_tables_and_unknown_areas_are_refused():
    assert "| figure | value |" in bench.embed("x\n{{ benchmarks: parity }}\ny")
    with pytest.raises(ValueError, match="no-such-area"):
        bench.embed("{{ benchmarks: no-such-area }}")


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs not installed")
def test_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    r = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                                                                          "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").exists()
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()
