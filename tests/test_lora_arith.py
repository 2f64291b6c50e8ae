"""Pseudo2Real with LoRA students: tau between merged deltas, low-rank taus, `selfspeech arith` on adapters."""
from __future__ import annotations

import json

import pytest
import torch
from test_arith import tiny_whisper
from typer.testing import CliRunner

from selfspeech.arith.lowrank import LowRankTau, compress, load_any, rank_for_energy
from selfspeech.arith.task_vector import TaskVector, TaskVectorError, apply_to_dir, diff_dirs, load_state
from selfspeech.cli import app
from selfspeech.models.lora import LoraConfig, merged_delta, wrap


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_arith") / "base"
    tiny_whisper(0).save_pretrained(d)
    return d


def adapter(base, out, seed: int, rank: int = 4, where: str = "both"):
    """A LoRA student folder on ``base`` with random (non-zero) factors, as training would leave them."""
    from transformers import WhisperForConditionalGeneration

    model = wrap(WhisperForConditionalGeneration.from_pretrained(base), LoraConfig(rank=rank, where=where), base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out


def test_tau_between_lora_students_is_the_difference_of_merged_deltas(base, tmp_path):
    real, pseudo = adapter(base, tmp_path / "real", 1), adapter(base, tmp_path / "pseudo", 2)
    tau = diff_dirs(real, pseudo)
    dr, dp = merged_delta(real), merged_delta(pseudo)
    assert set(tau.deltas) == set(dr) and all(torch.allclose(tau.deltas[n], dr[n] - dp[n]) for n in dr)
    # the same tau as between the two merged full models (base cancels), restricted to the adapted matrices
    full = TaskVector.between(load_state(real), load_state(pseudo))
    assert all(torch.allclose(full.deltas[n], tau.deltas[n], atol=1e-5) for n in tau.deltas)
    assert all(full.deltas[n].abs().max() < 1e-5 for n in set(full.deltas) - set(tau.deltas))
    # applied to a full target: theta_t + tau; applied to a LoRA target: merged(target) + tau, a full model
    (tmp_path / "full_t").mkdir()
    tiny_whisper(3).save_pretrained(tmp_path / "full_t")
    out = apply_to_dir(tmp_path / "full_t", tau, 0.5, tmp_path / "p2r_full")
    got, t = load_state(out), load_state(tmp_path / "full_t")
    assert all(torch.allclose(got[n], t[n] + 0.5 * tau.deltas[n], atol=1e-6) for n in tau.deltas)
    target = adapter(base, tmp_path / "target", 3)
    out = apply_to_dir(target, tau, 1.0, tmp_path / "p2r_lora")
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    got, merged = load_state(out), load_state(target)
    assert all(torch.allclose(got[n], merged[n] + tau.deltas[n], atol=1e-6) for n in tau.deltas)
    from transformers import WhisperForConditionalGeneration

    WhisperForConditionalGeneration.from_pretrained(out)  # a plain model folder transformers loads


def test_mismatched_students_are_refused_in_one_line(base, tmp_path):
    a = adapter(base, tmp_path / "a", 1)
    r8 = adapter(base, tmp_path / "r8", 2, rank=8)
    enc = adapter(base, tmp_path / "enc", 2, where="encoder")
    (tmp_path / "other").mkdir()
    tiny_whisper(5).save_pretrained(tmp_path / "other")
    other = adapter(tmp_path / "other", tmp_path / "on_other", 2)
    cases = [(r8, "LoRA rank differs: 4 in .* but 8 in"), (enc, "adapt different layers"),
             (tmp_path / "other", "is a LoRA adapter but .* a full model"),
             (other, "made for base model .*base but .*on_other for .*other")]
    for b, msg in cases:
        with pytest.raises(TaskVectorError, match=msg) as e:
            diff_dirs(a, b)
        assert "\n" not in str(e.value)


def test_low_rank_tau_error_falls_with_energy_and_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 6, generator=g) @ torch.randn(6, 30, generator=g) + 0.01 * torch.randn(40, 30, generator=g)
    tau = TaskVector({"w": m, "b": torch.randn(30, generator=g)})
    errs, sizes = [], []
    for e in (0.5, 0.9, 0.99, 0.999999):
        low = compress(tau, e)
        back = low.to_task_vector()
        err = float((back.deltas["w"] - m).norm() / m.norm())
        assert err == pytest.approx(low.report["matrices"]["w"]["rel_error"], rel=1e-4, abs=1e-6)
        assert err <= (1 - e) ** 0.5 + 1e-6 and torch.equal(back.deltas["b"], tau.deltas["b"])
        errs.append(err)
        sizes.append(low.report["size_ratio"])
    assert errs == sorted(errs, reverse=True) and errs[0] > errs[-1]
    assert sizes == sorted(sizes)
    assert compress(tau, 0.99).report["matrices"]["w"]["rank"] == 6  # the planted rank holds > 99%
    exact = compress(tau, 1.0)  # full rank: factors as large as the matrix are stored dense, exactly
    assert exact.report["rel_error"] == 0.0 and torch.equal(exact.to_task_vector().deltas["w"], m)
    assert rank_for_energy(torch.tensor([4.0, 3.0]), 0.64) == 1 and rank_for_energy(torch.zeros(3), 0.9) == 0


def test_lora_tau_stores_in_a_tenth_and_round_trips(base, tmp_path):
    tau = diff_dirs(adapter(base, tmp_path / "r", 1, rank=1), adapter(base, tmp_path / "p", 2, rank=1))
    low = compress(tau, 0.999)
    # rank <= 2r = 2 per matrix: 2 * (m + n + 1) values instead of m * n
    assert all(v["rank"] <= 2 for v in low.report["matrices"].values())
    assert low.report["size_ratio"] == pytest.approx(low.numel() / tau.numel()) and low.report["size_ratio"] < 0.35
    assert low.report["rel_error"] < 1e-4
    low.save(tmp_path / "low.safetensors")
    back = load_any(tmp_path / "low.safetensors")
    assert all(torch.allclose(back.deltas[n], tau.deltas[n], atol=1e-5) for n in tau.deltas)
    assert LowRankTau.load(tmp_path / "low.safetensors").report["energy"] == 0.999
    with pytest.raises(TaskVectorError, match="not a low-rank task vector"):
        tau.save(tmp_path / "dense.safetensors")
        LowRankTau.load(tmp_path / "dense.safetensors")


def test_arith_cli_on_adapter_folders_and_low_rank_taus(base, tmp_path):
    real, pseudo = adapter(base, tmp_path / "real", 1), adapter(base, tmp_path / "pseudo", 2)
    target = adapter(base, tmp_path / "target", 3)
    r = CliRunner()
    res = r.invoke(app, ["arith", "diff", str(real), str(pseudo), str(tmp_path / "tau.safetensors")])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["arith", "lowrank", str(tmp_path / "tau.safetensors"), str(tmp_path / "low.safetensors"),
                         "--energy", "0.95"])
    assert res.exit_code == 0 and "relative error" in res.output and "ratio" in res.output, res.output
    res = r.invoke(app, ["arith", "apply", str(target), str(tmp_path / "low.safetensors"), str(tmp_path / "out"),
                         "--lambda", "0.5"])
    assert res.exit_code == 0, res.output
    tau = load_any(tmp_path / "low.safetensors")
    got, merged = load_state(tmp_path / "out"), load_state(target)
    assert all(torch.allclose(got[n], merged[n] + 0.5 * tau.deltas[n], atol=1e-6) for n in tau.deltas)
    r8 = adapter(base, tmp_path / "r8", 2, rank=8)
    res = r.invoke(app, ["arith", "diff", str(real), str(r8), str(tmp_path / "x.safetensors")])
    assert res.exit_code == 2 and "LoRA rank differs" in res.output and not (tmp_path / "x.safetensors").exists()
    cfg = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/nowhere"}))
    res = r.invoke(app, ["arith", "apply", str(target), str(tmp_path / "low.safetensors"), str(tmp_path / "o2")])
    assert res.exit_code == 2 and "is not here; give the base model folder" in res.output
