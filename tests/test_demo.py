"""The demo on a very small corpus with the real offline tiny.en teacher (no adaptation: minutes, not seconds)."""
import json

import pytest

from selfspeech.demo import DemoConfig, demo_recipe, run_demo


def test_demo_recipe_is_speaker_disjoint_and_label_free(tmp_path):
    from selfspeech.data.manifest import write_manifest

    items = [{"id": f"{a}{s}_{u}", "audio_filepath": "x.flac", "speaker": f"{a}{s}", "accent": a, "text": "hi"}
             for a in ("us", "scottish") for s in range(DemoConfig().speakers_per_accent) for u in range(2)]
    write_manifest(tmp_path / "m.jsonl", items)
    r = demo_recipe(DemoConfig(), tmp_path / "m.jsonl")
    assert r.data.source_rule == "accent==us" and r.data.target_rule == "accent==scottish"
    assert r.lam.rule == "source_sim" and not r.lam.oracle_sweep and "oracle" not in r.systems
    from selfspeech.adapt.prepare import make_parts

    parts = make_parts(r, tmp_path)
    spk = {n: {json.loads(line)["speaker"] for line in open(p)} for n, p in parts.items()
           if n in ("source_train", "source_dev", "source_sim", "target_adapt", "target_eval")}
    assert all(v for v in spk.values())
    names = list(spk)
    assert all(not (spk[a] & spk[b]) for i, a in enumerate(names) for b in names[i + 1:])
    assert len(spk["target_eval"]) == DemoConfig().speakers_per_accent // 2


def test_demo_cli_defaults_are_the_config_defaults():
    import inspect

    from selfspeech.commands.demo import demo

    params = inspect.signature(demo).parameters
    for name in ("speakers_per_accent", "utts_per_speaker", "adapt_steps"):
        assert params[name].default.default == getattr(DemoConfig(), name), name


@pytest.mark.shared
def test_demo_runs_end_to_end_without_adaptation(tmp_path):
    try:
        from selfspeech.models.zoo import pull

        pull("whisper-tiny.en")
    except Exception as e:
        pytest.skip(f"whisper-tiny.en not available: {e}")
    cfg = DemoConfig(speakers_per_accent=2, utts_per_speaker=2, teacher="whisper-tiny.en", adapt=False)
    report = run_demo(tmp_path, cfg, progress=False, log=lambda m: None)
    text = report.read_text()
    assert "accent=us" in text and "accent=scottish" in text and "WER" in text
    assert (tmp_path / "eval" / "wer.png").is_file()
    res = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert res["system"]["groups"][0]["utterances"] == 8 and res["normalizer"] == "whisper_english"
