"""The benchmarks page, generated from ``benchmarks/results/*.json``.

Every result file records the command that wrote it, its date and the machine. The page has one
table per area: a row per headline figure (read from the file, never typed by hand), the command,
the hardware and the date; result files without a headline row are listed under their area too,
so every committed measurement is on the page. A key that a result file no longer has fails the
build (the figure would otherwise be stale).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rel(x: float) -> str:
    """A relative reduction as the change it is: 0.19 -> -19.1%."""
    return f"{-100 * x:+.1f}%"


def ci(pair, scale: float = 100.0, unit: str = "") -> str:
    return f"[{scale * pair[0]:.1f}, {scale * pair[1]:.1f}]{unit}"


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _p2r(d):
    w = d["wer"]
    return (f"teacher {pct(w['teacher'])}, pseudo-label student {pct(w['pseudo_ft'])}, "
            f"Pseudo2Real {pct(w['p2r'])}, oracle (real target labels) {pct(w['oracle'])}")


def _coverage(c: dict, wer_utterances: float) -> str:
    """Speech coverage of the segments and the teacher's WER per recording against on the utterances."""
    return (f"speech coverage {pct(c['speech_coverage'])}, teacher WER {pct(c['wer_long_form'])} per recording "
            f"vs {pct(wer_utterances)} on the utterances")


def _lf(d, cond):
    return _coverage(d["conditions"][cond], d["wer_utterances"])


def _lf_adapt(d):
    a = d["adapt"]
    return (f"pseudo-label student {pct(a['wer']['pseudo_ft'])} -> Pseudo2Real {pct(a['wer']['p2r'])} "
            f"({rel(a['p2r_relative_reduction'])})")


def _vad(d):
    g = d["grid_on_adults"][d["chosen"]]
    return (f"threshold {g['threshold']}, pad {g['pad_seconds']} s: adults' speech coverage "
            f"{pct(g['speech_coverage'])} at {g['audio_per_speech']:.2f} s audio per speech second")


def _vad_children(d):
    c = d["children_with_chosen"]
    return _coverage(c, c["wer_utterances"])


def _teacher(d, name):
    t = d["teachers"][name]
    return f"WER adults {pct(t['wer']['adult'])}, children {pct(t['wer']['child'])}; real-time factor {t['rtf']:.3f}"


def _medians(d, systems):
    m = d["per_child_over_ctc_seeds"]
    return ", ".join(f"{s} {pct(m[s]['median'])}" for s in systems if m.get(s))


def _sv(d, systems, cond="clean"):
    return ", ".join(f"{s} {pct(d[cond][s]['eer'])}" for s in systems)


def _branch(d, base, diff_key):
    e, r = d["eer"], d["relative_eer_reduction_ssps"]
    dd = d[diff_key]["clean"]
    return (f"clean EER {pct(e[base])} -> {pct(e[base + '_ssps'])} ({rel(r['clean'])}, difference "
            f"{ci(dd['ci95'], unit=' points')}); cross-condition {rel(r['cross'])}")


def _p2r_variants(d):
    w = d["wer"]
    names = {"source_real_plus_target_pseudo": "source real + target pseudo", "p2r": "Pseudo2Real",
             "p2r_union": "Pseudo2Real on that student", "pseudo_ft_mixed": "student continued from the source mixed model",
             "p2r_mixed": "Pseudo2Real, public protocol"}
    return ", ".join(f"{v} {pct(w[k])}" for k, v in names.items() if w.get(k) is not None)


def _p2r_best(d):
    b = d["pooled"]["best_label_free"]
    lo, hi = b["vs_source_real_plus_target_pseudo_ci95"]
    return (f"{b['system']} {pct(b['wer'])}: {pct(b['oracle_gap_closed'])} of the gap between the pseudo-label "
            f"student ({pct(b['pseudo_ft_wer'])}) and the oracle ({pct(b['oracle_wer'])}); against source real + "
            f"target pseudo [{lo * 100:.1f}, {hi * 100:.1f}]% (positive = better)")


def _p2r_splits(d):
    names = (("pseudo_ft", "pseudo-label student"), ("source_real_plus_target_pseudo", "source real + target pseudo"),
             ("p2r", "Pseudo2Real"), ("p2r_mixed", "public protocol"), ("oracle", "oracle"))
    return "; ".join(f"split {k}: " + ", ".join(f"{v} {pct(s['wer'][n])}" for n, v in names if s["wer"].get(n) is not None)
                     for k, s in d["splits"].items())


def _p2r_choice(d):
    c = d["pooled"]["label_free_choice"]
    lo, hi = c["vs_source_real_plus_target_pseudo_ci95"]
    plo, phi = c["vs_pseudo_ft_ci95"]
    picks = ", ".join(f"split {k}: {v}" for k, v in c["per_split"].items())
    return (f"{pct(c['wer'])} ({picks}): {pct(c['oracle_gap_closed'])} of the oracle gap; against source real + "
            f"target pseudo [{lo * 100:.1f}, {hi * 100:.1f}]%, against the pseudo-label student "
            f"[{plo * 100:.1f}, {phi * 100:.1f}]% (positive = better)")


def _p2r_guard(d):
    before, after = d["pooled_unguarded"]["wer"], d["pooled"]["wer"]
    names = ("source_real_ft", "pseudo_ft_mixed", "p2r_mixed", "pseudo_ft", "p2r", "p2r_union",
             "source_real_plus_target_pseudo")
    return "; ".join(f"{k} {pct(before[k])} -> {pct(after[k])}" for k in names if k in after)


def _tau_seeds(d):
    """Split by split: Pseudo2Real and p2r_union with tau averaged over seeds, the one-seed run beside."""
    one = load("pseudo2real")["splits"]
    parts = []
    for k, sp in d["splits"].items():
        w, w1 = sp["wer"], one[k]["wer"]
        parts.append(f"split {k}: Pseudo2Real {pct(w['p2r'])} ({pct(w1['p2r'])}), p2r_union {pct(w['p2r_union'])} "
                     f"({pct(w1['p2r_union'])}); source real + target pseudo {pct(w['source_real_plus_target_pseudo'])}")
    return "; ".join(parts)


def _lora(d):
    w, r = d["wer"], d["headline_rank"]
    return (f"rank {r}: {pct(w[f'pseudo_ft_lora_r{r}'])} -> {pct(w[f'p2r_lora_r{r}'])}; full fine-tuning: "
            f"{pct(w['pseudo_ft_full'])} -> {pct(w['p2r_full'])}; every rank: " + ", ".join(
                f"{k.removeprefix('p2r_lora_r')}: {pct(v)}" for k, v in w.items() if k.startswith("p2r_lora_r")))


def _lora_size(d):
    return ", ".join(f"{k.replace('_', ' ')}: {v['size_ratio']:.3f} of the dense size, {pct(v['rel_error'])} "
                     f"reconstruction error" for k, v in d["lowrank_tau"].items())


def _seeds(d):
    c = d["conditions"]["clean"]
    return (f"mean clean EER over training seeds {d['train_seeds']}: {pct(c['mean_base'])} -> {pct(c['mean_ssps'])} "
            f"({rel(c['relative_reduction_of_means'])}); cross-condition "
            f"{rel(d['conditions']['cross']['relative_reduction_of_means'])}")


Row = tuple[str, str, Callable[[dict], str]]  # (result file, what the figure is, figure from the file)

AREAS: list[tuple[str, str, str, tuple[str, ...], list[Row]]] = [
    # (anchor, title, guide page, result-file prefixes of the area, headline rows)
    ("pseudo2real", "Pseudo2Real", "pseudo2real.md", ("pseudo2real",), [
        ("pseudo2real", "WER on {data[target_eval][speakers]} held-out children (speechocean762, adults as source)",
         _p2r, "split0"),
        ("pseudo2real", "Pseudo2Real against the pseudo-label student, relative WER change [95% CI]",
         lambda d: f"{rel(d['relative_reduction'])} {ci([-x for x in d['relative_reduction_ci95'][::-1]], unit='%')}",
         "split0"),
        ("pseudo2real", "lambda and tau's scope, chosen on held-out adults (no target label read)",
         lambda d: f"lambda {d['lambda']:g}, scope {d['tau_scope']}", "split0"),
        ("pseudo2real", "Pseudo2Real-SC (mel-statistics clusters) / random-cluster control",
         lambda d: f"{pct(d['wer']['p2r_sc'])} / {pct(d['wer']['p2r_sc_random'])}", "split0"),
        ("pseudo2real", "Against the one-student baseline with the same labels (source real + target pseudo) and "
                        "the public code's protocol", _p2r_variants, "split0"),
        ("pseudo2real", "WER per speaker split (`data.seed`: other adults and children in every role)", _p2r_splits),
        ("pseudo2real", "Best label-free system over the {pooled[best_label_free][splits]} pooled speaker splits "
                        "(the lowest pooled WER, a summary): share of the oracle gap closed", _p2r_best),
        ("pseudo2real", "Label-free system choice: per split, the corrected system best in its own rehearsal on the "
                        "held-out adults, pooled", _p2r_choice),
        ("pseudo2real", "Pseudo2Real-SC by the teacher's error rate (`p2r_sc_error`) per kept split, Pseudo2Real beside",
         lambda d: "; ".join(f"split {k}: {pct(s['wer']['p2r_sc_error'])} ({pct(s['wer']['p2r'])})"
                             for k, s in d["splits"].items() if "p2r_sc_error" in s["wer"])),
        ("pseudo2real_tau_seeds", "tau averaged over the recipe's fine-tuning seed and `student.tau_seeds` [1] "
                                  "(one seed in brackets)", _tau_seeds),
        ("pseudo2real_tau_seeds12", "tau averaged over the recipe's fine-tuning seed and `student.tau_seeds` [1, 2] "
                                    "(one seed in brackets)", _tau_seeds),
        ("pseudo2real_iter_sim", "Iterative Pseudo2Real with the rounds chosen on the held-out adults "
                                 "(`iterative.stop: source_sim`), per split",
         lambda d: "; ".join(f"split {k}: {pct(s['wer']['p2r_iter'])} (Pseudo2Real {pct(s['wer']['p2r'])})"
                             for k, s in d["splits"].items())),
        ("pseudo2real_loop_guard", "Students stopped at decoding loops (`student.max_repeats` {max_repeats}), pooled over the "
                                   "kept splits: WER unguarded -> guarded", _p2r_guard),
        ("pseudo2real_sc_error_probe", "Teacher WER predicted from its confidence: rank correlation on held-out "
                                       "adults / on the children (measurement only), per split",
         lambda d: "; ".join(f"{k.removeprefix('p2r_so762_')}: {r['heldout_source_spearman']:.2f} / "
                             f"{r['measurement_only']['target_spearman']:.2f}" for k, r in d["runs"].items())),
        ("pseudo2real_lora", "LoRA students (rank {headline_rank}; full fine-tuning beside): pseudo-label student "
                             "-> Pseudo2Real", _lora),
        ("pseudo2real_lora", "Low-rank tau of the LoRA students: size against the same tau stored dense", _lora_size),
        ("pseudo2real_sc_ecapa", "Pseudo2Real-SC with self-supervised ECAPA clusters / random-cluster control",
         lambda d: f"{pct(d['wer']['p2r_sc'])} / {pct(d['wer']['p2r_sc_random'])} (Pseudo2Real {pct(d['wer']['p2r'])})"),
    ]),
    ("long-form", "Long recordings", "data.md", ("long_form",), [
        ("long_form", "Children's recordings, clean: segmented and labelled per recording", lambda d: _lf(d, "clean")),
        ("long_form", "Children's recordings with noise at 10 dB SNR", lambda d: _lf(d, "noise_10db")),
        ("long_form_vad", "Segmenter setting chosen on the adults' recordings (rule in the file)", _vad),
        ("long_form_vad", "Children's recordings with that setting", _vad_children),
        ("long_form", "Pseudo2Real on segmented recordings without transcripts or speakers, eval speakers "
                      "scored per recording", _lf_adapt),
        ("long_form_previous_defaults", "The same with the earlier segmenter defaults", _lf_adapt),
    ]),
    ("teacher", "Teacher pseudo-labelling", "pseudo2real.md", ("teacher_",), [
        ("teacher_labelling", "whisper-base on {teachers[whisper-base][label_stats][total]} speechocean762 utterances", lambda d: _teacher(d, "whisper-base")),
        ("teacher_labelling", "whisper-tiny.en on the same utterances", lambda d: _teacher(d, "whisper-tiny.en")),
        ("teacher_labelling", "Batched faster-whisper against sequential decoding / the transformers pipeline",
         lambda d: f"{d['speedup_vs_sequential']:.2f}x / {d['speedup_vs_transformers_pipeline']:.2f}x"),
        ("teacher_window_probe", "whisper-base WER by encoder window (30 / 15 / 10 / 5 s)",
         lambda d: " / ".join(pct(d["results"]["whisper-base"][w]["wer"]) for w in ("30", "15", "10", "5"))),
    ]),
    ("student", "Whisper student fine-tuning", "pseudo2real.md", ("whisper_",), [
        ("whisper_finetune_speed", "tiny.en samples/s: the toolkit's loop (trimmed log-mels) / Seq2SeqTrainer (30 s)",
         lambda d: f"{d['samples_per_second']['ours']:.2f} / {d['samples_per_second']['hf_seq2seq_trainer_30s']:.2f} "
                   f"({d['speedup']:.2f}x)"),
    ]),
    ("ssl", "Self-supervised pretraining and CTC", "pretraining.md",
     ("ssl_", "bestrq_", "w2v2_", "throwaway_"), [
        ("ssl_pretraining", "Children's PER, median over CTC seeds (small encoder, CPU budget)",
         lambda d: _medians(d, ("scratch", "bestrq", "birq", "scratch_wave", "wav2vec2", "xlsr_multigroup",
                                "xlsr_adults_only"))),
        ("ssl_pretraining_medium", "The same with a 4x larger encoder (6 x 256)",
         lambda d: _medians(d, ("scratch", "bestrq"))),
        ("ssl_pretraining_long", "BEST-RQ at 4,500 updates, children's PER median",
         lambda d: _medians(d, ("bestrq",))),
        ("ssl_ctc_reinit", "Top layers re-initialised before CTC (0 / 1 / 2 layers), PER median",
         lambda d: _medians(d, ("bestrq", "bestrq_reinit1", "bestrq_reinit2"))),
        ("ssl_speed", "wav2vec 2.0 audio seconds per second: ours / transformers' Wav2Vec2ForPreTraining",
         lambda d: f"{d['throughput_audio_s_per_s']['ours']:.1f} / {d['throughput_audio_s_per_s']['transformers']:.1f}"
                   f" ({d['throughput_ratio_vs_transformers']:.2f}x)"),
        ("bestrq_speed", "Prediction heads on masked frames only: update speed-up (BEST-RQ / BiRQ)",
         lambda d: f"{d['systems']['bestrq']['speedup']:.2f}x / {d['systems']['birq']['speedup']:.2f}x"),
        ("w2v2_chance_probe", "Update at which wav2vec 2.0's contrastive loss leaves chance: ours / transformers",
         lambda d: f"{d['left_chance_at_update']['ours_pen0']} / {d['left_chance_at_update']['transformers']}"),
    ]),
    ("speaker", "Self-supervised speaker verification", "speaker-verification.md", ("speaker_ssl", "sv_"), [
        ("speaker_ssl", "Clean EER, {trials:,} trials (CPU budget of {budget_seconds_per_system:.0f} s per system)",
         lambda d: _sv(d, ("melstats", "simclr", "simclr_ssps", "dino"))),
        ("speaker_ssl", "Cross-condition EER (test side through a simulated room and noise)",
         lambda d: _sv(d, ("melstats", "simclr", "simclr_ssps", "dino"), "cross_condition")),
        ("speaker_ssl_branch", "SSPS switched on after 1,200 of 1,800 SimCLR updates (forked run)",
         lambda d: _branch(d, "simclr", "eer_difference_simclr_minus_ssps")),
        ("speaker_ssl_branch_simclr_noproj", "The same without SimCLR's projector (1,200 updates, fork at 800)",
         lambda d: _branch(d, "simclr_noproj", "eer_difference_simclr_noproj_minus_ssps")),
        ("speaker_ssl_branch_simclr_noproj_seeds", "Without the projector, three training seeds", _seeds),
        ("speaker_ssl_branch_dino", "DINO, SSPS in the last 400 of 1,200 updates: teacher / student clean EER",
         lambda d: f"{pct(d['eer']['dino'])} -> {pct(d['eer']['dino_ssps'])} / {pct(d['eer']['dino_student'])} -> "
                   f"{pct(d['eer']['dino_ssps_student'])}"),
        ("sv_metrics_speed", "EER and minDCF of 10 million trials: seconds (against scikit-learn)",
         lambda d: f"{d['eer_10m_trials_seconds']:.2f} s ({d['speedup']:.1f}x faster, equal within 1e-9: "
                   f"{d['agree_within_1e-9']})"),
    ]),
    ("scaling", "Scaling out", "gpus.md", ("scaling",), [
        ("scaling", "CTC under torchrun, 2 CPU processes: throughput / equal to one process with the combined batch",
         lambda d: f"{d['ddp_speedup_2proc']:.2f}x / {d['ddp_matches_single_process']}"),
        ("scaling", "Labelling on 2 Ray actors: speed-up / same records as one process",
         lambda d: f"{d['labelling']['speedup_2_actors']:.2f}x / {d['ray_labelling_matches_plain']}"),
    ]),
    ("reliability", "Reliability", "reliability.md", ("reliability",), [
        ("reliability", "Random SIGKILLs / resumed runs identical to an uninterrupted run",
         lambda d: f"{d['kills']} kills, {d['identical_after_resume']} of {d['resumed_runs']} identical"),
        ("reliability", "Bad inputs / crashes / utterances lost",
         lambda d: f"{d['bad_inputs']} / {d['crashes']} / {d['lost_utterances']}"),
        ("reliability", "Peak memory growth from 1,000 to 50,000 utterances (KB per utterance)",
         lambda d: ", ".join(f"{k} {v:g}" for k, v in d["memory"]["growth_kb_per_utterance"].items())),
    ]),
    ("parity", "Parity with reference implementations", "evaluation.md", ("parity",), [
        ("parity", "ECAPA-TDNN embeddings against SpeechBrain: largest difference",
         lambda d: f"{d['ecapa_embedding_max_diff']:.1e}"),
        ("parity", "BEST-RQ labels equal to SpeechBrain's quantiser", lambda d: pct(d["bestrq_label_agreement"])),
        ("parity", "Whisper log-mel against transformers: largest difference",
         lambda d: f"{d['whisper_logmel_max_diff']:.1e}"),
        ("parity", "CTC beam search (state ranking) best path equal to pyctcdecode's", lambda d: pct(d["ctc_beam_agreement"])),
        ("parity", "wav2vec 2.0 loss against Wav2Vec2ForPreTraining: largest relative difference",
         lambda d: f"{d['wav2vec2_loss_rel_diff']:.1e}"),
    ]),
]


def hardware(d: dict) -> str:
    m = d.get("machine") or {}
    cpu = (m.get("processor") or m.get("machine") or "?").replace("(R)", "").replace("Processor", "").strip()
    threads = m.get("torch_threads")
    return f"CPU {cpu}, {m.get('cpu_count', '?')} cores" + (f", {threads} thread{'s' * (threads != 1)}" if threads else "")


def _cmd(d: dict) -> str:
    """The recorded command, with the output folders of the machine it ran on shown relative (runs/...)."""
    cmd = re.sub(r"(?<=\s)/\S*?/runs/", "runs/", d.get("command", "?"))
    return f"`{cmd}`".replace("|", "\\|")


def result_files() -> list[str]:
    return sorted(p.stem for p in RESULTS.glob("*.json"))


def area_of(name: str) -> str | None:
    for anchor, _, _, prefixes, _ in AREAS:
        if name.startswith(prefixes):
            return anchor
    return None


def figure(name: str, get: Callable[[dict], str]) -> str:
    try:
        return get(load(name))
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"benchmarks/results/{name}.json: no {e} for its row on the benchmarks page; "
                         "update the row in docs/gen/bench.py to the file's keys") from None


def area_table(anchor: str) -> str:
    """One area's table (Markdown): the benchmarks page's section, also embedded in the guides."""
    areas = {a[0]: a for a in AREAS}
    if anchor not in areas:
        raise ValueError(f"benchmarks area {anchor!r} does not exist; choose one of {', '.join(areas)}")
    _, _, _, _, rows = areas[anchor]
    out = ["| figure | value | command | hardware | date |", "| --- | --- | --- | --- | --- |"]
    for name, what, get, *source in rows:
        d = load(name)
        # a row of figures another run measured (split 0 of pseudo2real) cites that run's command and machine
        prov = {**d, **(d.get(f"{source[0]}_provenance") or {})} if source else d
        out.append(f"| {what.format_map(d)} | {figure(name, get)} | {_cmd(prov)} | {hardware(prov)} | "
                   f"{prov.get('date', '?')[:10]} |")
    return "\n".join(out)


MARKER = re.compile(r"^\{\{\s*benchmarks:\s*([\w-]+)\s*\}\}$", re.MULTILINE)  # a line of its own


def embed(markdown: str) -> str:
    """A guide's ``{{ benchmarks: AREA }}`` lines replaced by that area's table."""
    return MARKER.sub(lambda m: area_table(m.group(1)), markdown)


def page() -> str:
    out = ["# Benchmarks", "",
           "Every figure below is read from a result file in `benchmarks/results/` when the site is built; "
           "each file records the command that wrote it, its date, commit and machine. All were measured on "
           "CPUs; no GPU figure has been measured yet. The analysis, protocols and caveats are in "
           "`benchmarks/RESULTS.md`; the scripts and the benchmark data they need are described in "
           "`benchmarks/README.md`.", ""]
    files = result_files()
    for anchor, title, guide, _, rows in AREAS:
        out += [f"## {title} {{#{anchor}}}", "", f"Guide: [{title}]({guide}).", "", area_table(anchor)]
        shown = {r[0] for r in rows}
        rest = [f for f in files if area_of(f) == anchor and f not in shown]
        if rest:
            out += ["", "Further result files of this area (discussed in `benchmarks/RESULTS.md`):", "",
                    "| file | command | hardware | date |", "| --- | --- | --- | --- |"]
            out += [f"| `{f}.json` | {_cmd(load(f))} | {hardware(load(f))} | {load(f).get('date', '?')[:10]} |"
                    for f in rest]
        out.append("")
    return "\n".join(out)
