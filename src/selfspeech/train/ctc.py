"""CTC fine-tuning of a (pretrained or scratch) speech encoder for phones or characters.

As in wav2vec 2.0's fine-tuning (Baevski et al. 2020, sec. 4.3): a linear
output layer on the encoder (:mod:`selfspeech.models.ctc`), CTC loss with time
and channel masking and the encoder frozen for the first ``freeze_steps``
updates (:mod:`selfspeech.objectives.ctc`), early stopping on a labelled dev
set's error rate. Decoding a manifest: :func:`selfspeech.label.transcribe.transcribe_ctc`.
Utterances whose targets cannot be built (a word missing from the lexicon) or
cannot be aligned (more target tokens than frames) are skipped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from selfspeech.config import checked, from_mapping, invalid, resolve_sub_config, sub_config, to_mapping, typed_fields
from selfspeech.data.audio_dataset import AudioDataset, check_lengths
from selfspeech.data.manifest import read_manifest, unique_ids, write_manifest
from selfspeech.models.ctc import CTCModel, top_layer_state, transcribe_arrays
from selfspeech.models.hf_wav2vec2 import is_hf_dir, load_checked, read_hf_dir
from selfspeech.models.ssl import EncoderConfig, load_state, read_config, save_encoder
from selfspeech.objectives.ctc import CTCTask
from selfspeech.text.phones import Lexicon, Vocabulary
from selfspeech.train import distributed as D
from selfspeech.train.loop import LoopConfig, train_loop
from selfspeech.train.runs import SECTIONS, write_summary
from selfspeech.train.sampler import BucketBatchSampler


@dataclass(frozen=True)
class CTCConfig:
    targets: Literal["phone", "char"] = "phone"  # output tokens: phones (words looked up in lexicon) or letters
    lexicon: str | None = None          # phone targets: WORD<TAB>PHONES file
    # scratch runs: EncoderConfig fields ("preset" allowed); a pretrained `init` brings its own
    encoder: EncoderConfig = sub_config(dict)
    loop: LoopConfig = field(default_factory=LoopConfig)  # optimiser, schedule, budget, checkpoints, device
    freeze_steps: int = checked(0, ge=0)  # encoder frozen, output layer only
    mask_time_prob: float = checked(0.05, ge=0, le=1)  # wav2vec 2.0 fine-tuning (Table 7, 10-min/1-h: 0.05-0.075)
    mask_time_span: int = checked(5, ge=1)  # output frames per masked time span
    mask_channel_prob: float = checked(0.1, ge=0, le=1)  # fraction of feature channels zeroed in spans (0: off)
    mask_channel_span: int = checked(8, ge=1)  # feature channels per masked channel span
    max_batch_seconds: float = checked(60.0, gt=0)  # padded seconds of audio per training batch (B * longest)
    # Seed of the weight initialisation (the output layer; the whole model from scratch). None: the
    # loop's seed, which also draws batch order and masks; set it to tell apart which of them a
    # run-to-run difference (e.g. a run stuck on CTC's blank plateau) comes from.
    init_seed: int | None = None
    # Output layer init. None: PyTorch's default (uniform +-1/sqrt(d_model)); "zero": every token
    # starts with the same logit. Which fine-tunes of a pretrained encoder stay on CTC's blank
    # plateau is decided by the random output layer alone (benchmarks/ssl_pretraining.py
    # --ctc-seed-split); a zero layer did not avoid it, it stayed there too (RESULTS.md, "Which
    # seed causes the blank plateau"), so the default stays random.
    head_init: Literal["zero"] | None = None
    # Top Transformer layers of a pretrained encoder drawn afresh (with its final layer norm) before
    # fine-tuning: their weights are the ones a scratch model of the same init seed starts from.
    # Pasad et al. 2021 (arXiv 2107.04734) find wav2vec 2.0's last layers drift from phonetic
    # content back towards the pretext target, and that re-initialising them helps low-resource
    # fine-tuning. None / 0: keep every pretrained layer.
    reinit_top: int | None = checked(None, ge=0)

    def __post_init__(self):
        typed_fields(self)
        if self.targets == "phone" and not self.lexicon:
            raise invalid("lexicon", self.lexicon, "not set although targets is phone",
                          "give a WORD<TAB>PHONES lexicon file (--lexicon), or targets: char")
        resolve_sub_config(self, "encoder", EncoderConfig)  # bad encoder keys are refused here, named encoder.*

    def encoder_config(self) -> EncoderConfig:
        """The scratch encoder (a pretrained ``init`` brings its own)."""
        return self.encoder

    def to_dict(self) -> dict:
        return to_mapping(self)


SECTIONS["ctc"] = lambda d: from_mapping(CTCConfig, d, "CTC config").to_dict()


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
    vocab = Vocabulary.for_phones(lexicon) if cfg.targets == "phone" else Vocabulary.for_chars()
    hf = init is not None and is_hf_dir(init)   # a transformers wav2vec 2.0 / XLSR folder
    if hf:
        ckpt = read_hf_dir(init)
        enc = ckpt.encoder
    elif init is not None:
        meta = read_config(init, "ssl_encoder")
        enc = EncoderConfig(**meta["config"])
    else:
        enc = cfg.encoder_config()
    model = CTCModel(enc, vocab.size, cfg.head_init)
    if init is not None:
        fresh = top_layer_state(model.encoder, cfg.reinit_top or 0)
        if hf:   # a checkpoint without a mask embedding keeps the fresh one
            state = {k[len("encoder."):]: v for k, v in ckpt.state.items() if k.startswith("encoder.")}
            load_checked(model.encoder, state, init, optional=("mask_emb",))
        else:
            model.encoder.load_state_dict(load_state(init))
        model.encoder.load_state_dict(fresh, strict=False)
    elif cfg.reinit_top:
        raise ValueError("reinit_top re-initialises layers of a pretrained encoder: give `init`, or set it to 0")
    return model, enc, vocab, lexicon


def finetune_ctc(train_manifest, dev_manifest, out_dir, cfg: CTCConfig, init: str | Path | None = None,
                 progress: bool = True) -> dict:
    """Fine-tune ``init`` with CTC; best model in ``out_dir/best``. ``init``: an ``ssl_encoder`` directory
    (OUT/encoder of pretrain), a transformers wav2vec 2.0 / XLSR folder (its encoder), or None (scratch)."""
    out = Path(out_dir)
    env = D.init_from_env(cfg.loop.device)  # torchrun: data parallel over its processes
    loop_cfg = cfg.loop
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

    def evaluate() -> dict:  # the loop has put the model in eval mode
        hyps = [""] * len(dev)
        for idx in BucketBatchSampler(dev_data.durations(), max_batch_seconds=120.0, shuffle=False).batches(0):
            for i, h in zip(idx, transcribe_arrays(model, vocab, [dev_data.load(i) for i in idx])):
                hyps[i] = h
        refs = [vocab.decode(it["tokens"]) for it in dev]
        import jiwer  # corpus-level token error rate (PER for phones): total edits / reference tokens

        rate = float(jiwer.wer(refs, hyps))
        return {"metric": rate, "dev_error_rate": rate}

    def write_model(d: Path) -> None:
        save_encoder(model, enc, d, kind="ctc", extra={"vocab": {"kind": vocab.kind, "symbols": list(vocab.symbols)},
                                                        "ctc": cfg.to_dict(), "init": str(init) if init else None})

    state = train_loop(model, CTCTask(model, cfg).loss, sampler, collate, loop_cfg, out, write_model,
                       {"ctc": cfg.to_dict(), "init": str(init) if init else None, "train": str(train_manifest),
                        "dev": str(dev_manifest)},
                       evaluate=evaluate, progress=progress, desc="finetune-ctc")
    if not env.main:
        return {}
    summary = {"best_dir": str(out / "best"), "best_dev_error_rate": state["best"], "best_step": state["best_step"],
               "steps": state["step"], "train_seconds": round(state["seconds"], 1), "n_train": len(train),
               "n_dev": len(dev), "skipped": {"train": skip_train, "dev": skip_dev}, "targets": cfg.targets}
    write_summary(out, summary)
    return summary


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

