"""Speaker extractors by name: what ``sv embed`` and Pseudo2Real-SC's ``clusters.extractor`` accept."""
from __future__ import annotations

import hashlib
from pathlib import Path

from selfspeech.cluster.speakers import MelStatsExtractor
from selfspeech.models.ecapa_sb import find_speechbrain_checkpoint


def get_extractor(name: str, device="cpu"):
    """``melstats`` (the baseline), the directory of a trained speaker encoder (``selfspeech sv train``), or a
    SpeechBrain ECAPA-TDNN checkpoint (``embedding_model.ckpt`` or its folder); a model then runs on ``device``
    (a ``torch.device`` or cpu, cuda, cuda:N; melstats is NumPy on the CPU)."""
    if name == "melstats":
        return MelStatsExtractor()
    if Path(name).is_dir() or find_speechbrain_checkpoint(name) is not None:
        from selfspeech.models.ecapa import SpeakerEncoder

        return SpeakerEncoder.load(name, device)
    raise ValueError(f"unknown speaker extractor {name!r}: use melstats, the folder written by "
                     "`selfspeech sv train` (its encoder/ subfolder) or a SpeechBrain ECAPA embedding_model.ckpt")


def extractor_fingerprint(name: str) -> str:
    """What a cache of embeddings keys on: a model folder's weights hash, not only its path."""
    sb = find_speechbrain_checkpoint(name) if name != "melstats" else None
    if sb is None and (name == "melstats" or not Path(name).is_dir()):
        return name
    d = Path(name)
    w = sb or (d / "model.safetensors" if (d / "model.safetensors").is_file() else d / "encoder" / "model.safetensors")
    return f"{name}@sha256:{hashlib.sha256(w.read_bytes()).hexdigest()[:16]}"
