"""The report's "prompt sensitivity" section: per multi-template run (`rsg zeroshot --templates`), each task's
score per template with a bootstrap interval, the spread over templates and the total's range; between two such
runs, whether a gain holds for every template or only for the mean (a sign test over the shared templates).

Torch-free. The numbers come from rsg_eval.report.spread (the same code `rsg zeroshot` writes spread.json with);
this module only gathers them per run and lays them out for Markdown, HTML, CSV and the chart.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from rsg_eval.report.spread import COLUMNS, OPTIMISM_NOTE, compare_templates, read_template_logs, spread_table

SIGN_TEST_RULE = ("Paired over templates: for each template both runs scored, the gain is the run's score minus "
                  "the reference's; \"every template\" says whether all gains have one sign; the sign test is the "
                  "exact two-sided binomial test that gains are as likely negative as positive (ties dropped). A "
                  "gain of the mean that is not a gain on every template depends on the prompt.")
SPREAD_RULE = ("Per task: mean, standard deviation (n - 1) and range of the score over the templates, the best "
               "and worst template, and per template its score with a 95% bootstrap interval over examples "
               "(whole questions for MuSeRC, whole queries for RuCoS). Total range: the leaderboard total with "
               "every task at its worst template and at its best.")


def build_sensitivity(runs: Sequence[Any], *, seed: int = 0, n_boot: int = 1000) -> dict:
    """{"runs": [per multi-template run: its tables], "comparisons": [each run against the first one]}."""
    from rsg_eval.report.load import different_data

    out_runs = []
    tables: dict[int, dict] = {}
    for r, run in enumerate(runs):
        if getattr(run, "origin", None) != "run":
            continue
        cfg = run.config or {}
        logs = read_template_logs(run.source, run.split, cfg.get("variants"))
        if not logs:
            continue
        table = spread_table(logs, n_boot=n_boot, seed=seed, calibrated=cfg.get("calibrate") is True)
        tables[r] = table
        select = cfg.get("select", "default")
        out_runs.append({"run": run.name, "split": run.split, "select": select,
                         "select_note": OPTIMISM_NOTE if select == "best-val" else
                         "metrics.json and the zip use each task's default template",
                         "calibrate": cfg.get("calibrate"), "num_fewshot": cfg.get("num_fewshot") or 0,
                         "template_set": cfg.get("template_set"), **table})
    comparisons = []
    if 0 in tables:
        ref = runs[0]
        for r, table in tables.items():
            if r == 0 or runs[r].split != ref.split:
                continue
            skip = {t: why for t in table["tasks"] if (why := different_data(ref, runs[r], t))}
            a = {**tables[0], "tasks": {t: v for t, v in tables[0]["tasks"].items() if t not in skip}}
            for col in COLUMNS:
                got = compare_templates(a, table, col)
                if got["tasks"]:
                    comparisons.append({"run": runs[r].name, "reference": ref.name, "skipped": skip, **got})
    return {"runs": out_runs, "comparisons": comparisons, "rule": SPREAD_RULE, "sign_test_rule": SIGN_TEST_RULE}


# --------------------------------------------------------------------------------------------------- layout

def _num(x: Any, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


SPREAD_HEAD = ["Task", "n", "mean", "sd", "min", "max", "best", "worst", "per template: score [95% CI]"]
COMPARE_HEAD = ["Task", "templates", "mean gain", "min gain", "max gain", "every template", "sign test (+/−, p)"]


def spread_rows(entry: dict, column: str) -> list[list[str]]:
    rows = []
    for task, e in entry["tasks"].items():
        c = e["columns"].get(column)
        if not c:
            continue
        s = c["summary"]
        per = ", ".join(f"{n} {_num(x['score'])} [{_num(x['ci'][0])}, {_num(x['ci'][1])}]"
                        for n, x in c["templates"].items())
        rows.append([task, str(s["n"]), _num(s["mean"]), _num(s["sd"]), _num(s["min"]), _num(s["max"]),
                     s["best"] or "", s["worst"] or "", per])
    return rows


def total_line(entry: dict, column: str) -> str:
    t = (entry.get("totals") or {}).get(column)
    if not t:
        return "Total range: needs all nine tasks."
    return (f"Total range over templates: {_num(t['min'])} to {_num(t['max'])} (width {_num(t['range'])}); "
            f"with every task at its templates' mean: {_num(t['mean'])}.")


def compare_rows(comp: dict) -> list[list[str]]:
    rows = []
    for task, c in comp["tasks"].items():
        st = c["sign_test"]
        rows.append([task, str(len(c["templates"])), f"{c['mean_gain']:+.3f}", f"{c['min_gain']:+.3f}",
                     f"{c['max_gain']:+.3f}", "yes" if c["every_template"] else "no",
                     f"{st['n_pos']}/{st['n_neg']}, p = {st['p']:.3g}"])
    if comp.get("pooled"):
        st = comp["pooled"]
        rows.append(["all (task, template) pairs", str(st["n"]), f"{comp['pooled_mean_gain']:+.3f}", "", "",
                     "yes" if (st["n_pos"] == st["n"] or st["n_neg"] == st["n"]) else "no",
                     f"{st['n_pos']}/{st['n_neg']}, p = {st['p']:.3g}"])
    return rows


def columns(entry: dict) -> list[str]:
    return [c for c in COLUMNS if any(c in e["columns"] for e in entry["tasks"].values())]


def sections(report: dict) -> list[dict]:
    """Format-neutral sections: {"title", "lines": [...], "head", "rows"} in order."""
    ps = report.get("prompt_sensitivity") or {}
    out = []
    for entry in ps.get("runs", []):
        shots = f", {entry['num_fewshot']}-shot" if entry.get("num_fewshot") else ""
        for col in columns(entry):
            out.append({"title": f"Prompt sensitivity: {entry['run']} ({entry['split']}, {col}{shots})",
                        "lines": [f"Templates: {entry.get('template_set') or 'all'}; selection rule for "
                                  f"metrics.json and the zip: {entry['select']} — {entry['select_note']}.",
                                  total_line(entry, col)],
                        "head": SPREAD_HEAD, "rows": spread_rows(entry, col)})
    for comp in ps.get("comparisons", []):
        lines = [ps.get("sign_test_rule", SIGN_TEST_RULE)]
        lines += [f"{t}: not paired: {why}" for t, why in comp.get("skipped", {}).items()]
        out.append({"title": f"Gain over templates: {comp['run']} vs {comp['reference']} ({comp['column']})",
                    "lines": lines, "head": COMPARE_HEAD, "rows": compare_rows(comp)})
    return out


def markdown(report: dict) -> list[str]:
    out: list[str] = []
    for s in sections(report):
        out += [f"## {s['title']}", ""] + [x for line in s["lines"] for x in (line, "")]
        out += ["| " + " | ".join(s["head"]) + " |", "|" + "---|" * len(s["head"])]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in s["rows"]] + [""]
    if out:
        out += [(report.get("prompt_sensitivity") or {}).get("rule", SPREAD_RULE), ""]
    return out


def csv_rows(report: dict) -> list[dict]:
    """Rows in report.csv's columns: metric "template:<name>" per template, "templates:<stat>" per summary."""
    out = []
    for entry in (report.get("prompt_sensitivity") or {}).get("runs", []):
        numbers = "val, local" if entry["split"] == "val" else entry["split"]
        for task, e in entry["tasks"].items():
            for col, c in e["columns"].items():
                tag = "" if col == COLUMNS[0] else "@calibrated"
                for name, x in c["templates"].items():
                    out.append({"run": entry["run"], "numbers": numbers, "task": task,
                                "metric": f"template:{name}{tag}", "value": repr(float(x["score"])),
                                "ci_low": repr(float(x["ci"][0])), "ci_high": repr(float(x["ci"][1])),
                                "n_items": x["n_items"], "source": "templates/", "status": "ok"})
                for stat in ("mean", "sd", "min", "max", "range"):
                    v = c["summary"][stat]
                    out.append({"run": entry["run"], "numbers": numbers, "task": task,
                                "metric": f"templates:{stat}{tag}", "value": "" if v is None else repr(float(v)),
                                "source": "templates/", "status": "ok"})
    return out
