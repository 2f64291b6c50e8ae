"""SimCLR and DINO speaker-SSL tasks, optionally with SSPS pseudo-positives, as one module.

- SimCLR (Chen et al. 2020): NT-Xent between two augmented segments of each
  utterance, on a projector head or on the embedding itself;
- DINO (Caron et al. 2021): a student matches an EMA teacher's centred,
  sharpened prototype distribution across global and local crops;
- SSPS (Lepage & Dehak, Interspeech 2025): from ``ssps.start`` of the budget on,
  an anchor's positive is a queued embedding of another utterance of its k-means
  cluster (re-clustered every epoch on clean reference embeddings), so it comes
  from another recording, not only from another augmentation.

The terms are in :mod:`.speaker` and :mod:`.ssps`. ``cfg`` is the speaker-SSL
config (``method``, the head and temperature fields, ``ecapa_config()``,
``ssps_config()``). Data parallel: ``gather`` concatenates a tensor over all
processes (identity for one process), so the DINO centre and the SSPS queues
see the global batch; after a re-clustering (``after_update`` returns its
statistics) the trainer broadcasts ``ssps`` from rank 0.

Batch: ``views`` list of (B, N) float32 waveform views (SimCLR 2; DINO 2 global
+ ``n_local`` local) with ``view_lengths`` list of (B,) int64 sample counts,
``indices`` (B,) int64 dataset indices, ``gen`` a generator for SSPS sampling,
optional ``ref`` (B, N) clean reference segments (+ ``ref_lengths``) for the
SSPS reference queue. The task turns waveforms into log-mel features
(:func:`~selfspeech.audio.features.log_mel_torch`) on their device; views given
as (B, T, n_mels) features are used as they are.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from selfspeech.audio.features import log_mel_torch
from selfspeech.models.ecapa import ECAPATDNN
from selfspeech.objectives.speaker import (DINOHead, Projector, cosine_momentum, dino_loss, ema_update,
                                           nt_xent, prototype_entropy, update_center)
from selfspeech.objectives.ssps import SSPSQueues


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class SpeakerSSLTask(nn.Module):
    """Encoder + head (+ EMA teacher, centre) (+ SSPS queues); ``forward(batch) -> (loss, record)``."""

    def __init__(self, cfg, n_items: int, speaker_of: torch.Tensor | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.gather = gather or _identity
        self.cfg, self.ecfg = cfg, cfg.ecapa_config()
        self.encoder = ECAPATDNN(self.ecfg)
        E = self.ecfg.embed_dim
        if cfg.method == "simclr":
            self.head = Projector(E, *cfg.projector) if cfg.projector else nn.Identity()
            pos_dim, n_views = (cfg.projector[1] if cfg.projector else E), 1
        else:
            self.head = DINOHead(E, cfg.dino_hidden, cfg.dino_bottleneck, cfg.dino_out)
            self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
            self.register_buffer("center", torch.zeros(cfg.dino_out))
            pos_dim, n_views = cfg.dino_out, 2
        scfg = cfg.ssps_config()
        self.ssps = SSPSQueues(scfg, n_items, E, pos_dim, n_views) if scfg else None
        self.register_buffer("progress", torch.zeros(()))
        self.register_buffer("fill_ref", torch.zeros((), dtype=torch.bool))
        self.register_buffer("activated_at", torch.full((), -1, dtype=torch.long))
        if scfg is not None and scfg.oracle and speaker_of is None:
            raise ValueError("ssps.oracle clusters by true speakers: the manifest has no 'speaker' field")
        # (N,) true speaker ids: monitoring only, never in the loss (except the ssps.oracle diagnostic).
        # A buffer so it moves with the module to the training device; not persistent: checkpoints
        # and exported weights hold no manifest data
        self.register_buffer("speaker_of", speaker_of, persistent=False)

    def export_encoder(self) -> ECAPATDNN:
        return self.teacher_encoder if self.cfg.method == "dino" else self.encoder

    def features(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) waveforms (+ (B,) int64 sample lengths) -> (B, T, n_mels) log-mel on their device;
        (B, T, n_mels) features pass through. Views are equal-length crops, so the encoder
        needs no frame lengths."""
        if x.dim() == 3:
            return x
        return log_mel_torch(x, lengths, self.ecfg.n_mels)[0]

    def forward(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cfg, idx = self.cfg, batch["indices"]
        lengths = batch.get("view_lengths") or [None] * len(batch["views"])
        views = [self.features(v, n) for v, n in zip(batch["views"], lengths)]
        rec: dict = {}
        rows = None
        if self.ssps is not None and bool(self.ssps.active):
            rows, rec = self.ssps.sample(idx, gen, self.speaker_of)
        if cfg.method == "simclr":
            z = self.head(self.encoder(torch.cat(views)))
            z1, z2 = z.chunk(2)
            if rows is not None:
                z2p = self.ssps.apply(0, z2, rows)
                loss, acc = nt_xent(z1, z2p, cfg.temperature)
            else:
                loss, acc = nt_xent(z1, z2, cfg.temperature)
            pos = [z2]
            rec["acc"] = round(float(acc), 4)
        else:
            B = len(idx)
            glob = self.head(self.encoder(torch.cat(views[:2])))
            student = list(glob.chunk(2))
            if len(views) > 2:
                student += list(self.head(self.encoder(torch.cat(views[2:]))).split(B))
            with torch.no_grad():
                teacher = list(self.teacher_head(self.teacher_encoder(torch.cat(views[:2]))).chunk(2))
            pos = teacher
            targets = teacher if rows is None else [self.ssps.apply(i, t, rows) for i, t in enumerate(teacher)]
            loss = dino_loss(student, targets, self.center, cfg.t_student, cfg.t_teacher)
            mean_h, sample_h = prototype_entropy(teacher, self.center, cfg.t_teacher)
            rec.update(teacher_entropy=round(mean_h, 4), teacher_sample_entropy=round(sample_h, 4))
            with torch.no_grad():  # the centre follows the global batch (all ranks) in data parallel
                update_center(self.center, [self.gather(torch.cat(teacher))], cfg.center_momentum)
        if self.ssps is not None:
            with torch.no_grad():  # queues hold every rank's entries: identical on all ranks
                all_idx = self.gather(idx)
                self.ssps.push_pos(all_idx, [self.gather(z) for z in pos])
                if bool(self.fill_ref) and batch.get("ref") is not None:
                    self.encoder.eval()  # clean reference embeddings, BN in inference mode
                    ref = self.features(batch["ref"], batch.get("ref_lengths"))
                    self.ssps.push_ref(all_idx, self.gather(self.encoder(ref)))
                    self.encoder.train()
        return loss, rec

    def loss(self, batch: dict, step: int = 0) -> tuple[torch.Tensor, dict]:
        """The training loop's ``loss_fn``: the batch's own generator draws the SSPS positives."""
        return self(batch, batch["gen"])

    def after_update(self, step: int, progress: float, steps_per_epoch: int, seed: int) -> dict | None:
        """After each optimizer step: teacher EMA, SSPS activation and per-epoch re-clustering.

        Returns the clustering's statistics when it re-clustered (logged with this step: the
        clusters are in this step's checkpoint, so a resumed run must not expect them later)."""
        self.progress.fill_(progress)
        if self.cfg.method == "dino":
            m = cosine_momentum(progress, self.cfg.momentum)
            ema_update(self.teacher_encoder, self.encoder, m)
            ema_update(self.teacher_head, self.head, m)
        if self.ssps is None:
            return
        # start refreshing the reference queue about one epoch (+20%) before SSPS switches on
        per_step = progress / max(step, 1)
        if progress + 1.2 * steps_per_epoch * per_step >= self.ssps.cfg.start:
            self.fill_ref.fill_(True)
        if progress >= self.ssps.cfg.start and not bool(self.ssps.active):
            self.ssps.active.fill_(True)
            self.activated_at.fill_(step)
        if bool(self.ssps.active) and (step - int(self.activated_at)) % steps_per_epoch == 0:
            stats = self.ssps.cluster(seed + step, self.speaker_of)  # then the trainer broadcasts rank 0's
            return {f"kmeans_{k}": v for k, v in stats.items()}
        return None
