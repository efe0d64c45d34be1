"""Small shared CLI helpers (light: rich and typer only)."""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.console import Console

# Rich lays output out for 80 columns when it does not write to a terminal, so a table piped to a file or `less`
# cuts names ("RuCoS-li…"). Off a terminal we give it this wide virtual width instead: tables still take only
# the room they need, and names print whole. A terminal keeps its own width; COLUMNS, when set, wins.
PIPE_WIDTH = 240


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console for command output: the terminal's width, or PIPE_WIDTH when piped or redirected."""
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return probe
    return Console(stderr=stderr, width=PIPE_WIDTH)


console = make_console()
err_console = make_console(stderr=True)

DATA_HELP = "RSG data: a folder like the official download (or a zip of it), 'sample' for the bundled sample; " \
            "default: the download cache ($RSG_DATA_DIR)."


def data_option(default: Optional[str] = None) -> typer.models.OptionInfo:
    return typer.Option(default, "--data", help=DATA_HELP)


def tasks_option() -> typer.models.OptionInfo:
    return typer.Option(None, "--tasks", "-t", help="Tasks (names or comma-separated; default all nine).")


def fmt(x: object, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def print_zip(z: object, hint: str = "") -> None:
    """Say where a run's leaderboard zip is (runs.ZipResult), or which tasks a partial one lacks."""
    if z is None or getattr(z, "path", None) is None:
        return
    if z.complete:
        console.print(f"leaderboard zip: [bold green]{z.path}[/] (all nine tasks)")
    else:
        console.print(f"[yellow]partial zip[/] {z.path}: {len(z.tasks)} of 9 tasks; missing "
                      f"{', '.join(z.missing)}{hint}")
