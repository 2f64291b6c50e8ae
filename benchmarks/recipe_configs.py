"""Benchmark configs from the shipped recipes, read as the commands read them.

A benchmark trains what ``recipes/speechocean762/<kind>/<name>.yaml`` says,
plus its own protocol knobs (budget, seeds, encoder size...) given as dotted
keys, exactly as ``selfspeech pretrain R.yaml loop.seed=1`` would: the same
strict loader (``selfspeech.commands.common.load_config``), so a benchmark
cannot train a config the command would refuse, and the recipe is the one
place its base values live.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common import ROOT

RECIPES = ROOT / "recipes" / "speechocean762"


def recipe_config(cls, recipe: str | Path, knobs: dict[str, Any] | None = None):
    """``cls`` from ``RECIPES / recipe`` with ``knobs`` (dotted key -> value) set on top, strictly.

    A knob of None is written as ``key=null`` (the loader's own options leave None out),
    so a benchmark can switch off what a recipe sets."""
    from selfspeech.commands.common import load_config

    knobs = dict(knobs or {})
    nulls = [f"{key}=null" for key, value in knobs.items() if value is None]
    return load_config(cls, RECIPES / recipe, nulls, knobs)


def recipe_mapping(recipe: str | Path) -> dict:
    """A recipe file's keys as written (for overlays such as ``sv/ssps.yaml``)."""
    from selfspeech.commands.common import read_mapping

    return read_mapping(RECIPES / recipe)
