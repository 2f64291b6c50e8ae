import numpy as np
import pytest
import soundfile as sf

from conftest import tone
from selfspeech.cluster.speakers import (
    MelStatsExtractor, embed_manifest, kmeans_clusters, random_clusters, speaker_means,
)


def blobs(n_per=6, centers=((0, 0), (10, 0), (0, 10)), seed=0):
    rng = np.random.default_rng(seed)
    return {f"{c}_{i}": np.array(ctr, float) + rng.standard_normal(2) * 0.3
            for c, ctr in enumerate(centers) for i in range(n_per)}


def test_kmeans_recovers_blobs_and_is_seeded():
    emb = blobs()
    r = kmeans_clusters(emb, 3, seed=0)
    for c in range(3):
        assert len({r.labels[f"{c}_{i}"] for i in range(6)}) == 1
    assert sorted(r.sizes.values()) == [6, 6, 6] and r.merged == 0
    assert kmeans_clusters(emb, 3, seed=0).labels == r.labels


def test_tiny_clusters_are_merged_and_coverage_enforced():
    emb = blobs(centers=((0, 0), (10, 0)))
    emb["outlier"] = np.array([100.0, 100.0])
    r = kmeans_clusters(emb, 3, seed=0, min_size=2)
    assert r.merged == 1 and len(r.sizes) == 2 and sum(r.sizes.values()) == 13
    source = {f"0_{i}" for i in range(6)}  # only blob 0 has source speakers
    r2 = kmeans_clusters(blobs(centers=((0, 0), (10, 0))), 2, seed=0, must_cover=[source])
    assert len(r2.sizes) == 1
    with pytest.raises(ValueError, match="k=40"):
        kmeans_clusters(emb, 40)


def test_random_control_keeps_sizes():
    r = kmeans_clusters(blobs(), 3)
    rnd = random_clusters(r.labels, r.sizes, seed=1)
    assert sorted(np.bincount(list(rnd.values()))) == sorted(r.sizes.values())
    assert rnd != r.labels


def test_melstats_embeddings_separate_voices(tmp_path):
    items = []
    for s, f0 in enumerate((120.0, 600.0)):
        for u in range(3):
            p = tmp_path / f"{s}_{u}.flac"
            sf.write(p, tone(1.0, freq=f0 * (1 + 0.02 * u), seed=u), 16000)
            items.append({"id": f"{s}_{u}", "audio_filepath": str(p), "speaker": f"spk{s}"})
    emb = embed_manifest(items, MelStatsExtractor())
    assert emb["0_0"].shape == (160,) and emb["0_0"].dtype == np.float32
    spk = speaker_means(items, emb)
    r = kmeans_clusters(spk, 2)
    assert r.labels["spk0"] != r.labels["spk1"]
    utt = kmeans_clusters(emb, 2)  # per-utterance assignment covers every utterance
    assert set(utt.labels) == {it["id"] for it in items} and sum(utt.sizes.values()) == 6
