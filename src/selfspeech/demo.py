"""``selfspeech demo``: the whole foundation on a corpus it makes itself.

1. synthesise a small corpus in two English accents with eSpeak NG
   (a native accent and a foreign-accented one: a real, systematic shift);
2. check it (``data validate``);
3. pseudo-label it with the offline Whisper teacher (resumable);
4. score WER/CER per accent with bootstrap-over-speakers 95% CIs;
5. write ``report.md`` with a PNG chart.

Every stage writes into ``out_dir`` and is skipped when its output exists, so
a killed demo resumes.
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from selfspeech.data.atomic import write_json
from selfspeech.data.manifest import read_manifest
from selfspeech.data.synth import DEFAULT_SOURCE_ACCENT, DEFAULT_TARGET_ACCENT, make_accent_corpus
from selfspeech.data.validate import validate_manifest
from selfspeech.eval.report import build_results, read_jsonl, render_markdown, write_report
from selfspeech.label.run import label_manifest
from selfspeech.label.teacher import load_teacher


@dataclass(frozen=True)
class DemoConfig:
    accents: tuple[str, ...] = (DEFAULT_SOURCE_ACCENT, DEFAULT_TARGET_ACCENT)
    # 12 x 10: 6 target speakers (60 utterances) are evaluated; with the earlier 8 x 8
    # (4 speakers, 32 utterances) the adaptation figure moved from -33% to -10% between runs
    speakers_per_accent: int = 12
    utts_per_speaker: int = 10
    teacher: str = "whisper-base"
    batch_size: int = 8
    seed: int = 0
    normalizer: str = "whisper_english"
    adapt: bool = True                  # then run Pseudo2Real from the first accent to the last
    adapt_steps: int = 24               # optimizer steps per student fine-tune (CPU budget)
    device: str = "auto"                # teacher, students and decoding: auto|cpu|cuda|cuda:N
    # the target as a user's folder of long recordings: import-dir, segment, adapt without its
    # transcripts or speakers; its held-out speakers scored per recording afterwards
    long_form: bool = False


def run_demo(out_dir: str | Path, cfg: DemoConfig = DemoConfig(), progress: bool = True, log=print) -> Path:
    """Run the demo into ``out_dir``; returns the path of ``report.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", asdict(cfg))
    times: dict[str, float] = {}

    t = time.perf_counter()
    log(f"[1/{5 if cfg.adapt else 4}] synthesising {len(cfg.accents)} accents x {cfg.speakers_per_accent} speakers x "
        f"{cfg.utts_per_speaker} utterances with eSpeak NG")
    manifest = make_accent_corpus(out / "corpus", cfg.accents, cfg.speakers_per_accent, cfg.utts_per_speaker,
                                  seed=cfg.seed, progress=progress)
    times["synthesise"] = time.perf_counter() - t

    t = time.perf_counter()
    problems = [p for p in validate_manifest(manifest) if not isinstance(p, dict)]
    if problems:
        raise RuntimeError("the synthetic corpus failed validation: " + "; ".join(map(str, problems[:5])))
    times["validate"] = time.perf_counter() - t

    t = time.perf_counter()
    teacher = load_teacher(cfg.teacher, "faster-whisper", device=cfg.device)
    log(f"[2/{5 if cfg.adapt else 4}] pseudo-labelling with {cfg.teacher} (faster-whisper, {teacher.compute_type} "
        f"on {teacher.device}, batched)")
    labels = out / f"labels.{cfg.teacher}.jsonl"
    stats = label_manifest(manifest, labels, teacher, cfg.teacher, cfg.batch_size, progress=progress)
    times["label"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[3/{5 if cfg.adapt else 4}] scoring WER per accent (95% CI: bootstrap over speakers)")
    refs = list(read_manifest(manifest))
    results = build_results(refs, read_jsonl(labels), by=["accent"], normalizer=cfg.normalizer,
                            names=(cfg.teacher, ""), ref_name=str(manifest))
    paths = write_report(results, out / "eval")
    times["evaluate"] = time.perf_counter() - t

    adapt_md = ""
    if cfg.adapt:
        t = time.perf_counter()
        log(f"[4/5] Pseudo2Real: {cfg.accents[0]} (labelled source) -> {cfg.accents[-1]} (unlabelled target)")
        if cfg.long_form:
            from selfspeech.demo_long import adapt_long_form

            adapt_md = adapt_long_form(cfg, demo_recipe(cfg, manifest), out / "long_form", log, progress)
        else:
            adapt_md = _adapt(cfg, manifest, out / "adapt", log, progress)
        times["pseudo2real"] = time.perf_counter() - t

    log(f"[{5 if cfg.adapt else 4}/{5 if cfg.adapt else 4}] writing the report")
    report = out / "report.md"
    report.write_text(_report(cfg, refs, stats.as_dict(), results, paths, times) + adapt_md, encoding="utf-8")
    return report


def demo_recipe(cfg: DemoConfig, manifest: Path):
    """The Pseudo2Real recipe of the demo: small, fixed budget, same code path as `selfspeech adapt`."""
    from selfspeech.adapt.recipe import recipe_from_dict

    n = cfg.speakers_per_accent
    return recipe_from_dict({
        "name": "demo", "normalizer": cfg.normalizer, "device": cfg.device,
        "data": {"manifest": str(manifest), "source_rule": f"accent=={cfg.accents[0]}",
                 "target_rule": f"accent=={cfg.accents[-1]}", "seed": cfg.seed,
                 "source_parts": {"train": max(1, n - 3), "dev": 1, "sim": 2},
                 "target_parts": {"adapt": max(2, n - n // 2), "eval": n // 2}, "dev_fraction": 0.34},
        "teacher": {"name": cfg.teacher, "batch_size": cfg.batch_size, "drop_flagged": False},
        "student": {"init": "whisper-tiny.en", "max_new_tokens": 48,
                    "finetune": {"max_steps": cfg.adapt_steps, "eval_every": 8, "batch_size": 8, "lr": 2e-5,
                                 "warmup_steps": 10, "max_epochs": 20, "max_new_tokens": 48}},
        "lambda": {"grid": [0.0, 0.5, 1.0], "oracle_sweep": False},
        "clusters": {"k": 2, "min_size": 1},
        # the union and oracle students cost two more fine-tunes each: left to `selfspeech adapt`
        "systems": ["teacher", "zero_shot", "pseudo_ft", "p2r", "p2r_sc", "p2r_sc_random", "source_real_ft"],
    })


def _adapt(cfg: DemoConfig, manifest: Path, out: Path, log, progress: bool) -> str:
    from selfspeech.adapt.pseudo2real import run_pseudo2real
    from selfspeech.adapt.report import LABELS

    result = run_pseudo2real(demo_recipe(cfg, manifest), out, log=log, progress=progress,
                             title=f"Pseudo2Real demo: {cfg.accents[0]} -> {cfg.accents[-1]}")
    rows = "\n".join(f"| {LABELS.get(k, k)} | {v['wer'] * 100:.1f} [{v['wer_ci95'][0] * 100:.1f}, "
                      f"{v['wer_ci95'][1] * 100:.1f}] |" for k, v in result["scores"]["systems"].items())
    return (f"\n## Pseudo2Real: {cfg.accents[0]} -> {cfg.accents[-1]}\n\n"
            f"lambda = {result['lambda']['lambda']:g} (chosen on held-out source speakers, no target labels). "
            f"The adaptation's run folder holds {result['disk']['total'] / 1e9:.2f} GB. "
            f"Full report: [adapt/report.md](adapt/report.md).\n\n| system | WER % [95% CI] |\n| --- | --- |\n"
            f"{rows}\n\n![WER per system](adapt/wer_systems.png)\n")


def _report(cfg: DemoConfig, refs: list[dict], label_stats: dict, results: dict, paths: dict, times: dict) -> str:
    hours = sum(float(r.get("duration") or 0) for r in refs) / 3600
    by = {g["name"]: g for g in results["system"]["groups"]}
    src, tgt = f"accent={cfg.accents[0]}", f"accent={cfg.accents[-1]}"
    lines = [
        "# selfspeech demo",
        "",
        f"Synthetic corpus: {len(refs)} utterances ({hours * 60:.1f} min) from "
        f"{len({r['speaker'] for r in refs})} speakers in accents {', '.join(cfg.accents)} "
        "(eSpeak NG voices; speakers differ by voice variant, rate and pitch).",
        f"Teacher: `{cfg.teacher}` through faster-whisper (CTranslate2 {label_stats.get('compute_type') or 'int8'}"
        f"{' on ' + label_stats['device'] if str(label_stats.get('device', 'cpu')).startswith('cuda') else ''}, "
        f"greedy, batched {cfg.batch_size}).",
        f"Labelling: {label_stats['labelled']} labelled, {label_stats['failed']} failed, "
        f"flags {label_stats['flags'] or 'none'}, real-time factor {label_stats['rtf']}.",
        "",
    ]
    if src in by and tgt in by:
        lines += [f"The teacher's WER is {by[src]['wer'] * 100:.1f}% on `{cfg.accents[0]}` and "
                  f"{by[tgt]['wer'] * 100:.1f}% on `{cfg.accents[-1]}`: the domain shift that "
                  "pseudo-label correction (Pseudo2Real) is meant to close.", ""]
    lines += [f"![WER per accent]({Path(paths['png']).relative_to(Path(paths['md']).parent.parent)})", "",
              render_markdown(results), "",
              "## Stage times (s)", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    lines += ["", f"Machine: {platform.machine()}, {platform.python_version()}, {platform.platform()}", ""]
    return "\n".join(lines)
