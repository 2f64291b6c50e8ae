"""SSPS: self-supervised positive sampling (Lepage & Dehak, Interspeech 2025; sslsv's ``_SSPS``).

Two views cut from one utterance share its channel and session, so SimCLR and
DINO learn recording conditions as much as voices. SSPS swaps the positive for
a *pseudo-positive*: an embedding of another utterance that is probably the
same speaker, found by clustering.

State, all in module buffers so a checkpoint holds it and resume continues it:

- reference queue ``ref`` (N, D): per dataset index, the encoder embedding of
  an un-augmented longer segment (no gradient), L2-normalised;
- positive queue ``pos`` (V, Q, P) + ``pos_idx`` (Q,): the last Q positive
  embeddings (the tensors the loss compares, V per utterance, e.g. DINO's two
  global crops) with their dataset indices, written round-robin;
- ``assign`` (N,), ``centroids`` (K, D), ``neighbours`` (K, max(M, 1)): the
  k-means of the reference queue, recomputed at each epoch start once active.

Sampling (``kmeans-repr`` in sslsv): for an anchor of cluster c, draw a cluster
uniformly from ``neighbours[c]``, then a queue entry of that cluster from
another utterance. With M=0 the only neighbour is c itself; with M>=1 the M
nearest *other* clusters (by centroid cosine) are used and c is excluded: this
is the behaviour of the authors' code (``topk(M + 1)[1:]``), kept on purpose.
As sslsv does at its HEAD, the draw is among the cluster's members that are in
the positive queue (an earlier sslsv variant drew any member and gave up when it
was not queued; that path is commented out there); with no candidate the
standard positive is kept (fallback) and counted in ``coverage``. One difference:
we never pick the anchor's own queue entry (sslsv does not check; its queue
holds ~2% of VoxCeleb2, ours most of this corpus, so it matters here).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SSPSConfig:
    start: float = 0.5         # fraction of the training budget after which pseudo-positives are used
    k: int = 100               # k-means prototypes (K in the paper's sweep; scale to speakers x sessions)
    m: int = 0                 # 0: same cluster; >= 1: one of the M nearest other clusters (sslsv)
    queue: int = 4096          # positive-queue length Q' (entries, not utterances)
    ref_seconds: float = 4.0   # un-augmented reference segment fed to the encoder for clustering
    kmeans_iters: int = 10     # most k-means iterations per re-clustering of the reference queue
    # Diagnostic, NOT self-supervised: the clusters are the manifest's true speakers (k >= speakers),
    # so every pseudo-positive is another utterance of the anchor's speaker. It bounds what better
    # clustering could give SSPS on a corpus; never use it for a reported SSL system.
    oracle: bool = False

    def __post_init__(self):
        if not 0 <= self.start < 1:
            raise ValueError(f"ssps.start={self.start}: a fraction of the budget in [0, 1)")
        if self.k < 1 or self.m < 0 or self.queue < 1:
            raise ValueError(f"ssps: k ({self.k}) and queue ({self.queue}) must be >= 1, m ({self.m}) >= 0")
        if self.m >= self.k:
            raise ValueError(f"ssps.m={self.m} needs at least m + 1 clusters, k={self.k}")


class SSPSQueues(nn.Module):
    def __init__(self, cfg: SSPSConfig, n_items: int, ref_dim: int, pos_dim: int, n_views: int = 1):
        super().__init__()
        if cfg.k > n_items:
            raise ValueError(f"ssps.k={cfg.k} is larger than the reference queue ({n_items} utterances); "
                             "lower k")
        self.cfg = cfg
        self.register_buffer("ref", torch.zeros(n_items, ref_dim))
        self.register_buffer("ref_filled", torch.zeros(n_items, dtype=torch.bool))
        self.register_buffer("pos", torch.zeros(n_views, cfg.queue, pos_dim))
        self.register_buffer("pos_idx", torch.full((cfg.queue,), -1, dtype=torch.long))
        self.register_buffer("pos_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("assign", torch.full((n_items,), -1, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(cfg.k, ref_dim))
        self.register_buffer("neighbours", torch.zeros(cfg.k, max(cfg.m, 1), dtype=torch.long))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))
        self.register_buffer("n_clusterings", torch.zeros((), dtype=torch.long))

    # ---------------------------------------------------------------- queues
    def push_ref(self, indices: torch.Tensor, emb: torch.Tensor) -> None:
        """indices: (B,) dataset indices; emb: (B, D) reference embeddings (stored normalised)."""
        self.ref[indices] = F.normalize(emb.detach().float(), dim=-1)
        self.ref_filled[indices] = True

    def push_pos(self, indices: torch.Tensor, views: list[torch.Tensor]) -> None:
        """Round-robin write of B entries: views is V tensors (B, P); wraps around the queue end.

        With B > Q only the last Q entries are written (they are the ones a sequential write
        leaves): a scatter with repeated rows has no defined winner on a GPU."""
        Q, B = self.cfg.queue, len(indices)
        first = max(0, B - Q)
        rows = (self.pos_ptr + torch.arange(first, B, device=self.pos_ptr.device)) % Q
        self.pos_idx[rows] = indices[first:].to(self.pos_idx.device)
        for v, z in enumerate(views):
            self.pos[v, rows] = z[first:].detach().float()
        self.pos_ptr.copy_((self.pos_ptr + B) % Q)

    # ---------------------------------------------------------------- clustering
    def cluster(self, seed: int = 0, speaker_of: torch.Tensor | None = None) -> dict:
        """k-means (scikit-learn, k-means++) over the filled reference queue; returns statistics.

        Fewer filled entries than K: no clustering (counted as ``skipped``), the
        previous assignment stays. With ``cfg.oracle`` the clusters are
        ``speaker_of`` (N,) (the manifest's speakers) instead of k-means.
        """
        filled = self.ref_filled.nonzero().squeeze(1)
        if self.cfg.oracle:
            labels, centroids = self._speaker_clusters(filled, speaker_of)
        elif len(filled) < self.cfg.k:
            return {"skipped": 1, "filled": int(len(filled))}
        else:
            from sklearn.cluster import KMeans

            x = self.ref[filled].cpu().numpy().astype(np.float64)
            km = KMeans(self.cfg.k, n_init=1, max_iter=self.cfg.kmeans_iters, random_state=seed).fit(x)
            labels, centroids = km.labels_.astype(np.int64), torch.from_numpy(km.cluster_centers_).float()
        self.assign.fill_(-1)
        self.assign[filled] = torch.from_numpy(labels).to(self.assign.device)
        self.centroids.copy_(F.normalize(centroids, dim=-1))
        sim = self.centroids @ self.centroids.T
        order = sim.argsort(dim=1, descending=True)
        own = torch.arange(self.cfg.k, device=order.device)[:, None]
        if self.cfg.m == 0:
            self.neighbours.copy_(own)
        else:
            # drop each cluster itself (its own row's most similar entry) -> M nearest other clusters
            others = order[order != own].view(self.cfg.k, self.cfg.k - 1)
            self.neighbours.copy_(others[:, : self.cfg.m])
        self.n_clusterings += 1
        sizes = np.bincount(labels, minlength=self.cfg.k)
        return {"skipped": 0, "filled": int(len(filled)), "empty_clusters": int((sizes == 0).sum()),
                "largest_cluster": int(sizes.max())}

    def _speaker_clusters(self, filled: torch.Tensor, speaker_of: torch.Tensor | None):
        """Oracle clusters: (labels (F,) int64 numpy, centroids (K, D) on the CPU) from the true speakers of
        ``filled``; the centroid sums run on the CPU, in a fixed order (CUDA's index_add_ is not deterministic)."""
        if speaker_of is None:
            raise ValueError("ssps.oracle clusters by the manifest's speakers, but its utterances have no "
                             "'speaker' field; add speakers or drop ssps.oracle")
        spk, labels = torch.unique(speaker_of[filled.to(speaker_of.device)].cpu(), return_inverse=True)
        if len(spk) > self.cfg.k:
            raise ValueError(f"ssps.oracle: {len(spk)} speakers in the reference queue but k={self.cfg.k}; "
                             f"set ssps.k >= {len(spk)}")
        centroids = torch.zeros(self.cfg.k, self.ref.shape[1]).index_add_(0, labels, self.ref[filled].cpu())
        return labels.numpy().astype(np.int64), centroids

    # ---------------------------------------------------------------- sampling
    def sample(self, indices: torch.Tensor, gen: torch.Generator,
               speaker_of: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Queue rows of pseudo-positives for the anchors ``indices`` (B,), -1 where none (fallback).

        ``speaker_of`` (N,) true speaker ids, for monitoring only: the share of
        pseudo-positives that are really the anchor's speaker. ``gen`` is a CPU
        generator: the per-anchor draws run on CPU copies of the small index
        tensors (no device round trip per anchor); the rows are returned on the
        queues' device.
        """
        dev = self.pos_idx.device
        rows = torch.full((len(indices),), -1, dtype=torch.long)
        valid = self.pos_idx >= 0
        q_idx = self.pos_idx.clamp(min=0)
        q_cluster = torch.where(valid, self.assign[q_idx], torch.full_like(q_idx, -1)).cpu()
        pos_idx, neighbours = self.pos_idx.cpu(), self.neighbours.cpu()
        anchor_cluster = self.assign[indices.to(dev)].tolist()
        for b, idx in enumerate(indices.tolist()):
            c = anchor_cluster[b]
            if c < 0:
                continue
            nb = neighbours[c]
            chosen = int(nb[torch.randint(len(nb), (1,), generator=gen)])
            cand = ((q_cluster == chosen) & (pos_idx != idx)).nonzero().squeeze(1)
            if len(cand):
                rows[b] = cand[torch.randint(len(cand), (1,), generator=gen)]
        rows = rows.to(dev)
        got = rows >= 0
        stats = {"ssps_coverage": round(float(got.float().mean()), 4)}
        if speaker_of is not None and got.any():
            spk = speaker_of.to(dev)
            same = spk[self.pos_idx[rows[got]]] == spk[indices.to(dev)[got]]
            stats["ssps_speaker_acc"] = round(float(same.float().mean()), 4)
        return rows, stats

    def apply(self, view: int, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Replace the positives of the sampled anchors: (B, P) -> (B, P), queue entries carry no gradient.

        Under autocast ``z`` is half precision while the queue is fp32: the result takes the wider
        type, so a pseudo-positive is not rounded again (the losses divide its cosine by a
        temperature of a few hundredths)."""
        got = rows >= 0
        if not got.any():
            return z
        out = z.to(torch.promote_types(z.dtype, self.pos.dtype), copy=True)
        out[got] = self.pos[view, rows[got]].to(out.dtype)
        return out
