"""SSPS switched on in a trained SimCLR run, as in the paper: one run, branched.

The time-budget comparison (benchmarks/speaker_ssl.py) gave SimCLR 451 updates
and switched SSPS on at half of them, where the clusters were still poor
(pseudo-positives were the anchor's speaker for 14-22% of anchors). The SSPS
paper (and sslsv's ``start_epoch``) applies SSPS to a SimCLR that has trained
for a long time. This benchmark does that with one base run:

- ``--part base``: SimCLR for ``--steps`` updates (cosine schedule over all of
  them), keeping its checkpoint at ``--fork-at``;
- ``--part ssps``: waits for that kept checkpoint, forks it
  (``train.runs.fork_checkpoint``: the same weights, optimizer, sampler
  position and RNG) and continues the same schedule to ``--steps`` with SSPS
  (K=100, M=0: recipes/speechocean762/sv/ssps.yaml, fixed before running),
  switched on two epochs after the fork so the queues fill first;
- ``--part ssps --k K --m M``: the same fork with another SSPS setting (the
  paper's K/M table under this protocol), run folder ``sv_simclr_ssps_kK_mM``;
- ``--method dino``: the same protocol for DINO (run folders ``sv_dino*``,
  result ``speaker_ssl_branch_dino.json``; no K/M sweep by default); the report
  scores the students beside the EMA teachers DINO verifies with;
- ``--no-projector``: SimCLR's NT-Xent on the embedding itself, as every SSPS
  config of sslsv sets (``enable_projector: false``); run folders
  ``sv_simclr_noproj*``, result ``speaker_ssl_branch_simclr_noproj.json``;
- ``--part ssps --oracle`` / ``--part report --oracle``: a diagnostic branch whose
  clusters are the true training speakers (``ssps.oracle``; not self-supervised):
  every pseudo-positive is the anchor's speaker, so it bounds what better
  clustering could give SSPS under this protocol; folder ``sv_<method>_ssps_oracle``;
- ``--train-seed S``: the same split and trials, another training seed (init, crops,
  augmentation draws, the simulated-room pool): how far one run's figures move between seeds;
- ``--part report``: evaluates the base at the fork, the base run at the end,
  its SSPS branch and the ``--sweep`` branches (default 50:0 200:0 100:1) on the protocol of speaker_ssl.py (disjoint speakers,
  clean and cross-condition trials, cosine and AS-norm) ->
  ``benchmarks/results/speaker_ssl_branch.json``.

The two finished runs share their first ``--fork-at`` updates bit for bit and
had the same number of updates, so their difference is SSPS alone.
Run ``base`` and ``ssps`` as two processes (one per core), then ``report``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SO762, write_result  # noqa: E402
from speaker_ssl import SSPS_MAIN, degraded, evaluate, split, system_config  # noqa: E402

from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.data.manifest import write_manifest  # noqa: E402
from selfspeech.eval.sv import make_trials  # noqa: E402


def configs(args, n_train: int, k: int, m: int, oracle: bool = False):
    """(base config keeping the fork step, SSPS config) from the recipes; only ssps/keep_every differ."""
    seed = args.seed if args.train_seed is None else args.train_seed
    a = argparse.Namespace(channels=args.channels, batch_size=args.batch_size, max_steps=args.steps,
                           seed=seed, budget=None)
    extra = {"projector": None} if args.no_projector else {}
    if args.train_seed is not None:  # the room pool is drawn from the training seed: its own file, not a rewrite
        extra["rir_pool"] = str(ROOT / "runs" / f"rir_pool_train_seed{args.train_seed}.npz")
    per_epoch = n_train // args.batch_size
    start = round((args.fork_at + 2 * per_epoch) / args.steps, 4)  # queues fill for two epochs first
    branch = {"k": k, "m": m, "start": start, **({"oracle": True} if oracle else {})}  # old protocols unchanged
    return (system_config(args.method, None, a, {**extra, "loop.keep_every": args.fork_at}),
            system_config(args.method, branch, a, extra))


def encoder_at(run: Path, step: int, cfg):
    """The speaker encoder of a kept checkpoint, as the task exports it (DINO: the EMA teacher)."""
    from safetensors.torch import load_file

    from selfspeech.models.ecapa import SpeakerEncoder
    from selfspeech.objectives.speaker_ssl import SpeakerSSLTask

    task = SpeakerSSLTask(cfg, n_items=1)  # the base run has no SSPS queues, so no per-item state
    task.load_state_dict(load_file(str(run / "keep" / f"step-{step}" / "model.safetensors")))
    return SpeakerEncoder(task.export_encoder())


def student_encoder(ckpt: Path, cfg):
    """DINO's student (the task's ``encoder.*`` weights) from a task checkpoint directory.

    DINO verifies with the EMA teacher (``export_encoder``); the student is what the loss,
    and so SSPS, changes directly. Comparing both tells whether an SSPS effect reached the
    teacher through its averaging window."""
    from safetensors.torch import load_file

    from selfspeech.models.ecapa import ECAPATDNN, SpeakerEncoder

    state = {k.removeprefix("encoder."): v for k, v in load_file(str(ckpt / "model.safetensors")).items()
             if k.startswith("encoder.")}
    model = ECAPATDNN(cfg.ecapa_config())
    model.load_state_dict(state)
    return SpeakerEncoder(model)


def branch_name(tag: str, k: int, m: int, oracle: bool = False) -> str:
    """Run folder of an SSPS branch: the recipe's setting keeps the original name."""
    if oracle:
        return f"sv_{tag}_ssps_oracle"
    return f"sv_{tag}_ssps" if (k, m) == (SSPS_MAIN["k"], SSPS_MAIN["m"]) else f"sv_{tag}_ssps_k{k}_m{m}"


def parse_km(text: str) -> tuple[int, int]:
    try:
        k, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K:M, e.g. 50:0") from None
    return k, m


def ssps_summary(run: Path) -> dict:
    """Pseudo-positive speaker accuracy (monitoring only) and coverage from an SSPS run's log."""
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    acc = [r["ssps_speaker_acc"] for r in log if "ssps_speaker_acc" in r]
    cov = [r["ssps_coverage"] for r in log if "ssps_coverage" in r]
    return {"ssps_speaker_acc": {"first": acc[:3], "last": acc[-3:], "mean": float(np.mean(acc)) if acc else None},
            "ssps_coverage_mean": float(np.mean(cov)) if cov else None}


def jackknife_eer_difference(a: np.ndarray, b: np.ndarray, labels: np.ndarray, trial_spk: np.ndarray) -> dict:
    """EER(a) - EER(b) with a delete-one-speaker jackknife standard error.

    Trials are not independent (each speaker appears in many), so the error is
    estimated by leaving out each evaluation speaker in turn with every trial
    it takes part in (``trial_spk``: (N, 2) speaker codes of enrol and test).
    """
    from selfspeech.eval.sv_metrics import eer_mindcf

    full = eer_mindcf(a, labels).eer - eer_mindcf(b, labels).eer
    d = []
    for s in np.unique(trial_spk):
        keep = (trial_spk != s).all(axis=1)
        d.append(eer_mindcf(a[keep], labels[keep]).eer - eer_mindcf(b[keep], labels[keep]).eer)
    d = np.array(d)
    n = len(d)
    se = float(np.sqrt((n - 1) / n * ((d - d.mean()) ** 2).sum()))
    return {"diff": float(full), "jackknife_se": se, "ci95": [float(full - 1.96 * se), float(full + 1.96 * se)],
            "speakers": n}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("base", "ssps", "report"), required=True)
    ap.add_argument("--method", choices=("simclr", "dino"), default="simclr", help="the base run's objective")
    ap.add_argument("--no-projector", action="store_true",
                    help="SimCLR without its MLP head (sslsv's SSPS configs: enable_projector false)")
    ap.add_argument("--steps", type=int, default=1800, help="updates of each finished run")
    ap.add_argument("--fork-at", type=int, default=1200, help="update at which the SSPS branch leaves the base")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="speaker split, trials and (by default) training")
    ap.add_argument("--train-seed", type=int, default=None,
                    help="training seed alone (init, crops, augmentation), the split kept: a run's seed spread;"
                         " give it its own --work folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--k", type=int, default=SSPS_MAIN["k"], help="SSPS clusters of this --part ssps branch")
    ap.add_argument("--m", type=int, default=SSPS_MAIN["m"], help="SSPS neighbour clusters of this branch")
    ap.add_argument("--sweep", type=parse_km, nargs="*", default=None, metavar="K:M",
                    help="SSPS branches --part report evaluates beside the K=100, M=0 one"
                         " (default for simclr 50:0 200:0 100:1, for dino none)")
    ap.add_argument("--oracle", action="store_true",
                    help="--part ssps: train the diagnostic branch clustered by the true speakers (K=100 >= "
                         "speakers, M=0); --part report: evaluate it beside the others")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "speaker_ssl_branch")
    ap.add_argument("--result-name", default=None,
                    help="result file name (default speaker_ssl_branch, or speaker_ssl_branch_<method> for "
                         "dino / --no-projector); give one for another --steps/--fork-at protocol")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.no_projector and args.method != "simclr":
        sys.exit("--no-projector applies to --method simclr")
    M = args.method + ("_noproj" if args.no_projector else "")  # run folders and result keys
    if args.sweep is None:
        args.sweep = [(50, 0), (200, 0), (100, 1)] if M == "simclr" else []
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: this benchmark needs ../shared/data/speechocean762-train")
    if not 0 < args.fork_at < args.steps:
        sys.exit(f"--fork-at {args.fork_at} must lie inside the {args.steps} updates")
    if args.oracle and (args.k, args.m) != (SSPS_MAIN["k"], SSPS_MAIN["m"]):
        sys.exit("--oracle runs the recipe's K/M only (K >= the training speakers, M=0): drop --k/--m")
    import torch

    from selfspeech.models.ecapa import SpeakerEncoder
    from selfspeech.train.speaker import train_speaker

    torch.set_num_threads(args.threads)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train, evals = split(list(iter_kaldi_dir(SO762)), args.seed)
    manifest = w / "train.jsonl"
    write_manifest(manifest, [{k: v for k, v in i.items() if k != "text"} for i in train])
    branch = (args.k, args.m) if args.part == "ssps" else (SSPS_MAIN["k"], SSPS_MAIN["m"])  # report: the recipe's
    oracle = args.oracle and args.part == "ssps"
    base_cfg, ssps_cfg = configs(args, len(train), *branch, oracle=oracle)
    base_run, ssps_run = w / f"sv_{M}", w / branch_name(M, *branch, oracle=oracle)
    kept = base_run / "keep" / f"step-{args.fork_at}"
    if args.part == "base":
        train_speaker(manifest, base_run, base_cfg)
        return
    if args.part == "ssps":
        from selfspeech.train.checkpoint import resolve

        if resolve(ssps_run / "last") is None:
            while resolve(kept) is None:  # the base run writes it at update --fork-at
                print(f"waiting for {kept} (run --part base)", flush=True)
                time.sleep(60)
        train_speaker(manifest, ssps_run, ssps_cfg, fork_from=kept)
        return
    km = {f"{M}_ssps_k{k}_m{m}": (k, m) for k, m in args.sweep if (k, m) != (SSPS_MAIN["k"], SSPS_MAIN["m"])}
    sweep = {name: w / branch_name(M, k, m) for name, (k, m) in km.items()}
    if args.oracle:
        km[f"{M}_ssps_oracle"] = (SSPS_MAIN["k"], SSPS_MAIN["m"])
        sweep[f"{M}_ssps_oracle"] = w / branch_name(M, *km[f"{M}_ssps_oracle"], oracle=True)
    for run in (base_run, ssps_run, *sweep.values()):
        if not (run / "summary.json").is_file():
            sys.exit(f"{run} has not finished: run --part base and --part ssps (with its --k/--m) first,"
                     " or leave it out of --sweep")
    utt2spk = {i["id"]: i["speaker"] for i in evals}
    trials = make_trials(utt2spk, None, seed=args.seed)
    labels = np.array([t.target for t in trials])
    noisy = degraded(evals, args.seed)
    import random

    cohort = random.Random(args.seed).sample(train, 300)
    systems = {f"{M}_at_{args.fork_at}": encoder_at(base_run, args.fork_at, base_cfg),
               M: SpeakerEncoder.load(base_run), f"{M}_ssps": SpeakerEncoder.load(ssps_run),
               **{k: SpeakerEncoder.load(r) for k, r in sweep.items()}}
    if args.method == "dino":  # the students too (see student_encoder)
        systems |= {f"{M}_student_at_{args.fork_at}": student_encoder(kept, base_cfg),
                    f"{M}_student": student_encoder(base_run / "best", base_cfg),
                    f"{M}_ssps_student": student_encoder(ssps_run / "best", ssps_cfg)}
    res = {k: evaluate(k, e, evals, noisy, trials, labels, w, cohort) for k, e in systems.items()}
    codes = {spk: i for i, spk in enumerate(sorted(set(utt2spk.values())))}
    trial_spk = np.array([[codes[utt2spk[t.enrol]], codes[utt2spk[t.test]]] for t in trials])
    def vs_base(name: str, base: str = M) -> dict:
        s0, sb = np.load(w / f"scores_{base}.npy"), np.load(w / f"scores_{name}.npy")  # rows: clean, cross
        return {c: jackknife_eer_difference(s0[i], sb[i], labels, trial_spk) for i, c in enumerate(("clean", "cross"))}

    def reduction(name: str, base: str = M) -> dict:
        return {c: 1 - res[name][c]["eer"] / res[base][c]["eer"] for c in res[base]}
    student = {} if args.method != "dino" else {"student": {
        "relative_eer_reduction_ssps": reduction(f"{M}_ssps_student", f"{M}_student"),
        f"eer_difference_{M}_student_minus_ssps_student": vs_base(f"{M}_ssps_student", f"{M}_student")}}
    runs = {k: json.loads((r / "summary.json").read_text())
            for k, r in ((M, base_run), (f"{M}_ssps", ssps_run), *sweep.items())}
    default_name = "speaker_ssl_branch" if M == "simclr" else f"speaker_ssl_branch_{M}"
    write_result(args.result_name or default_name, {
        "eer": {k: v["clean"]["eer"] for k, v in res.items()},
        "mindcf": {k: v["clean"]["mindcf"] for k, v in res.items()},
        "conditions": res,
        "relative_eer_reduction_ssps": reduction(f"{M}_ssps"),
        f"eer_difference_{M}_minus_ssps": vs_base(f"{M}_ssps"),
        **ssps_summary(ssps_run),
        **student,
        "sweep": {k: {"k": km[k][0], "m": km[k][1], "oracle": k.endswith("_oracle"),
                      "relative_eer_reduction": reduction(k),
                      f"eer_difference_{M}_minus_branch": vs_base(k),
                      **ssps_summary(r)} for k, r in sweep.items()},
        "trials": len(trials), "target_trials": int(labels.sum()),
        "protocol": {"method": args.method, "projector": base_cfg.projector, "steps": args.steps,
                     "fork_at": args.fork_at, "ssps": ssps_cfg.to_dict()["ssps"],
                     "ecapa_channels": args.channels, "batch_size": args.batch_size, "threads": args.threads,
                     "seed": args.seed, "train_seed": base_cfg.loop.seed,
                     "train_utterances": len(train), "eval_utterances": len(evals)},
        "runs": runs,
    })


if __name__ == "__main__":
    main()
