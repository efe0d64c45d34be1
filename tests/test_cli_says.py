"""Commands say what they did: `rsg report` names the files where they are, `rsg finetune` prints its bar after
its task's evaluation lines and labels the loss both show (the `--nli-head` summary: tests/test_hmtl_nli.py)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _report_utils import all_tasks, write_run
from rsg_eval.cli import app

RSG = str(Path(sys.executable).parent / "rsg")


def test_report_lists_the_paths_it_wrote(tmp_path: Path) -> None:
    a = write_run(tmp_path, "a", all_tasks(0.7, seed=1, n=12),
                  epochs=[{"task": "TERRa", "epoch": 1, "step": 3, "train_loss": 2.0, "score": 0.5},
                          {"task": "TERRa", "epoch": 2, "step": 6, "train_loss": 1.5, "score": 0.6}])
    b = write_run(tmp_path, "b", all_tasks(0.6, seed=2, n=12))
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(out), "--bootstrap", "20", "-q"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("wrote "))
    m = re.fullmatch(r"wrote (\d+) files to (.+)/: (.+)", line)
    assert m and Path(m.group(2)) == out, line
    listed = m.group(3).split(", ")
    assert len(listed) == int(m.group(1))
    # Every name is the file's path under the output folder: the charts are in figures/, the reports beside it.
    assert all((out / name).is_file() for name in listed), listed
    assert {"figures/scores.png", "report.md", "report.html", "report.csv", "report.json"} <= set(listed)
    assert sorted(listed) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.mark.slow
def test_finetune_prints_bar_after_its_evaluations_with_one_labelled_loss(tmp_path: Path, warm_rsg: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["OMP_NUM_THREADS"] = "1"
    # piped, as in `rsg finetune ... > log.txt`: rich draws a bar only when it stops
    # a real process with its stdout a pipe (the warm server's fork: tests/_warm_rsg.py)
    proc = subprocess.run([str(warm_rsg / "rsg"), "finetune", "--model", "tiny", "--data", "sample", "--tasks", "TERRa", "RCB",
                           "--epochs", "2", "--root", str(tmp_path), "--run", "r", "--checkpoint-dir",
                           str(tmp_path / "ck")], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = list(csv.DictReader((tmp_path / "r" / "epochs.csv").open(encoding="utf-8")))
    label = "(mean over the steps since the previous evaluation)"

    def where(pattern: str) -> int:
        hits = [i for i, ln in enumerate(lines) if re.search(pattern, ln)]
        assert len(hits) == 1, (pattern, proc.stdout)
        return hits[0]

    previous_end = -1
    for task in ("RCB", "TERRa"):  # the order run_finetune trains them in
        steps = [r for r in rows if r["task"] == task]
        total = steps[-1]["step"]
        head = where(rf"^{task}: \d+ training examples, {total} optimizer steps")
        evals = [where(rf"^  {task} epoch {r['epoch']} step {r['step']}: train loss {float(r['train_loss']):.4f} "
                       rf"{re.escape(label)}, val ") for r in steps]
        bar = where(rf"^{task} .* {total}/{total} ")
        best = where(rf"^  {task}: best val score")
        # header, evaluation lines, the task's bar, its best epoch; then the next task
        assert previous_end < head < evals[0] < evals[-1] < bar < best, proc.stdout
        previous_end = best
        # the bar shows the same quantity under the same label: at the end, the last evaluation's train loss
        assert f"train loss {float(steps[-1]['train_loss']):.4f} {label}" in lines[bar]
    assert previous_end < where(r"val metrics, best epoch per task")
