"""Run folders (rsg_eval.runs): layout, atomic per-task results, resume marks, metrics from logs, the zip."""

from __future__ import annotations

import datetime as dt
import json
import zipfile

import pytest

from rsg_eval import runs, submission
from rsg_eval.errors import RSGError
from rsg_eval.runs import RunFolder, default_run_name, fingerprint, log_row
from rsg_eval.tasks import TASK_NAMES, Item, load_items


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

    monkeypatch.setattr(runs, "atomic_write_jsonl", boom)  # die after predictions, before logs/state
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
