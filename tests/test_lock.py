"""requirements/lock.txt pins every package that `make install` takes, inside pyproject's ranges."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for n, line in enumerate(LOCK.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            assert m, f"{LOCK}:{n}: {line!r} is not 'name==version' (pip -c takes exact pins only)"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _wanted() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_lock_pins_every_dependency_and_dev_extra_within_pyprojects_range():
    pins = _pins()
    for req in _wanted():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in {LOCK}: run make lock"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), \
            f"{LOCK} pins {req.name}=={pins[name]} outside pyproject's {req.specifier}: run make lock"


def test_make_installs_torch_first_then_everything_through_the_lock():
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^LOCK := requirements/lock\.txt$", make, re.M)
    torch = re.search(r"^\t\$\(PY\) -m pip install -q torch==(\S+)$", make, re.M)
    # the lock's pin has no local label, so that it matches the CPU build (2.13.0+cpu) installed first
    assert torch and _pins()["torch"] == torch[1] == "2.13.0"
    assert re.search(r"^\t\$\(PY\) -m pip install -q -c \$\(LOCK\) -e '\.\[dev\]'$", make, re.M)
