"""Does wav2vec 2.0's contrastive loss leave chance? Ours (feature penalty 10 / 0) vs transformers, one stream.

Why this exists: in benchmarks/ssl_pretraining.py our wav2vec 2.0 sat at
chance (log(101) = 4.615 nats) for all of its updates. Each system here trains
from scratch on the same stream of random batches (``--batch`` random crops of
``--seconds`` s from ``--pool`` speechocean762 utterances, one seeded RNG
restarted per system), with the same AdamW (lr ``--lr``, betas 0.9/0.98,
weight decay 0.01), the same linear warm-up (8% of ``--schedule`` updates)
and decay, and clipping at 10:

- ``ours_pen10``: our task with the feature L2 penalty at 10 (wav2vec 2.0 base);
- ``ours_pen0``: our task without it (fairseq's large / XLSR recipe, our default);
- ``transformers``: ``Wav2Vec2ForPreTraining`` at the same configuration
  (benchmarks/ssl_speed.py's), fed the same per-utterance normalised waveform,
  its masks and distractors from transformers' own samplers, no feature penalty.

Reported: the contrastive loss (nats per masked frame) averaged over windows
of 20 updates, and the first update whose window mean is below 98% of chance.

Usage: python benchmarks/w2v2_chance_probe.py [--steps 300] [--threads 1]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SO762, write_result  # noqa: E402
from ssl_speed import hf_config  # noqa: E402

SYSTEMS = ("ours_pen10", "ours_pen0", "transformers")
WINDOW = 20


def batches(wavs: list, args):
    """The stream every system sees: ``(x (B, N) float32, lengths (B,) int64)`` per update."""
    import torch

    rng = np.random.default_rng(args.seed)
    n = int(args.seconds * 16000)
    for _ in range(args.steps):
        x = torch.zeros(args.batch, n)
        lengths = torch.zeros(args.batch, dtype=torch.long)
        for b, j in enumerate(rng.integers(0, len(wavs), args.batch)):
            w = wavs[j]
            if len(w) > n:
                o = int(rng.integers(0, len(w) - n))
                w = w[o:o + n]
            x[b, : len(w)] = torch.from_numpy(w)
            lengths[b] = len(w)
        yield x, lengths


def make_step(name: str, args):
    """(model, step(x, lengths, i) -> (loss to minimise, contrastive nats per masked frame))."""
    import torch

    from selfspeech.models.ssl import EncoderConfig, normalise_input
    from selfspeech.objectives.losses import weighted_sum
    from selfspeech.objectives.tasks import Wav2Vec2Config, Wav2Vec2Task

    if name.startswith("ours"):
        enc = EncoderConfig(frontend="wave", conv_channels=args.conv, d_model=args.dim, n_layers=args.layers,
                            n_heads=4, ff_dim=4 * args.dim, pos_kernel=33, pos_groups=16)
        task = Wav2Vec2Task(enc, Wav2Vec2Config(final_dim=128, w_features=10.0 if name == "ours_pen10" else 0.0))

        def step(x, lengths, i):
            terms = task(x, lengths, i)
            terms.pop("monitor")
            return weighted_sum(terms, task.weights), float(terms["contrastive"])
        return task, step

    from transformers import Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    hf = Wav2Vec2ForPreTraining(hf_config(args.conv, args.dim, args.layers))

    def step(x, lengths, i):
        seq = int(hf._get_feat_extract_output_lengths(torch.tensor(x.shape[1])))
        frames = hf._get_feat_extract_output_lengths(lengths)
        valid = (torch.arange(seq)[None] < frames[:, None]).long()
        mask = _compute_mask_indices((x.shape[0], seq), 0.65, 10, attention_mask=valid, min_masks=2)
        neg = _sample_negative_indices((x.shape[0], seq), 100, mask)
        hf.set_gumbel_temperature(max(2.0 * 0.999995 ** i, 0.5))
        am = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
        out = hf(normalise_input(x, lengths), attention_mask=am, mask_time_indices=torch.from_numpy(mask),
                 sampled_negative_indices=torch.from_numpy(neg))
        return out.loss, float(out.contrastive_loss) / int(mask.sum())   # transformers sums over frames
    return hf, step


def run(name: str, wavs: list, args) -> dict:
    import torch

    torch.manual_seed(args.seed)
    model, step = make_step(name, args)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, int(0.08 * args.schedule))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else max(0.0, (args.schedule - s) / (args.schedule - warm)))
    con, t0 = [], time.perf_counter()
    for i, (x, lengths) in enumerate(batches(wavs, args)):
        loss, c = step(x, lengths, i)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
        con.append(c)
        if (i + 1) % WINDOW == 0:
            print(f"{name} update {i + 1}: contrastive {np.mean(con[-WINDOW:]):.3f} nats "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    windows = [float(np.mean(con[k:k + WINDOW])) for k in range(0, len(con), WINDOW)]
    chance = math.log(101)
    below = [k for k, v in enumerate(windows) if v < 0.98 * chance]
    return {"window_means": windows, "left_chance_at_update": (below[0] + 1) * WINDOW if below else None,
            "last_window": windows[-1], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="updates trained by each system")
    ap.add_argument("--schedule", type=int, default=1500, help="length of the lr schedule the updates are cut from")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--pool", type=int, default=2500, help="utterances the crops are drawn from")
    ap.add_argument("--conv", type=int, default=64)
    ap.add_argument("--dim", type=int, default=144)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    args = ap.parse_args()
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: this benchmark needs ../shared/data/speechocean762-train")
    import torch

    from selfspeech.audio.io import load_item
    from selfspeech.data.kaldi import iter_kaldi_dir

    torch.set_num_threads(args.threads)
    items = list(iter_kaldi_dir(SO762, with_durations=False))
    pick = np.random.default_rng(args.seed).permutation(len(items))[: args.pool]
    wavs = [load_item(items[i]) for i in pick]
    res = {name: run(name, wavs, args) for name in args.systems}
    write_result("w2v2_chance_probe", {
        "chance_nats": math.log(101), "window": WINDOW, "systems": res,
        "left_chance_at_update": {k: v["left_chance_at_update"] for k, v in res.items()},
        "config": {k: v for k, v in vars(args).items() if k != "systems"},
    })
    for k, v in res.items():
        print(f"{k}: left chance at update {v['left_chance_at_update']}, last window {v['last_window']:.3f} nats")


if __name__ == "__main__":
    main()
