"""One lambda per module group: the groups, per-group task arithmetic, the guarded search, and p2r_groups."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_adapt import WordTeacher, _corpus
from test_adapt_variants import _spec as _variant_spec

from selfspeech.adapt.lambda_groups import coordinate_search
from selfspeech.adapt.recipe import RecipeError, recipe_from_dict
from selfspeech.arith.groups import GROUPS, apply_groups, group_names, scale_groups, scope_lambdas
from selfspeech.arith.task_vector import TaskVector, TaskVectorError, load_state

G4 = list(GROUPS)


def _live_state(tiny_whisper_dir):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).state_dict()  # proj_out tied


def _tau(state, seed=1):
    g = torch.Generator().manual_seed(seed)
    other = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in state.items()}
    return TaskVector.between(other, state)


def test_groups_are_disjoint_and_cover_a_whisper_tau(tiny_whisper_dir):
    state = _live_state(tiny_whisper_dir)
    tau = _tau(state)
    parts = group_names(tau.deltas)
    assert list(parts) == G4 and all(parts.values())  # every group holds tensors of a full tau
    flat = [n for ns in parts.values() for n in ns]
    assert len(flat) == len(set(flat)) and set(flat) == set(tau.deltas)  # disjoint, and covers every tensor
    assert "proj_out.weight" not in tau.deltas  # the tie: counted once, as the token embedding
    assert "model.decoder.embed_tokens.weight" in parts["embeddings"]
    assert "model.decoder.layers.0.encoder_attn_layer_norm.weight" in parts["cross_attention"]
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in parts["decoder_self"]
    assert "model.decoder.layer_norm.weight" in parts["decoder_self"]
    assert set(parts["encoder"]) == set(tau.scope("encoder").deltas)  # the encoder group is the encoder scope
    with pytest.raises(TaskVectorError, match="'head.weight' is in no module group"):
        group_names(["model.encoder.conv1.weight", "head.weight"])
    # a global (lambda, scope) is one point of the per-group space
    assert scope_lambdas(tau, 0.7, "encoder") == {"encoder": 0.7, "decoder_self": 0.0, "cross_attention": 0.0,
                                                  "embeddings": 0.0}
    assert scope_lambdas(tau, 0.7, "decoder") == {"encoder": 0.0, "decoder_self": 0.7, "cross_attention": 0.7,
                                                  "embeddings": 0.7}
    assert set(scope_lambdas(tau, 0.7, "all").values()) == {0.7}


def test_per_group_apply_equals_global_apply(tiny_whisper_dir):
    state = _live_state(tiny_whisper_dir)
    tau = _tau(state)
    same = apply_groups(state, tau, dict.fromkeys(G4, 0.7))
    ref = tau.apply(state, 0.7)
    assert set(same) == set(ref) and all(torch.equal(same[k], ref[k]) for k in ref)  # bit for bit
    assert same["proj_out.weight"] is same["model.decoder.embed_tokens.weight"]  # the tie written once
    enc = apply_groups(state, tau, scope_lambdas(tau, 1.0, "encoder"))
    ref = tau.scope("encoder").apply(state, 1.0)
    assert all(torch.equal(enc[k], ref[k]) for k in ref)
    lams = {"encoder": 0.0, "decoder_self": 0.5, "cross_attention": 1.0, "embeddings": 1.5}
    mixed = apply_groups(state, tau, lams)
    for g, ns in group_names(tau.deltas).items():  # each group moved by its own lambda
        n = ns[-1]
        assert torch.allclose(mixed[n], state[n] + lams[g] * tau.deltas[n], atol=1e-7), (g, n)
    with pytest.raises(TaskVectorError, match="no lambda for module group 'embeddings'"):
        scale_groups(tau, {"encoder": 1.0, "decoder_self": 1.0, "cross_attention": 1.0})
    with pytest.raises(TaskVectorError, match="unknown module group 'lm'"):
        scale_groups(tau, dict.fromkeys(G4, 1.0) | {"lm": 1.0})


def _quadratic(target, weight, calls):
    def score(lams):
        calls.append(dict(lams))
        return 0.1 + sum(weight[g] * (lams[g] - target[g]) ** 2 for g in target)
    return score


def test_coordinate_search_finds_the_grid_argmin():
    grid = [0.0, 0.5, 1.0, 1.5]
    target = {"encoder": 1.5, "decoder_self": 0.5, "cross_attention": 0.0, "embeddings": 1.0}
    weight = {"encoder": 0.04, "decoder_self": 0.02, "cross_attention": 0.03, "embeddings": 0.05}
    calls = []
    score = _quadratic(target, weight, calls)
    start = dict.fromkeys(G4, 1.0)
    res = coordinate_search(start, G4, grid, score, min_gain=0.0, passes=2, known=[(start, score(start))])
    n_calls = len(calls) - 1
    brute = min(itertools.product(grid, repeat=4), key=lambda v: score(dict(zip(G4, v))))
    assert res["lambdas"] == dict(zip(G4, brute)) == target
    assert res["wer"] == pytest.approx(0.1) and res["start_wer"] == pytest.approx(score(start))
    # the known start is not scored again, nor any point twice; pass 2 changes nothing and stops the search
    assert res["decodes"] == n_calls == len({tuple(c["lambdas"].values()) for c in res["candidates"]}) < 2 * 4 * 3
    assert res["passes"] == 2 and not any(c["lambdas"] == start for c in res["candidates"]) and res["reused"] == 1
    assert len(res["candidates"]) == 2 * 4 * 3 and [s["group"] for s in res["steps"]] == ["encoder", "decoder_self",
                                                                                           "cross_attention"]
    one = coordinate_search(start, ["encoder"], grid, score, min_gain=0.0, passes=3)
    assert one["lambdas"] == start | {"encoder": 1.5} and one["passes"] == 2  # only the searched group moves


def test_search_guard_min_gain_and_ties_to_the_smaller_correction():
    grid = [0.0, 0.5, 1.0, 1.5]

    def table(wer_of_enc):
        return lambda lams: wer_of_enc[lams["encoder"]] + 0.1 * abs(lams["decoder_self"] - 1.0)

    start = {"encoder": 1.0, "decoder_self": 1.0}
    small = table({0.0: 0.30, 0.5: 0.30, 1.0: 0.30, 1.5: 0.299})  # a gain of 0.001 < min_gain: refused
    assert coordinate_search(start, ["encoder"], grid, small, min_gain=0.002)["lambdas"] == start | {"encoder": 0.0}
    worse = table({0.0: 0.31, 0.5: 0.31, 1.0: 0.30, 1.5: 0.299})  # and no smaller correction as good: kept
    res = coordinate_search(start, ["encoder"], grid, worse, min_gain=0.002)
    assert res["lambdas"] == start and res["steps"] == [] and res["passes"] == 1
    big = table({0.0: 0.31, 0.5: 0.31, 1.0: 0.30, 1.5: 0.297})  # 0.003 > min_gain: taken
    assert coordinate_search(start, ["encoder"], grid, big, min_gain=0.002)["lambdas"]["encoder"] == 1.5
    tie = table({0.0: 0.31, 0.5: 0.25, 1.0: 0.30, 1.5: 0.25})  # equal WERs: the smaller lambda
    assert coordinate_search(start, ["encoder"], grid, tie, min_gain=0.002)["lambdas"]["encoder"] == 0.5
    assert coordinate_search(start, ["encoder"], grid, big, min_gain=0.01)["lambdas"] == start


def _spec(m, tiny_whisper_dir, systems, **lam):
    return _variant_spec(m, tiny_whisper_dir, systems, scopes=["all", "encoder"], **lam)


def test_recipe_refuses_groups_without_their_system_and_rule(tmp_path):
    groups = {"groups": ["encoder", "embeddings"]}
    with pytest.raises(RecipeError, match="systems: .*p2r_groups without lambda.groups; set lambda.groups"):
        recipe_from_dict(_spec("m.jsonl", "init", ["p2r", "p2r_groups"]))
    with pytest.raises(RecipeError, match="lambda.groups: .*systems lacks p2r_groups; add p2r_groups"):
        recipe_from_dict(_spec("m.jsonl", "init", ["p2r"], **groups))
    with pytest.raises(RecipeError, match="rule 'fixed' skips; set lambda.rule: source_sim"):
        recipe_from_dict(_spec("m.jsonl", "init", ["p2r", "p2r_groups"], rule="fixed", fixed=1.0, **groups))
    with pytest.raises(RecipeError, match="groups"):
        recipe_from_dict(_spec("m.jsonl", "init", ["p2r", "p2r_groups"], groups=["encoder", "lm_head"]))
    r = recipe_from_dict(_spec("m.jsonl", "init", ["p2r", "p2r_groups"], **groups))
    assert r.lam.groups == ("encoder", "embeddings") and r.lam.group_grid == (0.0, 0.5, 1.0, 1.5)


def test_pipeline_p2r_groups_beside_p2r(tmp_path, tiny_whisper_dir, monkeypatch):
    import selfspeech.label.teacher as teacher_mod
    from selfspeech.adapt.pseudo2real import run_pseudo2real, wer_of
    from selfspeech.arith.lowrank import load_any

    monkeypatch.setattr(teacher_mod, "load_teacher", lambda *a, **k: WordTeacher())
    m, run = _corpus(tmp_path), tmp_path / "run"
    base = run_pseudo2real(recipe_from_dict(_spec(m, tiny_whisper_dir, ["pseudo_ft", "p2r"]), root=tmp_path), run,
                           log=lambda s: None, progress=False)
    markers = {n: (run / n / "STAGE.json").read_text() for n in base["cached"]}
    recipe = recipe_from_dict(_spec(m, tiny_whisper_dir, ["pseudo_ft", "p2r", "p2r_groups"], groups=G4,
                                    group_grid=[0.0, 1.0], group_passes=1), root=tmp_path)
    res = run_pseudo2real(recipe, run, log=lambda s: None, progress=False)
    # the global-lambda system is untouched: its stages are reused as they were, and scored side by side
    assert all(res["cached"][n] for n in base["cached"]) and res["hyps"]["p2r"] == base["hyps"]["p2r"]
    assert all((run / n / "STAGE.json").read_text() == t for n, t in markers.items())
    assert {"p2r_groups", "p2r"} <= set(res["scores"]["systems"]) and "p2r_groups_vs_p2r" in res["scores"]["paired"]
    g = res["lambda"]["groups"]
    assert g["start"] == scope_lambdas(load_any(run / "tau" / "tau.safetensors"), res["lambda"]["lambda"],
                                       res["lambda"]["scope"])
    assert set(g["lambdas"]) == set(G4) and all(v in (0.0, 1.0) for v in g["lambdas"].values())
    assert g["groups"] == G4 and len(g["candidates"]) == 4 and g["passes"] == 1
    # every candidate scored on the sim speakers' real labels; what the global sweep measured is not decoded again
    decoded = sorted(p.name for p in run.glob("decode_sim_groups_*"))
    assert g["decodes"] == len(decoded) <= 4 and not any((run / d / "model").exists() for d in decoded)
    points = {tuple(sorted(c["lambdas"].items())) for c in g["candidates"]} | {tuple(sorted(g["start"].items()))}
    assert g["decodes"] + g["reused"] == len(points) and g["reused"] >= 1  # the start: a point of the global sweep
    sim = str(run / "data" / "source_sim.jsonl")
    for d in decoded:
        lams = json.loads((run / d / "STAGE.json").read_text())["config"]["config"]["lambdas"]
        w = next(c["wer"] for c in g["candidates"] if c["lambdas"] == lams)
        assert w == wer_of(sim, str(run / d / "hyp.jsonl"), recipe.normalizer)
    assert g["wer"] <= g["start_wer"] and g["wer"] in [g["start_wer"]] + [c["wer"] for c in g["candidates"]]
    # the kept model is theta_tp + sum_g lambda_g * tau_g
    got = load_state(run / "model_p2r_groups" / "model")
    theta_tp = json.loads((run / "ft_target_pseudo" / "STAGE.json").read_text())["result"]
    want = apply_groups(load_state(theta_tp), load_any(run / "tau" / "tau.safetensors"), g["lambdas"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads((run / "model_p2r_groups" / "model" / "task_arithmetic.json").read_text())
    assert meta["lambda_groups"] == g["lambdas"]
    report = (run / "report.md").read_text()
    assert "## Lambda per module group (p2r_groups)" in report and (run / "wer_lambda_groups.png").is_file()
    assert "one lambda per module group" in report
    again = run_pseudo2real(recipe, run, log=lambda s: None, progress=False)
    assert all(again["cached"].values()) and again["lambda"]["groups"] == g and again["hyps"] == res["hyps"]
