"""One config system: typed, nested, frozen dataclasses and one strict loader.

Every config and recipe of the toolkit is a frozen dataclass whose fields carry
their type (the annotation) and, where a range matters, a check declared with
:func:`checked`::

    @dataclass(frozen=True)
    class LoopConfig:
        lr: float = checked(5e-4, gt=0)
        warmup_steps: int | None = checked(None, ge=0)

The loader (:func:`from_mapping`) refuses unknown keys, wrong types and values
out of range with a :class:`ConfigError` naming the dotted key, the value and
the fix, before any model is loaded or audio is read.
"""
from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot run: one line naming the dotted key, the value and the fix."""


def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
            nonempty: bool = False, help: str | None = None) -> Any:
    """A dataclass field whose value :func:`from_mapping` checks against a range.

    ``gt``/``ge``/``lt``/``le`` bound a number (each element of a sequence of
    numbers); ``nonempty`` refuses an empty string or sequence.
    """
    check = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    if nonempty:
        check["nonempty"] = True
    meta = {"check": check} | ({"help": help} if help else {})
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
