"""Which discrete units does each group use? (XLSR, Conneau et al. 2020, sec. 5.3.)

Every frame of every utterance goes through a pretrained wav2vec 2.0 task's
quantizer (argmax, no Gumbel noise); each group (language, accent, age group)
gets a histogram over the G x V codewords, and groups are compared by the cosine
similarity of their histograms: shared units show up as high similarity. Writes
``units.json``, ``units_heatmap.png`` and ``units_histograms.png``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from selfspeech.data.atomic import write_json
from selfspeech.data.audio_dataset import AudioDataset, collate_arrays
from selfspeech.models.ssl import EncoderConfig, load_state


def load_wav2vec2_task(model_dir: str | Path):
    from selfspeech.objectives.tasks import Wav2Vec2Config, Wav2Vec2Task

    meta = json.loads((Path(model_dir) / "config.json").read_text())
    if meta.get("kind") != "ssl_task:wav2vec2":
        raise ValueError(f"{model_dir}: a {meta.get('kind')!r} checkpoint; unit usage needs a wav2vec2 task "
                         "(the OUT/best folder of `selfspeech pretrain --objective wav2vec2`)")
    task = Wav2Vec2Task(EncoderConfig(**meta["config"]), Wav2Vec2Config(**meta["pretrain"]["task"]))
    task.load_state_dict(load_state(model_dir))
    return task.eval()


@torch.no_grad()
def unit_usage(task, items: list[dict], field: str, batch: int = 16) -> dict[str, np.ndarray]:
    """group -> (G, V) codeword counts over all frames of the group's utterances."""
    data = AudioDataset(items, "wave", cache=False)
    G, V = task.quantizer.groups, task.quantizer.entries
    out: dict[str, np.ndarray] = {}
    for k in range(0, len(items), batch):
        idx = list(range(k, min(k + batch, len(items))))
        b = collate_arrays([data.load(i) for i in idx])
        feats, flen = task.encoder.features(b["x"], b["lengths"])
        codes = task.quantizer(feats.flatten(0, 1), tau=1.0)["codes"].view(feats.shape[0], feats.shape[1], G)
        for j, i in enumerate(idx):
            g = str(items[i].get(field))
            h = out.setdefault(g, np.zeros((G, V), dtype=np.int64))
            c = codes[j, : flen[j]].numpy()
            for gi in range(G):
                h[gi] += np.bincount(c[:, gi], minlength=V)
    return out


def similarity(hists: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = sorted(hists)
    m = np.stack([hists[n].ravel() / max(1, hists[n].sum()) for n in names])
    m = m / np.linalg.norm(m, axis=1, keepdims=True).clip(min=1e-12)
    return names, m @ m.T


def write_unit_report(hists: dict[str, np.ndarray], out_dir: str | Path) -> dict:
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, sim = similarity(hists)
    used = {n: int((hists[n].sum(0) > 0).sum()) for n in names}
    ppl = {}
    for n in names:
        p = hists[n] / hists[n].sum(1, keepdims=True).clip(min=1)
        ppl[n] = float(np.exp(-(p * np.log(p + 1e-12)).sum(1)).sum())
    fig = Figure(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 2), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(sim, vmin=min(0.0, float(sim.min())), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="cosine similarity of codeword histograms")
    ax.set_title("Shared discrete units between groups")
    fig.savefig(out / "units_heatmap.png", dpi=120)
    fig = Figure(figsize=(8, 1.6 * len(names) + 0.5), layout="constrained")
    for k, n in enumerate(names):
        ax = fig.add_subplot(len(names), 1, k + 1)
        h = hists[n].ravel() / max(1, hists[n].sum())
        ax.bar(np.arange(h.size), h, width=1.0)
        ax.set_ylabel(n, rotation=0, ha="right")
        ax.set_xlim(0, h.size)
    fig.axes[-1].set_xlabel("codeword (group-major: G x V)")
    fig.savefig(out / "units_histograms.png", dpi=120)
    res = {"groups": names, "similarity": sim.round(4).tolist(), "codewords_used": used,
           "perplexity_sum_over_codebooks": ppl, "frames": {n: int(hists[n][0].sum()) for n in names}}
    write_json(out / "units.json", res)
    return res
