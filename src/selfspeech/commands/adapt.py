"""``selfspeech adapt`` (the Pseudo2Real pipeline) and ``selfspeech export``."""
from __future__ import annotations

from pathlib import Path

import typer

from selfspeech.commands.common import (DEVICE_HELP, PRECISION_HELP, check_model, console, fail, load_config,
                                       need_device, need_files, out_console, refusing, save_run_config)


def adapt(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/speechocean762/pseudo2real.yaml)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides of recipe keys, e.g. "
                                          "student.finetune.lr=3e-5 'lambda.grid=[0,0.5,1]' (values read as YAML)."),
    out: Path = typer.Option(None, help="Run folder (default: runs/<recipe name>). Rerun to resume: finished stages are cached."),
    device: str = typer.Option(None, help="Where every stage computes (teacher, fine-tunes, decoding, speaker "
                               "encoder): auto (a CUDA GPU when present), cpu, cuda or cuda:N (the recipe's device key)."),
    precision: str = typer.Option(None, help=PRECISION_HELP + " (the students' student.finetune.precision)"),
) -> None:
    """Adapt a Whisper student to an unlabelled target domain with Pseudo2Real.

    Stages: split by speaker -> teacher pseudo-labels -> student fine-tunes
    (source real, source pseudo, target pseudo) -> tau = real - pseudo ->
    lambda chosen without target labels -> Pseudo2Real and Pseudo2Real-SC
    (and the baselines) decoded on the target-eval speakers -> OUT/report.md
    with WER per system (95% CIs), paired bootstraps and WER-vs-lambda charts.
    A stage whose config is unchanged is not recomputed. The recipe is checked
    (keys, types, ranges, data source, speakers, model names) before anything
    runs; OUT/resolved_config.json records it with every default filled in.

    Example: selfspeech adapt recipes/speechocean762/pseudo2real.yaml student.finetune.lr=3e-5 --out runs/p2r --device cuda
    """
    from selfspeech.adapt.pseudo2real import run_pseudo2real
    from selfspeech.adapt.recipe import check_recipe, load_recipe

    with refusing():
        given = [f"device={device}"] * bool(device) + [f"student.finetune.precision={precision}"] * bool(precision)
        r = load_recipe(recipe, [*(overrides or ()), *given])
        check_recipe(r)
        out = out or Path("runs") / r.name
        save_run_config(r.resolved(), out)
        result = run_pseudo2real(r, out, log=lambda m: console.print(m, highlight=False, markup=False))
    out_console.print(f"[green]done[/]: {result['report']}")


def export(
    model_dir: Path = typer.Argument(..., help="A transformers Whisper directory (e.g. an adapted student)."),
    out: Path = typer.Argument(..., help="CTranslate2 directory to write (faster-whisper loads it)."),
    to: str = typer.Option("ctranslate2", help="Target format (ctranslate2)."),
    quantization: str = typer.Option("float16", help="Stored weight type: float32, float16, int8 (faster-whisper can still run int8 from float16)."),
) -> None:
    """Export a Whisper checkpoint with ctranslate2's own converter, for faster-whisper.

    Example: selfspeech export runs/p2r/model_p2r/model runs/p2r/ct2 && \\
             selfspeech label --teacher runs/p2r/ct2 --in M.jsonl --out L.jsonl
    """
    from selfspeech.models.export import ExportError, export_ctranslate2

    if to != "ctranslate2":
        fail(f"--to {to!r}: only ctranslate2 is supported")
    try:
        export_ctranslate2(model_dir, out, quantization)
    except ExportError as e:
        fail(str(e))
    out_console.print(f"wrote {out}")


def finetune_whisper(
    config: Path = typer.Argument(None, help="YAML/JSON with FinetuneConfig keys (lr, batch_size, max_epochs, "
                                              "max_steps, eval_every, patience, freeze_encoder, ...)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides of config keys, e.g. lr=3e-5 max_steps=200."),
    train: Path = typer.Option(..., help="Training manifest (real or pseudo-labels in `text`)."),
    dev: Path = typer.Option(None, help="Dev manifest: greedy WER every eval_every steps, early stopping, best/."),
    init: str = typer.Option("whisper-tiny.en", help="A model name (`selfspeech models list`), a transformers or CTranslate2 Whisper folder, or a hub id (online)."),
    out: Path = typer.Option(..., help="Output folder: best/ (save_pretrained), log.jsonl, summary.json; "
                                       "last/ while training (kept with keep_last=true). Rerun to resume."),
    device: str = typer.Option(None, help=DEVICE_HELP),
    precision: str = typer.Option(None, help=PRECISION_HELP),
    lora_rank: int = typer.Option(None, min=1, help="Train a LoRA student of this rank (only its adapters; best/ "
                                  "is a peft adapter folder); the config's lora.rank."),
    lora_alpha: float = typer.Option(None, help="LoRA scale alpha (the update is alpha/rank * B@A; default 16)."),
    lora_dropout: float = typer.Option(None, help="Dropout on the LoRA input (default 0.05)."),
    lora_targets: str = typer.Option(None, help="Comma-separated linear layers to adapt in every block "
                                     "(default q_proj,k_proj,v_proj,out_proj,fc1,fc2)."),
    lora_where: str = typer.Option(None, help="Blocks to adapt: encoder, decoder or both (default)."),
) -> None:
    """Fine-tune a Whisper student on one manifest (the stage `adapt` runs for each student).

    Data parallel with torchrun (one process per core or GPU; gradients
    token-weighted, so N processes x batch B equal one process x N*B):

    torchrun --nproc_per_node 2 -m selfspeech.cli finetune-whisper cfg.yaml --train t.jsonl --dev d.jsonl --out runs/ft

    A multilingual student learns in the config's language and task (language=de
    task=transcribe); an English-only (.en) init takes language en only.

    Example: selfspeech finetune-whisper --train children.labels.jsonl --dev dev.labels.jsonl --out runs/student --device cuda

    LoRA student: selfspeech finetune-whisper --train t.jsonl --dev d.jsonl --out runs/lora8 --lora-rank 8 lr=1e-3
    """
    from selfspeech.train.whisper_ft import FinetuneConfig, finetune

    lora = {"lora.rank": lora_rank, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout,
            "lora.target_modules": lora_targets.split(",") if lora_targets else None, "lora.where": lora_where}
    with refusing():
        cfg = load_config(FinetuneConfig, config, overrides, {"device": device, "precision": precision, **lora})
        need_device(cfg.device, cfg.precision)
        need_files(train=train, dev=dev)
        check_model(init, "--init", cfg.language, cfg.task)
    save_run_config(cfg, out)
    with refusing(ValueError, TypeError, FileNotFoundError, OSError):
        best = finetune(train, dev, init, out, cfg)
    out_console.print(f"best model: {best}")
