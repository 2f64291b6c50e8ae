"""Speaker clusters for Pseudo2Real-SC (Lin et al. 2025, sec. 3.3).

Speakers of source and target are embedded, k-means groups them into ``k``
clusters over both domains together, and each cluster gets its own correction
vector tau_k built from its *source* utterances. This module does the
embedding and the clustering; which tau a cluster uses is the pipeline's job.

Extractors are small strategy classes with one method,
``embed(wav) -> (D,) float32``. :class:`MelStatsExtractor` is the baseline
(mean and standard deviation of an 80-bin log-mel, the "trivial extractor"
measured at 16.2% EER on speechocean762 in ../shared/notes); the
self-supervised ECAPA-TDNN of the speaker-verification issue plugs in the same
way once it exists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from selfspeech.audio.io import load_item


class SpeakerEmbedder(Protocol):
    name: str

    def embed(self, wav: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class MelStatsExtractor:
    """Per-utterance mean and std of an 80-bin log-mel (Whisper's front-end): (160,)."""

    n_mels: int = 80
    name: str = "melstats"

    def embed(self, wav: np.ndarray) -> np.ndarray:
        from selfspeech.audio.features import log_mel

        m = log_mel(wav, self.n_mels)  # (n_mels, frames)
        return np.concatenate([m.mean(1), m.std(1)]).astype(np.float32)


def iter_embeddings(items: Iterable[dict], extractor: SpeakerEmbedder, progress: bool = False,
                    skipped: list[dict] | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """(item, embedding) for each utterance, one utterance in memory at a time.

    An unreadable utterance, a non-finite embedding or a repeated id raises,
    naming the utterance; with a ``skipped`` list it is appended there
    ({id, reason}) instead.
    """
    from tqdm import tqdm

    seen: set = set()
    total = len(items) if hasattr(items, "__len__") else None  # a generator streams: nothing is listed
    for it in tqdm(items, total=total, desc="embed", unit="utt", disable=not progress):
        if it["id"] in seen:
            if skipped is None:
                raise ValueError(f"utterance {it['id']!r} appears twice in the manifest")
            skipped.append({"id": it["id"], "reason": "duplicate id: the first line's embedding is kept"})
            continue
        try:
            e = extractor.embed(load_item(it))
            if not np.isfinite(e).all():
                raise ValueError("non-finite embedding (NaN/inf in the audio?)")
        except Exception as err:  # noqa: BLE001 - every failure is reported with its utterance
            if skipped is None:
                raise ValueError(f"utterance {it.get('id')!r} ({it.get('audio_filepath')}): {err}") from err
            skipped.append({"id": it.get("id"), "reason": str(err)})
            continue
        seen.add(it["id"])
        yield it, e


def embed_manifest(items: Iterable[dict], extractor: SpeakerEmbedder, progress: bool = False,
                   skipped: list[dict] | None = None) -> dict[str, np.ndarray]:
    """utterance id -> embedding (see :func:`iter_embeddings` for the error policy)."""
    return {it["id"]: e for it, e in iter_embeddings(items, extractor, progress, skipped)}


class EmbeddingWriter:
    """Streams ``(id, embedding)`` rows into the ``.npz`` :func:`save_embeddings` writes.

    Rows go to a temp file as they come (memory: the ids only); ``close()``
    copies them in chunks into the archive's ``emb.npy`` and renames the
    archive into place, so 50k utterances cost what 1k do, and a killed run
    never leaves a half-written file under the final name.
    """

    def __init__(self, path: str | Path):
        import tempfile

        from selfspeech.data.atomic import drop_stale, temp_prefix

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_stale(self.path)
        fd, self._rows_path = tempfile.mkstemp(prefix=temp_prefix(self.path), suffix=".rows", dir=self.path.parent)
        self._rows = open(fd, "wb")
        self.ids: list[str] = []
        self.dim: int | None = None

    def add(self, uid: str, e: np.ndarray) -> None:
        e = np.asarray(e, dtype="<f4").ravel()
        if self.dim is None:
            self.dim = e.shape[0]
        elif e.shape[0] != self.dim:
            raise ValueError(f"utterance {uid!r}: embedding of size {e.shape[0]}, the others have {self.dim}")
        self._rows.write(e.tobytes())
        self.ids.append(str(uid))

    def close(self) -> Path:
        import os
        import zipfile

        from selfspeech.data.atomic import temp_prefix

        self._rows.close()
        tmp = self.path.with_name(temp_prefix(self.path) + "npz")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                with z.open("ids.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.array(self.ids, dtype=str), allow_pickle=False)
                with z.open("emb.npy", "w", force_zip64=True) as f:
                    shape = (len(self.ids), self.dim or 0)
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
                    with open(self._rows_path, "rb") as rows:
                        while chunk := rows.read(1 << 20):
                            f.write(chunk)
            os.replace(tmp, self.path)
        finally:
            Path(self._rows_path).unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        return self.path


def speaker_means(items: Iterable[dict], utt_emb: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """speaker -> mean of its L2-normalised utterance embeddings."""
    acc: dict[str, list[np.ndarray]] = {}
    for it in items:
        e = utt_emb[it["id"]]
        acc.setdefault(str(it["speaker"]), []).append(e / (np.linalg.norm(e) + 1e-8))
    return {s: np.mean(v, 0) for s, v in acc.items()}


@dataclass(frozen=True)
class ClusterResult:
    labels: dict[str, int]       # key (speaker or utterance id) -> cluster
    centroids: np.ndarray        # (k, D) in the standardised space
    sizes: dict[int, int]
    merged: int                  # clusters dissolved for being below min_size


def kmeans_clusters(emb: dict[str, np.ndarray], k: int, seed: int = 0, min_size: int = 1,
                    must_cover: Iterable[set[str]] = ()) -> ClusterResult:
    """k-means (scikit-learn, k-means++, 10 inits) over standardised embeddings.

    Guard against tiny clusters: a cluster with fewer than ``min_size``
    members, or lacking a member of any set in ``must_cover`` (e.g. the source
    speakers, which tau_k needs), is dissolved and its members go to the
    nearest surviving centroid; repeated until every cluster qualifies.
    Raises ValueError when ``k`` exceeds the number of items.
    """
    from sklearn.cluster import KMeans

    keys = sorted(emb)
    if k < 1 or k > len(keys):
        raise ValueError(f"k={k} clusters requested for {len(keys)} items; choose 1 <= k <= {len(keys)}")
    x = np.stack([emb[key] for key in keys]).astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    centroids, labels = km.cluster_centers_, km.labels_.copy()
    cover = [set(c) for c in must_cover]
    alive = np.ones(k, bool)
    merged = 0
    while True:
        bad = [c for c in range(k) if alive[c] and (
            (labels == c).sum() < min_size or any(not ({keys[i] for i in np.flatnonzero(labels == c)} & s) for s in cover))]
        if not bad or alive.sum() <= 1:
            break
        c = min(bad, key=lambda c: (labels == c).sum())  # dissolve the smallest offender first
        alive[c] = False
        merged += 1
        idx = np.flatnonzero(labels == c)
        d = ((x[idx, None, :] - centroids[None, alive, :]) ** 2).sum(-1)
        labels[idx] = np.flatnonzero(alive)[d.argmin(1)]
    remap = {old: new for new, old in enumerate(np.flatnonzero(alive))}
    labels = np.array([remap[c] for c in labels])
    sizes = {c: int((labels == c).sum()) for c in range(len(remap))}
    return ClusterResult({key: int(c) for key, c in zip(keys, labels)}, centroids[alive], sizes, merged)


def random_clusters(keys: Iterable[str], sizes: dict[int, int], seed: int = 0) -> dict[str, int]:
    """The control of Pseudo2Real-SC: same cluster sizes, members drawn at random."""
    keys = sorted(keys)
    labels = np.concatenate([np.full(n, c) for c, n in sorted(sizes.items())])
    if len(labels) != len(keys):
        raise ValueError(f"sizes sum to {len(labels)} but there are {len(keys)} items")
    np.random.default_rng(seed).shuffle(labels)
    return {key: int(c) for key, c in zip(keys, labels)}


def save_embeddings(path: str | Path, emb: dict[str, np.ndarray]) -> Path:
    """``{id: (D,)}`` -> ``.npz`` with ``ids`` (unicode) and ``emb`` (N, D) float32; no pickle, atomic."""
    import io

    from selfspeech.data.atomic import atomic_write

    buf = io.BytesIO()
    np.savez(buf, ids=np.array(list(emb), dtype=str),
             emb=np.stack([np.asarray(v, np.float32) for v in emb.values()]) if emb else np.zeros((0, 0), np.float32))
    with atomic_write(path) as f:
        f.buffer.write(buf.getvalue())
    return Path(path)


def load_embeddings(path: str | Path) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no embeddings file; write one with `selfspeech sv embed`")
    z = np.load(path, allow_pickle=False)
    if "ids" not in z or "emb" not in z:
        raise ValueError(f"{path}: expected arrays 'ids' and 'emb' (as `selfspeech sv embed` writes)")
    return dict(zip(z["ids"].tolist(), z["emb"]))
