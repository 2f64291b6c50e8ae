"""Reliability: the SIGKILL harness, the bad-input campaign (fast subset), and the fixes they forced.

The full campaign (every stage, more kills, 50k-utterance memory) is
``benchmarks/reliability.py``; here each piece runs small enough for CI.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from selfspeech.data.audio_dataset import AudioDataset
from selfspeech.data.kaldi import KaldiError, iter_kaldi_dir
from selfspeech.data.manifest import ManifestError, read_manifest, unique_ids
from selfspeech.data.validate import validate_manifest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bad_inputs  # noqa: E402
from faults import Stage, compare_outputs, kill_after, kill_campaign  # noqa: E402
import reliability  # noqa: E402


def test_compare_outputs_sees_a_changed_tensor_and_record(tmp_path):
    for run, (w, loss) in {"a": (1.0, 0.5), "b": (1.0 + 1e-7, 0.5), "c": (1.0, 0.25)}.items():
        (tmp_path / run).mkdir()
        save_file({"w": torch.full((3,), w), "step": torch.tensor([4])}, tmp_path / run / "m.safetensors")
        (tmp_path / run / "log.jsonl").write_text(
            json.dumps({"event": "start"}) + "\n" + json.dumps({"step": 1, "loss": loss, "seconds": run}) + "\n")
    outs = ("m.safetensors", "log.jsonl")
    assert compare_outputs(tmp_path / "a", tmp_path / "a", outs) == []
    d = compare_outputs(tmp_path / "a", tmp_path / "b", outs)
    assert len(d) == 1 and "tensor w differs" in d[0]  # bit-identical by default
    assert compare_outputs(tmp_path / "a", tmp_path / "b", outs, atol=1e-6) == []
    d = compare_outputs(tmp_path / "a", tmp_path / "c", outs)  # timings ignored, the loss is not
    assert len(d) == 1 and d[0].startswith("log.jsonl: records differ")
    assert "missing in resumed run" in compare_outputs(tmp_path / "a", tmp_path / "nowhere", outs)[0]


def test_kill_after_kills_the_whole_process_group(tmp_path):
    marker = tmp_path / "child_survived"
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(3); open(r\"{marker}\", \"w\").close()']); time.sleep(30)")
    stage = Stage("sleeper", (sys.executable, "-c", code), ())
    killed, seconds = kill_after(stage, tmp_path, 1.0)
    assert killed and seconds < 10
    time.sleep(3.5)
    assert not marker.exists()  # the grandchild died with its parent's group
    quick = Stage("quick", (sys.executable, "-c", "pass"), ())
    assert kill_after(quick, tmp_path, 20.0)[0] is False


@pytest.mark.parametrize("name", ["pretrain", "finetune_ctc", "speaker_ssl"])
def test_sigkilled_training_resumes_to_identical_weights(tmp_path, name):
    """A real SIGKILL (no clean-up) at a random moment, then a rerun: weights, optimizer/RNG state, log equal."""
    manifest = reliability.make_corpus(tmp_path / "corpus", adults=6, children=2, per_speaker=4)
    stage = reliability.build_stages(tmp_path, manifest, None)[name]
    res = kill_campaign(stage, tmp_path / "kill", trials=1, max_kills=2, seed=3, log=lambda *_: None)
    assert res["kills"] >= 1, res
    assert res["identical_after_resume"] == 1, res["differences"]


def test_bad_input_campaign_no_crash_no_loss(tmp_path):
    consumers = ("validate", "pretrain", "finetune_ctc", "sv_embed", "eval")
    res = bad_inputs.run_campaign(tmp_path, consumers=consumers, log=lambda *_: None)
    assert res["crashes"] == 0 and res["lost_utterances"] == 0, res["cases"]
    assert res["unaccounted"] == 0, res["unaccounted_cases"]
    outcomes = {(c["consumer"], c["input"]): c["outcome"] for c in res["cases"]}
    assert outcomes[("pretrain", "truncated")].startswith("skipped: utterance 'truncated'")
    assert outcomes[("pretrain", "good0#dup")].startswith("skipped: duplicate id")
    assert outcomes[("sv_embed", "good0#dup")].startswith("skipped: duplicate id")
    assert outcomes[("validate", "silence")] == "reported"
    assert all(outcomes[("import-kaldi" if k.startswith("kaldi") else "validate", k)] == "clear error"
               for k in ("malformed_jsonl_line", "non_utf8_manifest", "kaldi_line_without_path"))
    assert outcomes[("eval", "eval_duplicate_reference_id")] == "clear error"


def test_validate_flags_silence_clipping_length_speaker_and_bad_lines(tmp_path):
    sr = 16000
    t = np.arange(sr) / sr
    tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    cases = {"ok": tone, "silent": np.zeros(sr, np.float32), "clipped": np.clip(tone * 20, -1, 1),
             "short": tone[:800], "long": np.tile(tone, 31)}
    lines = []
    for k, wav in cases.items():
        sf.write(tmp_path / f"{k}.flac", wav, sr)
        lines.append(json.dumps({"id": k, "audio_filepath": str(tmp_path / f"{k}.flac"), "text": "HI",
                                 **({"speaker": "s"} if k != "short" else {})}))
    lines.insert(2, '{"id": "broken", ')
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(lines) + "\n")
    probs = [p for p in validate_manifest(m, require_speaker=True) if not isinstance(p, dict)]
    got = {(p.kind, p.utt_id) for p in probs}
    assert got == {("silent_audio", "silent"), ("clipped_audio", "clipped"), ("too_short", "short"),
                   ("no_speaker", "short"), ("too_long", "long"), ("bad_line", "line 3")}
    assert str(next(p for p in probs if p.kind == "bad_line")).startswith(f"bad_line: {m}, line 3:")


def test_manifest_id_with_undecodable_bytes_names_the_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"id": "a", "audio_filepath": "a.flac"}\n{"id": "caf\xe9", "audio_filepath": "b.flac"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: id .* not valid UTF-8"):
        list(read_manifest(m))
    items, dup = unique_ids([{"id": "a"}, {"id": "b"}, {"id": "a"}])
    assert [i["id"] for i in items] == ["a", "b"] and dup == ["a"]


def test_kaldi_missing_path_and_missing_speaker_are_errors(tmp_path):
    d = tmp_path / "k"
    d.mkdir()
    (d / "wav.scp").write_text("u1 a.flac\nu2\n")
    with pytest.raises(KaldiError, match="recording 'u2' has no path"):
        list(iter_kaldi_dir(d, with_durations=False))
    (d / "wav.scp").write_text("u1 a.flac\nu2 b.flac\n")
    (d / "utt2spk").write_text("u1 s1\n")
    with pytest.raises(KaldiError, match="utterance 'u2' has no speaker line"):
        list(iter_kaldi_dir(d, with_durations=False))
    (d / "utt2spk").unlink()  # no utt2spk at all: Kaldi's convention, speaker = utterance
    assert [i["speaker"] for i in iter_kaldi_dir(d, with_durations=False)] == ["u1", "u2"]


def test_dataset_screen_drops_bad_audio_and_keeps_cache_aligned(tmp_path):
    sr = 16000
    good = [(0.1 * np.random.default_rng(i).standard_normal(sr)).astype(np.float32) for i in range(3)]
    items = []
    for i, w in enumerate(good):
        sf.write(tmp_path / f"g{i}.flac", w, sr)
        items.append({"id": f"g{i}", "audio_filepath": str(tmp_path / f"g{i}.flac"), "duration": 1.0})
        if i == 0:
            (tmp_path / "bad.flac").write_bytes(b"not audio")
            items.append({"id": "bad", "audio_filepath": str(tmp_path / "bad.flac"), "duration": 1.0})
    data = AudioDataset(items, "wave")
    skipped = data.screen()
    assert [s.id for s in skipped] == ["bad"] and "unreadable audio" in skipped[0].reason
    assert [i["id"] for i in data.items] == ["g0", "g1", "g2"]
    for i in range(3):  # index i is item i again, from the cache filled while screening
        np.testing.assert_allclose(data.load(i), good[i].astype(np.float16), atol=1e-3)


def test_ctc_decode_marks_unreadable_audio_and_goes_on(tmp_path):
    from selfspeech.label.transcribe import transcribe_ctc
    from selfspeech.train.ctc import CTCConfig, finetune_ctc

    manifest = reliability.make_corpus(tmp_path / "c", adults=2, children=0, per_speaker=3)
    items = [json.loads(x) for x in manifest.read_text().splitlines()]
    cfg = CTCConfig(targets="char", encoder={"preset": "tiny"}, loop={"max_steps": 2, "log_every": 1})
    finetune_ctc(manifest, manifest, tmp_path / "ctc", cfg, progress=False)
    (tmp_path / "broken.flac").write_bytes(b"")
    items.insert(1, {"id": "broken", "audio_filepath": str(tmp_path / "broken.flac"), "duration": 1.0})
    m = tmp_path / "dec.jsonl"
    m.write_text("".join(json.dumps(i) + "\n" for i in items))
    hyps = [json.loads(x) for x in transcribe_ctc(tmp_path / "ctc" / "best", m, tmp_path / "h.jsonl")
            .read_text().splitlines()]
    assert [h["id"] for h in hyps] == [i["id"] for i in items]
    assert hyps[1]["status"] == "failed" and "broken" in hyps[1]["reason"] and hyps[1]["text"] == ""
    assert all("status" not in h for k, h in enumerate(hyps) if k != 1)


def test_no_pickle_no_shell_on_any_load_path():
    """Static guard over the package: what a downloaded checkpoint or manifest reaches cannot run code."""
    import re

    src = Path(__file__).resolve().parents[1] / "src" / "selfspeech"
    for f in src.rglob("*.py"):
        text = f.read_text()
        where = f.relative_to(src)
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), where
        assert "shell=True" not in text and "allow_pickle=True" not in text and "os.system(" not in text, where
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), where
        for m in re.finditer(r"For\w+\.from_pretrained\(", text):  # model weights (not configs/tokenizers)
            call = text[m.end():m.end() + 250].split("\n\n")[0]
            assert "use_safetensors=True" in call, (where, text[m.start():m.end() + 80])


def test_pickled_whisper_checkpoint_is_refused(tmp_path, tiny_whisper_dir):
    import shutil

    from transformers import WhisperForConditionalGeneration

    from selfspeech.label.transcribe import transcribe_whisper

    d = tmp_path / "pickled"
    shutil.copytree(tiny_whisper_dir, d)
    # the pickle format a downloaded checkpoint may come in (torch.save of the state dict)
    torch.save(WhisperForConditionalGeneration.from_pretrained(d).state_dict(), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    manifest = reliability.make_corpus(tmp_path / "c", adults=1, children=0, per_speaker=1)
    with pytest.raises(OSError, match="safetensors"):
        transcribe_whisper(d, manifest, tmp_path / "h.jsonl")


def test_whisper_decode_and_finetune_skip_unreadable_audio(tmp_path, tiny_whisper_dir):
    from selfspeech.label.transcribe import transcribe_whisper
    from selfspeech.train.whisper_ft import FinetuneConfig, finetune

    manifest = reliability.make_corpus(tmp_path / "c", adults=2, children=0, per_speaker=2)
    items = [json.loads(x) for x in manifest.read_text().splitlines()]
    (tmp_path / "trunc.flac").write_bytes(Path(items[0]["audio_filepath"]).read_bytes()[:200])
    items.insert(2, {**items[0], "id": "trunc", "audio_filepath": str(tmp_path / "trunc.flac")})
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(i) + "\n" for i in items))
    cfg = FinetuneConfig(max_steps=2, batch_size=2, eval_every=2, max_new_tokens=3)
    finetune(m, m, tiny_whisper_dir, tmp_path / "ft", cfg, progress=False)
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["skipped"]["train"] == {"bad_audio": 1}, summary["skipped"]
    hyps = [json.loads(x) for x in transcribe_whisper(tmp_path / "ft" / "best", m, tmp_path / "h.jsonl")
            .read_text().splitlines()]
    assert [h["id"] for h in hyps] == [i["id"] for i in items]
    assert hyps[2]["status"] == "failed" and "trunc" in hyps[2]["reason"]


def test_a_killed_writers_temp_copy_is_dropped_by_the_next_write(tmp_path):
    from selfspeech.data.atomic import atomic_write, temp_prefix
    from selfspeech.train.checkpoint import write_dir

    out = tmp_path / "last"
    (tmp_path / f"{temp_prefix(out)}abc123").mkdir()  # as SIGKILL mid-checkpoint leaves it
    (tmp_path / f"{temp_prefix(out)}abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f"{temp_prefix(tmp_path / 'm.jsonl')}xyz").write_text("half a manifest")
    (tmp_path / ".other.tmp.keep").write_text("not ours")
    write_dir(out, lambda d: (d / "x").write_text("ok"))
    with atomic_write(tmp_path / "m.jsonl") as f:
        f.write("{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp.keep", "last", "m.jsonl"]


def test_a_live_writers_temp_copy_survives_a_concurrent_write(tmp_path):
    """Two processes writing one manifest: neither deletes the other's temp file mid-write."""
    import subprocess
    import sys

    from selfspeech.data.atomic import atomic_write

    code = ("import sys, time; sys.path[:0] = %r; from selfspeech.data.atomic import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n    f.write('theirs\\n'); f.flush(); print('ready', flush=True);"
            " time.sleep(3)" % (sys.path,))
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "m.jsonl")], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "ready"
    theirs = [p.name for p in tmp_path.iterdir()]
    assert len(theirs) == 1 and f".tmp.{other.pid}." in theirs[0]
    with atomic_write(tmp_path / "m.jsonl") as f:   # ours ends first; theirs must still be there
        f.write("ours\n")
    assert (tmp_path / theirs[0]).exists()
    assert other.wait(timeout=30) == 0             # their rename succeeds: last writer wins
    assert (tmp_path / "m.jsonl").read_text() == "theirs\n"
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_embedding_writer_streams_the_same_npz(tmp_path):
    from selfspeech.cluster.speakers import EmbeddingWriter, load_embeddings, save_embeddings

    rng = np.random.default_rng(0)
    emb = {f"u{i}": rng.standard_normal(7).astype(np.float32) for i in range(2500)}
    w = EmbeddingWriter(tmp_path / "stream.npz")
    for k, v in emb.items():
        w.add(k, v)
    w.close()
    save_embeddings(tmp_path / "whole.npz", emb)
    a, b = load_embeddings(tmp_path / "stream.npz"), load_embeddings(tmp_path / "whole.npz")
    assert list(a) == list(emb) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.npz", "whole.npz"]  # no temp rows left
    w = EmbeddingWriter(tmp_path / "bad.npz")
    w.add("a", np.zeros(3))
    with pytest.raises(ValueError, match="'b': embedding of size 4, the others have 3"):
        w.add("b", np.zeros(4))
