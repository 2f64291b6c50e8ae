"""What a result was computed with: Python, the packages that move the figures, and the CPU.

Every report and result file records :func:`software_versions`, because the same
code gives other figures under other versions or on another processor: the
teacher's CTranslate2 int8 kernels differ between CPU vendors and instruction
sets (MKL on Intel, oneDNN elsewhere), the synthetic speech is whatever the
espeakng-loader release's eSpeak NG makes, and training follows torch and transformers.
``make install`` pins the packages (``requirements/lock.txt``); the CPU cannot
be pinned, so it is written down.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

# distribution names, in the order the record lists them
PACKAGES = ("selfspeech", "torch", "transformers", "ctranslate2", "faster-whisper", "espeakng-loader")
NOT_INSTALLED = "not installed"


def software_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "selfspeech": "0.1.0", "torch": "2.13.0+cpu", ..., "cpu": "..."}``.

    Read from the installed distributions' metadata (nothing is imported); a package
    that is not installed reads ``"not installed"``. Returns a fresh dict each call.
    """
    return dict(_versions())


@lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    out = [("python", platform.python_version())]
    for dist in PACKAGES:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, NOT_INSTALLED))
    return (*out, ("cpu", cpu_model()))


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions_line(versions: dict[str, str] | None = None) -> str:
    """One markdown line for a report: ``Software: python 3.11.7, selfspeech 0.1.0, ...; CPU: ...``.

    ``versions`` is a record read back from a result file; default: this process's.
    """
    v = dict(versions if versions is not None else software_versions())
    cpu = v.pop("cpu", None)
    line = "Software: " + ", ".join(f"{k} {x}" for k, x in v.items())
    return line + (f"; CPU: {cpu}" if cpu else "")
