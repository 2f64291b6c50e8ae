"""Parity of our components with their reference implementations, on small random configurations.

Each ``*_parity(seed)`` function runs ours and the reference on the same weights
and inputs and returns ``{"value": figure, ...details}``; the tests and
``benchmarks/parity.py`` check the figures against their goals. The references
(SpeechBrain, pyctcdecode, transformers, faster-whisper) are test-time packages
(``requirements/parity.txt``); nothing here is imported by the toolkit itself.

SpeechBrain 1.x imports torchaudio at module level in a few files (its audio
backend check and ``nnet.CNN``) without using it in the parts compared here;
:func:`speechbrain_module` imports them with a stand-in for an absent torchaudio,
so the comparison needs no second torch build.
"""
from __future__ import annotations

import heapq
import importlib
import importlib.util
import logging
import sys
import types
from dataclasses import replace

import numpy as np
import torch

from selfspeech.models.ecapa import ECAPATDNN, SpeakerEncoder
from selfspeech.models.ecapa_sb import config_from_state, convert_state

SR = 16_000


class _AbsentTorchaudio(types.ModuleType):
    """What ``import torchaudio`` finds while SpeechBrain modules load; any use raises AttributeError."""

    def __getattr__(self, name: str):
        raise AttributeError(f"torchaudio is not installed (SpeechBrain asked for torchaudio.{name})")


def speechbrain_module(name: str) -> types.ModuleType:
    """``importlib.import_module(name)`` of a SpeechBrain module, torchaudio or not.

    Raises ModuleNotFoundError when SpeechBrain is not installed (``pip install --no-deps
    -r requirements/parity.txt``). The stand-in is removed again once the module is loaded,
    so other libraries still see torchaudio as absent."""
    if importlib.util.find_spec("speechbrain") is None:
        raise ModuleNotFoundError("speechbrain is not installed: pip install --no-deps -r requirements/parity.txt")
    stub = None
    if "torchaudio" not in sys.modules and importlib.util.find_spec("torchaudio") is None:
        stub = sys.modules["torchaudio"] = _AbsentTorchaudio("torchaudio")
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)   # its audio backend check warns that it cannot see a torchaudio version
    try:
        return importlib.import_module(name)
    finally:
        logging.disable(level)
        if stub is not None and sys.modules.get("torchaudio") is stub:
            del sys.modules["torchaudio"]


def reference_versions() -> dict[str, str | None]:
    """Installed versions of the reference packages (None: absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("speechbrain", "pyctcdecode", "transformers", "faster-whisper", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """(seconds * 16000,) float32: a harmonic tone with a moving pitch, bursts and noise (not silence:
    a feature's floor and maximum then come from signal, as on speech)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 60 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wav = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.1 * wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


# ---------------------------------------------------------------- ECAPA-TDNN (Desplanques et al. 2020)

def random_speechbrain_ecapa(seed: int = 0, n_mels: int = 40, channels: int = 64, scale: int = 4):
    """A small SpeechBrain ECAPA_TDNN with random weights and batch-norm statistics, in eval mode."""
    ECAPA_TDNN = speechbrain_module("speechbrain.lobes.models.ECAPA_TDNN").ECAPA_TDNN
    torch.manual_seed(seed)
    sb = ECAPA_TDNN(n_mels, lin_neurons=32, channels=[channels] * 4 + [3 * channels], attention_channels=16,
                    se_channels=16, res2net_scale=scale)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial batch norms: eval mode must use the imported statistics
        for m in sb.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return sb.eval()


@torch.no_grad()
def ecapa_parity(seed: int = 0, n_utts: int = 4) -> dict:
    """Max |embedding difference| of SpeechBrain's ECAPA_TDNN and ours with its state dict imported:
    on random features one utterance at a time (the module), and from waveforms through each side's
    front end (SpeechBrain's Fbank + sentence mean normalisation vs :class:`SpeakerEncoder`)."""
    sb = random_speechbrain_ecapa(seed)
    sd = sb.state_dict()
    cfg = config_from_state(sd, "random SpeechBrain ECAPA", dilations=(2, 3, 4))
    bare = ECAPATDNN(replace(cfg, input_norm="none"))   # the module alone: SpeechBrain normalises outside it
    bare.load_state_dict(convert_state(sd, cfg))
    ours = ECAPATDNN(cfg)
    ours.load_state_dict(convert_state(sd, cfg))
    ours.eval()
    g = torch.Generator().manual_seed(seed)
    module_diff, scale = 0.0, 0.0
    for i in range(n_utts):
        x = torch.randn(1, 50 + 37 * i, cfg.n_mels, generator=g)
        ref = sb(x)[:, 0]
        module_diff = max(module_diff, float((bare.eval()(x) - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    fbank = speechbrain_module("speechbrain.lobes.features").Fbank(n_mels=cfg.n_mels)
    norm = speechbrain_module("speechbrain.processing.features").InputNormalization(norm_type="sentence",
                                                                                    std_norm=False)
    enc = SpeakerEncoder(ours)
    wavs = [speech_like(0.6 + 0.45 * i, seed + i) for i in range(n_utts)]
    mine = enc.embed_batch(wavs)                                  # one padded batch
    pipe_diff = 0.0
    for w, e in zip(wavs, mine):
        feats = norm(fbank(torch.from_numpy(w)[None]), torch.ones(1))
        pipe_diff = max(pipe_diff, float(np.abs(e - sb(feats, torch.ones(1))[0, 0].numpy()).max()))
    return {"value": max(module_diff, pipe_diff), "module_max_diff": module_diff, "pipeline_max_diff": pipe_diff,
            "embedding_max_abs": scale, "utterances": n_utts,
            "config": {"n_mels": cfg.n_mels, "channels": cfg.channels, "scale": cfg.scale}}


# ---------------------------------------------------------------- BEST-RQ (Chiu et al. 2022)

@torch.no_grad()
def bestrq_parity(seed: int = 0, codes: int = 1024, utts: int = 4, draws: int = 400) -> dict:
    """Label agreement of SpeechBrain's ``RandomProjectionQuantizer`` and ours with its projection and
    codebook copied in, on the normalised, stacked log-mel of the BEST-RQ task; and the masking
    statistics of SpeechBrain's ``compute_mask`` against ours (aligned and overlapping layouts)."""
    from selfspeech.audio.features import log_mel_torch
    from selfspeech.models.ssl import normalise_input
    from selfspeech.objectives.quantizers import RandomProjectionQuantizer
    from selfspeech.objectives.tasks import stack_frames

    SBQ = speechbrain_module("speechbrain.nnet.quantisers").RandomProjectionQuantizer
    n_mels, stride = 80, 4
    torch.manual_seed(seed)
    ref = SBQ(stride * n_mels, 16, codes)
    ours = RandomProjectionQuantizer(stride * n_mels, 16, codes)
    ours.proj.copy_(ref.P[None])
    ours.codebook.copy_(ref.CB[None])
    wavs = [torch.from_numpy(speech_like(1.0 + 0.5 * i, seed + i)) for i in range(utts)]
    lengths = torch.tensor([len(w) for w in wavs])
    x, flen = log_mel_torch(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True), lengths, n_mels)
    z = stack_frames(normalise_input(x, flen), stride)                 # (B, T', 4 * n_mels)
    valid = torch.arange(z.shape[1])[None] < (flen // stride)[:, None]
    a, b = ours(z)[..., 0][valid], ref(z)[valid]
    return {"value": float((a == b).float().mean()), "frames": int(valid.sum()), "codes": codes,
            "masking": masking_stats(seed, draws)}


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D bool mask."""
    d = torch.diff(torch.cat([torch.zeros(1), mask.float(), torch.zeros(1)]))
    return ((d == -1).nonzero().flatten() - (d == 1).nonzero().flatten()).tolist()


def masking_stats(seed: int = 0, draws: int = 400, n: int = 200, start_prob: float = 0.04, span: int = 10) -> dict:
    """Mean masked fraction and mean run length of masked frames over ``draws`` utterances of ``n`` frames:
    SpeechBrain's ``compute_mask`` (a frame starts a span with ``start_prob``) and ours with the same
    expected number of spans (``mask_prob = start_prob * span``) in both layouts."""
    import random

    from selfspeech.objectives.masking import span_mask

    compute_mask = speechbrain_module("speechbrain.lobes.models.BESTRQ").compute_mask
    random.seed(seed)
    torch.manual_seed(seed)
    sb = torch.zeros(draws, n, dtype=torch.bool)
    for i in range(draws):
        sb[i, compute_mask((1, n, 80), [n], start_prob, span)] = True
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((draws,), n)
    out = {"speechbrain": sb}
    for layout in ("aligned", "overlap"):
        out[layout] = span_mask(lengths, n, start_prob * span, span, generator=g, layout=layout)
    stats = {}
    for k, m in out.items():
        runs = [r for row in m for r in _runs(row)]
        stats[k] = {"fraction": round(float(m.float().mean()), 4), "mean_run": round(float(np.mean(runs)), 3),
                    "min_run": int(min(runs))}
    return {**stats, "frames": n, "start_prob": start_prob, "span": span, "draws": draws}


# ---------------------------------------------------------------- Whisper front end (Radford et al. 2022)

def whisper_logmel_parity(seed: int = 0) -> dict:
    """Max |difference| of our Whisper log-mel and the references' on the frames where they agree by
    convention; the trimmed encoder against the stock one on 30-s input (:func:`whisper_encoder_parity`).

    - transformers' ``WhisperFeatureExtractor`` pads the audio with zeros to 30 s before its STFT, so
      the last two frames of a shorter utterance (whose windows reach past its end) see zeros where ours
      mirror the audio, and the frames after it hold the floor ``max - 2``: all frames are compared on
      30-s audio, the frames whose window lies inside the audio on shorter; with ``padding="longest"``
      (the student's input) every frame is compared.
    - faster-whisper appends 160 zero samples (one hop) before its STFT and pads the log-mel itself with
      zeros after the real frames (``pad_or_trim``), not with the floor: the frames inside the audio are
      compared; the padding values are reported.
    """
    from faster_whisper.feature_extractor import FeatureExtractor
    from transformers import WhisperFeatureExtractor

    from selfspeech.audio.features import log_mel

    hf, fw = WhisperFeatureExtractor(feature_size=80), FeatureExtractor(feature_size=80)
    diffs = {"transformers_30s": 0.0, "transformers_longest": 0.0, "transformers_interior": 0.0,
             "faster_whisper_interior": 0.0}
    for i, secs in enumerate((30.0, 3.3, 7.05, 12.4)):
        wav = speech_like(secs, seed + i)
        ours = log_mel(wav)
        inner = (len(wav) - 200) // 160                     # frames whose window ends inside the audio
        t30 = hf(wav, sampling_rate=SR, return_tensors="np").input_features[0]
        key = "transformers_30s" if secs == 30.0 else "transformers_interior"
        cut = ours.shape[1] if secs == 30.0 else inner
        diffs[key] = max(diffs[key], float(np.abs(t30[:, :cut] - ours[:, :cut]).max()))
        tl = hf(wav, sampling_rate=SR, padding="longest", return_tensors="np").input_features[0]
        diffs["transformers_longest"] = max(diffs["transformers_longest"], float(np.abs(tl - ours).max()))
        f = fw(wav)
        diffs["faster_whisper_interior"] = max(diffs["faster_whisper_interior"],
                                               float(np.abs(f[:, :inner] - ours[:, :inner]).max()))
    short = speech_like(2.0, seed)
    pad = {"ours_pad_features": "max - 2 (the value transformers' 30-s zero audio gets)",
           "transformers_padded_frame_minus_max": float(hf(short, sampling_rate=SR, return_tensors="np")
                                                        .input_features[0][:, -1].max() - log_mel(short).max()),
           "faster_whisper_padded_frame": 0.0}
    return {"value": max(diffs.values()), **diffs, "padding": pad, "encoder": whisper_encoder_parity(seed)}


@torch.no_grad()
def whisper_encoder_parity(seed: int = 0, frames: int = 600) -> dict:
    """The trimmed-input encoder (:func:`selfspeech.models.whisper.encode`) against transformers' stock
    encoder on a small random Whisper: on 3000 frames they must agree exactly; on ``frames`` real frames
    the stock encoder gets them padded to 3000 with the floor (max - 2) and its first ``frames / 2``
    outputs are compared. These differ by design: the stock encoder's self-attention also attends to the
    padding, the trimmed one cannot (the student is fine-tuned on trimmed input)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from selfspeech.audio.features import log_mel
    from selfspeech.models.whisper import encode, pad_features

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128, num_mel_bins=80, pad_token_id=1,
        bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)).eval()
    x = torch.from_numpy(log_mel(speech_like(30.0, seed)))[None]
    full = float((encode(model, x) - model.get_encoder()(x).last_hidden_state).abs().max())
    short = x[0, :, :frames]
    padded = pad_features([short], trim=False)[0]
    stock = model.get_encoder()(padded).last_hidden_state[:, : frames // 2]
    trimmed = encode(model, short[None])
    return {"max_diff_30s": full, "max_diff_trimmed_vs_padded": float((stock - trimmed).abs().max()),
            "output_max_abs": float(stock.abs().max()), "frames": frames}


# ---------------------------------------------------------------- CTC prefix beam search (Hannun et al. 2014)

def aligned_log_probs(gen: np.random.Generator, V: int, n_labels: int, peak: float, noise: float) -> np.ndarray:
    """(T, V) CTC-like log-probabilities: a random label sequence aligned with blanks (0) and repeats,
    ``peak`` on the aligned symbol of each frame plus Gaussian ``noise`` on every logit, so that
    competing paths exist as in a trained model's output."""
    path: list[int] = []
    for i in gen.integers(1, V, n_labels):
        path += [0] * int(gen.integers(0, 3)) + [int(i)] * int(gen.integers(1, 4))
    path += [0] * int(gen.integers(0, 3))
    logits = gen.standard_normal((len(path), V)) * noise
    logits[np.arange(len(path)), path] += peak
    return (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)).astype(np.float32)


def _path_logp(lp: np.ndarray, ids: list[int]) -> float:
    """Exact log P(label sequence | log-probs) by the CTC forward algorithm."""
    if not ids:
        return float(lp[:, 0].sum())
    return -float(torch.nn.functional.ctc_loss(torch.from_numpy(lp)[:, None], torch.tensor([ids]),
                                               torch.tensor([len(lp)]), torch.tensor([len(ids)]), reduction="sum"))


def exact_best_labelling(lp: np.ndarray, max_expansions: int = 5000) -> tuple[tuple[int, ...], float] | None:
    """The most probable label sequence of (T, V) log-probs (blank 0) and its log-probability, exactly:
    best-first prefix search (Graves et al. 2006, sec. 3.2). A prefix's probability (of every labelling
    that starts with it) bounds each of its extensions, so the search stops when no open prefix can beat
    the best labelling found. None when that takes more than ``max_expansions`` expanded prefixes."""
    lp = lp.astype(np.float64)
    T, V = lp.shape
    ks = np.arange(1, V)
    # forward variables over t = 0..T frames consumed: gb ends in blank, gn in the prefix's last symbol
    gb = np.concatenate([[0.0], np.cumsum(lp[:, 0])])
    gn = np.full(T + 1, -np.inf)
    best, best_lp = (), float(gb[T])
    heap, count = [(-0.0, 0, (), gb, gn)], 1
    for _ in range(max_expansions):
        if not heap or -heap[0][0] <= best_lp:
            return best, best_lp
        _, _, prefix, gb, gn = heapq.heappop(heap)
        last = prefix[-1] if prefix else -1
        ngb, ngn = np.full((T + 1, V - 1), -np.inf), np.full((T + 1, V - 1), -np.inf)
        pref = np.full(V - 1, -np.inf)
        for t in range(1, T + 1):
            start = np.where(ks == last, gb[t - 1], np.logaddexp(gb[t - 1], gn[t - 1]))  # "a_a" or "ab"
            emit = lp[t - 1, 1:] + start
            pref = np.logaddexp(pref, emit)
            ngn[t] = np.logaddexp(emit, lp[t - 1, 1:] + ngn[t - 1])
            ngb[t] = lp[t - 1, 0] + np.logaddexp(ngb[t - 1], ngn[t - 1])
        whole = np.logaddexp(ngb[T], ngn[T])
        for j, k in enumerate(ks.tolist()):
            if whole[j] > best_lp:
                best, best_lp = prefix + (k,), float(whole[j])
        for j, k in enumerate(ks.tolist()):
            if pref[j] > best_lp:
                heapq.heappush(heap, (-float(pref[j]), count, prefix + (k,), ngb[:, j], ngn[:, j]))
                count += 1
    return None


def ctc_beam_parity(seed: int = 0, utts: int = 200, beam: int = 16, noise: float = 0.9,
                    hard_noise: float = 1.5, exact: bool = True) -> dict:
    """Fraction of utterances on which our CTC prefix beam search with pyctcdecode's ranking
    (``rank="state"``) and ``pyctcdecode`` (no language model, no pruning: ``beam_prune_logp`` and
    ``token_min_logp`` -1e9, ``prune_history`` off) give the same best path, over two sets of posteriors:
    confident with competing paths (``noise`` 0.9) and flatter (``hard_noise`` 1.5); the share of
    utterances whose best path the beam changes from greedy's is reported per set.

    The two rankings differ by design in what a beam slot holds (see :func:`beam_ctc`): pyctcdecode ranks
    each prefix's blank- and symbol-ending scores separately, our default ranks prefixes by their total
    (Hannun et al. 2014). Where the width binds they keep different hypotheses; per set the default's
    agreement with pyctcdecode is reported, and on the disagreements ``ours_more_probable`` counts those
    where the default's best path has the higher exact probability (forward algorithm). With ``exact``,
    each search's best path on the first set is checked against the exact best labelling
    (:func:`exact_best_labelling`)."""
    from pyctcdecode import build_ctcdecoder

    from selfspeech.models.ctc import beam_ctc, greedy_ctc

    V = 8
    labels = [""] + [chr(ord("a") + i) for i in range(V - 1)]
    logging.getLogger("pyctcdecode").setLevel(logging.ERROR)   # "no space token": none is needed here
    dec = build_ctcdecoder(labels)
    out, same_state = {}, 0
    for name, sigma in (("headline", noise), ("hard", hard_noise)):
        gen = np.random.default_rng(seed)
        n = {k: 0 for k in ("state", "prefix", "ours_better", "not_greedy", "resolved", "exact_greedy",
                            "exact_prefix", "exact_pyctcdecode")}
        for _ in range(utts):
            lp = aligned_log_probs(gen, V, int(gen.integers(3, 12)), 4.0, sigma)
            # float64 for pyctcdecode: it then adds the same values in the same precision as ours
            ref = tuple(labels.index(c) for c in dec.decode_beams(
                lp.astype(np.float64), beam_width=beam, beam_prune_logp=-1e9, token_min_logp=-1e9,
                prune_history=False)[0][0])
            x = torch.from_numpy(lp)
            ours, state = tuple(beam_ctc(x, beam)), tuple(beam_ctc(x, beam, rank="state"))
            greedy = tuple(greedy_ctc(x[None], torch.tensor([len(lp)]))[0])
            n["state"] += state == ref
            n["prefix"] += ours == ref
            n["not_greedy"] += ours != greedy or ref != greedy
            if ours != ref:
                n["ours_better"] += _path_logp(lp, list(ours)) > _path_logp(lp, list(ref))
            best = exact_best_labelling(lp) if exact and name == "headline" else None
            if best is not None:
                n["resolved"] += 1
                for key, path in (("exact_greedy", greedy), ("exact_prefix", ours), ("exact_pyctcdecode", ref)):
                    n[key] += path == best[0]
        same_state += n["state"]
        out[name] = {"agreement": n["state"] / utts, "noise": sigma, "beam_differs_from_greedy": n["not_greedy"] / utts,
                     "default_rank_agreement": n["prefix"] / utts, "default_rank_disagreements": utts - n["prefix"],
                     "ours_more_probable": n["ours_better"]}
        if n["resolved"]:
            out[name]["exact_best"] = {"resolved": n["resolved"], **{k[6:]: n[k] / n["resolved"] for k in
                                                                     ("exact_greedy", "exact_prefix", "exact_pyctcdecode")}}
    return {"value": same_state / (2 * utts), "utterances": 2 * utts, "beam": beam, "vocab": V, **out}
