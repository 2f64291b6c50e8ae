"""What did BEST-RQ / BiRQ pretraining learn beyond the label prior?

Why this exists: at this machine's scale the pretrained mel encoders did not
lower PER after CTC fine-tuning (benchmarks/ssl_pretraining.py). A masked
prediction accuracy of ~14% sounds like learning, but the random-projection
labels of speech are far from uniform (silence and steady vowels map to a few
codes), so a model that ignores the audio and predicts the label frequencies
already scores well. This probe puts the two side by side on the same masked
frames:

- ``prior``: the unigram distribution of the anchor labels, estimated on
  ``--prior-utts`` other utterances (additive smoothing 0.5 over all codes),
  scored on the probe's masked frames: cross-entropy (nats) and the accuracy of
  always answering the most frequent code;
- each checkpoint's masked-prediction head on the same masked frames (same mask
  draws: one seeded generator restarted per checkpoint), eval mode.

The gap ``prior CE - model CE`` is what the encoder learned about the masked
audio from its context. BiRQ checkpoints are probed on their anchor labels.

Usage: python benchmarks/bestrq_probe.py runs/ssl_cpu/pt_bestrq/last runs/ssl_cpu/pt_birq/last
       [--manifest runs/ssl_cpu/all.jsonl] [--probe-utts 100] [--prior-utts 500]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from selfspeech.data.audio_dataset import AudioDataset, collate_arrays  # noqa: E402
from selfspeech.data.manifest import read_manifest  # noqa: E402
from selfspeech.models.ssl import EncoderConfig, load_state, read_config  # noqa: E402
from selfspeech.objectives.tasks import build_task  # noqa: E402

BATCH = 10


def load_task(model_dir: str):
    meta = read_config(model_dir, ("ssl_task:bestrq", "ssl_task:birq"))
    objective = meta["kind"].split(":", 1)[1]
    task = build_task(objective, EncoderConfig(**meta["config"]), meta["pretrain"].get("task") or {})
    task.load_state_dict(load_state(model_dir))
    return task.eval(), meta


def batches(ds: AudioDataset):
    for s in range(0, len(ds), BATCH):
        yield collate_arrays([ds.load(i) for i in range(s, min(s + BATCH, len(ds)))])


@torch.no_grad()
def prior_counts(ds: AudioDataset, task) -> torch.Tensor:
    """(books, codes) anchor-label counts over every frame of ``ds``."""
    counts = torch.zeros(task.cfg.books, task.cfg.codes)
    for b in batches(ds):
        labels, _, flen = task.anchor_labels(b["x"], b["lengths"])
        valid = torch.arange(labels.shape[1])[None] < flen[:, None]
        for j in range(task.cfg.books):
            counts[j] += torch.bincount(labels[..., j][valid], minlength=task.cfg.codes).float()
    return counts


@torch.no_grad()
def probe(task, ds: AudioDataset, log_prior: torch.Tensor, seed: int) -> dict:
    """Masked-frame cross-entropy and accuracy of the model and of the prior (first codebook)."""
    g = torch.Generator().manual_seed(seed)
    tot = {"n": 0, "model_ce": 0.0, "model_acc": 0, "prior_ce": 0.0, "prior_acc": 0}
    top = int(log_prior.argmax())
    for b in batches(ds):
        states, mask, labels, _, _ = task.masked_pass(b["x"], b["lengths"], g)
        logits = task.predict(states[-1], task.head, task.cfg.books)[..., 0, :][mask]
        lab = labels[..., 0][mask]
        tot["n"] += len(lab)
        tot["model_ce"] += float(F.cross_entropy(logits, lab, reduction="sum"))
        tot["model_acc"] += int((logits.argmax(-1) == lab).sum())
        tot["prior_ce"] += float(-log_prior[lab].sum())
        tot["prior_acc"] += int((lab == top).sum())
    n = tot["n"]
    return {"masked_frames": n, "model_ce": tot["model_ce"] / n, "model_accuracy": tot["model_acc"] / n,
            "prior_ce": tot["prior_ce"] / n, "prior_accuracy": tot["prior_acc"] / n,
            "ce_gain_over_prior": (tot["prior_ce"] - tot["model_ce"]) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="ssl_task:bestrq|birq folders (a pretrain run's last/ or best/)")
    ap.add_argument("--manifest", default=str(ROOT / "runs" / "ssl_cpu" / "all.jsonl"))
    ap.add_argument("--probe-utts", type=int, default=100)
    ap.add_argument("--prior-utts", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--result-name", default="bestrq_probe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    items = list(read_manifest(args.manifest))
    stride = max(1, len(items) // (args.probe_utts + args.prior_utts))
    spread = items[::stride]   # speakers and ages spread over the manifest; probe and prior disjoint
    probe_items, prior_items = spread[::2][: args.probe_utts], spread[1::2][: args.prior_utts]
    out, prior_for = {}, {}
    for ck in args.checkpoints:
        task, meta = load_task(ck)
        rq = (task.enc_cfg.stride, task.enc_cfg.n_mels, task.cfg.code_dim, task.cfg.codes, task.cfg.books,
              task.cfg.seed)
        if rq not in prior_for:   # the prior depends only on the frozen quantizer
            counts = prior_counts(AudioDataset(prior_items, "mel", task.enc_cfg.n_mels), task)[0]
            p = (counts + 0.5) / (counts.sum() + 0.5 * len(counts))
            prior_for[rq] = (p.log(), counts)
        log_prior, counts = prior_for[rq]
        r = probe(task, AudioDataset(probe_items, "mel", task.enc_cfg.n_mels), log_prior, args.seed)
        used = counts[counts > 0]
        r |= {"objective": meta["kind"], "updates": meta["pretrain"]["loop"].get("max_steps"),
              "prior_codes_used": int(len(used)), "prior_label_perplexity": math.exp(float(
                  -(used / used.sum() * (used / used.sum()).log()).sum())), "uniform_ce": math.log(task.cfg.codes)}
        out[ck] = r
        print(f"{ck}: masked CE {r['model_ce']:.3f} nats, accuracy {r['model_accuracy']:.3f} | prior CE "
              f"{r['prior_ce']:.3f}, most-frequent-code accuracy {r['prior_accuracy']:.3f} | gain "
              f"{r['ce_gain_over_prior']:.3f} nats ({r['masked_frames']} masked frames)", flush=True)
    write_result(args.result_name, {"checkpoints": out, "probe_utterances": len(probe_items),
                                    "prior_utterances": len(prior_items), "manifest": args.manifest})


if __name__ == "__main__":
    main()
