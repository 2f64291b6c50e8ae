"""BEST-RQ / BiRQ update time: prediction head on every frame vs on the masked frames only.

The loss of both methods is a cross-entropy on the masked frames, so the
output head (d_model x codes: 144 x 8,192 = 1.2 M weights, about as many as the
whole "small" encoder) only needs the masked states. Our tasks run it there;
the textbook formulation (and our code before this change) runs it on every
frame and selects afterwards. Both are timed here side by side on the same real
batches: forward, backward and an AdamW step, interleaved repeats, medians.
The two give the same loss (checked below in eval mode, and in tests/test_ssl.py).

Usage: python benchmarks/bestrq_speed.py [--threads 1] [--batch 10] [--seconds 6]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SO762, median, write_result  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
import torch  # noqa: E402

from selfspeech.data.audio_dataset import AudioDataset  # noqa: E402
from selfspeech.data.kaldi import iter_kaldi_dir  # noqa: E402
from selfspeech.models.ssl import EncoderConfig  # noqa: E402
from selfspeech.objectives import losses as L  # noqa: E402
from selfspeech.objectives.tasks import build_task  # noqa: E402


def all_frames_loss(task, x, lengths, g) -> torch.Tensor:
    """The same weighted loss with every head on all frames, then the masked ones selected."""
    states, mask, labels, xn, flen = task.masked_pass(x, lengths, g)
    books = task.cfg.books
    terms = {"anchor": L.masked_cross_entropy(task.predict(states[-1], task.head, books), labels, mask)["loss"]}
    if task.name == "birq":
        selfl = task.self_labels(xn, lengths, flen, states[-1].shape[1], g)
        terms["self"] = L.masked_cross_entropy(task.predict(states[-1], task.head_self, books), selfl, mask)["loss"]
    return L.weighted_sum(terms, task.weights)


def masked_only_loss(task, x, lengths, g) -> torch.Tensor:
    return L.weighted_sum(task(x, lengths, 0, g), task.weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=10, help="utterances per batch")
    ap.add_argument("--seconds", type=float, default=6.0, help="crop per utterance (pretraining uses 6 s)")
    ap.add_argument("--steps", type=int, default=3, help="timed updates per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enc = EncoderConfig.preset("small", frontend="mel")
    n = int(args.seconds * 100)   # 10-ms log-mel frames
    utts = [u for u in iter_kaldi_dir(SO762) if float(u["duration"]) >= args.seconds][: args.batch]
    data = AudioDataset(utts, "mel", enc.n_mels)
    x = torch.stack([torch.as_tensor(data.load(i)[:n]) for i in range(len(utts))])   # (B, T, n_mels)
    lengths = torch.full((len(utts),), x.shape[1], dtype=torch.long)
    out = {}
    for objective in ("bestrq", "birq"):
        torch.manual_seed(0)
        task = build_task(objective, enc)
        opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
        task.eval()   # no dropout: both formulations must give the same number
        with torch.no_grad():
            same = [float(f(task, x, lengths, torch.Generator().manual_seed(1)))
                    for f in (all_frames_loss, masked_only_loss)]
        task.train()
        times = {"all_frames": [], "masked_only": []}
        for r in range(args.repeats + 1):       # repeat 0 warms up and is not counted
            for name, f in (("all_frames", all_frames_loss), ("masked_only", masked_only_loss)):
                t0 = time.perf_counter()
                for s in range(args.steps):
                    opt.zero_grad(set_to_none=True)
                    f(task, x, lengths, torch.Generator().manual_seed(100 * r + s)).backward()
                    opt.step()
                if r:
                    times[name].append((time.perf_counter() - t0) / args.steps)
        med = {k: median(v) for k, v in times.items()}
        out[objective] = {"seconds_per_update": med, "speedup": med["all_frames"] / med["masked_only"],
                          "loss_all_frames": same[0], "loss_masked_only": same[1], "repeats": times}
        print(f"{objective}: {med['all_frames']:.3f} s -> {med['masked_only']:.3f} s per update "
              f"({out[objective]['speedup']:.2f}x); loss {same[0]:.5f} vs {same[1]:.5f}", flush=True)
    write_result("bestrq_speed", {"systems": out, "batch": {"utterances": len(utts), "seconds": args.seconds},
                                  "encoder": "small preset, mel front-end", "threads": args.threads})


if __name__ == "__main__":
    main()
