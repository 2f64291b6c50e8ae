"""Tiny random Whisper checkpoints of every family, laid out like the real ones.

Each toy has the real vocabulary size and special-token ids of its family (so
language and task tokens sit where transformers and faster-whisper look for
them) but d_model 64 and 2-4 layers:

| family | vocab | mel bins | layers (enc/dec) | languages |
| tiny.en | 51864 | 80 | 2/2 | English |
| base | 51865 | 80 | 2/2 | 99 |
| large-v3 | 51866 | 128 | 2/2 | 100 |
| distil-large-v3 | 51866 | 128 | 4/2 | 100 |
"""
from __future__ import annotations

from pathlib import Path

FAMILIES = {  # name: (vocab_size, num_mel_bins, encoder_layers, decoder_layers)
    "tiny.en": (51864, 80, 2, 2),
    "base": (51865, 80, 2, 2),
    "large-v3": (51866, 128, 2, 2),
    "distil-large-v3": (51866, 128, 4, 2),
}


def _specials(vocab_size: int) -> tuple[int, list[str]]:
    """(id of <|endoftext|>, special tokens in id order, timestamps last), as openai/whisper lays them out."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    langs = list(LANGUAGES)[: 100 if vocab_size == 51866 else 99]
    nospeech = "<|nospeech|>" if vocab_size == 51866 else "<|nocaptions|>"
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{c}|>" for c in langs], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", nospeech, "<|notimestamps|>",
                *[f"<|{i * 0.02:.2f}|>" for i in range(1501)]]
    return vocab_size - len(specials), specials


def _tokenizer(out: Path, vocab_size: int) -> dict[str, int]:
    """A byte-level BPE without merges, padded with filler tokens to the family's regular vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperTokenizerFast

    eot, specials = _specials(vocab_size)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"fill{i}": i for i in range(len(alphabet), eot)})
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.save(str(out / "tokenizer.json"))
    WhisperTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), pad_token="<|endoftext|>",
                         unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                         eos_token="<|endoftext|>").save_pretrained(out)
    return {s: eot + i for i, s in enumerate(specials)}


def _generation_config(ids: dict[str, int], multilingual: bool, max_length: int):
    from transformers import GenerationConfig

    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    gen = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot,
                           bos_token_id=eot, max_length=max_length, is_multilingual=multilingual,
                           suppress_tokens=[], begin_suppress_tokens=[220, eot],
                           no_timestamps_token_id=ids["<|notimestamps|>"], return_timestamps=False)
    if multilingual:
        gen.lang_to_id = {t: i for t, i in ids.items() if sot < i < ids["<|translate|>"]}
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return gen


def make_toy(out: Path, family: str, seed: int = 0) -> Path:
    """Write a random ``family`` Whisper (config, safetensors, tokenizer, preprocessor) into ``out``."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    vocab, n_mels, enc, dec = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    ids = _tokenizer(out, vocab)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=vocab, num_mel_bins=n_mels, d_model=64, encoder_layers=enc, decoder_layers=dec,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=64,
                        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=sot)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = _generation_config(ids, vocab >= 51865, 64)
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(out)
    return out
