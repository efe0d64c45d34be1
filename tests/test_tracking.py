"""Experiment tracking (rsg_eval.engine.tracking): TensorBoard's event files read back with their steps; wandb
offline and an MLflow file store when those packages are installed; the option's errors."""

from __future__ import annotations

import importlib.util
import math

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.engine import tracking
from rsg_eval.engine.tracking import Tracker, make_tracker, parse_report_to

STEPS = {1: {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.75, "tokens_per_s": 1200.0},
         2: {"loss": 2.0, "lr": 9e-4, "grad_norm": 0.5, "tokens_per_s": 1250.0, "skipped": None},
         4: {"eval/terra/accuracy": 0.625, "eval/rcb/macro_f1": 0.4}}
CONFIG = {"lr": 1e-3, "optimizer": "adafactor", "tasks": ["terra", "rcb"], "lora": {"rank": 8}}


def _log(tracker: Tracker) -> None:
    with tracker:
        tracker.log_config(CONFIG)
        for step, scalars in STEPS.items():
            tracker.log_scalars(step, scalars)


def test_parse_report_to():
    assert parse_report_to("none") == () and parse_report_to(None) == () and parse_report_to("") == ()
    assert parse_report_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    assert parse_report_to(["MLflow"]) == ("mlflow",)
    with pytest.raises(RSGError, match="unknown --report-to backend 'comet'"):
        parse_report_to("tensorboard,comet")
    with pytest.raises(RSGError, match="cannot be combined"):
        parse_report_to("none,wandb")


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RSGError, match=r'needs the wandb package: pip install -e "\.\[wandb\]"'):
        make_tracker("wandb", run_dir=".", run_name="r", fingerprint="f")


def test_none_and_other_ranks_log_nothing(tmp_path):
    assert type(make_tracker("none", run_dir=tmp_path, run_name="r", fingerprint="f")) is Tracker
    if importlib.util.find_spec("tensorboard") is not None:
        t = make_tracker("tensorboard", run_dir=tmp_path, run_name="r", fingerprint="f", rank=1)
        assert type(t) is Tracker
        _log(t)
    assert not any(tmp_path.iterdir())


def test_tensorboard_event_files_hold_the_scalars_at_their_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log(make_tracker("tensorboard", run_dir=tmp_path, run_name="terra-fredt5", fingerprint="abc123"))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    want: dict[str, list[tuple[int, float]]] = {}
    for step, scalars in STEPS.items():
        for k, v in scalars.items():
            if v is not None:
                want.setdefault(k, []).append((step, v))
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert all(math.isclose(g, w, rel_tol=1e-6) for (_, g), (_, w) in zip(got, points)), tag
    texts = {t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]}
    assert any("abc123" in v and "terra-fredt5" in v for v in texts.values())
    assert any('"optimizer": "adafactor"' in v for v in texts.values())


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = make_tracker("wandb", run_dir=tmp_path, run_name="terra-fredt5", fingerprint="abc123")
    assert t.run.name == "terra-fredt5" and "abc123" in t.run.tags
    _log(t)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_mlflow_local_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = make_tracker("mlflow", run_dir=tmp_path, run_name="terra-fredt5", fingerprint="abc123")
    run_id = t.run.info.run_id
    _log(t)
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking.local_mlflow_uri(tmp_path))
    run = client.get_run(run_id)
    assert run.data.tags["fingerprint"] == "abc123" and run.info.run_name == "terra-fredt5"
    assert run.data.params["optimizer"] == "adafactor" and run.data.params["lora.rank"] == "8"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 2.0)]


def test_backends_listed_match_the_extras():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert all(b in extras for b in tracking.BACKENDS if b != "none")


def test_scalar_names_and_throughput():
    s = tracking.step_scalars(loss=1.5, lr=1e-3, grad_norm=0.25, tokens_per_s=100.0,
                              task_losses={"mc": 1.0, "nli": 2.0})
    assert s == {"train/loss": 1.5, "train/lr": 1e-3, "train/grad_norm": 0.25, "train/tokens_per_s": 100.0,
                 "train/loss/mc": 1.0, "train/loss/nli": 2.0}
    assert tracking.eval_scalars({"terra": {"accuracy": 0.5, "n": 10, "ok": True, "note": "x"}}) == \
        {"eval/terra/accuracy": 0.5, "eval/terra/n": 10.0}
    t = tracking.Throughput()
    clock = iter([10.0, 12.0, 12.0])
    t._clock = lambda: next(clock)
    t._last = 8.0
    assert t.tick(400) == 200.0  # 400 tokens in 2 s
    assert t.tick(100) == 50.0
    assert math.isnan(t.tick(5))  # no time passed
