"""The benchmarks train what their committed protocols say, read from the shipped recipes.

Each benchmark builds its configs from ``recipes/speechocean762/`` plus its own
command-line knobs. Here the configs it builds for the commands that made the
committed result files (and for its defaults) are compared, field by field,
with the values the benchmark protocols fix (written out below, as the
benchmarks hard-coded them before they read recipes): a recipe edit that would
change a committed benchmark protocol fails here instead of silently changing
the next run. Nothing is trained; no audio is read.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from selfspeech.config import to_mapping
from selfspeech.train.ctc import CTCConfig
from selfspeech.train.pretrain import PretrainConfig
from selfspeech.train.speaker import SpeakerSSLConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
import speaker_ssl  # noqa: E402
import speaker_ssl_branch  # noqa: E402
import ssl_pretraining  # noqa: E402


def committed(script: str) -> list[tuple[str, dict, list[str]]]:
    """(file name, result, the script's arguments) of every committed result file ``script`` wrote."""
    out = []
    for p in sorted(RESULTS.glob("*.json")):
        d = json.loads(p.read_text())
        argv = shlex.split(d.get("command", ""))
        if len(argv) > 1 and argv[1] == f"benchmarks/{script}":
            out.append((p.name, d, argv[2:]))
    return out


def same(built, expected) -> None:
    """Every field, the defaults included, as the run folders record them (their reuse compares these)."""
    assert type(built) is type(expected)
    assert to_mapping(built) == to_mapping(expected)


# -- benchmarks/ssl_pretraining.py ---------------------------------------------------------------

OBJECTIVE = {"bestrq": "bestrq", "birq": "birq", "wav2vec2": "wav2vec2", "xlsr_multigroup": "wav2vec2",
             "xlsr_adults_only": "wav2vec2"}


def loop_budget(steps: int | None, seconds: float) -> dict:
    return {"max_steps": steps, "budget_seconds": None} if steps else {"max_steps": 100_000, "budget_seconds": seconds}


def expected_pretrain(args, name: str) -> PretrainConfig:
    steps = dict(args.pt_steps_for).get(name, args.pt_steps)
    objective = OBJECTIVE[name]
    return PretrainConfig(objective=objective,
                          encoder={"preset": args.encoder_size, "frontend": "wave" if objective == "wav2vec2" else "mel"},
                          loop={"lr": 5e-4, "seed": args.seed, "log_every": 25, "ckpt_every": 100,
                                **loop_budget(steps, args.budget)},
                          max_batch_seconds=60.0, crop_seconds=6.0,
                          group_field="age_group" if name == "xlsr_multigroup" else None)


def expected_ctc(args, lexicon: str, enc: dict, pretrained: bool, seed: int, lr: float, init_seed, reinit: int):
    every = max(100, (args.ft_steps or 0) // 10)
    freeze = (100 if args.ft_freeze is None else round(args.ft_freeze * args.ft_steps)) if pretrained else 0
    return CTCConfig(targets="phone", lexicon=lexicon, encoder=enc, init_seed=init_seed, head_init=args.ctc_head_init,
                     reinit_top=reinit or None,
                     loop={"lr": lr, "eval_every": every, "log_every": 25, "ckpt_every": every, "seed": seed,
                           **loop_budget(args.ft_steps, args.ft_budget)},
                     freeze_steps=freeze, max_batch_seconds=30.0)


SSL_COMMANDS = committed("ssl_pretraining.py")


def test_ssl_pretraining_results_are_found():
    assert len(SSL_COMMANDS) >= 10  # the committed PER tables (RESULTS.md): not an empty comparison


@pytest.mark.parametrize("argv", [[], ["--encoder-size", "medium", "--seed", "2", "--budget", "100"],
                                  *[c[2] for c in SSL_COMMANDS]], ids=lambda a: " ".join(a) or "defaults")
def test_ssl_pretraining_configs_match_the_protocol(argv):
    args = ssl_pretraining.build_parser().parse_args(argv)
    steps = ssl_pretraining.pretrain_steps(args)
    for name in OBJECTIVE:
        same(ssl_pretraining.pretrain_config(args, name, steps[name]), expected_pretrain(args, name))
    lexicon = "lexicon.txt"
    for name, enc, init in [("bestrq", {}, Path("pt_bestrq/encoder")),
                            ("scratch", {"preset": args.encoder_size, "frontend": "mel"}, None),
                            ("scratch_wave", {"preset": args.encoder_size, "frontend": "wave"}, None)]:
        for reinit in (args.ctc_reinit_top if init else [0]):
            for lr in args.ft_lrs:
                same(ssl_pretraining.ctc_config(args, Path(lexicon), enc, init, lr=lr, reinit=reinit),
                     expected_ctc(args, lexicon, enc, init is not None, args.seed, lr, None, reinit))
            for seed in args.ctc_seeds:
                same(ssl_pretraining.ctc_config(args, Path(lexicon), enc, init, seed, lr=args.ft_lrs[0], reinit=reinit),
                     expected_ctc(args, lexicon, enc, init is not None, seed, args.ft_lrs[0], None, reinit))
            for seed, init_seed in args.ctc_seed_split:
                same(ssl_pretraining.ctc_config(args, Path(lexicon), enc, init, seed, lr=args.ft_lrs[0],
                                                init_seed=init_seed, reinit=reinit),
                     expected_ctc(args, lexicon, enc, init is not None, seed, args.ft_lrs[0], init_seed, reinit))


@pytest.mark.parametrize("name,result,argv", SSL_COMMANDS, ids=[c[0] for c in SSL_COMMANDS])
def test_ssl_pretraining_configs_match_the_result_files(name, result, argv):
    """What each committed result file says its runs used: budgets and the CTC freeze."""
    args = ssl_pretraining.build_parser().parse_args(argv)
    p = result["protocol"]
    ctc = ssl_pretraining.ctc_config(args, Path("lexicon.txt"), {}, Path("encoder"))
    # files from before --ft-freeze do not record it: those runs froze a pretrained encoder for 100 updates
    assert ctc.freeze_steps == p.get("ctc_frozen_steps_pretrained", 100)
    assert (ctc.loop.max_steps, ctc.loop.budget_seconds) == (
        (p["steps_ctc"], None) if p.get("steps_ctc") else (100_000, p["budget_seconds_ctc"]))
    steps = p.get("steps_pretrain")  # absent from files written before step budgets: time budgets
    for system in (s for s in args.systems if s in OBJECTIVE):
        cfg = ssl_pretraining.pretrain_config(args, system, ssl_pretraining.pretrain_steps(args)[system])
        want = steps.get(system) if isinstance(steps, dict) else steps
        assert cfg.loop.max_steps == (want or 100_000) and cfg.loop.budget_seconds == p["budget_seconds_pretrain"]
        layers, _, width = p["encoder"].split(":")[1].split()[:3]  # "small preset: 4 x 144 Transformer, ..."
        assert (cfg.encoder_config().n_layers, cfg.encoder_config().d_model) == (int(layers), int(width))


# -- benchmarks/speaker_ssl.py and speaker_ssl_branch.py -----------------------------------------

SV_LOOP = {"max_steps": 100_000, "schedule": "cosine", "warmup_fraction": 0.05, "grad_clip": 3.0, "log_every": 10,
           "ckpt_every": 25}
SV_METHOD = {
    "simclr": {"method": "simclr", "ecapa": {"embed_dim": 192}, "segment_seconds": 2.0, "temperature": 0.03,
               "projector": (512, 256), "augment": {}, "loop": {"lr": 1e-3, "weight_decay": 5e-5, **SV_LOOP}},
    "dino": {"method": "dino", "ecapa": {"embed_dim": 192}, "segment_seconds": 2.0, "local_seconds": 1.0, "n_local": 4,
             "dino_out": 1024, "dino_hidden": 512, "dino_bottleneck": 128, "t_student": 0.1, "t_teacher": 0.04,
             "momentum": 0.996, "center_momentum": 0.9, "augment": {},
             "loop": {"lr": 5e-4, "weight_decay": 0.04, **SV_LOOP}},
}
SSPS = {"k": 100, "m": 0, "start": 0.5, "queue": 4096, "ref_seconds": 4.0}


def expected_sv(method: str, ssps: dict | None, channels: int, batch: int, seed: int, max_steps: int | None,
                budget: float | None, rir_pool: str = "rir_pool_train.npz", **extra) -> SpeakerSSLConfig:
    d = {**SV_METHOD[method], "batch_size": batch, "rir_pool": str(ROOT / "runs" / rir_pool)}
    d["ecapa"] = {**d["ecapa"], "channels": channels}
    d["loop"] = {**d["loop"], "seed": seed, **({"max_steps": max_steps} if max_steps else {"budget_seconds": budget})}
    d["loop"] |= extra.pop("loop", {})
    if ssps is not None:
        d["ssps"] = {**SSPS, **ssps}
    return SpeakerSSLConfig.from_dict(d | extra)


SV_COMMANDS = committed("speaker_ssl.py")
BRANCH_COMMANDS = committed("speaker_ssl_branch.py")


def test_speaker_results_are_found():
    assert len(SV_COMMANDS) >= 2 and len(BRANCH_COMMANDS) >= 6


@pytest.mark.parametrize("argv", [[], ["--channels", "256", "--seed", "1", "--batch-size", "32"],
                                  *[c[2] for c in SV_COMMANDS]], ids=lambda a: " ".join(a) or "defaults")
def test_speaker_ssl_configs_match_the_protocol(argv):
    args = speaker_ssl.build_parser().parse_args(argv)
    for method, ssps in speaker_ssl.SYSTEMS.values():
        same(speaker_ssl.system_config(method, ssps, args),
             expected_sv(method, ssps, args.channels, args.batch_size, args.seed, args.max_steps, args.budget))


def test_speaker_ssl_main_setting_is_the_recorded_one():
    """speaker_ssl.json records K, M and the SSPS start of its main systems."""
    (_, result, argv), = [c for c in SV_COMMANDS if c[0] == "speaker_ssl.json"]
    args = speaker_ssl.build_parser().parse_args(argv)
    cfg = speaker_ssl.system_config(*speaker_ssl.SYSTEMS["simclr_ssps"], args)
    p = result["protocol"]
    assert ({"k": cfg.ssps.k, "m": cfg.ssps.m}, cfg.ssps.start) == (p["ssps_main"], p["ssps_start"])
    assert (cfg.ecapa_config().channels, cfg.batch_size, cfg.loop.budget_seconds) == (
        result["ecapa_channels"], result["batch_size"], result["budget_seconds_per_system"])


def expected_branch(args, n_train: int, k: int, m: int, oracle: bool):
    seed = args.seed if args.train_seed is None else args.train_seed
    extra = {"projector": None} if args.no_projector else {}
    if args.train_seed is not None:
        extra["rir_pool"] = f"rir_pool_train_seed{args.train_seed}.npz"
    start = round((args.fork_at + 2 * (n_train // args.batch_size)) / args.steps, 4)
    common = (args.channels, args.batch_size, seed, args.steps, None)
    return (expected_sv(args.method, None, *common, loop={"keep_every": args.fork_at}, **extra),
            expected_sv(args.method, {"k": k, "m": m, "start": start, **({"oracle": True} if oracle else {})},
                        *common, **extra))


@pytest.mark.parametrize("name,result,argv", BRANCH_COMMANDS, ids=[c[0] for c in BRANCH_COMMANDS])
def test_speaker_ssl_branch_configs_match_the_result_files(name, result, argv):
    args = speaker_ssl_branch.build_parser().parse_args(argv)
    p = result["protocol"]
    n_train = p["train_utterances"]
    for k, m in [(speaker_ssl.SSPS_MAIN["k"], speaker_ssl.SSPS_MAIN["m"]), *(args.sweep or [])]:
        for oracle in (False, True):
            built = speaker_ssl_branch.configs(args, n_train, k, m, oracle)
            for b, e in zip(built, expected_branch(args, n_train, k, m, oracle), strict=True):
                same(b, e)
    base, ssps = speaker_ssl_branch.configs(args, n_train, speaker_ssl.SSPS_MAIN["k"], speaker_ssl.SSPS_MAIN["m"])
    recorded = to_mapping(ssps)["ssps"]
    assert {key: recorded[key] for key in p["ssps"]} == p["ssps"]  # keys added since default to the old behaviour
    assert (base.ecapa_config().channels, base.batch_size, ssps.loop.max_steps) == (
        p["ecapa_channels"], p["batch_size"], p["steps"])
    if "projector" in p:
        assert to_mapping(base.projector) == p["projector"]
    if "train_seed" in p:
        assert base.loop.seed == ssps.loop.seed == p["train_seed"]
    assert base.loop.keep_every == p["fork_at"] and ssps.loop.keep_every == 0


def test_a_changed_recipe_value_is_caught(tmp_path, monkeypatch):
    """The comparison above sees a recipe edit (here SimCLR's temperature): the point of these tests."""
    import recipe_configs

    src = recipe_configs.RECIPES
    for rel in ("sv/simclr.yaml", "sv/ssps.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((src / rel).read_text().replace("temperature: 0.03", "temperature: 0.05"))
    monkeypatch.setattr(recipe_configs, "RECIPES", tmp_path)
    args = speaker_ssl.build_parser().parse_args([])
    with pytest.raises(AssertionError):
        same(speaker_ssl.system_config("simclr", None, args),
             expected_sv("simclr", None, args.channels, args.batch_size, args.seed, args.max_steps, args.budget))
