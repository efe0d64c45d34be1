"""Bootstrap statistics for reports: confidence intervals and paired tests, whole groups resampled.

Torch-free (numpy only). The unit of resampling is the *group* of a log row (docs/design.md): a record for
the sentence-pair tasks, a question for MuSeRC (its answers stay together, so EM stays a per-question
metric), a query (= passage) for RuCoS.

Speed: each group is reduced once to a row of sufficient statistics (counts of right answers, confusion
cells, F1 sums), so one bootstrap replicate is a weighted sum of rows and B replicates are one matrix
product W @ C with W (B, G) the multiplicities of each group and C (G, F) the statistics. The metric
formulas on those sums mirror `rsg_eval.core.metrics` exactly (same zero-division rules, same type-strict
accuracy); `Bootstrap` checks this on the data itself and on a few replicates against the real scorer and
falls back to calling the scorer on every replicate when they ever disagree, so the numbers can never drift
from `rsg_eval.core.metrics.score`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

Scorer = Callable[..., dict]  # score(task, golds, preds, groups=None) -> {metric: v, "score": v}

_CHUNK = 256  # replicates per matrix product: bounds memory at _CHUNK * G floats


def default_scorer() -> Scorer:
    from rsg_eval.core.metrics import score

    return score


def _hashable(x: Any) -> Any:
    return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


# --------------------------------------------------------------------------------------------------- features

def _features(task: str, golds: list, preds: list, order: list[list[int]]) -> tuple[np.ndarray, dict]:
    """Per-group sufficient statistics C (G, F) and what the formulas need to read them back."""
    n_groups = len(order)
    if task == "MuSeRC":
        # columns: tp, fp, fn of label 1 over answers; 1 if every answer of the question is right; 1
        c = np.zeros((n_groups, 5))
        for gi, rows in enumerate(order):
            for i in rows:
                g, p = golds[i], preds[i]
                c[gi, 0] += g == 1 and p == 1
                c[gi, 1] += g != 1 and p == 1
                c[gi, 2] += g == 1 and p != 1
            c[gi, 3] = all(golds[i] == preds[i] for i in rows)
            c[gi, 4] = 1
        return c, {}
    if task == "RuCoS":
        from rsg_eval.core.metrics import rucos_f1_em

        # columns: items, sum of per-query F1, sum of per-query EM (each query scored alone = its own mean)
        c = np.zeros((n_groups, 3))
        for gi, rows in enumerate(order):
            for i in rows:
                f1, em = rucos_f1_em([golds[i]], [preds[i]])
                c[gi] += (1, f1, em)
        return c, {}
    # classification: items, type-strict right answers, then a confusion table over label strings
    # (the metrics compare str(label) for MCC and F1, and value plus type for accuracy).
    labels = sorted({str(g) for g in golds} | {str(p) for p in preds})
    if task == "RCB":
        from rsg_eval.core.tasks import get_task

        labels = [str(x) for x in get_task("RCB").labels] + [x for x in labels
                                                              if x not in {str(y) for y in get_task("RCB").labels}]
    pos = {lab: k for k, lab in enumerate(labels)}
    k = len(labels)
    c = np.zeros((n_groups, 2 + k * k))
    for gi, rows in enumerate(order):
        for i in rows:
            g, p = golds[i], preds[i]
            c[gi, 0] += 1
            c[gi, 1] += g == p and type(g) is type(p)
            c[gi, 2 + pos[str(g)] * k + pos[str(p)]] += 1
    return c, {"labels": labels}


def _f1_per_class(conf: np.ndarray) -> np.ndarray:
    """(B, K, K) confusion (gold, pred) -> (B, K) per-class F1; 0 where the class is neither gold nor predicted."""
    tp = np.diagonal(conf, axis1=1, axis2=2)
    denom = conf.sum(axis=2) + conf.sum(axis=1)  # true count + predicted count = 2tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)


def _mcc(conf: np.ndarray) -> np.ndarray:
    """(B, K, K) -> (B,) multiclass Matthews correlation as scikit-learn defines it (0 when undefined)."""
    s = conf.sum(axis=(1, 2))
    c = np.trace(conf, axis1=1, axis2=2)
    t = conf.sum(axis=2)  # gold counts per class
    p = conf.sum(axis=1)  # predicted counts per class
    cov_tp = c * s - (t * p).sum(axis=1)
    cov_pp = s * s - (p * p).sum(axis=1)
    cov_tt = s * s - (t * t).sum(axis=1)
    den = cov_pp * cov_tt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, cov_tp / np.sqrt(np.where(den > 0, den, 1)), 0.0)


def metrics_from_sums(task: str, sums: np.ndarray, info: dict, n_fixed_labels: int = 3) -> dict[str, np.ndarray]:
    """(B, F) summed statistics -> {metric: (B,)} plus "score", the formulas of rsg_eval.core.metrics."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if task == "MuSeRC":
            tp, fp, fn, em, nq = (sums[:, j] for j in range(5))
            f1a = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
            out = {"f1a": f1a, "em": np.where(nq > 0, em / np.maximum(nq, 1), 0.0)}
        elif task == "RuCoS":
            n = np.maximum(sums[:, 0], 1)
            out = {"f1": sums[:, 1] / n, "em": sums[:, 2] / n}
        else:
            n = sums[:, 0]
            k = len(info["labels"])
            conf = sums[:, 2:].reshape(-1, k, k)
            acc = np.where(n > 0, sums[:, 1] / np.maximum(n, 1), 0.0)
            if task == "LiDiRus":
                out = {"mcc": _mcc(conf)}
            elif task == "RCB":
                # macro F1 over the task's three fixed labels, absent classes counting 0 (metrics.f1_macro)
                f1 = _f1_per_class(conf)[:, :n_fixed_labels].mean(axis=1)
                out = {"f1": np.where(n > 0, f1, 0.0), "acc": acc}
            else:
                out = {"acc": acc}
    out["score"] = sum(out.values()) / len(out)
    return out


# --------------------------------------------------------------------------------------------------- bootstrap

def resample_indices(n_groups: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(B, G) group indices drawn with replacement; row b is replicate b."""
    return rng.integers(0, n_groups, size=(n_boot, n_groups))


def _weights(idx: np.ndarray, n_groups: int) -> np.ndarray:
    """(B, G) indices -> (B, G) multiplicities (how often each group was drawn)."""
    b = idx.shape[0]
    flat = idx + (np.arange(b) * n_groups)[:, None]
    return np.bincount(flat.ravel(), minlength=b * n_groups).reshape(b, n_groups).astype(float)


@dataclass
class Bootstrap:
    """The examples of one task in one run, ready for resampling whole groups.

    `golds`, `preds`, `groups` are item-level, as `metrics.score` takes them. Items are ordered by group
    (groups sorted by id, or by `group_order` when given, so two runs share the same resampling)."""

    task: str
    golds: list
    preds: list
    groups: list
    scorer: Scorer | None = None
    group_order: Sequence[Any] | None = None
    order: list[list[int]] = field(init=False)
    group_ids: list = field(init=False)
    exact: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self.golds = [_hashable(g) for g in self.golds]
        self.preds = [_hashable(p) for p in self.preds]
        if self.scorer is None:
            self.scorer = default_scorer()
        by_group: dict[Any, list[int]] = {}
        for i, g in enumerate(self.groups):
            by_group.setdefault(_hashable(g), []).append(i)
        ids = list(self.group_order) if self.group_order is not None else sorted(by_group, key=_sort_key)
        self.group_ids = [g for g in ids if g in by_group]
        self.order = [by_group[g] for g in self.group_ids]
        self.table, self.info = _features(self.task, self.golds, self.preds, self.order)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            point = self.scorer(self.task, self.golds, self.preds, groups=list(self.groups))
        self.point = {k: float(v) for k, v in point.items()}

    @property
    def n_groups(self) -> int:
        return len(self.order)

    def replicate(self, idx_row: np.ndarray) -> tuple[list, list, list]:
        """The item lists of one replicate; a group drawn twice becomes two distinct groups."""
        golds, preds, groups = [], [], []
        for copy, gi in enumerate(idx_row):
            for i in self.order[gi]:
                golds.append(self.golds[i])
                preds.append(self.preds[i])
                groups.append(copy)
        return golds, preds, groups

    def _slow(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        rows = []
        for r in idx:
            golds, preds, groups = self.replicate(r)
            with warnings.catch_warnings():  # scikit-learn warns when a replicate holds one label only
                warnings.simplefilter("ignore")
                rows.append(self.scorer(self.task, golds, preds, groups=groups))
        return {k: np.array([r[k] for r in rows], dtype=float) for k in rows[0]}

    def _fast(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, idx.shape[0], _CHUNK):
            w = _weights(idx[start:start + _CHUNK], self.n_groups)  # (b, G)
            parts.append(metrics_from_sums(self.task, w @ self.table, self.info))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _check_fast(self, idx: np.ndarray, n_check: int = 3) -> bool:
        """Do the summed-statistics formulas give exactly what the scorer gives, here and on a few replicates?"""
        full = metrics_from_sums(self.task, self.table.sum(axis=0, keepdims=True), self.info)
        if any(abs(full[k][0] - self.point.get(k, np.nan)) > 1e-9 for k in full):
            return False
        fast = self._fast(idx[:n_check])
        slow = self._slow(idx[:n_check])
        return all(np.allclose(fast[k], slow[k], atol=1e-9, rtol=0) for k in fast)

    def scores(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """{metric: (B,)} and "score" over the replicates `idx` (B, G)."""
        if self.n_groups == 0:
            return {k: np.full(idx.shape[0], np.nan) for k in self.point}
        self.exact = self._check_fast(idx)
        return self._fast(idx) if self.exact else self._slow(idx)


def _sort_key(g: Any) -> tuple:
    return (0, g, "") if isinstance(g, (int, float)) and not isinstance(g, bool) else (1, 0, str(g))


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval."""
    s = np.asarray(samples, dtype=float)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(s, [a, 100 - a])
    return float(lo), float(hi)


@dataclass(frozen=True)
class PairedResult:
    diff: float                 # run minus reference on the shared examples
    ci: tuple[float, float]     # percentile interval of the difference
    p_value: float              # two-sided: 2 * min(P(d <= 0), P(d >= 0)) over the replicates, at most 1
    significant: bool           # p_value < alpha
    n_groups: int


def paired_test(diff_point: float, diff_samples: np.ndarray, *, alpha: float = 0.05,
                n_groups: int = 0) -> PairedResult:
    """Paired bootstrap test of "no difference": both runs were scored on the same replicate each time."""
    d = np.asarray(diff_samples, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return PairedResult(diff_point, (float("nan"), float("nan")), float("nan"), False, n_groups)
    p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return PairedResult(float(diff_point), percentile_ci(d, 1 - alpha), p, p < alpha, n_groups)


def mcnemar_exact(ref_right: Sequence[bool], run_right: Sequence[bool]) -> tuple[int, int, float]:
    """Exact McNemar test for two classifiers on the same items (accuracy tasks): a cross-check of the
    paired bootstrap. Returns (b, c, p): b = items only the reference gets right, c = only the run; under
    "no difference" b ~ Binomial(b + c, 1/2), and p = min(1, 2 * P(X <= min(b, c)))."""
    from math import comb

    b = sum(1 for x, y in zip(ref_right, run_right) if x and not y)
    c = sum(1 for x, y in zip(ref_right, run_right) if y and not x)
    n = b + c
    if n == 0:
        return b, c, 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return b, c, min(1.0, 2 * tail)
