"""Statistics of `rsg report` against cases worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rsg_eval.core import metrics
from rsg_eval.report.stats import Bootstrap, paired_test, percentile_ci, resample_indices
from _report_utils import make_rows

NLI = ["entailment", "not_entailment"]


def _terra(n_right: int, n: int = 100) -> Bootstrap:
    """n TERRa items with gold alternating; the first n_right predictions right, the rest wrong."""
    golds = [NLI[i % 2] for i in range(n)]
    preds = [g if i < n_right else NLI[1 - NLI.index(g)] for i, g in enumerate(golds)]
    return Bootstrap("TERRa", golds, preds, list(range(n)))


def _paired(ref: Bootstrap, run: Bootstrap, n_boot: int = 2000, seed: int = 0):
    idx = resample_indices(ref.n_groups, n_boot, np.random.default_rng(seed))
    d = run.scores(idx)["score"] - ref.scores(idx)["score"]
    return paired_test(run.point["score"] - ref.point["score"], d)


def test_clear_difference_is_significant():
    # 50 of 100 right against 95 of 100 right, the 50 a subset of the 95: +0.45 on every replicate's items
    res = _paired(_terra(50), _terra(95))
    assert res.diff == pytest.approx(0.45)
    assert res.significant and res.p_value < 0.01
    assert res.ci[0] > 0.3 and res.ci[1] < 0.6


def test_identical_runs_are_not_significant():
    res = _paired(_terra(60), _terra(60))
    assert res.diff == 0.0
    assert res.p_value == 1.0 and not res.significant
    assert res.ci == (0.0, 0.0)


def test_p_value_matches_the_hand_computed_probability():
    # 4 items; the run is right on item 0 where the reference is wrong, equal elsewhere. A replicate shows
    # no gain exactly when item 0 is not drawn: P = (3/4)^4 = 0.3164, so p = 2 * 0.3164 = 0.6328.
    golds = NLI * 2
    ref = Bootstrap("TERRa", golds, [NLI[1], NLI[1], NLI[0], NLI[1]], [0, 1, 2, 3])
    run = Bootstrap("TERRa", golds, [NLI[0], NLI[1], NLI[0], NLI[1]], [0, 1, 2, 3])
    res = _paired(ref, run, n_boot=20000)
    assert res.diff == pytest.approx(0.25)
    assert res.p_value == pytest.approx(2 * 0.75 ** 4, abs=0.02)
    assert not res.significant


def test_interval_contains_point_and_is_degenerate_when_all_right():
    b = _terra(70)
    samples = b.scores(resample_indices(b.n_groups, 1000, np.random.default_rng(1)))["score"]
    lo, hi = percentile_ci(samples)
    assert lo < b.point["score"] == 0.7 < hi
    # the bootstrap mean sits near the point estimate (accuracy is unbiased): within 3 standard errors
    assert abs(samples.mean() - 0.7) < 3 * np.sqrt(0.7 * 0.3 / 100 / 1000) + 0.01
    perfect = _terra(100)
    s = perfect.scores(resample_indices(100, 200, np.random.default_rng(1)))["score"]
    assert percentile_ci(s) == (1.0, 1.0)


def test_muserc_resamples_whole_questions():
    # q0: answers gold [1, 0], pred [1, 0] (all right); q1: gold [1, 1], pred [1, 0] (one miss).
    # Whole-question replicates are {q0,q0}, {q0,q1}, {q1,q1}:
    #   {q0,q0}: tp 2, fn 0 -> F1a 1,   EM 1   -> score 1
    #   {q0,q1}: tp 2, fn 1 -> F1a 0.8, EM 0.5 -> score 0.65
    #   {q1,q1}: tp 2, fn 2 -> F1a 2/3, EM 0   -> score 1/3
    # Resampling answers one by one would give other values (e.g. one answer of q1 alone).
    b = Bootstrap("MuSeRC", [1, 0, 1, 1], [1, 0, 1, 0], [10, 10, 11, 11])
    assert b.point["f1a"] == pytest.approx(0.8) and b.point["em"] == 0.5
    s = b.scores(resample_indices(b.n_groups, 400, np.random.default_rng(0)))["score"]
    values = sorted({round(float(v), 9) for v in s})
    assert values == [round(1 / 3, 9), 0.65, 1.0]
    # and a replicate, spelled out item by item, keeps each question's answers together
    golds, preds, groups = b.replicate(np.array([1, 1]))
    assert (golds, preds) == ([1, 1, 1, 1], [1, 0, 1, 0]) and groups == [0, 0, 1, 1]


@pytest.mark.parametrize("task", ["LiDiRus", "RCB", "PARus", "MuSeRC", "TERRa", "RUSSE", "RWSD", "DaNetQA", "RuCoS"])
def test_fast_formulas_equal_metrics_score_on_replicates(task):
    rows = make_rows(task, 30, 0.6, seed=3)
    golds = [r["gold"] for r in rows]
    preds = [r["pred"] for r in rows]
    groups = [r["group"] for r in rows]
    b = Bootstrap(task, golds, preds, groups)
    assert b.point == metrics.score(task, golds, preds, groups=groups)
    idx = resample_indices(b.n_groups, 12, np.random.default_rng(5))
    fast, slow = b._fast(idx), b._slow(idx)
    for k in slow:
        np.testing.assert_allclose(fast[k], slow[k], atol=1e-12, rtol=0)
    b.scores(idx)
    assert b.exact


def test_rcb_replicates_missing_a_class_still_match():
    # one contradiction among 20: many replicates lack it, and macro F1 then counts that class as 0
    golds = ["neutral"] * 10 + ["entailment"] * 9 + ["contradiction"]
    preds = ["neutral"] * 8 + ["entailment"] * 2 + ["entailment"] * 9 + ["neutral"]
    b = Bootstrap("RCB", golds, preds, list(range(20)))
    idx = resample_indices(20, 60, np.random.default_rng(2))
    assert any(19 not in row for row in idx)
    np.testing.assert_allclose(b._fast(idx)["f1"], b._slow(idx)["f1"], atol=1e-12, rtol=0)


def test_type_strict_accuracy_is_kept():
    # PARus labels are ints: a bool prediction True == 1 is not the same label for metrics.accuracy
    b = Bootstrap("PARus", [1, 0, 1], [True, 0, 1], [0, 1, 2])
    assert b.point["acc"] == pytest.approx(2 / 3)
    s = b.scores(np.array([[0, 0, 0], [1, 2, 2]]))["acc"]
    np.testing.assert_allclose(s, [0.0, 1.0])


def test_same_seed_same_replicates():
    b = _terra(60)
    a1 = b.scores(resample_indices(100, 300, np.random.default_rng([7, 4])))["score"]
    a2 = b.scores(resample_indices(100, 300, np.random.default_rng([7, 4])))["score"]
    a3 = b.scores(resample_indices(100, 300, np.random.default_rng([8, 4])))["score"]
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)


def test_mcnemar_exact_by_hand():
    from rsg_eval.report.stats import mcnemar_exact

    # 10 items only the run gets right, none only the reference: p = 2 * (1/2)^10 = 0.001953125
    assert mcnemar_exact([False] * 10 + [True] * 5, [True] * 15) == (0, 10, 2 / 1024)
    # b = 1, c = 3: p = 2 * (C(4,0) + C(4,1)) / 16 = 0.625
    assert mcnemar_exact([True, False, False, False], [False, True, True, True]) == (1, 3, 0.625)
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)
