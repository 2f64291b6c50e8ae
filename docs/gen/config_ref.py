"""The recipe and config reference, generated from the frozen config dataclasses.

Each field's explanation is the comment the code keeps beside it (a trailing comment, the
comment lines right above it, or ``metadata["help"]``), read from the source with ``ast`` and
``tokenize``; name, type and default come from ``dataclasses.fields``. Nothing is written by
hand, so the page follows the code.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from functools import lru_cache

from selfspeech.adapt.recipe import Recipe
from selfspeech.config import config_fields, key_of
from selfspeech.data.augment import AugmentConfig
from selfspeech.models.ecapa import ECAPAConfig
from selfspeech.models.lora import LoraConfig
from selfspeech.models.ssl import EncoderConfig
from selfspeech.objectives.ssps import SSPSConfig
from selfspeech.objectives.tasks import BestRQConfig, Wav2Vec2Config
from selfspeech.train.ctc import CTCConfig
from selfspeech.train.loop import LoopConfig
from selfspeech.train.pretrain import PretrainConfig
from selfspeech.train.speaker import SpeakerSSLConfig
from selfspeech.train.whisper_ft import FinetuneConfig

# (anchor, title, class, what reads it, prose): the configs users write in YAML, in page order.
TOP = (
    ("recipe", "Pseudo2Real recipe", Recipe, "`selfspeech adapt RECIPE.yaml`",
     "The recipe of `selfspeech adapt`. Keys not given take the defaults below; "
     "`key=value` arguments after the file override any dotted key."),
    ("finetune", "Whisper student fine-tuning", FinetuneConfig,
     "`selfspeech finetune-whisper CFG` and a recipe's `student.finetune`",
     "The shared training loop's settings with Whisper fine-tuning defaults, plus the student's data "
     "and decoding settings."),
    ("pretrain", "Self-supervised pretraining", PretrainConfig, "`selfspeech pretrain CFG.yaml`",
     "`encoder` and `task` are mappings resolved after loading: `encoder` may name a preset "
     "(`tiny`, `small`, `medium`, `base`) and its front-end follows the objective; `task` holds the "
     "objective's keys (wav2vec 2.0, or BEST-RQ / BiRQ)."),
    ("ctc", "CTC fine-tuning", CTCConfig, "`selfspeech finetune-ctc [CFG.yaml]`",
     "A scratch run builds `encoder`; a pretrained `--init` brings its own."),
    ("speaker", "Self-supervised speaker verification", SpeakerSSLConfig, "`selfspeech sv train CFG.yaml`",
     "`ecapa` is a mapping of ECAPA-TDNN keys or a preset; `ssps: null` trains with standard positives."),
)

# Sub-configs documented once, in their own section, and linked from every field that holds one.
SHARED = {
    LoopConfig: ("loop", "Training loop (`loop`)", "The one training loop of every trainer: optimiser, "
                 "schedule, budget, checkpoints, device and precision."),
    EncoderConfig: ("encoder", "Speech encoder (`encoder`)", "The Transformer encoder of pretraining and CTC."),
    Wav2Vec2Config: ("task-wav2vec2", "wav2vec 2.0 / XLSR task (`task`, objective wav2vec2)", ""),
    BestRQConfig: ("task-bestrq", "BEST-RQ / BiRQ task (`task`, objectives bestrq and birq)", ""),
    ECAPAConfig: ("ecapa", "ECAPA-TDNN (`ecapa`)", ""),
    AugmentConfig: ("augment", "Augmentation (`augment`)", "Views and augmentation of speaker SSL."),
    SSPSConfig: ("ssps", "SSPS pseudo-positives (`ssps`)", "Lepage & Dehak 2025: positives from clusters."),
    LoraConfig: ("lora", "LoRA students (`lora`)", "Hu et al. 2021, through peft."),
}


@lru_cache(maxsize=None)
def _class_comments(cls) -> dict[str, str]:
    """Field name -> the comments written with it in ``cls``'s own source (not its bases')."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, tuple[int, str]] = {}  # line (1-based) -> (column, text)
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            # "#   more" at the field's indent continues the comment of the line above it
            col = tok.start[1] + (1000 if tok.string.startswith("#  ") else 0)
            comments[tok.start[0]] = (col, tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(src).body[0].body
    fields = [(n.target.id, n.lineno, n.end_lineno, n.col_offset) for n in body
              if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    out = {}
    for i, (name, start, end, col) in enumerate(fields):
        above = []
        j = start - 1
        while j in comments and j not in code_lines and comments[j][0] == col:  # block comment at field indent
            above.insert(0, comments[j][1])
            j -= 1
        trailing = [comments[k][1] for k in range(start, end + 1) if k in comments]
        nxt = fields[i + 1][1] if i + 1 < len(fields) else len(lines) + 1
        k = end + 1  # continuation lines of a trailing comment, indented past the field
        while k < nxt and k in comments and k not in code_lines and comments[k][0] > col:
            trailing.append(comments[k][1])
            k += 1
        text = " ".join(p for p in above + trailing if p)
        if text:
            out[name] = text
    return out


def field_doc(cls, f: dataclasses.Field) -> str:
    """What a field is for: ``metadata["help"]``, else the comments at its definition (own class first)."""
    if f.metadata.get("help"):
        return f.metadata["help"]
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and f.name in _class_comments(klass):
            return _class_comments(klass)[f.name]
    return ""


def type_name(tp) -> str:
    """An annotation as a reader writes it in YAML terms: ``int | None``, ``list[float]``, one of choices."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if a is not None else "null" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin in (tuple, list):
        inner = [a for a in args if a is not Ellipsis]
        return f"list[{', '.join(type_name(a) for a in inner)}]" if inner else "list"
    if origin is dict:
        return f"mapping[{type_name(args[0])}, {type_name(args[1])}]" if args else "mapping"
    if isinstance(tp, type):
        return {"str": "str", "int": "int", "float": "float", "bool": "bool", "Path": "path"}.get(tp.__name__,
                                                                                                  tp.__name__)
    return str(tp).replace("typing.", "")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, dict) and not value:
        return "`{}`"
    return f"`{value!r}`".replace("|", "\\|")


def _sub_configs(tp) -> list:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [a for a in args if dataclasses.is_dataclass(a)]


def _anchors() -> dict[type, str]:
    """Class -> anchor of its own section: the top-level configs and the shared sections."""
    return {c: a for a, _, c, _, _ in TOP} | {c: v[0] for c, v in SHARED.items()}


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every field a file may set, sections expanded in place
    except the shared ones (:data:`SHARED`), which link to their own section."""
    hints = typing.get_type_hints(cls)
    out = []
    for key, f in config_fields(cls).items():
        tp = hints[f.name]
        dotted = f"{prefix}{key}"
        doc = field_doc(cls, f).replace("|", "\\|")
        subs = _sub_configs(tp)
        shared = [s for s in subs if s in _anchors()]
        if shared:
            links = ", ".join(f"[{s.__name__}](#{_anchors()[s]})" for s in shared)
            default = _default(f)
            shown = "(section)" if dataclasses.is_dataclass(default) or isinstance(default, dict) else _show(default)
            out.append((dotted, type_name(tp), shown, f"{doc.rstrip('.')}. See {links}." if doc else f"See {links}."))
        elif subs:
            default = _default(f)
            out.append((dotted, type_name(tp), "(section)" if default is not None else "`null`", doc))
            for s in subs:
                out += rows(s, dotted + ".")
        else:
            out.append((dotted, type_name(tp), _show(_default(f)), doc))
    return out


def table(cls, prefix: str = "") -> str:
    lines = ["| key | type | default | what it is for |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t} | {d} | {doc} |" for k, t, d, doc in rows(cls, prefix)]
    return "\n".join(lines)


def all_keys() -> dict[type, set[str]]:
    """Each documented class -> the dotted keys its table lists (for the test of coverage)."""
    classes = [c for _, _, c, _, _ in TOP] + list(SHARED)
    return {c: {r[0] for r in rows(c)} for c in classes}


def page() -> str:
    """The whole reference page (Markdown)."""
    out = ["# Recipe and config reference", "",
           "Every YAML file the toolkit reads is a frozen dataclass: unknown keys, wrong types and values out "
           "of range are refused before any model loads, with one line naming the dotted key. This page is "
           "generated from those dataclasses when the site is built. Sections that several configs share "
           "(the training loop, the encoder, ...) are listed once at the end.", ""]
    for anchor, title, cls, reader, prose in TOP:
        out += [f"## {title} {{#{anchor}}}", "", f"Read by {reader}. {prose}", "", table(cls), ""]
    out += ["## Shared sections", ""]
    for cls, (anchor, title, prose) in SHARED.items():
        out += [f"### {title} {{#{anchor}}}", ""] + ([prose, ""] if prose else []) + [table(cls), ""]
    return "\n".join(out)


def documented_fields(cls) -> list[str]:
    """Every settable key of ``cls`` (config-file spelling), for tests."""
    return [key_of(f) for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")]
