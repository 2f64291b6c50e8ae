"""Pooling Pseudo2Real figures over speaker splits (benchmarks/p2r_pool.py): kept splits, the label-free choice."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import p2r_pool  # noqa: E402


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(tmp, seed, wrong):
    """A split of 4 eval utterances (2 speakers); ``wrong[system]``: how many it gets wrong."""
    refs = [{"id": f"u{i}", "speaker": f"k{i // 2}", "text": "a b", "audio_filepath": "x.flac"} for i in range(4)]
    d = tmp / f"run{seed}"
    d.mkdir()
    hyps = {name: _jsonl(d / f"{name}.jsonl", [{"id": r["id"], "text": "a c" if i < n else "a b"}
                                                for i, r in enumerate(refs)]) for name, n in wrong.items()}
    return {"eval_manifest": _jsonl(d / "target_eval.jsonl", refs), "hyps": hyps}


LAM = {"lambda": 1.0, "scope": "all", "curve_source_sim": {"0.0": 0.3, "1.0": 0.25},
       "variants": {"p2r_mixed": {"lambda": 0.5, "scope": "encoder", "curve_source_sim_mixed_encoder": {"0.5": 0.2}}}}


def test_rehearsal_wers_read_each_rules_own_cell():
    assert p2r_pool.rehearsal_wers(LAM) == {"p2r": 0.25, "p2r_mixed": 0.2}
    assert p2r_pool.rehearsal_choice(LAM) == "p2r_mixed"
    assert p2r_pool.rehearsal_choice({"lambda": None}) is None


def test_kept_splits_pool_and_the_choice_takes_each_splits_pick(tmp_path):
    wrong = [{"pseudo_ft": 4, "source_real_plus_target_pseudo": 3, "p2r": 2, "p2r_mixed": 0, "oracle": 0},
             {"pseudo_ft": 4, "source_real_plus_target_pseudo": 3, "p2r": 0, "p2r_mixed": 4, "oracle": 0}]
    folder = tmp_path / "kept"
    for seed, w in enumerate(wrong):
        run = _run(tmp_path, seed, w)
        # split 0's rehearsal picks p2r_mixed, split 1's picks p2r
        lam = LAM if seed == 0 else {**LAM, "variants": {}}
        p2r_pool.save_split(folder, seed, run, {"rehearsal_choice": p2r_pool.rehearsal_choice(lam)})
    kept = p2r_pool.load_splits(folder)
    assert sorted(kept) == [0, 1] and (folder / "split0" / "p2r_mixed.jsonl").is_file()
    assert set(json.loads(open(kept[0]["eval_manifest"]).readline())) == {"id", "speaker", "text"}
    out = p2r_pool.pooled(kept, "basic", n_resamples=50)
    assert out["wer"]["pseudo_ft"] == pytest.approx(0.5) and out["wer"]["p2r"] == pytest.approx(0.125)
    c = out["label_free_choice"]
    assert c["per_split"] == {"0": "p2r_mixed", "1": "p2r"} and c["wer"] == pytest.approx(0.0)
    assert c["oracle_gap_closed"] == pytest.approx(1.0)
    assert out["best_label_free"]["system"] == "p2r"  # by pooled eval WER: a summary, not the recipe's choice
    (folder / "split1" / "split.json").unlink()  # an incomplete split is not kept
    assert sorted(p2r_pool.load_splits(folder)) == [0]
