"""How short may the teacher's encoder window be? WER and time per window, on source-domain (adult) speech.

120 random adult utterances of speechocean762 (seed 1), whisper-base and
whisper-tiny.en through our batched faster-whisper path (int8, greedy, batches
of 8 sorted by length), for each encoder window in ``--windows`` (a batch is
padded to max(window, longest + 0.5 s), 30 = Whisper's standard). Only adult
utterances: the default window is chosen here, never on the target (children).

Usage: python benchmarks/teacher_window_probe.py [--windows 30 15 10 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SO762, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=float, nargs="*", default=[30, 15, 10, 5])
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import jiwer
    import torch

    from selfspeech.audio.io import load_item
    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.label.teacher import DecodeOptions, FasterWhisperTeacher
    from selfspeech.models.zoo import resolve_model
    from selfspeech.text.normalize import get_normalizer

    torch.set_num_threads(args.threads)
    items = [it for it in iter_kaldi_dir(SO762) if it["age_group"] == "adult"]
    random.Random(1).shuffle(items)
    items = items[: args.n]
    wavs = [load_item(it) for it in items]
    norm = get_normalizer()
    refs = [norm(it["text"]) for it in items]
    order = sorted(range(len(wavs)), key=lambda i: len(wavs[i]))
    out = {}
    for name in ("whisper-base", "whisper-tiny.en"):
        out[name] = {}
        for w in args.windows:
            fw = FasterWhisperTeacher(resolve_model(name).ct2_dir, cpu_threads=args.threads,
                                      options=DecodeOptions(window_s=w))
            hyp, t = [None] * len(wavs), time.perf_counter()
            for k in range(0, len(order), 8):
                idx = order[k:k + 8]
                for i, h in zip(idx, fw.transcribe([wavs[i] for i in idx])):
                    hyp[i] = h.text
            sec = time.perf_counter() - t
            wer = jiwer.wer(refs, [norm(h) or "-" for h in hyp])
            out[name][f"{w:g}"] = {"wer": wer, "seconds": sec}
            print(f"{name} window {w:g} s: WER {wer:.3f}, {sec:.1f} s", flush=True)
    write_result("teacher_window_probe", {"results": out, "utterances": len(items), "group": "adult",
                                          "threads": args.threads, "batch_size": 8})


if __name__ == "__main__":
    main()
