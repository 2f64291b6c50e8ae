"""The strict config loader: types from annotations, ranges, nested keys, overrides, resolved configs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from selfspeech.config import (ConfigError, apply_overrides, checked, from_mapping, invalid, save_resolved,
                               to_mapping)


@dataclass(frozen=True)
class Optim:
    lr: float = checked(1e-3, gt=0)
    steps: int | None = checked(None, ge=1)
    schedule: Literal["linear", "cosine"] = "linear"
    betas: tuple[float, float] = (0.9, 0.98)

    def __post_init__(self):
        if self.steps == 13:
            raise ValueError("13 steps is\nunlucky")
        if self.steps == 7 and self.schedule == "cosine":
            raise invalid("schedule", self.schedule, "too long for 7 steps", "use linear")


@dataclass(frozen=True)
class Tuned(Optim):  # inherited fields keep their types and checks
    warm: float = checked(0.1, ge=0, lt=1)


@dataclass(frozen=True)
class Run:
    name: str = checked("run", nonempty=True)
    optim: Tuned = field(default_factory=Tuned)
    grid: tuple[float, ...] = checked((0.0, 1.0), ge=0, nonempty=True)
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = checked(default_factory=dict, gt=0)
    out: Path | None = None
    flag: bool = False
    lam: Optim = checked(default_factory=Optim, key="lambda")
    root: str = field(default=".", metadata={"internal": True})


def refused(d: dict) -> str:
    with pytest.raises(ConfigError) as e:
        from_mapping(Run, d, "run.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run.yaml: ")
    return msg


def test_types_are_strict():
    assert "optim.steps: True is not an integer" in refused({"optim": {"steps": True}})  # bool is not an int
    assert "optim.steps: 2.0 is not an integer" in refused({"optim": {"steps": 2.0}})
    assert "optim.lr: 'fast' is not a number" in refused({"optim": {"lr": "fast"}})
    assert "flag: 1 is not true or false" in refused({"flag": 1})
    assert "name: 3 is not a string" in refused({"name": 3})
    assert "optim.schedule: 'cos' is not a known choice; choose one of linear, cosine" in refused(
        {"optim": {"schedule": "cos"}})
    assert "optim.betas: [0.9] is a list of 1 values, not 2" in refused({"optim": {"betas": [0.9]}})
    assert "tags[1]: 2 is not a string" in refused({"tags": ["a", 2]})
    assert "weights.x: 'heavy' is not a number" in refused({"weights": {"x": "heavy"}})
    assert "optim: 3 is not a mapping" in refused({"optim": 3})


def test_values_are_converted():
    r = from_mapping(Run, {"optim": {"lr": 1, "steps": 5, "betas": [0.8, 0.9]}, "grid": [0, 2], "out": "a/b",
                           "lambda": {"lr": "3e-5"}, "weights": {"x": 2}})
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert r.optim.betas == (0.8, 0.9) and r.grid == (0.0, 2.0)
    assert r.out == Path("a/b") and r.lam.lr == 3e-5  # YAML 1.1 reads 3e-5 as a string: taken as the number
    assert r.optim.warm == 0.1 and r.root == "."
    assert from_mapping(Run, None) == Run() and from_mapping(Run, {"out": None}).out is None


def test_ranges_and_emptiness():
    assert "optim.lr: 0.0 is not above 0; give a number > 0" in refused({"optim": {"lr": 0}})
    assert "optim.warm: 1.0 is not below 1" in refused({"optim": {"warm": 1}})
    assert "grid[1]: -1.0 is below 0; give a number >= 0" in refused({"grid": [0, -1]})
    assert "grid: [] is empty" in refused({"grid": []})
    assert "name: '' is empty" in refused({"name": ""})
    assert "weights.x: 0.0 is not above 0" in refused({"weights": {"x": 0}})
    assert "optim.lr: nan is not above 0" in refused({"optim": {"lr": float("nan")}})


def test_unknown_keys_name_the_closest_and_the_known_ones():
    msg = refused({"optim": {"learning_rate": 1}})
    assert "optim.learning_rate: 1 is set under an unknown key; did you mean 'lr'?" in msg
    assert "known keys of optim: betas, lr, schedule, steps, warm" in msg
    assert "did you mean 'name'" in refused({"nmae": "x"})
    assert "root: '/' is set under an unknown key" in refused({"root": "/"})  # internal: never from a file
    assert "lam: {} is set under an unknown key; did you mean 'lambda'" in refused({"lam": {}})


def test_post_init_errors_carry_the_dotted_path():
    assert refused({"optim": {"steps": 13}}) == "run.yaml: optim: 13 steps is unlucky"
    assert refused({"lambda": {"steps": 7, "schedule": "cosine"}}) == (
        "run.yaml: lambda.schedule: 'cosine' is too long for 7 steps; use linear")


def test_to_mapping_round_trips_through_json():
    r = from_mapping(Run, {"optim": {"steps": 3}, "out": "x", "lambda": {"lr": 0.5}, "tags": ["a"]})
    d = json.loads(json.dumps(to_mapping(r)))
    assert d["lambda"]["lr"] == 0.5 and d["optim"]["betas"] == [0.9, 0.98] and "root" not in d
    assert from_mapping(Run, d) == r


def test_overrides():
    d = apply_overrides({"optim": {"lr": 1}}, ["optim.steps=3", "grid=[0,0.5,1]", "lambda.lr=3e-5", "out=null"], Run)
    r = from_mapping(Run, d)
    assert (r.optim.steps, r.grid, r.lam.lr, r.out) == (3, (0.0, 0.5, 1.0), 3e-5, None)
    with pytest.raises(ConfigError, match="'optim.lr' is not a dotted override; write key.sub=value"):
        apply_overrides({}, ["optim.lr"], Run)
    with pytest.raises(ConfigError, match="override: gird: '.1.' is set under an unknown key; did you mean 'grid'"):
        apply_overrides({}, ["gird=[1]"], Run)
    with pytest.raises(ConfigError, match="optim.lr: '.1' is not a YAML value"):
        apply_overrides({}, ["optim.lr=[1"], Run)
    with pytest.raises(ConfigError, match="name: 'x' is not a section"):
        apply_overrides({"name": "x"}, ["name.first=1"], Run)
    src = {"optim": {"lr": 1}}
    apply_overrides(src, ["optim.lr=2"])
    assert src == {"optim": {"lr": 1}}  # the input mapping is not changed


def test_save_resolved_writes_atomically(tmp_path):
    r = from_mapping(Run, {"optim": {"steps": 4}})
    p = save_resolved(r, tmp_path / "run" / "resolved_config.json")
    assert from_mapping(Run, json.loads(p.read_text())) == r
    assert [x.name for x in p.parent.iterdir()] == ["resolved_config.json"]  # no temp file left


def test_shipped_recipes_load_strictly():
    """Every recipe under recipes/ is read by the config class of the command its header names."""
    import yaml

    from selfspeech.adapt.recipe import load_recipe
    from selfspeech.train.ctc import CTCConfig
    from selfspeech.train.pretrain import PretrainConfig
    from selfspeech.train.speaker import SpeakerSSLConfig

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    root = recipes / "speechocean762"
    assert load_recipe(root / "pseudo2real.yaml").lam.grid
    classes = {"ssl": PretrainConfig, "ctc": CTCConfig, "sv": SpeakerSSLConfig}
    seen = set()
    for path in sorted(recipes.rglob("*.yaml")):  # every recipe, in any corpus folder
        if path.parent.name not in classes:  # a corpus's Pseudo2Real recipe (selfspeech adapt)
            assert load_recipe(path).lam.grid, path
            seen.add(path.relative_to(recipes).as_posix())
            continue
        d = yaml.safe_load(path.read_text())
        if path.parent.name == "ctc":
            d["lexicon"] = "lexicon.txt"  # given with --lexicon on the command line
        cfg = from_mapping(classes[path.parent.name], d, str(path))
        assert from_mapping(type(cfg), json.loads(json.dumps(to_mapping(cfg)))) == cfg, path
        seen.add(path.relative_to(recipes).as_posix())
    assert {f"speechocean762/{r}.yaml" for r in (
        "pseudo2real", "ssl/bestrq", "ssl/birq", "ssl/wav2vec2", "ctc/phones", "sv/simclr", "sv/dino", "sv/ssps")} <= seen
