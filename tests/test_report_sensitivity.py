"""`rsg report`'s prompt sensitivity section on hand-made multi-template run folders (no model): the numbers per
template and over templates, the paired comparison over templates with its sign test, and every output format."""

from __future__ import annotations

import csv
import io
import json

import pytest

from rsg_eval.report import make_report, write_report
from rsg_eval.runs import RunFolder, log_row
from rsg_eval.core.data import load_items


def _run(root, name: str, right: dict[str, int]) -> None:
    """A multi-template run folder whose TERRa template `t` gets the first right[t] of the 6 val items right."""
    items = load_items("sample", "TERRa", "val")
    other = {"entailment": "not_entailment", "not_entailment": "entailment"}
    for t, k in right.items():
        preds = {it.key: (it.gold if i < k else other[it.gold]) for i, it in enumerate(items)}
        rows = [log_row(it, preds[it.key], prompt="p", choices=["Да", "Нет"], scores=[0.0, 0.0]) for it in items]
        RunFolder(root / name / "templates" / "TERRa" / t).write_task("TERRa", "val", items, preds, rows, "fp")
    first = next(iter(right))
    top = RunFolder(root / name)
    preds = {it.key: (it.gold if i < right[first] else other[it.gold]) for i, it in enumerate(items)}
    top.write_task("TERRa", "val", items, preds,
                   [log_row(it, preds[it.key], prompt="p", choices=["Да", "Нет"], scores=[0.0, 0.0]) for it in items],
                   "fp")
    top.write_config({"kind": "zeroshot", "model": "tiny", "template_set": "all", "select": "default",
                      "variants": {"TERRa": list(right)}, "calibrate": False})
    top.write_metrics("val")


def test_section_numbers_comparison_and_formats(tmp_path):
    _run(tmp_path, "a", {"yesno": 3, "cloze": 4, "dialogue": 2})
    _run(tmp_path, "b", {"yesno": 4, "cloze": 5, "dialogue": 2, "extra": 6})
    (tmp_path / "b" / "templates" / "TERRa" / "extra").rename(tmp_path / "b" / "templates" / "TERRa" / "x")
    report = make_report([tmp_path / "a", tmp_path / "b"], n_boot=100)
    ps = report["prompt_sensitivity"]
    assert [r["run"] for r in ps["runs"]] == ["a", "b"]
    a = ps["runs"][0]["tasks"]["TERRa"]["columns"]["uncalibrated"]
    assert {n: x["score"] for n, x in a["templates"].items()} == {"yesno": 0.5, "cloze": 4 / 6, "dialogue": 2 / 6}
    s = a["summary"]
    # scores 3/6, 4/6, 2/6: mean 0.5, deviations 0, 1/6, -1/6 -> sd = sqrt((2/36) / 2) = 1/6
    assert s["mean"] == pytest.approx(0.5) and s["sd"] == pytest.approx(1 / 6)
    assert s["best"] == "cloze" and s["worst"] == "dialogue" and s["range"] == pytest.approx(2 / 6)
    # b's config lists "extra", whose folder is gone, and "x" is a folder its config does not list: neither is
    # read, so b compares with a on the three templates both scored
    comp = ps["comparisons"][0]
    c = comp["tasks"]["TERRa"]
    assert comp["run"] == "b" and comp["reference"] == "a" and c["templates"] == ["yesno", "cloze", "dialogue"]
    assert c["diffs"] == pytest.approx({"yesno": 1 / 6, "cloze": 1 / 6, "dialogue": 0.0})
    assert not c["every_template"] and c["sign_test"]["n_pos"] == 2 and c["sign_test"]["n_zero"] == 1
    assert c["sign_test"]["p"] == pytest.approx(0.5)  # 2 up, 0 down: 2 * 1/4
    out = tmp_path / "rep"
    written = write_report(report, out)
    assert (out / "figures" / "prompts.png").stat().st_size > 1000 and out / "report.md" in written
    md = (out / "report.md").read_text()
    assert "## Prompt sensitivity: a (val, uncalibrated)" in md and "## Gain over templates: b vs a" in md
    assert "| TERRa | 3 | 0.500 | 0.167 | 0.333 | 0.667 | cloze | dialogue |" in md
    assert "sign test" in md and "2/0, p = 0.5" in md and "![prompts](figures/prompts.png)" in md
    html = (out / "report.html").read_text()
    assert "Prompt sensitivity: a" in html and "Gain over templates" in html
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    got = {(r["run"], r["metric"]): float(r["value"]) for r in rows if r["metric"].startswith("template")}
    assert got[("a", "template:cloze")] == pytest.approx(4 / 6) and got[("a", "templates:sd")] == pytest.approx(1 / 6)
    data = json.loads((out / "report.json").read_text())
    assert data["prompt_sensitivity"]["comparisons"][0]["tasks"]["TERRa"]["sign_test"]["n_pos"] == 2


def test_one_template_runs_have_no_section(tmp_path):
    _run(tmp_path, "a", {"yesno": 3})
    import shutil

    shutil.rmtree(tmp_path / "a" / "templates")
    report = make_report([tmp_path / "a"], n_boot=20)
    assert report["prompt_sensitivity"]["runs"] == []
    write_report(report, tmp_path / "rep", formats=["md"])
    assert "Prompt sensitivity" not in (tmp_path / "rep" / "report.md").read_text()
