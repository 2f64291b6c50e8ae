"""The package's atomic writers (selfspeech.data.atomic): a kill at any step keeps a complete output.

The kill tests run the real writer in a subprocess that stops at one step of
the directory replacement (before the old output is renamed aside, before the
new one is renamed in, after it is in) and SIGKILL it there, as an OOM kill or
a pre-empted node would.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfspeech.arith.task_vector import TaskVector, apply_to_dir, load_state
from selfspeech.data.atomic import atomic_path, old_copy, resolve_dir, write_dir, write_json
from selfspeech.models.export import export_ctranslate2

SRC = str(Path(__file__).resolve().parents[1] / "src")

# the child stops at rename call number N (1: out -> .out.old, 2: tmp -> out), before or after it
CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {src!r})
    call, when, target = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    real, calls = {fn}, []

    def stop(*a, **k):
        calls.append(a)
        if len(calls) == call and when == "before":
            print("stopped", flush=True); time.sleep(120)
        real(*a, **k)
        if len(calls) == call and when == "after":
            print("stopped", flush=True); time.sleep(120)

    {fn} = stop
    {body}
    print("finished", flush=True)  # never reached at a stop
""")

class FakeConverter:
    """ctranslate2's TransformersConverter, minus the conversion: slow, and the write path is the same."""

    def __init__(self, model_dir, copy_files=(), load_as_float16=False):
        pass

    def convert(self, output_dir, quantization=None, force=False):
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.bin").write_text("new")


EXPORT = "from pathlib import Path\n" + inspect.getsource(FakeConverter) + """
import ctranslate2
ctranslate2.converters.TransformersConverter = FakeConverter
from selfspeech.models.export import export_ctranslate2
export_ctranslate2(sys.argv[4], target)
"""

APPLY = """
from selfspeech.arith.task_vector import TaskVector, apply_to_dir
apply_to_dir(sys.argv[4], TaskVector.load(sys.argv[5]), 1.0, target)
"""

SAVE = """
from selfspeech.arith.task_vector import TaskVector
TaskVector.load(sys.argv[4]).save(target)
"""


def run_and_kill(body: str, call: int, when: str, *args, fn: str = "os.rename") -> None:
    """Run ``body`` in a child stopped at the ``call``-th ``fn`` call and SIGKILL it there."""
    code = CHILD.format(src=SRC, fn=fn, body=body)
    child = subprocess.Popen([sys.executable, "-c", code, str(call), when, *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        assert line == "stopped", (line, child.communicate(timeout=60)[1])  # not finished, nor failed
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)


def siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# the points of a replacement a kill can land on, and which output must be readable after it
KILLS = [(1, "before", "old"), (2, "before", "old"), (2, "after", "new")]


@pytest.mark.parametrize("call,when,survivor", KILLS)
def test_a_killed_export_keeps_the_old_model(tmp_path, monkeypatch, call, when, survivor):
    pytest.importorskip("ctranslate2")
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "ct2"
    write_dir(out, lambda d: (d / "model.bin").write_text("old"))

    run_and_kill(EXPORT, call, when, out, model)
    got = resolve_dir(out)
    assert got is not None and (got / "model.bin").read_text() == survivor
    # the next export replaces whatever the kill left, and leaves nothing else behind
    ctranslate2 = pytest.importorskip("ctranslate2")
    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", FakeConverter)
    export_ctranslate2(model, out)
    assert (out / "model.bin").read_text() == "new" and siblings(tmp_path) == ["ct2", "student"]


def _base_and_tau(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(4)}, str(base / "model.safetensors"))
    (base / "config.json").write_text("{}")
    tau = TaskVector({"w": torch.ones(4)}).save(tmp_path / "tau.safetensors")
    return base, tau


@pytest.mark.parametrize("call,when,survivor", KILLS)
def test_a_killed_task_arithmetic_keeps_the_old_model(tmp_path, call, when, survivor):
    base, tau = _base_and_tau(tmp_path)
    out = tmp_path / "model"
    apply_to_dir(base, TaskVector.load(tau), 0.0, out)  # the old output: lambda 0, all zeros

    run_and_kill(APPLY, call, when, out, base, tau)
    got = resolve_dir(out)
    assert got is not None and (got / "config.json").is_file() and (got / "task_arithmetic.json").is_file()
    assert torch.equal(load_state(got)["w"], torch.full((4,), 0.0 if survivor == "old" else 1.0))
    apply_to_dir(base, TaskVector.load(tau), 1.0, out)
    assert torch.equal(load_state(out)["w"], torch.ones(4))
    assert siblings(tmp_path) == ["base", "model", "tau.safetensors"]


def test_a_killed_task_vector_save_keeps_the_old_file(tmp_path):
    _, tau = _base_and_tau(tmp_path)
    out = tmp_path / "saved.safetensors"
    save_file({"w": torch.full((4,), 7.0)}, str(out))
    run_and_kill(SAVE, 1, "before", out, tau, fn="os.replace")
    assert torch.equal(load_file(str(out))["w"], torch.full((4,), 7.0))
    TaskVector.load(tau).save(out)
    assert torch.equal(load_file(str(out))["w"], torch.ones(4))
    assert siblings(tmp_path) == ["base", "saved.safetensors", "tau.safetensors"]


def test_a_failed_directory_write_keeps_the_old_one_and_no_temp(tmp_path):
    out = tmp_path / "out"
    write_dir(out, lambda d: (d / "f").write_text("old"))

    def crash(d: Path) -> None:
        (d / "f").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir(out, crash)
    assert (out / "f").read_text() == "old" and siblings(tmp_path) == ["out"]


def test_resolve_dir_falls_back_to_the_copy_kept_between_the_renames(tmp_path):
    out = tmp_path / "out"
    assert resolve_dir(out) is None
    old_copy(out).mkdir()
    assert resolve_dir(out) == old_copy(out)
    write_dir(out, lambda d: (d / "f").write_text("new"))  # the aside copy goes once the new one is in
    assert resolve_dir(out) == out and siblings(tmp_path) == ["out"]


def test_atomic_path_keeps_the_old_file_on_failure_and_names_the_suffix(tmp_path):
    p = tmp_path / "cuts.jsonl.gz"
    p.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(p, suffix=".jsonl.gz") as tmp:
            assert tmp.name.endswith(".jsonl.gz") and tmp.parent == tmp_path
            tmp.write_text("half")
            raise ValueError
    assert p.read_text() == "old" and siblings(tmp_path) == ["cuts.jsonl.gz"]


def test_write_json_is_strict_and_keeps_the_old_file_on_a_bad_value(tmp_path):
    p = write_json(tmp_path / "r.json", {"wer": math.inf, "ci": [math.nan, 0.5], "path": Path("a")}, default=str)
    text = p.read_text()
    assert json.loads(text) == {"wer": None, "ci": [None, 0.5], "path": "a"} and text.endswith("\n")
    with pytest.raises(TypeError):
        write_json(p, {"x": object()})  # without ``default``: refused, and the old file stays
    assert json.loads(p.read_text())["path"] == "a"
    assert siblings(tmp_path) == ["r.json"]
