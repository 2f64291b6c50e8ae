"""Teachers and decoders on a device: compute types, the CLI's device refusals, Ray's actor resources."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import tone
from typer.testing import CliRunner

from selfspeech.accel import DeviceError
from selfspeech.cli import app
from selfspeech.data.manifest import write_manifest
from selfspeech.label.ray_label import ActorPlan, plan_actors
from selfspeech.label.teacher import resolve_compute_type

CPU = torch.device("cpu")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def cuda(test):
    """A test of CUDA-only behaviour: marked ``cuda``, skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _manifest(tmp_path, n=2):
    items = []
    for i in range(n):
        p = tmp_path / f"u{i}.wav"
        sf.write(p, tone(0.6 + 0.3 * i, freq=180 + 90 * i, seed=i), 16000)
        items.append({"id": f"u{i}", "audio_filepath": str(p), "duration": 0.6 + 0.3 * i, "speaker": f"s{i}"})
    m = tmp_path / "m.jsonl"
    write_manifest(m, items)
    return m


def _one_line_error(r) -> str:
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


# ------------------------------------------------------------------ compute types

def test_compute_type_auto_per_backend_on_the_cpu():
    assert resolve_compute_type("auto", CPU) == "int8"                      # CTranslate2's CPU kernels
    assert resolve_compute_type(None, CPU, "transformers") == "float32"
    assert resolve_compute_type(" Float32 ", CPU) == "float32"
    assert resolve_compute_type("int8_float32", CPU) == "int8_float32"
    assert resolve_compute_type("bfloat16", CPU, "transformers") == "bfloat16"   # torch has CPU bfloat16


@pytest.mark.parametrize("spec,backend", [("float16", "faster-whisper"), ("int8_float16", "faster-whisper"),
                                          ("bfloat16", "faster-whisper"), ("float16", "transformers")])
def test_half_precision_is_refused_on_the_cpu_with_the_fix(spec, backend):
    with pytest.raises(DeviceError) as e:
        resolve_compute_type(spec, CPU, backend, key="--compute-type")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--compute-type {spec}") and "CUDA" in msg
    assert ("int8" if backend == "faster-whisper" else "float32") in msg.split("use", 1)[1]


def test_unknown_compute_types_name_the_choices():
    with pytest.raises(ValueError, match="use auto, int8, int8_float32, int8_float16"):
        resolve_compute_type("fp8", CPU)
    with pytest.raises(ValueError, match="CTranslate2's: use --backend faster-whisper"):
        resolve_compute_type("int8", CPU, "transformers")


def test_compute_type_auto_on_cuda_uses_ctranslate2s_kernels(monkeypatch):
    """float16 where CTranslate2 runs it on the GPU, float32 where it does not; unsupported types refused."""
    import ctranslate2

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 1)
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", lambda d, i=0: {"float32", "float16", "int8"})
    assert resolve_compute_type("auto", gpu) == "float16"
    assert resolve_compute_type("int8", gpu) == "int8"
    with pytest.raises(DeviceError, match="it can: float16, float32, int8"):
        resolve_compute_type("bfloat16", gpu)
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", lambda d, i=0: {"float32", "int8"})
    assert resolve_compute_type("auto", gpu) == "float32"
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: 0)
    with pytest.raises(DeviceError, match="CTranslate2 .* sees no CUDA device"):
        resolve_compute_type("auto", gpu)


# ------------------------------------------------------------------ the CLI resolves the device first

@no_cuda
@pytest.mark.parametrize("argv", [
    ["label", "--teacher", "{missing}", "--in", "{m}", "--out", "{out}/l.jsonl", "--device", "cuda"],
    ["label", "--teacher", "{missing}", "--in", "{m}", "--out", "{out}/l.jsonl", "--device", "cuda:1",
     "--backend", "transformers", "--ray", "2"],
    ["decode-ctc", "{missing}", "--in", "{m}", "--out", "{out}/h.jsonl", "--device", "cuda"],
    ["sv", "embed", "{missing}", "{m}", "--out", "{out}/emb", "--device", "cuda:0"],
])
def test_cuda_on_a_machine_without_it_exits_2_before_any_model_is_opened(tmp_path, monkeypatch, argv):
    import selfspeech.label.teacher as teacher
    import selfspeech.models.zoo as zoo

    def opened(*a, **k):
        raise AssertionError("a model was looked up before the device was checked")

    monkeypatch.setattr(zoo, "resolve_model", opened)
    monkeypatch.setattr(teacher, "load_teacher", opened)
    m, missing = _manifest(tmp_path), tmp_path / "no-such-model"
    args = [a.format(m=m, missing=missing, out=tmp_path) for a in argv]
    line = _one_line_error(CliRunner().invoke(app, args))
    dev = args[args.index("--device") + 1]
    assert f"--device '{dev}'" in line and "no CUDA device" in line and "use --device cpu" in line
    assert "no-such-model" not in line
    assert not (tmp_path / "l.jsonl").exists() and not (tmp_path / "emb").exists()


def test_label_refuses_half_precision_on_the_cpu_before_loading(tmp_path, monkeypatch):
    import selfspeech.models.zoo as zoo

    monkeypatch.setattr(zoo, "resolve_model", lambda *a: pytest.fail("model looked up"))
    m = _manifest(tmp_path)
    line = _one_line_error(CliRunner().invoke(app, ["label", "--in", str(m), "--out", str(tmp_path / "l.jsonl"),
                                                    "--device", "cpu", "--compute-type", "float16"]))
    assert "--compute-type float16" in line and "int8" in line
    line = _one_line_error(CliRunner().invoke(app, ["label", "--in", str(m), "--out", str(tmp_path / "l.jsonl"),
                                                    "--device", "tpu"]))
    assert "--device 'tpu'" in line and "auto, cpu, cuda or cuda:N" in line


def test_device_options_list_the_choices():
    for argv in (["label", "--help"], ["decode-ctc", "--help"], ["sv", "embed", "--help"]):
        out = " ".join(CliRunner().invoke(app, argv, terminal_width=200).output.split())
        assert "--device" in out and "cuda:N" in out, argv


# ------------------------------------------------------------------ Ray: one actor per GPU

def test_ray_actor_plan_cpu_and_one_actor_per_gpu():
    assert plan_actors("cpu", 3, 2, gpus=4) == ActorPlan(actors=3, num_cpus=2, num_gpus=0, device="cpu")
    # CUDA: one whole GPU per actor, as many actors as GPUs (capped by --ray); inside, the GPU is cuda:0
    assert plan_actors("cuda:0", 8, 1, gpus=2) == ActorPlan(2, 1, 1, "cuda:0")
    assert plan_actors(torch.device("cuda", 1), 1, 1, gpus=4) == ActorPlan(1, 1, 1, "cuda:0")
    assert plan_actors("cuda", 0, 1, gpus=3).actors == 3
    with pytest.raises(DeviceError, match="no GPU; use --device cpu"):
        plan_actors("cuda", 2, 1, gpus=0)
    with pytest.raises(ValueError, match="--ray 0"):
        plan_actors("cpu", 0, 1, gpus=0)


# ------------------------------------------------------------------ device cpu: the same results

def _ctc_dir(tmp_path):
    from selfspeech.models.ctc import CTCModel
    from selfspeech.models.ssl import EncoderConfig, save_encoder
    from selfspeech.text.phones import Vocabulary

    torch.manual_seed(0)
    vocab, enc = Vocabulary.for_chars(), EncoderConfig.preset("tiny")
    save_encoder(CTCModel(enc, vocab.size), enc, tmp_path / "ctc", kind="ctc",
                 extra={"vocab": {"kind": vocab.kind, "symbols": list(vocab.symbols)}})
    return tmp_path / "ctc"


def test_ctc_decoding_on_the_cpu_device_matches_the_model_run_by_hand(tmp_path):
    from selfspeech.data.audio_dataset import collate_arrays
    from selfspeech.models.ctc import decode_logits, load_ctc, transcribe_arrays

    model, vocab = load_ctc(_ctc_dir(tmp_path), "cpu")
    rng = np.random.default_rng(0)   # log-mel frames (T, n_mels), the tiny preset's input
    xs = [rng.standard_normal((n, model.encoder.cfg.n_mels)).astype(np.float32) for n in (70, 110)]
    b = collate_arrays(xs)
    with torch.no_grad():
        lp, flen = model(b["x"], b["lengths"])
    for beam in (0, 3):
        by_hand = [vocab.decode(ids) for ids in decode_logits(lp, flen, beam)]
        assert transcribe_arrays(model, vocab, xs, beam) == by_hand
    assert any(by_hand)


def test_decode_ctc_cli_with_device_cpu_writes_the_library_hypotheses(tmp_path):
    from selfspeech.label.transcribe import transcribe_ctc

    d, m = _ctc_dir(tmp_path), _manifest(tmp_path, 3)
    r = CliRunner().invoke(app, ["decode-ctc", str(d), "--in", str(m), "--out", str(tmp_path / "h.jsonl"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    ref = transcribe_ctc(d, m, tmp_path / "ref.jsonl")
    assert (tmp_path / "h.jsonl").read_text() == ref.read_text()


def test_speaker_encoder_on_the_cpu_device_embeds_as_the_network_does(tmp_path):
    from selfspeech.cluster.extractors import get_extractor
    from selfspeech.data.audio_dataset import collate_arrays
    from selfspeech.models.ecapa import ECAPAConfig, ECAPATDNN, save_speaker_encoder

    torch.manual_seed(0)
    net = ECAPATDNN(ECAPAConfig.preset("tiny")).eval()
    save_speaker_encoder(net, tmp_path / "enc")
    enc = get_extractor(str(tmp_path / "enc"), torch.device("cpu"))
    wavs = [tone(0.8, seed=3), tone(1.3, freq=260, seed=4)]
    with torch.no_grad():
        b = collate_arrays([enc.features(w) for w in wavs])
        want = net(b["x"], b["lengths"]).numpy()
    got = enc.embed_batch(wavs)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_greedy_decode_runs_in_the_models_dtype(tiny_whisper_dir):
    """Features are moved to the model's device and dtype: a float64 copy decodes the same tokens."""
    from selfspeech.models.whisper import greedy_decode, load_for_inference, load_processor, log_mel, pad_features

    model = load_for_inference(tiny_whisper_dir, "cpu")
    assert model.config._attn_implementation == "sdpa" and not model.training
    proc = load_processor(tiny_whisper_dir)
    x = pad_features([log_mel(proc.feature_extractor, tone(s, seed=i)) for i, s in enumerate((0.6, 1.0))])[0]
    want = greedy_decode(model, x, proc.tokenizer.prefix_tokens, 6)
    assert greedy_decode(model.double(), x, proc.tokenizer.prefix_tokens, 6) == want
    assert all(isinstance(t, int) for row in want for t in row)


def test_transformers_teacher_on_the_cpu_device(tiny_whisper_dir):
    from selfspeech.label.teacher import DecodeOptions, TransformersTeacher

    t = TransformersTeacher(tiny_whisper_dir, DecodeOptions(max_new_tokens=4), device="cpu")
    assert t.device == CPU and t.compute_type == "float32" and t.model.dtype == torch.float32
    assert t.model.config._attn_implementation == "sdpa"
    hyps = t.transcribe([tone(0.6), tone(0.9, seed=1)])
    assert len(hyps) == 2 and all(-1e9 < h.avg_logprob <= 0 and 0 <= h.no_speech_prob <= 1 for h in hyps)


def test_faster_whisper_teacher_auto_is_int8_on_the_cpu_and_recorded(tmp_path):
    from selfspeech.label.run import label_manifest
    from selfspeech.label.teacher import DecodeOptions, load_teacher

    try:
        t = load_teacher("whisper-tiny.en", options=DecodeOptions(max_new_tokens=4), cpu_threads=1, device="cpu")
    except Exception as e:  # no cache and no PyPI
        pytest.skip(f"whisper-tiny.en not available: {e}")
    assert (t.device, t.compute_type) == (CPU, "int8")
    assert t.model.model.device == "cpu" and t.model.model.compute_type in ("int8", "int8_float32")  # CT2 names it so
    st = label_manifest(_manifest(tmp_path), tmp_path / "l.jsonl", t, "whisper-tiny.en", progress=False)
    assert st.labelled == 2 and st.as_dict()["device"] == "cpu" and st.as_dict()["compute_type"] == "int8"


# ------------------------------------------------------------------ on a CUDA GPU

def _ct2_dir():
    from selfspeech.models.zoo import resolve_model

    try:
        return resolve_model("whisper-tiny.en").ct2_dir
    except Exception as e:
        pytest.skip(f"whisper-tiny.en not available: {e}")


@cuda
@pytest.mark.parametrize("compute_type", ["auto", "int8_float16"])
def test_faster_whisper_half_precision_on_cuda(tmp_path, compute_type):
    """The CTranslate2 model sits on the GPU in a half-precision type; its no-speech probabilities are the CPU's."""
    from selfspeech.label.teacher import DecodeOptions, FasterWhisperTeacher

    ct2, opts = _ct2_dir(), DecodeOptions(max_new_tokens=8)
    gpu = FasterWhisperTeacher(ct2, compute_type, options=opts, device="cuda")
    assert gpu.model.model.device == "cuda" and gpu.compute_type == ("float16" if compute_type == "auto"
                                                                     else compute_type)
    wavs = [tone(1.0, seed=i) for i in range(3)]
    hyps = gpu.transcribe(wavs)
    cpu = FasterWhisperTeacher(ct2, "float32", options=opts, device="cpu").transcribe(wavs)
    assert len(hyps) == 3 and all(np.isfinite(h.avg_logprob) for h in hyps)
    assert [h.no_speech_prob for h in hyps] == pytest.approx([h.no_speech_prob for h in cpu], abs=0.05)


@cuda
def test_transformers_teacher_bf16_on_cuda(tiny_whisper_dir):
    from selfspeech.label.teacher import DecodeOptions, TransformersTeacher

    t = TransformersTeacher(tiny_whisper_dir, DecodeOptions(max_new_tokens=4), device="cuda")
    assert t.device.type == "cuda" and t.model.dtype == torch.bfloat16 and t.model.device.type == "cuda"
    hyps = t.transcribe([tone(0.6), tone(0.9, seed=1)])
    assert len(hyps) == 2 and all(np.isfinite(h.avg_logprob) for h in hyps)


@cuda
def test_ctc_and_whisper_decoding_on_cuda_equal_the_cpu(tmp_path, tiny_whisper_dir, monkeypatch):
    from selfspeech.label.transcribe import transcribe_ctc, transcribe_whisper

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)   # fp32 convolutions: comparable to the CPU
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    d, m = _ctc_dir(tmp_path), _manifest(tmp_path, 3)
    for beam in (0, 3):
        a = transcribe_ctc(d, m, tmp_path / f"cpu{beam}.jsonl", beam=beam, device="cpu").read_text()
        b = transcribe_ctc(d, m, tmp_path / f"gpu{beam}.jsonl", beam=beam, device="cuda").read_text()
        assert a == b
    a = transcribe_whisper(tiny_whisper_dir, m, tmp_path / "wc.jsonl", max_new_tokens=6, device="cpu").read_text()
    b = transcribe_whisper(tiny_whisper_dir, m, tmp_path / "wg.jsonl", max_new_tokens=6, device="cuda").read_text()
    assert a == b


@cuda
def test_speaker_embeddings_on_cuda_match_the_cpu(tmp_path):
    from selfspeech.models.ecapa import ECAPAConfig, ECAPATDNN, SpeakerEncoder, save_speaker_encoder

    torch.manual_seed(0)
    save_speaker_encoder(ECAPATDNN(ECAPAConfig.preset("tiny")), tmp_path / "enc")
    wavs = [tone(0.8, seed=3), tone(1.3, freq=260, seed=4)]
    cpu = SpeakerEncoder.load(tmp_path / "enc", "cpu").embed_batch(wavs)
    gpu = SpeakerEncoder.load(tmp_path / "enc", "cuda").embed_batch(wavs)
    assert gpu.dtype == np.float32 and np.allclose(gpu, cpu, atol=1e-3, rtol=1e-3)
