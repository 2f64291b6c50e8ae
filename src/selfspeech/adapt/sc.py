"""Pseudo2Real-SC: one correction vector per speaker cluster (Lin et al. 2025, sec. 3.3).

Speakers (or utterances) of source-train and of the target are embedded and
clustered together; tau_c = FT(theta0, source real in c) - FT(theta0, source
pseudo in c); a target-eval utterance in cluster c is decoded by
theta_tp + lambda * tau_c. The control keeps every cluster's numbers of source
and of target members but draws the members at random.
"""
from __future__ import annotations

import json
from pathlib import Path


from selfspeech.adapt import prepare as P
from selfspeech.arith.task_vector import TaskVector, apply_to_dir, diff_dirs
from selfspeech.cluster.extractors import extractor_fingerprint, get_extractor
from selfspeech.cluster.speakers import (embed_manifest, kmeans_clusters, load_embeddings,
                                        random_clusters, save_embeddings, speaker_means)
from selfspeech.data.manifest import read_manifest, write_manifest


def _key(item: dict, level: str) -> str:
    return str(item["speaker"]) if level == "speaker" else item["id"]


def run_sc(recipe, S, parts, ps, tp, lam, scope, ft, decode, progress) -> tuple[dict, dict]:
    spec = recipe.clusters
    names = ("source_train", "target_adapt", "target_eval")
    items = {n: list(read_manifest(parts[n])) for n in names}

    def embed(d: Path) -> str:
        ex = get_extractor(spec.extractor)
        emb = embed_manifest([it for n in names for it in items[n]], ex, progress)
        return str(save_embeddings(d / "utt_emb.npz", emb))

    emb_path = S.run("sc_embed", {"extractor": extractor_fingerprint(spec.extractor)}, embed, deps=("data",))
    utt_emb = load_embeddings(emb_path)
    every = [it for n in names for it in items[n]]
    vecs = speaker_means(every, utt_emb) if spec.level == "speaker" else utt_emb
    src_keys = {_key(it, spec.level) for it in items["source_train"]}
    tgt_keys = set(vecs) - src_keys

    def cluster(d: Path) -> dict:
        km = kmeans_clusters(vecs, spec.k, recipe.data.seed, must_cover=[src_keys])
        small = [c for c in km.sizes if sum(km.labels[k] == c for k in src_keys) < spec.min_size]
        if small and len(km.sizes) > 1:  # too few source members for a trustworthy tau_c: merge
            km = kmeans_clusters(vecs, max(1, len(km.sizes) - len(small)), recipe.data.seed, must_cover=[src_keys])
        k = len(km.sizes)
        src_sizes = {c: sum(km.labels[x] == c for x in src_keys) for c in range(k)}
        tgt_sizes = {c: sum(km.labels[x] == c for x in tgt_keys) for c in range(k)}
        rnd = {**random_clusters(src_keys, src_sizes, recipe.data.seed + 7),
               **random_clusters(tgt_keys, tgt_sizes, recipe.data.seed + 8)}
        return {"kmeans": km.labels, "random": rnd, "k": k, "merged": km.merged,
                "source_sizes": src_sizes, "target_sizes": tgt_sizes}

    cl = S.run("sc_clusters", {"k": spec.k, "level": spec.level, "min_size": spec.min_size, "seed": recipe.data.seed},
               cluster, deps=("sc_embed",))
    paired = {i["id"] for i in read_manifest(ps["source_train_real"]["path"])}  # same audio in both runs of tau_c
    hyps = {}
    systems = {"kmeans": "p2r_sc"} | ({"random": "p2r_sc_random"} if spec.random_control else {})
    for kind, system in systems.items():
        labels = {k: int(v) for k, v in cl[kind].items()}
        parts_dir = S.root / f"sc_{kind}_parts"
        parts_dir.mkdir(parents=True, exist_ok=True)
        out_hyps: list[dict] = []
        for c in range(cl["k"]):
            keep = {it["id"] for it in items["source_train"] if labels[_key(it, spec.level)] == c} & paired
            real = P.subset(parts["source_train"], keep, parts_dir / f"c{c}_real.jsonl")
            pseudo = P.subset(ps["source_train"]["path"], keep, parts_dir / f"c{c}_pseudo.jsonl")
            # the subsets are rewritten at the same paths when the clusters change: the stages must
            # depend on the clustering, or a new extractor would reuse the old clusters' models
            r = ft(f"sc_{kind}_c{c}_real", real, parts["source_dev"], deps=("pseudo", "sc_clusters"))
            p = ft(f"sc_{kind}_c{c}_pseudo", pseudo, ps["source_dev"]["path"], deps=("pseudo", "sc_clusters"))
            tname = f"sc_{kind}_c{c}_tau"
            tpath = S.run(tname, {}, lambda d, r=r, p=p: str(diff_dirs(r, p).save(d / "tau.safetensors")),
                          deps=(f"ft_sc_{kind}_c{c}_real", f"ft_sc_{kind}_c{c}_pseudo"))
            mname = f"model_sc_{kind}_c{c}"
            mdir = S.run(mname, {"lambda": lam} | ({} if scope == "all" else {"scope": scope}),
                         lambda d, tpath=tpath: str(apply_to_dir(tp, TaskVector.load(tpath).scope(scope), lam,
                                                                 d / "model")),
                         deps=("ft_target_pseudo", tname))
            ev = [it for it in items["target_eval"] if labels[_key(it, spec.level)] == c]
            if not ev:
                continue
            sub = parts_dir / f"c{c}_eval.jsonl"
            write_manifest(sub, ev)
            h = decode(f"sc_{kind}_c{c}", mdir, str(sub), (mname, "sc_clusters"))
            out_hyps += [json.loads(line) for line in open(h, encoding="utf-8")]
        merged = S.root / f"sc_{kind}_hyp.jsonl"
        write_manifest(merged, out_hyps)
        hyps[system] = str(merged)
    info = {k: v for k, v in cl.items() if k not in ("kmeans", "random")}
    info["assignment"] = {"kmeans": cl["kmeans"], "random": cl["random"]}
    return hyps, info
