"""`rsg submit check ZIP` and `rsg submit zip FOLDER`: leaderboard zips."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rsg_eval.commands._common import RsgTyper, console, data_option, tasks_option

submit_app = RsgTyper(help="Build and validate leaderboard submission zips.", no_args_is_help=True)


@submit_app.command("check")
def check_cmd(
    zip_path: Path = typer.Argument(..., metavar="ZIP", help="The submission zip (or a folder of <Task>.jsonl files)."),
    data: Optional[str] = data_option(),
    tasks: Optional[List[str]] = tasks_option("Only check these tasks (names or comma-separated).", "all nine"),
    max_problems: int = typer.Option(50, "--max-problems", help="How many problems to print."),
) -> None:
    """Validate a zip against the test files: every test idx once, no extras, exact labels, MuSeRC ids.

    Exit status 2 when there is a problem; warnings (accepted spellings, RuCoS labels that are no entity) are
    printed and do not fail the check."""
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.submission import check_zip
    from rsg_eval.core.tasks import TASK_NAMES, resolve_tasks

    src = resolve_data(data)
    names = resolve_tasks(tasks) if tasks else list(TASK_NAMES)
    found = check_zip(zip_path, src, names)
    problems = [p for p in found if p.level == "error"]
    warnings = [p for p in found if p.level != "error"]
    skipped = [t for t in names if not src.has(t, "test")]
    if skipped:
        console.print(f"[yellow]not checked (no test file in {src}): {', '.join(skipped)}[/]")
    for w in warnings:
        console.print(f"[yellow]![/] {w}", highlight=False, soft_wrap=True)
    if problems:
        for p in problems[:max_problems]:
            console.print(f"[red]✗[/] {p}", highlight=False, soft_wrap=True)
        more = len(problems) - max_problems
        console.print(f"[red bold]{len(problems)} problem(s)[/]" + (f" ({more} not shown)" if more > 0 else ""))
        if not tasks:
            _hint_partial(zip_path, [t for t in names if t not in skipped])
        raise typer.Exit(2)  # a user error, like every other bad input (docs/bad-input.md)
    checked = [t for t in names if t not in skipped]
    note = f" ({len(warnings)} warning(s) above)" if warnings else ""
    console.print(f"[green]✓ {zip_path}: valid for {', '.join(checked)}[/]{note}")


def _hint_partial(zip_path: Path, expected: List[str]) -> None:
    """A zip that holds only some tasks (a partial run) fails for every missing one: say how to check just the
    tasks it holds, and that the leaderboard wants all nine."""
    from rsg_eval.core.errors import RSGError
    from rsg_eval.core.submission import read_submission_texts

    try:
        held = set(read_submission_texts(zip_path))
    except RSGError:
        return
    present = [t for t in expected if t in held]
    missing = [t for t in expected if t not in held]
    if present and missing:
        console.print(f"hint: the zip holds {len(present)} of {len(expected)} tasks; to check only those, add "
                      f"--tasks {','.join(present)} (an upload to the leaderboard needs all nine)", highlight=False)


@submit_app.command("zip")
def zip_cmd(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="A folder of <Task>.jsonl files (e.g. a run's predictions/test)."),
    out: Path = typer.Option(..., "--out", "-o", help="The zip to write."),
) -> None:
    """Zip <Task>.jsonl files as submission/<Task>.jsonl, the official sample's layout."""
    from rsg_eval.core.submission import write_zip

    write_zip(folder, out)
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(submit_app, name="submit")
