"""`rsg report` on small run folders written as docs/design.md fixes them: numbers, formats, bad input."""

from __future__ import annotations

import csv
import html.parser
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rsg_eval.core import metrics
from rsg_eval.core.errors import RSGError
from rsg_eval.report import make_report, parse_formats, write_report
from rsg_eval.report.load import load_published, load_score_file
from rsg_eval.core.tasks import TASK_NAMES
from _report_utils import all_tasks, make_rows, row, write_run

NLI = ["entailment", "not_entailment"]
REPO = Path(__file__).resolve().parents[1]


def _terra_rows(n_right: int, n: int = 40, prompt: str = "") -> list[dict]:
    out = []
    for i in range(n):
        gold = NLI[i % 2]
        pred = gold if i < n_right else NLI[1 - i % 2]
        out.append(row(i, i, gold, pred, NLI, prompt or f"Посылка {i}. Гипотеза {i}?"))
    return out


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path, "base", all_tasks(0.55, seed=0), epochs=[
        {"task": "TERRa", "epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "acc": 0.5 + e / 20, "score": 0.5 + e / 20}
        for e in (1, 2, 3)])
    b = write_run(tmp_path, "better", all_tasks(0.9, seed=1), config={"template": "alt"})
    return a, b


def test_task_scores_gains_and_totals_match_metrics(two_runs):
    a, b = two_runs
    rep = make_report([a, b], n_boot=200)
    assert [r["name"] for r in rep["runs"]] == ["base", "better"]
    assert rep["reference"] == "base"
    scores = {}
    for tr in rep["tasks"]:
        ca, cb = tr["cells"]
        rows_a = [json.loads(x) for x in (a / "logs" / "val" / f"{tr['task']}.jsonl").read_text().splitlines()]
        expect = metrics.score(tr["task"], [r["gold"] for r in rows_a], [r["pred"] for r in rows_a],
                               groups=[r["group"] for r in rows_a])
        assert ca["score"] == expect["score"]
        assert ca["metrics"] == {m: expect[m] for m in tr["metrics"]}
        assert ca["ci"][0] <= ca["score"] <= ca["ci"][1]
        assert cb["gain"] == pytest.approx((cb["score"] - ca["score"]) / abs(ca["score"]) * 100)
        scores[tr["task"]] = (ca["score"], cb["score"])
    tot_a, tot_b = rep["totals"]
    assert tot_a["total"] == pytest.approx(sum(s[0] for s in scores.values()) / 9)
    assert tot_b["total"] == pytest.approx(sum(s[1] for s in scores.values()) / 9)
    assert tot_a["total_ci"][0] < tot_a["total"] < tot_a["total_ci"][1]
    # 55% against 90% right on the same 9 x 40 items: the total gain is significant
    assert tot_b["paired"]["significant"] and tot_b["paired"]["diff"] == pytest.approx(tot_b["total"] - tot_a["total"])
    assert rep["common_tasks"] == []  # every run has all nine: no separate "common" mean


def test_hand_worked_terra_gain_and_significance(tmp_path):
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(20)})   # 0.5
    b = write_run(tmp_path, "b", {"TERRa": _terra_rows(38)})   # 0.95
    c = write_run(tmp_path, "c", {"TERRa": _terra_rows(20)})   # identical to a
    rep = make_report([a, b, c], n_boot=500)
    ca, cb, cc = rep["tasks"][0]["cells"]
    assert (ca["score"], cb["score"]) == (0.5, 0.95)
    assert cb["gain"] == pytest.approx(90.0)
    assert cb["paired"]["significant"] and cb["paired"]["p"] < 0.01
    # McNemar cross-check: 18 items only b gets right, none only a: p = 2 * 2^-18
    assert cb["paired"]["mcnemar"] == {"only_ref_right": 0, "only_run_right": 18, "p": 2 / 2 ** 18}
    assert cc["gain"] == 0.0 and cc["paired"]["p"] == 1.0 and not cc["paired"]["significant"]
    md = write_and_read(rep, tmp_path / "out", "md")["report.md"]
    assert "+90.00% *" in md and "+0.00% *" not in md


def write_and_read(rep: dict, out: Path, fmts: str) -> dict[str, str]:
    paths = write_report(rep, out, parse_formats(fmts))
    return {p.name: p.read_text(encoding="utf-8") for p in paths if p.suffix != ".png"}


def test_same_seed_gives_the_same_report_bytes(two_runs, tmp_path):
    a, b = two_runs
    files = []
    for i, seed in enumerate((3, 3, 4)):
        rep = make_report([a, b], seed=seed, n_boot=200)
        out = tmp_path / f"r{i}"
        write_report(rep, out, ("md", "html", "csv", "json"))
        files.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert files[0] == files[1]
    assert set(files[0]) == {"report.md", "report.html", "report.csv", "report.json", "figures/scores.png",
                             "figures/epochs.png"}
    assert files[0]["report.json"] != files[2]["report.json"]  # another seed moves the intervals


def test_html_is_self_contained_and_escapes_user_text(tmp_path):
    evil = '<script>alert("x")</script> & <img src="http://example.com/a.png">'
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(20, prompt=evil)})
    b = write_run(tmp_path, "b<i>", {"TERRa": _terra_rows(30, prompt=evil)})
    page = write_and_read(make_report([a, b], n_boot=100), tmp_path / "out", "html")["report.html"]

    class Collect(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[str] = []
            self.links: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.links += [v for k, v in attrs if k in ("src", "href") and v]

    p = Collect()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags
    assert p.links and all(x.startswith("data:image/png;base64,") for x in p.links)
    assert "&lt;script&gt;" in page and "b&lt;i&gt;" in page
    assert page.count("<img") == 1  # the chart; the prompt's <img> is text


def test_csv_long_format(two_runs, tmp_path):
    a, b = two_runs
    rep = make_report([a, b], n_boot=100)
    text = write_and_read(rep, tmp_path / "out", "csv")["report.csv"]
    rows = list(csv.DictReader(io.StringIO(text)))
    rcb = {(r["run"], r["metric"]): r for r in rows if r["task"] == "RCB"}
    assert set(rcb) == {(n, m) for n in ("base", "better") for m in ("f1", "acc", "score")}
    cell = rep["tasks"][1]["cells"][1]
    assert float(rcb[("better", "score")]["value"]) == cell["score"]
    assert float(rcb[("better", "score")]["gain_pct"]) == pytest.approx(cell["gain"])
    assert rcb[("better", "score")]["numbers"] == "val, local"
    assert [r["run"] for r in rows if r["task"] == "total"] == ["base", "better"]


def test_against_paper_and_leaderboard(two_runs, tmp_path):
    a, _ = two_runs
    rep = make_report([a], against=["paper", "leaderboard"], n_boot=100)
    names = [r["name"] for r in rep["runs"]]
    assert names[:3] == ["base", "zero_fredt5", "20_fredt5"] and "human-benchmark" in names
    tot = {r["name"]: t for r, t in zip(rep["runs"], rep["totals"])}
    assert tot["20_mfredt5_2bln"]["total"] == 0.637 and tot["20_mfredt5_2bln"]["total_ci"] is None
    assert tot["human-benchmark"]["total"] == 0.811 and tot["tfidf-baseline"]["total"] == 0.434  # as printed
    assert tot["xlm-roberta-large"]["total"] == pytest.approx(0.6537, abs=1e-4)  # no printed total: recomputed
    # published rows are no columns of the per-task table; they are rows of the leaderboard layout
    assert rep["task_columns"] == [0]
    where = {r["name"]: r["where"] for r in rep["runs"]}
    assert where["base"] == "val, local" and where["human-benchmark"] == "test, published"
    md = write_and_read(rep, tmp_path / "o", "md")["report.md"]
    assert "Published reference rows are in the leaderboard-layout table" in md
    board = md.split("## Leaderboard layout")[1].split("##")[0]
    assert "| human-benchmark | test, published | 0.811 | 0.626 | 0.680 / 0.702 |" in board
    assert "| zero_fredt5 | test, published | 0.432 | n/p |" in board


def test_published_numbers_are_shipped():
    paper = {r.name: r.reported_total for r in load_published("paper")}
    assert paper == {"zero_fredt5": 0.432, "20_fredt5": 0.504, "zero_mfredt5": 0.506, "20_mfredt5": 0.518,
                     "zero_mfredt5_2bln": 0.551, "20_mfredt5_2bln": 0.637}
    lb = {r.name: r for r in load_published("leaderboard")}
    human = lb["human-benchmark"]
    assert human.reported["RCB"] == {"f1": 0.68, "acc": 0.702, "score": pytest.approx(0.691)}
    assert human.reported["LiDiRus"] == {"mcc": 0.626, "score": 0.626}
    for run in lb.values():  # every printed total agrees with the nine task scores to the site's rounding
        if run.reported_total is not None:
            assert metrics.total({t: m["score"] for t, m in run.reported.items()}) == pytest.approx(
                run.reported_total, abs=1.5e-3)


def test_user_score_file(tmp_path, two_runs):
    a, _ = two_runs
    f = tmp_path / "mine.yaml"
    f.write_text("name: my-test\nsplit: test\ntasks:\n  terra: 0.7\n  RCB: '0.417 / 0.484'\n"
                 "  MuSeRC: {f1a: 0.729, em: 0.333}\n", encoding="utf-8")
    [run] = load_score_file(f)
    assert run.reported["TERRa"]["score"] == 0.7
    assert run.reported["RCB"] == {"f1": 0.417, "acc": 0.484, "score": pytest.approx(0.4505)}
    rep = make_report([a, f], n_boot=100)
    cell = {tr["task"]: tr["cells"][1] for tr in rep["tasks"]}
    assert cell["TERRa"]["score"] == 0.7 and cell["TERRa"]["ci"] is None and cell["TERRa"]["paired"] is None
    assert cell["PARus"]["status"] == "missing"
    assert rep["runs"][1]["where"] == "test, leaderboard"
    assert "my-test: no results for LiDiRus, PARus, RUSSE, RWSD, DaNetQA, RuCoS (marked missing)" in rep["problems"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  TERRa: 62.6\n", encoding="utf-8")
    with pytest.raises(RSGError, match="outside"):
        load_score_file(bad)
    bad.write_text("tasks:\n  TERA: 0.6\n", encoding="utf-8")
    with pytest.raises(RSGError, match="unknown task"):
        load_score_file(bad)


def test_bad_input_still_renders_what_can_be_compared(tmp_path):
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(20), "RCB": make_rows("RCB", 20, 0.5)})
    b = write_run(tmp_path, "b", {"TERRa": _terra_rows(30)})                       # no RCB
    c = write_run(tmp_path, "c", {"TERRa": _terra_rows(25)}, split="test")        # another split
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    rep = make_report([a, b, junk, tmp_path / "nope", c], n_boot=100)
    text = "\n".join(rep["problems"])
    assert "not a run folder" in text and "no such run folder" in text
    assert "b: no results for RCB (marked missing)" in text
    assert [r["name"] for r in rep["runs"]] == ["a", "b", "c"]
    rcb = next(t for t in rep["tasks"] if t["task"] == "RCB")
    assert [c_["status"] for c_ in rcb["cells"]] == ["ok", "missing", "missing"]
    assert "c: no scored val results (it has logs for: test)" in text
    terra = next(t for t in rep["tasks"] if t["task"] == "TERRa")
    assert terra["cells"][1]["paired"] is not None and terra["cells"][2]["status"] == "missing"
    # totals need all nine tasks; the mean over the tasks every run has is given instead
    assert rep["totals"][0]["total"] is None and rep["common_tasks"] == ["TERRa"]
    assert rep["totals"][1]["common_paired"]["significant"]
    md = write_and_read(rep, tmp_path / "o", "md,html")["report.md"]
    assert "| missing |" in md and "Mean of 1 common tasks" in md
    assert "the first run could not be read" not in text
    rep = make_report([junk, a], n_boot=50)
    assert rep["reference"] == "a" and "the first run could not be read: a is the reference" in rep["problems"]
    with pytest.raises(RSGError, match="nothing to report"):
        make_report([junk])
    with pytest.raises(RSGError, match="unknown reference 'papr'"):
        make_report([a], against=["papr"])


def test_different_splits_are_not_paired_nor_compared(tmp_path):
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(20)})
    f = tmp_path / "lb.json"
    f.write_text(json.dumps({"name": "lb", "tasks": {"TERRa": 0.9}}), encoding="utf-8")
    rep = make_report([a, f], n_boot=100)
    cell = rep["tasks"][0]["cells"][1]
    # a leaderboard test score over a local val score is no gain (it was +80 % before)
    assert cell["paired"] is None and cell["gain"] is None and cell["gain_vs"] is None
    # two score files of leaderboard numbers compare with each other
    g = tmp_path / "lb2.json"
    g.write_text(json.dumps({"name": "lb2", "tasks": {"TERRa": 0.45}}), encoding="utf-8")
    rep = make_report([g, f], n_boot=100)
    assert rep["tasks"][0]["cells"][1]["gain"] == pytest.approx(100.0)


def test_looking_inside(tmp_path):
    rows_a = make_rows("LiDiRus", 60, 0.6, seed=0)
    rows_b = make_rows("LiDiRus", 60, 0.8, seed=1)
    terra_a, terra_b = _terra_rows(20), _terra_rows(30)
    a = write_run(tmp_path, "a", {"LiDiRus": rows_a, "TERRa": terra_a}, config={"template": "t1"})
    b = write_run(tmp_path, "b", {"LiDiRus": rows_b, "TERRa": terra_b}, config={"template": "t2"})
    rep = make_report([a, b], n_boot=100, n_examples=3)
    # LiDiRus diagnostics recomputed from the logged tags equal metrics.lidirus_diagnostics
    from rsg_eval.runs import item_from_row
    items = [item_from_row("LiDiRus", "val", r) for r in rows_a]
    expect = metrics.lidirus_diagnostics(items, {r["key"]: r["pred"] for r in rows_a})
    assert rep["diagnostics"]["a"] == expect and "logic/Negation" in expect
    # confusion matrix of TERRa for b: gold alternates; items 0..29 right, 30..39 wrong (5 of each gold)
    cm = rep["confusion"]["TERRa"]["b"]
    assert cm == {"labels": NLI, "matrix": [[15, 5], [5, 15]]}
    # disagreements: a and b differ exactly on items 20..29
    [d] = rep["disagreements"]["TERRa"]
    assert (d["run"], d["n_disagree"], d["n_shared"], len(d["examples"])) == ("b", 10, 40, 3)
    assert all(20 <= e["key"] < 30 and e["run_right"] and not e["ref_right"] for e in d["examples"])
    # same model, two templates: the spread across templates
    [spread] = rep["template_spread"]
    assert spread["model"] == "tiny (zeroshot)"
    t = next(x for x in spread["tasks"] if x["task"] == "TERRa")
    assert (t["min"], t["max"], t["spread"], t["best_template"]) == (0.5, 0.75, 0.25, "t2")


def test_cli_writes_every_format(two_runs, tmp_path):
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    a, b = two_runs
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["report", str(a), str(b), "--out", str(out), "--bootstrap", "100",
                                   "--against", "paper", "--format", "md,csv"])
    assert res.exit_code == 0, res.output
    assert "Per task (Table 3 style)" in res.output and "20_mfredt5_2bln" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.csv", "report.md"]


def _rsg(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`rsg ARGS` in a fresh interpreter that fails if anything imported torch."""
    code = ("import sys\nfrom rsg_eval.cli import main\nsys.argv = ['rsg'] + %r\n"
            "try:\n    main()\n    rc = 0\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n") % (args,)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)


def test_format_option_is_checked():
    assert parse_formats("md, HTML") == ["md", "html"]
    with pytest.raises(RSGError, match="unknown format 'pdf'"):
        parse_formats("md,pdf")


def test_cli_stays_torch_free_and_errors_exit_2(tmp_path):
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(20)})
    p = _rsg(["report", str(a), "--out", str(tmp_path / "o"), "--bootstrap", "50", "--format", "md,html", "-q"],
             tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "report.html").is_file()
    junk = tmp_path / "junk"
    junk.mkdir()
    p = _rsg(["report", str(junk)], tmp_path)
    assert p.returncode == 2 and "not a run folder" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("data", ["sample", "shared"])
def test_report_on_real_tiny_zeroshot_runs(tmp_path, data, request):
    """Two real `rsg zeroshot` runs (tiny model; bundled sample data, or ../shared/rsg when present) end to end."""
    zeroshot = pytest.importorskip("rsg_eval.eval.zeroshot")
    import torch

    from rsg_eval.models.loading import load_model

    # the official MuSeRC passages are long: the shared data gets the short tasks only
    source, limit, tasks = "sample", None, ["TERRa", "MuSeRC"]
    if data == "shared":
        source, limit, tasks = str(request.getfixturevalue("shared_rsg")), 12, ["TERRa", "RCB"]
    torch.set_num_threads(1)
    loaded = load_model("tiny")
    folders = []
    for norm in ("sum", "token"):
        opts = zeroshot.ZeroShotOptions(model="tiny", data=source, tasks=tasks, limit=limit,
                                        run=str(tmp_path / f"tiny-{norm}"), normalize=norm)
        zeroshot.run_zeroshot(opts, show_progress=False, loaded=loaded)
        folders.append(tmp_path / f"tiny-{norm}")
    rep = make_report(folders, against=["paper"], n_boot=200)
    for r, folder in enumerate(folders):
        saved = json.loads((folder / "metrics.json").read_text())["tasks"]
        for tr in rep["tasks"]:
            if tr["task"] in tasks:
                assert tr["cells"][r]["score"] == pytest.approx(saved[tr["task"]]["score"], abs=1e-12)
            else:  # the paper's Table 3 rows bring the other tasks; the local runs miss them
                assert tr["cells"][r]["status"] == "missing"
    assert [t["task"] for t in rep["tasks"]] == list(TASK_NAMES)
    if "MuSeRC" in tasks:  # resampled by question: fewer groups than answers, the same in both runs
        muserc = next(t for t in rep["tasks"] if t["task"] == "MuSeRC")
        rows = [json.loads(x) for x in (folders[0] / "logs" / "val" / "MuSeRC.jsonl").read_text().splitlines()]
        assert muserc["cells"][0]["groups"] == len({x["group"] for x in rows}) < len(rows)
        assert muserc["cells"][1]["paired"]["n_groups"] == muserc["cells"][0]["groups"]
    files = write_and_read(rep, tmp_path / "out", "md,html,csv,json")
    assert "tiny-token (val, local)" in files["report.md"] and "20_mfredt5_2bln" in files["report.html"]


def test_runs_on_different_data_are_never_paired(tmp_path):
    """Issue 10 item 8: the same idx in two runs whose data differ (sample vs an edited copy) are different
    examples. Real tiny zero-shot runs record each task split's data sha256; the report shows them side by side,
    says why, and pairs nothing (no test, no disagreement sample)."""
    zeroshot = pytest.importorskip("rsg_eval.eval.zeroshot")
    import shutil

    import torch

    from rsg_eval.core.data import SAMPLE_DIR
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("tiny")
    other = tmp_path / "other-data"
    shutil.copytree(SAMPLE_DIR, other)
    val = other / "TERRa" / "val.jsonl"
    recs = [json.loads(x) for x in val.read_text(encoding="utf-8-sig").splitlines() if x.strip()]
    for r in recs:  # same idx and gold labels, other sentences
        r["premise"] = "Совсем другая посылка " + str(r["idx"]) + "."
    val.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    folders = []
    for name, data in (("on-sample", "sample"), ("on-other", str(other))):
        zeroshot.run_zeroshot(zeroshot.ZeroShotOptions(model="tiny", data=data, tasks=["TERRa", "RCB"],
                                                       run=str(tmp_path / name)), show_progress=False, loaded=loaded)
        folders.append(tmp_path / name)
    rep = make_report(folders, n_boot=50)
    cells = {t["task"]: t["cells"][1] for t in rep["tasks"]}
    assert cells["TERRa"]["paired"] is None and cells["TERRa"]["score"] is not None
    assert cells["RCB"]["paired"] is not None  # RCB's data is the same file: paired as before
    text = "\n".join(rep["problems"])
    assert "TERRa: on-other and the reference were scored on different data (data sha256" in text
    assert "shown side by side, not paired" in text and "TERRa" not in rep["disagreements"]
    # Runs that record no data fingerprint (older ones, or copied logs): gold labels that disagree on shared
    # examples tell the same story.
    a = write_run(tmp_path / "syn", "a", {"TERRa": _terra_rows(30)})
    flipped = [dict(r, gold=NLI[1 - NLI.index(r["gold"])]) if i < 5 else r for i, r in enumerate(_terra_rows(30))]
    b = write_run(tmp_path / "syn", "b", {"TERRa": flipped})
    rep = make_report([a, b], n_boot=50)
    assert rep["tasks"][0]["cells"][1]["paired"] is None
    assert any("disagree on the gold label of 5 of 40 shared examples" in p for p in rep["problems"])


def test_a_damaged_run_is_rebuilt_from_its_logs_or_an_error(tmp_path):
    """A corrupt metrics.json: rebuilt from the logs (named in the report), never the run skipped with exit 0;
    with nothing to rebuild from, or a corrupt config.json, `rsg report` exits 2 naming the file."""
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(30)})
    b = write_run(tmp_path, "b", {"TERRa": _terra_rows(20)})
    (b / "metrics.json").write_text('{"split": "val", "tasks": {', encoding="utf-8")
    rep = make_report([a, b], n_boot=50)
    assert [r["name"] for r in rep["runs"]] == ["a", "b"]
    assert rep["tasks"][0]["cells"][1]["score"] == pytest.approx(0.5)
    assert any("metrics.json is damaged" in p and "rebuilt from the logs" in p for p in rep["problems"])
    import shutil

    shutil.rmtree(b / "logs")
    p = _rsg(["report", str(a), str(b), "-o", str(tmp_path / "o")], tmp_path)
    assert p.returncode == 2 and "metrics.json" in p.stderr and "no logs to rebuild it from" in p.stderr
    assert "Traceback" not in p.stderr
    (a / "config.json").write_text("{", encoding="utf-8")
    with pytest.raises(RSGError, match="config.json.*settings are unknown"):
        make_report([a], n_boot=50)


def test_a_run_folder_s_stale_or_damaged_task_is_left_out(tmp_path):
    """Only results of the folder's one configuration reach a report: a stale state (other settings) and a
    truncated log are named and left out, and metrics.json's number for them is not used either."""
    from rsg_eval.runs import RunFolder, log_row
    from rsg_eval.core.tasks import Item

    def items(task, labels, golds):
        return [Item(task, "val", k, k, k, {}, labels, g, {}) for k, g in enumerate(golds)]

    run = RunFolder(tmp_path / "r")
    terra = items("TERRa", tuple(NLI), NLI * 3)
    rcb = items("RCB", ("entailment", "contradiction", "neutral"), ["neutral"] * 4)
    with run.claim("zeroshot", {"model": "m"}):
        for its in (terra, rcb):
            preds = {it.key: it.gold for it in its}
            run.write_task(its[0].task, "val", its, preds, [log_row(it, preds[it.key]) for it in its], "fp")
        run.write_metrics("val")
    log = run.logs_path("RCB", "val")
    log.write_bytes(log.read_bytes().splitlines(keepends=True)[0])
    rep = make_report([run.path], n_boot=50)
    assert [t["task"] for t in rep["tasks"]] == ["TERRa"]
    assert any("RCB/val: logs/val/RCB.jsonl does not match its state" in p for p in rep["problems"])


def test_no_gain_between_runs_on_different_data_in_all_four_outputs(tmp_path):
    """Issue 23 item 1: TERRa was scored on other examples in run b (its data sha256 differs), RCB on the same. No
    Δ, no test and no gain for TERRa nor for the totals that include it, in Markdown, HTML, CSV and JSON alike;
    RCB keeps its gain (hand-checked below)."""
    tasks_a = {"TERRa": make_rows("TERRa", 40, 0.5), "RCB": make_rows("RCB", 40, 0.5)}
    tasks_b = {"TERRa": make_rows("TERRa", 40, 0.9, seed=1), "RCB": make_rows("RCB", 40, 0.9, seed=1)}
    a = write_run(tmp_path, "a", tasks_a)
    b = write_run(tmp_path, "b", tasks_b)
    for folder, terra in ((a, "1" * 64), (b, "2" * 64)):
        m = json.loads((folder / "metrics.json").read_text())
        m["data_sha256"] = {"TERRa": terra, "RCB": "3" * 64}
        (folder / "metrics.json").write_text(json.dumps(m), encoding="utf-8")
    rep = make_report([a, b], n_boot=50)
    cells = {t["task"]: t["cells"] for t in rep["tasks"]}
    terra, rcb = cells["TERRa"][1], cells["RCB"][1]
    assert terra["no_gain"] == "different data" and terra["gain"] is None and terra["paired"] is None
    assert all(g is None for g in terra["metric_gains"].values())
    want = (rcb["score"] - cells["RCB"][0]["score"]) / cells["RCB"][0]["score"] * 100
    assert rcb["no_gain"] is None and rcb["gain"] == pytest.approx(want) and rcb["paired"] is not None
    tot = rep["totals"][1]
    assert tot["gain"] is None and tot["paired"] is None and tot["no_gain"] == "different data (TERRa)"

    files = write_and_read(rep, tmp_path / "out", "md,html,csv,json")
    md_rows = {ln.split("|")[1].strip(): ln for ln in files["report.md"].splitlines()
               if ln.startswith("| TERRa") or ln.startswith("| a ") or ln.startswith("| b ")}
    assert "no Δ: different data" in md_rows["TERRa"] and "%" not in md_rows["TERRa"]
    assert "no Δ: different data (TERRa)" in md_rows["b"] and "%" not in md_rows["b"].split("|", 4)[4]
    assert "no Δ: different data" in files["report.html"]
    assert "%" not in next(ln for ln in files["report.html"].splitlines() if "no Δ: different data (TERRa)" in ln)
    csv_rows = list(csv.DictReader(io.StringIO(files["report.csv"])))
    b_terra = [r for r in csv_rows if r["run"] == "b" and r["task"] == "TERRa"]
    assert b_terra and all(r["gain_pct"] == "" and r["p_value"] == "" and r["significant"] == ""
                           and r["no_gain"] == "different data" for r in b_terra)
    b_total = next(r for r in csv_rows if r["run"] == "b" and r["task"] == "total")
    assert b_total["gain_pct"] == "" and b_total["no_gain"] == "different data (TERRa)"
    assert next(r for r in csv_rows if r["run"] == "b" and r["task"] == "RCB" and r["metric"] == "score")["gain_pct"]
    js = json.loads(files["report.json"])
    assert js["tasks"][[t["task"] for t in js["tasks"]].index("TERRa")]["cells"][1]["no_gain"] == "different data"
    assert js["totals"][1]["gain"] is None and js["totals"][1]["no_gain"] == "different data (TERRa)"


def test_runs_table_names_templates_the_same_way_for_zero_shot_and_fine_tuned_runs(tmp_path):
    """Issue 23 item 7: a zero-shot run (template "default" + per-task names) and a fine-tuned run (a per-task
    mapping) that used the same default templates both read "default"; a non-default one is named."""
    from rsg_eval.core.prompts import list_templates

    names = list_templates()
    default = {t: names[t][0] for t in ("RCB", "TERRa")}
    rows = {"TERRa": _terra_rows(30)}
    zs = write_run(tmp_path, "zs", rows, config={"kind": "zeroshot", "template": "default", "templates": default})
    ft = write_run(tmp_path, "ft", rows, config={"kind": "finetune", "template": dict(default)})
    other = write_run(tmp_path, "ft2", rows, config={"kind": "finetune",
                                                    "template": {**default, "RCB": names["RCB"][1]}})
    one = write_run(tmp_path, "zs2", rows, config={"template": "mine.yaml", "templates": {"TERRa": "mine"}})
    rep = make_report([zs, ft, other, one], n_boot=20)
    assert [r["template"] for r in rep["runs"]] == ["default", "default", f"default; RCB: {names['RCB'][1]}",
                                                    "mine.yaml"]
    md = write_and_read(rep, tmp_path / "out", "md")["report.md"]
    assert "| zs | val, local | zeroshot | tiny | default |" in md
    assert "| ft | val, local | finetune | tiny | default |" in md


def test_html_renders_inline_code_instead_of_backticks(tmp_path):
    """Issue 23 item 7: notes written with `code` spans (for Markdown and the terminal) show as <code> on the page,
    escaped; the page has no literal backtick left, the Markdown keeps them."""
    from rsg_eval.report.html import inline_code

    assert str(inline_code("run `rsg submit zip` <now>")) == "run <code>rsg submit zip</code> &lt;now&gt;"
    assert str(inline_code("a ` alone")) == "a ` alone"
    assert str(inline_code("`<b>`")) == "<code>&lt;b&gt;</code>"
    a = write_run(tmp_path, "a", {"TERRa": _terra_rows(20)})
    b = write_run(tmp_path, "b", {"TERRa": _terra_rows(30)})
    rep = make_report([a, b], n_boot=20)
    rep["problems"].append("b: see `rsg prompts show TERRa` for <the> template")
    files = write_and_read(rep, tmp_path / "out", "md,html")
    page = files["report.html"]
    assert "<li>b: see <code>rsg prompts show TERRa</code> for &lt;the&gt; template</li>" in page
    assert "`" not in page
    assert "`rsg prompts show TERRa`" in files["report.md"]
