"""Prompt sensitivity: how much a task's score moves with the prompt template, in numbers.

Torch-free (numpy, the metrics and the run folder reader): `rsg zeroshot --templates` writes these numbers into
the run folder (spread.json, metrics.json) and `rsg report` reads the same per-template results to print its
"prompt sensitivity" section and to compare two runs template by template.

A multi-template run folder keeps every template's results in `templates/<Task>/<variant>/` (an ordinary run
folder layout holding one task: predictions/, logs/, state/; docs/design.md). A variant is a template name, or
`<name>+cal` for its calibrated twin under `--calibrate both`.

API::

    CAL_SUFFIX                                  "+cal"
    variant_name(template, calibrated) / split_variant(name) -> (template, calibrated)
    read_template_logs(path, split) -> {task: {variant: [log rows with gold]}}   finished, intact results only
    summarize({name: score}) -> {n, mean, sd, min, max, range, best, worst}      sd with n - 1 (None for n < 2)
    total_range({task: {name: score}}) -> {min, max, mean} | None               None unless all nine tasks
    sign_test(diffs) -> {n, n_pos, n_neg, n_zero, p}                             exact two-sided, ties dropped
    select_variant(rule, variants, val_scores, default) -> (name | None, why)
    spread_table(logs, *, n_boot, seed, calibrated=False) -> dict                the whole table (see below)
    compare_templates(a, b) -> dict                                              paired over shared templates
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rsg_eval.core.errors import RSGError

CAL_SUFFIX = "+cal"
TEMPLATES_DIR = "templates"
SELECT_RULES = ("default", "best-val")
COLUMNS = ("uncalibrated", "calibrated")
OPTIMISM_NOTE = ("best-val picks each task's template on val; a val score of the picked template is optimistic "
                 "(the same examples chose it), so compare runs by the default rule or on test")


def variant_name(template: str, calibrated: bool) -> str:
    return template + (CAL_SUFFIX if calibrated else "")


def split_variant(name: str) -> tuple[str, bool]:
    """"yesno+cal" -> ("yesno", True); "yesno" -> ("yesno", False)."""
    return (name[: -len(CAL_SUFFIX)], True) if name.endswith(CAL_SUFFIX) else (name, False)


# --------------------------------------------------------------------------------------------------- arithmetic

def summarize(scores: Mapping[str, float]) -> dict:
    """Mean, standard deviation (n - 1 in the denominator: the templates are a sample of the wordings one could
    write), min, max, their range, and the best and worst template by name (ties: the first in order)."""
    names = [k for k, v in scores.items() if v is not None and not math.isnan(float(v))]
    if not names:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "range": None, "best": None,
                "worst": None}
    vals = np.array([float(scores[k]) for k in names])
    best = names[int(np.argmax(vals))]
    worst = names[int(np.argmin(vals))]
    return {"n": len(names), "mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(names) > 1 else None,
            "min": float(vals.min()), "max": float(vals.max()), "range": float(vals.max() - vals.min()),
            "best": best, "worst": worst}


def total_range(per_task: Mapping[str, Mapping[str, float]]) -> dict | None:
    """The leaderboard total (mean of the nine task scores) at its lowest and highest over the choice of one
    template per task, and with every task at its templates' mean. None unless all nine tasks have scores."""
    from rsg_eval.core.tasks import TASK_NAMES

    lows, highs, means = [], [], []
    for t in TASK_NAMES:
        s = summarize(per_task.get(t) or {})
        if not s["n"]:
            return None
        lows.append(s["min"])
        highs.append(s["max"])
        means.append(s["mean"])
    n = len(TASK_NAMES)
    return {"min": sum(lows) / n, "max": sum(highs) / n, "mean": sum(means) / n,
            "range": (sum(highs) - sum(lows)) / n}


def sign_test(diffs: Sequence[float], tol: float = 1e-12) -> dict:
    """Exact two-sided sign test of "the gain is as likely negative as positive": ties (|d| <= tol) dropped,
    p = min(1, 2 * P(X <= min(n_pos, n_neg))) with X ~ Binomial(n_pos + n_neg, 1/2)."""
    n_pos = sum(1 for d in diffs if d > tol)
    n_neg = sum(1 for d in diffs if d < -tol)
    n = n_pos + n_neg
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(n_pos, n_neg) + 1)) / 2 ** n)
    return {"n": len(diffs), "n_pos": n_pos, "n_neg": n_neg, "n_zero": len(diffs) - n, "p": p}


def select_variant(rule: str, variants: Sequence[str], val_scores: Mapping[str, float] | None,
                   default: str | None) -> tuple[str | None, str]:
    """The variant whose results go into the run's metrics.json and zip, and why.

    "default": the task's default template (uncalibrated when both are there), else the first variant.
    "best-val": the highest val score (ties: the first in order); None while val scores are missing."""
    if rule not in SELECT_RULES:
        raise RSGError(f"unknown selection rule {rule!r}", field="--select", expected=SELECT_RULES)
    if not variants:
        return None, "no templates"
    if rule == "default":
        if default in variants:
            return default, "the task's default template"
        cal = variant_name(default or "", True)
        if default and cal in variants:
            return cal, "the task's default template"
        return variants[0], "the first selected template (the default template was not selected)"
    scores = val_scores or {}
    if any(v not in scores or scores[v] is None for v in variants):
        return None, "needs every template's val score"
    best = max(range(len(variants)), key=lambda i: (scores[variants[i]], -i))
    return variants[best], f"best val score ({scores[variants[best]]:.4f})"


# --------------------------------------------------------------------------------------------------- reading

def template_folders(path: str | Path) -> dict[str, dict[str, Path]]:
    """{task: {variant: folder}} of a multi-template run folder (empty for a one-template run)."""
    from rsg_eval.core.tasks import TASK_NAMES

    root = Path(path) / TEMPLATES_DIR
    out: dict[str, dict[str, Path]] = {}
    if not root.is_dir():
        return out
    for task in TASK_NAMES:
        d = root / task
        if d.is_dir():
            found = {p.name: p for p in sorted(d.iterdir()) if p.is_dir()}
            if found:
                out[task] = found
    return out


def read_template_logs(path: str | Path, split: str = "val", only: Mapping[str, Sequence[str]] | None = None
                       ) -> dict[str, dict[str, list[dict]]]:
    """{task: {variant: labelled log rows}} of the finished, intact per-template results (`only`: the variants
    to read per task, e.g. the run's recorded template set; others are left out)."""
    from rsg_eval.runs import RunFolder

    out: dict[str, dict[str, list[dict]]] = {}
    for task, variants in template_folders(path).items():
        want = None if only is None else list((only or {}).get(task) or [])
        names = [v for v in (want if want is not None else variants) if v in variants]
        for v in names:
            sub = RunFolder(variants[v])
            if sub.task_problem(task, split) is not None:
                continue
            rows = [r for r in sub.read_logs(task, split) if r.get("gold") is not None]
            if rows:
                out.setdefault(task, {})[v] = rows
    return out


def score_rows(task: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    from rsg_eval.core import metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = metrics.score(task, [r["gold"] for r in rows], [r["pred"] for r in rows],
                            groups=[r["group"] for r in rows])
    return {k: float(v) for k, v in got.items()}


# --------------------------------------------------------------------------------------------------- the table

def spread_table(logs: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], *, n_boot: int = 1000,
                 seed: int = 0, calibrated: bool = False, level: float = 0.95) -> dict:
    """Per task and column (uncalibrated / calibrated): each template's score and metrics with a bootstrap
    interval over examples (whole groups for MuSeRC and RuCoS: rsg_eval.report.stats), then the summary over
    templates; and the total's range per column. `calibrated`: variants without "+cal" were calibrated too
    (a `--calibrate` run)."""
    from rsg_eval.report.stats import Bootstrap, percentile_ci, resample_indices
    from rsg_eval.core.tasks import TASK_NAMES

    tasks: dict[str, dict] = {}
    per_col: dict[str, dict[str, dict[str, float]]] = {c: {} for c in COLUMNS}
    for task in TASK_NAMES:
        variants = logs.get(task) or {}
        if not variants:
            continue
        cols: dict[str, dict] = {}
        for v, rows in variants.items():
            name, cal = split_variant(v)
            col = COLUMNS[1] if (cal or calibrated) else COLUMNS[0]
            boot = Bootstrap(task, [r["gold"] for r in rows], [r["pred"] for r in rows], [r["group"] for r in rows])
            # the same replicates for every template of a task (same items, same groups): intervals comparable
            rng = np.random.default_rng([seed, TASK_NAMES.index(task)])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                samples = boot.scores(resample_indices(boot.n_groups, n_boot, rng))["score"] if n_boot else None
            ci = percentile_ci(samples, level) if samples is not None else (None, None)
            cols.setdefault(col, {"templates": {}})["templates"][name] = {
                "variant": v, "score": boot.point["score"], "metrics": boot.point, "ci": list(ci),
                "n_items": len(rows), "n_groups": boot.n_groups}
        for col, c in cols.items():
            scores = {n: e["score"] for n, e in c["templates"].items()}
            c["summary"] = summarize(scores)
            per_col[col][task] = scores
        tasks[task] = {"columns": cols}
    totals = {c: total_range(per_col[c]) for c in COLUMNS if per_col[c]}
    return {"tasks": tasks, "totals": totals, "n_boot": n_boot, "level": level, "seed": seed}


def compare_templates(a: Mapping[str, Any], b: Mapping[str, Any], column: str = COLUMNS[0]) -> dict:
    """Run b against run a (two `spread_table`s), paired over the templates both scored: per task the gain of
    each template, the mean gain, whether every template gains, and a sign test; pooled over all (task,
    template) pairs too."""
    per_task: dict[str, dict] = {}
    pooled: list[float] = []
    for task, ta in (a.get("tasks") or {}).items():
        tb = (b.get("tasks") or {}).get(task)
        ca = ((ta.get("columns") or {}).get(column) or {}).get("templates") or {}
        cb = (((tb or {}).get("columns") or {}).get(column) or {}).get("templates") or {}
        shared = [n for n in ca if n in cb]
        if not shared:
            continue
        diffs = {n: cb[n]["score"] - ca[n]["score"] for n in shared}
        vals = list(diffs.values())
        test = sign_test(vals)
        per_task[task] = {"templates": shared, "diffs": diffs, "mean_gain": float(np.mean(vals)),
                          "min_gain": float(min(vals)), "max_gain": float(max(vals)),
                          "every_template": test["n_pos"] == len(vals) or test["n_neg"] == len(vals),
                          "sign_test": test}
        pooled += vals
    return {"column": column, "tasks": per_task, "pooled": sign_test(pooled) if pooled else None,
            "pooled_mean_gain": float(np.mean(pooled)) if pooled else None}
