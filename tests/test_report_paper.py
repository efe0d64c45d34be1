"""The paper's published numbers (rsg_eval/published/paper.yaml) and how reports show them: Table 3 cell by cell,
totals recomputed from the task scores, printed gains recomputed as (new - old) / old, gains per metric, and gains
only between comparable rows."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from rsg_eval.core import metrics
from rsg_eval.published import extras, parse_printed_gain, printed_decimals
from rsg_eval.report import make_report, write_report
from rsg_eval.report.load import load_published
from rsg_eval.core.tasks import TASK_NAMES
from _report_utils import all_tasks, row, write_run

# The paper's Table 3 as published (figures from ../shared/docs/PAPER_RESULTS.md), one list per printed row.
TABLE3 = [
    ["LiDiRus", "MCC", "0.367", "0.587", "+59.95 %"],
    ["RCB", "F1 / Acc", "0.381 / 0.447", "0.371 / 0.434", "-2.62 % / -2.91 %"],
    ["PARus", "Acc", "0.68", "0.876", "+28.82 %"],
    ["MuSeRC", "F1a / EM", "0.79 / 0.498", "0.924 / 0.771", "+16.96 % / +54.82 %"],
    ["TERRa", "Acc", "0.685", "0.875", "+27.74 %"],
    ["RUSSE", "Acc", "0.563", "0.641", "+13.85 %"],
    ["RWSD", "Acc", "0.338", "0.338", "0 %"],
    ["DaNetQA", "Acc", "0.513", "0.513", "0 %"],
    ["RuCoS", "F1 / EM", "0.34 / 0.325", "0.66 / 0.64", "+94.12 % / +96.92 %"],
]
TABLE3_HEAD = ["Task", "Metric(s)", "20_fredt5", "20_mfredt5_2bl", "Gain"]
PAPER_SOURCE = "rsg_eval/published/paper.yaml"


def _paper() -> dict:
    return {r.name: r for r in load_published("paper")}


def _md_table(md: str, title_start: str) -> list[list[str]]:
    """The rows of the Markdown table under the heading that starts with `title_start` (header row first)."""
    block = md.split("## " + title_start, 1)[1].split("\n\n", 2)[1]
    lines = [x for x in block.splitlines() if x.startswith("|") and not x.startswith("|---")]
    return [[c.strip() for c in x.strip("|").split(" | ")] for x in lines]


def test_task_scores_recompute_the_published_totals():
    paper = _paper()
    for name, want in (("20_fredt5", 0.504), ("20_mfredt5_2bln", 0.637)):
        run = paper[name]
        assert sorted(run.reported) == sorted(TASK_NAMES)
        tot = metrics.total({t: m["score"] for t, m in run.reported.items()})
        assert round(tot, 3) == want == run.reported_total
    # hand-worked: the two-metric tasks count as the mean of their two metrics
    assert metrics.total({t: m["score"] for t, m in paper["20_fredt5"].reported.items()}) == pytest.approx(
        (0.367 + (0.381 + 0.447) / 2 + 0.68 + (0.79 + 0.498) / 2 + 0.685 + 0.563 + 0.338 + 0.513
         + (0.34 + 0.325) / 2) / 9)
    assert metrics.total({t: m["score"] for t, m in paper["20_mfredt5_2bln"].reported.items()}) == pytest.approx(
        0.6367, abs=5e-5)
    # the totals-only rows carry no per-task cells
    assert all(not paper[n].reported for n in ("zero_fredt5", "zero_mfredt5", "20_mfredt5", "zero_mfredt5_2bln"))


def test_every_printed_gain_recomputes():
    paper = _paper()
    ex = extras(PAPER_SOURCE)
    t3 = ex["table3"]
    old, new = paper[t3["baseline"]], paper[t3["run"]]
    assert len(t3["gains"]) == 9
    from rsg_eval.core.tasks import get_task
    for task, printed in t3["gains"].items():
        names = get_task(task).metrics
        want = parse_printed_gain(printed)
        got = [(new.reported[task][m] - old.reported[task][m]) / old.reported[task][m] * 100 for m in names]
        assert [round(g, printed_decimals(printed)) for g in got] == pytest.approx(want, abs=1e-9), task
    assert parse_printed_gain("-2.62 % / -2.91 %") == [-2.62, -2.91] and printed_decimals("0 %") == 0
    # Table 2: whole percents against the baseline the paper names (same regime)
    assert ex["baselines"] == {"zero_mfredt5": "zero_fredt5", "zero_mfredt5_2bln": "zero_fredt5",
                               "20_mfredt5": "20_fredt5", "20_mfredt5_2bln": "20_fredt5"}
    for name, printed in ex["table2_gains"].items():
        b = paper[ex["baselines"][name]].reported_total
        assert round((paper[name].reported_total - b) / b * 100) == parse_printed_gain(printed)[0], name
    assert len(ex["table2_gains"]) == 4


def test_report_against_paper_alone_renders_table3_cell_by_cell(tmp_path):
    rep = make_report([], against=["paper"], n_boot=100)
    assert rep["published_only"] and rep["problems"] == []
    t3 = rep["paper_table3"]
    assert (t3["baseline"], t3["run"]) == ("20_fredt5", "20_mfredt5_2bln")
    paths = write_report(rep, tmp_path / "out", ("md", "html", "csv", "json"))
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    table = _md_table(md, "The paper's Table 3")
    assert table[0] == TABLE3_HEAD
    assert len(table) - 1 == len(TABLE3)
    for got, want in zip(table[1:], TABLE3):
        for g, w in zip(got, want):
            assert g == w, (got, want)
    # no per-task table of local runs (there are none); the inconsistencies are listed
    assert "## Per task (Table 3 style)" not in md
    assert "0.498 in Table 3 and 0.496" in md and "20_mfredt5_2bl in Table 3" in md and "20-shot" in md
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    for want in TABLE3:
        assert "".join(f'<td class="{"" if i < 2 else "num"}">{c}</td>' for i, c in enumerate(want)) in html
    assert "0.496 in the paper" in html
    # totals: the paper's own gains (Table 2) against the baseline it names, nothing against zero_fredt5
    tot = {r["name"]: t for r, t in zip(rep["runs"], rep["totals"])}
    assert tot["20_mfredt5_2bln"]["gain_vs"] == "20_fredt5"
    assert tot["20_mfredt5_2bln"]["gain"] == pytest.approx((0.637 - 0.504) / 0.504 * 100)
    assert tot["zero_mfredt5"]["gain"] == pytest.approx((0.506 - 0.432) / 0.432 * 100)
    assert tot["20_fredt5"]["gain"] is None and tot["zero_fredt5"]["gain"] is None
    totals = {r[0]: r for r in _md_table(md, "Totals")}
    assert totals["20_mfredt5_2bln"][3] == "+26.39% vs 20_fredt5" and totals["20_fredt5"][3] == "–"
    assert any(p.name == "scores.png" for p in paths)


def test_cli_against_paper_without_runs_is_torch_free(tmp_path):
    code = ("import sys\nfrom rsg_eval.cli import main\n"
            f"sys.argv = ['rsg', 'report', '--against', 'paper', '--out', {str(tmp_path / 'o')!r}, '--format', 'md']\n"
            "try:\n    main()\n    rc = 0\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "+16.96 % / +54.82 %" in p.stdout and "-2.62 % / -2.91 %" in p.stdout
    md = (tmp_path / "o" / "report.md").read_text(encoding="utf-8")
    assert _md_table(md, "The paper's Table 3")[1:] == TABLE3


def _rcb_rows(golds, preds):
    labs = ["entailment", "contradiction", "neutral"]
    return [row(i, i, g, p, labs) for i, (g, p) in enumerate(zip(golds, preds))]


def test_gains_per_metric_worked_by_hand(tmp_path):
    # RCB, six items. a: 3 right (acc 0.5); b: 4 right (acc 2/3). F1 = mean over the three classes.
    golds = ["entailment", "entailment", "contradiction", "contradiction", "neutral", "neutral"]
    pa = ["entailment", "contradiction", "contradiction", "entailment", "neutral", "entailment"]
    pb = ["entailment", "entailment", "contradiction", "entailment", "neutral", "contradiction"]
    a = write_run(tmp_path, "a", {"RCB": _rcb_rows(golds, pa)})
    b = write_run(tmp_path, "b", {"RCB": _rcb_rows(golds, pb)})
    rep = make_report([a, b], n_boot=100)
    ca, cb = rep["tasks"][0]["cells"]
    # a: entailment P 1/3 R 1/2 F 0.4; contradiction P 1/2 R 1/2 F 0.5; neutral P 1 R 1/2 F 2/3
    f1_a = (0.4 + 0.5 + 2 / 3) / 3
    # b: entailment P 2/3 R 1 F 0.8; contradiction P 1/2 R 1/2 F 0.5; neutral P 1 R 1/2 F 2/3
    f1_b = (0.8 + 0.5 + 2 / 3) / 3
    assert ca["metrics"]["f1"] == pytest.approx(f1_a) and cb["metrics"]["f1"] == pytest.approx(f1_b)
    assert cb["metric_gains"]["f1"] == pytest.approx((f1_b - f1_a) / f1_a * 100)
    assert cb["metric_gains"]["acc"] == pytest.approx((4 / 6 - 3 / 6) / (3 / 6) * 100)   # +33.33 %
    assert cb["gain"] == pytest.approx(((f1_b + 4 / 6) / 2 - (f1_a + 0.5) / 2) / ((f1_a + 0.5) / 2) * 100)
    md = (tmp_path / "o").joinpath("report.md")
    write_report(rep, tmp_path / "o", ("md", "csv"))
    text = md.read_text(encoding="utf-8")
    rows = _md_table(text, "Per task")
    metric_row = next(r for r in rows if r[0] == "RCB")
    assert metric_row[-1] == f"{(f1_b - f1_a) / f1_a * 100:+.2f}% / +33.33%"
    csv_rows = list(csv.DictReader(io.StringIO((tmp_path / "o" / "report.csv").read_text(encoding="utf-8"))))
    acc = next(r for r in csv_rows if r["run"] == "b" and r["metric"] == "acc")
    assert float(acc["gain_pct"]) == pytest.approx(100 / 3) and acc["gain_vs"] == "a"


def test_gains_only_between_comparable_rows(tmp_path):
    """Two local val runs and the paper: the published rows get no gain over the local reference (before, the
    totals table printed published test totals as +20.9 % ... over a tiny model's val score)."""
    a = write_run(tmp_path, "tiny-a", all_tasks(0.5, seed=0))
    b = write_run(tmp_path, "tiny-b", all_tasks(0.6, seed=1))
    rep = make_report([a, b], against=["paper"], n_boot=100)
    names = [r["name"] for r in rep["runs"]]
    tot = dict(zip(names, rep["totals"]))
    assert tot["tiny-b"]["gain_vs"] == "tiny-a"
    assert tot["tiny-b"]["gain"] == pytest.approx((tot["tiny-b"]["total"] - tot["tiny-a"]["total"])
                                                  / tot["tiny-a"]["total"] * 100)
    for n in ("zero_fredt5", "20_fredt5"):      # published rows the paper states no gain for
        assert tot[n]["gain"] is None
    assert tot["zero_mfredt5_2bln"]["gain_vs"] == "zero_fredt5"
    assert tot["20_mfredt5_2bln"]["gain_vs"] == "20_fredt5"
    # per task: the published cells gain only against their named baseline, never against the local run
    for tr in rep["tasks"]:
        cells = dict(zip(names, tr["cells"]))
        assert cells["20_fredt5"]["gain"] is None and cells["tiny-b"]["gain_vs"] == "tiny-a"
        assert cells["20_mfredt5_2bln"]["gain_vs"] == "20_fredt5"
    md_dir = tmp_path / "o"
    write_report(rep, md_dir, ("md",))
    md = (md_dir / "report.md").read_text(encoding="utf-8")
    totals = {r[0]: r for r in _md_table(md, "Totals")}
    assert totals["20_fredt5"][3] == "–" and totals["zero_fredt5"][3] == "–"
    assert totals["20_mfredt5_2bln"][3] == "+26.39% vs 20_fredt5"
    assert "%" in totals["tiny-b"][3] and "vs" not in totals["tiny-b"][3]
    assert any("gains compare comparable rows only" in p for p in rep["problems"])
    # Table 3 and the paper's notes come with the paper rows in any report
    assert _md_table(md, "The paper's Table 3")[1:] == TABLE3
    assert "## Inconsistencies inside the paper" in md


def test_a_wrong_printed_gain_is_flagged(monkeypatch):
    import rsg_eval.published as published

    real = published.extras

    def doctored(source):
        e = json.loads(json.dumps(real(source)))
        if e.get("table3"):
            e["table3"]["gains"]["TERRa"] = "+27.75 %"
            e["table2_gains"]["20_mfredt5_2bln"] = "+25 %"
        return e

    monkeypatch.setattr(published, "extras", doctored)
    rep = make_report([], against=["paper"], n_boot=100)
    assert any(p.startswith("Table 3 TERRa:") and "+27.75 %" in p for p in rep["problems"])
    assert any(p.startswith("Table 2 20_mfredt5_2bln:") for p in rep["problems"])
    assert len(rep["problems"]) == 2


def test_leaderboard_rows_gain_over_a_copied_test_score_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nsplit: test\ntotal: 0.6\n", encoding="utf-8")
    rep = make_report([f], against=["leaderboard", "paper"], n_boot=100)
    tot = {r["name"]: t for r, t in zip(rep["runs"], rep["totals"])}
    assert tot["human-benchmark"]["gain_vs"] == "mine"
    assert tot["human-benchmark"]["gain"] == pytest.approx((0.811 - 0.6) / 0.6 * 100)
    assert tot["20_mfredt5_2bln"]["gain_vs"] == "20_fredt5"     # the paper's rows keep the paper's own baseline
    assert tot["20_fredt5"]["gain_vs"] == "mine"
