"""Speaker-verification evaluation (selfspeech.eval.sv, eval.sv_metrics): metrics, trial lists, scoring, plots."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from selfspeech.eval.sv import (Trial, as_norm, cosine_scores, det_plot, embedding_plot, make_trials, metrics_table,
                                read_trials, single_utterance_speakers)
from selfspeech.eval.sv_metrics import SVMetrics, det_curve, eer_mindcf

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- references

def brute_force(scores, labels, p_target=0.01, c_miss=1.0, c_fa=1.0):
    """EER / minDCF straight from the definitions: every distinct score and +inf as a threshold, in order."""
    s, lab = np.asarray(scores, float), np.asarray(labels, bool)
    pts = []
    for t in [*sorted(set(s.tolist())), math.inf]:
        pmiss = sum(1 for x, y in zip(s, lab) if y and x < t) / lab.sum()
        pfa = sum(1 for x, y in zip(s, lab) if not y and x >= t) / (~lab).sum()
        pts.append((pmiss, pfa))
    return metrics_from_points(pts, p_target, c_miss, c_fa)


def brute_force_large(scores, labels, p_target=0.01, c_miss=1.0, c_fa=1.0):
    """``brute_force`` for large sets: the same thresholds, each counted over all scores with numpy."""
    s, lab = np.asarray(scores, float), np.asarray(labels, bool)
    tar, non = s[lab], s[~lab]
    pts = [(np.count_nonzero(tar < t) / tar.size, np.count_nonzero(non >= t) / non.size)
           for t in [*np.unique(s).tolist(), math.inf]]
    return metrics_from_points(pts, p_target, c_miss, c_fa)


def metrics_from_points(pts, p_target, c_miss, c_fa):
    """(EER, minDCF) from the (Pmiss, Pfa) operating points in threshold order."""
    costs = [c_miss * p_target * m + c_fa * (1 - p_target) * f for m, f in pts]
    mindcf = min(costs) / min(c_miss * p_target, c_fa * (1 - p_target))
    for (m0, f0), (m1, f1) in zip(pts, pts[1:]):
        if f0 - m0 >= 0 > f1 - m1:  # the one sign change of Pfa - Pmiss
            if f0 == m0:
                return m0, mindcf
            lam = (f0 - m0) / ((f0 - m0) - (f1 - m1))
            return m0 + lam * (m1 - m0), mindcf
    raise AssertionError("Pfa - Pmiss never changed sign")


def sklearn_eer_mindcf(scores, labels, p_target=0.01):
    """The same definitions on scikit-learn's roc_curve points (fpr = Pfa, 1 - tpr = Pmiss).

    roc_curve runs from "reject all" (threshold inf) to "accept all", one point per
    distinct score; dropping collinear points changes neither the interpolated
    crossing nor the minimum of a linear cost.
    """
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    d = fpr - fnr  # increasing here
    k = int(np.argmax(d >= 0))
    if d[k] == 0:
        eer = fnr[k]
    else:
        lam = -d[k - 1] / (d[k] - d[k - 1])
        eer = fnr[k - 1] + lam * (fnr[k] - fnr[k - 1])
    return float(eer), float((p_target * fnr + (1 - p_target) * fpr).min() / min(p_target, 1 - p_target))


def kaldi_convention_eer(scores, labels):
    """Kaldi compute-eer's convention, restated: thresholds at sorted target scores x_i only;
    the EER is the miss rate i / n_target at the first i where #{non-target >= x_i} / n_nontarget
    is no longer above it (no interpolation)."""
    s, lab = np.asarray(scores), np.asarray(labels, bool)
    tar, non = np.sort(s[lab]), np.sort(s[~lab])
    for i, x in enumerate(tar):
        if (non.size - np.searchsorted(non, x, "left")) / non.size <= i / tar.size:
            return i / tar.size
    return (tar.size - 1) / tar.size


def gaussian_trials(n, frac=0.2, seed=0, dtype=np.float32, decimals=None):
    rng = np.random.default_rng(seed)
    lab = rng.random(n) < frac
    lab[:2] = [True, False]
    s = rng.standard_normal(n) + 1.5 * lab
    if decimals is not None:
        s = np.round(s, decimals)  # many ties, inside and across classes
    return s.astype(dtype), lab


# ----------------------------------------------------------------------------- EER / minDCF

def test_all_scores_equal_gives_half():
    m = eer_mindcf(np.full(6, 0.3), [1, 0, 1, 0, 0, 1])
    assert m.eer == 0.5
    assert m.mindcf == 1.0  # no better than rejecting everything
    assert (m.n_target, m.n_nontarget) == (3, 3)


def test_perfect_separation():
    m = eer_mindcf([0.9, 0.8, 0.1, 0.2, 0.3], [1, 1, 0, 0, 0])
    assert m.eer == 0.0 and m.mindcf == 0.0
    assert 0.3 < m.eer_threshold <= 0.8 and 0.3 < m.mindcf_threshold <= 0.8


def test_hand_computed_with_ties_across_classes():
    # targets 2, 2, 1; non-targets 2, 0. Operating points (Pmiss, Pfa) at t = 0, 1, 2, inf:
    # (0, 1), (0, 1/2), (1/3, 1/2), (1, 0). Pfa - Pmiss: 1, 1/2, 1/6, -1 -> crossing on the
    # segment (1/3, 1/2)-(1, 0) at lambda = (1/6) / (7/6) = 1/7: EER = 1/3 + 2/21 = 3/7.
    # The tie at 2 stays together: splitting it could put the target 2s above the non-target 2.
    m = eer_mindcf([2, 2, 1, 2, 0], [1, 1, 1, 0, 0], p_target=0.5)
    assert m.eer == pytest.approx(3 / 7, abs=1e-15)
    assert m.eer_threshold == 2.0
    # p = 0.5: costs 0.5, 0.25, 0.4167, 0.5 -> 0.25 / 0.5 at t = 1
    assert m.mindcf == pytest.approx(0.5, abs=1e-15)
    assert m.mindcf_threshold == 1.0


def test_exact_crossing_on_an_operating_point():
    # t = 2: Pmiss = 1/4 (the target 1), Pfa = 1/4 (the non-target 2)
    m = eer_mindcf([3, 2, 2, 1, 2, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert m.eer == 0.25 and m.eer_threshold == 2.0


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_over_all_thresholds(seed):
    s, lab = gaussian_trials(60 + 17 * seed, frac=0.3, seed=seed, dtype=np.float64, decimals=1)
    for p, cm, cf in [(0.01, 1, 1), (0.05, 1, 1), (0.5, 2, 1), (0.9, 1, 3)]:
        eer, mindcf = brute_force(s, lab, p, cm, cf)
        m = eer_mindcf(s, lab, p_target=p, c_miss=cm, c_fa=cf)
        assert m.eer == pytest.approx(eer, abs=1e-12)
        assert m.mindcf == pytest.approx(mindcf, abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 2])
def test_agrees_with_sklearn_roc_curve(decimals):
    # Same definitions computed from roc_curve's rates; they differ only by float rounding
    # (1 - tpr vs our miss/Nt), so "agree" means |difference| <= 1e-12.
    s, lab = gaussian_trials(50_000, seed=3, decimals=decimals)
    m = eer_mindcf(s, lab)
    eer, mindcf = sklearn_eer_mindcf(s, lab)
    assert abs(m.eer - eer) <= 1e-12 and abs(m.mindcf - mindcf) <= 1e-12


def test_kaldi_convention_within_one_target_step():
    for seed in range(5):
        s, lab = gaussian_trials(5_000, seed=seed, dtype=np.float64)  # distinct scores
        ours, kaldi = eer_mindcf(s, lab).eer, kaldi_convention_eer(s, lab)
        assert 0 <= kaldi - ours <= 1 / lab.sum() + 1e-15


def test_chunked_sweep_matches_single_chunk(monkeypatch):
    import selfspeech.eval.sv_metrics as sv

    s, lab = gaussian_trials(20_000, seed=1, decimals=2)
    whole = eer_mindcf(s, lab)
    monkeypatch.setattr(sv, "_CHUNK", 97)  # chunk borders inside runs of equal scores
    assert eer_mindcf(s, lab) == whole


def test_chunk_holding_a_single_value(monkeypatch):
    import selfspeech.eval.sv_metrics as sv

    rng = np.random.default_rng(5)
    lab = rng.random(400) < 0.4
    s = np.round(rng.standard_normal(400) + lab, 1)
    s[rng.permutation(400)[:150]] = 0.3  # runs of 0.3 in both classes, far longer than a chunk
    monkeypatch.setattr(sv, "_CHUNK", 16)
    for p in (0.01, 0.5):
        eer, mindcf = brute_force(s, lab, p)
        m = eer_mindcf(s, lab, p_target=p)
        assert m.eer == pytest.approx(eer, abs=1e-12) and m.mindcf == pytest.approx(mindcf, abs=1e-12)


@pytest.mark.parametrize("case", ["rounded", "one_value_run"])
def test_large_tie_heavy_sets_match_brute_force(case):
    import selfspeech.eval.sv_metrics as sv

    if case == "rounded":  # 200k scores on a 0.01 grid: every threshold is shared by hundreds of trials
        s, lab = gaussian_trials(200_000, frac=0.3, seed=7, dtype=np.float64, decimals=2)
    else:  # the default chunk: a run of one non-target value covers a whole chunk
        s, lab = gaussian_trials(2 * sv._CHUNK + 200_000, frac=0.1, seed=8, dtype=np.float64, decimals=2)
        s[~lab & (np.arange(s.size) % 20 != 0)] = 0.25
        assert np.count_nonzero(s[~lab] == 0.25) > 2 * sv._CHUNK
    for p, cm, cf in [(0.01, 1, 1), (0.5, 2, 1)]:
        eer, mindcf = brute_force_large(s, lab, p, cm, cf)
        m = eer_mindcf(s, lab, p_target=p, c_miss=cm, c_fa=cf)
        assert m.eer == pytest.approx(eer, abs=1e-12)
        assert m.mindcf == pytest.approx(mindcf, abs=1e-12)


def test_input_forms_and_order_do_not_matter():
    s, lab = gaussian_trials(3_000, seed=2, decimals=1)
    ref = eer_mindcf(s, lab)
    perm = np.random.default_rng(0).permutation(s.size)
    assert eer_mindcf(s[perm], lab[perm]) == ref
    assert eer_mindcf(s.tolist(), lab.astype(int).tolist()) == eer_mindcf(s.astype(np.float64), lab)


def test_metric_errors():
    with pytest.raises(ValueError, match="no target"):
        eer_mindcf([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="no non-target"):
        eer_mindcf([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        eer_mindcf([0.1, float("nan"), 0.3], [1, 0, 1])
    with pytest.raises(ValueError, match="same length"):
        eer_mindcf([0.1, 0.2, 0.3], [1, 0])
    with pytest.raises(ValueError, match="0/1"):
        eer_mindcf([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="p_target"):
        eer_mindcf([0.1, 0.2], [1, 0], p_target=0)


def test_det_curve_ends():
    s, lab = gaussian_trials(100_000, seed=4)
    pfa, pmiss = det_curve(s, lab, max_points=500)
    assert len(pfa) < 600
    assert (pfa[0], pmiss[0]) == (1.0, 0.0) and (pfa[-1], pmiss[-1]) == (0.0, 1.0)
    assert np.all(np.diff(pfa) <= 0) and np.all(np.diff(pmiss) >= 0)


# ----------------------------------------------------------------------------- trial lists

U2S = {"a1": "A", "a2": "A", "a3": "A", "b1": "B", "b2": "B", "c1": "C", "d1": "D", "d2": "D"}


def _pair(t):
    return frozenset((t.enrol, t.test))


def check_rules(trials, utt2spk):
    assert all(t.enrol != t.test for t in trials)
    assert len({_pair(t) for t in trials}) == len(trials)  # no duplicate, no swapped duplicate
    assert all(t.target == (utt2spk[t.enrol] == utt2spk[t.test]) for t in trials)


def test_all_pairs(caplog):
    with caplog.at_level(logging.WARNING, logger="selfspeech.eval.sv"):
        trials = make_trials(U2S, None)
    check_rules(trials, U2S)
    assert len(trials) == 8 * 7 // 2
    assert sum(t.target for t in trials) == 3 + 1 + 1  # A: 3 pairs, B: 1, D: 1, C: none
    assert single_utterance_speakers(U2S) == ["C"]
    assert "1 speaker(s) with a single utterance" in caplog.text and "C" in caplog.text
    assert any("c1" in (t.enrol, t.test) for t in trials)  # still used, as non-target


def test_sampled_trials_rules_and_determinism():
    rng = np.random.default_rng(0)
    u2s = {f"u{i:03d}": f"s{rng.integers(12)}" for i in range(120)}
    a = make_trials(u2s, 2_000, seed=5)
    check_rules(a, u2s)
    assert len(a) == 2_000
    assert a == make_trials(u2s, 2_000, seed=5)
    assert a != make_trials(u2s, 2_000, seed=6)
    b = make_trials(u2s, 1_000, seed=1, target_fraction=0.5)
    check_rules(b, u2s)
    assert sum(t.target for t in b) == 500
    assert len({(t.enrol < t.test) for t in b}) == 2  # both orientations occur


def test_target_fraction_limits():
    t = make_trials(U2S, None, target_fraction=0.5)
    check_rules(t, U2S)
    assert sum(x.target for x in t) == 5 and len(t) == 10  # all 5 target pairs + 5 non-targets
    with pytest.raises(ValueError, match="target pairs exist"):
        make_trials(U2S, 20, target_fraction=0.5)
    with pytest.raises(ValueError, match="distinct pairs"):
        make_trials(U2S, 29)
    with pytest.raises(ValueError, match="target_fraction"):
        make_trials(U2S, 5, target_fraction=1.5)


def test_trials_round_trip(tmp_path):
    trials = make_trials(U2S, 12, seed=2)
    p = tmp_path / "trials.txt"  # the Kaldi/VoxCeleb list: ``enrol test target|nontarget``
    p.write_text("".join(f"{t.enrol} {t.test} {'target' if t.target else 'nontarget'}\n" for t in trials))
    assert p.read_text().splitlines()[0].split()[2] in ("target", "nontarget")
    assert read_trials(p) == (trials, 0)
    assert read_trials(p, known_ids=set(U2S)) == (trials, 0)


def test_read_trials_unknown_ids(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a1 a2 target\n\na1 zz nontarget\nqq b1 nontarget\nb1 b2 target\n")
    with pytest.raises(ValueError, match=r"t\.txt:3: unknown utterance id 'zz'"):
        read_trials(p, known_ids=U2S)
    trials, skipped = read_trials(p, known_ids=U2S, on_unknown="skip")
    assert skipped == 2
    assert trials == [Trial("a1", "a2", True), Trial("b1", "b2", True)]


@pytest.mark.parametrize("line", ["a1 a2", "a1 a2 yes", "a1 a2 target extra", "a1 a1 target"])
def test_read_trials_malformed(tmp_path, line):
    p = tmp_path / "t.txt"
    p.write_text(f"a1 a2 target\n{line}\n")
    with pytest.raises(ValueError, match=r"t\.txt:2:"):
        read_trials(p)


# ----------------------------------------------------------------------------- scoring

EMB = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([3.0, 3.0]), "d": np.array([-2.0, 0.0])}


def test_cosine_scores_by_hand():
    trials = [Trial("a", "b", False), Trial("a", "c", True), Trial("c", "b", False), Trial("a", "d", False)]
    np.testing.assert_allclose(cosine_scores(EMB, trials), [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2), -1.0],
                               atol=1e-12)
    with pytest.raises(KeyError, match="zz"):
        cosine_scores(EMB, [Trial("a", "zz", False)])


def test_as_norm_by_hand_and_symmetric():
    cohort = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    trials = [Trial("a", "c", True), Trial("c", "a", True)]
    raw = cosine_scores(EMB, trials)
    # a vs cohort: 1, 0, 1/sqrt2; c vs cohort: 1/sqrt2, 1/sqrt2, 1. Top 2 of each:
    ta, tc = np.array([1, 1 / math.sqrt(2)]), np.array([1 / math.sqrt(2), 1])
    want = 0.5 * ((raw[0] - ta.mean()) / ta.std() + (raw[0] - tc.mean()) / tc.std())
    out = as_norm(raw, trials, EMB, cohort, top_n=2)
    np.testing.assert_allclose(out, [want, want], atol=1e-12)
    full = as_norm(raw, trials, EMB, {f"k{i}": v for i, v in enumerate(cohort)}, top_n=None)  # S-norm
    sa, sc = np.array([1, 0, 1 / math.sqrt(2)]), np.array([1 / math.sqrt(2), 1 / math.sqrt(2), 1])
    np.testing.assert_allclose(full[0], 0.5 * ((raw[0] - sa.mean()) / sa.std() + (raw[0] - sc.mean()) / sc.std()))
    with pytest.raises(ValueError, match="match"):
        as_norm(raw[:1], trials, EMB, cohort)


# ----------------------------------------------------------------------------- plots and tables

def test_det_plot_png(tmp_path):
    a, b = gaussian_trials(4_000, seed=0), gaussian_trials(4_000, seed=1, decimals=1)
    p = det_plot({"sys A": a, "sys B": b}, tmp_path / "det" / "det.png")
    assert p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG


@pytest.mark.parametrize("n_per_spk", [3, 12])  # 9 points: PCA only; 36 points: PCA + t-SNE
def test_embedding_plot_png(tmp_path, n_per_spk):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 3
    emb = {f"s{s}_{i}": centres[s] + rng.standard_normal(16) for s in range(3) for i in range(n_per_spk)}
    u2s = {u: u.split("_")[0] for u in emb}
    p = embedding_plot(emb, u2s, tmp_path / "emb.png", max_speakers=20)
    assert p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG


def test_metrics_table():
    m = SVMetrics(eer=0.0123, mindcf=0.3456, eer_threshold=0.5, mindcf_threshold=0.6, n_target=4874,
                  n_nontarget=32846)
    lines = metrics_table({"ecapa": m}).splitlines()
    assert lines[0].startswith("| system | EER (%)")
    assert lines[2] == "| ecapa | 1.23 | 0.3456 | 0.01 | 4,874 | 32,846 |"
