"""CTC fine-tuning of a (pretrained or scratch) speech encoder for phones or characters.

As in wav2vec 2.0's fine-tuning (Baevski et al. 2020, sec. 4.3): a linear
output layer on the encoder, CTC loss (Graves et al. 2006), time masking with
the learned mask embedding and channel masking on the front-end features, the
encoder frozen for the first ``freeze_steps`` updates (only the new output layer
learns while it is random), early stopping on a labelled dev set's error rate.
Utterances whose targets cannot be built (a word missing from the lexicon) or
cannot be aligned (more target tokens than frames) are skipped and counted.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfspeech.audio.io import AudioError
from selfspeech.data.audio_dataset import AudioDataset, check_lengths, collate_arrays
from selfspeech.data.manifest import read_manifest, unique_ids, write_manifest
from selfspeech.models.ssl import EncoderConfig, SpeechEncoder, load_state, read_config, save_encoder
from selfspeech.objectives.masking import span_mask
from selfspeech.text.phones import Lexicon, Vocabulary
from selfspeech.train import distributed as D
from selfspeech.train.checkpoint import write_json
from selfspeech.train.loop import loop_config, resolved_configs, train_loop
from selfspeech.train.sampler import BucketBatchSampler


@dataclass(frozen=True)
class CTCConfig:
    targets: str = "phone"              # phone | char
    lexicon: str | None = None          # phone targets: WORD<TAB>PHONES file
    encoder: dict = field(default_factory=dict)   # scratch runs: EncoderConfig fields ("preset" allowed)
    loop: dict = field(default_factory=dict)
    freeze_steps: int = 0               # encoder frozen, output layer only
    mask_time_prob: float = 0.05        # wav2vec 2.0 fine-tuning (Table 7, 10-min/1-h setups: 0.05-0.075)
    mask_time_span: int = 5
    mask_channel_prob: float = 0.1
    mask_channel_span: int = 8
    max_batch_seconds: float = 60.0
    # Seed of the weight initialisation (the output layer; the whole model from scratch). None: the
    # loop's seed, which also draws batch order and masks; set it to tell apart which of them a
    # run-to-run difference (e.g. a run stuck on CTC's blank plateau) comes from.
    init_seed: int | None = None
    # Output layer init. None: PyTorch's default (uniform +-1/sqrt(d_model)); "zero": every token
    # starts with the same logit. Which fine-tunes of a pretrained encoder stay on CTC's blank
    # plateau is decided by the random output layer alone (benchmarks/ssl_pretraining.py
    # --ctc-seed-split); a zero layer did not avoid it, it stayed there too (RESULTS.md, "Which
    # seed causes the blank plateau"), so the default stays random.
    head_init: str | None = None
    # Top Transformer layers of a pretrained encoder drawn afresh (with its final layer norm) before
    # fine-tuning: their weights are the ones a scratch model of the same init seed starts from.
    # Pasad et al. 2021 (arXiv 2107.04734) find wav2vec 2.0's last layers drift from phonetic
    # content back towards the pretext target, and that re-initialising them helps low-resource
    # fine-tuning. None / 0: keep every pretrained layer.
    reinit_top: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
        """(B, T[, F]) -> log-probs (B, T', V) and lengths T'."""
        feats, flen = self.encoder.features(x, lengths)
        if channel_mask is not None:
            feats = feats.masked_fill(channel_mask[:, None, :], 0.0)
        h = self.encoder.encode(feats, flen, time_mask)[-1]
        return self.head(h).log_softmax(-1), flen


def greedy_ctc(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, repeats collapsed, blanks (0) removed."""
    out = []
    for lp, n in zip(log_probs.argmax(-1), lengths.tolist()):
        ids = torch.unique_consecutive(lp[:n]).tolist()
        out.append([i for i in ids if i != 0])
    return out


def beam_ctc(log_probs: torch.Tensor, beam: int = 8) -> list[int]:
    """CTC prefix beam search without a language model (Hannun et al. 2014, alg. 1) for one
    utterance: (T, V) log-probs -> the most probable label sequence (blank = 0).

    Each prefix keeps two log-scores, ending in blank and not; a repeated symbol
    extends a prefix only through a blank. beam=1 is not greedy decoding: it ranks
    prefixes, greedy ranks frames.
    """
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
        beams = dict(sorted(((k, (v[0], v[1])) for k, v in nxt.items()),
                            key=lambda kv: -np.logaddexp(*kv[1]))[:beam])
    return list(max(beams.items(), key=lambda kv: np.logaddexp(*kv[1]))[0])


def _channel_mask(B: int, C: int, prob: float, span: int, gen=None) -> torch.Tensor | None:
    if prob <= 0:
        return None
    return span_mask(torch.full((B,), C, dtype=torch.long), C, prob, min(span, C), min_spans=0, generator=gen)


def prepare_items(manifest, vocab: Vocabulary, lexicon: Lexicon | None, enc: EncoderConfig) -> tuple[list, dict]:
    """Manifest items with ``tokens`` (int ids) added, and counts of skipped utterances by reason."""
    keep, skipped, missing_words = [], {}, {}
    items, dup = unique_ids(read_manifest(manifest))
    if dup:
        skipped["duplicate_id"] = len(dup)
    fps = 100 / enc.stride if enc.frontend == "mel" else 16_000 / enc.stride
    items, short = check_lengths(items, (enc.receptive_field + enc.stride) / (100 if enc.frontend == "mel" else 16_000))
    if short:
        skipped["too_short"] = len(short)
    for it in items:
        if "\ufffd" in str(it.get("text") or ""):  # bytes that were not UTF-8: no trustworthy target
            skipped["non_text"] = skipped.get("non_text", 0) + 1
            continue
        toks, problems = vocab.tokens(str(it.get("text") or ""), lexicon)
        if problems:
            skipped["missing_words"] = skipped.get("missing_words", 0) + 1
            for w in problems:
                missing_words.setdefault(w, []).append(it["id"])
            continue
        if not toks:
            skipped["empty_text"] = skipped.get("empty_text", 0) + 1
            continue
        if len(toks) > float(it["duration"]) * fps - 1:
            skipped["more_tokens_than_frames"] = skipped.get("more_tokens_than_frames", 0) + 1
            continue
        keep.append({**it, "tokens": vocab.encode(toks)})
    if missing_words:
        skipped["missing_word_list"] = {w: ids[:5] for w, ids in sorted(missing_words.items())}
    return keep, skipped


def _model_and_vocab(cfg: CTCConfig, init: str | Path | None) -> tuple[CTCModel, EncoderConfig, Vocabulary, Lexicon | None]:
    lexicon = Lexicon.read(cfg.lexicon) if cfg.targets == "phone" else None
    if cfg.targets == "phone" and lexicon is None:
        raise ValueError("phone targets need `lexicon`")
    vocab = Vocabulary.for_phones(lexicon) if cfg.targets == "phone" else Vocabulary.for_chars()
    if init is not None:
        meta = read_config(init, "ssl_encoder")
        enc = EncoderConfig(**meta["config"])
    else:
        kw = dict(cfg.encoder)
        preset = kw.pop("preset", None)
        enc = EncoderConfig.preset(preset, **kw) if preset else EncoderConfig(**kw)
    model = CTCModel(enc, vocab.size, cfg.head_init)
    if init is not None:
        fresh = top_layer_state(model.encoder, cfg.reinit_top or 0)
        model.encoder.load_state_dict(load_state(init))
        model.encoder.load_state_dict(fresh, strict=False)
    elif cfg.reinit_top:
        raise ValueError("reinit_top re-initialises layers of a pretrained encoder: give `init`, or set it to 0")
    return model, enc, vocab, lexicon


def top_layer_state(encoder: nn.Module, n: int) -> dict[str, torch.Tensor]:
    """Copies of the weights of the top ``n`` Transformer layers and the output layer norm (empty for 0)."""
    layers = len(encoder.layers)
    if not 0 <= n <= layers:
        raise ValueError(f"reinit_top {n}: the encoder has {layers} Transformer layers; use 0..{layers}")
    if n == 0:
        return {}
    keep = tuple(f"layers.{i}." for i in range(layers - n, layers)) + ("out_norm.",)
    return {k: v.clone() for k, v in encoder.state_dict().items() if k.startswith(keep)}


def finetune_ctc(train_manifest, dev_manifest, out_dir, cfg: CTCConfig, init: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Fine-tune ``init`` (an ``ssl_encoder`` directory, or None for scratch) with CTC; best model in ``out_dir/best``."""
    out = Path(out_dir)
    env = D.init_from_env()  # torchrun: data parallel over its processes
    loop_cfg = loop_config(cfg.loop)
    torch.manual_seed(loop_cfg.seed if cfg.init_seed is None else cfg.init_seed)  # the loop reseeds for the rest
    model, enc, vocab, lexicon = _model_and_vocab(cfg, init)
    train, skip_train = prepare_items(train_manifest, vocab, lexicon, enc)
    dev, skip_dev = prepare_items(dev_manifest, vocab, lexicon, enc)
    data = AudioDataset(train, enc.frontend, enc.n_mels)
    dev_data = AudioDataset(dev, enc.frontend, enc.n_mels)
    for ds, skips in ((data, skip_train), (dev_data, skip_dev)):  # bad audio: counted, not a crash mid-run
        bad = ds.screen(progress and env.main)
        if bad:
            skips["bad_audio"] = len(bad)
            skips["bad_audio_list"] = {s.id: s.reason for s in bad[:20]}
    train, dev = data.items, dev_data.items
    if not train or not dev:
        raise ValueError(f"no usable utterance left (train skipped {skip_train}, dev skipped {skip_dev})")
    sampler = D.shard(BucketBatchSampler(data.durations(), max_batch_seconds=cfg.max_batch_seconds,
                                         seed=loop_cfg.seed))

    def collate(idx, rng):
        b = data.collate(idx, rng)
        b["tokens"] = [train[i]["tokens"] for i in idx]
        return b

    def loss_fn(batch, step):
        x, lengths = batch["x"], batch["lengths"]
        flen = enc.out_lengths(lengths)
        tmask = span_mask(flen, int(flen.max()), cfg.mask_time_prob, min(cfg.mask_time_span, int(flen.min())),
                          min_spans=0) if cfg.mask_time_prob > 0 else None
        cmask = _channel_mask(x.shape[0], model.encoder.feat_dim, cfg.mask_channel_prob, cfg.mask_channel_span)
        if step < cfg.freeze_steps:
            with torch.no_grad():
                feats, flen = model.encoder.features(x, lengths)
                h = model.encoder.encode(feats, flen, tmask)[-1]
            lp = model.head(h).log_softmax(-1)
        else:
            lp, flen = model(x, lengths, tmask, cmask)
        tgt = [torch.tensor(t) for t in batch["tokens"]]
        loss = F.ctc_loss(lp.transpose(0, 1), torch.cat(tgt), flen, torch.tensor([len(t) for t in tgt]),
                          blank=0, zero_infinity=True)
        return loss, {"frozen": step < cfg.freeze_steps}

    def evaluate() -> dict:
        hyps = decode_items(model, dev_data, vocab)
        refs = [vocab.decode(it["tokens"]) for it in dev]
        import jiwer  # corpus-level token error rate (PER for phones): total edits / reference tokens

        rate = float(jiwer.wer(refs, hyps))
        return {"metric": rate, "dev_error_rate": rate}

    def write_model(d: Path) -> None:
        save_encoder(model, enc, d, kind="ctc", extra={"vocab": {"kind": vocab.kind, "symbols": list(vocab.symbols)},
                                                        "ctc": cfg.to_dict(), "init": str(init) if init else None})

    state = train_loop(model, loss_fn, sampler, collate, loop_cfg, out, write_model,
                       {"ctc": cfg.to_dict(), "init": str(init) if init else None, "train": str(train_manifest),
                        "dev": str(dev_manifest),
                        "resolved": resolved_configs(loop=loop_cfg, encoder=enc)},
                       evaluate=evaluate, progress=progress, desc="finetune-ctc")
    if not env.main:
        return {}
    summary = {"best_dir": str(out / "best"), "best_dev_error_rate": state["best"], "best_step": state["best_step"],
               "steps": state["step"], "train_seconds": round(state["seconds"], 1), "n_train": len(train),
               "n_dev": len(dev), "skipped": {"train": skip_train, "dev": skip_dev}, "targets": cfg.targets}
    write_json(out / "summary.json", summary)
    return summary


@torch.no_grad()
def decode_items(model: CTCModel, data: AudioDataset, vocab: Vocabulary, max_batch_seconds: float = 120.0,
                 beam: int = 0, failed: dict | None = None) -> list[str]:
    """Transcripts in item order. With ``failed`` (a dict), an item whose audio cannot be
    loaded gets "" and ``failed[index] = reason`` instead of stopping the run."""
    was = model.training
    model.eval()
    order = BucketBatchSampler(data.durations(), max_batch_seconds=max_batch_seconds, shuffle=False)
    out: dict[int, str] = {}
    for idx in order.batches(0):
        xs = []
        for i in idx:
            try:
                xs.append(data.load(i))
            except (AudioError, ValueError) as e:
                if failed is None:
                    raise
                failed[i], out[i] = str(e), ""
        idx = [i for i in idx if i not in out]
        if not idx:
            continue
        b = collate_arrays(xs)
        lp, flen = model(b["x"], b["lengths"])
        paths = greedy_ctc(lp, flen) if beam <= 0 else [beam_ctc(lp[b, : flen[b]], beam) for b in range(len(idx))]
        for i, ids in zip(idx, paths):
            out[i] = vocab.decode(ids)
    model.train(was)
    return [out[i] for i in range(len(data))]


def load_ctc(model_dir: str | Path) -> tuple[CTCModel, Vocabulary]:
    meta = read_config(model_dir, "ctc")
    vocab = Vocabulary(meta["vocab"]["kind"], tuple(meta["vocab"]["symbols"]))
    model = CTCModel(EncoderConfig(**meta["config"]), vocab.size)
    model.load_state_dict(load_state(model_dir))
    return model.eval(), vocab


def transcribe_ctc(model_dir: str | Path, manifest, out_jsonl, beam: int = 0) -> Path:
    """CTC output of every utterance -> JSONL ``{"id", "text"}`` (phones or words, space-separated).

    ``beam`` 0: greedy (best path); > 0: prefix beam search of that width (no LM)."""
    model, vocab = load_ctc(model_dir)
    items = list(read_manifest(manifest))
    failed: dict[int, str] = {}
    hyps = decode_items(model, AudioDataset(items, model.encoder.cfg.frontend, model.encoder.cfg.n_mels, cache=False),
                        vocab, beam=beam, failed=failed)
    # an utterance whose audio failed keeps its line (empty text, status and reason): scored as all deletions
    write_manifest(out_jsonl, ({"id": it["id"], "text": h} | ({"status": "failed", "reason": failed[n]}
                                                               if n in failed else {})
                               for n, (it, h) in enumerate(zip(items, hyps))))
    return Path(out_jsonl)


def phone_references(manifest, lexicon_path, out_jsonl) -> tuple[Path, dict]:
    """Reference manifest with text = phone string (for PER with ``selfspeech eval``); skips counted."""
    lex = Lexicon.read(lexicon_path)
    keep, missing = [], {}
    for it in read_manifest(manifest):
        ph, miss = lex.convert(str(it.get("text") or ""))
        if miss:
            missing[it["id"]] = miss
            continue
        keep.append({**it, "text": " ".join(ph)})
    write_manifest(out_jsonl, keep)
    return Path(out_jsonl), missing

