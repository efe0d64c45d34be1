"""What `rsg build-corpus` prints from a build's summary.json (`rsg_eval.corpus.build`): the per-task table and one
line per stage that removed something."""

from __future__ import annotations

from typing import Any


def summary_table(summary: dict) -> Any:
    """A rich Table: per task the target and what was built (train / val), where it came from, what the teachers'
    thresholds dropped, and the length percentiles (characters)."""
    from rich.table import Table

    tab = Table(title="corpus")
    cols = ("task", "target", "built", "train", "val", "sources", "teacher dropped", "chars p5/p50/p95")
    for col in cols:
        tab.add_column(col, justify="left" if col in ("task", "sources", "chars p5/p50/p95") else "right")
    for task, d in summary["tasks"].items():
        c = d["chars"]
        tgt = d.get("target")
        tab.add_row(task, "-" if tgt is None else str(tgt), str(d.get("built", d["train"] + d["val"])),
                    str(d["train"]), str(d["val"]), ", ".join(f"{k} {v}" for k, v in d["sources"].items()),
                    str(d.get("teacher_dropped", 0)), f"{c.get('p5')}/{c.get('p50')}/{c.get('p95')}")
    tot = summary["total"]
    tab.add_row("total", "-" if tot.get("target") is None else str(tot["target"]), str(tot["train"] + tot["val"]),
                str(tot["train"]), str(tot["val"]), "", "", "")
    return tab


def removal_lines(summary: dict) -> list[str]:
    """One line per stage that removed something (for the console), then the teachers that made records."""
    lines = []
    for stage in ("cleaning", "dedup"):
        for task, c in summary[stage].items():
            if c:
                lines.append(f"{stage} {task}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    leak = summary["leakage"]
    if leak.get("applied"):
        lines.append(f"leakage guard ({leak['ngram']}-grams, {leak['reference_ngrams']} RSG n-grams): dropped "
                     + (", ".join(f"{t} {n}" for t, n in leak["dropped_per_task"].items()) or "nothing"))
    for job, c in summary["annotation"]["stats"].items():
        lines.append(f"annotation {job}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    texts = summary["annotation"].get("texts") or {}
    if texts.get("pool"):
        lines.append(f"raw texts: {texts['pool']} in the pool, used per job {texts.get('used', {})}, "
                     f"{texts.get('unused', 0)} unused")
    for t, d in summary["teachers"].items():
        commits = ", ".join(str(c) for c in d["commits"]) or "not loaded"
        lines.append(f"teacher {t}: {d['model']} (revision {d['revision'] or 'default'}; {commits})")
    if summary["problems"]["total"]:
        lines.append(f"bad records skipped: {summary['problems']['skipped_per_source']}")
    if summary["labels_dropped_by_map"]:
        lines.append(f"labels mapped to null (dropped on purpose): {summary['labels_dropped_by_map']}")
    return lines

