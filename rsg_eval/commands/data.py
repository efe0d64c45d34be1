"""`rsg data download` and `rsg data check`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rsg_eval.commands._common import RsgTyper, console, data_option, tasks_option

data_app = RsgTyper(help="Get and check the official RSG files.", no_args_is_help=True)


@data_app.command("download")
def download_cmd(
    tasks: Optional[List[str]] = tasks_option(),
    data_dir: Optional[Path] = typer.Option(None, "--data", help="Folder to put the data in (then pass the same "
                                            "--data to the other commands).",
                                            show_default="the download cache, $RSG_DATA_DIR or the user cache "
                                                         "folder"),
    force: bool = typer.Option(False, "--force", help="Download again even if the files are there."),
) -> None:
    """Download the official per-task zips, check their sha256 and extract them safely."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from rsg_eval.core.data import default_data_dir, download
    from rsg_eval.core.tasks import resolve_tasks

    names = resolve_tasks(tasks)
    target = data_dir or default_data_dir()
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console) as prog:
        bars: dict[str, int] = {}

        def on_progress(name: str, done: int, total: int | None) -> None:
            if name not in bars:
                bars[name] = prog.add_task(name, total=total)
            prog.update(bars[name], completed=done, total=total)

        download(names, target, force=force, on_progress=on_progress)
    console.print(f"RSG data ready in [bold]{target}[/]")


@data_app.command("check")
def check_cmd(
    data: Optional[str] = data_option(),
    tasks: Optional[List[str]] = tasks_option(),
) -> None:
    """Validate a data folder: parse every split and print tasks, splits and counts beside the official ones.

    Status: ok (the official record count), partial (fewer records, e.g. the bundled sample: exit status 0, such
    folders are fine to run on), other size (more records than the official files), or the problem (exit status 2).
    """
    from rich.table import Table

    from rsg_eval.core.data import check_folder, resolve_data
    from rsg_eval.core.tasks import resolve_tasks

    src = resolve_data(data)
    rows = check_folder(src, resolve_tasks(tasks))
    table = Table(title=f"RSG data: {src}")
    for col in ("task", "split", "records", "official", "items", "labelled", "status"):
        table.add_column(col, justify="right" if col in ("records", "official", "items", "labelled") else "left",
                         no_wrap=col in ("task", "split"))
    bad = partial = 0
    for r in rows:
        if r["error"] is not None:
            status = f"[red]{r['error']}[/]"
        elif r["status"] == "ok":
            status = "[green]ok[/]"
        else:
            status = f"[yellow]{r['status']}[/]"
        bad += r["error"] is not None
        partial += r["status"] == "partial"
        table.add_row(r["task"], r["split"], str(r["records"]), str(r["official"]), str(r["items"]),
                      str(r["labelled"]), status)
    console.print(table)
    if partial and not bad:
        console.print(f"[yellow]partial data[/]: {partial} of {len(rows)} splits hold fewer records than the "
                      "official files; scores on them are not comparable with the leaderboard's.", highlight=False)
    if any(r["task"] == "LiDiRus" and r["error"] is None and r["labelled"] for r in rows):
        # zeroshot/finetune report LiDiRus/val and LiDiRus/test while this table lists one split: say why.
        console.print("LiDiRus has one file (LiDiRus.jsonl), listed here as its test split; it carries gold "
                      "labels, so rsg zeroshot and rsg finetune also score it locally as LiDiRus/val from that "
                      "same file (the leaderboard scores its test predictions).", highlight=False)
    if bad:
        console.print(f"[red]{bad} problem(s)[/]")
        raise typer.Exit(2)  # bad input is exit status 2 everywhere (docs/bad-input.md)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
