"""The demo on a very small corpus with the real offline tiny.en teacher (no adaptation: minutes, not seconds),
and the demo's own corpus and whisper-base teacher stage against the committed figures (about a minute)."""
import json
from pathlib import Path

import pytest

from selfspeech.data.versions import software_versions, versions_line
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
    assert res["versions"] == software_versions() and versions_line() in text


COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "demo" / "eval" / "eval.json"
# Allowed drift of a teacher WER (points) when the committed figures were computed under other
# versions or on another CPU. Measured on the demo corpus with the locked versions, CTranslate2's
# int8 kernels for CPUs with VNNI (MKL, chosen on Intel, and oneDNN, chosen elsewhere; AVX2-VNNI,
# AVX-512 VNNI, AMX) give per-accent WERs within 0.7 points of the committed ones (us 17.8-18.9%
# against 18.2%, scottish 28.2-28.4% against 28.2%); the kernels for CPUs without VNNI (AVX2, AVX-512)
# put an accent 1.5 points or more off (us 19.7-20.4%, scottish 29.5-31.0%), which this check must catch.
TOLERANCE = 1.0


ERRORS = ("substitutions", "deletions", "insertions")


def _per_accent(res: dict) -> dict[str, dict]:
    return {g["name"]: g for g in res["system"]["groups"] if g["field"] == "accent"}


def reproduction_failures(new: dict, old: dict) -> list[str]:
    """Why eval.json ``new`` does not reproduce the committed ``old`` (empty: it does).

    Under the versions and CPU recorded in ``old``, each accent must have the same errors to the
    word; under others (or none recorded), each accent's WER within TOLERANCE points.
    """
    got, want = _per_accent(new), _per_accent(old)
    if set(got) != set(want):
        return [f"accent groups {sorted(got)} here, {sorted(want)} committed"]
    same = old.get("versions") == new.get("versions")
    out = []
    for name, w in want.items():
        g = got[name]
        if g["ref_words"] != w["ref_words"]:
            out.append(f"{name}: another corpus ({g['ref_words']} reference words here, {w['ref_words']} committed)")
        elif (same and [g[k] for k in ERRORS] != [w[k] for k in ERRORS]) or abs(g["wer"] - w["wer"]) * 100 > TOLERANCE:
            out.append(f"{name}: teacher WER {100 * g['wer']:.2f}% ({'/'.join(str(g[k]) for k in ERRORS)}) here, "
                       f"{100 * w['wer']:.2f}% ({'/'.join(str(w[k]) for k in ERRORS)}) committed"
                       + (" under the same versions and CPU" if same else f", allowed {TOLERANCE} points"))
    if out:
        out.append(f"committed under {old.get('versions', 'unrecorded versions')}; here {new.get('versions')}. "
                   "Install through requirements/lock.txt (make install); on another CPU, regenerate "
                   f"{COMMITTED.parent.parent} with make demo")
    return out


def test_reproduction_check_is_exact_under_the_recorded_versions_and_tolerant_elsewhere():
    def res(us_errors: tuple, versions=None) -> dict:
        groups = [{"name": "all", "field": None}]
        for name, (s, d, i), words in (("accent=us", us_errors, 853), ("accent=scottish", (194, 16, 35), 869)):
            groups.append({"name": name, "field": "accent", "ref_words": words, "wer": (s + d + i) / words,
                           **dict(zip(ERRORS, (s, d, i)))})
        return {"system": {"groups": groups}, **({"versions": versions} if versions else {})}

    here = software_versions()
    old = res((118, 21, 16), here)
    assert reproduction_failures(res((118, 21, 16), here), old) == []
    assert reproduction_failures(res((117, 22, 16), here), old)          # same WER, other errors: not exact
    elsewhere = {**here, "cpu": "another CPU"}
    assert reproduction_failures(res((117, 22, 16), elsewhere), old) == []
    assert reproduction_failures(res((118, 21, 23), elsewhere), old) == []  # +0.82 points
    failures = reproduction_failures(res((118, 21, 25), elsewhere), old)   # +1.06 points
    assert len(failures) == 2 and "accent=us: teacher WER 19.23%" in failures[0] and "make demo" in failures[1]


@pytest.mark.shared
@pytest.mark.slow
def test_demo_teacher_stage_reproduces_the_committed_figures(tmp_path):
    """The demo's corpus and teacher stage (``selfspeech demo --no-adapt``) against the committed report."""
    try:
        from selfspeech.models.zoo import pull

        pull(DemoConfig().teacher)
    except Exception as e:
        pytest.skip(f"{DemoConfig().teacher} not available: {e}")
    run_demo(tmp_path, DemoConfig(adapt=False), progress=False, log=lambda m: None)
    new = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert not (why := reproduction_failures(new, json.loads(COMMITTED.read_text()))), "\n".join(why)
