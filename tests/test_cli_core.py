"""The light commands end to end through the real entry point (a subprocess, as a user runs them)."""

import json
import shutil
import subprocess
import sys

import pytest

from rsg_eval.core.submission import write_task_file, write_zip
from rsg_eval.core.tasks import TASK_NAMES
from rsg_eval.core.data import load_items


def rsg(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rsg_eval", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_help_lists_commands():
    out = rsg("--help")
    assert out.returncode == 0
    for cmd in ("data", "score", "submit"):
        assert cmd in out.stdout


def test_score_sample_predictions_and_json(tmp_path):
    folder = tmp_path / "pred"
    for t in TASK_NAMES:
        items = load_items("sample", t, "val")
        write_task_file(folder, t, items, {it.key: it.gold if t != "RuCoS" else it.gold[0] for it in items})
    out = rsg("score", folder, "--data", "sample", "--json", tmp_path / "m.json")
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["total"] == pytest.approx(1.0)  # gold predictions score 1 everywhere
    assert set(res["tasks"]) == set(TASK_NAMES)


def test_score_tfidf_reference(shared_rsg, tmp_path):
    shutil.copy(shared_rsg / "reference" / "tfidf_val_RCB.jsonl", tmp_path / "RCB.jsonl")
    out = rsg("score", tmp_path, "--data", shared_rsg, "--json", tmp_path / "m.json")
    assert out.returncode == 0, out.stderr
    assert "0.5136" in out.stdout and "0.3673" in out.stdout
    assert round(json.loads((tmp_path / "m.json").read_text())["tasks"]["RCB"]["acc"], 10) == 0.5136363636


def test_bad_input_gives_one_clear_line(tmp_path):
    (tmp_path / "TERRa.jsonl").write_text('{"idx": 0, "label": "maybe"}\n')
    out = rsg("score", tmp_path, "--data", "sample")
    assert out.returncode == 2
    assert "TERRa.jsonl:1" in out.stderr and "invalid label 'maybe'" in out.stderr
    assert "Traceback" not in out.stderr
    out = rsg("data", "check", "--data", "sample", "--tasks", "rte")
    assert out.returncode == 2 and "unknown task 'rte'" in out.stderr and "DaNetQA" in out.stderr


def test_submit_check_and_zip(tmp_path):
    folder = tmp_path / "pred"
    for t in TASK_NAMES:
        items = load_items("sample", t, "test")
        write_task_file(folder, t, items, {it.key: it.labels[0] for it in items})
    out = rsg("submit", "zip", folder, "--out", tmp_path / "s.zip")
    assert out.returncode == 0, out.stderr
    ok = rsg("submit", "check", tmp_path / "s.zip", "--data", "sample")
    assert ok.returncode == 0 and "valid" in ok.stdout
    (folder / "PARus.jsonl").write_text('{"idx": 0, "label": "0"}\n')
    write_zip(folder, tmp_path / "bad.zip")
    bad = rsg("submit", "check", tmp_path / "bad.zip", "--data", "sample")
    assert bad.returncode == 2  # a bad submission is bad input: exit status 2, like everywhere
    assert "PARus.jsonl:1" in bad.stdout and "invalid label '0'" in bad.stdout
    assert "4 test items have no prediction" in bad.stdout


def test_data_check_sample():
    out = rsg("data", "check", "--data", "sample")
    assert out.returncode == 0 and "RuCoS" in out.stdout


def test_usage_errors_exit_2_without_traceback():
    out = rsg("score")
    assert out.returncode == 2 and "Missing argument" in (out.stderr + out.stdout)
    assert "Traceback" not in out.stderr
