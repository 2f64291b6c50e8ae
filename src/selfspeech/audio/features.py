"""Log-mel features shared by speaker embeddings and encoders.

Whisper's front-end (Radford et al. 2022, sec. 2.2): 25 ms Hann windows, 10 ms
hop, 80 mel bins, log10 clamped 8 dB below the utterance maximum, scaled to
about [-1, 1]. Computed with numpy from transformers' mel filter bank so it
follows ``WhisperFeatureExtractor`` (within 0.02 on the scaled values) without its 30-s padding.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

N_FFT, HOP, SR = 400, 160, 16_000


@lru_cache(maxsize=4)
def _filters(n_mels: int) -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=n_mels, min_frequency=0.0,
                           max_frequency=8000.0, sampling_rate=SR, norm="slaney", mel_scale="slaney").astype(np.float32)


def log_mel(wav: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """(T,) float32 at 16 kHz -> (n_mels, T // 160) log-mel, Whisper's scaling."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.size < N_FFT:
        wav = np.pad(wav, (0, N_FFT - wav.size))
    pad = np.pad(wav, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(pad, N_FFT)[::HOP]
    spec = np.abs(np.fft.rfft(frames * np.hanning(N_FFT + 1)[:-1].astype(np.float32), axis=-1)) ** 2
    mel = _filters(n_mels).T @ spec[:-1].T  # drop the last frame, as Whisper does
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).astype(np.float32)
