"""Issue 20 in `rsg train-hmtl`: --report-to tensorboard (per optimizer step the mean and per-task losses, lr, grad
norm, tokens/s; per epoch the val losses, equal to losses.csv) and --optimizer adafactor (trains, its state is the
factored one)."""

from __future__ import annotations

import csv

import pytest

from _hmtl_utils import one_thread  # noqa: F401  (autouse fixture)
from rsg_eval.training.hmtl.train import TrainConfig, train

KW = dict(model="tiny", corpus="sample", epochs=2, batch_size=3, grad_accum=1, schedule="cosine", lr_min=1e-5,
          lr=3e-3, max_steps_per_epoch=2, max_source_length=48, max_target_length=16, gradient_checkpointing=False,
          batch_reading="per-task")


def test_tensorboard_and_adafactor(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "hm"
    res = train(TrainConfig(out=str(out), report_to="tensorboard", optimizer="adafactor", **KW), progress=False)
    assert res.finished and res.steps == 4
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    tasks = ("ner", "mc", "nli", "paraphrase", "qg", "qa", "summarization", "title")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss"} <= tags
    assert {f"train/loss/{t}" for t in tasks} <= tags and {f"eval/loss/{t}" for t in tasks} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    # the step's mean is the unweighted mean of its task losses, as losses.csv's "mean"
    for i, e in enumerate(acc.Scalars("train/loss")):
        per = [acc.Scalars(f"train/loss/{t}")[i].value for t in tasks]
        assert e.value == pytest.approx(sum(per) / len(per), rel=1e-5)
    with open(out / "losses.csv", newline="", encoding="utf-8") as fh:
        val = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == \
        [(2 * (i + 1), pytest.approx(float(r["mean"]), rel=1e-5)) for i, r in enumerate(val)]
    # tokens/s is positive; lr is each step's rate under the schedule (warm-up from lr_min, then cosine to --lr)
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(KW["lr_min"], rel=1e-6) and len(set(lrs)) > 1  # TB stores float32
    assert max(lrs) == pytest.approx(KW["lr"], rel=1e-6)
