"""Long recordings built from short utterances: the test bed of segmentation and of unlabelled targets.

Untranscribed domain audio usually comes as long recordings (lectures, calls,
classrooms), while corpora come as sentences. :func:`join_recordings` joins a
speaker's utterances, in a seeded order, into recordings of a target length
with silent (optionally noisy) pauses between them, and keeps where each
utterance landed, so a segmenter's output can be scored against known speech
regions and the teacher's long-form transcripts against the utterances'.

Outputs: ``<out>/audio/<recording>.flac`` (16 kHz mono), a recordings manifest
(one line per recording, no text, no speaker: what a user's folder gives) and
a reference manifest (one line per utterance, with ``recording``, ``offset`` and
``duration`` into the recording, and the utterance's text and speaker).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfspeech.audio.io import SAMPLE_RATE, load_item, write_audio
from selfspeech.data.manifest import write_manifest


@dataclass(frozen=True)
class LongFormConfig:
    min_seconds: float = 120.0        # a recording ends once it is at least this long ...
    max_seconds: float = 300.0        # ... and never passes this (a speaker's rest starts a new one)
    pause_seconds: tuple[float, float] = (0.3, 1.5)   # uniform pause between utterances
    snr_db: float | None = None       # white noise over the whole recording at this SNR (speech power)
    # True: one speaker per recording; False: speakers follow one another (a classroom, a meeting),
    # which makes long recordings from speakers with little speech each
    per_speaker: bool = True
    seed: int = 0


def _noise(wav: np.ndarray, speech: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    p = float(np.mean(speech ** 2)) if len(speech) else 1e-4
    return wav + rng.standard_normal(len(wav)).astype(np.float32) * np.sqrt(p / 10 ** (snr_db / 10))


def join_recordings(items: list[dict], out_dir: str | Path, cfg: LongFormConfig = LongFormConfig()
                    ) -> tuple[Path, Path]:
    """Join each speaker's ``items`` into long recordings; returns (recordings manifest, reference manifest).

    A speaker's utterances are shuffled (seeded) and laid end to end with
    pauses; a recording is closed once it reaches ``min_seconds``, or before
    an utterance would push it past ``max_seconds``. The last recording of a
    speaker (``per_speaker``) or of all (otherwise) may be shorter than
    ``min_seconds``: all speech is kept."""
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    nrng = np.random.default_rng(cfg.seed)
    by: dict[str, list[dict]] = {}
    for it in items:
        by.setdefault(str(it["speaker"]), []).append(it)
    for spk in by:
        by[spk] = sorted(by[spk], key=lambda x: x["id"])
        rng.shuffle(by[spk])
    groups = {s: by[s] for s in sorted(by)} if cfg.per_speaker else {"all": [u for s in sorted(by) for u in by[s]]}
    recordings, refs = [], []
    for spk, utts in groups.items():
        pieces: list[tuple[dict, np.ndarray]] = []
        for it in utts + [None]:  # None: flush the speaker's last recording
            wav = load_item(it) if it is not None else None
            length = sum(len(w) for _, w in pieces) / SAMPLE_RATE + cfg.pause_seconds[1] * len(pieces)
            full = it is None or length >= cfg.min_seconds or (
                length + len(wav) / SAMPLE_RATE + cfg.pause_seconds[1] > cfg.max_seconds)
            if full and pieces:
                rec = f"{spk}_rec{sum(r['group'] == spk for r in recordings):03d}"
                line, placed = _write(out, rec, pieces, cfg, rng, nrng)
                recordings.append({**line, "group": spk})
                refs += placed
                pieces = []
            if it is not None:
                pieces.append((it, wav))
    # the recordings manifest is what a user's folder gives: audio only
    write_manifest(out / "recordings.jsonl", [{k: v for k, v in r.items() if k != "group"} for r in recordings])
    write_manifest(out / "reference.jsonl", refs)
    return out / "recordings.jsonl", out / "reference.jsonl"


def _write(out: Path, rec: str, pieces: list[tuple[dict, np.ndarray]], cfg: LongFormConfig, rng: random.Random,
           nrng: np.random.Generator) -> tuple[dict, list[dict]]:
    chunks, placed, t = [], [], 0
    lead = int(rng.uniform(*cfg.pause_seconds) * SAMPLE_RATE)
    chunks.append(np.zeros(lead, np.float32))
    t = lead
    for it, wav in pieces:
        placed.append({"id": it["id"], "recording": rec, "audio_filepath": str(out / "audio" / f"{rec}.flac"),
                       "offset": round(t / SAMPLE_RATE, 7), "duration": round(len(wav) / SAMPLE_RATE, 7),
                       "text": it.get("text", ""), "speaker": it.get("speaker")})
        gap = int(rng.uniform(*cfg.pause_seconds) * SAMPLE_RATE)
        chunks += [wav.astype(np.float32), np.zeros(gap, np.float32)]
        t += len(wav) + gap
    wav = np.concatenate(chunks)
    if cfg.snr_db is not None:
        wav = _noise(wav, np.concatenate([w for _, w in pieces]), cfg.snr_db, nrng)
    peak = float(np.max(np.abs(wav))) if len(wav) else 0.0
    if peak > 0.99:  # noise can clip: scale the whole recording (and so the references' audio) together
        wav = wav * (0.99 / peak)
    path = out / "audio" / f"{rec}.flac"
    write_audio(path, wav)
    return {"id": rec, "audio_filepath": str(path), "duration": round(len(wav) / SAMPLE_RATE, 4)}, placed
