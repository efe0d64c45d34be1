"""Render a built report (rsg_eval.report.build) as Markdown, CSV, a rich terminal table and JSON.

Torch-free. The HTML page lives in html.py, the charts in charts.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from rsg_eval.report import sensitivity

MARK = "*"  # beside a gain when the paired test says the difference is significant


def num(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def ci_text(ci: Any, nd: int = 3) -> str:
    if not ci or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in ci):
        return ""
    return f"[{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def gain_text(gain: Any, paired: dict | None, vs: str | None = None, reference: str | None = None,
              why: str | None = None) -> str:
    """A gain in percent with two decimals, as the paper's Table 3 prints it; `vs` names the row it is against
    when that is not the reference (a published row against the baseline the paper names); `why` says why there
    is none (runs scored on different data)."""
    if why:
        return f"no Δ: {why}"
    if gain is None:
        return "–" if paired is None else f"Δ {paired['diff']:+.3f}" + (f" {MARK}" if paired["significant"] else "")
    text = f"{gain:+.2f}%" + (f" {MARK}" if paired and paired["significant"] else "")
    return text + (f" vs {vs}" if vs and vs != reference else "")


def metric_gains_text(cell: dict, names: list[str]) -> str:
    """Per-metric gains of a two-metric task, 'a / b' like its values ('-2.62% / -2.91%'); '' without any."""
    if cell.get("no_gain"):
        return f"no Δ: {cell['no_gain']}"
    gains = [cell.get("metric_gains", {}).get(m) for m in names]
    if all(g is None for g in gains):
        return ""
    return " / ".join("–" if g is None else f"{g:+.2f}%" for g in gains)


def paper_num(x: Any) -> str:
    """A score as the paper prints it: at most three decimals, trailing zeros dropped (0.68, 0.338)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    text = f"{x:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def paper_gain(g: Any) -> str:
    """A gain as Table 3 prints it: '+59.95 %', '-2.62 %', and '0 %' for no change."""
    if g is None or (isinstance(g, float) and math.isnan(g)):
        return "–"
    return "0 %" if round(g, 2) == 0 else f"{g:+.2f} %"


def table3_header(report: dict) -> list[str]:
    return list(report["paper_table3"]["headers"])


def table3_rows(report: dict) -> list[list[str]]:
    """The paper's Table 3, rebuilt from paper.yaml, each cell formatted as the paper prints it."""
    return [[row["task"], " / ".join(metric_label(m) for m in row["metrics"]),
             " / ".join(paper_num(v) for v in row["baseline"]), " / ".join(paper_num(v) for v in row["run"]),
             " / ".join(paper_gain(g) for g in row["gains"])] for row in report["paper_table3"]["rows"]]


def table3_title(report: dict) -> str:
    t3 = report["paper_table3"]
    return (f"The paper's Table 3 (test, published): {t3['run']} against {t3['baseline']}, gain = "
            "(new - old) / old per metric")


def p_text(p: dict | None, n_boot: int) -> str:
    """The paired test's p-value; 0 replicates on the other side reads "< 2/B", the resolution of B replicates."""
    if not p:
        return ""
    return f"<{2 / n_boot:.3g}" if p["p"] == 0 else num(p["p"])


def status_text(cell: dict) -> str:
    return {"missing": "missing", "not published": "n/p"}.get(cell["status"], "–")


def metric_label(name: str) -> str:
    return {"mcc": "MCC", "f1": "F1", "acc": "Acc", "f1a": "F1a", "em": "EM"}.get(name, name)


def run_header(run: dict) -> str:
    return f"{run['name']} ({run['where']})"


def task_table_rows(report: dict, sep: str = " ") -> list[list[str]]:
    """Rows of the per-task table: task, metric, then per run its value and (after the reference) its gain.

    Only the runs in report["task_columns"] (those with per-task numbers) get columns."""
    cols = report["task_columns"]
    ref = report["reference"]
    rows: list[list[str]] = []
    for tr in report["tasks"]:
        cells, names = tr["cells"], tr["metrics"]
        if len(names) > 1:
            row = [tr["task"], " / ".join(metric_label(m) for m in names)]
            for r in cols:
                c = cells[r]
                row.append(" / ".join(num(c["metrics"][m]) for m in names) if c["status"] == "ok"
                           else status_text(c))
                if r:
                    row.append(metric_gains_text(c, names) if c["status"] == "ok" else "")
            rows.append(row)
        row = ["" if len(names) > 1 else tr["task"], "score" if len(names) > 1 else metric_label(names[0])]
        for r in cols:
            c = cells[r]
            row.append((num(c["score"]) + (sep + ci_text(c["ci"]) if c["ci"] else "")).strip()
                       if c["status"] == "ok" else status_text(c))
            if r:
                row.append(gain_text(c["gain"], c["paired"], c.get("gain_vs"), ref, c.get("no_gain"))
                           if c["status"] == "ok" else "")
        rows.append(row)
    return rows


TASK_TABLE_NOTE = ("n/p = not published for this reference row; missing = the run has no result for the task. "
                   "Two-metric tasks show each metric's gain on their first line and the task score's gain on "
                   "the second; – = no comparable row (local runs are compared with local runs only); "
                   "no Δ: different data = the two runs were scored on different example sets (their data files' "
                   "sha256 differ), so neither a gain nor a test is given.")
PUBLISHED_NOTES_TITLE = "Inconsistencies inside the paper (its numbers are shown as printed)"


def task_table_header(report: dict) -> list[str]:
    head = ["Task", "Metric"]
    for r in report["task_columns"]:
        run = report["runs"][r]
        head.append(run_header(run) + (" [ref]" if r == 0 else ""))
        if r:
            head.append(f"Δ% {run['name']}")
    return head


def totals_only_note(report: dict) -> str:
    """Which runs are not columns of the per-task table, and where they are instead."""
    names = [run["name"] for r, run in enumerate(report["runs"]) if r not in report["task_columns"]]
    return ("Published reference rows are in the leaderboard-layout table and the totals: " + ", ".join(names)
            + ".") if names else ""


def board_header(report: dict) -> list[str]:
    return ["Run", "Numbers", "Total"] + [f"{t['task']} {'/'.join(metric_label(m) for m in t['metrics'])}"
                                          for t in report["tasks"]]


def board_rows(report: dict) -> list[list[str]]:
    """The leaderboard's own layout: one row per run, the total, then each task's metrics as the site prints them."""
    rows = []
    for r, (run, tot) in enumerate(zip(report["runs"], report["totals"])):
        row = [run["name"], run["where"], num(tot["total"])]
        for t in report["tasks"]:
            c = t["cells"][r]
            row.append(" / ".join(num(c["metrics"][m]) for m in t["metrics"]) if c["status"] == "ok"
                       else status_text(c))
        rows.append(row)
    return rows


def has_board(report: dict) -> bool:
    return len(report["task_columns"]) < len(report["runs"])


def totals_rows(report: dict) -> list[list[str]]:
    rows = []
    n_common = len(report["common_tasks"])
    for r, (run, t) in enumerate(zip(report["runs"], report["totals"])):
        tot = num(t["total"]) + (" " + ci_text(t["total_ci"]) if t["total_ci"] else "")
        if t["total"] is not None and t["total_source"] in ("published", "file"):
            tot += f" ({t['total_source']})"
        elif t["total"] is None:
            tot = f"– ({t['n_tasks']}/9 tasks)"
        ref = report["reference"]
        row = [run["name"], run["where"], tot,
               "" if r == 0 and t["gain"] is None
               else gain_text(t["gain"], t["paired"], t.get("gain_vs"), ref, t.get("no_gain")),
               "" if r == 0 else p_text(t["paired"], report["n_boot"])]
        if n_common:
            row += [num(t["common"]) + (" " + ci_text(t["common_ci"]) if t["common_ci"] else ""),
                    "" if r == 0 and t["common_gain"] is None
                    else gain_text(t["common_gain"], t["common_paired"], t.get("gain_vs"), ref, t.get("no_gain")),
                    "" if r == 0 else p_text(t["common_paired"], report["n_boot"])]
        rows.append(row)
    return rows


def totals_header(report: dict) -> list[str]:
    head = ["Run", "Numbers", "Total [95% CI]", "Δ% total", "p"]
    if report["common_tasks"]:
        head += [f"Mean of {len(report['common_tasks'])} common tasks [95% CI]", "Δ% mean", "p"]
    return head


# --------------------------------------------------------------------------------------------------- markdown

def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def esc(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _rw(ok: bool) -> str:
    return "right" if ok else "wrong"


def _md_quote(text: str) -> str:
    return "\n".join("> " + line if line else ">" for line in str(text).splitlines()) or ">"


def intro_lines(report: dict) -> list[str]:
    ref = report["runs"][0]
    return [
        f"Reference: **{ref['name']}** ({ref['where']}). Numbers marked *val, local* were scored here on the "
        "validation split; *test, leaderboard* and *test, published* are the leaderboard's test-set numbers.",
        f"Intervals: 95% percentile bootstrap, {report['n_boot']} replicates, seed {report['seed']}; MuSeRC "
        "questions and RuCoS queries are resampled whole. " + GAIN_RULE + f" {MARK} = paired bootstrap test "
        "against the reference on the same examples, p < 0.05. Runs without examples (published rows, score "
        "files) have no intervals and no tests.",
    ]


GAIN_RULE = ("Δ% is (new - old) / |old| x 100, per metric and for the task score (Table 3 style), between "
             "comparable rows only: a local run against the reference when that is a local run on the same "
             "split; a published row against the baseline its paper names, or against the reference when that "
             "is a score file of leaderboard numbers; never a local val score against a leaderboard test score.")


def to_markdown(report: dict, figures: dict[str, str] | None = None) -> str:
    """The whole report as GitHub Markdown; `figures` maps a chart name to its path relative to the file."""
    figures = figures or {}
    out = ["# Russian SuperGLUE comparison report", ""] + [x for line in intro_lines(report) for x in (line, "")]
    out += ["## Runs", "", _md_table(
        ["#", "Run", "Numbers", "Kind", "Model", "Template", "Examples", "Source"],
        [[str(i), r["name"] + (f" — {r['title']}" if r["title"] else ""), r["where"], r["kind"] or r["origin"],
          r["model"] or "", r["template"] or "", "yes" if r["has_examples"] else "no", r["source"]]
         for i, r in enumerate(report["runs"])]), ""]
    if report.get("paper_table3"):
        out += ["## " + table3_title(report), "", _md_table(table3_header(report), table3_rows(report)), ""]
    if not report.get("published_only"):
        out += ["## Per task (Table 3 style)", "", _md_table(task_table_header(report), task_table_rows(report)),
                ""]
        out += [TASK_TABLE_NOTE + " " + totals_only_note(report), ""]
    if has_board(report):
        out += ["## Leaderboard layout", "", _md_table(board_header(report), board_rows(report)), "",
                "Metrics as the leaderboard prints them; val rows were scored locally, test rows are leaderboard "
                "numbers, so the two are not the same examples.", ""]
    out += ["## Totals (Tables 1 and 2 style)", "", _md_table(totals_header(report), totals_rows(report)), ""]
    if report["common_tasks"]:
        out += ["Total = mean of all nine task scores (leaderboard rule); the mean over common tasks covers "
                f"{', '.join(report['common_tasks'])}.", ""]
    if figures:
        out += ["## Charts", ""] + [f"![{name}]({path})" for name, path in figures.items()] + [""]
    out += _md_inside(report)
    out += sensitivity.markdown(report)  # prompt sensitivity of multi-template runs
    if report.get("published_notes"):
        out += ["## " + PUBLISHED_NOTES_TITLE, ""] + [f"- {n}" for n in report["published_notes"]] + [""]
    if report["problems"]:
        out += ["## Notes and problems", ""] + [f"- {p}" for p in report["problems"]] + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_inside(report: dict) -> list[str]:
    out: list[str] = []
    diag = report["diagnostics"]
    if diag:
        cats = list(dict.fromkeys(k for d in diag.values() for k in d))
        out += ["## LiDiRus diagnostics (MCC per category)", "", _md_table(
            ["Category"] + [f"{n} (n)" for n in diag],
            [[c] + [f"{num(d[c]['mcc'])} ({d[c].get('n', '–')})" if c in d else "–" for d in diag.values()]
             for c in cats]), ""]
    if report["confusion"]:
        out += ["## Confusion matrices (rows: gold, columns: predicted)", ""]
        for task, per_run in report["confusion"].items():
            for name, cm in per_run.items():
                out += [f"**{task} — {name}**", "", _md_table(["gold \\ pred"] + cm["labels"],
                        [[lab] + [str(v) for v in row] for lab, row in zip(cm["labels"], cm["matrix"])]), ""]
    if report["disagreements"]:
        ref = report["reference"]
        out += [f"## Where runs disagree with the reference ({ref})", ""]
        for task, per_run in report["disagreements"].items():
            for d in per_run:
                out += [f"### {task}: {d['run']} vs {ref} — {d['n_disagree']} of {d['n_shared']} predictions "
                        f"differ (sample of {len(d['examples'])})", ""]
                for ex in d["examples"]:
                    out += [f"key {ex['key']}: gold `{ex['gold']}`; {ref} `{ex['ref_pred']}` "
                            f"({_rw(ex['ref_right'])}), {d['run']} `{ex['run_pred']}` ({_rw(ex['run_right'])})",
                            "", _md_quote(ex["prompt"]), ""]
                    if ex["run_prompt"]:
                        out += [f"{d['run']}'s prompt:", "", _md_quote(ex["run_prompt"]), ""]
    for spread in report["template_spread"]:
        out += [f"## Template spread: {spread['model']}", "",
                "Runs: " + ", ".join(spread["runs"]), "",
                _md_table(SPREAD_HEAD, spread_rows(spread)), ""]
    return out


SPREAD_HEAD = ["Task", "Scores (template: score)", "min", "max", "spread", "std", "best template"]


def spread_rows(spread: dict) -> list[list[str]]:
    return [[t["task"], ", ".join(f"{x['template']} ({x['run']}): {num(x['score'])}" for x in t["scores"]),
             num(t["min"]), num(t["max"]), num(t["spread"]), num(t["std"]), t["best_template"]]
            for t in spread["tasks"]]


# --------------------------------------------------------------------------------------------------- csv / json

CSV_COLUMNS = ["run", "numbers", "task", "metric", "value", "ci_low", "ci_high", "gain_pct", "gain_vs", "diff_vs_ref",
               "diff_ci_low", "diff_ci_high", "p_value", "significant", "mcnemar_p", "n_items", "source", "status",
               "no_gain"]


def to_csv(report: dict) -> str:
    """Long format: one line per run, task and metric (and 'score'), then the totals."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()

    def row(run: dict, task: str, metric: str, value: Any, **kw: Any) -> None:
        d = {k: "" for k in CSV_COLUMNS}
        d.update(run=run["name"], numbers=run["where"], task=task, metric=metric,
                 value="" if value is None else repr(float(value)))
        for k, v in kw.items():
            d[k] = "" if v is None else (repr(float(v)) if isinstance(v, float) else v)
        w.writerow(d)

    def paired_kw(p: dict | None) -> dict:
        if not p:
            return {}
        out = {"diff_vs_ref": p["diff"], "diff_ci_low": p["ci"][0], "diff_ci_high": p["ci"][1],
               "p_value": p["p"], "significant": str(bool(p["significant"])).lower()}
        if p.get("mcnemar"):
            out["mcnemar_p"] = float(p["mcnemar"]["p"])
        return out

    for tr in report["tasks"]:
        for run, c in zip(report["runs"], tr["cells"]):
            for m in tr["metrics"]:
                g = c.get("metric_gains", {}).get(m)
                row(run, tr["task"], m, c["metrics"][m], gain_pct=g, gain_vs=c.get("gain_vs") if g is not None
                    else None, source=c["source"], status=c["status"], no_gain=c.get("no_gain"))
            ci = c["ci"] or [None, None]
            row(run, tr["task"], "score", c["score"], ci_low=ci[0], ci_high=ci[1], gain_pct=c["gain"],
                gain_vs=c.get("gain_vs") if c["gain"] is not None else None,
                n_items=c["n"], source=c["source"], status=c["status"], no_gain=c.get("no_gain"),
                **paired_kw(c["paired"]))
    for run, t in zip(report["runs"], report["totals"]):
        ci = t["total_ci"] or [None, None]
        row(run, "total", "total", t["total"], ci_low=ci[0], ci_high=ci[1], gain_pct=t["gain"],
            gain_vs=t.get("gain_vs") if t["gain"] is not None else None, source=t["total_source"],
            status="ok" if t["total"] is not None else "incomplete", no_gain=t.get("no_gain"),
            **paired_kw(t["paired"]))
        if report["common_tasks"]:
            ci = t["common_ci"] or [None, None]
            row(run, "mean:" + "+".join(report["common_tasks"]), "mean", t["common"], ci_low=ci[0], ci_high=ci[1],
                gain_pct=t["common_gain"], gain_vs=t.get("gain_vs") if t["common_gain"] is not None else None,
                status="ok", no_gain=t.get("no_gain"), **paired_kw(t["common_paired"]))
    for d in sensitivity.csv_rows(report):  # per template of multi-template runs
        w.writerow({**{k: "" for k in CSV_COLUMNS}, **d})
    return buf.getvalue()


def to_json(report: dict) -> str:
    return json.dumps(report, ensure_ascii=False, indent=1, default=str) + "\n"


# --------------------------------------------------------------------------------------------------- terminal

def print_rich(report: dict, console: Any = None) -> None:
    """The per-task and totals tables in the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for line in intro_lines(report):
        console.print(line.replace("**", ""), highlight=False)
    tables = []
    if report.get("paper_table3"):
        tables.append((table3_title(report), table3_header(report), table3_rows(report)))
    if not report.get("published_only"):
        tables.append(("Per task (Table 3 style)", task_table_header(report), task_table_rows(report, sep="\n")))
    tables.append(("Totals (Tables 1-2 style)", totals_header(report), totals_rows(report)))
    for title, head, rows in tables:
        table = Table(title=title, show_lines=False)
        for i, h in enumerate(head):
            table.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    if totals_only_note(report) and not report.get("published_only"):
        console.print(totals_only_note(report), highlight=False)
    for n in report.get("published_notes") or []:
        console.print(f"[cyan]paper:[/] {n}", highlight=False, soft_wrap=True)
    for p in report["problems"]:
        console.print(f"[yellow]note:[/] {p}", highlight=False, soft_wrap=True)
