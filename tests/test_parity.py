"""Parity with reference implementations (selfspeech.eval.parity): SpeechBrain's ECAPA-TDNN and BEST-RQ
quantiser and masking, transformers' and faster-whisper's Whisper front ends, pyctcdecode's beam search.

The references come from requirements/parity.txt (the Makefile installs them); without them these skip."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from selfspeech.eval import parity as P

needs_sb = pytest.mark.skipif(importlib.util.find_spec("speechbrain") is None,
                              reason="speechbrain not installed (pip install --no-deps -r requirements/parity.txt)")


@needs_sb
def test_speechbrain_ecapa_gives_our_embeddings():
    res = P.ecapa_parity(seed=1, n_utts=3)
    assert res["module_max_diff"] <= 1e-5          # the module alone, same weights
    assert res["pipeline_max_diff"] <= 1e-5        # Fbank + mean normalisation + module, our batch padded


@pytest.fixture()
def sb_checkpoint(tmp_path):
    if importlib.util.find_spec("speechbrain") is None:
        pytest.skip("speechbrain not installed")
    sb = P.random_speechbrain_ecapa(seed=2)
    path = tmp_path / "spk" / "embedding_model.ckpt"
    path.parent.mkdir()
    torch.save(sb.state_dict(), path)
    return sb, path


def test_speechbrain_checkpoint_serves_as_extractor(sb_checkpoint, tmp_path):
    from selfspeech.adapt.recipe import _check_extractor
    from selfspeech.cluster.extractors import extractor_fingerprint, get_extractor

    sb, path = sb_checkpoint
    wav = P.speech_like(1.2, 0)
    fbank = P.speechbrain_module("speechbrain.lobes.features").Fbank(n_mels=40)
    norm = P.speechbrain_module("speechbrain.processing.features").InputNormalization(norm_type="sentence",
                                                                                    std_norm=False)
    with torch.no_grad():
        ref = sb(norm(fbank(torch.from_numpy(wav)[None]), torch.ones(1)))[0, 0].numpy()
    for name in (str(path), str(path.parent)):   # the file, or the folder holding it
        np.testing.assert_allclose(get_extractor(name).embed(wav), ref, atol=1e-5)
        _check_extractor("recipe.yaml", name)        # accepted as clusters.extractor
    assert "@sha256:" in extractor_fingerprint(str(path))


def test_sv_embed_command_with_a_speechbrain_checkpoint(sb_checkpoint, tmp_path):
    import json

    import soundfile as sf
    from typer.testing import CliRunner

    from selfspeech.cli import app
    from selfspeech.cluster.speakers import load_embeddings
    from selfspeech.models.ecapa import SpeakerEncoder
    from selfspeech.models.ecapa_sb import load_speechbrain_ecapa

    sb, path = sb_checkpoint
    wavs = {f"u{i}": P.speech_like(0.7 + 0.4 * i, 10 + i) for i in range(4)}
    lines = []
    for i, (uid, w) in enumerate(wavs.items()):
        f = tmp_path / f"{uid}.wav"
        sf.write(f, w, P.SR, subtype="FLOAT")          # float samples: the command reads what we embed
        lines.append(json.dumps({"id": uid, "audio_filepath": str(f), "duration": len(w) / P.SR,
                                 "speaker": f"s{i % 2}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["sv", "embed", str(path.parent), str(tmp_path / "m.jsonl"),
                                   "--out", str(tmp_path / "emb"), "--no-plot", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    got = load_embeddings(tmp_path / "emb" / "utterances.npz")
    ours = SpeakerEncoder(load_speechbrain_ecapa(path))
    fbank = P.speechbrain_module("speechbrain.lobes.features").Fbank(n_mels=40)
    norm = P.speechbrain_module("speechbrain.processing.features").InputNormalization(norm_type="sentence",
                                                                                    std_norm=False)
    assert sorted(got) == sorted(wavs)
    for uid, w in wavs.items():
        np.testing.assert_allclose(got[uid], ours.embed(w), atol=1e-6)              # our imported model
        with torch.no_grad():
            ref = sb(norm(fbank(torch.from_numpy(w)[None]), torch.ones(1)))[0, 0].numpy()
        np.testing.assert_allclose(got[uid], ref, atol=1e-5)                         # SpeechBrain's own pipeline
    spk = load_embeddings(tmp_path / "emb" / "speakers.npz")
    unit = {u: e / np.linalg.norm(e) for u, e in got.items()}
    np.testing.assert_allclose(spk["s0"], (unit["u0"] + unit["u2"]) / 2, atol=1e-5)

def test_speechbrain_checkpoint_mismatch_names_the_key(sb_checkpoint, tmp_path):
    from selfspeech.models.ecapa_sb import load_speechbrain_ecapa

    sb, _ = sb_checkpoint
    cases = {}
    sd = sb.state_dict()
    cases["extra"] = {**sd, "blocks.1.shortcut.conv.weight": torch.zeros(1)}
    cases["missing"] = {k: v for k, v in sd.items() if k != "blocks.2.tdnn2.norm.norm.running_var"}
    cases["size"] = {**sd, "asp.conv.conv.weight": torch.zeros(99, 16, 1)}
    cases["other"] = {"layer.weight": torch.zeros(3, 3)}
    expect = {"extra": "unexpected key 'blocks.1.shortcut.conv.weight'",
              "missing": "missing key 'blocks.2.tdnn2.norm.norm.running_var'",
              "size": "key 'asp.conv.conv.weight' has shape (99, 16, 1)",
              "other": "missing key 'blocks.0.conv.conv.weight'"}
    for name, state in cases.items():
        f = tmp_path / f"{name}.ckpt"
        torch.save(state, f)
        with pytest.raises(ValueError) as e:
            load_speechbrain_ecapa(f)
        assert expect[name] in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch state dict"):
        load_speechbrain_ecapa(tmp_path / "junk.ckpt")


def test_reflect_padding_batch_embeds_each_utterance_as_alone():
    from selfspeech.models.ecapa import ECAPAConfig, ECAPATDNN

    torch.manual_seed(0)
    m = ECAPATDNN(ECAPAConfig.preset("tiny", padding="reflect", input_norm="mean")).eval()
    x = torch.randn(2, 60, 40)
    with torch.no_grad():
        batch = m(x, torch.tensor([60, 23]))
        assert torch.allclose(batch[1], m(x[1:, :23])[0], atol=1e-5)
        assert not torch.allclose(m(x[1:, :23])[0], m(x[1:])[0], atol=1e-3)  # padding is not ignored blindly


@needs_sb
def test_bestrq_labels_and_masking_match_speechbrain():
    res = P.bestrq_parity(seed=1, codes=256, utts=2, draws=200)
    assert res["value"] >= 0.999
    m = res["masking"]
    assert abs(m["aligned"]["fraction"] - m["speechbrain"]["fraction"]) < 0.02
    assert abs(m["aligned"]["mean_run"] - m["speechbrain"]["mean_run"]) < 1.5
    assert m["aligned"]["min_run"] == m["speechbrain"]["min_run"] == 10
    assert m["overlap"]["fraction"] < m["speechbrain"]["fraction"] - 0.03   # overlapping spans mask less


def test_aligned_span_mask_uses_span_slots():
    from selfspeech.objectives.masking import span_mask

    g = torch.Generator().manual_seed(0)
    m = span_mask(torch.tensor([100, 57]), 100, 0.5, 10, generator=g, layout="aligned")
    for row, n in zip(m, (100, 57)):
        idx = row.nonzero().flatten()
        assert (idx < n // 10 * 10).all() and row.sum() % 10 == 0
        assert set((idx // 10).tolist()) == {int(i) // 10 for i in idx} and len(idx) == 10 * len(set((idx // 10).tolist()))
    assert int(m[0].sum()) == 50                    # 0.5 * 100 / 10 spans, none overlapping
    with pytest.raises(ValueError, match="layout"):
        span_mask(torch.tensor([10]), 10, 0.5, 2, layout="sideways")


def test_whisper_log_mel_matches_transformers_and_faster_whisper():
    pytest.importorskip("faster_whisper")
    res = P.whisper_logmel_parity(seed=1)
    assert res["value"] <= 1e-3
    assert res["transformers_longest"] <= 1e-3      # the student's input: every frame
    assert res["padding"]["transformers_padded_frame_minus_max"] == pytest.approx(-2.0)
    assert res["encoder"]["max_diff_30s"] == 0.0    # trimmed encoder on 3000 frames: bit for bit


def test_ctc_beam_search_matches_pyctcdecode():
    pytest.importorskip("pyctcdecode")
    res = P.ctc_beam_parity(seed=1, utts=40, exact=False)
    assert res["value"] == 1.0                                  # pyctcdecode's ranking: the same best paths
    assert res["hard"]["beam_differs_from_greedy"] >= 0.2       # on posteriors where the beam matters
    # the default ranking keeps other hypotheses where the width binds
    assert res["hard"]["default_rank_agreement"] < 1.0


def test_exact_best_labelling_is_the_brute_force_maximum():
    import itertools

    from selfspeech.models.ctc import beam_ctc

    gen = np.random.default_rng(0)
    for _ in range(5):
        lp = P.aligned_log_probs(gen, 3, 3, 2.0, 1.2)[:7]
        lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
        cands = [c for n in range(len(lp) + 1) for c in itertools.product((1, 2), repeat=n)]
        scores = [P._path_logp(lp, list(c)) for c in cands]
        best, best_lp = P.exact_best_labelling(lp)
        assert best == cands[int(np.argmax(scores))] and best_lp == pytest.approx(max(scores), abs=1e-4)
        assert tuple(beam_ctc(torch.from_numpy(lp), 64)) == best    # a wide beam finds it too
    with pytest.raises(ValueError, match="rank"):
        beam_ctc(torch.zeros(3, 3), 4, rank="frame")


def test_own_speaker_encoder_of_another_size_names_the_key(tmp_path):
    import json

    from selfspeech.models.ecapa import ECAPAConfig, ECAPATDNN, SpeakerEncoder, save_speaker_encoder

    save_speaker_encoder(ECAPATDNN(ECAPAConfig.preset("tiny")), tmp_path / "enc")
    cfg = tmp_path / "enc" / "config.json"
    meta = json.loads(cfg.read_text())
    meta["config"]["channels"] = 64                # config of another size than the weights
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"key 'stem\.0\.weight' has shape \(32, 40, 5\)") as e:
        SpeakerEncoder.load(tmp_path / "enc")
    assert "\n" not in str(e.value)
