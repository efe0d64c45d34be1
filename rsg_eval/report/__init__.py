"""`rsg report`: compare runs task by task with bootstrap intervals and paired tests (torch-free).

    from rsg_eval.report import make_report, write_report
    report = make_report(["submissions/a", "submissions/b"], against=["paper"], seed=0, n_boot=1000)
    write_report(report, "reports/a-vs-b", formats=("md", "html", "csv", "json"))

`make_report` returns a JSON-able dict (see build.py); `write_report` writes report.md / .html / .csv /
.json and figures/*.png into the folder, atomically, and returns the paths written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from rsg_eval.core.errors import RSGError

FORMATS = ("md", "html", "csv", "json")


def load_runs(specs: Sequence[str | Path], *, against: Iterable[str] = (), split: str = "val"
              ) -> tuple[list, list[str]]:
    """Load every RUN (folder or score file) and the `against` sets; unreadable ones become problems."""
    from rsg_eval.report.load import DamagedRun, load_any

    runs, problems = [], []
    first_ok, said_expected = True, False
    for i, spec in enumerate(specs):
        try:
            runs += load_any(spec, split)
        except DamagedRun:  # a run that exists but cannot be read: an error, never a silent skip
            raise
        except RSGError as exc:  # a bad RUN is skipped: the report shows what can be compared
            problems.append(f"skipped {spec}: {exc}")
            said_expected = said_expected or exc.expected is not None
            first_ok = first_ok and i > 0
    for spec in against:  # a typo in --against is an error, not a silent skip
        runs += load_any(spec, split, against=True)
    if not runs:
        # what a RUN may be, said once: not after a problem that already says what was expected
        raise RSGError("nothing to report: " + "; ".join(problems or ["no runs given"]),
                       expected=None if said_expected else "run folders written by `rsg zeroshot`/`rsg finetune`, "
                                                           "score files (.yaml/.json), or --against paper|leaderboard")
    if not first_ok:
        problems.append(f"the first run could not be read: {runs[0].name} is the reference")
    return runs, problems


def make_report(specs: Sequence[str | Path], *, against: Iterable[str] = (), split: str = "val", seed: int = 0,
                n_boot: int = 1000, n_examples: int = 5) -> dict:
    """Load the runs and compute the report (first run = reference)."""
    from rsg_eval.report.build import build_report

    if n_boot < 10:
        raise RSGError(f"--bootstrap {n_boot} is too few replicates", field="--bootstrap", expected="at least 10")
    runs, problems = load_runs(specs, against=against, split=split)
    return build_report(runs, seed=seed, n_boot=n_boot, n_examples=n_examples, problems=problems)


def parse_formats(text: str | Sequence[str]) -> list[str]:
    parts = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in parts if p not in FORMATS]
    if bad or not parts:
        raise RSGError(f"unknown format {bad[0]!r}" if bad else "no format given", field="--format",
                       expected=FORMATS)
    return parts


def write_report(report: dict, out: str | Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the report files and its PNG charts into `out`; returns the paths written."""
    from rsg_eval.core.io import atomic_write_bytes, atomic_write_text
    from rsg_eval.report import render
    from rsg_eval.report.charts import make_charts

    out = Path(out)
    charts = make_charts(report) if ("md" in formats or "html" in formats) else {}
    written = [atomic_write_bytes(out / "figures" / f"{name}.png", png) for name, png in charts.items()]
    figures = {name: f"figures/{name}.png" for name in charts}
    if "md" in formats:
        written.append(atomic_write_text(out / "report.md", render.to_markdown(report, figures)))
    if "html" in formats:
        from rsg_eval.report.html import to_html

        written.append(atomic_write_text(out / "report.html", to_html(report, charts)))
    if "csv" in formats:
        written.append(atomic_write_text(out / "report.csv", render.to_csv(report)))
    if "json" in formats:
        written.append(atomic_write_text(out / "report.json", render.to_json(report)))
    return written
