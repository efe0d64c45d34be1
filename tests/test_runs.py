"""Run folders (rsg_eval.runs): layout, atomic per-task results, resume marks, metrics from logs, the zip."""

from __future__ import annotations

import datetime as dt
import json
import zipfile

import pytest

from rsg_eval import runs
from rsg_eval.core import submission
from rsg_eval.core.errors import RSGError
from rsg_eval.runs import RunFolder, default_run_name, fingerprint, log_row
from rsg_eval.core.tasks import TASK_NAMES, Item
from rsg_eval.core.data import load_items


def _items(task: str, split: str, labels: tuple, golds: list, groups: list | None = None, meta=None) -> list[Item]:
    groups = groups or list(range(len(golds)))
    return [Item(task, split, k, groups[k], groups[k], {}, labels, g, (meta or {}).get(k, {}))
            for k, g in enumerate(golds)]


def _write(run: RunFolder, items: list[Item], preds: dict, fp: str = "fp") -> None:
    rows = [log_row(it, preds.get(it.key), prompt=f"p{it.key}", choices=["a"] * len(it.labels),
                    scores=[0.0] * len(it.labels)) for it in items]
    run.write_task(items[0].task, items[0].split, items, preds, rows, fp, parts={"model": "m"})


def test_default_run_name_is_deterministic_and_safe():
    day = dt.date(2026, 11, 28)
    assert default_run_name("ai-forever/FRED-T5-1.7B", date=day) == "fred-t5-1.7b-zeroshot-20261128"
    assert default_run_name("/tmp/My Model/", "finetune", tags=["yesno", ""], date=day) == \
        "my-model-finetune-yesno-20261128"


def test_fingerprint_tracks_every_part():
    a = fingerprint({"model": "m", "template": "x", "limit": None})
    assert a == fingerprint({"limit": None, "template": "x", "model": "m"})  # key order does not matter
    assert a != fingerprint({"model": "m", "template": "y", "limit": None})
    assert a != fingerprint({"model": "m", "template": "x", "limit": 5})


def test_create_names_folder_under_root_and_open_checks(tmp_path):
    run = RunFolder.create(model="ai-forever/FRED-T5-1.7B", root=tmp_path)
    assert run.path.parent == tmp_path and run.path.name.startswith("fred-t5-1.7b-zeroshot-")
    with pytest.raises(RSGError, match="no config.json"):
        RunFolder.open(run.path)
    run.write_config({"kind": "zeroshot", "tasks": ("TERRa",)})
    assert RunFolder.open(run.path).read_config() == {"kind": "zeroshot", "tasks": ["TERRa"]}
    explicit = RunFolder.create(str(tmp_path / "elsewhere" / "r1"))
    assert explicit.path == tmp_path / "elsewhere" / "r1" and explicit.path.is_dir()
    with pytest.raises(RSGError, match="not found"):
        RunFolder.open(tmp_path / "nope")


def test_write_task_round_trip_and_resume_marks(tmp_path):
    run = RunFolder.create("r", root=tmp_path)
    items = _items("RWSD", "test", (False, True), [None, None, None])
    preds = {0: True, 1: False, 2: False}
    _write(run, items, preds, fp="abc")
    # Leaderboard spelling on disk, canonical values back.
    lines = [json.loads(x) for x in run.predictions_path("RWSD", "test").read_text().splitlines()]
    assert lines == [{"idx": 0, "label": "True"}, {"idx": 1, "label": "False"}, {"idx": 2, "label": "False"}]
    assert run.read_predictions("rwsd", "test") == preds
    logs = run.read_logs("RWSD", "test")
    assert [r["pred"] for r in logs] == [True, False, False] and logs[0]["prompt"] == "p0"
    assert logs[0]["labels"] == [False, True] and logs[0]["gold"] is None
    assert run.is_done("RWSD", "test", "abc") and not run.is_done("RWSD", "test", "other")
    assert not run.is_done("RWSD", "val", "abc")
    assert run.finished("test") == ["RWSD"]
    assert run.read_state("RWSD", "test")["n_items"] == 3
    # A missing prediction file means not done, whatever the state says.
    run.predictions_path("RWSD", "test").unlink()
    assert not run.is_done("RWSD", "test", "abc")


def test_interrupted_rewrite_leaves_task_unfinished(tmp_path, monkeypatch):
    run = RunFolder.create("r", root=tmp_path)
    items = _items("TERRa", "val", ("entailment", "not_entailment"), ["entailment", "not_entailment"])
    _write(run, items, {0: "entailment", 1: "entailment"}, fp="old")
    assert run.is_done("TERRa", "val", "old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.folder, "atomic_write_jsonl", boom)  # die after predictions, before logs/state
    with pytest.raises(KeyboardInterrupt):
        _write(run, items, {0: "not_entailment", 1: "not_entailment"}, fp="new")
    assert not run.is_done("TERRa", "val", "old") and not run.is_done("TERRa", "val", "new")
    assert run.finished("val") == []  # half-written results never count in metrics


def test_write_task_refuses_missing_predictions(tmp_path):
    run = RunFolder.create("r", root=tmp_path)
    items = _items("TERRa", "val", ("entailment", "not_entailment"), ["entailment", "entailment"])
    with pytest.raises(ValueError, match="no prediction"):
        _write(run, items, {0: "entailment"})
    assert not run.state_path("TERRa", "val").exists()


def test_metrics_recomputed_from_logs_by_hand(tmp_path):
    run = RunFolder.create("r", root=tmp_path)
    nli = ("entailment", "not_entailment")
    # TERRa: 2 of 3 right.
    _write(run, _items("TERRa", "val", nli, ["entailment", "not_entailment", "entailment"]),
           {0: "entailment", 1: "not_entailment", 2: "not_entailment"})
    # MuSeRC: answers 0,1 in question 0 (both right), 2,3 in question 1 (one wrong).
    # F1a: gold positives {1,3}, predicted {1,2,3}: P 2/3, R 1 -> 0.8; EM 1/2.
    _write(run, _items("MuSeRC", "val", (0, 1), [0, 1, 0, 1], groups=[0, 0, 1, 1]), {0: 0, 1: 1, 2: 1, 3: 1})
    # LiDiRus: perfect on 4 items -> MCC 1; diagnostics for the tagged items.
    meta = {0: {"logic": "Negation"}, 1: {"logic": "Negation"}}
    _write(run, _items("LiDiRus", "val", nli, ["entailment", "not_entailment"] * 2, meta=meta),
           {0: "entailment", 1: "not_entailment", 2: "entailment", 3: "not_entailment"})
    m = run.write_metrics("val")
    assert m["tasks"]["TERRa"] == {"acc": pytest.approx(2 / 3), "score": pytest.approx(2 / 3)}
    assert m["tasks"]["MuSeRC"]["f1a"] == pytest.approx(0.8) and m["tasks"]["MuSeRC"]["em"] == 0.5
    assert m["tasks"]["MuSeRC"]["score"] == pytest.approx(0.65)
    assert m["tasks"]["LiDiRus"]["mcc"] == pytest.approx(1.0)
    assert m["lidirus_diagnostics"]["logic"]["n"] == 2 and m["lidirus_diagnostics"]["logic"]["mcc"] == 1.0
    assert m["total"] is None and m["counts"] == {"LiDiRus": 4, "MuSeRC": 4, "TERRa": 3}
    assert run.read_metrics() == json.loads(run.metrics_path.read_text())


def test_total_is_mean_of_nine(tmp_path):
    run = RunFolder.create("r", root=tmp_path)
    for t in TASK_NAMES:
        if t == "RuCoS":
            items = [Item(t, "val", 0, 0, 0, {}, ("Москва", "Казань"), ("Москва",), {})]
            preds = {0: "Москва"}  # F1 1, EM 1
        elif t == "MuSeRC":
            items = _items(t, "val", (0, 1), [1, 0], groups=[0, 0])
            preds = {0: 1, 1: 0}
        elif t in ("TERRa", "LiDiRus"):
            items = _items(t, "val", ("entailment", "not_entailment"), ["entailment", "not_entailment"])
            preds = {0: "entailment", 1: "not_entailment"}
        elif t == "RCB":
            items = _items(t, "val", ("entailment", "contradiction", "neutral"),
                           ["entailment", "contradiction", "neutral", "neutral"])
            preds = {0: "entailment", 1: "contradiction", 2: "neutral", 3: "entailment"}  # acc .75
        elif t == "PARus":
            items = _items(t, "val", (0, 1), [0, 1])
            preds = {0: 0, 1: 1}
        else:
            items = _items(t, "val", (False, True), [True, False])
            preds = {0: True, 1: True}  # acc .5
        _write(run, items, preds)
    m = run.compute_metrics("val")
    # RCB: F1 per class entailment 2/3, contradiction 1, neutral 2/3 -> macro 7/9; score (7/9 + .75)/2.
    rcb = (7 / 9 + 0.75) / 2
    assert m["tasks"]["RCB"]["score"] == pytest.approx(rcb)
    expected = (1 + rcb + 1 + 1 + 1 + 0.5 + 0.5 + 0.5 + 1) / 9
    assert m["total"] == pytest.approx(expected)


def test_zip_partial_then_complete_passes_validator(tmp_path):
    run = RunFolder.create("r", root=tmp_path)
    assert run.build_zip().path is None
    for i, t in enumerate(TASK_NAMES):
        items = load_items("sample", t, "test")
        preds = {it.key: it.labels[0] for it in items}
        _write(run, items, preds)
        res = run.build_zip()
        if i < len(TASK_NAMES) - 1:
            assert res.path.name == "submission-partial.zip" and not res.complete
            assert res.tasks == TASK_NAMES[: i + 1] and res.missing == TASK_NAMES[i + 1:]
            assert not (run.path / "submission.zip").exists()
    assert res.complete and res.path == run.path / "submission.zip"
    assert not (run.path / "submission-partial.zip").exists()
    assert submission.check_zip(res.path, "sample") == []
    with zipfile.ZipFile(res.path) as zf:
        assert sorted(zf.namelist()) == sorted(f"submission/{t}.jsonl" for t in TASK_NAMES)
    # a task being redone (its state removed first): the old complete zip must not stay around to upload
    run.state_path("RuCoS", "test").unlink()
    res = run.build_zip()
    assert not res.complete and not (run.path / "submission.zip").exists()


def test_epochs_csv_round_trip(tmp_path):
    run = RunFolder.create("r", root=tmp_path)
    rows = [{"task": "TERRa", "epoch": 1, "step": 10, "train_loss": 0.5, "acc": 0.6, "score": 0.6},
            {"task": "TERRa", "epoch": 2, "step": 20, "train_loss": 0.25, "acc": 0.7, "score": 0.7}]
    run.write_epochs(rows)
    assert run.read_epochs() == rows
    assert RunFolder.create("empty", root=tmp_path).read_epochs() == []


# --------------------------------------------------------------------------- one configuration, lock, integrity

def _claim(run: RunFolder, **settings):
    return run.claim("zeroshot", {"model": "m", "normalize": "sum", **settings},
                     per_task={("TERRa", "val"): {"data_sha256": "d" * 64, "template_sha256": "a" * 64}})


def _terra(run: RunFolder, fp: str = "fp") -> None:
    _write(run, _items("TERRa", "val", ("entailment", "not_entailment"), ["entailment", "not_entailment"]),
           {0: "entailment", 1: "entailment"}, fp=fp)


def test_claim_records_settings_stamps_states_and_refuses_other_settings(tmp_path):
    run = RunFolder(tmp_path / "r")
    with _claim(run) as claim:
        _terra(run)
    cfg = run.read_config()  # written before the first state, with the settings
    assert cfg["kind"] == "zeroshot" and cfg["settings"] == {"model": "m", "normalize": "sum"}
    assert cfg["settings_sha256"] == claim.settings_sha256
    state = run.read_state("TERRa", "val")
    assert state["settings_sha256"] == claim.settings_sha256 and state["data_sha256"] == "d" * 64
    assert state["files"]["logs"]["bytes"] == run.logs_path("TERRa", "val").stat().st_size
    assert run.finished("val") == ["TERRa"]
    with pytest.raises(RSGError) as exc:
        _claim(RunFolder(run.path), normalize="token", limit=5)
    assert "limit: None -> 5; normalize: 'sum' -> 'token'" in str(exc.value) and "--restart" in str(exc.value)
    with pytest.raises(RSGError, match=r"TERRa/val template_sha256: aaaaaaaaaaaa… -> bbbbbbbbbbbb…"):
        RunFolder(run.path).claim("zeroshot", {"model": "m", "normalize": "sum"},
                                  per_task={("TERRa", "val"): {"data_sha256": "d" * 64, "template_sha256": "b" * 64}})
    with pytest.raises(RSGError, match="kind: 'zeroshot' -> 'finetune'"):
        RunFolder(run.path).claim("finetune", {"model": "m", "normalize": "sum"})
    assert not (run.path / LOCK).exists() and run.finished("val") == ["TERRa"]  # refusals leave all as it was
    # Same settings: resumes (the finished task stays); a task split not finished yet may take new settings.
    again = RunFolder(run.path)
    with again.claim("zeroshot", {"model": "m", "normalize": "sum"},
                     per_task={("RCB", "val"): {"data_sha256": "e" * 64}}):
        assert again.is_done("TERRa", "val", "fp")
    # --restart clears every result and the config, whatever the settings.
    with RunFolder(run.path).claim("zeroshot", {"model": "m", "normalize": "token"}, restart=True) as c:
        assert c.restarted and sorted(p.name for p in run.path.iterdir()) == [runs.RUN_MARKER, LOCK]
    assert sorted(p.name for p in run.path.iterdir()) == [runs.RUN_MARKER]  # the folder stays the tool's


def test_a_stale_state_is_named_and_never_mixed_in(tmp_path):
    """A state made under other settings (copied in, or from a version that mixed them) is left out of
    metrics.json and the zip and named there; resuming redoes it."""
    a, b = RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")
    with _claim(a):
        _terra(a)
    with _claim(b, normalize="token"):
        _terra(b)
        test_items = _items("TERRa", "test", ("entailment", "not_entailment"), [None, None])
        _write(b, test_items, {0: "entailment", 1: "entailment"})
    with _claim(a):
        _write(a, _items("RCB", "val", ("entailment", "contradiction", "neutral"), ["neutral"]), {0: "neutral"})
    for sub in ("state/TERRa.test.json", "predictions/test/TERRa.jsonl", "logs/test/TERRa.jsonl"):
        (a.path / sub).parent.mkdir(parents=True, exist_ok=True)
        (a.path / sub).write_bytes((b.path / sub).read_bytes())
    m = a.write_metrics("val")
    assert set(m["tasks"]) == {"RCB", "TERRa"} and m["ignored"] == {}
    assert a.finished("test") == [] and "stale" in a.ignored("test")["TERRa"]
    z = a.build_zip()
    assert z.path is None and "stale" in z.ignored["TERRa"] and not (a.path / "submission-partial.zip").exists()
    with _claim(a) as claim:
        assert not a.is_done("TERRa", "test", "fp")  # resume redoes it under the folder's settings
        _write(a, test_items, {0: "entailment", 1: "not_entailment"})
        assert a.read_state("TERRa", "test")["settings_sha256"] == claim.settings_sha256
    assert a.finished("test") == ["TERRa"] and a.build_zip().tasks == ("TERRa",)


def test_a_folder_from_before_settings_were_recorded(tmp_path):
    """config.json without settings: its top-level model/normalize/... are compared; unstamped states are
    not trusted (redone), so nothing from before mixes in."""
    run = RunFolder.create("old", root=tmp_path)
    _terra(run)
    run.write_config({"kind": "zeroshot", "model": "m", "normalize": "token", "template": "default"})
    with pytest.raises(RSGError, match="normalize: 'token' -> 'sum'"):
        _claim(RunFolder(run.path))
    with _claim(RunFolder(run.path), normalize="token") as claim:
        folder = RunFolder(run.path)
        folder.claimed = claim
        assert not folder.is_done("TERRa", "val", "fp") and "stale" in folder.task_problem("TERRa", "val")


def test_damaged_results_are_detected(tmp_path):
    run = RunFolder(tmp_path / "r")
    with _claim(run):
        _terra(run)
    assert run.task_problem("TERRa", "val") is None
    log = run.logs_path("TERRa", "val")
    good = log.read_bytes()
    log.write_bytes(good.splitlines(keepends=True)[0])
    assert "logs/val/TERRa.jsonl does not match its state" in run.task_problem("TERRa", "val")
    assert run.finished("val") == [] and "truncated" in run.compute_metrics("val")["ignored"]["TERRa"]
    log.write_bytes(good)
    run.state_path("TERRa", "val").write_text("{", encoding="utf-8")
    assert "not valid JSON" in run.task_problem("TERRa", "val")
    # A state written before hashes were recorded: the logs' line count is checked against n_items.
    legacy = RunFolder(tmp_path / "legacy")
    _terra(legacy)
    state = legacy.read_state("TERRa", "val")
    del state["files"]
    legacy.state_path("TERRa", "val").write_text(json.dumps(state), encoding="utf-8")
    assert legacy.finished("val") == ["TERRa"]
    legacy.logs_path("TERRa", "val").write_bytes(good.splitlines(keepends=True)[0])
    assert "holds 1 items, its state 2" in legacy.task_problem("TERRa", "val")


LOCK = runs.LOCK_NAME
HOLD = """
import sys, time
from rsg_eval.runs import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_with_the_pid_and_a_dead_ones_lock_is_taken_over(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(RSGError) as exc:
            _claim(RunFolder(folder))
        assert time.monotonic() - t0 < 2  # fails fast, does not wait
        assert f"in use by another rsg process: PID {holder.pid} on " in str(exc.value)
        assert (folder / LOCK).is_file() and json.loads((folder / LOCK).read_text())["pid"] == holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed: no chance to remove its lock
        holder.wait()
    assert json.loads((folder / LOCK).read_text())["pid"] == holder.pid  # left behind by the dead process
    with _claim(RunFolder(folder)) as claim:  # taken over
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid() and claim.lock.held
    assert not (folder / LOCK).exists()


def test_lock_records_and_edge_cases(tmp_path, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    from rsg_eval.runs import FolderLock

    folder = tmp_path / "f"
    with FolderLock(folder) as lock:
        rec = json.loads((folder / LOCK).read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["started"]
        with pytest.raises(RSGError, match=f"PID {os.getpid()}"):  # not re-entrant across claims
            FolderLock(folder).acquire()
        assert lock.held
    assert not (folder / LOCK).exists()
    # A PID that is gone; and our own PID written by an earlier process (PID reuse after a container restart).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, start in ((int(dead.stdout), None), (os.getpid(), "1")):
        (folder / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "proc_start": start}))
        with FolderLock(folder):
            assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    # Another host's lock cannot be checked: refused, saying how to remove it if that process is gone.
    (folder / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(RSGError, match=f"delete {folder / LOCK}"):
        FolderLock(folder).acquire()
    # An empty lock file: being written right now (held) unless it is old (its writer died).
    (folder / LOCK).write_text("")
    with pytest.raises(RSGError, match="right now"):
        FolderLock(folder).acquire()
    os.utime(folder / LOCK, (0, 0))
    with FolderLock(folder):
        pass
    # Under torchrun/accelerate only rank 0 locks and checks.
    monkeypatch.setenv("RANK", "1")
    claim = RunFolder(tmp_path / "ranked").claim("zeroshot", {"model": "m"})
    assert claim.lock is None and not claim.main and not (tmp_path / "ranked").exists()
