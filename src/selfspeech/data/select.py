"""Selection by metadata rule and speaker-disjoint, seeded splits.

A rule is a comma- or ``and``-separated list of conditions ``field OP value``
with OP one of ``== != >= <= > <`` or ``in`` (``age_group in child,teen`` is
written ``age_group in child|teen``). Values compare as numbers when both sides
are numbers, otherwise as strings. No ``eval``: rules come from users' configs.
"""
from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

_OPS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
        ">": operator.gt, "<": operator.lt, "=": operator.eq}
_COND = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(==|!=|>=|<=|=|>|<|\s+in\s+)\s*([^<>=!\s].*?)\s*$")


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: str

    def __call__(self, item: dict) -> bool:
        if self.field not in item or item[self.field] is None:
            return False
        left = item[self.field]
        if self.op == "in":
            return str(left) in self.value.split("|")
        right = _num(self.value)
        if isinstance(right, float) and isinstance(left, (int, float)) and not isinstance(left, bool):
            return _OPS[self.op](float(left), right)
        return _OPS[self.op](str(left), self.value)


def _num(s: str) -> float | str:
    try:
        return float(s)
    except ValueError:
        return s


def parse_rule(rule: str) -> list[Condition]:
    """Parse ``"age>=18, gender==f"`` into conditions; ValueError says what is wrong."""
    conds = []
    for part in re.split(r",|\band\b", rule or ""):
        if not part.strip():
            continue
        m = _COND.match(part)
        if not m:
            raise ValueError(f"cannot parse condition {part.strip()!r}; write e.g. 'age>=18' or 'age_group in child|teen'")
        conds.append(Condition(m.group(1), m.group(2).strip(), m.group(3).strip().strip("'\"")))
    return conds


def select(items: Iterable[dict], rule: str) -> Iterator[dict]:
    """Yield the items meeting every condition of ``rule`` (streaming)."""
    conds = parse_rule(rule)
    for item in items:
        if all(c(item) for c in conds):
            yield item


def split_by_speaker(items: Iterable[dict], parts: dict[str, float], seed: int = 0,
                     speaker_field: str = "speaker") -> dict[str, list[dict]]:
    """Split items into named parts by speaker, never by utterance.

    ``parts`` maps a name to a fraction of speakers (fractions are normalised)
    or, when values are >= 1 and integral, to a speaker count (the last part
    takes the rest). Speakers are sorted then shuffled with ``seed``, so the
    split is reproducible and independent of input order.
    """
    if not parts:
        raise ValueError("no parts given; e.g. train=0.8,dev=0.2")
    by_spk: dict[str, list[dict]] = {}
    for item in items:
        if speaker_field not in item:
            raise ValueError(f"utterance {item.get('id')!r} has no {speaker_field!r} field: cannot split by speaker")
        by_spk.setdefault(str(item[speaker_field]), []).append(item)
    speakers = sorted(by_spk)
    random.Random(seed).shuffle(speakers)
    names = list(parts)
    values = [float(parts[n]) for n in names]
    if any(v < 0 for v in values):
        raise ValueError("part sizes must be non-negative")
    if all(v >= 1 and v == int(v) for v in values):
        counts = [int(v) for v in values[:-1]]
        if sum(counts) > len(speakers):
            raise ValueError(f"asked for {sum(counts)} speakers but there are {len(speakers)}")
        counts.append(len(speakers) - sum(counts))
    else:
        total = sum(values)
        bounds = [round(len(speakers) * sum(values[: i + 1]) / total) for i in range(len(values))]
        counts = [b - a for a, b in zip([0] + bounds[:-1], bounds)]
    out, i = {}, 0
    for name, c in zip(names, counts):
        out[name] = [u for s in speakers[i:i + c] for u in by_spk[s]]
        i += c
    return out


def parse_parts(spec: str) -> dict[str, float]:
    """Parse ``"train=0.8,dev=0.2"`` into a dict."""
    out = {}
    for kv in spec.split(","):
        if not kv.strip():
            continue
        if "=" not in kv:
            raise ValueError(f"cannot parse part {kv!r}; write name=fraction, e.g. train=0.8,dev=0.2")
        k, v = kv.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise ValueError(f"part {k.strip()!r}: {v!r} is not a number") from None
    return out
