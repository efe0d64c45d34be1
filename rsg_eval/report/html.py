"""The self-contained HTML page of a report: Jinja template in a sandbox, charts inlined as data URIs.

Torch-free. The template (templates/report.html.j2) is rendered by a `SandboxedEnvironment` with
autoescape on and `StrictUndefined`, so run names, prompts and predictions (user data) are escaped and a
misspelt variable fails loudly. The page loads nothing from outside: no scripts, fonts or images by URL.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from rsg_eval.report import sensitivity
from rsg_eval.report.render import (GAIN_RULE, MARK, PUBLISHED_NOTES_TITLE, TASK_TABLE_NOTE, num,
                                    task_table_header, task_table_rows, totals_header, totals_only_note,
                                    totals_rows, SPREAD_HEAD, spread_rows, board_header, board_rows, has_board,
                                    table3_header, table3_rows, table3_title)

TEMPLATE = Path(__file__).resolve().parent / "templates" / "report.html.j2"
CHART_TITLES = {"scores": "Task scores per run (95% intervals)", "epochs": "Validation score per epoch",
                "prompts": "Score per prompt template (dots) and the mean over templates (bars)"}


def inline_code(text: object) -> Any:
    """Prose with Markdown-style `code` spans as HTML: the text escaped, each `...` pair turned into <code>...</code>
    (an unpaired backtick stays as it is). Notes and rules are written once, for Markdown and the terminal; the page
    should not show their backticks."""
    from markupsafe import Markup, escape

    parts = str(text).split("`")
    if len(parts) % 2 == 0:  # an odd number of backticks: keep the last one literally
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    out = [str(escape(p)) if i % 2 == 0 else f"<code>{escape(p)}</code>" for i, p in enumerate(parts)]
    return Markup("".join(out))


def _cls(text: str, col: int) -> str:
    if col < 2:
        return ""
    if text in ("missing", "n/p"):
        return "num missing"
    if text.endswith(MARK):
        return "num sig neg" if text.lstrip().startswith(("-", "Δ -")) else "num sig"
    return "num"


def _cells(rows: list[list[str]]) -> list[list[dict]]:
    return [[{"text": t, "cls": _cls(t, i)} for i, t in enumerate(row)] for row in rows]


def _context(report: dict, charts: dict[str, bytes]) -> dict:
    from rsg_eval import __version__

    diag = report["diagnostics"]
    cats = list(dict.fromkeys(k for d in diag.values() for k in d))
    return {
        "title": "Russian SuperGLUE comparison report",
        "reference": report["runs"][0], "runs": report["runs"], "n_boot": report["n_boot"],
        "seed": report["seed"], "mark": MARK, "version": __version__,
        "gain_rule": GAIN_RULE, "task_table_note": TASK_TABLE_NOTE,
        "published_only": bool(report.get("published_only")),
        "table3": bool(report.get("paper_table3")),
        "table3_title": table3_title(report) if report.get("paper_table3") else "",
        "table3_head": table3_header(report) if report.get("paper_table3") else [],
        "table3_rows": _cells(table3_rows(report)) if report.get("paper_table3") else [],
        "published_notes_title": PUBLISHED_NOTES_TITLE, "published_notes": report.get("published_notes") or [],
        "task_head": task_table_header(report), "task_rows": _cells(task_table_rows(report)),
        "totals_head": totals_header(report), "totals_rows": _cells(totals_rows(report)),
        "board": has_board(report), "board_head": board_header(report), "board_rows": _cells(board_rows(report)),
        "common_tasks": report["common_tasks"], "totals_only_note": totals_only_note(report),
        "charts": [(name, "data:image/png;base64," + base64.b64encode(png).decode("ascii"))
                   for name, png in charts.items()],
        "chart_titles": CHART_TITLES,
        "diagnostics": bool(diag),
        "diag_head": ["Category"] + [f"{n} (n)" for n in diag],
        "diag_rows": [[{"text": c, "cls": ""}] + [{"text": f"{num(d[c]['mcc'])} ({d[c].get('n', '–')})"
                                                   if c in d else "–", "cls": "num"} for d in diag.values()]
                      for c in cats],
        "confusion": [(task, [(name, {"labels": cm["labels"], "rows": list(zip(cm["labels"], cm["matrix"]))})
                              for name, cm in per_run.items()]) for task, per_run in report["confusion"].items()],
        "disagreements": list(report["disagreements"].items()),
        "spread_head": SPREAD_HEAD,
        "template_spread": [{"model": s["model"], "runs": s["runs"], "templates": s["templates"],
                             "rows": _cells(spread_rows(s))} for s in report["template_spread"]],
        "sensitivity": [{**s, "rows": _cells(s["rows"])} for s in sensitivity.sections(report)],
        "sensitivity_rule": (report.get("prompt_sensitivity") or {}).get("rule", ""),
        "problems": report["problems"],
    }


def to_html(report: dict, charts: dict[str, bytes] | None = None) -> str:
    """The report as one HTML page with every chart embedded."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment(autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["code"] = inline_code
    template = env.from_string(TEMPLATE.read_text(encoding="utf-8"))
    return template.render(**_context(report, charts or {}))
