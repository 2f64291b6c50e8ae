"""``selfspeech arith diff|apply``: task vectors between and onto checkpoints."""
from __future__ import annotations

from pathlib import Path

import typer

from selfspeech.commands.common import fail, out_console

app = typer.Typer(no_args_is_help=True, help="Task arithmetic: tau = A - B; new = BASE + lambda * tau.")


@app.command("diff")
def diff(
    a: Path = typer.Argument(..., help="Checkpoint A (save_pretrained dir), e.g. the student fine-tuned on source real labels."),
    b: Path = typer.Argument(..., help="Checkpoint B from the same init, e.g. the student fine-tuned on source pseudo-labels."),
    out: Path = typer.Argument(..., help="Task vector to write (.safetensors)."),
    include: str = typer.Option(None, help="Regex of parameter names to keep, e.g. 'encoder'."),
    exclude: str = typer.Option(None, help="Regex of parameter names to drop."),
) -> None:
    """Write tau = A - B (fp32, tied weights counted once).

    Example: selfspeech arith diff runs/src_real runs/src_pseudo runs/tau.safetensors
    """
    from selfspeech.arith.task_vector import TaskVectorError, diff_dirs

    try:
        tau = diff_dirs(a, b, include, exclude)
    except TaskVectorError as e:
        fail(str(e))
    tau.save(out, {"a": str(a), "b": str(b), "include": include or "", "exclude": exclude or ""})
    out_console.print(f"wrote {out}: {len(tau)} tensors, {tau.numel() / 1e6:.2f}M values, L2 norm {tau.norm():.4f}")


@app.command("apply")
def apply(
    base: Path = typer.Argument(..., help="Checkpoint to correct (save_pretrained dir), e.g. the target pseudo-label student."),
    tau: Path = typer.Argument(..., help="Task vector (.safetensors from `selfspeech arith diff`)."),
    out: Path = typer.Argument(..., help="New checkpoint directory (transformers loads it)."),
    lam: float = typer.Option(1.0, "--lambda", help="Scale of tau: new = base + lambda * tau."),
) -> None:
    """Write base + lambda * tau as a new checkpoint directory.

    Example: selfspeech arith apply runs/tgt_pseudo runs/tau.safetensors runs/p2r --lambda 0.5
    """
    from selfspeech.arith.task_vector import TaskVector, TaskVectorError, apply_to_dir

    if not tau.is_file():
        fail(f"{tau}: task vector not found (make one with `selfspeech arith diff`)")
    try:
        apply_to_dir(base, TaskVector.load(tau), lam, out)
    except TaskVectorError as e:
        fail(str(e))
    out_console.print(f"wrote {out} = {base} + {lam} * {tau}")
