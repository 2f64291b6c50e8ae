"""Pseudo2Real-SC: one correction vector per speaker cluster (Lin et al. 2025, sec. 3.3).

Speakers (or utterances) of source-train and of the target are embedded and
clustered together; tau_c = FT(theta0, source real in c) - FT(theta0, source
pseudo in c); a target-eval utterance in cluster c is decoded by
theta_tp + lambda * tau_c. The control keeps every cluster's numbers of source
and of target members but draws the members at random.

Stages: ``sc_embed`` -> ``sc_clusters`` -> per clustering and cluster c:
``ft_sc_<kind>_c<c>_real``, ``ft_sc_<kind>_c<c>_pseudo`` -> ``sc_<kind>_c<c>_tau``
(which frees the two models) -> ``decode_sc_<kind>_c<c>`` (theta_tp + lambda * tau_c
built for the decode and not kept).
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from selfspeech.adapt import prepare as P
from selfspeech.adapt.stages import Stage, StageRunner
from selfspeech.adapt.student import Output, Student, corrected_decode_stage, finetune_stage, produce, tau_stage
from selfspeech.cluster.extractors import extractor_fingerprint, get_extractor
from selfspeech.cluster.speakers import (embed_manifest, kmeans_clusters, load_embeddings,
                                        random_clusters, save_embeddings, speaker_means)
from selfspeech.data.manifest import read_manifest, write_manifest


def _key(item: dict, level: str) -> str:
    return str(item["speaker"]) if level == "speaker" else item["id"]


_MEMBERS = ("source_train", "target_adapt", "target_eval")  # the parts embedded and clustered together


def run_sc(S: StageRunner, st: Student, parts: dict, ps: dict, theta_tp: Output, lam: float,
           scope: str, decoded: str = "target_eval") -> tuple[dict[str, str], dict]:
    """Pseudo2Real-SC (and its random-cluster control): a hypothesis file per system, and the clusters.

    ``decoded``: the target part whose utterances are decoded (target_adapt for an unlabelled target)."""
    spec, seed = st.recipe.clusters, st.recipe.data.seed
    items = {n: list(read_manifest(parts[n])) for n in _MEMBERS}
    every = [it for n in _MEMBERS for it in items[n]]
    emb_path = S(Stage("sc_embed", partial(_embed, spec.extractor, every, st.progress, st.recipe.device),
                       {"extractor": extractor_fingerprint(spec.extractor)}, ("data",)))
    utt_emb = load_embeddings(emb_path)
    vecs = speaker_means(every, utt_emb) if spec.level == "speaker" else utt_emb
    src_keys = {_key(it, spec.level) for it in items["source_train"]}
    cl = S(Stage("sc_clusters", partial(_cluster, vecs, src_keys, spec, seed),
                 {"k": spec.k, "level": spec.level, "min_size": spec.min_size, "seed": seed}, ("sc_embed",)))
    kinds = {"kmeans": "p2r_sc"} | ({"random": "p2r_sc_random"} if spec.random_control else {})
    hyps = {system: _decode_by_cluster(S, st, parts, ps, items, kind, cl, theta_tp, lam, scope, decoded)
            for kind, system in kinds.items()}
    info = {k: v for k, v in cl.items() if k not in ("kmeans", "random")}
    info["assignment"] = {"kmeans": cl["kmeans"], "random": cl["random"]}
    return hyps, info


def _embed(extractor: str, items: list[dict], progress: bool, device: str, d: Path) -> str:
    emb = embed_manifest(items, get_extractor(extractor, device), progress)
    return str(save_embeddings(d / "utt_emb.npz", emb))


def _cluster(vecs: dict, src_keys: set[str], spec, seed: int, d: Path) -> dict:
    """k-means over both domains; clusters with too few source members are merged; the random control."""
    tgt_keys = set(vecs) - src_keys
    km = kmeans_clusters(vecs, spec.k, seed, must_cover=[src_keys])
    small = [c for c in km.sizes if sum(km.labels[k] == c for k in src_keys) < spec.min_size]
    if small and len(km.sizes) > 1:  # too few source members for a trustworthy tau_c: merge
        km = kmeans_clusters(vecs, max(1, len(km.sizes) - len(small)), seed, must_cover=[src_keys])
    k = len(km.sizes)
    src_sizes = {c: sum(km.labels[x] == c for x in src_keys) for c in range(k)}
    tgt_sizes = {c: sum(km.labels[x] == c for x in tgt_keys) for c in range(k)}
    rnd = {**random_clusters(src_keys, src_sizes, seed + 7), **random_clusters(tgt_keys, tgt_sizes, seed + 8)}
    return {"kmeans": km.labels, "random": rnd, "k": k, "merged": km.merged,
            "source_sizes": src_sizes, "target_sizes": tgt_sizes}


def _decode_by_cluster(S: StageRunner, st: Student, parts: dict, ps: dict, items: dict, kind: str, cl: dict,
                       theta_tp: Output, lam: float, scope: str, decoded: str = "target_eval") -> str:
    """Each utterance of part ``decoded`` in cluster c decoded by theta_tp + lam * tau_c[scope]; one hypothesis
    file."""
    level = st.recipe.clusters.level
    labels = {k: int(v) for k, v in cl[kind].items()}
    parts_dir = S.root / f"sc_{kind}_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    paired = {i["id"] for i in read_manifest(ps["source_train_real"]["path"])}  # same audio in both runs of tau_c
    out_hyps: list[dict] = []
    for c in range(cl["k"]):
        keep = {it["id"] for it in items["source_train"] if labels[_key(it, level)] == c} & paired
        tau_c = _cluster_tau(S, st, parts, ps, f"sc_{kind}_c{c}", keep, parts_dir / f"c{c}")
        ev = [it for it in items[decoded] if labels[_key(it, level)] == c]
        if not ev:
            continue
        sub = parts_dir / f"c{c}_eval.jsonl"
        write_manifest(sub, ev)
        h = S(corrected_decode_stage(st, f"sc_{kind}_c{c}", theta_tp, tau_c, lam, scope, str(sub),
                                     inputs=("sc_clusters",)))
        out_hyps += [json.loads(line) for line in open(h, encoding="utf-8")]
    merged = S.root / f"sc_{kind}_hyp.jsonl"
    write_manifest(merged, out_hyps)
    return str(merged)


def _cluster_tau(S: StageRunner, st: Student, parts: dict, ps: dict, name: str, keep: set[str],
                 prefix: Path) -> Output:
    """tau_c = FT(theta0, source real in c) - FT(theta0, source pseudo in c); the two models are then freed."""
    real = P.subset(parts["source_train"], keep, Path(f"{prefix}_real.jsonl"))
    pseudo = P.subset(ps["source_train"]["path"], keep, Path(f"{prefix}_pseudo.jsonl"))
    # the subsets are rewritten at the same paths when the clusters change: the stages must
    # depend on the clustering, or a new extractor would reuse the old clusters' models
    after = ("pseudo", "sc_clusters")
    theta_r = produce(S, finetune_stage(st, f"{name}_real", real, parts["source_dev"], inputs=after))
    theta_p = produce(S, finetune_stage(st, f"{name}_pseudo", pseudo, ps["source_dev"]["path"], inputs=after))
    return produce(S, tau_stage(f"{name}_tau", theta_r, theta_p, frees=(theta_r.stage, theta_p.stage)))
