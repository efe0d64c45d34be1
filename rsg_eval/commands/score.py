"""`rsg score PRED --data DIR [--split val]`: leaderboard metrics for prediction files."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rsg_eval.commands._common import console, data_option, fmt, tasks_option


def score_predictions(pred: Path, data: object, split: str = "val", task: str | None = None,
                      tasks: list[str] | None = None) -> dict:
    """Score leaderboard-format predictions against a split: {"tasks": {T: metrics}, "total", "missing"}."""
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.errors import RSGError
    from rsg_eval.core.metrics import lidirus_diagnostics, score_items, total
    from rsg_eval.core.submission import parse_lines, read_predictions, read_submission_texts
    from rsg_eval.core.tasks import get_task, resolve_tasks
    from rsg_eval.core.data import load_items

    src = resolve_data(data)
    if task is not None:
        texts = {get_task(task).name: None}
    else:
        texts = read_submission_texts(pred)
    wanted = resolve_tasks(tasks) if tasks else None
    out: dict = {"split": split, "data": str(src), "tasks": {}, "missing": {}}
    for name in texts:
        if wanted and name not in wanted:
            continue
        if texts[name] is None:
            preds = read_predictions(pred, name)
        else:
            preds = parse_lines(name, texts[name][1], texts[name][0])
        sp = "test" if name == "LiDiRus" else split
        items = load_items(src, name, sp)
        extra = set(preds) - {it.key for it in items}
        if extra:
            raise RSGError(f"{name}: {len(extra)} predicted ids are not in the {sp} split (e.g. {sorted(extra)[:5]})",
                           file=pred, field="idx", expected=f"ids of {name}/{sp}.jsonl")
        out["tasks"][name] = score_items(name, items, preds)
        out["missing"][name] = sum(1 for it in items if it.key not in preds)
        if name == "LiDiRus":
            out["lidirus_diagnostics"] = lidirus_diagnostics(items, preds)
    out["total"] = total({t: m["score"] for t, m in out["tasks"].items()})
    return out


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score_cmd(
        pred: Path = typer.Argument(..., metavar="PREDICTIONS", help="Predictions in leaderboard line format: a "
                                    "folder of <Task>.jsonl, a zip, or one .jsonl file."),
        data: Optional[str] = data_option(),
        split: str = typer.Option("val", "--split", help="Data split the predictions are for: val or train "
                                                         "(test has no public labels)."),
        task: Optional[str] = typer.Option(None, "--task", help="Task of a single .jsonl file whose name "
                                                                "does not say it.", show_default="from the file name"),
        tasks: Optional[List[str]] = tasks_option("Only these tasks (names or comma-separated).",
                                                  "every task in PREDICTIONS"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics as JSON here.",
                                                show_default="not written"),
        diagnostics: bool = typer.Option(False, "--diagnostics", help="Show LiDiRus MCC per category."),
    ) -> None:
        """Compute the leaderboard's metrics locally and the total (when all nine tasks are there)."""
        from rich.table import Table

        from rsg_eval.core.io import atomic_write_json
        from rsg_eval.core.tasks import TASK_NAMES, get_task

        res = score_predictions(pred, data, split, task, tasks)
        table = Table(title=f"{pred} on {split} ({res['data']})")
        table.add_column("task")
        table.add_column("metrics")
        table.add_column("score", justify="right")
        table.add_column("missing", justify="right")
        for name in TASK_NAMES:
            if name in res["tasks"]:
                m = res["tasks"][name]
                ms = " / ".join(f"{k} {m[k]:.4f}" for k in get_task(name).metrics)
                table.add_row(name, ms, f"{m['score']:.4f}", str(res["missing"][name] or ""))
        table.add_row("[bold]total[/]", "mean of the nine task scores" if res["total"] is not None
                      else f"needs all nine tasks ({len(res['tasks'])} here)", fmt(res["total"], 4), "")
        console.print(table)
        if any(res["missing"].values()):
            console.print("[yellow]items without a prediction are counted wrong[/]")
        if diagnostics and "lidirus_diagnostics" in res:
            dt = Table(title="LiDiRus MCC per diagnostic category")
            dt.add_column("category")
            dt.add_column("n", justify="right")
            dt.add_column("MCC", justify="right")
            for cat, v in res["lidirus_diagnostics"].items():
                dt.add_row(cat, str(v["n"]), f"{v['mcc']:.4f}")
            console.print(dt)
        if json_out:
            atomic_write_json(json_out, res)
            console.print(f"wrote {json_out}")
