"""Build a report: every number the renderers print, as one JSON-able dict.

Torch-free. The first run is the reference. Per task: each leaderboard metric of each run, the task score
with its 95% bootstrap interval, the relative gain in percent per metric and for the task score (the paper's
Table 3) and a paired bootstrap test against the reference; then the totals (Tables 1 and 2). Scores of runs
with examples are recomputed from their logs through `rsg_eval.core.metrics.score`; runs without examples (published
rows, score files, tasks only in metrics.json) show their numbers without intervals.

Gains compare only comparable rows (`comparable`): local runs with local runs on the same split, published or
copied leaderboard numbers with each other. A published row whose paper names its baseline (paper.yaml
`baselines`) gains against that row, as the paper states it; a row with nothing comparable gets no gain. When the
paper's two Table 3 rows are in the report, `paper_table3` holds that table rebuilt from paper.yaml.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Sequence

import numpy as np

from rsg_eval.report.load import Run, different_data
from rsg_eval.report.sensitivity import build_sensitivity
from rsg_eval.report.stats import Bootstrap, mcnemar_exact, paired_test, percentile_ci, resample_indices

PROMPT_CHARS = 600  # prompts in the disagreement sample are cut to this many characters
NO_GAIN_DATA = "different data"  # why a cell has no gain: the two runs were scored on different example sets


def _rng(seed: int, *parts: int) -> np.random.Generator:
    """An independent, reproducible stream per (seed, task, purpose): adding a task leaves the others unchanged."""
    return np.random.default_rng([seed, *parts])


def _key(x: Any) -> Any:
    return tuple(_key(v) for v in x) if isinstance(x, list) else x


def _same(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b)


def comparable(a: Run, b: Run) -> bool:
    """Can a gain of `a` over `b` mean anything? Both local runs (scored here) or both published / copied
    leaderboard numbers, on the same split. A local val score against a leaderboard test score compares
    different examples scored in different places: no gain is given."""
    return a.split == b.split and (a.origin == "run") == (b.origin == "run")


def _bases(runs: Sequence[Run], extras: dict[int, dict]) -> list[int | None]:
    """For each run, the row its gains are computed against (None: no comparable row). A published row gains
    against the baseline its source names (the paper's own gains: 20_mfredt5_2bln against 20_fredt5, never against
    zero_fredt5 or a local run), else against the reference only when that is the user's own score file of the
    same split; other rows against the reference when comparable."""
    index = {run.name: r for r, run in enumerate(runs)}
    out: list[int | None] = []
    for r, run in enumerate(runs):
        named = extras.get(r, {}).get("baselines", {}).get(run.name)
        if run.origin == "published":
            if named is not None and named in index and index[named] != r:
                out.append(index[named])
            else:
                out.append(0 if r > 0 and runs[0].origin == "file" and comparable(run, runs[0]) else None)
        elif r > 0 and comparable(run, runs[0]):
            out.append(0)
        else:
            out.append(None)
    return out


def _gain(score: float | None, ref: float | None) -> float | None:
    if score is None or ref is None or ref == 0 or math.isnan(score) or math.isnan(ref):
        return None
    return (score - ref) / abs(ref) * 100.0


def _f(x: Any) -> float | None:
    """A number as float; None for None, NaN and anything that is not a number (a hand-edited "high")."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(x)


def _unique_names(runs: Sequence[Run]) -> None:
    seen: Counter = Counter()
    for run in runs:
        seen[run.name] += 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"


class _TaskBoot:
    """The bootstrap of one task across all runs: the same replicates for runs over the same groups."""

    def __init__(self, task: str, ti: int, runs: Sequence[Run], seed: int, n_boot: int, problems: list[str]):
        self.task, self.ti, self.seed, self.n_boot = task, ti, seed, n_boot
        self.boots: dict[int, Bootstrap] = {}
        self.samples: dict[int, np.ndarray] = {}
        for r, run in enumerate(runs):
            rows = run.logs.get(task)
            if not rows:
                continue
            b = Bootstrap(task, [r_["gold"] for r_ in rows], [r_["pred"] for r_ in rows],
                          [_key(r_["group"]) for r_ in rows])
            # replicates depend only on (seed, task, number of groups): runs over the same groups are paired
            idx = resample_indices(b.n_groups, n_boot, _rng(seed, ti))
            self.boots[r] = b
            self.samples[r] = b.scores(idx)["score"]
            if not b.exact:
                problems.append(f"{run.name} {task}: bootstrap used the exact (slow) scorer on every replicate")

    def paired(self, runs: Sequence[Run], r: int) -> tuple[dict | None, np.ndarray | None, str | None]:
        """Paired test of run r against run 0 on their shared examples, the diff replicates, and a note."""
        if 0 not in self.boots or r not in self.boots:
            return None, None, None
        ref, run = runs[0], runs[r]
        if ref.split != run.split:
            return None, None, f"{self.task}: {run.name} is {run.split}, the reference {ref.split}: not paired"
        why = different_data(ref, run, self.task)
        if why:
            return None, None, f"{self.task}: {run.name} and the reference {why}: shown side by side, not paired"
        ref_rows = {_key(x["key"]): x for x in ref.logs[self.task]}
        run_rows = {_key(x["key"]): x for x in run.logs[self.task]}
        shared = [k for k in ref_rows if k in run_rows]
        b0, b1 = self.boots[0], self.boots[r]
        if not shared:
            return None, None, f"{self.task}: {run.name} and the reference share no examples: not paired"
        note = None
        if len(shared) == len(ref_rows) == len(run_rows) and b0.group_ids == b1.group_ids and all(
                _key(ref_rows[k]["group"]) == _key(run_rows[k]["group"]) for k in shared):
            diff_s = self.samples[r] - self.samples[0]
            diff = b1.point["score"] - b0.point["score"]
            n_groups = b0.n_groups
        else:
            # groups from the reference, so MuSeRC questions / RuCoS queries stay whole in both runs
            groups = [_key(ref_rows[k]["group"]) for k in shared]
            pos = {g: i for i, g in enumerate(b0.group_ids)}
            order = sorted(set(groups), key=pos.__getitem__)
            p0 = Bootstrap(self.task, [ref_rows[k]["gold"] for k in shared], [ref_rows[k]["pred"] for k in shared],
                           groups, group_order=order)
            p1 = Bootstrap(self.task, [ref_rows[k]["gold"] for k in shared], [run_rows[k]["pred"] for k in shared],
                           groups, group_order=order)
            idx = resample_indices(p0.n_groups, self.n_boot, _rng(self.seed, self.ti, 1))
            diff_s = p1.scores(idx)["score"] - p0.scores(idx)["score"]
            diff = p1.point["score"] - p0.point["score"]
            n_groups = p0.n_groups
            note = (f"{self.task}: {run.name} paired with the reference on {len(shared)} shared examples "
                    f"(reference {len(ref_rows)}, run {len(run_rows)})")
        res = paired_test(diff, diff_s, n_groups=n_groups)
        out = {"diff": res.diff, "ci": list(res.ci), "p": res.p_value, "significant": res.significant,
               "n_groups": res.n_groups, "mcnemar": None}
        from rsg_eval.core.tasks import get_task

        if get_task(self.task).metrics == ("acc",):  # one item per group: McNemar applies as a cross-check
            b, c, p = mcnemar_exact([_right(self.task, ref_rows[k]["gold"], ref_rows[k]["pred"]) for k in shared],
                                    [_right(self.task, ref_rows[k]["gold"], run_rows[k]["pred"]) for k in shared])
            out["mcnemar"] = {"only_ref_right": b, "only_run_right": c, "p": p}
        return out, diff_s, note


def _cell(run: Run, task: str, boot: _TaskBoot, r: int, problems: list[str]) -> dict:
    """One run's numbers for one task."""
    from rsg_eval.core.tasks import get_task

    names = list(get_task(task).metrics)
    if r in boot.boots:
        b = boot.boots[r]
        point = b.point
        rep = run.reported.get(task)
        wrong = [k for k in point if _f(rep.get(k, point[k])) is None or abs(_f(rep.get(k, point[k])) - point[k]) > 1e-6
                 ] if rep else []
        if wrong:
            shown = ", ".join(f"{k} {rep.get(k)!r:.20} (logs: {point[k]:.4f})" for k in wrong)
            problems.append(f"{run.name} {task}: metrics.json disagrees with the logs ({shown}); the logs are used")
        lo, hi = percentile_ci(boot.samples[r])
        return {"status": "ok", "metrics": {m: point[m] for m in names}, "score": point["score"],
                "ci": [lo, hi], "n": len(b.golds), "groups": b.n_groups, "source": "logs"}
    rep = run.reported.get(task)
    if rep is not None:
        return {"status": "ok", "metrics": {m: _f(rep.get(m)) for m in names}, "score": _f(rep.get("score")),
                "ci": None, "n": None, "groups": None,
                "source": "metrics.json" if run.origin == "run" else run.origin}
    status = "not published" if run.origin == "published" else "missing"
    return {"status": status, "metrics": {m: None for m in names}, "score": None, "ci": None, "n": None,
            "groups": None, "source": None}


def _totals(runs: Sequence[Run], tasks: list[str], cells: dict[str, list[dict]], boots: dict[str, _TaskBoot],
            diffs: dict[str, dict[int, np.ndarray]], bases: list[int | None]) -> tuple[list[dict], list[str]]:
    """Official totals (all nine tasks) and, when runs cover different tasks, the mean over the tasks every
    run with per-task numbers has; intervals where a run has examples for all of them, paired tests likewise."""
    from rsg_eval.core.metrics import total
    from rsg_eval.core.tasks import TASK_NAMES

    with_tasks = [r for r in range(len(runs)) if any(cells[t][r]["score"] is not None for t in tasks)]
    common = [t for t in tasks if with_tasks and all(cells[t][r]["score"] is not None for r in with_tasks)]
    rows: list[dict] = []
    for r, run in enumerate(runs):
        scores = {t: cells[t][r]["score"] for t in tasks if cells[t][r]["score"] is not None}
        tot = total(scores)
        source = "9 tasks"
        # a printed total wins for published rows and score files: the site averages unrounded task scores
        if run.origin != "run" and run.reported_total is not None:
            tot, source = run.reported_total, "published" if run.origin == "published" else "file"
        row: dict[str, Any] = {"total": tot, "total_source": source if tot is not None else None,
                               "n_tasks": len(scores), "total_ci": None, "common": None, "common_ci": None}
        if tot is not None and all(t in boots and r in boots[t].samples for t in TASK_NAMES):
            row["total_ci"] = list(percentile_ci(np.mean([boots[t].samples[r] for t in TASK_NAMES], axis=0)))
        if common and r in with_tasks:
            row["common"] = float(np.mean([scores[t] for t in common]))
            if all(r in boots[t].samples for t in common):
                row["common_ci"] = list(percentile_ci(np.mean([boots[t].samples[r] for t in common], axis=0)))
        rows.append(row)

    def paired_mean(ts: list[str], r: int, point: float) -> dict | None:
        if not ts or not all(r in diffs.get(t, {}) for t in ts):
            return None
        res = paired_test(point, np.mean([diffs[t][r] for t in ts], axis=0))
        return {"diff": res.diff, "ci": list(res.ci), "p": res.p_value, "significant": res.significant}

    for r, row in enumerate(rows):
        b = bases[r]
        # a total over tasks some of which were scored on other examples than the base's: no gain, no test
        other = [t for t in tasks if cells[t][r].get("no_gain")]
        row["no_gain"] = f"{NO_GAIN_DATA} ({', '.join(other)})" if other else None
        row["gain_vs"] = None if b is None else runs[b].name
        row["gain"] = None if b is None or other else _gain(row["total"], rows[b]["total"])
        row["common_gain"] = None if b is None or other else _gain(row["common"], rows[b]["common"])
        row["paired"] = row["common_paired"] = None
        if r == 0 or other:
            continue
        if row["total"] is not None and rows[0]["total"] is not None:
            row["paired"] = paired_mean(list(TASK_NAMES), r, row["total"] - rows[0]["total"])
        if row["common"] is not None and rows[0]["common"] is not None:
            row["common_paired"] = paired_mean(common, r, row["common"] - rows[0]["common"])
    # the mean over common tasks adds nothing when every run with per-task numbers has all nine
    if len(common) == len(TASK_NAMES):
        common = []
        for row in rows:
            row["common"] = row["common_ci"] = row["common_gain"] = row["common_paired"] = None
    return rows, common


def _published_extras(runs: Sequence[Run]) -> dict[int, dict]:
    """paper.yaml's baselines, printed gains, Table 3 and notes, for each published run that has them."""
    from rsg_eval.published import extras

    out = {}
    for r, run in enumerate(runs):
        if run.origin == "published":
            e = extras(run.source)
            if e:
                out[r] = e
    return out


def _paper_table3(runs: Sequence[Run], extras: dict[int, dict], cells: dict[str, list[dict]], tasks: list[str],
                  problems: list[str]) -> dict | None:
    """The paper's Table 3 rebuilt from paper.yaml: per task the baseline's and the multi-task run's metrics and
    the gain per metric, computed as (new - old) / old. A computed gain that does not round to the printed one
    is reported as a problem (a typo in paper.yaml, or in the paper)."""
    from rsg_eval.published import parse_printed_gain, printed_decimals
    from rsg_eval.core.tasks import get_task

    index = {run.name: r for r, run in enumerate(runs)}
    spec = next((e["table3"] for e in extras.values() if e.get("table3")), None)
    if spec is None or spec["baseline"] not in index or spec["run"] not in index:
        return None
    b, r = index[spec["baseline"]], index[spec["run"]]
    rows = []
    for t in tasks:
        cb, cr = cells[t][b], cells[t][r]
        if cb["status"] != "ok" or cr["status"] != "ok":
            continue
        names = list(get_task(t).metrics)
        gains = [_gain(cr["metrics"][m], cb["metrics"][m]) for m in names]
        printed = spec["gains"].get(t)
        if printed is not None:
            want = parse_printed_gain(printed)
            nd = printed_decimals(printed)
            got = [None if g is None else round(g, nd) for g in gains]
            if len(want) != len(got) or any(g is None or abs(g - w) > 1e-9 for g, w in zip(got, want)):
                problems.append(f"Table 3 {t}: the gain computed from the scores ({got}) differs from the printed "
                                f"{printed}")
        rows.append({"task": t, "metrics": names, "baseline": [cb["metrics"][m] for m in names],
                     "run": [cr["metrics"][m] for m in names], "gains": gains, "printed": printed})
    return {"baseline": spec["baseline"], "run": spec["run"], "headers": spec["headers"], "rows": rows,
            "baseline_index": b, "run_index": r}


def _check_table2(runs: Sequence[Run], extras: dict[int, dict], totals: list[dict], problems: list[str]) -> None:
    """Table 2's printed gains must round from the totals' gains against the named baselines."""
    from rsg_eval.published import parse_printed_gain, printed_decimals

    for r, e in extras.items():
        printed = e.get("table2_gains", {}).get(runs[r].name)
        if printed is None or totals[r]["gain"] is None or totals[r]["gain_vs"] != e["baselines"].get(runs[r].name):
            continue
        if abs(round(totals[r]["gain"], printed_decimals(printed)) - parse_printed_gain(printed)[0]) > 1e-9:
            problems.append(f"Table 2 {runs[r].name}: the gain computed from the totals ({totals[r]['gain']:.2f} %) "
                            f"does not round to the printed {printed}")


def _diagnostics(run: Run) -> dict[str, dict]:
    """LiDiRus MCC per diagnostic category, recomputed from the log rows' tags, else from metrics.json."""
    rows = run.logs.get("LiDiRus")
    if rows and any(x.get("meta") for x in rows):
        from rsg_eval.core.metrics import lidirus_diagnostics
        from rsg_eval.core.tasks import Item

        items = [Item(task="LiDiRus", split=run.split, key=_key(x["key"]), group=_key(x["group"]),
                      doc=x.get("doc", x["group"]), fields={}, labels=tuple(x.get("labels") or ()),
                      gold=x["gold"], meta=dict(x.get("meta") or {})) for x in rows]
        diag = lidirus_diagnostics(items, {_key(x["key"]): x["pred"] for x in rows})
        return {k: dict(v) for k, v in diag.items()}
    out = {}
    for k, v in (run.diagnostics or {}).items():
        out[k] = dict(v) if isinstance(v, dict) else {"mcc": v, "n": None}
    return out


def _confusion(task: str, rows: list[dict]) -> dict:
    from rsg_eval.core.tasks import get_task

    fixed = [str(x) for x in (get_task(task).labels or ())]
    seen = sorted({str(x["gold"]) for x in rows} | {str(x["pred"]) for x in rows})
    labels = fixed + [x for x in seen if x not in fixed]
    pos = {lab: i for i, lab in enumerate(labels)}
    m = [[0] * len(labels) for _ in labels]
    for x in rows:
        m[pos[str(x["gold"])]][pos[str(x["pred"])]] += 1
    return {"labels": labels, "matrix": m}


def _cut(text: Any) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= PROMPT_CHARS else s[:PROMPT_CHARS] + " …"


def _right(task: str, gold: Any, pred: Any) -> bool:
    """Is one prediction right? RuCoS: an exact match with a gold answer after normalisation."""
    if task == "RuCoS":
        from rsg_eval.core.metrics import rucos_f1_em

        gold = list(gold) if isinstance(gold, (list, tuple)) else [gold]
        return rucos_f1_em([gold], [pred])[1] == 1.0
    return _same(_key(pred), _key(gold))


def _disagreements(runs: Sequence[Run], task: str, ti: int, seed: int, n: int) -> list[dict]:
    """Per run: how many shared examples it predicts differently from the reference, and a seeded sample."""
    out: list[dict] = []
    ref = runs[0]
    if task not in ref.logs:
        return out
    ref_rows = {_key(x["key"]): x for x in ref.logs[task]}
    for r, run in enumerate(runs[1:], start=1):
        if task not in run.logs or run.split != ref.split or different_data(ref, run, task):
            continue
        shared = [(k, x) for k, x in ((_key(x["key"]), x) for x in run.logs[task]) if k in ref_rows]
        diff = [(k, x) for k, x in shared if not _same(_key(ref_rows[k]["pred"]), _key(x["pred"]))]
        if not diff:
            continue
        pick = sorted(_rng(seed, ti, 2, r).choice(len(diff), size=min(n, len(diff)), replace=False).tolist())
        examples = []
        for i in pick:
            k, x = diff[i]
            a = ref_rows[k]
            examples.append({"key": x["key"], "gold": a["gold"], "ref_pred": a["pred"], "run_pred": x["pred"],
                             "ref_right": _right(task, a["gold"], a["pred"]),
                             "run_right": _right(task, a["gold"], x["pred"]), "prompt": _cut(a.get("prompt")),
                             "run_prompt": None if x.get("prompt") == a.get("prompt") else _cut(x.get("prompt"))})
        out.append({"run": run.name, "n_disagree": len(diff), "n_shared": len(shared), "examples": examples})
    return out


def _template_of(run: Run, task: str) -> str | None:
    """The template a run used for a task: config "templates" (or a per-task "template" mapping), else its one
    "template"."""
    for per_task in (run.config.get("templates"), run.config.get("template")):
        if isinstance(per_task, dict) and per_task.get(task):
            return str(per_task[task])
    t = run.config.get("template")
    return None if t is None or isinstance(t, dict) else str(t)


def _template_label(config: dict) -> str | None:
    """The templates a run used, named the same way for zero-shot runs (config "template": the --template value
    or "default", plus per task "templates") and fine-tuned ones (config "template": a per-task mapping): "default"
    when every task used its task's default template, one name when every task used that name, else "default"
    plus the tasks that differ ("default; RCB: other") or the whole mapping."""
    t = config.get("template")
    per_task = config.get("templates") if isinstance(config.get("templates"), dict) else t
    if not isinstance(per_task, dict) or not per_task:
        return None if t is None or isinstance(t, dict) else str(t)
    names = {str(k): str(v) for k, v in per_task.items()}
    if len(set(names.values())) == 1 and not isinstance(t, dict) and t not in (None, "default"):
        return str(t)  # --template NAME (or a .yaml path) for every task
    defaults = _default_templates(names)
    other = {k: v for k, v in names.items() if defaults.get(k) != v}
    if not other:
        return "default"
    if len(other) == len(names):
        vals = set(other.values())
        return vals.pop() if len(vals) == 1 else ", ".join(f"{k}: {v}" for k, v in other.items())
    return "default; " + ", ".join(f"{k}: {v}" for k, v in other.items())


def _default_templates(per_task: dict[str, str]) -> dict[str, str]:
    """Each task's default template name as the prompts folder has it now ({} where it cannot be read)."""
    from rsg_eval.core.errors import RSGError
    from rsg_eval.core.prompts import list_templates

    out = {}
    for task in per_task:
        try:
            names = list_templates(task)
        except (RSGError, OSError):
            continue
        if names.get(task):
            out[task] = names[task][0]
    return out


def _template_spread(runs: Sequence[Run], tasks: list[str], cells: dict[str, list[dict]]) -> list[dict]:
    """Where one model was run with several templates (same config model and kind, different template for a
    task): the score per template and the spread (max - min, standard deviation) per task."""
    by_model: dict[str, list[int]] = {}
    for r, run in enumerate(runs):
        if run.origin == "run" and run.config.get("model"):
            kind = run.config.get("kind")
            by_model.setdefault(str(run.config["model"]) + (f" ({kind})" if kind else ""), []).append(r)
    out = []
    for model, idx in by_model.items():
        per_task = []
        for t in tasks:
            vals = [(runs[r].name, _template_of(runs[r], t), cells[t][r]["score"]) for r in idx
                    if cells[t][r]["score"] is not None and _template_of(runs[r], t) is not None]
            if len({v[1] for v in vals}) < 2:
                continue
            s = np.array([v[2] for v in vals])
            best = vals[int(np.argmax(s))]
            per_task.append({"task": t, "n": len(vals), "min": float(s.min()), "max": float(s.max()),
                             "mean": float(s.mean()), "std": float(s.std(ddof=1)),
                             "spread": float(s.max() - s.min()), "best_template": best[1],
                             "scores": [{"run": v[0], "template": v[1], "score": v[2]} for v in vals]})
        if per_task:
            out.append({"model": model, "runs": [runs[r].name for r in idx],
                        "templates": [_template_label(runs[r].config) for r in idx], "tasks": per_task})
    return out


def build_report(runs: Sequence[Run], *, seed: int = 0, n_boot: int = 1000, n_examples: int = 5,
                 problems: Sequence[str] = ()) -> dict:
    """All numbers of a report of `runs` (the first is the reference) as a JSON-able dict."""
    from rsg_eval.core.tasks import TASK_NAMES, get_task

    runs = list(runs)
    _unique_names(runs)
    problems = list(problems) + _run_notes(runs)
    tasks = [t for t in TASK_NAMES if any(t in run.logs or t in run.reported for run in runs)]
    extras = _published_extras(runs)
    bases = _bases(runs, extras)
    if any(b is None for b in bases[1:]) and any(run.origin == "run" for run in runs):
        problems.append("gains compare comparable rows only: local runs with local runs, published rows with "
                        "published rows (the paper's rows against the baseline the paper names); a local val "
                        "score and a leaderboard test score are different examples, so no gain links them")
    cells: dict[str, list[dict]] = {}
    boots: dict[str, _TaskBoot] = {}
    diffs: dict[str, dict[int, np.ndarray]] = {}
    task_rows = []
    for t in tasks:
        boots[t] = _TaskBoot(t, TASK_NAMES.index(t), runs, seed, n_boot, problems)
        cells[t], diffs[t] = _task_cells(t, runs, bases, boots[t], problems)
        task_rows.append({"task": t, "metrics": list(get_task(t).metrics), "cells": cells[t]})
    for r, run in enumerate(runs):
        missing = [t for t in tasks if cells[t][r]["status"] == "missing"]
        if missing and run.origin != "published":
            problems.append(f"{run.name}: no results for {', '.join(missing)} (marked missing)")
    totals, common = _totals(runs, tasks, cells, boots, diffs, bases)
    for run, row in zip(runs, totals):  # a hand-edited total is said, like a hand-edited task score
        rep = run.reported_total
        if run.origin == "run" and rep is not None and row["total"] is not None and abs(rep - row["total"]) > 1e-6:
            problems.append(f"{run.name}: metrics.json's total {rep:.4f} disagrees with the logs ({row['total']:.4f}); "
                            "the logs are used")
    table3 = _paper_table3(runs, extras, cells, tasks, problems)
    _check_table2(runs, extras, totals, problems)
    published_notes = list(dict.fromkeys(n for e in extras.values() for n in e.get("notes", [])))
    local = [r for r in range(len(runs)) if runs[r].origin != "published"]
    with warnings.catch_warnings():  # scikit-learn warns on categories whose items hold one label only
        warnings.simplefilter("ignore")
        diagnostics = {run.name: d for run in runs if (d := _diagnostics(run))}
    return {
        "seed": seed, "n_boot": n_boot, "level": 0.95, "alpha": 0.05,
        "reference": runs[0].name,
        "runs": [{"name": run.name, "title": run.title, "split": run.split, "where": run.where,
                  "origin": run.origin, "source": run.source, "has_examples": run.has_examples,
                  "kind": run.config.get("kind"), "model": run.config.get("model"),
                  "template": _template_label(run.config), "notes": list(run.notes)} for run in runs],
        "tasks": task_rows,
        # columns of the per-task (Table 3) table: the reference and every run with a task score that is not a
        # published reference row (those go to the leaderboard-layout table, one row each)
        # With only published rows, the columns are Table 3's two rows (the charts draw them).
        "task_columns": ([r for r in range(len(runs)) if r == 0 or (
            runs[r].origin != "published" and any(cells[t][r]["score"] is not None for t in tasks))]
            if local or table3 is None else [table3["baseline_index"], table3["run_index"]]),
        "published_only": not local,
        "paper_table3": table3,
        "published_notes": published_notes,
        "totals": totals,
        "common_tasks": common,
        "diagnostics": diagnostics,
        "confusion": {t: {run.name: _confusion(t, run.logs[t]) for run in runs if t in run.logs}
                      for t in tasks if get_task(t).labels is not None and any(t in run.logs for run in runs)},
        "disagreements": {t: d for t in tasks if (d := _disagreements(runs, t, TASK_NAMES.index(t), seed,
                                                                          n_examples))},
        "template_spread": _template_spread(runs, tasks, cells),
        "prompt_sensitivity": build_sensitivity(runs, seed=seed, n_boot=n_boot),  # multi-template runs
        "epochs": {run.name: run.epochs for run in runs if run.epochs},
        "problems": problems,
    }


def _run_notes(runs: list[Run]) -> list[str]:
    """The runs' own notes (one line per note, naming every run it applies to) and a warning when they cover
    different splits."""
    by_note: dict[str, list[str]] = {}
    for run in runs:
        for n in run.notes:
            by_note.setdefault(n, []).append(run.name)
    out = [f"{', '.join(names)}: {n}" for n, names in by_note.items()]
    splits = sorted({run.split for run in runs if run.origin == "run"})
    if len(splits) > 1:
        out.append(f"the runs cover different splits ({', '.join(splits)}): runs on different splits are "
                   "not paired")
    return out


def _task_cells(t: str, runs: list[Run], bases: list, boot: _TaskBoot, problems: list[str]
                ) -> tuple[list[dict], dict[int, np.ndarray]]:
    """One task's cell per run, with its gain over its base run and (after the first run) the paired bootstrap
    against the reference: (cells, {run index: bootstrap differences})."""
    cells = [_cell(run, t, boot, r, problems) for r, run in enumerate(runs)]
    diffs: dict[int, np.ndarray] = {}
    for r, cell in enumerate(cells):
        b = bases[r]
        # Runs scored on different example sets (their data fingerprints differ): a gain between them means
        # nothing, so none is given, and the cell says why (`no_gain`).
        cell["no_gain"] = (NO_GAIN_DATA if b is not None and b != r and cell["status"] == "ok"
                           and cells[b]["status"] == "ok" and different_data(runs[b], runs[r], t) else None)
        base = cells[b] if b is not None and not cell["no_gain"] else None
        cell["gain_vs"] = runs[b].name if b is not None else None
        cell["gain"] = _gain(cell["score"], base["score"]) if base else None
        # per metric, as Table 3 prints two-metric tasks (RCB F1 / Acc: -2.62 % / -2.91 %)
        cell["metric_gains"] = {m: (_gain(cell["metrics"][m], base["metrics"][m]) if base else None)
                                for m in cell["metrics"]}
        cell["paired"] = None
        if r:
            paired, d, note = boot.paired(runs, r)
            cell["paired"] = paired
            if d is not None:
                diffs[r] = d
            if note:
                problems.append(note)
    return cells, diffs
