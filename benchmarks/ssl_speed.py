"""wav2vec 2.0 pretraining throughput: our objective vs transformers' Wav2Vec2ForPreTraining, side by side.

Same configuration for both (waveform CNN 7 x ``--conv`` channels, pre-LN
Transformer ``--layers`` x ``--dim``, G=2 x V=320 Gumbel quantizer, 100
distractors, mask 0.65 x 10), same real audio batch (``--batch`` utterances of
speechocean762 cropped/padded to ``--seconds``), same AdamW step, one thread by
default. Each method: warm-up steps, then ``--steps`` timed steps; methods
interleaved over ``--repeats``; medians. Throughput = audio seconds trained per
wall second. Achieved GFLOP/s of our step (FLOPs counted by
``torch.utils.flop_counter``) against a fp32 matmul peak measured here.

Usage: python benchmarks/ssl_speed.py [--threads 1] [--steps 5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SO762, median, write_result  # noqa: E402


def hf_config(conv: int, dim: int, layers: int):
    """transformers' Wav2Vec2Config matching our encoder (pre-LN, group-norm CNN) and Wav2Vec2Config defaults."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(conv_dim=(conv,) * 7, hidden_size=dim, num_hidden_layers=layers,
                          num_attention_heads=4, intermediate_size=4 * dim, num_conv_pos_embeddings=33,
                          num_conv_pos_embedding_groups=16, codevector_dim=128, proj_codevector_dim=128,
                          num_codevectors_per_group=320, num_codevector_groups=2, do_stable_layer_norm=True,
                          feat_extract_norm="group", mask_time_prob=0.65, mask_time_length=10, num_negatives=100,
                          contrastive_logits_temperature=0.1, diversity_loss_weight=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--conv", type=int, default=64)
    ap.add_argument("--dim", type=int, default=144)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    from transformers import Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    from selfspeech.audio.io import load_item
    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.models.ssl import EncoderConfig
    from selfspeech.objectives.losses import weighted_sum
    from selfspeech.objectives.tasks import Wav2Vec2Config as OurCfg
    from selfspeech.objectives.tasks import Wav2Vec2Task

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = int(args.seconds * 16000)
    items = list(iter_kaldi_dir(SO762, with_durations=False))[: args.batch]
    x = torch.zeros(args.batch, n)
    for b, it in enumerate(items):
        w = load_item(it)[:n]
        x[b, : len(w)] = torch.from_numpy(w)
    lengths = torch.full((args.batch,), n, dtype=torch.long)
    audio_s = args.batch * args.seconds

    enc = EncoderConfig(frontend="wave", conv_channels=args.conv, d_model=args.dim, n_layers=args.layers,
                        n_heads=4, ff_dim=4 * args.dim, pos_kernel=33, pos_groups=16)
    ours = Wav2Vec2Task(enc, OurCfg(final_dim=128))
    hf = Wav2Vec2ForPreTraining(hf_config(args.conv, args.dim, args.layers))
    hf.train()
    ours.train()
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    seq = int(hf._get_feat_extract_output_lengths(torch.tensor(n)))

    def step_ours(i):
        terms = ours(x, lengths, i)
        terms.pop("monitor")
        loss = weighted_sum(terms, ours.weights)
        opt_o.zero_grad()
        loss.backward()
        opt_o.step()

    def step_hf(i):
        mask = _compute_mask_indices((args.batch, seq), 0.65, 10, min_masks=2)
        neg = _sample_negative_indices((args.batch, seq), 100, mask)
        out = hf(x, mask_time_indices=torch.from_numpy(mask), sampled_negative_indices=torch.from_numpy(neg))
        opt_h.zero_grad()
        out.loss.backward()
        opt_h.step()

    methods = {"ours": step_ours, "transformers": step_hf}
    for fn in methods.values():
        for i in range(args.warmup):
            fn(i)
    times = {k: [] for k in methods}
    for r in range(args.repeats):
        for k, fn in methods.items():
            t = time.perf_counter()
            for i in range(args.steps):
                fn(i)
            times[k].append((time.perf_counter() - t) / args.steps)
            print(f"repeat {r + 1}: {k} {times[k][-1]:.3f} s/step", flush=True)
    med = {k: median(v) for k, v in times.items()}
    thr = {k: audio_s / v for k, v in med.items()}

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step_ours(0)
    flops = fc.get_total_flops()
    a = torch.randn(2048, 2048)
    mm = []
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        mm.append(time.perf_counter() - t)
    peak = 2 * 2048 ** 3 / median(mm) / 1e9
    achieved = flops / med["ours"] / 1e9
    write_result("ssl_speed", {
        "throughput_audio_s_per_s": thr, "seconds_per_step": times, "median_seconds_per_step": med,
        "throughput_ratio_vs_transformers": thr["ours"] / thr["transformers"],
        "our_step_gflop": flops / 1e9, "achieved_gflops": achieved, "matmul_peak_gflops": peak,
        "gflops_fraction_of_peak": achieved / peak,
        "config": {"batch": args.batch, "seconds": args.seconds, "conv": args.conv, "dim": args.dim,
                   "layers": args.layers, "threads": args.threads, "steps": args.steps, "repeats": args.repeats,
                   "params_ours": sum(p.numel() for p in ours.parameters()),
                   "params_transformers": sum(p.numel() for p in hf.parameters()),
                   "matmul": "2048x2048 fp32, median of 5"},
    })
    print(f"ours {thr['ours']:.1f} vs transformers {thr['transformers']:.1f} audio-s/s "
          f"(x{thr['ours'] / thr['transformers']:.2f}); {achieved:.1f} GFLOP/s of {peak:.1f} peak")


if __name__ == "__main__":
    main()
