"""Pseudo2Real-SC: one correction vector per speaker cluster (Lin et al. 2025, sec. 3.3).

Speakers (or utterances) of source-train and of the target are embedded and
clustered together; tau_c = FT(theta0, source real in c) - FT(theta0, source
pseudo in c); a target-eval utterance in cluster c is decoded by
theta_tp + lambda * tau_c. The control keeps every cluster's numbers of source
and of target members but draws the members at random.

System ``p2r_sc_error`` clusters speakers by the teacher's error rate instead
of their voice (:mod:`selfspeech.cluster.errors`): source speakers by their
measured teacher WER, target speakers by the WER their teacher confidence
predicts.

Stages: ``sc_embed`` -> ``sc_clusters`` (voice) or ``sc_error_clusters`` -> per
clustering and cluster c that has utterances to decode:
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
from selfspeech.eval.report import read_jsonl

VOICE_SYSTEMS = ("p2r_sc", "p2r_sc_random")
SC_SYSTEMS = (*VOICE_SYSTEMS, "p2r_sc_error")


def _key(item: dict, level: str) -> str:
    return str(item["speaker"]) if level == "speaker" else item["id"]


_MEMBERS = ("source_train", "target_adapt", "target_eval")  # the parts embedded and clustered together


def run_sc(S: StageRunner, st: Student, parts: dict, ps: dict, theta_tp: Output, lam: float,
           scope: str, decoded: str = "target_eval", labels: str | None = None) -> tuple[dict[str, str], dict]:
    """Pseudo2Real-SC systems the recipe lists (voice clusters, their random control, teacher-error
    clusters): a hypothesis file per system, and the clusters.

    ``decoded``: the target part whose utterances are decoded (target_adapt for an unlabelled target);
    ``labels``: the teacher's labels of every part (needed by ``p2r_sc_error``)."""
    systems = set(st.recipe.systems)
    items = {n: list(read_manifest(parts[n])) for n in _MEMBERS}
    hyps: dict[str, str] = {}
    info: dict = {}
    if set(VOICE_SYSTEMS) & systems:
        hyps, info = _run_voice(S, st, parts, ps, items, theta_tp, lam, scope, decoded)
    if "p2r_sc_error" in systems:
        if labels is None:
            raise ValueError("p2r_sc_error needs the teacher's labels")
        spec = st.recipe.clusters
        held = {n: list(read_manifest(parts[n])) for n in ("source_dev", "source_sim")}
        cl = S(Stage("sc_error_clusters", partial(_error_cluster, items, held, labels, spec.k, spec.min_size,
                                                  st.recipe.normalizer),
                     {"k": spec.k, "min_size": spec.min_size, "normalizer": st.recipe.normalizer}, ("pseudo",)))
        hyps["p2r_sc_error"] = _decode_by_cluster(S, st, parts, ps, items, "error", cl, theta_tp, lam, scope,
                                                  decoded, level="speaker", clusters_stage="sc_error_clusters")
        info["teacher_error"] = {k: v for k, v in cl.items() if k != "error"} | {"assignment": cl["error"]}
    return hyps, info


def _run_voice(S: StageRunner, st: Student, parts: dict, ps: dict, items: dict, theta_tp: Output, lam: float,
               scope: str, decoded: str) -> tuple[dict[str, str], dict]:
    """Clusters of speaker embeddings (p2r_sc) and the same-size random control (p2r_sc_random)."""
    spec, seed = st.recipe.clusters, st.recipe.data.seed
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


def teacher_wer(items: list[dict], labels: dict, normalizer: str) -> dict[str, float]:
    """speaker -> the teacher's WER against the real transcripts (a failed label counts as empty)."""
    from selfspeech.eval.wer import ErrorCounts, count_errors_batch
    from selfspeech.text.normalize import get_normalizer

    norm = get_normalizer(normalizer)
    refs = [norm(it["text"]) for it in items]
    hyps = [norm((labels.get(it["id"]) or {}).get("text") or "") for it in items]
    rows: dict[str, list] = {}
    for it, c in zip(items, count_errors_batch(refs, hyps)):
        rows.setdefault(str(it["speaker"]), []).append(c)
    totals = {s: ErrorCounts.from_array(r) for s, r in rows.items()}
    return {s: t.wer for s, t in totals.items() if t.ref_words > 0}


def _error_cluster(items: dict, held: dict, labels_path: str, k: int, min_size: int, normalizer: str,
                   d: Path) -> dict:
    return error_clusters(items, held, labels_path, k, min_size, normalizer)


def error_clusters(items: dict, held: dict, labels_path: str, k: int, min_size: int, normalizer: str) -> dict:
    """Source-train speakers ranked into k groups of measured teacher WER; target speakers placed by predicted WER.

    ``items``: part name -> utterances, for source_train, target_adapt and target_eval; ``held``: the source
    parts the WER model is checked on (never fitted on). Target transcripts are not read. Returns the
    assignment (``error``: speaker -> cluster), the cuts, sizes, mean WERs, and the held-out rank correlation.
    """
    import numpy as np

    from selfspeech.cluster import errors as E

    labels = {r["id"]: r for r in read_jsonl(labels_path)}

    def xy(its: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
        feats, wer = E.speaker_features(its, labels), teacher_wer(its, labels, normalizer)
        keys = sorted(set(feats) & set(wer))
        return keys, np.stack([feats[s] for s in keys]), np.array([wer[s] for s in keys])

    src, x, y = xy(items["source_train"])
    model = E.fit_error_model(x, y)
    held_items = [it for its in held.values() for it in its]
    _, hx, hy = xy(held_items) if held_items else ([], np.zeros((0, len(E.FEATURES))), np.zeros(0))
    k = max(1, min(k, len(src) // min_size))  # every group keeps min_size source speakers for its tau
    cuts = E.quantile_cuts(y, k)
    groups = E.rank_groups(dict(zip(src, y.tolist())), k)
    tgt_items = items["target_adapt"] + items["target_eval"]
    tf = E.speaker_features(tgt_items, labels)
    tgt = sorted({str(it["speaker"]) for it in tgt_items})
    # a target speaker without a single usable teacher label gets the mean prediction (the intercept)
    pred = {s: float(model.predict(tf[s][None])[0]) if s in tf else model.intercept for s in tgt}
    groups |= E.assign(pred, cuts)
    return {"error": groups, "k": k, "cuts": cuts.tolist(),
            "source_sizes": {c: sum(groups[s] == c for s in src) for c in range(k)},
            "target_sizes": {c: sum(groups[s] == c for s in tgt) for c in range(k)},
            "source_teacher_wer": {c: float(np.mean([w for s, w in zip(src, y) if groups[s] == c]))
                                   for c in range(k)},
            "target_predicted_wer": {c: float(np.mean([pred[s] for s in tgt if groups[s] == c]))
                                     for c in range(k) if any(groups[s] == c for s in tgt)},
            "heldout_spearman": E.heldout_spearman(model, hx, hy) if len(hy) else None,
            "heldout_speakers": int(len(hy)), "target_without_labels": sum(s not in tf for s in tgt),
            "coefficients": dict(zip(E.FEATURES, model.coef.tolist())), "target_predicted": pred}


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
                       theta_tp: Output, lam: float, scope: str, decoded: str = "target_eval",
                       level: str | None = None, clusters_stage: str = "sc_clusters") -> str:
    """Each utterance of part ``decoded`` in cluster c decoded by theta_tp + lam * tau_c[scope]; one hypothesis
    file. A cluster with nothing to decode gets no tau."""
    level = level or st.recipe.clusters.level
    labels = {k: int(v) for k, v in cl[kind].items()}
    parts_dir = S.root / f"sc_{kind}_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    paired = {i["id"] for i in read_manifest(ps["source_train_real"]["path"])}  # same audio in both runs of tau_c
    out_hyps: list[dict] = []
    for c in range(cl["k"]):
        ev = [it for it in items[decoded] if labels[_key(it, level)] == c]
        if not ev:
            continue
        keep = {it["id"] for it in items["source_train"] if labels[_key(it, level)] == c} & paired
        tau_c = _cluster_tau(S, st, parts, ps, f"sc_{kind}_c{c}", keep, parts_dir / f"c{c}", clusters_stage)
        sub = parts_dir / f"c{c}_eval.jsonl"
        write_manifest(sub, ev)
        h = S(corrected_decode_stage(st, f"sc_{kind}_c{c}", theta_tp, tau_c, lam, scope, str(sub),
                                     inputs=(clusters_stage,)))
        out_hyps += [json.loads(line) for line in open(h, encoding="utf-8")]
    merged = S.root / f"sc_{kind}_hyp.jsonl"
    write_manifest(merged, out_hyps)
    return str(merged)


def _cluster_tau(S: StageRunner, st: Student, parts: dict, ps: dict, name: str, keep: set[str],
                 prefix: Path, clusters_stage: str = "sc_clusters") -> Output:
    """tau_c = FT(theta0, source real in c) - FT(theta0, source pseudo in c); the two models are then freed."""
    real = P.subset(parts["source_train"], keep, Path(f"{prefix}_real.jsonl"))
    pseudo = P.subset(ps["source_train"]["path"], keep, Path(f"{prefix}_pseudo.jsonl"))
    # the subsets are rewritten at the same paths when the clusters change: the stages must
    # depend on the clustering, or a new extractor would reuse the old clusters' models
    after = ("pseudo", clusters_stage)
    theta_r = produce(S, finetune_stage(st, f"{name}_real", real, parts["source_dev"], inputs=after))
    theta_p = produce(S, finetune_stage(st, f"{name}_pseudo", pseudo, ps["source_dev"]["path"], inputs=after))
    return produce(S, tau_stage(f"{name}_tau", theta_r, theta_p, frees=(theta_r.stage, theta_p.stage)))
