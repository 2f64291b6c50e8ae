"""Audio I/O: soundfile to read, soxr to resample, mono mixdown with a warning.

Every function returns float32 numpy arrays of shape (T,) in [-1, 1] and raises
:class:`AudioError` naming the file and what is wrong, so a caller can record a
failed utterance and go on.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000


class AudioError(RuntimeError):
    """Audio that cannot be used: missing, unreadable, empty or non-finite."""


@dataclass(frozen=True)
class AudioInfo:
    samplerate: int
    channels: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate if self.samplerate else 0.0


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header information without decoding; AudioError if missing or unreadable."""
    path = str(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: file not found")
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError variants
        raise AudioError(f"{path}: unreadable audio ({_short(e)})") from None
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames))


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    start: float = 0.0,
    end: float | None = None,
    check_finite: bool = True,
) -> np.ndarray:
    """Read ``path`` (optionally the [start, end) seconds segment) as float32 mono at ``sample_rate``.

    Multi-channel audio is averaged to mono with a warning; another rate is
    resampled with soxr (high quality). Raises AudioError on a missing,
    unreadable, empty or NaN/inf-containing file.
    """
    path = str(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: file not found")
    try:
        with sf.SoundFile(path) as f:
            sr = f.samplerate
            f.seek(int(round(start * sr)))
            frames = -1 if end is None else max(0, int(round((end - start) * sr)))
            wav = f.read(frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: unreadable audio ({_short(e)})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: empty audio (0 samples)")
    if wav.shape[1] > 1:
        warnings.warn(f"{path}: {wav.shape[1]} channels mixed down to mono", stacklevel=2)
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    if check_finite and not np.isfinite(wav).all():
        raise AudioError(f"{path}: audio contains NaN or inf samples")
    if sr != sample_rate:
        import soxr

        wav = soxr.resample(wav, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wav, dtype=np.float32)


def item_span(item: dict) -> tuple[float, float | None]:
    """[start, end) seconds of a manifest item's audio in its file (end None: to the end of the file).

    ``end`` wins; otherwise an item with an ``offset`` spans ``offset + duration``
    (NeMo's convention, what ``selfspeech data segment`` writes). A ``duration``
    without an offset describes the whole file, which is read to its end.
    """
    offset = float(item.get("offset", 0.0) or 0.0)
    if item.get("end") is not None:
        return offset, float(item["end"])
    if item.get("offset") is not None and item.get("duration") is not None:
        return offset, offset + float(item["duration"])
    return offset, None


def load_item(item: dict, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Load the audio of a manifest item, honouring ``offset`` with ``end`` or ``duration`` (:func:`item_span`)."""
    offset, end = item_span(item)
    try:
        return load_audio(item["audio_filepath"], sample_rate, offset, end)
    except AudioError as e:
        raise AudioError(f"utterance {item.get('id')!r}: {e}") from None


def write_audio(path: str | os.PathLike, wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono audio atomically (format from the suffix, e.g. .flac or .wav)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        sf.write(tmp, np.asarray(wav, dtype=np.float32), sample_rate)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
