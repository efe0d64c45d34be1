"""PNG charts of a report: task scores per run with their intervals, and validation score against epoch.

matplotlib is imported inside the functions with the Agg backend (no display, no torch), so importing the
report package stays cheap. The PNGs carry no timestamp, so the same report gives the same bytes.
"""

from __future__ import annotations

import io
import math
from typing import Any

_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
           "#CCB974", "#64B5CD"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    # metadata without Software/date keeps the bytes identical across runs of the same report
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def scores_chart(report: dict) -> bytes | None:
    """Grouped bars: one group per task (plus the mean over common tasks), one bar per run, CI error bars."""
    tasks = [t for t in report["tasks"] if any(c["score"] is not None for c in t["cells"])]
    if not tasks:
        return None
    plt = _plt()
    cols = report["task_columns"]
    runs = [report["runs"][r] for r in cols]
    labels = [t["task"] for t in tasks]
    common = report["common_tasks"]
    extra = []  # summary groups after the tasks: (label, totals key, interval key)
    if common and len(tasks) > 1:
        extra.append((f"mean of {len(common)} common", "common", "common_ci"))
    if any(report["totals"][r]["total"] is not None for r in cols):
        extra.append(("Total", "total", "total_ci"))
    labels += [e[0] for e in extra]
    n = len(runs)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(13.0, max(6.0, 2.0 + 0.55 * len(labels) * max(1, n) ** 0.5)), 4.2))
    for j, (r, run) in enumerate(zip(cols, runs)):
        ys, lo, hi = [], [], []
        for t in tasks:
            c = t["cells"][r]
            ys.append(math.nan if c["score"] is None else c["score"])
            ci = c["ci"]
            lo.append(0.0 if not ci else max(0.0, c["score"] - ci[0]))
            hi.append(0.0 if not ci else max(0.0, ci[1] - c["score"]))
        tot = report["totals"][r]
        for _, key, ci_key in extra:
            ys.append(math.nan if tot[key] is None else tot[key])
            ci = tot[ci_key]
            lo.append(0.0 if not ci else max(0.0, tot[key] - ci[0]))
            hi.append(0.0 if not ci else max(0.0, ci[1] - tot[key]))
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        has_ci = any(v > 0 for v in lo + hi)
        ax.bar(xs, ys, width, label=f"{run['name']} ({run['where']})", color=_COLORS[r % len(_COLORS)],
               yerr=[lo, hi] if has_ci else None, capsize=2 if has_ci else 0, error_kw={"linewidth": 0.8})
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("task score")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title("Task scores with 95% bootstrap intervals")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", linewidth=0.3)
    return _png(fig)


def epochs_chart(report: dict) -> bytes | None:
    """Validation score against epoch, one panel per task, one line per run that has epochs.csv."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for name, rows in report["epochs"].items():
        for row in rows:
            task, epoch, score = row.get("task"), row.get("epoch"), row.get("score")
            if task is None or not isinstance(epoch, (int, float)) or not isinstance(score, (int, float)):
                continue
            series.setdefault(str(task), {}).setdefault(name, []).append((float(epoch), float(score)))
    if not series:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    tasks = sorted(series, key=lambda t: [x["task"] for x in report["tasks"]].index(t)
                   if t in [x["task"] for x in report["tasks"]] else 99)
    cols = min(3, len(tasks))
    rows_n = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.0 * cols, 2.8 * rows_n), squeeze=False)
    names = [r["name"] for r in report["runs"]]
    for i, task in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        for name, pts in series[task].items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=name,
                    color=_COLORS[names.index(name) % len(_COLORS)] if name in names else None)
        ax.set_title(task, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("val score", fontsize=8)
        ax.grid(linewidth=0.3)
        ax.tick_params(labelsize=7)
    for j in range(len(tasks), rows_n * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Validation score per epoch (epochs.csv)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def prompts_chart(report: dict) -> bytes | None:
    """A strip per task: one dot per template and run (runs side by side), a bar at each run's mean."""
    runs = [e for e in (report.get("prompt_sensitivity") or {}).get("runs", [])]
    if not runs:
        return None
    from rsg_eval.report.sensitivity import columns

    plt = _plt()
    tasks = [t for t in dict.fromkeys(t for e in runs for t in e["tasks"])]
    series = [(e, col) for e in runs for col in columns(e)]
    fig, ax = plt.subplots(figsize=(min(13.0, 2.0 + 1.1 * len(tasks)), 4.2))
    width = 0.8 / max(1, len(series))
    for j, (e, col) in enumerate(series):
        color = _COLORS[j % len(_COLORS)]
        for i, t in enumerate(tasks):
            c = (e["tasks"].get(t) or {}).get("columns", {}).get(col)
            if not c:
                continue
            x0 = i - 0.4 + width * (j + 0.5)
            ys = [x["score"] for x in c["templates"].values()]
            # a fixed spread of the dots inside the run's slot (no randomness: the same report, the same PNG)
            xs = [x0 + width * 0.6 * ((k + 0.5) / len(ys) - 0.5) for k in range(len(ys))]
            label = f"{e['run']} ({col})" if not any(t2 in e["tasks"] for t2 in tasks[:i]) else None
            ax.scatter(xs, ys, s=14, color=color, label=label, zorder=3)
            ax.hlines(c["summary"]["mean"], x0 - width * 0.4, x0 + width * 0.4, color=color, linewidth=1.5)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("task score")
    ax.set_title("Score per template (dots) and mean over templates (bars)")
    ax.grid(axis="y", linewidth=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def make_charts(report: dict) -> dict[str, bytes]:
    """{file stem: PNG bytes} for every chart this report has data for."""
    out = {}
    for name, fn in (("scores", scores_chart), ("epochs", epochs_chart), ("prompts", prompts_chart)):
        png = fn(report)
        if png is not None:
            out[name] = png
    return out
