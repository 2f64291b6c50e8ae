"""Speaker extractors by name: what ``sv embed`` and Pseudo2Real-SC's ``clusters.extractor`` accept."""
from __future__ import annotations

import hashlib
from pathlib import Path

from selfspeech.cluster.speakers import MelStatsExtractor


def get_extractor(name: str, device="cpu"):
    """``melstats`` (the baseline) or the directory of a trained speaker encoder (``selfspeech sv train``),
    which then runs on ``device`` (a ``torch.device`` or cpu, cuda, cuda:N; melstats is NumPy on the CPU)."""
    if name == "melstats":
        return MelStatsExtractor()
    if Path(name).is_dir():
        from selfspeech.models.ecapa import SpeakerEncoder

        return SpeakerEncoder.load(name, device)
    raise ValueError(f"unknown speaker extractor {name!r}: use melstats or the folder written by "
                     "`selfspeech sv train` (its encoder/ subfolder)")


def extractor_fingerprint(name: str) -> str:
    """What a cache of embeddings keys on: a model folder's weights hash, not only its path."""
    if name == "melstats" or not Path(name).is_dir():
        return name
    d = Path(name)
    w = d / "model.safetensors" if (d / "model.safetensors").is_file() else d / "encoder" / "model.safetensors"
    return f"{name}@sha256:{hashlib.sha256(w.read_bytes()).hexdigest()[:16]}"
