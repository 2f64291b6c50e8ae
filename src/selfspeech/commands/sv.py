"""``selfspeech sv train|embed|score``: self-supervised speaker verification."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from selfspeech.commands.common import (DEVICE_HELP, JSON_HELP, OVERRIDES_HELP, PRECISION_HELP, emit, fail,
                                       fail_if_all_failed, load_config, need_device, need_files, out_console,
                                       read_mapping, refusing, save_run_config, split_overrides)

app = typer.Typer(no_args_is_help=True, help="Self-supervised speaker verification: ECAPA-TDNN trained with "
                  "SimCLR or DINO (optionally SSPS) on unlabelled audio; embeddings; EER/minDCF scoring.")


@app.command("train")
def train(
    config: Path = typer.Argument(None, help="YAML/JSON with SpeakerSSLConfig keys: method, ecapa {preset|fields}, augment, ssps {k, m, start, queue, ref_seconds}, segment_seconds, batch_size, loop..."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    manifest: Path = typer.Option(..., "--manifest", help="Unlabelled audio (JSONL manifest). Speaker fields, if any, are only used to monitor SSPS."),
    out: Path = typer.Option(..., help="Output folder: encoder/ (for `sv embed` and Pseudo2Real-SC), best/ (whole task), log.jsonl. Rerun to resume."),
    method: str = typer.Option(None, help="simclr | dino (overrides the config)."),
    ssps: bool = typer.Option(None, "--ssps/--no-ssps", help="Turn SSPS pseudo-positives on (config's ssps or defaults) or off."),
    steps: int = typer.Option(None, help="Maximum optimizer steps (overrides loop.max_steps)."),
    budget_seconds: float = typer.Option(None, help="Stop after this much training time instead."),
    fork_from: Path = typer.Option(None, "--fork-from", help="Continue this checkpoint of the same run without SSPS (its keep/step-N, kept by loop.keep_every, or last/) with SSPS on: the SSPS paper's protocol. Used only when --out has no checkpoint yet."),
    device: str = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option(None, help=PRECISION_HELP),
) -> None:
    """Train a speaker encoder without speaker labels.

    simclr: NT-Xent between two augmented 2-s segments of each utterance.
    dino: 2 global + 4 local crops, EMA teacher with centring and sharpening.
    --ssps: after ssps.start of the budget, positives come from other utterances
    of the same k-means cluster of a reference-embedding queue (Lepage & Dehak 2025).
    Augmentation: noise (white, coloured, babble from other utterances),
    simulated rooms (pyroomacoustics), gain and speed.

    --fork-from: a SimCLR/DINO run trained with loop.keep_every=N continues from
    its step N with SSPS; both runs then share their first N steps exactly.

    Example: selfspeech sv train recipes/speechocean762/sv/simclr.yaml --ssps --manifest train.jsonl --out runs/sv
    """
    from selfspeech.train.speaker import SpeakerSSLConfig, train_speaker

    with refusing():
        config, overrides = split_overrides(config, overrides)
        if ssps is False:  # --no-ssps: off; --ssps: on, with the config's ssps keys or the defaults
            overrides = [*overrides, "ssps=null"]
        elif ssps and not read_mapping(config).get("ssps"):
            overrides = ["ssps={}", *overrides]
        cfg = load_config(SpeakerSSLConfig, config, overrides, {"method": method, "loop.max_steps": steps,
                                                                "loop.budget_seconds": budget_seconds,
                                                                "loop.device": device, "loop.precision": precision})
        need_device(cfg.loop.device, cfg.loop.precision, "loop.")
        need_files(manifest=manifest)
    save_run_config(cfg, out)
    with refusing(ValueError, TypeError, FileNotFoundError):
        summary = train_speaker(manifest, out, cfg, fork_from=fork_from)
    out_console.print_json(json.dumps(summary))


@app.command("embed")
def embed(
    model: Path = typer.Argument(..., help="A `sv train` output folder (or its encoder/ subfolder), a SpeechBrain ECAPA-TDNN checkpoint (embedding_model.ckpt or its folder), or 'melstats' for the baseline."),
    manifest: Path = typer.Argument(..., help="Utterances to embed (JSONL manifest)."),
    out: Path = typer.Option(..., help="Folder for utterances.npz, speakers.npz (ids + emb, no pickle) and summary.json."),
    on_error: str = typer.Option("skip", help="An unreadable or non-finite utterance: skip (counted, listed in summary.json) or raise."),
    plot: bool = typer.Option(True, help="Also draw a 2-D projection of the embeddings, coloured by speaker (PNG)."),
    device: str = typer.Option("auto", help="Where the speaker encoder runs: auto, cpu, cuda or cuda:N (auto: the GPU when there is one; melstats runs on the CPU)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Per-utterance and per-speaker embeddings (speaker = mean of L2-normalised utterance embeddings).

    One utterance in memory at a time. These files feed `sv score` and
    Pseudo2Real-SC (recipe clusters.extractor: the model folder). Exit 1 when
    no utterance could be embedded.

    Example: selfspeech sv embed runs/sv eval.jsonl --out runs/sv/emb
    """
    import numpy as np

    from selfspeech.accel import resolve_device
    from selfspeech.cluster.extractors import get_extractor
    from selfspeech.cluster.speakers import EmbeddingWriter, iter_embeddings, load_embeddings, save_embeddings
    from selfspeech.data.manifest import read_manifest

    with refusing(ValueError):
        dev = resolve_device(device, key="--device")  # before the model is opened
    if on_error not in ("skip", "raise"):
        fail(f"--on-error {on_error!r}: choose skip or raise")
    if not manifest.is_file():
        fail(f"{manifest}: manifest not found")
    try:
        ex = get_extractor(str(model), dev)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    skipped, no_speaker = [], []
    sums: dict[str, list] = {}  # speaker -> [sum of L2-normalised embeddings (float64), count]
    writer = EmbeddingWriter(out / "utterances.npz")
    try:  # streamed: rows go to disk as they come, the manifest is read twice (count, then embed)
        n = sum(1 for _ in read_manifest(manifest))
        for it, e in iter_embeddings(_Sized(read_manifest(manifest), n), ex, progress=True,
                                     skipped=skipped if on_error == "skip" else None):
            writer.add(it["id"], e)
            spk = it.get("speaker")
            if spk in (None, ""):
                no_speaker.append(it["id"])
                continue
            acc = sums.setdefault(str(spk), [np.zeros(len(e)), 0])
            acc[0] += e / (np.linalg.norm(e) + 1e-8)
            acc[1] += 1
    except ValueError as e:
        fail(str(e))
    if not writer.ids:
        writer.close()
        (out / "utterances.npz").unlink(missing_ok=True)
        first = f"{skipped[0].get('id')}: {skipped[0].get('reason')}" if skipped else None
        fail_if_all_failed(0, len(skipped), "utterances", first, "check the audio with `selfspeech data validate`")
        fail(f"{manifest}: no utterances to embed; give a manifest with at least one line")
    writer.close()
    spk = {s: (v[0] / v[1]).astype(np.float32) for s, v in sums.items()}  # mean of L2-normalised embeddings
    if spk:
        save_embeddings(out / "speakers.npz", spk)
    if plot and spk:
        from selfspeech.eval.sv import embedding_plot

        emb = load_embeddings(out / "utterances.npz")
        speaker_of = {it["id"]: str(it["speaker"]) for it in read_manifest(manifest)
                      if it["id"] in emb and it.get("speaker") not in (None, "")}
        embedding_plot({k: emb[k] for k in speaker_of}, speaker_of, out / "embeddings.png")
    n_utts = len(writer.ids)
    summary = {"model": str(model), "utterances": n_utts, "speakers": len(spk), "skipped": skipped,
               "no_speaker": {"count": len(no_speaker), "first": no_speaker[:10],
                              "policy": "utterance embedding written; left out of speakers.npz"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    emit({"out": str(out), **summary}, as_json,
         f"wrote {out}: {n_utts} utterance and {len(spk)} speaker embeddings; {len(skipped)} skipped"
         + (f"; {len(no_speaker)} without a speaker field (not in speakers.npz)" if no_speaker else ""))


class _Sized:
    """An iterator with a known length (so progress bars show an ETA without listing the items)."""

    def __init__(self, it, n: int):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self) -> int:
        return self.n


@app.command("score")
def score(
    embeddings: Path = typer.Argument(..., help="utterances.npz from `sv embed`."),
    out: Path = typer.Option(..., help="Folder for scores.txt, metrics.json, det.png and report.md."),
    trials: Path = typer.Option(None, help="Trial list: 'enrol test target|nontarget' per line."),
    manifest: Path = typer.Option(None, help="Instead of --trials: build trials from this manifest's speakers."),
    n_trials: int = typer.Option(None, help="With --manifest: number of trials (default: every pair)."),
    on_unknown: str = typer.Option("raise", help="Trial lines naming an utterance without embedding: raise or skip (counted)."),
    cohort: Path = typer.Option(None, help="utterances.npz of impostor speakers (not in the trials) for adaptive S-norm."),
    top_n: int = typer.Option(300, help="AS-norm cohort size (closest impostors)."),
    p_target: float = typer.Option(0.01, help="minDCF prior of a target trial."),
) -> None:
    """Cosine scoring, EER and minDCF (normalised; C_miss = C_fa = 1), DET curve.

    EER: the interpolated crossing of the miss and false-alarm rates over all
    distinct thresholds (accept iff score >= t); within 1/n_target of Kaldi's
    compute-eer. Optional adaptive symmetric score normalisation.

    Example: selfspeech sv score runs/sv/emb/utterances.npz --trials trials.txt --cohort cohort/utterances.npz --out reports/sv
    """
    import numpy as np

    from selfspeech.cluster.speakers import load_embeddings
    from selfspeech.data.manifest import read_manifest
    from selfspeech.eval.sv import as_norm, cosine_scores, det_plot, eer_mindcf, make_trials, metrics_table, read_trials

    if on_unknown not in ("raise", "skip"):
        fail(f"--on-unknown {on_unknown!r}: choose raise or skip")
    try:
        emb = load_embeddings(embeddings)
        skipped = 0
        if trials is not None:
            tr, skipped = read_trials(trials, known_ids=emb, on_unknown=on_unknown)
        elif manifest is not None:
            tr = make_trials({it["id"]: str(it["speaker"]) for it in read_manifest(manifest) if it["id"] in emb},
                             n_trials)
        else:
            fail("give --trials FILE or --manifest M (trials built from its speakers)")
        labels = np.array([t.target for t in tr])
        s = cosine_scores(emb, tr)
        rows = {"cosine": eer_mindcf(s, labels, p_target=p_target)}
        curves = {"cosine": (s, labels)}
        if cohort is not None:
            s = as_norm(s, tr, emb, load_embeddings(cohort), top_n=top_n)
            rows["as-norm"] = eer_mindcf(s, labels, p_target=p_target)
            curves["as-norm"] = (s, labels)
    except (ValueError, KeyError, FileNotFoundError) as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scores.txt", "w", encoding="utf-8") as f:
        for t, x in zip(tr, s):
            f.write(f"{t.enrol} {t.test} {x:.6f} {'target' if t.target else 'nontarget'}\n")
    import dataclasses

    from selfspeech.data.versions import software_versions, versions_line

    metrics = {k: dataclasses.asdict(v) for k, v in rows.items()} | {"trials": len(tr), "skipped_trials": skipped,
                                                                     "versions": software_versions()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    det_plot(curves, out / "det.png")
    (out / "report.md").write_text(f"# Speaker verification: {embeddings}\n\n{len(tr)} trials "
                                   f"({int(labels.sum())} target), {skipped} trial line(s) skipped.\n\n"
                                   f"{metrics_table(rows)}\n\n![DET](det.png)\n\n{versions_line(metrics['versions'])}\n")
    for k, m in rows.items():
        out_console.print(f"{k}: EER {100 * m.eer:.2f}%  minDCF {m.mindcf:.4f}  ({len(tr)} trials)")
