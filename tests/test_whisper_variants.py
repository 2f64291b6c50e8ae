"""Every Whisper family through the same code: tiny random checkpoints of tiny.en, base, large-v3
(128 mel bins, 51866 tokens) and distil-large-v3 (2-layer decoder), see ``whisper_toys``.

Each goes through a student fine-tune step, the transformers teacher, the CTranslate2
conversion and the faster-whisper teacher; multilingual ones in German (and translate),
the English-only one refusing German before any weight is read.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from conftest import tone
from whisper_toys import FAMILIES, make_toy

from selfspeech.models.sources import ModelError, inspect_dir

MULTI = ["base", "large-v3", "distil-large-v3"]


@pytest.fixture(scope="module")
def toys(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toys")
    return {f: make_toy(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFSPEECH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def _manifest(tmp_path, n: int = 2) -> str:
    lines = []
    for i in range(n):
        p = tmp_path / f"u{i}.flac"
        sf.write(p, tone(0.6 + 0.2 * i, seed=i), 16000)
        lines.append(json.dumps({"id": f"u{i}", "audio_filepath": str(p), "duration": 0.6 + 0.2 * i,
                                 "text": "hallo welt", "speaker": f"s{i}"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "m.jsonl")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_inspect_reads_each_family_off_its_headers(toys, family):
    from transformers import WhisperForConditionalGeneration

    vocab, n_mels, enc, dec = FAMILIES[family]
    info = inspect_dir(toys[family])
    assert (info.kind, info.vocab_size, info.n_mels, info.encoder_layers, info.decoder_layers) == \
        ("transformers", vocab, n_mels, enc, dec)
    assert info.multilingual is (family != "tiny.en")
    model = WhisperForConditionalGeneration.from_pretrained(toys[family])
    assert info.params == sum(p.numel() for p in model.parameters())  # the tied projection counted once


@pytest.mark.parametrize("family", list(FAMILIES))
def test_student_processor_and_a_training_step(toys, family, tmp_path, cache):
    """log-mels with the model's own mel bins, the language/task prefix in the labels, a fine-tune step."""
    from selfspeech.train.whisper_ft import FinetuneConfig, WhisperCollator, finetune, label_ids, load_items
    from selfspeech.models.whisper import load_processor

    lang = "en" if family == "tiny.en" else "de"
    proc = load_processor(toys[family], lang)
    n_mels = FAMILIES[family][1]
    assert proc.feature_extractor.feature_size == n_mels
    cfg = FinetuneConfig(language=lang, max_steps=2, batch_size=2, warmup_steps=0, eval_every=100, device="cpu",
                         normalizer="basic")
    items, _ = load_items(_manifest(tmp_path), cfg)
    batch = WhisperCollator(items, proc)(list(range(len(items))))
    assert batch["input_features"].shape[:2] == (2, n_mels)
    ids = label_ids(proc.tokenizer, "hallo")
    tok = proc.tokenizer
    if family == "tiny.en":
        assert ids[0] == tok.convert_tokens_to_ids("<|notimestamps|>")
    else:
        assert ids[:3] == tok.convert_tokens_to_ids(["<|de|>", "<|transcribe|>", "<|notimestamps|>"])
    best = finetune(tmp_path / "m.jsonl", None, toys[family], tmp_path / "ft", cfg, progress=False)
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["steps"] == 2 and (best / "model.safetensors").is_file()
    assert json.loads((best / "config.json").read_text())["num_mel_bins"] == n_mels


def test_translate_task_goes_into_the_student_prefix(toys):
    from selfspeech.models.whisper import load_processor

    tok = load_processor(toys["large-v3"], "german", "translate").tokenizer
    assert tok.prefix_tokens[1:3] == tok.convert_tokens_to_ids(["<|de|>", "<|translate|>"])


def test_student_decodes_in_its_own_language_and_task(toys, tmp_path, monkeypatch):
    """A student fine-tuned to translate German decodes with <|de|><|translate|>, not the defaults."""
    import shutil

    import selfspeech.label.transcribe as T
    from selfspeech.train.whisper_ft import CONFIG_NAME

    student = tmp_path / "student"
    shutil.copytree(toys["base"], student)
    (student / CONFIG_NAME).write_text(json.dumps({"language": "de", "task": "translate"}))
    seen = []

    def fake_decode(model, x, prefix, max_new_tokens, max_repeats=0):
        seen.append(list(prefix))
        return [[] for _ in range(x.shape[0])]

    monkeypatch.setattr(T, "greedy_decode", fake_decode)
    T.transcribe_whisper(student, _manifest(tmp_path), tmp_path / "hyp.jsonl")
    tok = T.load_processor(toys["base"], "de", "translate").tokenizer
    assert seen and all(p[1:3] == tok.convert_tokens_to_ids(["<|de|>", "<|translate|>"]) for p in seen)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_teacher_labels_each_family(toys, family, cache):
    from selfspeech.label.teacher import DecodeOptions, load_teacher

    lang = "en" if family == "tiny.en" else "de"
    t = load_teacher(str(toys[family]), "transformers", options=DecodeOptions(language=lang, max_new_tokens=4))
    assert t.processor.feature_extractor.feature_size == FAMILIES[family][1]
    hyps = t.transcribe([tone(0.7), tone(1.1, seed=1)])
    assert len(hyps) == 2 and all(np.isfinite(h.avg_logprob) for h in hyps)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ctranslate2_round_trip_and_faster_whisper_teacher(toys, family, cache):
    from selfspeech.label.teacher import DecodeOptions, load_teacher
    from selfspeech.models.zoo import resolve_model

    vocab, n_mels, enc, dec = FAMILIES[family]
    paths = resolve_model(toys[family])                     # the CTranslate2 half, by ctranslate2's converter
    ct2 = inspect_dir(paths.ct2_dir)
    assert (ct2.kind, ct2.n_mels, ct2.encoder_layers, ct2.decoder_layers, ct2.vocab_size) == \
        ("ctranslate2", n_mels, enc, dec, vocab)
    # CTranslate2 stores zero key biases Whisper has not: the same size to 0.5%
    assert abs(ct2.params / inspect_dir(toys[family]).params - 1) < 0.005
    back = resolve_model(paths.ct2_dir)                     # and from CTranslate2 back, by ours
    hf = inspect_dir(back.hf_dir)
    assert back.ct2_dir == paths.ct2_dir and (hf.n_mels, hf.decoder_layers, hf.vocab_size) == (n_mels, dec, vocab)
    lang = "en" if family == "tiny.en" else "de"
    t = load_teacher(str(paths.ct2_dir), "faster-whisper", options=DecodeOptions(language=lang, max_new_tokens=4))
    assert t.features([tone(0.5)]).shape[1] == n_mels
    assert len(t.transcribe([tone(0.5), tone(0.8, seed=2)])) == 2


def test_ct2_folder_without_preprocessor_gets_its_mel_bins(toys, cache, tmp_path):
    import shutil

    from selfspeech.label.teacher import DecodeOptions, FasterWhisperTeacher
    from selfspeech.models.zoo import resolve_model

    ct2 = tmp_path / "bare"
    shutil.copytree(resolve_model(toys["large-v3"]).ct2_dir, ct2)
    (ct2 / "preprocessor_config.json").unlink(missing_ok=True)
    t = FasterWhisperTeacher(ct2, options=DecodeOptions(language="de", max_new_tokens=2))
    assert t.features([tone(0.5)]).shape[1] == 128


def test_english_only_refuses_german_before_any_weight_is_read(toys, cache, monkeypatch, tmp_path):
    from transformers import WhisperForConditionalGeneration

    from selfspeech.label.teacher import DecodeOptions, load_teacher
    from selfspeech.train.whisper_ft import FinetuneConfig, finetune

    def loaded(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(WhisperForConditionalGeneration, "from_pretrained", loaded)
    en = str(toys["tiny.en"])
    for backend in ("transformers", "faster-whisper"):
        with pytest.raises(ModelError, match="English-only; it cannot decode language 'de'") as e:
            load_teacher(en, backend, options=DecodeOptions(language="de"))
        assert en in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelError, match="English-only and has no translate task"):
        load_teacher(en, "transformers", options=DecodeOptions(task="translate"))
    with pytest.raises(ModelError, match="English-only; it cannot decode language 'de'"):
        finetune(_manifest(tmp_path), None, en, tmp_path / "ft", FinetuneConfig(language="de", device="cpu"))
    assert not (tmp_path / "cache" / "local").exists()      # nothing converted either


def test_unknown_language_and_task_are_one_line(toys):
    from selfspeech.label.teacher import DecodeOptions
    from selfspeech.models.sources import check_language

    with pytest.raises(ModelError, match="language 'klingon' is not a Whisper language"):
        check_language(str(toys["base"]), True, "klingon")
    with pytest.raises(ValueError, match="task 'summarise': choose transcribe or translate"):
        DecodeOptions(task="summarise")
    assert check_language("whisper-base", True, "German") == "de"
    assert check_language("someone/whisper-x.en", None, "en") == "en"
    with pytest.raises(ModelError, match="someone/whisper-x.en is English-only"):
        check_language("someone/whisper-x.en", None, "fr")
