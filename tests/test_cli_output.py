"""Light commands say what they did: piped output keeps whole names, `rsg data check` explains LiDiRus's one
split, `rsg submit check` on a partial zip says how to check only the tasks it holds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

RSG = str(Path(sys.executable).parent / "rsg")


def _rsg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    # stdout is a pipe here, as in `rsg ... | less` or `> log.txt`; COLUMNS unset, as in most pipes and CI.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([RSG, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_piped_tables_keep_whole_names() -> None:
    proc = _rsg("prompts", "list")
    assert proc.returncode == 0, proc.stderr
    # Rich used to lay the table out for 80 columns off a terminal, wrapping or cutting this description.
    assert "Да/нет: верно ли утверждение, если верен текст" in proc.stdout
    # no cell cut short: rich ends a cut cell with "…" before its border (some descriptions quote "…" themselves)
    assert not re.search(r"…\s*[│┃]", proc.stdout)


def test_make_console_is_wide_off_a_terminal_and_respects_columns(monkeypatch) -> None:
    from rich.table import Table

    from rsg_eval.commands import _common

    monkeypatch.delenv("COLUMNS", raising=False)
    con = _common.make_console()
    assert not con.is_terminal and con.width == _common.PIPE_WIDTH
    name = "RuCoS-like inputs, 16 documents of 417 tokens with 15 candidate entities each (shared prefix)"
    t = Table()
    t.add_column("inputs")
    t.add_column("docs/s")
    t.add_row(name, "6.22")
    with con.capture() as cap:
        con.print(t)
    assert name in cap.get()
    monkeypatch.setenv("COLUMNS", "100")
    assert _common.make_console().width == 100


def test_data_check_says_lidirus_val_is_scored_from_the_same_file() -> None:
    proc = _rsg("data", "check", "--data", "sample", "--tasks", "LiDiRus")
    assert proc.returncode == 0, proc.stderr
    assert "│ LiDiRus │ test" in proc.stdout
    assert "also score it locally as LiDiRus/val from that same file" in proc.stdout
    # Without LiDiRus there is nothing to explain.
    assert "LiDiRus/val" not in _rsg("data", "check", "--data", "sample", "--tasks", "TERRa").stdout


def test_submit_check_on_a_partial_zip_hints_at_tasks(tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "TERRa.jsonl").write_text(
        "".join(json.dumps({"idx": i, "label": "entailment"}) + "\n" for i in range(5)), encoding="utf-8")
    assert _rsg("submit", "zip", str(preds), "--out", str(tmp_path / "p.zip")).returncode == 0
    proc = _rsg("submit", "check", str(tmp_path / "p.zip"), "--data", "sample")
    assert proc.returncode == 2  # a bad submission is bad input: exit status 2
    assert "missing RCB.jsonl" in proc.stdout
    assert "hint: the zip holds 1 of 9 tasks; to check only those, add --tasks TERRa" in proc.stdout
    # The hint's command works as written.
    ok = _rsg("submit", "check", str(tmp_path / "p.zip"), "--data", "sample", "--tasks", "TERRa")
    assert ok.returncode == 0 and "valid for TERRa" in ok.stdout
    assert "hint" not in ok.stdout


def test_submit_check_gives_no_hint_for_a_complete_but_wrong_zip(tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "TERRa.jsonl").write_text(json.dumps({"idx": 0, "label": "entailment"}) + "\n", encoding="utf-8")
    assert _rsg("submit", "zip", str(preds), "--out", str(tmp_path / "p.zip")).returncode == 0
    proc = _rsg("submit", "check", str(tmp_path / "p.zip"), "--data", "sample", "--tasks", "TERRa")
    assert proc.returncode == 2 and "4 test items have no prediction" in proc.stdout
    assert "hint" not in proc.stdout
