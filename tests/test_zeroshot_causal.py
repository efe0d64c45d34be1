"""`rsg zeroshot` with a decoder-only model: all nine tasks into a valid zip on `tiny-causal`, the same results at
any batch size and with --calibrate; seq2seq-only commands refuse decoder-only models with a clear error."""

from __future__ import annotations

import json
import sys

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.core import metrics, submission  # noqa: E402
from rsg_eval.core.tasks import TASK_NAMES  # noqa: E402
from rsg_eval.core.data import load_items
from rsg_eval.eval.zeroshot import ZeroShotOptions, run_zeroshot  # noqa: E402


@pytest.fixture(scope="module")
def tiny_causal():
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny-causal", device="cpu", causal_ok=True)


def _run(tmp_path, loaded, **kw):
    opts = ZeroShotOptions(model="tiny-causal", data="sample", root=tmp_path, run=kw.pop("run", "r"), **kw)
    return run_zeroshot(opts, show_progress=False, loaded=loaded)


@pytest.mark.slow
def test_all_nine_tasks_into_a_valid_zip(tmp_path, tiny_causal):
    res = _run(tmp_path, tiny_causal, split="all")
    run = res.run
    assert [o.status for o in res.outcomes] == ["done"] * 18
    cfg = run.read_config()
    assert cfg["model"] == "tiny-causal" and cfg["model_info"]["kind"] == "causal"
    m = json.loads(run.metrics_path.read_text())
    assert set(m["tasks"]) == set(TASK_NAMES)
    for t in TASK_NAMES:
        items = load_items("sample", t, "val")
        preds = run.read_predictions(t, "val")
        assert metrics.score_items(t, items, preds)["score"] == pytest.approx(m["tasks"][t]["score"])
        for row in run.read_logs(t, "val"):
            assert not row["prompt"].startswith("<LM>")  # FRED's prefix is not given to a decoder-only model
            best = max(range(len(row["scores"])), key=lambda j: (row["scores"][j], -j))
            assert row["pred"] == row["labels"][best]
    assert res.zip.complete and submission.check_zip(res.zip.path, "sample") == []


def test_batch_size_and_calibration_through_the_runner(tmp_path, tiny_causal):
    """Predictions do not depend on the batch size; --calibrate scores = raw - content-free, as for seq2seq."""
    from rsg_eval.scoring import forget_batch_size

    tasks = ["TERRa", "PARus", "RuCoS"]
    logs = {}
    for bs in (1, 16):
        forget_batch_size(tiny_causal.model)
        run = _run(tmp_path, tiny_causal, tasks=tasks, split="val", batch_size=bs, run=f"b{bs}").run
        logs[bs] = {t: run.read_logs(t, "val") for t in tasks}
    for t in tasks:
        assert [r["pred"] for r in logs[1][t]] == [r["pred"] for r in logs[16][t]]
        for a, b in zip(logs[1][t], logs[16][t]):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    cal = _run(tmp_path, tiny_causal, tasks=["TERRa"], split="val", calibrate=True, run="cal").run
    from rsg_eval.core.prompts import load_template
    from rsg_eval.scoring import score_choices

    tpl = load_template("TERRa")
    items = load_items("sample", "TERRa", "val")
    free = [tpl.render_content_free(it, prefix="") for it in items]
    base = score_choices(tiny_causal.model, tiny_causal.tokenizer, free, [tpl.render_choices(it) for it in items])
    for row, raw, b in zip(cal.read_logs("TERRa", "val"), logs[16]["TERRa"], base):
        assert row["scores"] == pytest.approx([r - x for r, x in zip(raw["scores"], b)], abs=1e-4)


def _cli(monkeypatch, capsys, *args):
    from rsg_eval.cli import main

    monkeypatch.setattr(sys, "argv", ["rsg", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_seq2seq_only_commands_refuse_a_decoder_only_model(tmp_path, monkeypatch, capsys):
    # (rsg finetune trains decoder-only models too: tests/test_finetune_features.py)
    monkeypatch.chdir(tmp_path)
    for args, what in ((["zeroshot", "-m", "tiny-causal", "--nli-head", "--data", "sample"], "--nli-head"),
                       (["train-hmtl", "-m", "tiny-causal", "--corpus", "sample", "-o", "h"], "rsg train-hmtl")):
        code, err = _cli(monkeypatch, capsys, *args)
        assert code == 2 and "Traceback" not in err, err
        assert f"'tiny-causal' is a decoder-only model; {what} works with seq2seq models only" in " ".join(
            err.split())
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_device_map_option_runs_the_cli(tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "zeroshot", "-m", "tiny-causal", "--device-map", "auto", "--data", "sample",
                     "--tasks", "TERRa", "--split", "val", "--root", str(tmp_path), "--run", "dm", "-q")
    assert code == 0, err
    cfg = json.loads((tmp_path / "dm" / "config.json").read_text())
    assert cfg["model_info"]["device_map"] == {"": "cpu"}
    code, err = _cli(monkeypatch, capsys, "zeroshot", "-m", "tiny", "--device-map", "auto", "--device", "cpu",
                     "--data", "sample", "--tasks", "TERRa", "--root", str(tmp_path))
    assert code == 2 and "give one" in err
