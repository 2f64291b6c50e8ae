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
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot run: one line naming the dotted key, the value and the fix."""


def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None,
            nonempty: bool = False, help: str | None = None, key: str | None = None) -> Any:
    """A dataclass field whose value :func:`from_mapping` checks against a range.

    ``gt``/``ge``/``lt``/``le`` bound a number (each element of a sequence or
    mapping of numbers); ``nonempty`` refuses an empty string or sequence;
    ``key`` is the field's name in config files when it differs (``lambda``).
    """
    check = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    if nonempty:
        check["nonempty"] = True
    meta = {"check": check} | ({"help": help} if help else {}) | ({"key": key} if key else {})
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def invalid(key: str, value: Any, wrong: str, fix: str) -> ConfigError:
    """A :class:`ConfigError` about field ``key`` of the config being checked.

    For ``__post_init__`` checks that involve several fields: raise
    ``invalid("source_parts", v, "...", "...")`` and :func:`from_mapping`
    prefixes the dotted path of the section."""
    return _error("", key, f"{_show(value)} is {wrong}; {fix}")


def _show(value: Any) -> str:
    """A value's repr, short enough for a one-line message."""
    r = repr(to_mapping(value))  # a tuple shows as the list a file holds
    return r if len(r) <= 80 else r[:77] + "..."


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key and not key.startswith("[") else f"{prefix}{key}"


def _error(where: str, key: str, detail: str) -> ConfigError:
    """``<where>: <key>: <detail>``; the parts are kept so that an enclosing config can prefix its path."""
    err = ConfigError(": ".join(p for p in (where, key, detail) if p))
    err.where, err.key, err.detail = where, key, detail
    return err


def _fail(where: str, key: str, value: Any, wrong: str, fix: str) -> ConfigError:
    return _error(where, key, f"{_show(value)} is {wrong}; {fix}")


def key_of(f: dataclasses.Field) -> str:
    """The name a field has in a config file (``metadata["key"]``, else the field's name)."""
    return f.metadata.get("key", f.name)


def config_fields(cls) -> dict[str, dataclasses.Field]:
    """The fields a config file may set, by their key.

    A field with ``metadata={"internal": True}`` (e.g. the folder a recipe was
    read from) is set by the program, never by a file: it is left out here and
    in :func:`to_mapping`."""
    return {key_of(f): f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                "Path": "a path"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


_NUMBER = re.compile(r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def _example(f: dataclasses.Field | None) -> str:
    if f is not None and f.default is not dataclasses.MISSING and f.default is not None:
        return f" (default: {_show(f.default)})"
    return ""


def _scalar(value: Any, tp: type, where: str, key: str, f) -> Any:
    """int, float, str, bool, Path and other classes, strictly."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, key, value, "not true or false", f"write true or false{_example(f)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, key, value, "not an integer", f"write a whole number without quotes or decimal point"
                    f"{_example(f)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value):  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        raise _fail(where, key, value, "not a number", f"write a number such as 0.5 or 3e-5{_example(f)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(where, key, value, "not a string", f"write text (quote it if YAML reads it as another type)"
                    f"{_example(f)}")
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _fail(where, key, value, "not a path", "write the path as a string")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, where, key)
        raise _fail(where, key, value, "not a mapping",
                    f"give a mapping of keys ({', '.join(sorted(config_fields(tp)))})")
    if tp is Any or tp is object:
        return value
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _fail(where, key, value, f"not {_type_name(tp)}", f"give {_type_name(tp)}")
    return value


def _coerce(value: Any, tp: Any, where: str, key: str, f=None) -> Any:
    """``value`` checked against (and converted to) the annotation ``tp``; ConfigError names ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in (tuple, list):  # a bare `tuple` / `list` annotation: any elements
        origin = tp
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, key, value, "not set", f"give {' or '.join(_type_name(a) for a in args)}")
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(value, a, where, key, f)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        names = ("a number" if set(options) == {int, float} else " or ".join(_type_name(a) for a in options)) \
            + (" or null" if type(None) in args else "")
        raise _fail(where, key, value, f"not {names}", f"give {names}{_example(f)}")
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _fail(where, key, value, "not a known choice", f"choose one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(where, key, value, "not a list", f"write a list such as [a, b]{_example(f)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _fail(where, key, value, f"a list of {len(value)} values, not {len(args)}",
                            f"write a list of {len(args)} values{_example(f)}")
            kinds = args
        else:
            kinds = (args[0] if args else Any,) * len(value)
        out = [_coerce(v, t, where, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, kinds))]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _fail(where, key, value, "not a mapping", "write a mapping such as {name: value}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where, key): _coerce(v, vt, where, _join(key, str(k))) for k, v in value.items()}
    if origin is not None:  # another generic (Sequence[...], Callable...): its origin's class
        return _scalar(value, origin, where, key, f) if isinstance(origin, type) else value
    return _scalar(value, tp, where, key, f)


def _check_range(value: Any, check: dict, where: str, key: str) -> None:
    if value is None or not check:
        return
    if check.get("nonempty") and isinstance(value, (str, list, tuple, dict)) and len(value) == 0:
        raise _fail(where, key, value, "empty", "give at least one value")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) \
        else [(None, value)]
    for i, v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        k = key if i is None else (f"{key}[{i}]" if isinstance(i, int) else _join(key, str(i)))
        for op, bound, wrong, sign in (("gt", check.get("gt"), "not above", ">"), ("ge", check.get("ge"), "below", ">="),
                                       ("lt", check.get("lt"), "not below", "<"), ("le", check.get("le"), "above", "<=")):
            if bound is None:
                continue
            ok = {"gt": v > bound, "ge": v >= bound, "lt": v < bound, "le": v <= bound}[op]
            if not ok:  # NaN fails every comparison, so it is refused too
                raise _fail(where, k, v, f"{wrong} {bound:g}", f"give a number {sign} {bound:g}")


def check_ranges(obj: Any) -> None:
    """Call in ``__post_init__``: the :func:`checked` ranges hold for a config built in Python too,
    not only for one read by :func:`from_mapping`."""
    for f in dataclasses.fields(obj):
        _check_range(getattr(obj, f.name), f.metadata.get("check", {}), "", key_of(f))


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    initials = "".join(w[:1] for w in name.split("_"))  # learning_rate -> lr
    close = close or ([initials] if "_" in name and initials in known else [])
    return f"did you mean {close[0]!r}? " if close else ""


def _build(cls, mapping: Mapping, where: str, prefix: str):
    fields = config_fields(cls)
    known = sorted(fields)
    for k, v in mapping.items():
        if k not in fields:
            key = _join(prefix, str(k))
            raise _error(where, key, f"{_show(v)} is set under an unknown key; {_suggest(str(k), known)}"
                                     f"known keys{' of ' + prefix if prefix else ''}: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, f in fields.items():
        key = _join(prefix, k)
        if k not in mapping:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _error(where, key, f"is missing; set it ({_type_name(hints.get(f.name))})")
            continue
        if f.metadata.get("sub_config") and isinstance(mapping[k], Mapping):
            kw[f.name] = dict(mapping[k])  # its __post_init__ resolves it (see sub_config)
            continue
        value = _coerce(mapping[k], hints.get(f.name, Any), where, key, f)
        _check_range(value, f.metadata.get("check", {}), where, key)
        kw[f.name] = value
    try:
        return cls(**kw)
    except ConfigError as e:  # from __post_init__: its key is relative to this section
        if getattr(e, "where", ""):
            raise
        raise _error(where, _join(prefix, getattr(e, "key", "")), getattr(e, "detail", _one_line(e))) from None
    except (ValueError, TypeError) as e:
        raise _error(where, prefix, _one_line(e)) from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def from_mapping(cls, mapping: Mapping | None, where: str = ""):
    """Build the frozen config dataclass ``cls`` from a (YAML/JSON) mapping, strictly.

    Unknown keys (with the closest known one), wrong types (from the
    annotations: ``int`` refuses ``bool`` and ``1.5``; ``float`` takes ints;
    ``tuple``/``list``/``dict``/``Literal``/``X | None``/``Path``; nested
    dataclasses from nested mappings) and values outside a :func:`checked`
    range are a :class:`ConfigError` of one line
    ``<where>: <dotted.key>: <value> is <what is wrong>; <how to fix>``. A
    ``ValueError`` of ``__post_init__`` is re-raised the same way, prefixed
    with the section's dotted path. ``where`` names the file (or command).
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, Mapping):
        raise _fail(where, "", mapping, "not a mapping of config keys",
                    f"write keys such as {', '.join(sorted(config_fields(cls))[:3])}")
    return _build(cls, mapping, where, "")


def omit_defaults(mapping: dict, defaults: Mapping[str, Any]) -> dict:
    """``mapping`` without the keys whose value is the given default. Used for cache keys: an option added
    at a default that computes what a config without it computed leaves the key as it was."""
    return {k: v for k, v in mapping.items() if not (k in defaults and v == defaults[k])}


def typed_fields(obj: Any) -> None:
    """Call in ``__post_init__``: a sub-config passed as a mapping (``CTCConfig(loop={"max_steps": 2})``)
    becomes its dataclass, checked like a file's; the config then holds typed values only."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, Mapping) or f.metadata.get("sub_config"):
            continue
        tp = hints.get(f.name)
        options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        sub = [a for a in options if dataclasses.is_dataclass(a)]
        if sub:
            object.__setattr__(obj, f.name, _build(sub[0], value, "", key_of(f)))


def sub_config(default_factory: Any) -> Any:
    """A dataclass field holding a sub-config that the owner's ``__post_init__`` resolves with
    :func:`resolve_sub_config`, because it may name a preset or take a default from a sibling field
    (the encoder's front-end from the pretraining objective). A mapping is kept as given on load."""
    return dataclasses.field(default_factory=default_factory, metadata={"sub_config": True})


def resolve_sub_config(obj: Any, name: str, cls, defaults: Mapping | None = None) -> None:
    """Call in ``__post_init__``: field ``name`` given as a mapping (``{preset: small, dropout: 0.0}``)
    becomes ``cls``: the preset's values, then ``defaults``, then the given keys, checked like a file's
    (errors name ``name.key``); an instance of ``cls`` is kept, anything else is refused."""
    value = getattr(obj, name)
    if isinstance(value, Mapping):
        object.__setattr__(obj, name, preset_config(cls, {**(defaults or {}), **value}, name))
    elif not isinstance(value, cls):
        raise invalid(name, value, f"not a {cls.__name__} or a mapping of its keys",
                      f"write a mapping such as {{preset: small}} or keys of {cls.__name__}")


def preset_config(cls, mapping: Mapping | None, key: str):
    """A sub-config written as a mapping that may name a preset (``{preset: small, dropout: 0.0}``):
    the preset's values (``cls.preset(name)``), then the given keys, checked like a file's; errors
    name ``key`` (``encoder.d_model``)."""
    given = dict(mapping or {})
    base = {}
    if "preset" in given:
        name = given.pop("preset")
        try:
            base = to_mapping(cls.preset(name))
        except AttributeError:
            raise _fail("", _join(key, "preset"), name, "set under an unknown key", "this section has no presets") \
                from None
        except (ValueError, TypeError) as e:
            raise _fail("", _join(key, "preset"), name, "not a known preset", _one_line(e)) from None
    return _build(cls, {**base, **given}, "", key)


def to_mapping(obj: Any) -> Any:
    """A config dataclass as plain JSON-able data (file keys, tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {key_of(f): to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, Mapping):
        return {str(k): to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


_OVERRIDE = re.compile(r"^([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*)=(.*)$", re.S)


def apply_overrides(mapping: Mapping | None, overrides: list[str] | tuple[str, ...], cls=None,
                    where: str = "override") -> dict:
    """``mapping`` with dotted ``key=value`` overrides applied (a new dict; ``mapping`` is not changed).

    Values are read as YAML (``3e-5``, ``[0, 0.5, 1]``, ``true``, ``null``,
    ``{k: 2}``); intermediate sections are created. With ``cls``, the first
    key of each override must be one of its fields (the rest is checked by
    :func:`from_mapping`)."""
    import copy

    import yaml

    out = copy.deepcopy(dict(mapping or {}))
    for ov in overrides or ():
        m = _OVERRIDE.match(ov.strip())
        if not m:
            raise ConfigError(f"{where}: {ov!r} is not a dotted override; write key.sub=value, "
                              "e.g. student.finetune.lr=3e-5 or lambda.grid=[0,0.5,1]")
        path, text = m.group(1).split("."), m.group(2)
        if cls is not None and path[0] not in config_fields(cls):
            known = sorted(config_fields(cls))
            raise ConfigError(f"{where}: {m.group(1)}: {m.group(2)!r} is set under an unknown key; {_suggest(path[0], known)}"
                              f"known keys: {', '.join(known)}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: {m.group(1)}: {text!r} is not a YAML value ({type(e).__name__}); "
                              "quote strings and write lists as [a, b]") from None
        node = out
        for i, part in enumerate(path[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], Mapping):
                raise ConfigError(f"{where}: {'.'.join(path[:i + 1])}: {_show(node[part])} is not a section; "
                                  f"override {'.'.join(path[:i + 1])}=... itself")
            else:
                node[part] = dict(node[part])
            node = node[part]
        node[path[-1]] = value
    return out


def save_resolved(obj: Any, path: str | os.PathLike) -> Path:
    """Write the fully resolved config (every default filled in) as JSON, atomically; returns the path.

    Written beside a run's outputs so that the run can be repeated exactly
    (``selfspeech ... resolved_config.json`` reads it back) and compared."""
    import json
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp.{os.getpid()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(to_mapping(obj), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
