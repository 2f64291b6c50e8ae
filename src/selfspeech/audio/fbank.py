"""SpeechBrain's ``Fbank`` features, the front end its ECAPA-TDNN speaker models were trained on.

The same function as ``speechbrain.lobes.features.Fbank`` with its defaults (and
``n_mels`` of the checkpoint), without SpeechBrain: a centred STFT (400-point FFT,
25-ms Hamming window, 10-ms hop, zero padding of 200 samples at both ends), the
power spectrum, triangular filters on the HTK mel scale (2595 log10(1 + f/700))
between 0 and 8 kHz, each filter as wide on both sides as its lower neighbour's
spacing, then ``10 log10(max(x, 1e-10))`` floored 80 dB under the utterance's
maximum. It differs from Whisper's log-mel (:mod:`selfspeech.audio.features`:
Slaney mel, Hann window, log10 with an 8-unit floor, scaled) in every step, so an
imported SpeechBrain model is fed these.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

SR, N_FFT, HOP = 16_000, 400, 160


@lru_cache(maxsize=4)
def fbank_matrix(n_mels: int = 80, f_min: float = 0.0, f_max: float = 8000.0) -> torch.Tensor:
    """(1 + N_FFT // 2, n_mels) float32 triangular filters, SpeechBrain's ``Filterbank`` construction."""
    to_mel = lambda hz: 2595 * math.log10(1 + hz / 700)  # noqa: E731
    mel = torch.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    band, centre = (hz[1:] - hz[:-1])[:-1], hz[1:-1]
    freqs = torch.linspace(0, SR // 2, N_FFT // 2 + 1)
    slope = (freqs[None, :] - centre[:, None]) / band[:, None]
    return torch.clamp(torch.minimum(slope + 1.0, 1.0 - slope), min=0.0).T.contiguous()


def speechbrain_fbank(wav: np.ndarray, n_mels: int = 80, top_db: float = 80.0) -> np.ndarray:
    """(T,) float32 16-kHz waveform -> (1 + T // 160, n_mels) float32 log filterbank energies (dB)."""
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    spec = torch.stft(x, N_FFT, HOP, N_FFT, torch.hamming_window(N_FFT), center=True, pad_mode="constant",
                      normalized=False, onesided=True, return_complex=True)
    power = torch.view_as_real(spec).pow(2).sum(-1).T           # (frames, 201), as SpeechBrain sums re^2 + im^2
    db = 10 * torch.log10(torch.clamp(power @ fbank_matrix(n_mels), min=1e-10))
    return torch.maximum(db, db.max() - top_db).numpy()
