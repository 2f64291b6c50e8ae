"""The inputs of the GPU benchmark (benchmarks/gpu.py) as one small folder that travels with the repo.

The GPU machine reaches neither ../shared nor a model hub, and what travels with
the working tree is capped (64 MiB with the carried wheels), so this script,
run on a machine that has ../shared and the zoo's Whisper models, packs:

- ``audio/``: ``--n`` speechocean762 utterances of 4 to 8 s (FLAC, as in the
  corpus) and ``inputs.json`` with their ids, durations, speakers and
  whisper_english-normalised transcripts;
- ``models/whisper-tiny.en``: config, generation config, feature-extractor and
  tokenizer files (tokenizer.json gzipped) and the weights as int8 with one
  float32 scale per 64 consecutive values (gzipped: 35 MB instead of 151 MB of
  float32). Dequantized, greedy transcripts on 16 utterances matched the
  float32 model's in 14 (the rest differ in a word or punctuation), which is
  what a throughput figure needs: the same network, decoding similar lengths;
- ``models/whisper-base``: its config and tokenizer only. Its weights (145 MB
  in float16) do not fit; the benchmark trains a randomly initialised
  whisper-base, which costs the same time per step as the real one.

The reading side (on the GPU machine): :func:`items` gives the utterances as
manifest items, :func:`model_dir` each model as a transformers directory.

Usage: python benchmarks/gpu_inputs.py [--out .gpu_inputs] [--n 40] [--seed 0]
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SO762  # noqa: E402

DEFAULT = ROOT / ".gpu_inputs"
MODELS = ("whisper-tiny.en", "whisper-base")
WITH_WEIGHTS = ("whisper-tiny.en",)
GROUP = 64  # values per int8 scale
PLAIN_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json")
WEIGHTS = "weights.int8.safetensors.gz"


def quantize(state: dict) -> dict:
    """float tensors -> int8 codes + float32 scales per ``GROUP`` values (>= 2-D), float16 (1-D).

    float32 scales: a float16 one would be subnormal, and coarse, for groups whose largest value is
    below ~1e-2, and the codes of such a group could then overshoot by more than half a step."""
    import torch

    out = {}
    for k, v in state.items():
        if v.dim() >= 2 and v.numel() % GROUP == 0:
            w = v.float().reshape(-1, GROUP)
            s = w.abs().amax(1, keepdim=True) / 127
            safe = torch.where(s > 0, s, torch.ones_like(s))  # all-zero groups stay 0
            out[k] = torch.round(w / safe).clamp(-127, 127).to(torch.int8).reshape(v.shape)
            out[k + ".scale"] = s.squeeze(1)
        else:
            out[k] = v.half()
    return out


def dequantize(packed: dict) -> dict:
    """The inverse of :func:`quantize`, in float32."""
    import torch

    out = {}
    for k, v in packed.items():
        if k.endswith(".scale"):
            continue
        if v.dtype == torch.int8:
            s = packed[k + ".scale"].float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            out[k] = (v.float().reshape(-1, GROUP) * s[:, None]).reshape(v.shape)
        else:
            out[k] = v.float()
    return out


def pick_utterances(n: int, seed: int) -> list[dict]:
    from selfspeech.data.kaldi import iter_kaldi_dir
    from selfspeech.text.normalize import get_normalizer

    norm = get_normalizer("whisper_english")
    items = [{**it, "text": norm(it["text"])} for it in iter_kaldi_dir(SO762) if 4.0 <= it["duration"] <= 8.0]
    return random.Random(seed).sample([it for it in items if it["text"]], n)


def pack_model(name: str, dst: Path) -> None:
    from safetensors.torch import load_file, save

    from selfspeech.models.zoo import pull

    hf = pull(name).hf_dir
    dst.mkdir(parents=True, exist_ok=True)
    for f in PLAIN_FILES:
        if (hf / f).is_file():
            shutil.copy2(hf / f, dst / f)
    (dst / "tokenizer.json.gz").write_bytes(gzip.compress((hf / "tokenizer.json").read_bytes(), 9))
    if name in WITH_WEIGHTS:
        (dst / WEIGHTS).write_bytes(gzip.compress(save(quantize(load_file(str(hf / "model.safetensors")))), 6))


def build(out: Path, n: int, seed: int) -> dict:
    """Write the folder (replacing an older one); returns what inputs.json holds."""
    if not SO762.is_dir():
        sys.exit(f"{SO762} not found: the inputs are built from ../shared/data/speechocean762-train")
    shutil.rmtree(out, ignore_errors=True)
    (out / "audio").mkdir(parents=True)
    (out / ".gitignore").write_text("*\n")  # never committed, whatever the repo's ignore rules
    utts = []
    for it in pick_utterances(n, seed):
        rel = f"audio/{it['id']}.flac"
        shutil.copy2(it["audio_filepath"], out / rel)
        utts.append({"id": it["id"], "audio": rel, "duration": round(float(it["duration"]), 3),
                     "speaker": it.get("speaker"), "text": it["text"]})
    for name in MODELS:
        pack_model(name, out / "models" / name)
    meta = {"utterances": utts, "audio_seconds": round(sum(u["duration"] for u in utts), 2),
            "models": {m: ("int8 weights, one float32 scale per 64 values" if m in WITH_WEIGHTS else
                           "config and tokenizer only: random initialisation") for m in MODELS},
            "corpus": "speechocean762-train", "seed": seed}
    (out / "inputs.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# -- the reading side ---------------------------------------------------------------------------

def items(folder: Path) -> list[dict]:
    """The packed utterances as manifest items (``audio_filepath`` absolute, ``duration``, ``text``)."""
    meta = json.loads((folder / "inputs.json").read_text())
    return [{"id": u["id"], "audio_filepath": str((folder / u["audio"]).resolve()), "duration": u["duration"],
             "speaker": u.get("speaker"), "text": u["text"]} for u in meta["utterances"]]


def model_dir(folder: Path, name: str, work: Path, weights: bool = True) -> tuple[Path, bool]:
    """A transformers directory for ``name`` under ``work`` and whether it holds the real weights
    (dequantized) or a random initialisation of the same configuration; ``weights=False``: the
    configuration and tokenizer files only."""
    import torch
    from safetensors.torch import load
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    src, dst = folder / "models" / name, work / "models" / name
    real = (src / WEIGHTS).is_file()
    if (dst / "model.safetensors").is_file() or (not weights and (dst / "tokenizer.json").is_file()):
        return dst, real
    dst.mkdir(parents=True, exist_ok=True)
    for f in PLAIN_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    (dst / "tokenizer.json").write_bytes(gzip.decompress((src / "tokenizer.json.gz").read_bytes()))
    if not weights:
        return dst, real
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(str(dst)))
    if real:
        state = dequantize(load(gzip.decompress((src / WEIGHTS).read_bytes())))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"proj_out.weight"}:
            raise ValueError(f"{src / WEIGHTS}: weights do not fit {name} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        model.tie_weights()
    model.save_pretrained(str(dst))
    return dst, real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT)
    ap.add_argument("--n", type=int, default=40, help="utterances (4 to 8 s each)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    meta = build(a.out, a.n, a.seed)
    print(f"{a.out}: {len(meta['utterances'])} utterances ({meta['audio_seconds']} s), "
          f"{folder_bytes(a.out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
