"""Self-supervised speaker verification on speechocean762: SimCLR / DINO, with and without SSPS.

Protocol (fixed before any run; nothing tuned on the evaluation speakers):
- speakers split by age group, 3/4 for training and 1/4 for evaluation
  (``split_by_speaker``, seed 0); teenagers all train. Training never reads a
  speaker label (they only feed the SSPS monitoring of pseudo-positive accuracy);
- clean trials: every pair of evaluation utterances (each pair once, never an
  utterance with itself), cosine scoring of full utterances;
- cross-condition trials (../shared/notes/speaker-verification-floor.md: each
  speaker here was recorded in one session, so channel cues alone separate
  speakers): the same pairs with the test side passed through a simulated
  room (a pool of impulse responses with another seed than training's) and
  white/coloured noise at 5-15 dB SNR;
- every system gets ``--budget`` seconds of training on one thread; ECAPA-TDNN
  with C=``--channels``; SSPS switches on at half the budget; its main setting
  (K=100 ~ 20 utterances per cluster, M=0) follows the paper's scale rule, the
  K/M sweep rows are reported beside it, not used to pick it;
- baseline extractor: mel statistics (the floor of the shared notes).

Each system's run folder caches its metrics, so two processes can train
different systems (``--systems``) on the two cores and a last call without
training writes ``benchmarks/results/speaker_ssl.json``.
Usage: python benchmarks/speaker_ssl.py [--budget 1080] [--systems simclr dino ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, SO762, write_result  # noqa: E402
from recipe_configs import recipe_config, recipe_mapping  # noqa: E402

from selfspeech.audio.io import load_item  # noqa: E402
from selfspeech.data.augment import AugmentConfig, Augmenter, load_or_build_rir_pool  # noqa: E402
from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.data.manifest import write_manifest  # noqa: E402
from selfspeech.data.select import split_by_speaker  # noqa: E402
from selfspeech.eval.sv import cosine_scores, det_plot, embedding_plot, make_trials  # noqa: E402
from selfspeech.eval.sv_metrics import eer_mindcf  # noqa: E402

SSPS_MAIN = {"k": 100, "m": 0}  # = recipes/speechocean762/sv/ssps.yaml
SYSTEMS = {
    "simclr": ("simclr", None),
    "simclr_ssps": ("simclr", SSPS_MAIN),
    "dino": ("dino", None),
    "dino_ssps": ("dino", SSPS_MAIN),
    # sweep (as the paper's K/M table, scaled to ~1,900 training utterances)
    "simclr_ssps_k50": ("simclr", {"k": 50, "m": 0}),
    "simclr_ssps_k200": ("simclr", {"k": 200, "m": 0}),
    "simclr_ssps_k100_m1": ("simclr", {"k": 100, "m": 1}),
    # closer to the paper's protocol, where SSPS is the last phase on a trained model (sslsv:
    # start_epoch 100 = the baseline's length) and the positive queue holds a few % of an epoch
    # (sslsv's best configs: 25k of ~1M utterances): start at 3/4 of the budget, queue of ~half an epoch
    "simclr_ssps_late": ("simclr", {"k": 100, "m": 0, "start": 0.75, "queue": 1024}),
}
KEYS = ("simclr", "simclr_ssps", "dino", "dino_ssps")


def system_config(method: str, ssps: dict | None, args, knobs: dict | None = None):
    """recipes/speechocean762/sv/<method>.yaml (+ the ssps.yaml overlay with the sweep's K, M) + this
    run's knobs: ECAPA channels, batch size, budget, seed, the room-pool cache, and ``knobs`` (dotted keys)."""
    from selfspeech.train.speaker import SpeakerSSLConfig

    overlay = {} if ssps is None else {**recipe_mapping("sv/ssps.yaml")["ssps"], **ssps}
    # step-matched (--max-steps): the same number of updates (the paper's equal-epoch protocol)
    budget = {"loop.max_steps": args.max_steps} if args.max_steps else {"loop.budget_seconds": args.budget}
    return recipe_config(SpeakerSSLConfig, f"sv/{method}.yaml", {
        **{f"ssps.{k}": v for k, v in overlay.items()}, "ecapa.channels": args.channels,
        "batch_size": args.batch_size, "rir_pool": str(ROOT / "runs" / "rir_pool_train.npz"),
        **budget, "loop.seed": args.seed, **(knobs or {})})


def split(items: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for group in ("adult", "child"):
        parts = split_by_speaker([i for i in items if i["age_group"] == group], {"train": 0.75, "eval": 0.25},
                                 seed=seed)
        train += parts["train"]
        evals += parts["eval"]
    train += [i for i in items if i["age_group"] not in ("adult", "child")]
    return train, evals


def degraded(items: list[dict], seed: int) -> dict[str, np.ndarray]:
    """Each evaluation utterance through a simulated room and noise, deterministic per utterance."""
    cfg = AugmentConfig(p_noise=1.0, snr_db=(5.0, 15.0), noise_kinds=("white", "coloured"), p_reverb=1.0,
                        p_gain=0.0, p_speed=0.0)
    rirs = load_or_build_rir_pool(ROOT / "runs" / "rir_pool_eval.npz", 64, seed=seed + 1000, cfg=cfg)
    aug = Augmenter(cfg, rirs)
    return {it["id"]: aug(load_item(it), np.random.default_rng([seed, k])) for k, it in enumerate(items)}


def embed_all(extractor, items: list[dict], noisy: dict[str, np.ndarray]) -> tuple[dict, dict]:
    from tqdm import tqdm

    clean, cross = {}, {}
    for it in tqdm(items, desc="embed", mininterval=5):
        clean[it["id"]] = extractor.embed(load_item(it))
        cross[it["id"]] = extractor.embed(noisy[it["id"]])
    return clean, cross


def evaluate(name: str, extractor, items, noisy, trials, labels, work: Path, cohort_items: list[dict]) -> dict:
    """EER/minDCF on clean and cross-condition trials, raw cosine and AS-norm; cached per system."""
    from selfspeech.eval.sv import Trial, as_norm

    cache = work / f"metrics_{name}.json"
    out = json.loads(cache.read_text()) if cache.is_file() else {}
    if "clean" not in out:
        clean, cross = embed_all(extractor, items, noisy)
        np.savez(work / f"emb_{name}.npz", ids=np.array(list(clean)), clean=np.stack(list(clean.values())),
                 cross=np.stack([cross[k] for k in clean]))
    e = np.load(work / f"emb_{name}.npz", allow_pickle=False)
    ids = e["ids"].tolist()
    clean, cross = dict(zip(ids, e["clean"])), dict(zip(ids, e["cross"]))
    both = {**clean, **{k + "#deg": v for k, v in cross.items()}}
    cross_trials = [Trial(t.enrol, t.test + "#deg", t.target) for t in trials]  # enrolment clean, test degraded
    scores = {"clean": cosine_scores(clean, trials), "cross": cosine_scores(both, cross_trials)}
    if "clean_asnorm" not in out:
        # adaptive S-norm (top 100) against unlabelled training utterances: impostors by construction,
        # since evaluation speakers are disjoint; no label is used
        cohort = np.stack([extractor.embed(load_item(it)) for it in cohort_items])
        scores["clean_asnorm"] = as_norm(scores["clean"], trials, clean, cohort, top_n=100)
        scores["cross_asnorm"] = as_norm(scores["cross"], cross_trials, both, cohort, top_n=100)
    for cond, s in scores.items():
        if cond not in out:
            m = eer_mindcf(s, labels)
            out[cond] = {"eer": m.eer, "mindcf": m.mindcf}
    np.save(work / f"scores_{name}.npy", np.stack([scores["clean"], scores["cross"]]))
    cache.write_text(json.dumps(out, indent=1) + "\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=1080, help="training seconds per system")
    ap.add_argument("--channels", type=int, default=128, help="ECAPA-TDNN channels C")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    ap.add_argument("--max-steps", type=int, default=None,
                    help="train every system for this many steps instead of --budget seconds (equal updates; "
                         "time budgets on a shared VM gave up to 1.8x different step counts)")
    ap.add_argument("--result-name", default="speaker_ssl")
    ap.add_argument("--no-train", action="store_true", help="only assemble systems already trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "speaker_ssl")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: this benchmark needs ../shared/data/speechocean762-train")
    import torch

    from selfspeech.cluster.speakers import MelStatsExtractor
    from selfspeech.models.ecapa import SpeakerEncoder
    from selfspeech.train.speaker import train_speaker

    torch.set_num_threads(args.threads)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    items = list(iter_kaldi_dir(SO762))
    train, evals = split(items, args.seed)
    write_manifest(w / "train.jsonl", [{k: v for k, v in i.items() if k != "text"} for i in train])
    utt2spk = {i["id"]: i["speaker"] for i in evals}
    trials = make_trials(utt2spk, None, seed=args.seed)  # every pair of evaluation utterances
    labels = np.array([t.target for t in trials])
    noisy = degraded(evals, args.seed)
    print(f"train {len(train)} utts / {len({i['speaker'] for i in train})} spk; eval {len(evals)} utts / "
          f"{len(utt2spk and set(utt2spk.values()))} spk; {len(trials)} trials ({labels.sum()} target)", flush=True)

    import random

    cohort_items = random.Random(args.seed).sample(train, 300)
    results = {"melstats": evaluate("melstats", MelStatsExtractor(), evals, noisy, trials, labels, w, cohort_items)}
    runs = {}
    for name in args.systems:
        method, ssps = SYSTEMS[name]
        run = w / f"sv_{name}"
        if args.no_train and not (run / "summary.json").is_file():
            continue
        cfg = system_config(method, ssps, args)
        print(f"== train {name} ({f'{args.max_steps} steps' if args.max_steps else f'{args.budget:.0f} s'})",
              flush=True)
        runs[name] = train_speaker(w / "train.jsonl", run, cfg)
        results[name] = evaluate(name, SpeakerEncoder.load(run), evals, noisy, trials, labels, w, cohort_items)
        print(f"   {name}: EER clean {results[name]['clean']['eer']:.4f} cross {results[name]['cross']['eer']:.4f}",
              flush=True)
    if args.max_steps:  # a partial comparison (e.g. the SimCLR pair): its own result file
        for name in SYSTEMS:  # what other processes trained in this work folder
            if name not in results and (w / f"metrics_{name}.json").is_file():
                results[name] = json.loads((w / f"metrics_{name}.json").read_text())
                runs[name] = json.loads((w / f"sv_{name}" / "summary.json").read_text())
        write_result(args.result_name, {
            "protocol": f"{args.max_steps} optimizer steps per system", "eer": {k: v["clean"]["eer"] for k, v in results.items()},
            "mindcf": {k: v["clean"]["mindcf"] for k, v in results.items()}, "conditions": results,
            "runs": runs, "trials": len(trials), "target_trials": int(labels.sum()), "ecapa_channels": args.channels})
        return
    if not all((w / f"metrics_{k}.json").is_file() for k in KEYS):
        print("not every main system is trained yet: no result file written")
        return
    for name in SYSTEMS:  # assemble what other processes trained
        if name not in results and (w / f"metrics_{name}.json").is_file():
            results[name] = json.loads((w / f"metrics_{name}.json").read_text())
            runs[name] = json.loads((w / f"sv_{name}" / "summary.json").read_text())

    def rel(a, b, cond="clean"):
        return 1 - results[a][cond]["eer"] / results[b][cond]["eer"]

    figs = RESULTS / "speaker_ssl"
    figs.mkdir(parents=True, exist_ok=True)
    for i, cond in enumerate(("clean", "cross")):
        det_plot({k: (np.load(w / f"scores_{k}.npy")[i], labels) for k in ("melstats", *KEYS)},
                 figs / f"det_{cond}.png", title=f"DET, {cond} trials")
    best = min(KEYS, key=lambda k: results[k]["clean"]["eer"])
    e = np.load(w / f"emb_{best}.npz", allow_pickle=False)
    embedding_plot(dict(zip(e["ids"].tolist(), e["clean"])), utt2spk, figs / f"embeddings_{best}.png")
    p2r = {}  # Pseudo2Real-SC with these embeddings vs the baseline extractor (benchmarks/pseudo2real.py runs)
    for name, f in (("melstats", "pseudo2real.json"), ("ecapa", "pseudo2real_sc_ecapa.json")):
        if (RESULTS / f).is_file():
            d = json.loads((RESULTS / f).read_text())
            p2r[name] = {"extractor": d.get("sc_extractor", "melstats"), "result_file": f,
                         **{k: d["wer"][k] for k in ("pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random")},
                         "clusters": d.get("clusters")}
    # SSPS switched on in a longer SimCLR run, shared prefix, step-matched (benchmarks/speaker_ssl_branch.py)
    branch_file = RESULTS / "speaker_ssl_branch.json"
    branch = None
    if branch_file.is_file():
        b = json.loads(branch_file.read_text())
        branch = {"result_file": branch_file.name, "command": b.get("command"), "eer": b["eer"],
                  "mindcf": b["mindcf"], "relative_eer_reduction_ssps": b["relative_eer_reduction_ssps"],
                  "eer_difference_simclr_minus_ssps": b.get("eer_difference_simclr_minus_ssps"),
                  "steps": b["protocol"]["steps"], "fork_at": b["protocol"]["fork_at"]}
    sv_speed = RESULTS / "sv_metrics_speed.json"
    speed = json.loads(sv_speed.read_text()) if sv_speed.is_file() else {}
    write_result("speaker_ssl", {
        "eer": {k: results[k]["clean"]["eer"] for k in KEYS},
        "mindcf": {k: results[k]["clean"]["mindcf"] for k in KEYS},
        "trials": len(trials), "target_trials": int(labels.sum()),
        "eer_10m_trials_seconds": speed.get("eer_10m_trials_seconds"),
        "cross_condition": {k: results[k]["cross"] for k in results},
        "clean": {k: results[k]["clean"] for k in results},
        "clean_asnorm": {k: results[k].get("clean_asnorm") for k in results},
        "cross_condition_asnorm": {k: results[k].get("cross_asnorm") for k in results},
        "relative_eer_reduction_ssps": {"simclr": rel("simclr_ssps", "simclr"), "dino": rel("dino_ssps", "dino"),
                                        "simclr_cross": rel("simclr_ssps", "simclr", "cross"),
                                        "dino_cross": rel("dino_ssps", "dino", "cross")},
        "ssps_sweep": {k: {**SYSTEMS[k][1], **results[k]}
                       for k in results if k in SYSTEMS and SYSTEMS[k][1] is not None},
        "pseudo2real_sc": p2r, "ssps_on_trained_simclr": branch,
        "runs": runs, "budget_seconds_per_system": args.budget, "threads": args.threads,
        "steps_per_system": {k: v.get("steps") for k, v in runs.items()},
        "ecapa_channels": args.channels, "batch_size": args.batch_size,
        "protocol": {"train_utterances": len(train), "train_speakers": len({i["speaker"] for i in train}),
                     "eval_utterances": len(evals), "eval_speakers": len(set(utt2spk.values())),
                     "ssps_main": SSPS_MAIN, "ssps_start": 0.5,
                     "cross_condition": "enrol clean, test through a simulated room + 5-15 dB noise"},
        "speed_source": f"results/sv_metrics_speed.json ({speed.get('command')}, {speed.get('date')})" if speed else None,
        "figures": sorted(str(p.relative_to(RESULTS)) for p in figs.glob("*.png")),
    })


if __name__ == "__main__":
    main()
