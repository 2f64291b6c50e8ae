"""A speech encoder with a linear CTC output layer, and decoding of its log-probabilities.

The model is wav2vec 2.0's fine-tuning architecture (Baevski et al. 2020,
sec. 4.3): :class:`~selfspeech.models.ssl.SpeechEncoder` and one linear layer
over the output vocabulary, blank = 0 (Graves et al. 2006). Decoding is greedy
best path or CTC prefix beam search without a language model (Hannun et al.
2014). Saved as ``model.safetensors`` + ``config.json`` of kind ``ctc``.
"""
from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfspeech.accel import module_device, resolve_device, to_device
from selfspeech.data.audio_dataset import collate_arrays
from selfspeech.models.ssl import EncoderConfig, SpeechEncoder, load_state, read_config
from selfspeech.text.phones import Vocabulary


class CTCModel(nn.Module):
    def __init__(self, enc: EncoderConfig, vocab_size: int, head_init: str | None = None):
        super().__init__()
        self.encoder = SpeechEncoder(enc)
        self.head = nn.Linear(enc.d_model, vocab_size)
        if head_init == "zero":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif head_init is not None:
            raise ValueError(f"head_init {head_init!r}: use None (PyTorch's default) or 'zero'")

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, time_mask=None, channel_mask=None):
        """(B, T[, F]) -> fp32 log-probs (B, T', V) and lengths T'.

        The log-softmax runs in fp32 under autocast too: CTC sums these log-probabilities
        over every frame, and the beam search compares such sums."""
        feats, flen = self.encoder.features(x, lengths)
        if channel_mask is not None:
            feats = feats.masked_fill(channel_mask[:, None, :], 0.0)
        h = self.encoder.encode(feats, flen, time_mask)[-1]
        return self.head(h).float().log_softmax(-1), flen


def top_layer_state(encoder: nn.Module, n: int) -> dict[str, torch.Tensor]:
    """Copies of the weights of the top ``n`` Transformer layers and the output layer norm (empty for 0)."""
    layers = len(encoder.layers)
    if not 0 <= n <= layers:
        raise ValueError(f"reinit_top {n}: the encoder has {layers} Transformer layers; use 0..{layers}")
    if n == 0:
        return {}
    keep = tuple(f"layers.{i}." for i in range(layers - n, layers)) + ("out_norm.",)
    return {k: v.clone() for k, v in encoder.state_dict().items() if k.startswith(keep)}


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, repeats collapsed, blanks (0) removed."""
    out = []
    for lp, n in zip(log_probs.argmax(-1), lengths.tolist()):
        ids = torch.unique_consecutive(lp[:n]).tolist()
        out.append([i for i in ids if i != 0])
    return out


def beam_ctc(log_probs: torch.Tensor, beam: int = 8, rank: str = "prefix") -> list[int]:
    """CTC prefix beam search without a language model (Hannun et al. 2014, alg. 1) for one
    utterance: (T, V) log-probs -> the most probable label sequence (blank = 0).

    Each prefix keeps two log-scores, ending in blank and not; a repeated symbol
    extends a prefix only through a blank. beam=1 is not greedy decoding: it ranks
    prefixes, greedy ranks frames. Each frame extends the beam by its ``beam + 1``
    likeliest symbols.

    ``rank`` says what the ``beam`` slots hold after each frame:

    - ``prefix`` (default, Hannun et al.): the ``beam`` label prefixes of highest
      probability, each with both of its scores;
    - ``state``: the ``beam`` highest of the separate blank- and symbol-ending scores
      (pyctcdecode's beam without a language model: a state is a prefix and whether
      its last frame was blank), so a prefix whose probability is split between the
      two can lose a slot to a prefix with one larger half, and the beam holds about
      half as many prefixes. The final choice sums the kept halves in both.

    ``prefix`` ranks by the quantity the search maximises and finds the exact best
    labelling more often at the same width (``benchmarks/parity.py``, ``ctc_beam_agreement``
    details); ``state`` is there to reproduce pyctcdecode's results.
    """
    if rank not in ("prefix", "state"):
        raise ValueError(f"beam search rank {rank!r}: choose prefix or state")
    lp = log_probs.float().cpu().numpy()
    ninf = float("-inf")
    beams: dict[tuple, tuple[float, float]] = {(): (0.0, ninf)}   # prefix -> (log p_blank, log p_nonblank)
    top = list(range(lp.shape[1]))
    for t in range(lp.shape[0]):
        row = lp[t]
        cands = sorted(top, key=lambda v: -row[v])[: beam + 1]       # only the likeliest symbols this frame
        nxt: dict[tuple, list[float]] = {}

        def add(prefix, b, nb):
            cur = nxt.setdefault(prefix, [ninf, ninf])
            cur[0], cur[1] = np.logaddexp(cur[0], b), np.logaddexp(cur[1], nb)

        for prefix, (pb, pnb) in beams.items():
            total = np.logaddexp(pb, pnb)
            for v in cands:
                p = row[v]
                if v == 0:
                    add(prefix, total + p, ninf)
                    continue
                last = prefix[-1] if prefix else None
                if v == last:
                    add(prefix, ninf, pnb + p)                 # "aa" collapses to "a"
                    add(prefix + (v,), ninf, pb + p)           # "a_a" is two symbols
                else:
                    add(prefix + (v,), ninf, total + p)
        beams = _keep_prefixes(nxt, beam) if rank == "prefix" else _keep_states(nxt, beam)
    return list(max(beams.items(), key=lambda kv: np.logaddexp(*kv[1]))[0])


def _keep_prefixes(nxt: dict, beam: int) -> dict:
    """The ``beam`` prefixes of highest total probability, with both of their scores."""
    return dict(sorted(((k, (v[0], v[1])) for k, v in nxt.items()), key=lambda kv: -np.logaddexp(*kv[1]))[:beam])


def _keep_states(nxt: dict, beam: int) -> dict:
    """The ``beam`` highest blank- or symbol-ending scores; a prefix keeps the halves that made it."""
    states = [(v[e], k, e) for k, v in nxt.items() for e in (0, 1) if v[e] > float("-inf")]
    out: dict[tuple, list[float]] = {}
    for score, k, e in heapq.nlargest(beam, states, key=lambda s: s[0]):
        out.setdefault(k, [float("-inf"), float("-inf")])[e] = score
    return {k: (v[0], v[1]) for k, v in out.items()}


def decode_logits(log_probs: torch.Tensor, lengths: torch.Tensor, beam: int = 0) -> list[list[int]]:
    """(B, T', V) log-probs and (B,) lengths -> label ids per utterance; ``beam`` 0: greedy, > 0: beam width."""
    if beam <= 0:
        return greedy_ctc(log_probs, lengths)
    return [beam_ctc(log_probs[b, : lengths[b]], beam) for b in range(len(log_probs))]


@torch.no_grad()
def transcribe_arrays(model: CTCModel, vocab: Vocabulary, arrays: list[np.ndarray], beam: int = 0) -> list[str]:
    """Model inputs of one batch (waveforms (T,) or log-mels (T, F), any lengths) -> their transcripts.

    The batch runs on the model's device; decoding (greedy or beam) reads the
    log-probabilities back on the CPU."""
    b = to_device(collate_arrays(arrays), module_device(model))
    lp, flen = model(b["x"], b["lengths"])
    return [vocab.decode(ids) for ids in decode_logits(lp.float().cpu(), flen.cpu(), beam)]


def load_ctc(model_dir: str | Path, device: torch.device | str = "cpu") -> tuple[CTCModel, Vocabulary]:
    """A saved CTC model folder (``OUT/best`` of finetune-ctc) -> (model in eval mode on ``device``, its vocabulary)."""
    meta = read_config(model_dir, "ctc")
    vocab = Vocabulary(meta["vocab"]["kind"], tuple(meta["vocab"]["symbols"]))
    model = CTCModel(EncoderConfig(**meta["config"]), vocab.size)
    model.load_state_dict(load_state(model_dir))
    return model.to(resolve_device(device)).eval(), vocab  # auto|cpu|cuda|cuda:N or a torch.device
