"""`rsg report RUN [RUN ...]`: the paper's tables from your runs, with bootstrap intervals and paired tests.

Torch-free: reports read only run-folder files (docs/design.md) and score files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from rsg_eval.commands._common import quiet_option


def _default_out(runs: list[str], against: list[str]) -> Path:
    names = [Path(r).stem if Path(r).suffix else Path(r).name for r in runs] + list(against)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "-vs-".join(n for n in names if n)).strip("-")[:80] or "report"
    return Path("reports") / slug


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report_cmd(
        runs: Optional[List[str]] = typer.Argument(None, metavar="RUN", help="Run folders (the first is the "
                                                   "reference) or score files (.yaml/.json with leaderboard numbers). "
                                                   "None with "
                                                   "--against paper: the paper's own Tables 1-3."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder.",
                                           show_default="reports/<run names joined by -vs->"),
        formats: str = typer.Option("md,html,csv,json", "--format", help="Comma-separated: md, html, csv, json."),
        against: List[str] = typer.Option([], "--against", help="Add published reference rows: paper, "
                                          "leaderboard, or a score file. Repeatable.", show_default="none"),
        split: str = typer.Option("val", "--split", help="Data split whose logs in the run folders are scored "
                                                         "(val: the test split has no public labels)."),
        seed: int = typer.Option(0, "--seed", help="Bootstrap seed (same seed, same report)."),
        bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap replicates."),
        examples: int = typer.Option(5, "--examples", help="Disagreement examples per task and run."),
        quiet: bool = quiet_option("Do not print the tables (the files are written all the same)."),
    ) -> None:
        """Compare runs task by task: metrics, 95% bootstrap intervals, gains over the first run with paired
        tests, totals, charts, LiDiRus diagnostics, confusion matrices and disagreements."""
        from rsg_eval.commands._common import make_console
        from rsg_eval.report import make_report, parse_formats, write_report
        from rsg_eval.report.render import print_rich

        fmts = parse_formats(formats)
        runs = list(runs or [])
        report = make_report(runs, against=against, split=split, seed=seed, n_boot=bootstrap, n_examples=examples)
        console = make_console()
        if not quiet:
            print_rich(report, console)
        folder = out or _default_out(runs, against)
        paths = write_report(report, folder, fmts)
        # each path as it lies under the folder: the charts are in figures/, not next to report.md
        shown = [str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p) for p in paths]
        console.print(f"wrote {len(paths)} files to {folder}/: " + ", ".join(shown), highlight=False, soft_wrap=True)
