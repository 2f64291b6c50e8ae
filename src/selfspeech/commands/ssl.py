"""``selfspeech pretrain``, ``finetune-ctc``, ``decode-ctc`` and ``export-ctc``: self-supervised encoders and CTC."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from selfspeech.commands.common import (DEVICE_HELP, JSON_HELP, OVERRIDES_HELP, PRECISION_HELP, emit, fail,
                                       fail_if_all_failed, load_config, need_device, need_files, out_console,
                                       refusing, save_run_config)


def pretrain(
    config: Path = typer.Argument(None, help="YAML/JSON with PretrainConfig keys: objective, encoder {preset|fields}, task, loop, max_batch_seconds, crop_seconds, group_field, group_alpha."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    manifest: Path = typer.Option(..., "--manifest", help="Unlabelled audio (JSONL manifest; text is ignored)."),
    out: Path = typer.Option(..., help="Output folder: best/ (whole task), encoder/ (for finetune-ctc), log.jsonl. Rerun to resume."),
    objective: str = typer.Option(None, help="wav2vec2 | bestrq | birq (overrides the config)."),
    init: Path = typer.Option(None, help="wav2vec2 only: start from a transformers wav2vec 2.0 / XLSR checkpoint folder (config.json with model_type wav2vec2) or OUT/best of an earlier wav2vec2 pretrain; it brings the encoder and quantizer, the config the training settings."),
    steps: int = typer.Option(None, help="Maximum optimizer steps (overrides loop.max_steps)."),
    budget_seconds: float = typer.Option(None, help="Stop after this much training time instead (same CPU budget for every method)."),
    device: str = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option(None, help=PRECISION_HELP),
) -> None:
    """Pretrain a speech encoder without labels.

    wav2vec2: contrastive task over Gumbel-quantized waveform features
    (group_field: age_group, language... turns on XLSR's n^alpha group sampling).
    bestrq: masked prediction of random-projection labels of log-mel frames.
    birq: BEST-RQ plus self-labels from the encoder's own layer at ~70% depth.
    Utterances too short for the encoder are skipped and listed in summary.json.
    --init continues the pretraining of a checkpoint on your unlabelled audio, e.g. a
    transformers XLSR folder saved with save_pretrained (or downloaded beforehand).

    Example: selfspeech pretrain recipes/speechocean762/ssl/bestrq.yaml --manifest all.jsonl --out runs/bestrq --device cuda
    """
    from selfspeech.train.pretrain import PretrainConfig
    from selfspeech.train.pretrain import pretrain as run

    with refusing():
        cfg = load_config(PretrainConfig, config, overrides, {"objective": objective, "loop.max_steps": steps,
                                                              "loop.budget_seconds": budget_seconds,
                                                              "loop.device": device, "loop.precision": precision})
        need_device(cfg.loop.device, cfg.loop.precision, "loop.")
        need_files(manifest=manifest)
        if init is not None and not init.is_dir():
            fail(f"--init: {str(init)!r} is not a folder; give a transformers wav2vec 2.0 folder or OUT/best of pretrain")
    save_run_config(cfg, out)
    with refusing(ValueError, TypeError, FileNotFoundError):
        summary = run(manifest, out, cfg, init=init)
    out_console.print_json(json.dumps({k: v for k, v in summary.items() if k != "skipped"} |
                                  {"skipped": len(summary["skipped"])}))


def finetune_ctc(
    config: Path = typer.Argument(None, help="YAML/JSON with CTCConfig keys: targets (phone|char), lexicon, encoder (scratch), loop, freeze_steps, reinit_top (pretrained: top layers drawn afresh), mask_*."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    train: Path = typer.Option(..., help="Labelled training manifest."),
    dev: Path = typer.Option(..., help="Labelled dev manifest (early stopping on its PER/WER)."),
    out: Path = typer.Option(..., help="Output folder: best/ (the CTC model), log.jsonl, summary.json. Rerun to resume."),
    init: Path = typer.Option(None, help="A pretrained encoder folder (OUT/encoder of `selfspeech pretrain`) or a transformers wav2vec 2.0 / XLSR checkpoint folder (config.json with model_type wav2vec2); none = from scratch."),
    lexicon: Path = typer.Option(None, help="Pronunciation lexicon WORD<TAB>PHONES (phone targets)."),
    device: str = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option(None, help=PRECISION_HELP),
) -> None:
    """Fine-tune an encoder with CTC on phones (from a lexicon, stress removed) or characters.

    Words missing from the lexicon are reported with the utterances they
    affect (summary.json), and those utterances skipped.

    Example: selfspeech finetune-ctc --train l.jsonl --dev d.jsonl --init runs/bestrq/encoder --lexicon lexicon.txt --out runs/ctc
    """
    from selfspeech.train.ctc import CTCConfig
    from selfspeech.train.ctc import finetune_ctc as run

    with refusing():
        cfg = load_config(CTCConfig, config, overrides, {"lexicon": str(lexicon) if lexicon else None,
                                                         "loop.device": device, "loop.precision": precision})
        need_device(cfg.loop.device, cfg.loop.precision, "loop.")
        need_files(train=train, dev=dev)
        need_files("lexicon (WORD<TAB>PHONES)", lexicon_key=cfg.lexicon)
        if init is not None and not init.is_dir():
            fail(f"--init: {str(init)!r} is not a folder; give OUT/encoder of `selfspeech pretrain` or a transformers wav2vec 2.0 folder")
    save_run_config(cfg, out)
    with refusing(ValueError, TypeError, FileNotFoundError):
        summary = run(train, dev, out, cfg, init=init)
    out_console.print_json(json.dumps(summary))


def decode_ctc(
    model: Path = typer.Argument(..., help="A CTC model folder (OUT/best of finetune-ctc)."),
    manifest: Path = typer.Option(..., "--in", help="Audio to transcribe (JSONL manifest)."),
    out: Path = typer.Option(..., help="Hypotheses JSONL {id, text} for `selfspeech eval` (phones: space-separated)."),
    beam: int = typer.Option(0, help="0 = greedy best path; N > 0 = CTC prefix beam search of width N (no language model)."),
    device: str = typer.Option("auto", help="Where the model runs: auto, cpu, cuda or cuda:N (auto: the GPU when there is one)."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """CTC transcripts (greedy or beam search). For PER, score against phone references:
    `selfspeech eval --ref phones.jsonl --hyp OUT --normalizer none`.

    An unreadable utterance keeps its line (empty text, status failed, the
    reason) and is counted; exit 1 when every utterance failed.

    Example: selfspeech decode-ctc runs/ctc/best --in eval.jsonl --out hyps/ctc.jsonl --beam 8
    """
    from selfspeech.accel import resolve_device
    from selfspeech.label.transcribe import transcribe_ctc

    with refusing(ValueError):
        dev = resolve_device(device, key="--device")  # before the model is opened
    try:
        transcribe_ctc(model, manifest, out, beam=beam, device=dev)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    recs = [json.loads(line) for line in open(out, encoding="utf-8") if line.strip()]
    failed = [r for r in recs if r.get("status") == "failed"]
    first = f"{failed[0]['id']}: {failed[0].get('reason')}" if failed else None
    emit({"out": str(out), "utterances": len(recs), "failed": len(failed), "first_failure": first}, as_json,
         f"wrote {out}: {len(recs)} utterances, {len(failed)} failed" + (f" (first: {first})" if first else ""))
    fail_if_all_failed(len(recs) - len(failed), len(failed), "utterances", first,
                       "check the audio paths with `selfspeech data validate`")


def export_ctc(
    model: Path = typer.Argument(..., help="A CTC model folder (OUT/best of finetune-ctc) with a wav2vec 2.0 encoder: frontend wave, pos_norm false."),
    out: Path = typer.Option(..., help="New folder for the transformers files (config.json, model.safetensors, vocab.json, tokenizer/processor configs); a previous export there is replaced."),
) -> None:
    """Export a CTC model to transformers: Wav2Vec2ForCTC + Wav2Vec2Processor, same logits and transcripts.

    Only encoders in transformers' "stable layer norm" layout export exactly:
    pretrain (or fine-tune from scratch) with `encoder: {frontend: wave, pos_norm: false}`.
    Pass the processor's attention_mask to the model for padded batches.

    Example: selfspeech export-ctc runs/ctc/best --out runs/ctc/hf, then in Python:
    Wav2Vec2ForCTC.from_pretrained("runs/ctc/hf", use_safetensors=True), Wav2Vec2Processor.from_pretrained("runs/ctc/hf")
    """
    from selfspeech.train.hf_export import export_wav2vec2_ctc

    if not model.is_dir():
        fail(f"{model}: not a folder (expected OUT/best of finetune-ctc)")
    try:
        export_wav2vec2_ctc(model, out)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    out_console.print(f"[green]wrote[/] {out}")


def units(
    model: Path = typer.Argument(..., help="A wav2vec2 pretraining folder (OUT/best of `selfspeech pretrain --objective wav2vec2`)."),
    manifest: Path = typer.Option(..., "--in", help="Utterances to quantize (JSONL manifest)."),
    by: str = typer.Option("age_group", help="Manifest field naming the groups (language, accent, age_group...)."),
    out: Path = typer.Option(..., help="Folder for units.json, units_heatmap.png, units_histograms.png."),
) -> None:
    """Codeword usage per group and the similarity of groups (XLSR's shared-units analysis).

    Example: selfspeech units runs/wav2vec2/best --in all.jsonl --by age_group --out reports/units
    """
    from selfspeech.data.manifest import read_manifest
    from selfspeech.eval.units import load_wav2vec2_task, unit_usage, write_unit_report

    try:
        task = load_wav2vec2_task(model)
        items = list(read_manifest(manifest))
        res = write_unit_report(unit_usage(task, items, by), out)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    out_console.print_json(json.dumps({k: res[k] for k in ("groups", "codewords_used", "frames")}))
