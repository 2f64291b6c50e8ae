"""Every import inside the package goes down the layer order written in ``selfspeech.LAYERS``.

Checked from the source (ast), so function-local imports, relative imports
(``from . import x``, ``from ..data import y``) and ``importlib.import_module``
with a literal name count as much as the module-level ones.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import selfspeech

PKG = Path(selfspeech.__file__).resolve().parent
LAYER = {name: i for i, names in enumerate(selfspeech.LAYERS) for name in names}


def modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def dotted(path: Path) -> list[str]:
    """``.../selfspeech/data/atomic.py`` -> ``["selfspeech", "data", "atomic"]`` (a package: its ``__init__`` dropped)."""
    parts = ["selfspeech", *path.relative_to(PKG).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def unit(parts: list[str]) -> str | None:
    """The layer unit of a module: its subpackage or top-level module; None for the package itself."""
    return parts[1] if len(parts) > 1 else None


def imported(path: Path) -> list[tuple[int, list[str]]]:
    """(line, dotted name) of every selfspeech module ``path`` imports."""
    here = dotted(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package[:len(package) - node.level + 1] if node.level else []) + (node.module or "").split(".")
            base = [b for b in base if b]
            # ``from selfspeech import config`` imports the module ``selfspeech.config``
            out += [(node.lineno, base + [a.name]) if len(base) == 1 else (node.lineno, base) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value.split(".")))
    return [(line, name) for line, name in out if name and name[0] == "selfspeech"]


def test_every_unit_of_the_package_has_a_layer():
    units = {unit(dotted(p)) for p in modules()} - {None}
    assert units - set(LAYER) == set(), "add these to selfspeech.LAYERS"
    assert set(LAYER) - units == set(), "selfspeech.LAYERS names what the package does not have"
    assert len(LAYER) == sum(map(len, selfspeech.LAYERS)), "a unit is in two layers"


def upward(path: Path) -> list[str]:
    """The imports of ``path`` that go up the layers, one line each."""
    src = unit(dotted(path))
    out = []
    for line, name in imported(path):
        dst = unit(name)
        if src is not None and dst is not None and LAYER[dst] > LAYER[src]:
            out.append(f"{path.relative_to(PKG)}:{line} imports {'.'.join(name)} "
                       f"({dst}, layer {LAYER[dst]}) from {src} (layer {LAYER[src]})")
    return out


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_down_the_layers(path):
    assert not (bad := upward(path)), "\n".join(bad)


def test_the_checker_sees_every_kind_of_import(tmp_path, monkeypatch):
    pkg = tmp_path / "selfspeech"
    (pkg / "data").mkdir(parents=True)
    f = pkg / "data" / "x.py"
    f.write_text("import selfspeech.train.loop\nfrom ..adapt import stages\nfrom . import atomic\n"
                 "from selfspeech import cli\n\ndef g():\n    from selfspeech.eval.wer import rate\n"
                 "    importlib.import_module('selfspeech.label.run')\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert [".".join(n) for _, n in imported(f)] == [
        "selfspeech.train.loop", "selfspeech.adapt", "selfspeech.data", "selfspeech.cli",
        "selfspeech.eval.wer", "selfspeech.label.run"]
    assert [u.split(" imports ")[1].split(" ")[0] for u in upward(f)] == [
        "selfspeech.train.loop", "selfspeech.adapt", "selfspeech.cli", "selfspeech.eval.wer", "selfspeech.label.run"]
