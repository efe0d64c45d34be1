"""The leaderboard's metrics, computed locally (definitions: ../shared/docs/RSG_SPEC.md section 3).

Torch-free. Every function takes item-level lists (one entry per `tasks.Item`):

- LiDiRus: Matthews correlation (binary), the only LiDiRus number in the total.
- RCB: macro F1 over the three classes (unweighted mean of per-class F1) and accuracy.
- MuSeRC: F1a = binary F1 of label 1 pooled over every answer of the split; EM = share of questions whose
  answers are all right.
- RuCoS: F1 and EM, each the max over gold answers after ReCoRD normalisation, averaged over queries.
- the rest: accuracy.

A task's score is the mean of its two metrics where it has two; the total is the mean of the nine task scores.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter, defaultdict
from typing import Any, Mapping, Sequence

from rsg_eval.core.errors import RSGError
from rsg_eval.core.tasks import DIAGNOSTIC_KEYS, NLI2, NLI3, TASK_NAMES, Item, get_task

MISSING = "__missing__"


def accuracy(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    if not golds:
        return 0.0
    return sum(1 for g, p in zip(golds, preds) if g == p and type(g) is type(p)) / len(golds)


def _ignore_sklearn_warnings() -> None:
    """Inside a `warnings.catch_warnings()` block: drop scikit-learn's warnings about degenerate inputs (one label
    only, an undefined ratio). The metrics here define those cases (MCC 0, F1 0), so on a small split or a LiDiRus
    diagnostic category the warnings would only alarm. Other libraries' warnings still show."""
    for category in (UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=r"sklearn\.")


def mcc(golds: Sequence[Any], preds: Sequence[Any]) -> float:
    """Binary Matthews correlation; 0.0 when undefined (a constant prediction), as scikit-learn gives."""
    from sklearn.metrics import matthews_corrcoef

    if not golds:
        return 0.0
    with warnings.catch_warnings():
        _ignore_sklearn_warnings()
        return float(matthews_corrcoef([str(g) for g in golds], [str(p) for p in preds]))


def f1_macro(golds: Sequence[Any], preds: Sequence[Any], labels: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over `labels`; a class never predicted nor gold counts 0."""
    from sklearn.metrics import f1_score

    if not golds:
        return 0.0
    with warnings.catch_warnings():
        _ignore_sklearn_warnings()
        return float(f1_score([str(g) for g in golds], [str(p) for p in preds], labels=[str(x) for x in labels],
                              average="macro", zero_division=0))


def f1_binary(golds: Sequence[int], preds: Sequence[int]) -> float:
    """F1 of the positive label 1, pooled over all items (MuSeRC's F1a)."""
    tp = sum(1 for g, p in zip(golds, preds) if g == 1 and p == 1)
    fp = sum(1 for g, p in zip(golds, preds) if g != 1 and p == 1)
    fn = sum(1 for g, p in zip(golds, preds) if g == 1 and p != 1)
    if tp == 0:
        return 0.0
    prec, rec = tp / (tp + fp), tp / (tp + fn)
    return 2 * prec * rec / (prec + rec)


def group_exact_match(golds: Sequence[Any], preds: Sequence[Any], groups: Sequence[int]) -> float:
    """Share of groups (MuSeRC questions) in which every item is right."""
    ok: dict[int, bool] = {}
    for g, p, grp in zip(golds, preds, groups):
        ok[grp] = ok.get(grp, True) and g == p
    return sum(ok.values()) / len(ok) if ok else 0.0


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)  # ASCII only, as the official ReCoRD script: «», —, … survive


def normalize_answer(s: str) -> str:
    """ReCoRD/SQuAD answer normalisation as the RSG jiant scorer applies it to RuCoS."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


def rucos_f1_em(golds: Sequence[Sequence[str]], preds: Sequence[str]) -> tuple[float, float]:
    """Mean over queries of max-over-gold token F1 and exact match."""
    if not golds:
        return 0.0, 0.0
    f1s, ems = [], []
    for gold, pred in zip(golds, preds):
        pred = pred if isinstance(pred, str) else ""
        f1s.append(max((token_f1(pred, g) for g in gold), default=0.0))
        ems.append(max((float(normalize_answer(pred) == normalize_answer(g)) for g in gold), default=0.0))
    return sum(f1s) / len(f1s), sum(ems) / len(ems)


def score(task: str, golds: Sequence[Any], preds: Sequence[Any],
          groups: Sequence[int] | None = None) -> dict[str, float]:
    """The task's leaderboard metrics plus "score" (their mean) from item-level gold and predicted labels."""
    name = get_task(task).name
    if len(golds) != len(preds):
        raise ValueError(f"{name}: {len(golds)} gold labels but {len(preds)} predictions")
    if name == "LiDiRus":
        out = {"mcc": mcc(golds, preds)}
    elif name == "RCB":
        out = {"f1": f1_macro(golds, preds, NLI3), "acc": accuracy(golds, preds)}
    elif name == "MuSeRC":
        if groups is None:
            raise ValueError("MuSeRC needs the question id of every answer (groups) for EM")
        out = {"f1a": f1_binary(golds, preds), "em": group_exact_match(golds, preds, groups)}
    elif name == "RuCoS":
        f1, em = rucos_f1_em(golds, preds)
        out = {"f1": f1, "em": em}
    else:
        out = {"acc": accuracy(golds, preds)}
    out["score"] = sum(out.values()) / len(out)
    return out


def _fill_missing(item: Item, preds: Mapping[int, Any]) -> Any:
    """The prediction for an item, or a value that is surely wrong when it has none."""
    if item.key in preds:
        return preds[item.key]
    if item.task in ("LiDiRus", "TERRa"):  # the other label, so MCC counts it wrong too
        return NLI2[1 - NLI2.index(item.gold)] if item.gold in NLI2 else MISSING
    if item.task == "MuSeRC":
        return 1 - item.gold if item.gold in (0, 1) else MISSING
    if item.task in ("RUSSE", "RWSD", "DaNetQA"):
        return (not item.gold) if isinstance(item.gold, bool) else MISSING
    if item.task == "PARus":
        return 1 - item.gold if item.gold in (0, 1) else MISSING
    return "" if item.task == "RuCoS" else MISSING


def score_items(task: str, items: Sequence[Item], preds: Mapping[int, Any]) -> dict[str, float]:
    """Score predictions keyed by `Item.key`; items without a prediction count as wrong."""
    name = get_task(task).name
    labelled = [it for it in items if it.gold is not None]
    if not labelled:
        raise RSGError(f"{name}: no gold labels in this split to score against", field="split",
                       expected="val (or train); test files carry no labels")
    golds = [it.gold for it in labelled]
    predv = [_fill_missing(it, preds) for it in labelled]
    return score(name, golds, predv, [it.group for it in labelled])


def total(task_scores: Mapping[str, float]) -> float | None:
    """The leaderboard total: mean of the nine task scores (LiDiRus MCC included); None unless all nine."""
    if any(t not in task_scores or task_scores[t] is None for t in TASK_NAMES):
        return None
    return sum(float(task_scores[t]) for t in TASK_NAMES) / len(TASK_NAMES)


def lidirus_diagnostics(items: Sequence[Item], preds: Mapping[int, Any]) -> dict[str, dict[str, float]]:
    """LiDiRus MCC per diagnostic category and sub-category, as the leaderboard's diagnostics page shows.

    Returns {"logic": {"mcc": .., "n": ..}, "logic/Negation": {...}, ...} over items carrying the tag.
    """
    buckets: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if it.gold is None:
            continue
        for key in DIAGNOSTIC_KEYS:
            val = it.meta.get(key)
            if not val:
                continue
            buckets[key].append(it)
            for sub in {s.strip() for s in str(val).split(";") if s.strip()}:
                buckets[f"{key}/{sub}"].append(it)
    out: dict[str, dict[str, float]] = {}
    for name in sorted(buckets, key=lambda k: (k.split("/")[0] not in DIAGNOSTIC_KEYS, k)):
        its = buckets[name]
        out[name] = {"mcc": mcc([i.gold for i in its], [_fill_missing(i, preds) for i in its]), "n": len(its)}
    return out
