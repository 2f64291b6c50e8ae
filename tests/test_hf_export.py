"""Export of wav2vec 2.0 CTC models to transformers' Wav2Vec2ForCTC: same logits, same transcripts."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import tone
from typer.testing import CliRunner

from selfspeech.train.hf_export import export_wav2vec2_ctc
from selfspeech.models.ssl import EncoderConfig, SpeechEncoder, save_encoder
from selfspeech.text.phones import Vocabulary
from selfspeech.models.ctc import CTCModel, greedy_ctc

PHONES = Vocabulary("phone", ("AE", "AH", "B", "D", "K", "T"))


def _hf_layout(**kw) -> EncoderConfig:
    return EncoderConfig.preset("tiny", frontend="wave", pos_norm=False, dropout=0.0, **kw)


def _ctc_dir(path, cfg: EncoderConfig, vocab: Vocabulary, seed: int = 0):
    """A CTC model folder as finetune-ctc writes it (random weights)."""
    torch.manual_seed(seed)
    model = CTCModel(cfg, vocab.size).eval()
    save_encoder(model, cfg, path, kind="ctc", extra={"vocab": {"kind": vocab.kind, "symbols": list(vocab.symbols)},
                                                      "ctc": {"mask_time_prob": 0.05, "mask_time_span": 5}})
    return model


def _waves():
    # two lengths, neither a multiple of the 320-sample stride; noise so frames differ
    rng = np.random.default_rng(1)
    return [tone(0.5, freq=180) + 0.05 * rng.standard_normal(8000).astype(np.float32),
            tone(0.37, freq=260, seed=2)]


@pytest.mark.parametrize("vocab,pos_kernel,from_dir", [(Vocabulary.for_chars(), 33, False), (PHONES, 32, True)])
def test_export_matches_transformers(tmp_path, vocab, pos_kernel, from_dir):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2Processor

    torch.set_num_threads(1)
    cfg = _hf_layout(pos_kernel=pos_kernel)            # 32: even kernel, one frame trimmed (both sides)
    if from_dir:
        ours = _ctc_dir(tmp_path / "ctc", cfg, vocab)
        export_wav2vec2_ctc(tmp_path / "ctc", tmp_path / "hf")
    else:
        torch.manual_seed(0)
        ours = CTCModel(cfg, vocab.size).eval()
        export_wav2vec2_ctc(ours, tmp_path / "hf", vocab=vocab)
    hf = Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    proc = Wav2Vec2Processor.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf.config.pad_token_id == 0 and len(proc.tokenizer) == hf.config.vocab_size == vocab.size
    # weight norm rebuilt from (g, v) gives our positional conv weight bit for bit
    assert torch.equal(hf.wav2vec2.encoder.pos_conv_embed.conv.weight, ours.encoder.pos.conv.weight)

    waves = _waves()
    with torch.no_grad():
        for w in waves:                               # one utterance, no padding
            lp, flen = ours(torch.from_numpy(w)[None], torch.tensor([len(w)]))
            theirs = hf(**proc(w, sampling_rate=16000, return_tensors="pt")).logits.log_softmax(-1)
            assert theirs.shape == lp.shape and int(flen) == lp.shape[1]
            assert torch.allclose(theirs, lp, atol=1e-4), (theirs - lp).abs().max()
        # a padded batch: the processor's attention mask = our lengths
        batch = proc(waves, sampling_rate=16000, padding=True, return_tensors="pt")
        assert batch["attention_mask"].sum(-1).tolist() == [len(w) for w in waves]
        lengths = torch.tensor([len(w) for w in waves])
        x = torch.zeros(2, int(lengths.max()))
        for i, w in enumerate(waves):
            x[i, : len(w)] = torch.from_numpy(w)
        lp, flen = ours(x, lengths)
        theirs = hf(**batch).logits.log_softmax(-1)
    hf_len = hf._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
    assert hf_len.tolist() == flen.tolist() and flen[0] > flen[1]
    for i, n in enumerate(flen.tolist()):
        assert torch.allclose(theirs[i, :n], lp[i, :n], atol=1e-4), (theirs[i, :n] - lp[i, :n]).abs().max()

    paths = greedy_ctc(lp, flen)
    assert greedy_ctc(theirs, hf_len) == paths and any(paths)
    hf_text = proc.batch_decode([theirs[i, :n].argmax(-1) for i, n in enumerate(flen.tolist())])
    # char: transformers keeps the double space of two delimiters in a row, we collapse it (same words)
    assert [" ".join(t.split()) for t in hf_text] == [vocab.decode(p) for p in paths]
    # labels for further fine-tuning in transformers encode to our ids
    ref = "A CAT'S" if vocab.kind == "char" else "K AE T"
    assert proc.tokenizer(ref).input_ids == vocab.encode(vocab.tokens(ref)[0] if vocab.kind == "char" else ref.split())


def test_export_refuses_inexact_layouts_and_foreign_folders(tmp_path):
    v = Vocabulary.for_chars()
    with pytest.raises(ValueError, match="frontend 'mel'.*frontend: wave"):
        export_wav2vec2_ctc(CTCModel(EncoderConfig.preset("tiny"), v.size), tmp_path / "a", vocab=v)
    _ctc_dir(tmp_path / "old", EncoderConfig.preset("tiny", frontend="wave"), v)   # today's default layout
    with pytest.raises(ValueError, match="pos_norm: false"):
        export_wav2vec2_ctc(tmp_path / "old", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    _ctc_dir(tmp_path / "ok", _hf_layout(), v)
    with pytest.raises(ValueError, match="would replace the model"):
        export_wav2vec2_ctc(tmp_path / "ok", tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a Wav2Vec2 export"):
        export_wav2vec2_ctc(tmp_path / "ok", tmp_path / "mine")
    export_wav2vec2_ctc(tmp_path / "ok", tmp_path / "hf")
    export_wav2vec2_ctc(tmp_path / "ok", tmp_path / "hf")        # a previous export is replaced


def test_default_layout_unchanged():
    # config.json written before pos_norm existed: the LayerNorm after the positional conv stays
    old = json.loads(json.dumps(dataclasses.asdict(EncoderConfig.preset("tiny", frontend="wave"))))
    del old["pos_norm"]
    cfg = EncoderConfig(**old)
    assert cfg.pos_norm is True
    torch.manual_seed(0)
    default = SpeechEncoder(cfg).eval()
    torch.manual_seed(0)
    hf_like = SpeechEncoder(_hf_layout()).eval()
    sd, sd2 = default.state_dict(), hf_like.state_dict()
    assert {"in_norm.weight", "in_norm.bias"} <= set(sd) and set(sd) - set(sd2) == {"in_norm.weight", "in_norm.bias"}
    assert all(torch.equal(sd[k], sd2[k]) for k in sd2)       # the switch draws no random number
    x, lengths = torch.from_numpy(np.stack([tone(0.3), tone(0.3, freq=300)])), torch.tensor([4800, 4000])
    with torch.no_grad():
        y, _ = default(x, lengths)
        default.in_norm.weight.mul_(2.0)                      # the norm is in the path of the default layout
        y2, _ = default(x, lengths)
    assert not torch.allclose(y, y2)


def test_cli_export_ctc(tmp_path):
    from selfspeech.cli import app

    _ctc_dir(tmp_path / "ok", _hf_layout(), PHONES)
    _ctc_dir(tmp_path / "old", EncoderConfig.preset("tiny", frontend="wave"), PHONES)
    runner = CliRunner()
    res = runner.invoke(app, ["export-ctc", str(tmp_path / "ok"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    res = runner.invoke(app, ["export-ctc", str(tmp_path / "old"), "--out", str(tmp_path / "hf2")])
    assert res.exit_code == 2 and "pos_norm" in res.output
