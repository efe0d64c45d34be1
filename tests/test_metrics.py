"""Metric values worked out by hand (RSG_SPEC.md section 3)."""

import math

import pytest

from rsg_eval.core import metrics as M
from rsg_eval.core.tasks import TASK_NAMES, Item

E, N = "entailment", "not_entailment"


def test_accuracy_and_types():
    assert M.accuracy([E, N, E], [E, E, E]) == pytest.approx(2 / 3)
    # True == 1 in Python, but a PARus int label is not a bool: strict types.
    assert M.accuracy([1, 0], [True, False]) == 0.0


def test_lidirus_mcc_by_hand():
    # E positive: TP=1 FN=1 TN=2 FP=0 -> (1*2 - 0*1) / sqrt(1*2*2*3) = 2/sqrt(12)
    out = M.score("LiDiRus", [E, E, N, N], [E, N, N, N])
    assert out["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert out["score"] == out["mcc"]
    assert M.score("LiDiRus", [E, N, E], [E, E, E])["mcc"] == 0.0  # constant prediction


def test_rcb_macro_f1_by_hand():
    golds = ["entailment", "entailment", "contradiction", "neutral"]
    preds = ["entailment", "contradiction", "contradiction", "entailment"]
    # entailment P=1/2 R=1/2 F1=1/2; contradiction P=1/2 R=1 F1=2/3; neutral F1=0
    out = M.score("RCB", golds, preds)
    assert out["f1"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert out["acc"] == pytest.approx(0.5)
    assert out["score"] == pytest.approx((out["f1"] + out["acc"]) / 2)


def test_muserc_f1a_pooled_and_question_em():
    golds = [1, 0, 1, 0, 1]
    preds = [1, 0, 0, 0, 1]
    groups = [10, 10, 10, 11, 11]
    out = M.score("MuSeRC", golds, preds, groups)
    # pooled over all answers: TP=2 FP=0 FN=1 -> P=1 R=2/3 F1=0.8; question 10 wrong, 11 right
    assert out["f1a"] == pytest.approx(0.8)
    assert out["em"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.score("MuSeRC", golds, preds)


def test_rucos_normalisation_and_max_over_golds():
    assert M.normalize_answer("  Новосибирской  Области. ") == "новосибирской области"
    assert M.normalize_answer("«Газпром»") == "«газпром»"  # ASCII punctuation only, as the official script
    golds = [("Новосибирской области",), ("Иван Петров", "Петров"), ("Иван Мария Петрова",)]
    preds = ["новосибирской области.", "Петров Иван", "Мария"]
    out = M.score("RuCoS", golds, preds)
    # query 1: F1 1, EM 1; query 2: bag-of-tokens F1 1 vs "Иван Петров", EM 0; query 3: P=1 R=1/3 -> F1 0.5
    assert out["f1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert out["em"] == pytest.approx(1 / 3)


def test_total_is_mean_of_nine_task_scores():
    scores = {t: i / 10 for i, t in enumerate(TASK_NAMES)}
    assert M.total(scores) == pytest.approx(sum(i / 10 for i in range(9)) / 9)
    del scores["LiDiRus"]
    assert M.total(scores) is None


def test_leaderboard_tfidf_total_recomputed():
    # RSG_SPEC.md section 4: the TF-IDF row's per-task numbers give its shown total 0.434 (within 0.001).
    row = {"LiDiRus": 0.06, "RCB": (0.301 + 0.441) / 2, "PARus": 0.486, "MuSeRC": (0.587 + 0.242) / 2,
           "TERRa": 0.471, "RUSSE": 0.57, "RWSD": 0.662, "DaNetQA": 0.621, "RuCoS": (0.26 + 0.252) / 2}
    assert M.total(row) == pytest.approx(0.434, abs=0.001)


def _item(task, key, gold, group=None, meta=None):
    return Item(task, "val", key, key if group is None else group, key, {}, (), gold, meta or {})


def test_score_items_counts_missing_as_wrong():
    items = [_item("TERRa", i, g) for i, g in enumerate([E, N, E, N])]
    assert M.score_items("TERRa", items, {0: E, 1: N})["acc"] == 0.5
    lid = [_item("LiDiRus", i, g) for i, g in enumerate([E, N, E, N])]
    # missing predictions become the wrong label, so MCC of "all missing" is -1, not undefined
    assert M.score_items("LiDiRus", lid, {})["mcc"] == pytest.approx(-1.0)


def test_lidirus_diagnostics_per_category():
    items = [_item("LiDiRus", 0, E, meta={"logic": "Negation"}),
             _item("LiDiRus", 1, N, meta={"logic": "Negation;Quantifiers"}),
             _item("LiDiRus", 2, E, meta={"knowledge": "World knowledge"}),
             _item("LiDiRus", 3, N, meta={})]
    d = M.lidirus_diagnostics(items, {0: E, 1: N, 2: N, 3: N})
    assert d["logic"] == {"mcc": pytest.approx(1.0), "n": 2}
    assert d["logic/Negation"]["n"] == 2 and d["logic/Quantifiers"]["n"] == 1
    assert d["knowledge"]["n"] == 1
    assert "lexical-semantics" not in d


def test_tfidf_reference_scores_exactly(shared_rsg):
    from rsg_eval.core.submission import read_predictions
    from rsg_eval.core.data import load_items

    ref = shared_rsg / "reference"
    rcb = M.score_items("RCB", load_items(shared_rsg, "RCB", "val"),
                        read_predictions(ref / "tfidf_val_RCB.jsonl", "RCB"))
    assert round(rcb["acc"], 10) == 0.5136363636
    assert round(rcb["f1"], 10) == 0.3673260312
    terra = M.score_items("TERRa", load_items(shared_rsg, "TERRa", "val"),
                          read_predictions(ref / "tfidf_val_TERRa.jsonl", "TERRa"))
    assert round(terra["acc"], 10) == 0.4657980456
