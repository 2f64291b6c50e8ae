"""``selfspeech arith diff|apply``: task vectors between and onto checkpoints."""
from __future__ import annotations

from pathlib import Path

import typer

from selfspeech.commands.common import fail, out_console, refusing

app = typer.Typer(no_args_is_help=True, help="Task arithmetic: tau = A - B; new = BASE + lambda * tau.")


@app.command("diff")
def diff(
    a: Path = typer.Argument(..., help="Checkpoint A (save_pretrained dir or LoRA adapter folder), e.g. the student "
                             "fine-tuned on source real labels."),
    b: Path = typer.Argument(..., help="Checkpoint B from the same init (of the same kind as A), e.g. the student "
                             "fine-tuned on source pseudo-labels."),
    out: Path = typer.Argument(..., help="Task vector to write (.safetensors)."),
    include: str = typer.Option(None, help="Regex of parameter names to keep, e.g. 'encoder'."),
    exclude: str = typer.Option(None, help="Regex of parameter names to drop."),
) -> None:
    """Write tau = A - B (fp32, tied weights counted once).

    Two LoRA adapter folders of one base and rank give tau = merged delta(A) -
    merged delta(B), (alpha/r) B@A per adapted matrix: weights, not factors, subtract.

    Example: selfspeech arith diff runs/src_real runs/src_pseudo runs/tau.safetensors
    """
    from selfspeech.arith.task_vector import diff_dirs

    with _refusing():
        tau = diff_dirs(a, b, include, exclude)
    tau.save(out, {"a": str(a), "b": str(b), "include": include or "", "exclude": exclude or ""})
    out_console.print(f"wrote {out}: {len(tau)} tensors, {tau.numel() / 1e6:.2f}M values, L2 norm {tau.norm():.4f}")


@app.command("apply")
def apply(
    base: Path = typer.Argument(..., help="Checkpoint to correct (save_pretrained dir or LoRA adapter folder, "
                                "merged first), e.g. the target pseudo-label student."),
    tau: Path = typer.Argument(..., help="Task vector (.safetensors from `selfspeech arith diff` or `arith lowrank`)."),
    out: Path = typer.Argument(..., help="New checkpoint directory (transformers loads it)."),
    lam: float = typer.Option(1.0, "--lambda", help="Scale of tau: new = base + lambda * tau."),
) -> None:
    """Write base + lambda * tau as a new checkpoint directory.

    Example: selfspeech arith apply runs/tgt_pseudo runs/tau.safetensors runs/p2r --lambda 0.5
    """
    from selfspeech.arith.lowrank import load_any
    from selfspeech.arith.task_vector import apply_to_dir

    with _refusing():
        apply_to_dir(base, load_any(tau), lam, out)
    out_console.print(f"wrote {out} = {base} + {lam} * {tau}")


@app.command("lowrank")
def lowrank(
    tau: Path = typer.Argument(..., help="Task vector (.safetensors from `selfspeech arith diff`)."),
    out: Path = typer.Argument(..., help="Low-rank task vector to write (.safetensors; `arith apply` reads it)."),
    energy: float = typer.Option(0.99, min=0.0, max=1.0, help="Fraction of each matrix's squared Frobenius "
                                 "norm the kept singular values hold; sets each matrix's rank."),
    max_rank: int = typer.Option(None, min=1, help="Cap on every matrix's rank."),
) -> None:
    """Store tau as a truncated SVD per matrix; print its reconstruction error and size.

    Example: selfspeech arith lowrank runs/tau.safetensors runs/tau_lowrank.safetensors --energy 0.99
    """
    from selfspeech.arith.lowrank import compress
    from selfspeech.arith.task_vector import TaskVector

    with _refusing():
        low = compress(TaskVector.load(tau) if tau.is_file() else _missing(tau), energy, max_rank)
    low.save(out, {"source": str(tau)})
    r = low.report
    out_console.print(f"wrote {out}: {len(low.factors)} matrices factored, relative error {r['rel_error']:.4f} "
                      f"(worst matrix {max((m['rel_error'] for m in r['matrices'].values()), default=0.0):.4f}), "
                      f"{r['bytes_lowrank'] / 1e6:.2f} MB vs {r['bytes_full'] / 1e6:.2f} MB full "
                      f"(ratio {r['size_ratio']:.3f})")


def _missing(tau: Path):
    fail(f"{tau}: task vector not found (make one with `selfspeech arith diff`)")


def _refusing():
    """Task-vector and adapter errors as the command's one-line refusal (exit code 2)."""
    from selfspeech.arith.task_vector import TaskVectorError
    from selfspeech.models.lora import AdapterError

    return refusing(TaskVectorError, AdapterError)
