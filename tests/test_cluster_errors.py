"""Teacher-error clusters (selfspeech.cluster.errors): features, the WER model, the cuts."""
import numpy as np
import pytest

from selfspeech.cluster import errors as E


def _label(uid, lp=-0.3, text="a b c", duration=1.5, flags=()):
    return {"id": uid, "avg_logprob": lp, "compression_ratio": 1.1, "no_speech_prob": 0.02, "text": text,
            "duration": duration, "flags": list(flags), "status": "ok"}


def test_confidence_features_and_missing_field():
    f = E.confidence_features(_label("u1", text="one two three", duration=1.5, flags=["low_logprob"]))
    assert f.shape == (len(E.FEATURES),)
    assert f[E.FEATURES.index("flagged")] == 1.0 and f[E.FEATURES.index("words_per_second")] == pytest.approx(2.0)
    bad = _label("u2")
    bad["avg_logprob"] = None
    with pytest.raises(ValueError, match="u2.*avg_logprob"):
        E.confidence_features(bad)


def test_speaker_features_skip_failed_labels():
    items = [{"id": "a1", "speaker": "A"}, {"id": "a2", "speaker": "A"}, {"id": "b1", "speaker": "B"}]
    labels = {"a1": _label("a1", lp=-0.2), "a2": _label("a2", lp=-0.6),
              "b1": {"id": "b1", "status": "failed", "text": None}}
    f = E.speaker_features(items, labels)
    assert set(f) == {"A"} and f["A"][0] == pytest.approx(-0.4)


def test_error_model_ranks_unseen_speakers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, len(E.FEATURES)))
    y = 0.3 - 0.1 * x[:, 0] + 0.02 * rng.normal(size=40)  # WER falls with the log-probability
    m = E.fit_error_model(x[:30], y[:30])
    assert E.heldout_spearman(m, x[30:], y[30:]) > 0.8
    noise = rng.normal(size=10)
    assert abs(E.heldout_spearman(m, rng.normal(size=(10, len(E.FEATURES))), noise)) < 0.8
    assert E.heldout_spearman(m, x[30:], np.full(10, 0.2)) is None  # a constant WER has no ranking
    with pytest.raises(ValueError, match="at least 3"):
        E.fit_error_model(x[:2], y[:2])


def test_quantile_cuts_make_equal_groups_and_assign_by_value():
    wer = {f"s{i}": v for i, v in enumerate([0.05, 0.4, 0.1, 0.3, 0.2, 0.5])}
    cuts = E.quantile_cuts(np.array(list(wer.values())), 2)
    assert cuts.tolist() == [pytest.approx(0.25)]
    g = E.assign(wer, cuts)
    assert sorted(g.values()) == [0, 0, 0, 1, 1, 1] and g["s5"] == 1 and g["s0"] == 0
    assert E.assign({"t": 0.9, "u": 0.0}, cuts) == {"t": 1, "u": 0}
    assert len(E.quantile_cuts(np.arange(9.0), 3)) == 2


def test_rank_groups_keep_equal_sizes_under_ties():
    g = E.rank_groups({"a": 0.1, "b": 0.1, "c": 0.1, "d": 0.3}, 2)
    assert sorted(g.values()) == [0, 0, 1, 1] and g["d"] == 1
    assert sorted(E.rank_groups({str(i): float(i % 3) for i in range(7)}, 3).values()) == [0, 0, 0, 1, 1, 2, 2]
