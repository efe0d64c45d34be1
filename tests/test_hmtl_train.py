"""`rsg train-hmtl` end to end on the tiny model and the sample corpus: the loss falls, checkpoints load through
load_model, and an interrupted run resumed from its last save point ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import csv

import pytest
import torch

from _hmtl_utils import one_thread  # noqa: F401  (autouse fixture)
from _scoring_utils import SYNC_REASON, TRANSFORMERS5

from rsg_eval.training.hmtl.train import TrainConfig, train

pytestmark = pytest.mark.slow

# Small but real: every step runs all eight tasks (3 of each per micro-step: the per-task reading, so that 6 steps
# move the loss); dropout in the heads is on, so the RNG state matters on resume. The default reading ("total") runs
# end to end in the CLI test below and against the per-task one in the batch-readings test.
KW = dict(model="tiny", corpus="sample", epochs=3, batch_size=3, grad_accum=2, schedule="cosine", lr_min=1e-5,
          lr=3e-3, max_steps_per_epoch=2, max_source_length=64, max_target_length=32, gradient_checkpointing=True,
          batch_reading="per-task")


def _losses(out):
    with open(out / "losses.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    res = train(TrainConfig(out=str(out), **KW), progress=False)
    return out, res


def test_loss_falls_and_outputs_written(straight):
    out, res = straight
    assert res.finished and res.steps == 6
    rows = _losses(out)
    train_tot = [float(r["mean"]) for r in rows if r["split"] == "train"]
    val_tot = [float(r["mean"]) for r in rows if r["split"] == "val"]
    assert len(train_tot) == len(val_tot) == 3
    assert train_tot[-1] < 0.8 * train_tot[0]
    assert val_tot[-1] < val_tot[0]
    tasks = ["ner", "mc", "nli", "paraphrase", "qg", "qa", "summarization", "title"]
    assert list(rows[0]) == ["epoch", "split", "mean"] + tasks
    for r in rows:   # the headline is the mean over the tasks (the paper's average loss), not a sum
        assert float(r["mean"]) == pytest.approx(sum(float(r[t]) for t in tasks) / 8, abs=1e-5)
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"
    for d in ("epoch-1", "epoch-2", "epoch-3", "final", "last"):
        assert (out / d / "hmtl_config.json").is_file()
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "CyclicLR exp_range" not in log        # cosine: no note about the paper's schedule
    # the batch plan at start: 3 of each task per micro-step, 6 per step; the largest task (mc, 21) needs
    # ceil(21 / 6) = 4 steps for an epoch, in which it is read 24 / 21 = 1.14 times, title (5) 24 / 5 = 4.8 times
    assert "batch reading 'per-task': 3 sequences of each of the 8 tasks per micro-step (24 in all)" in log
    assert "epoch = every train example seen at least once: 4 optimizer steps" in log
    assert "mc 1.14x of 21" in log and "title 4.80x of 5" in log


def test_checkpoint_loads_through_load_model(straight):
    from rsg_eval.models.adapters import AdaptedLMHead
    from rsg_eval.models.loading import load_model

    out, _ = straight
    loaded = load_model(str(out / "final"))
    assert isinstance(loaded.model.lm_head, AdaptedLMHead)
    hier = loaded.info["hierarchical"]
    assert hier.seq2seq is loaded.model
    # the defaults: the paper's softmax NER loss, one adapter per head
    assert hier.config.ner_representation == "softmax-innermost" and hier.config.adapter_layout == "per-head"
    # Training moved the adapters away from zero: the LM adapter is no longer the identity.
    assert hier.lm_adapter.up.weight.abs().sum() > 0
    enc = loaded.tokenizer(["Мальчик уронил стакан."], return_tensors="pt")
    with torch.no_grad():
        assert hier.mc_logits(enc["input_ids"], enc["attention_mask"]).shape == (1, 17)


def test_resume_after_interruption_is_identical(straight, tmp_path):
    out_a, _ = straight
    out_b = tmp_path / "resumed"
    cfg = TrainConfig(out=str(out_b), save_every=1, **KW)

    def stop(step):
        if step == 3:                         # in the middle of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=stop)
    assert not (out_b / "final").exists() and (out_b / "last" / "trainer_state.pt").is_file()
    res = train(cfg, progress=False)
    assert res.finished and res.steps == 6
    assert _losses(out_b) == _losses(out_a)
    from safetensors.torch import load_file
    for name in ("model.safetensors", "hmtl_heads.safetensors"):
        a, b = load_file(out_a / "final" / name), load_file(out_b / "final" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run is not redone; different settings in the same folder are refused.
    assert train(cfg, progress=False).steps == 6
    from rsg_eval.core.errors import RSGError
    with pytest.raises(RSGError, match="other settings: epochs: 3 -> 4.*--restart"):
        train(TrainConfig(out=str(out_b), **{**KW, "epochs": 4}), progress=False)


def test_sigterm_stops_at_a_step_boundary_and_the_rerun_ends_identical(straight, tmp_path):
    """SIGTERM (a scheduler's preemption) after step 1, with no periodic saving: the resume point is saved at that
    step boundary, training stops with exit code 143, and the rerun ends bit-identical to the straight run."""
    import signal

    from rsg_eval.engine.stop import Stopped

    out_a, _ = straight
    out_b = tmp_path / "term"
    cfg = TrainConfig(out=str(out_b), **KW)

    def term(step):
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Stopped, match="step 1") as exc:
        train(cfg, progress=False, on_step=term)
    assert exc.value.exit_code == 143
    st = torch.load(out_b / "last" / "trainer_state.pt", weights_only=True)
    assert st["global_step"] == 1 and len(st["rng"]) == 1 and {"python", "numpy", "torch"} <= set(st["rng"][0])
    assert train(cfg, progress=False).steps == 6
    assert _losses(out_b) == _losses(out_a)
    from safetensors.torch import load_file
    a, b = load_file(out_a / "final" / "model.safetensors"), load_file(out_b / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_loss_stops_with_the_last_good_state_saved(tmp_path):
    """A learning rate of 1e30 sends the weights to infinity after the first step: the second step's loss is not
    finite, the step is not applied, the resume point holds the state after step 1, and the error says what to do."""
    from rsg_eval.core.errors import RSGError

    cfg = TrainConfig(out=str(tmp_path / "o"), **{**KW, "epochs": 1, "schedule": "paper", "lr_min": 1e30,
                                                  "lr": 1e30})
    with pytest.raises(RSGError, match="became non-finite at epoch 1, optimizer step 2.*Lower --lr"):
        train(cfg, progress=False)
    st = torch.load(tmp_path / "o" / "last" / "trainer_state.pt", weights_only=True)
    assert (st["epoch"], st["step"], st["global_step"], st["skipped_steps"]) == (0, 1, 1, 1)


def test_early_stopping_on_the_mean_val_loss(tmp_path):
    """--early-stopping 1 with a learning rate of 0: the val loss cannot improve after epoch 1, so training ends
    after epoch 2 of 3, and final/ is epoch 2's checkpoint."""
    import json

    cfg = TrainConfig(out=str(tmp_path / "o"), **{**KW, "schedule": "paper", "lr_min": 0.0, "lr": 0.0,
                                                  "early_stopping": 1})
    res = train(cfg, progress=False)
    assert res.finished and res.steps == 4
    assert [(r["epoch"], r["split"]) for r in _losses(tmp_path / "o")] == [("1", "train"), ("1", "val"),
                                                                          ("2", "train"), ("2", "val")]
    assert json.loads((tmp_path / "o" / "run.json").read_text())["stopped"] == "early_stopping"
    assert not (tmp_path / "o" / "epoch-3").exists() and (tmp_path / "o" / "final").is_dir()


def test_the_out_folder_holds_one_configuration(tmp_path):
    """--out is locked and holds one configuration: a resume after the corpus changed is refused (its content is
    a setting, not its path); --restart starts over; an --out from before settings.json is checked through
    run.json, and checkpoints without any record of their settings are refused."""
    import json
    import shutil

    from rsg_eval.core.errors import RSGError
    from rsg_eval.corpus.load import sample_dir

    corpus = tmp_path / "corpus"
    shutil.copytree(sample_dir(), corpus)
    out = tmp_path / "out"
    kw = {**KW, "corpus": str(corpus), "epochs": 1, "max_steps_per_epoch": 2}
    cfg = TrainConfig(out=str(out), save_every=1, **kw)

    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, on_step=stop)
    assert (out / "last" / "trainer_state.pt").is_file() and not (out / "rsg.lock").exists()
    settings = json.loads((out / "settings.json").read_text(encoding="utf-8"))
    assert settings["kind"] == "train-hmtl" and settings["settings"]["epochs"] == 1
    train_file = corpus / "train.jsonl"
    lines = train_file.read_text(encoding="utf-8").splitlines(keepends=True)
    train_file.write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(RSGError, match=r"corpus_sha256: [0-9a-f]{12}… -> [0-9a-f]{12}…"):
        train(cfg, progress=False)
    res = train(cfg, progress=False, restart=True)
    assert res.finished and res.steps == 2 and (out / "final" / "hmtl_config.json").is_file()
    # An --out written before settings.json: run.json's config still guards it, with the way out.
    (out / "settings.json").unlink()
    with pytest.raises(RSGError, match=r"epochs: 1 -> 2.*--restart"):
        train(TrainConfig(out=str(out), **{**kw, "epochs": 2}), progress=False)
    (out / "run.json").unlink()
    with pytest.raises(RSGError, match="no record of the settings"):
        train(cfg, progress=False)


def test_paper_schedule_note_via_cli(tmp_path):
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["train-hmtl", "--model", "tiny", "--corpus", "sample", "--out", str(out),
                                 "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "2",
                                 "--grad-accum", "1", "--max-source-length", "48", "--max-target-length", "16",
                                 "--no-gradient-checkpointing", "--task-weights", "title=0", "--quiet",
                                 "--adapter-layout", "shared-mc-ner", "--ner-loss", "multilabel"])
    assert r.exit_code == 0, r.output
    log = (out / "train.log").read_text(encoding="utf-8")
    assert "INFO note: schedule 'paper'" in log and "step 73" in log and "WARN" not in log
    # the default reading: 2 sequences per micro-step in all over the 7 weighted tasks; the largest (mc, 21, the
    # 2nd task) needs its 21st example, global slot 1 + 7 * 20 = 141, so ceil(142 / 2) = 71 steps per epoch
    assert "batch reading 'total': 2 sequences per micro-step in all, dealt to the 7 tasks in rotation" in log
    assert "epoch = every train example seen at least once: 71 optimizer steps" in log
    assert "mc 1.00x of 21" in log and "ner 1.91x of 11" in log
    assert "default so that a reproduction runs what the paper ran" in log and "--schedule cosine" in log
    rows = _losses(out)
    assert "title" not in rows[0] and "qa" in rows[0]        # weight 0 drops the task
    import json
    cfg = json.loads((out / "final" / "hmtl_config.json").read_text(encoding="utf-8"))
    assert cfg["adapter_layout"] == "shared-mc-ner" and cfg["ner_representation"] == "multilabel-sigmoid"


def _final_weights(out):
    from safetensors.torch import load_file

    w = load_file(out / "final" / "model.safetensors")
    w.update(load_file(out / "final" / "hmtl_heads.safetensors"))
    return w


def test_batch_readings_weigh_each_task_as_its_mean_per_step(tmp_path):
    """Four ways to put the same 2 examples of each task into one optimizer step: 4 in all in one micro-step, 2 in
    all over 2 micro-steps ("total" reading, rotating), 1 of each task over 2 micro-steps, 2 of each task at once
    ("per-task"). Each task's loss enters the step as the mean over its 2 examples, so all four end with the same
    weights. (MC and NLI only: their losses are per example; head dropout off.)"""
    base = dict(model="tiny", corpus="sample", epochs=1, max_steps_per_epoch=2, max_source_length=48,
                max_target_length=16, schedule="cosine", lr_min=1e-4, lr=1e-2, gradient_checkpointing=False,
                head_dropout=0.0, task_weights={"ner": 0, "mc": 1, "nli": 0.5, "paraphrase": 0, "qg": 0, "qa": 0,
                                                "summarization": 0, "title": 0})
    ways = {"total-4x1": dict(batch_reading="total", batch_size=4, grad_accum=1),
            "total-2x2": dict(batch_reading="total", batch_size=2, grad_accum=2),
            "per-task-1x2": dict(batch_reading="per-task", batch_size=1, grad_accum=2),
            "per-task-2x1": dict(batch_reading="per-task", batch_size=2, grad_accum=1)}
    weights = {}
    for name, kw in ways.items():
        res = train(TrainConfig(out=str(tmp_path / name), **base, **kw), progress=False)
        assert res.steps == 2
        weights[name] = _final_weights(tmp_path / name)
    ref = weights.pop("per-task-2x1")
    start = _final_weights_of_fresh_tiny()
    moved = max(float((ref[k] - start[k]).abs().max()) for k in start if k in ref)
    assert moved > 1e-3                      # training really moved the weights
    for name, w in weights.items():
        diff = max(float((w[k] - ref[k]).abs().max()) for k in ref)
        # transformers 5 runs T5 attention through sdpa, whose padded and unpadded batches round apart by ~1e-7;
        # AdamW's first steps (update ~ lr * sign(g)) lift that to ~1e-4 on weights that moved by > 1e-3
        assert diff < (2e-4 if TRANSFORMERS5 else 1e-5), (name, diff)
    rows = _losses(tmp_path / "total-2x2")
    assert {r["split"] for r in rows} == {"train", "val"} and list(rows[0])[:3] == ["epoch", "split", "mean"]


def _final_weights_of_fresh_tiny():
    from rsg_eval.models.loading import load_model

    return {k: v.detach().clone() for k, v in load_model("tiny").model.state_dict().items()}


@pytest.mark.skipif(TRANSFORMERS5, reason=SYNC_REASON)
def test_one_host_sync_per_optimizer_step(tmp_path):
    """The step's losses stay on the device until the step ends: one host read per optimizer step (it was one per
    task batch, 8 tasks x 2 micro-steps here, each a wait for the GPU), whatever the number of tasks."""
    from _scoring_utils import count_syncs

    marks = []
    with count_syncs() as counts:
        train(TrainConfig(out=str(tmp_path / "o"), **{**KW, "epochs": 1, "max_steps_per_epoch": 4}),
              progress=False, on_step=lambda g: marks.append(sum(counts.values())))
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    assert len(per_step) == 3 and per_step == [1, 1, 1], per_step
