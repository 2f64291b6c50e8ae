"""Log-mel features shared by speaker embeddings and encoders.

Whisper's front-end (Radford et al. 2022, sec. 2.2): 25 ms Hann windows, 10 ms
hop, 80 mel bins, log10 clamped 8 dB below the utterance maximum, scaled to
about [-1, 1]. Computed with numpy from transformers' mel filter bank so it
follows ``WhisperFeatureExtractor`` (within 0.02 on the scaled values) without its 30-s padding.

``log_mel`` takes one numpy waveform; ``log_mel_torch`` computes the same
features for a padded batch of tensors on their device (a GPU computes them
next to the model instead of the data-loading CPU).
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where used: the numpy path does not need it
    import torch

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


@lru_cache(maxsize=16)
def _torch_constants(device: torch.device, n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hann window (N_FFT,) and mel filter bank (1 + N_FFT // 2, n_mels) on ``device``, made once per
    device: the same float32 values as the numpy path, so both compute the same function."""
    import torch

    window = torch.from_numpy(np.hanning(N_FFT + 1)[:-1].astype(np.float32)).to(device)
    return window, torch.from_numpy(_filters(n_mels)).to(device)


def log_mel_torch(wave: torch.Tensor, lengths: torch.Tensor | None = None,
                  n_mels: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) float 16-kHz waveforms + (B,) int64 sample lengths (None: all N) -> ((B, T, n_mels) float32
    log-mel, (B,) int64 frame lengths), on the waveforms' device.

    Row b equals ``log_mel(wave[b, :lengths[b]]).T`` (float32 rounding: within 1e-4 on the scaled
    values), zero past its frames: each row gets its own reflect padding and its own 8-dB floor, so a
    padded batch gives each utterance its features alone. Runs in float32 even under autocast, whose
    half-precision filter-bank product would move the log floor.
    """
    import torch

    dev = wave.device
    B, N = wave.shape
    lengths = torch.full((B,), N, device=dev) if lengths is None else lengths.to(dev)
    with torch.autocast(dev.type, enabled=False):
        n = lengths.long().clamp(min=N_FFT)        # log_mel zero-pads a wave shorter than one window
        frames = n // HOP                          # log_mel's frame count (its last frame dropped)
        T, width = int(frames.max()), max(N, N_FFT)
        x = torch.nn.functional.pad(wave.float(), (0, width - N))
        x = x * (torch.arange(width, device=dev) < lengths[:, None])   # zeros past each row's samples
        # reflect padding by N_FFT // 2 on both sides of each row's own n samples (np.pad "reflect")
        s = torch.arange((T - 1) * HOP + N_FFT, device=dev) - N_FFT // 2
        idx = s.abs()[None, :].expand(B, -1)
        idx = torch.where(idx >= n[:, None], 2 * (n[:, None] - 1) - idx, idx).clamp(0, width - 1)
        window, filters = _torch_constants(dev, n_mels)
        spec = torch.fft.rfft(x.gather(1, idx).unfold(1, N_FFT, HOP) * window).abs() ** 2  # (B, T, 201)
        logm = torch.log10((spec @ filters).clamp(min=1e-10))                               # (B, T, n_mels)
        valid = (torch.arange(T, device=dev)[None, :] < frames[:, None])[..., None]
        top = logm.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
        out = (torch.maximum(logm, top - 8.0) + 4.0) / 4.0
    return out * valid, frames

