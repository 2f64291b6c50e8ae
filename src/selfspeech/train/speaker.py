"""Self-supervised speaker encoders: ECAPA-TDNN trained by SimCLR or DINO, optionally with SSPS.

``train_speaker(manifest, out_dir, cfg)`` trains the task of
:mod:`selfspeech.objectives.speaker_ssl` on augmented views through the shared
training loop (``train/loop.py``: AdamW, schedule, clipping, JSONL log,
resumable atomic checkpoints) and writes:

- ``out_dir/best``: the whole task (encoder, heads, DINO teacher and centre,
  SSPS queues) as safetensors + config;
- ``out_dir/encoder``: the speaker encoder alone (``SpeakerEncoder.load`` /
  ``selfspeech sv embed``). For DINO it is the EMA teacher, which DINO reports
  as the better network (Caron et al. 2021, sec. 5.1); SimCLR has only the one;
- ``out_dir/summary.json``: steps, time, utterances padded for being shorter
  than a segment, SSPS statistics.

No speaker label is used for training. When the manifest has speakers, the
share of SSPS pseudo-positives that are truly the anchor's speaker is logged
(monitoring, as in the SSPS paper's analysis).
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file

from selfspeech.config import checked, from_mapping, resolve_sub_config, sub_config, to_mapping, typed_fields
from selfspeech.data.audio_dataset import AudioDataset, Skipped, collate_arrays
from selfspeech.data.augment import AugmentConfig, Augmenter, load_or_build_rir_pool, random_segment
from selfspeech.data.manifest import read_manifest, unique_ids
from selfspeech.models.ecapa import ECAPAConfig, save_speaker_encoder
from selfspeech.models.ssl import save_encoder
from selfspeech.objectives.speaker_ssl import SpeakerSSLTask
from selfspeech.objectives.ssps import SSPSConfig
from selfspeech.train import distributed as D
from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.runs import SECTIONS, write_summary
from selfspeech.train.sampler import BucketBatchSampler

METHODS = ("simclr", "dino")


@dataclass(frozen=True)
class SpeakerSSLConfig:
    method: Literal["simclr", "dino"] = "simclr"  # simclr: NT-Xent on two views; dino: self-distillation
    ecapa: ECAPAConfig = sub_config(lambda: {"preset": "small"})  # as a mapping: ECAPAConfig keys or a preset
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: no augmentation
    ssps: SSPSConfig | None = None    # None: standard positives only
    segment_seconds: float = checked(2.0, gt=0)  # SimCLR views and DINO global crops (sslsv: 2 s)
    local_seconds: float = checked(1.0, gt=0)    # DINO local crops
    n_local: int = checked(4, ge=0)   # DINO: 2 global + 4 local crops
    batch_size: int = checked(64, ge=2)  # utterances per batch, each cut into its views or crops
    temperature: float = checked(0.03, gt=0)     # NT-Xent (sslsv's speaker SimCLR)
    # SimCLR head (hidden, output); None: NT-Xent on the embedding itself, as sslsv's SSPS configs
    # (``enable_projector: false``) train it, so the pseudo-positives pull on the verifier's embedding
    projector: tuple[int, ...] | None = checked((512, 256), ge=1)
    dino_out: int = checked(1024, ge=1)  # prototypes; DINO uses 65536 for ImageNet, scaled to ~100 speakers x 10
    dino_hidden: int = checked(512, ge=1)  # hidden width of the DINO head's MLP
    dino_bottleneck: int = checked(128, ge=1)  # L2-normalised bottleneck before the prototypes
    t_student: float = checked(0.1, gt=0)  # DINO student's softmax temperature
    t_teacher: float = checked(0.04, gt=0)  # DINO teacher's temperature (lower: sharper targets)
    momentum: float = checked(0.996, ge=0, le=1)  # teacher EMA, cosine to 1 over training
    center_momentum: float = checked(0.9, ge=0, le=1)  # EMA of the teacher-output centre (prevents collapse)
    rir_pool: str | None = None       # cache file for simulated room impulse responses (.npz)
    loop: LoopConfig = field(default_factory=LoopConfig)  # optimiser, schedule, budget, checkpoints, device

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {METHODS}")
        typed_fields(self)
        if self.projector is not None:
            object.__setattr__(self, "projector", tuple(self.projector))
        resolve_sub_config(self, "ecapa", ECAPAConfig)  # bad ECAPA keys are refused here, named ecapa.*

    def ecapa_config(self) -> ECAPAConfig:
        return self.ecapa

    def augment_config(self) -> AugmentConfig | None:
        return self.augment

    def ssps_config(self) -> SSPSConfig | None:
        return self.ssps

    def loop_config(self) -> LoopConfig:
        return self.loop

    def to_dict(self) -> dict:
        return to_mapping(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpeakerSSLConfig":
        return from_mapping(cls, d, "speaker-SSL config")


SECTIONS["speaker_ssl"] = lambda d: SpeakerSSLConfig.from_dict(d).to_dict()


class ViewCollator:
    """Dataset indices -> augmented views as waveform batches (the sampler picked the indices).

    Batch: ``views`` list of (B, N) float32 waveforms with ``view_lengths`` list of (B,) int64
    sample counts, ``indices``, ``gen``, with SSPS also ``ref`` (B, N) + ``ref_lengths``. The task
    computes the log-mel features on the device it runs on: the STFTs leave the data-loading CPU,
    the augmentation (numpy, soxr) stays here.
    """

    def __init__(self, data: AudioDataset, cfg: SpeakerSSLConfig, augmenter: Augmenter | None, with_ref: bool):
        self.data, self.cfg, self.aug, self.with_ref = data, cfg, augmenter, with_ref
        scfg = cfg.ssps_config()
        self.ref_seconds = scfg.ref_seconds if scfg else 0.0

    def view(self, wav: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
        seg = random_segment(wav, seconds, rng)
        return self.aug(seg, rng) if self.aug is not None else seg

    def __call__(self, idx: list[int], rng: random.Random) -> dict:
        g = np.random.default_rng(rng.getrandbits(63))
        wavs = [self.data.load(i) for i in idx]
        if self.cfg.method == "simclr":
            spec = [self.cfg.segment_seconds] * 2
        else:
            spec = [self.cfg.segment_seconds] * 2 + [self.cfg.local_seconds] * self.cfg.n_local
        views = [collate_arrays([self.view(w, s, g) for w in wavs]) for s in spec]
        out = {"views": [v["x"] for v in views], "view_lengths": [v["lengths"] for v in views],
               "indices": torch.tensor(idx, dtype=torch.long),
               "gen": torch.Generator().manual_seed(int(g.integers(2**62)))}
        if self.with_ref:  # un-augmented, one random window (SSPS reference queue)
            ref = collate_arrays([random_segment(w, self.ref_seconds, g) for w in wavs])
            out["ref"], out["ref_lengths"] = ref["x"], ref["lengths"]
        return out


def build_augmenter(cfg: SpeakerSSLConfig, data: AudioDataset, seed: int) -> Augmenter | None:
    acfg = cfg.augment_config()
    if acfg is None:
        return None
    rirs = None
    if acfg.p_reverb > 0:
        path = cfg.rir_pool or str(Path.home() / ".cache" / "selfspeech" / "rir_pool.npz")
        rirs = load_or_build_rir_pool(path, acfg.rir_pool, seed=seed, cfg=acfg)

    def babble_source(rng: np.random.Generator) -> np.ndarray:  # another training utterance
        return data.load(int(rng.integers(len(data))))

    return Augmenter(acfg, rirs, babble_source)


# what an SSPS continuation may change in the run it forks (everything else must match)
FORK_MAY_DIFFER = ("speaker_ssl.ssps", "speaker_ssl.loop.keep_every")


def train_speaker(manifest: str | Path, out_dir: str | Path, cfg: SpeakerSSLConfig = SpeakerSSLConfig(),
                  progress: bool = True, fork_from: str | Path | None = None) -> dict:
    """Train (or resume) in ``out_dir``; ``fork_from``: a checkpoint of the same run without SSPS to
    continue from (:func:`selfspeech.train.runs.fork_checkpoint`), used only when ``out_dir`` has no
    checkpoint yet: weights, optimizer, sampler position, RNG and log are the base's, the SSPS
    queues start empty, and everything but ``FORK_MAY_DIFFER`` must match."""
    out = Path(out_dir)
    env = D.init_from_env(cfg.loop.device)  # torchrun: data parallel over its processes
    loop_cfg = cfg.loop_config()
    items, dup = unique_ids(read_manifest(manifest))
    if len(items) < 2:
        raise ValueError(f"{manifest}: {len(items)} utterance(s); contrastive training needs at least 2")
    if cfg.batch_size < 2 or cfg.batch_size > len(items):
        raise ValueError(f"batch_size={cfg.batch_size}: needs 2 <= batch_size <= {len(items)} utterances")
    data = AudioDataset(items, "wave")
    bad = data.screen(progress and env.main)  # bad audio: skipped and listed, not a crash mid-run
    bad += [Skipped(u, "duplicate id: only its first line is used") for u in dup]
    items = data.items
    if len(items) < max(2, cfg.batch_size):
        raise ValueError(f"{manifest}: {len(items)} usable utterance(s) after {len(bad)} with bad audio "
                         f"(first: {bad[:1]}); need at least batch_size={cfg.batch_size}")
    short = [it["id"] for it in items if float(it.get("duration") or 0.0) < cfg.segment_seconds]
    spk = [str(it.get("speaker", "")) for it in items]
    speaker_of = None
    if all(spk):
        codes = {s: i for i, s in enumerate(sorted(set(spk)))}
        speaker_of = torch.tensor([codes[s] for s in spk], dtype=torch.long)
    torch.manual_seed(loop_cfg.seed)  # the same initial weights on every (re)start
    task = SpeakerSSLTask(cfg, len(items), speaker_of, gather=D.gather_cat)
    # equal-length views: batches of batch_size utterances, every epoch reshuffled
    sampler = BucketBatchSampler([1.0] * len(items), batch_size=cfg.batch_size, seed=loop_cfg.seed, num_buckets=1,
                                 drop_last=True)
    sampler = D.shard(sampler)
    steps_per_epoch = len(sampler)  # this rank's batches an epoch (equal-size batches: the same every epoch)
    collate = ViewCollator(data, cfg, build_augmenter(cfg, data, loop_cfg.seed), with_ref=cfg.ssps is not None)

    def write_model(d: Path) -> None:
        save_encoder(task, task.ecfg, d, kind=f"speaker_ssl_task:{cfg.method}", extra={"speaker_ssl": cfg.to_dict()})

    def after_update(step: int, progress: float) -> dict | None:
        stats = task.after_update(step, progress, steps_per_epoch, loop_cfg.seed)
        if stats is not None:  # it re-clustered: rank 0's clustering everywhere
            D.broadcast_module(task.ssps)
        return stats

    run_config = {"speaker_ssl": cfg.to_dict(), "manifest": str(manifest), "n_items": len(items)}
    def load_model(d: Path) -> None:  # a fork's base has no SSPS queues yet: they start empty
        missing, unexpected = task.load_state_dict(load_file(str(d / "model.safetensors")), strict=False)
        if unexpected or any(not k.startswith("ssps.") for k in missing):
            raise ValueError(f"cannot start from {d}: weights do not fit this task (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")

    # the SSPS paper switches pseudo-positives on in a SimCLR/DINO run that has trained for a while
    # (sslsv: start_epoch); forking a kept checkpoint gives both runs the same first steps bit for bit
    state = train_loop(task, task.loss, sampler, collate, loop_cfg, out, write_model, run_config,
                       progress=progress, desc=f"sv {cfg.method}{'+ssps' if cfg.ssps is not None else ''}",
                       after_update=after_update, load_model=load_model, fork_from=fork_from,
                       fork_may_differ=FORK_MAY_DIFFER)
    from selfspeech.train.checkpoint import write_dir

    if not env.main:
        return {}
    write_dir(out / "encoder", lambda d: save_speaker_encoder(
        task.export_encoder(), d, extra={"method": cfg.method, "ssps": to_mapping(cfg.ssps), "steps": state["step"]}))
    summary = {"method": cfg.method, "ssps": to_mapping(cfg.ssps), "steps": state["step"],
               "train_seconds": round(state["seconds"], 1), "n_train": len(items),
               "padded_short": {"count": len(short), "first": short[:5], "policy": "wrap-pad to the segment"},
               "skipped": [dataclasses.asdict(s) for s in bad],
               "ssps_clusterings": int(task.ssps.n_clusterings) if task.ssps is not None else 0,
               "params": sum(p.numel() for p in task.encoder.parameters())}
    write_summary(out, summary)
    return summary
