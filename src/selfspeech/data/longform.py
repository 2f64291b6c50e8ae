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
    max_seconds: float = 300.0        # ... and stays under this plus one pause (the rest starts a new one)
    pause_seconds: tuple[float, float] = (0.3, 1.5)   # uniform pause between utterances
    snr_db: float | None = None       # white noise over the whole recording at this SNR (speech power)
    # True: one speaker per recording; False: speakers follow one another (a classroom, a meeting),
    # which makes long recordings from speakers with little speech each
    per_speaker: bool = True
    seed: int = 0


def _noise(wav: np.ndarray, speech: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    p = float(np.mean(speech ** 2)) if len(speech) else 1e-4
    return wav + rng.standard_normal(len(wav)).astype(np.float32) * np.sqrt(p / 10 ** (snr_db / 10))


def _plan(utts: list[dict], cfg: LongFormConfig, rng: random.Random) -> list[list[tuple[dict, np.ndarray, int]]]:
    """The recordings of one group as lists of (item, samples, pause after it in samples).

    A recording closes once its real length (speech and the pauses drawn) reaches
    ``min_seconds``, or before the next utterance would pass ``max_seconds``. A
    short remainder joins the recording before it when both fit in ``max_seconds``."""
    recs: list[list[tuple[dict, np.ndarray, int]]] = []
    cur: list[tuple[dict, np.ndarray, int]] = []
    for it in utts:
        wav = load_item(it)
        gap = int(rng.uniform(*cfg.pause_seconds) * SAMPLE_RATE)
        length = sum(len(w) + g for _, w, g in cur) / SAMPLE_RATE
        if cur and (length >= cfg.min_seconds or length + (len(wav) + gap) / SAMPLE_RATE > cfg.max_seconds):
            recs.append(cur)
            cur = []
        cur.append((it, wav, gap))
    if cur:
        recs.append(cur)

    def seconds(r):
        return sum(len(w) + g for _, w, g in r) / SAMPLE_RATE

    if len(recs) > 1 and seconds(recs[-1]) < cfg.min_seconds and seconds(recs[-2]) + seconds(recs[-1]) <= cfg.max_seconds:
        last = recs.pop()
        recs[-1] += last
    return recs


def join_recordings(items: list[dict], out_dir: str | Path, cfg: LongFormConfig = LongFormConfig()
                    ) -> tuple[Path, Path]:
    """Join each speaker's ``items`` into long recordings; returns (recordings manifest, reference manifest).

    A speaker's utterances are shuffled (seeded) and laid end to end with
    pauses, speaker after speaker unless ``per_speaker`` (:func:`_plan`). The
    last recording of a speaker (``per_speaker``) or of all (otherwise) may stay
    shorter than ``min_seconds``: all speech is kept."""
    out = Path(out_dir).resolve()  # the manifests name absolute paths: they are read from anywhere
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
    for name, utts in groups.items():
        for n, pieces in enumerate(_plan(utts, cfg, rng)):
            line, placed = _write(out, f"{name}_rec{n:03d}", pieces, cfg, rng, nrng)
            recordings.append(line)
            refs += placed
    # the recordings manifest is what a user's folder gives: audio only
    write_manifest(out / "recordings.jsonl", recordings)
    write_manifest(out / "reference.jsonl", refs)
    return out / "recordings.jsonl", out / "reference.jsonl"


def _write(out: Path, rec: str, pieces: list[tuple[dict, np.ndarray, int]], cfg: LongFormConfig,
           rng: random.Random, nrng: np.random.Generator) -> tuple[dict, list[dict]]:
    chunks, placed = [], []
    lead = int(rng.uniform(*cfg.pause_seconds) * SAMPLE_RATE)
    chunks.append(np.zeros(lead, np.float32))
    t = lead
    for it, wav, gap in pieces:
        placed.append({"id": it["id"], "recording": rec, "audio_filepath": str(out / "audio" / f"{rec}.flac"),
                       "offset": round(t / SAMPLE_RATE, 7), "duration": round(len(wav) / SAMPLE_RATE, 7),
                       "text": it.get("text", ""), "speaker": it.get("speaker")})
        chunks += [wav.astype(np.float32), np.zeros(gap, np.float32)]
        t += len(wav) + gap
    wav = np.concatenate(chunks)
    if cfg.snr_db is not None:
        wav = _noise(wav, np.concatenate([w for _, w, _ in pieces]), cfg.snr_db, nrng)
    peak = float(np.max(np.abs(wav))) if len(wav) else 0.0
    if peak > 0.99:  # noise can clip: scale the whole recording (and so the references' audio) together
        wav = wav * (0.99 / peak)
    path = out / "audio" / f"{rec}.flac"
    write_audio(path, wav)
    return {"id": rec, "audio_filepath": str(path), "duration": round(len(wav) / SAMPLE_RATE, 4)}, placed
