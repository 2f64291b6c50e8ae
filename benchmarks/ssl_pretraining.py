"""Self-supervised pretraining on speechocean762: PER after CTC fine-tuning, per method, same CPU budget.

Protocol (fixed before any run; nothing tuned on evaluation speakers):
- pretraining audio: every utterance of the corpus, transcripts never read
  (``xlsr_adults_only``: the adult utterances only);
- labelled set: ``--labelled-speakers`` adult speakers (all their utterances) for
  CTC training, 3 other adult speakers for early stopping;
- evaluation: every remaining adult speaker and every child speaker; phone
  references from ``lexicon.txt`` (stress removed, first pronunciation); PER
  with 95% CIs by bootstrap over speakers;
- budget: every pretraining run gets ``--budget`` seconds of training time and
  every CTC fine-tune ``--ft-budget`` seconds, one thread each (stated in the
  result file), so the methods compare at equal CPU cost, not equal steps; or,
  with ``--pt-steps`` / ``--ft-steps``, the same number of updates (wall-clock
  budgets drift with the machine's load); ``--pt-steps-for SYSTEM=N`` overrides
  one method's updates, for a CPU-matched step budget (each method gets the
  updates its measured per-update cost affords: reproducible like a step
  budget, fair like a time budget);
- systems: scratch (mel front-end, no pretraining), scratch_wave (waveform
  front-end), wav2vec2, xlsr_multigroup (wav2vec2 + age-group sampling,
  alpha 0.5), xlsr_adults_only (wav2vec2 on adult audio only), bestrq, birq;
- ``--group-analysis SYSTEM`` (the XLSR paper's joint vs per-language
  fine-tuning, with gender as the group since only adults may be labelled):
  from SYSTEM's pretrained encoder, one CTC model on 5 male + 5 female adult
  speakers against one model per gender on its 5 speakers (dev: 2 other
  speakers per gender), PER per gender on the remaining adults and on the
  children;
- ``--ctc-reinit-top N ...``: CTC fine-tunes of each pretrained encoder with
  its top N Transformer layers re-initialised (Pasad et al. 2021), reported
  as ``<system>_reinit<N>`` beside the plain one (N = 0);
- ``--ft-lrs``: CTC peak learning rates tried for every system; each system
  keeps the one with the lowest PER on the 3 adult dev speakers (a rule any
  corpus allows; evaluation speakers never choose).

Configs: ``recipes/speechocean762/ssl/<objective>.yaml`` and ``ctc/phones.yaml``, read
as ``selfspeech pretrain`` / ``finetune-ctc`` read them, with the knobs above as dotted keys.

Writes ``benchmarks/results/ssl_pretraining.json``. Run folders are resumable.
Usage: python benchmarks/ssl_pretraining.py [--budget 360] [--ft-budget 240] [--systems ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, SO762, write_result  # noqa: E402
from recipe_configs import recipe_config  # noqa: E402

from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.data.manifest import write_manifest  # noqa: E402
from selfspeech.data.select import split_by_speaker  # noqa: E402
from selfspeech.eval.report import build_results, read_jsonl  # noqa: E402
from selfspeech.label.transcribe import transcribe_ctc  # noqa: E402
from selfspeech.train.ctc import CTCConfig, finetune_ctc, phone_references  # noqa: E402
from selfspeech.train.pretrain import PretrainConfig, pretrain  # noqa: E402

PRETRAINED = {
    "bestrq": dict(objective="bestrq", data="all"),
    "birq": dict(objective="birq", data="all"),
    "wav2vec2": dict(objective="wav2vec2", data="all"),
    "xlsr_multigroup": dict(objective="wav2vec2", data="all", group_field="age_group"),
    "xlsr_adults_only": dict(objective="wav2vec2", data="adults"),
}
SCRATCH = {"scratch": "mel", "scratch_wave": "wave"}
KEYS = ("scratch", "wav2vec2", "xlsr_multigroup", "xlsr_adults_only", "bestrq", "birq")


def speed_figures() -> dict:
    """The two throughput keys, from benchmarks/ssl_speed.py's result when it exists (it measures them)."""
    p = RESULTS / "ssl_speed.json"
    if not p.is_file():
        return {"throughput_ratio_vs_transformers": None, "gflops_fraction_of_peak": None}
    d = json.loads(p.read_text())
    return {k: d[k] for k in ("throughput_ratio_vs_transformers", "gflops_fraction_of_peak")} | {
        "speed_source": f"results/ssl_speed.json ({d.get('command')}, {d.get('date')})"}


ENCODER_SIZES = ("small", "medium")   # EncoderConfig presets this benchmark affords on a CPU


def encoder_text(size: str) -> str:
    """The preset's shape for the result file, read from EncoderConfig (not a copy of its numbers)."""
    from selfspeech.models.ssl import EncoderConfig

    c = EncoderConfig.preset(size)
    return f"{size} preset: {c.n_layers} x {c.d_model} Transformer, {c.n_heads} heads, ff {c.ff_dim}"


def encoder_for(frontend: str, size: str = "small") -> dict:
    # one size for every method of a run: small = 4 x 144 (about 1 M parameters in the Transformer)
    return {"preset": size, "frontend": frontend}


def seed_summary(per: dict, group: str) -> dict:
    """PER of the main CTC run and of each extra CTC seed, with their mean, median, min and max."""
    vals = [per[group]["per"]] + [v[group] for v in per.get("ctc_seeds", {}).values()]
    # the median too: one CTC seed in three can stay on the blank plateau, which drags the mean
    return {"runs": len(vals), "mean": sum(vals) / len(vals), "median": float(np.median(vals)), "min": min(vals),
            "max": max(vals), "values": vals}


def plot_ctc_curves(curves: dict[str, dict[str, Path]], out: Path) -> Path:
    """Dev PER and training loss over CTC updates, a colour per system and a line style per seed.

    What the tables cannot show: which runs sat on CTC's blank plateau (loss ~3.3, dev PER ~100%)
    and for how long, and where each run began to overfit its 10 minutes of labels."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    ax_dev, ax_loss = fig.subplots(1, 2)
    styles = ["-", "--", ":", "-."]
    for c, (name, runs) in enumerate(curves.items()):
        for k, (label, run) in enumerate(runs.items()):
            rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
            dev = [(r["step"], r["dev_error_rate"]) for r in rows if "dev_error_rate" in r]
            loss = [(r["step"], r["loss"]) for r in rows if "loss" in r]
            kw = dict(color=f"C{c}", linestyle=styles[k % len(styles)], label=f"{name} {label}")
            if dev:
                ax_dev.plot(*zip(*dev), marker=".", **kw)
            if loss:   # mean over windows of 4 logged updates: the raw curve is one batch each
                steps, vals = zip(*loss)
                win = [float(np.mean(vals[i:i + 4])) for i in range(0, len(vals), 4)]
                ax_loss.plot(steps[::4][:len(win)], win, **kw)
    ax_dev.set(xlabel="CTC update", ylabel="dev PER (3 adult speakers)", title="dev PER during CTC fine-tuning")
    ax_loss.set(xlabel="CTC update", ylabel="CTC loss (nats per target token)", title="training loss")
    ax_loss.set_ylim(0, 6)   # the first updates (10-18 nats) would flatten the rest
    ax_loss.axhline(3.3, color="grey", linewidth=0.8, linestyle=":")   # where the blank plateau sits here
    ax_dev.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def budget(steps: int | None, seconds: float) -> dict:
    """Loop fields for a step budget (``steps``) or else a wall-clock one."""
    return {"max_steps": steps, "budget_seconds": None} if steps else {"max_steps": 100_000, "budget_seconds": seconds}


def steps_for(text: str) -> tuple[str, int]:
    name, _, n = text.partition("=")
    if name not in PRETRAINED or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SYSTEM=N with SYSTEM in {sorted(PRETRAINED)} and N >= 1")
    return name, int(n)


def seed_pair(text: str) -> tuple[int, int]:
    seed, _, init = text.partition(":")
    if not (seed.isdigit() and init.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SEED:INIT, two integers")
    return int(seed), int(init)


def budget_text(steps: int | None, seconds: float) -> str:
    return f"{steps} steps" if steps else f"{seconds:.0f} s"


DEFAULT_CTC_LR = 2e-3
CTC_RECIPE = "ctc/phones.yaml"


def loop_knobs(steps: int | None, seconds: float, seed: int) -> dict:
    return {"loop.seed": seed, **{f"loop.{k}": v for k, v in budget(steps, seconds).items()}}


def pretrain_config(args, name: str, steps: int | None) -> PretrainConfig:
    """recipes/speechocean762/ssl/<objective>.yaml with this run's budget, seed, encoder size and
    the system's group field (XLSR multi-group sampling)."""
    spec = PRETRAINED[name]
    group = {"group_field": spec["group_field"]} if "group_field" in spec else {}
    return recipe_config(PretrainConfig, f"ssl/{spec['objective']}.yaml",
                         {"encoder.preset": args.encoder_size, **group, **loop_knobs(steps, args.budget, args.seed)})


def pretrain_steps(args) -> dict[str, int | None]:
    """Pretraining updates per system: --pt-steps, or --pt-steps-for's for that system (None: --budget)."""
    return {name: args.pt_steps for name in PRETRAINED} | dict(args.pt_steps_for)


def ctc_config(args, lexicon: Path, enc: dict, init, seed: int | None = None, lr: float = DEFAULT_CTC_LR,
               init_seed: int | None = None, reinit: int = 0) -> CTCConfig:
    """recipes/speechocean762/ctc/phones.yaml with this fine-tune's knobs: budget, learning rate,
    seeds, output-layer init, re-initialised layers, frozen updates and (scratch) encoder ``enc``."""
    every = max(100, (args.ft_steps or 0) // 10)
    seed = args.seed if seed is None else seed
    return recipe_config(CTCConfig, CTC_RECIPE, {
        "lexicon": str(lexicon), **{f"encoder.{k}": v for k, v in enc.items()}, "init_seed": init_seed,
        "head_init": args.ctc_head_init, "reinit_top": reinit or None, "freeze_steps": freeze_steps(args) if init else 0,
        "loop.lr": lr, "loop.eval_every": every, "loop.ckpt_every": every,
        **loop_knobs(args.ft_steps, args.ft_budget, seed)})


def freeze_steps(args) -> int:
    """CTC updates during which a pretrained encoder stays frozen (output layer only).

    Default 100. ``--ft-freeze F``: the first F of the ``--ft-steps`` updates, as wav2vec 2.0
    fine-tunes its 10-minute split (Baevski et al. 2020, Table 6 setup: Transformer frozen for the
    first 10k of 13k updates, F = 0.77)."""
    return 100 if args.ft_freeze is None else round(args.ft_freeze * args.ft_steps)


def ctc_run_name(args, name: str, lr: float, seed: int | None = None, init_seed: int | None = None,
                 reinit: int = 0) -> str:
    """Run folder: the default settings keep the historical names, so cached runs are reused."""
    frozen = name in PRETRAINED and args.ft_freeze is not None
    return (f"ctc_{name}" + (f"_reinit{reinit}" if reinit else "") + ("" if seed is None else f"_seed{seed}")
            + ("" if init_seed is None else f"_init{init_seed}")
            + ("" if lr == DEFAULT_CTC_LR else f"_lr{lr:g}")
            + (f"_freeze{args.ft_freeze:g}" if frozen else "") + head_suffix(args))


def head_suffix(args) -> str:
    return f"_{args.ctc_head_init}head" if args.ctc_head_init else ""


def decode_per(run: Path, sets: dict, seed: int) -> dict:
    """PER of ``run/best`` on each named (phone manifest, references) set; cached in run/per.json."""
    per, cache = {}, run / "per.json"
    if cache.is_file() and cache.stat().st_mtime > (run / "best" / "model.safetensors").stat().st_mtime:
        per = json.loads(cache.read_text())  # decoded since the model was made
    for g, (manifest, refs) in sets.items():
        if g in per:
            continue
        hyp = transcribe_ctc(run / "best", manifest, run / f"{g}.hyp.jsonl")
        r = build_results(refs, list(read_jsonl(hyp)), normalizer="none", seed=seed)["system"]["groups"][0]
        per[g] = {"per": r["wer"], "ci95": r["wer_ci"], "utterances": r["utterances"], "speakers": r["speakers"]}
        cache.write_text(json.dumps(per, indent=1) + "\n")
    return per


def group_analysis(args, w: Path, adults, children, lexicon: Path) -> dict:
    """Joint vs per-group CTC fine-tuning of one pretrained encoder (groups: gender; see the module doc)."""
    name = args.group_analysis
    init = w / f"pt_{name}" / "encoder"
    if not init.is_dir():
        sys.exit(f"--group-analysis {name}: no pretrained encoder at {init}; pretrain it first (--systems {name})")
    ga = w / "groups"
    ga.mkdir(exist_ok=True)
    sets, parts = {}, {}
    for g in ("m", "f"):
        parts[g] = split_by_speaker([i for i in adults if i["gender"] == g],
                                    {"train": 5, "dev": 2, "eval": 1.0}, seed=args.seed)
        for split, rows in parts[g].items():
            write_manifest(ga / f"{split}_{g}.jsonl", rows)
        for who, rows in (("adult", parts[g]["eval"]), ("child", [i for i in children if i["gender"] == g])):
            man = ga / f"eval_{who}_{g}.jsonl"
            write_manifest(man, rows)
            p, _ = phone_references(man, lexicon, ga / f"eval_{who}_{g}.phones.jsonl")
            sets[f"{who}_{g}"] = (p, list(read_jsonl(p)))
    for split in ("train", "dev"):
        write_manifest(ga / f"{split}_joint.jsonl", parts["m"][split] + parts["f"][split])
    out = {"encoder": name, "speakers": {g: {k: len({i["speaker"] for i in v}) for k, v in parts[g].items()}
                                         for g in parts}, "per": {}, "ci95": {}, "ctc_steps": {}}
    for model in ("joint", "m", "f"):
        print(f"== group analysis: CTC on {model} ({name} encoder)", flush=True)
        run = ga / (f"ctc_{name}_{model}" + (f"_freeze{args.ft_freeze:g}" if args.ft_freeze is not None else "")
                    + head_suffix(args))
        ft = finetune_ctc(ga / f"train_{model}.jsonl", ga / f"dev_{model}.jsonl", run,
                          ctc_config(args, lexicon, {}, init), init=init)
        per = decode_per(run, sets, args.seed)
        out["per"][model] = {k: v["per"] for k, v in per.items()}
        out["ci95"][model] = {k: v["ci95"] for k, v in per.items()}
        out["ctc_steps"][model] = ft["steps"]
    print(json.dumps(out["per"], indent=1), flush=True)
    return out


def ctc_system(args, w: Path, lexicon: Path, sets: dict, name: str, label: str, enc: dict, init,
               reinit: int) -> tuple[dict, dict, dict]:
    """CTC fine-tunes of one encoder (learning rate chosen on dev, extra seeds): (PER, chosen run's
    summary, {curve label: run folder}). ``sets``: what each run is decoded on."""
    # CTC learning rate chosen per system on the adult dev speakers (ft_dev), never on evaluation speakers
    fts = {}
    for lr in args.ft_lrs:
        run = w / ctc_run_name(args, name, lr, reinit=reinit)
        print(f"== CTC fine-tune {label}, lr {lr:g} ({budget_text(args.ft_steps, args.ft_budget)})", flush=True)
        fts[lr] = (run, finetune_ctc(w / "ft_train.jsonl", w / "ft_dev.jsonl", run,
                                     ctc_config(args, lexicon, enc, init, lr=lr, reinit=reinit), init=init))
    lr = min(fts, key=lambda k: (fts[k][1]["best_dev_error_rate"], k))
    run, ft = fts[lr]
    curve = {"seed 0": run}
    per = decode_per(run, sets, args.seed)
    per["ctc_lr"] = {"chosen": lr, "dev_per": {f"{k:g}": v[1]["best_dev_error_rate"] for k, v in fts.items()}}
    for seed in args.ctc_seeds:  # the same encoder fine-tuned again: CTC's run-to-run spread
        print(f"== CTC fine-tune {label}, seed {seed}", flush=True)
        run = w / ctc_run_name(args, name, lr, seed, reinit=reinit)
        curve[f"seed {seed}"] = run
        finetune_ctc(w / "ft_train.jsonl", w / "ft_dev.jsonl", run,
                     ctc_config(args, lexicon, enc, init, seed, lr=lr, reinit=reinit), init=init)
        extra = decode_per(run, sets, args.seed)
        per.setdefault("ctc_seeds", {})[str(seed)] = {g: extra[g]["per"] for g in sets}
    for seed, init_seed in args.ctc_seed_split:  # which seeded part decides a run's fate (see --help)
        print(f"== CTC fine-tune {label}, loop seed {seed}, init seed {init_seed}", flush=True)
        run = w / ctc_run_name(args, name, lr, seed, init_seed, reinit)
        sp = finetune_ctc(w / "ft_train.jsonl", w / "ft_dev.jsonl", run,
                          ctc_config(args, lexicon, enc, init, seed, lr=lr, init_seed=init_seed,
                                     reinit=reinit), init=init)
        extra = decode_per(run, sets, args.seed)
        per.setdefault("ctc_seed_split", {})[f"{seed}:{init_seed}"] = {
            **{g: extra[g]["per"] for g in sets}, "best_dev_error_rate": sp["best_dev_error_rate"],
            "best_step": sp["best_step"]}
    return per, ft, curve


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=360, help="pretraining seconds per method")
    ap.add_argument("--ft-budget", type=float, default=240, help="CTC fine-tuning seconds per system")
    ap.add_argument("--pt-steps", type=int, default=None, help="pretraining updates per method (replaces --budget)")
    ap.add_argument("--pt-steps-for", type=steps_for, nargs="*", default=[], metavar="SYSTEM=N",
                    help="per-system pretraining updates overriding --pt-steps, e.g. birq=750: a CPU-matched "
                         "budget gives each method the updates its per-update cost affords")
    ap.add_argument("--ft-steps", type=int, default=None, help="CTC updates per system (replaces --ft-budget)")
    ap.add_argument("--group-analysis", metavar="SYSTEM", default=None,
                    help="also fine-tune SYSTEM's encoder jointly vs per gender (see above)")
    ap.add_argument("--labelled-speakers", type=int, default=10)
    ap.add_argument("--systems", nargs="*", default=[*SCRATCH, *PRETRAINED])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ft-lrs", type=float, nargs="+", default=[DEFAULT_CTC_LR],
                    help="CTC peak learning rates tried per system; the best on the adult dev speakers is used")
    ap.add_argument("--ctc-seeds", type=int, nargs="*", default=[],
                    help="extra CTC fine-tunes of each system with these seeds (run-to-run spread)")
    ap.add_argument("--ctc-seed-split", type=seed_pair, nargs="*", default=[], metavar="SEED:INIT",
                    help="extra CTC fine-tunes with loop seed SEED (batch order, masks) and weight-init seed "
                         "INIT: e.g. 1:0 and 0:1 tell whether a seed's outcome follows the data order or the "
                         "initial weights")
    ap.add_argument("--ctc-head-init", choices=["zero"], default=None,
                    help="CTC output layer initialisation (default: PyTorch's random one)")
    ap.add_argument("--ft-freeze", type=float, default=None, metavar="F",
                    help="keep a pretrained encoder frozen for the first F of --ft-steps CTC updates "
                         "(wav2vec 2.0's 10-minute recipe: 0.77; default: 100 updates)")
    ap.add_argument("--ctc-reinit-top", type=int, nargs="+", default=[0], metavar="N",
                    help="CTC fine-tunes of each pretrained encoder with its top N Transformer layers drawn "
                         "afresh, one per N (0: all pretrained layers kept); reported as SYSTEM_reinitN")
    ap.add_argument("--encoder-size", choices=ENCODER_SIZES, default="small",
                    help="encoder preset of every system (use its own --work folder: run names do not carry it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ssl_bench")
    ap.add_argument("--result-name", default="ssl_pretraining")
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: this benchmark needs ../shared/data/speechocean762-train")
    if args.ft_freeze is not None and not (args.ft_steps and 0 <= args.ft_freeze < 1):
        sys.exit("--ft-freeze F needs --ft-steps and 0 <= F < 1")
    import torch

    torch.set_num_threads(args.threads)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    size_file = w / "encoder_size"   # run folder names do not carry the size: one size per work folder
    held = (size_file.read_text().strip() if size_file.is_file()
            else "small" if any(w.glob("ctc_*")) or any(w.glob("pt_*")) else None)  # older folders: small
    if held not in (None, args.encoder_size):
        sys.exit(f"{w} holds runs of the {held!r} encoder; give --encoder-size {args.encoder_size} its own --work folder")
    size_file.write_text(args.encoder_size + "\n")
    items = list(iter_kaldi_dir(SO762))
    adults = [i for i in items if i["age_group"] == "adult"]
    parts = split_by_speaker(adults, {"ft_train": args.labelled_speakers, "ft_dev": 3, "eval_adult": 1.0},
                             seed=args.seed)
    children = [i for i in items if i["age_group"] == "child"]
    man = {"all": w / "all.jsonl", "adults": w / "adults.jsonl"}
    write_manifest(man["all"], [{k: v for k, v in i.items() if k != "text"} for i in items])
    write_manifest(man["adults"], [{k: v for k, v in i.items() if k != "text"} for i in adults])
    for name in ("ft_train", "ft_dev", "eval_adult"):
        write_manifest(w / f"{name}.jsonl", parts[name])
    write_manifest(w / "eval_child.jsonl", children)
    lexicon = SO762 / "lexicon.txt"
    refs, missing = {}, {}
    for g in ("eval_adult", "eval_child"):
        p, miss = phone_references(w / f"{g}.jsonl", lexicon, w / f"{g}.phones.jsonl")
        refs[g], missing[g] = list(read_jsonl(p)), miss

    pt_steps = pretrain_steps(args)
    if None in (pt_steps[n] for n in args.systems if n in PRETRAINED) and args.pt_steps_for:
        sys.exit("--pt-steps-for needs --pt-steps for the other systems (a step budget for every method)")
    results, runs, curves = {}, {}, {}
    sets = {g: (w / f"{g}.phones.jsonl", refs[g]) for g in refs}   # what each CTC run is decoded on
    for name in args.systems:
        if name in PRETRAINED:
            cfg = pretrain_config(args, name, pt_steps[name])
            print(f"== pretrain {name} ({budget_text(pt_steps[name], args.budget)})", flush=True)
            pt = pretrain(man[PRETRAINED[name]["data"]], w / f"pt_{name}", cfg)
            init, enc = w / f"pt_{name}" / "encoder", {}
        elif name in SCRATCH:
            pt, init, enc = None, None, encoder_for(SCRATCH[name], args.encoder_size)
        else:
            sys.exit(f"unknown system {name!r}; choose from {[*SCRATCH, *PRETRAINED]}")
        for reinit in (args.ctc_reinit_top if name in PRETRAINED else [0]):
            label = name + (f"_reinit{reinit}" if reinit else "")
            per, ft, curves[label] = ctc_system(args, w, lexicon, sets, name, label, enc, init, reinit)
            results[label] = per
            runs[label] = {"pretrain": {k: pt[k] for k in ("steps", "train_seconds", "n_train", "params")} | {
                "skipped": len(pt["skipped"]), "groups": pt["groups"]} if pt else None,
                "ctc": {k: ft[k] for k in ("steps", "train_seconds", "best_step", "best_dev_error_rate", "n_train", "n_dev")}}
            print(f"   {label}: PER adult {per['eval_adult']['per']:.3f} child {per['eval_child']['per']:.3f}", flush=True)

    groups = group_analysis(args, w, adults, children, lexicon) if args.group_analysis else None
    figure = plot_ctc_curves(curves, RESULTS / args.result_name / "ctc_curves.png") if curves else None

    def rel(a, b):
        return None if a is None or b is None else 1 - a / b

    child = {k: results[k]["eval_child"]["per"] if k in results else None for k in KEYS}
    adult = {k: results[k]["eval_adult"]["per"] if k in results else None for k in KEYS}
    best_pt = min(((v, k) for k, v in child.items() if k != "scratch" and v is not None), default=(None, None))
    write_result(args.result_name, {
        "per": child, "per_ci95": {k: results[k]["eval_child"]["ci95"] for k in results if k in KEYS},
        "per_adult": adult, "per_adult_ci95": {k: results[k]["eval_adult"]["ci95"] for k in results if k in KEYS},
        "all_systems": results,
        "relative_per_reduction_vs_scratch": {
            k: rel(child[k], child["scratch"] if k in ("bestrq", "birq") else
                   (results.get("scratch_wave", {}).get("eval_child", {}).get("per"))) for k in KEYS if k != "scratch"},
        "best_pretrained": best_pt[1], "birq_vs_bestrq_relative": rel(child["birq"], child["bestrq"]),
        # CTC on 10 minutes of labels is chaotic: the mean over the main run and its extra CTC seeds
        "per_child_over_ctc_seeds": {k: seed_summary(results[k], "eval_child") for k in results},
        "per_adult_over_ctc_seeds": {k: seed_summary(results[k], "eval_adult") for k in results},
        "runs": runs, "group_analysis": groups,
        "figure": str(figure.relative_to(RESULTS)) if figure else None,
        "protocol": {"budget_seconds_pretrain": None if args.pt_steps else args.budget,
                     "budget_seconds_ctc": None if args.ft_steps else args.ft_budget,
                     "steps_pretrain": args.pt_steps if not args.pt_steps_for else
                     {n: pt_steps[n] for n in args.systems if n in PRETRAINED},
                     "steps_ctc": args.ft_steps,
                     "ctc_lrs_tried": args.ft_lrs, "ctc_frozen_steps_pretrained": freeze_steps(args), "ctc_lr_rule": "lowest PER on the 3 adult dev speakers",
                     "threads": args.threads, "labelled_speakers": args.labelled_speakers, "seed": args.seed,
                     "encoder": encoder_text(args.encoder_size) + ", mel (4x conv) or wav2vec 2.0 CNN front-end",
                     "eval_speakers": {g: len({r["speaker"] for r in refs[g]}) for g in refs},
                     "refs_skipped_missing_words": {g: len(m) for g, m in missing.items()},
                     "relative_reduction_baseline": "scratch (mel) for bestrq/birq, scratch_wave for wav2vec2/xlsr"},
        **speed_figures(),
    })
    print(json.dumps({"per_child": child, "per_adult": adult}, indent=1))


if __name__ == "__main__":
    main()
