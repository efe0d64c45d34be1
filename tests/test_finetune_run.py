"""`rsg finetune` end to end on the tiny model: learning on a learnable fixture, the offline smoke path with a
valid zip, skipping finished tasks, LiDiRus from the TERRa model, no train split, full disk, two processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.training.finetune.config import load_config_set  # noqa: E402

from tests._finetune_utils import learnable_terra, one_thread  # noqa: E402,F401 (one_thread: autouse fixture)

REPO = Path(__file__).resolve().parent.parent
LEARN = dict(epochs=4, batch_size=8, lr=3e-3, warmup_ratio=0.0, max_source_length=64, max_target_length=8,
             eval_batch_size=64)


@pytest.fixture(scope="module")
def learn_run(tmp_path_factory):
    """One single-process run on the learnable TERRa fixture (shared by the learning and two-process tests)."""
    from rsg_eval.training.finetune.run import run_finetune

    d = tmp_path_factory.mktemp("learn")
    learnable_terra(d / "data")
    out = run_finetune("tiny", configs=load_config_set(None, LEARN), tasks=["TERRa"], data=d / "data",
                       run=str(d / "run"), checkpoint_dir=d / "ck")
    return d, out


def test_loss_falls_and_val_accuracy_rises_on_a_learnable_fixture(learn_run):
    d, out = learn_run
    hist = out.results["TERRa"].state.history
    assert [r["epoch"] for r in hist] == [1.0, 2.0, 3.0, 4.0]
    losses = [r["train_loss"] for r in hist]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] / 10
    assert hist[0]["acc"] <= 0.6 and max(r["acc"] for r in hist) >= 0.9  # chance -> learned
    # val/test were predicted with the best state: the val log's accuracy is the best epoch's
    metrics = json.loads((d / "run" / "metrics.json").read_text())
    best = out.results["TERRa"].state
    assert metrics["tasks"]["TERRa"]["acc"] == pytest.approx(best.best_metrics["acc"])
    state = json.loads((d / "run" / "state" / "TERRa.test.json").read_text())
    assert state["best_step"] == best.best_step and state["trained_on"] == "TERRa"
    from rsg_eval.runs import RunFolder

    assert (d / "run" / "epochs.csv").read_text().startswith("task,epoch,step,train_loss,acc")
    csv_rows = RunFolder(d / "run").read_epochs()
    assert [(r["epoch"], r["step"], r["acc"]) for r in csv_rows] == [(r["epoch"], r["step"], r["acc"]) for r in hist]
    assert [r["train_loss"] for r in csv_rows] == pytest.approx(losses)
    cfg = json.loads((d / "run" / "config.json").read_text())
    assert cfg["kind"] == "finetune" and cfg["hyperparameters"]["TERRa"]["lr"] == LEARN["lr"]
    # only best and last per task, outside the run folder
    assert sorted(p.name for p in (d / "ck" / "TERRa").iterdir()) == ["best", "last"]


def test_smoke_all_tasks_zip_resume_and_full_disk(tmp_path, monkeypatch):
    """`rsg finetune --model tiny --data sample --epochs 2` trains every task and writes a valid zip; a rerun
    skips everything; a full disk while RuCoS saves keeps the eight finished tasks and says how to go on."""
    from typer.testing import CliRunner

    from rsg_eval.cli import app
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.errors import RSGError
    from rsg_eval.runs import RunFolder
    from rsg_eval.core.submission import check_zip
    from rsg_eval.core.tasks import TASK_NAMES
    from rsg_eval.engine import checkpoint as ck

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["finetune", "--model", "tiny", "--data", "sample", "--epochs", "2", "--run", "smoke",
                              "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    run = RunFolder(tmp_path / "submissions" / "smoke")
    assert (run.path / "submission.zip").is_file()
    assert check_zip(run.path / "submission.zip", resolve_data("sample")) == []
    assert run.finished("val") == list(TASK_NAMES) == run.finished("test")
    epochs = run.read_epochs()
    trained = [t for t in TASK_NAMES if t != "LiDiRus"]
    assert sorted({r["task"] for r in epochs}) == sorted(trained)
    assert all(len([r for r in epochs if r["task"] == t]) == 2 for t in trained)
    # LiDiRus is predicted by the TERRa model with the TERRa template
    lid = run.read_state("LiDiRus", "test")
    assert lid["trained_on"] == "TERRa" and "/TERRa/best" in lid["checkpoint"].replace("\\", "/")
    assert run.read_config()["template"]["LiDiRus"] == run.read_config()["template"]["TERRa"]
    assert not (tmp_path / "checkpoints" / "smoke" / "LiDiRus").exists()

    # a rerun with the same settings skips every finished task
    res = runner.invoke(app, ["finetune", "--model", "tiny", "--data", "sample", "--epochs", "2", "--run", "smoke"])
    assert res.exit_code == 0 and "8 skipped" in res.output.replace("\n", " ")

    # RuCoS unfinished + a full disk at its first save: the others stay finished, the message says what to do
    for split in ("val", "test"):
        run.state_path("RuCoS", split).unlink()
    shutil.rmtree(tmp_path / "checkpoints" / "smoke" / "RuCoS")
    real = ck.save_weights

    def full(model, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_weights", full)
    rows_before = [r for r in run.read_epochs() if r["task"] != "RuCoS"]
    res = runner.invoke(app, ["finetune", "--model", "tiny", "--data", "sample", "--epochs", "2", "--run", "smoke"])
    assert isinstance(res.exception, RSGError) and "disk is full" in str(res.exception)
    assert run.finished("test") == [t for t in TASK_NAMES if t != "RuCoS"]
    # metrics.json and the partial zip were rewritten for the eight finished tasks despite the error
    assert sorted(run.read_metrics()["tasks"]) == sorted(t for t in TASK_NAMES if t != "RuCoS")
    assert (run.path / "submission-partial.zip").is_file()
    assert [r for r in run.read_epochs() if r["task"] != "RuCoS"] == rows_before  # other curves untouched
    monkeypatch.setattr(ck, "save_weights", real)
    res = runner.invoke(app, ["finetune", "--model", "tiny", "--data", "sample", "--epochs", "2", "--run", "smoke",
                              "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert check_zip(run.path / "submission.zip", resolve_data("sample")) == []


def test_task_without_a_train_split_is_reported_and_others_go_on(tmp_path):
    from rsg_eval.core.errors import RSGError
    from rsg_eval.training.finetune.run import run_finetune, training_units

    assert training_units(["LiDiRus", "RCB", "TERRa"]) == [("RCB", ["RCB"]), ("TERRa", ["TERRa", "LiDiRus"])]
    assert training_units(["LiDiRus"]) == [("TERRa", ["LiDiRus"])]
    learnable_terra(tmp_path / "data", n_train=4, n_val=4, n_test=2)
    (tmp_path / "data" / "TERRa" / "train.jsonl").unlink()
    out = run_finetune("tiny", configs=load_config_set(None, LEARN), tasks=["LiDiRus"], data=tmp_path / "data",
                       run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck")
    assert "no train split" in out.failed["TERRa"] and not out.trained
    # an empty train split: reported the same way, nothing half-written
    (tmp_path / "data" / "TERRa" / "train.jsonl").write_text("", encoding="utf-8")
    out = run_finetune("tiny", configs=load_config_set(None, LEARN), tasks=["TERRa"], data=tmp_path / "data",
                       run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck")
    assert "no training examples" in out.failed["TERRa"]
    assert not (tmp_path / "run" / "state").exists()
    with pytest.raises(RSGError):
        load_config_set(None, {"epochs": 0})


@pytest.mark.slow
def test_two_processes_match_one(learn_run, tmp_path):
    """torchrun with two CPU processes (gloo), batch 4 each = the single run's batch 8: it completes, writes one
    run folder (rank 0 only), and its val metrics and losses match the single-process run."""
    d, single = learn_run
    args = ["finetune", "--model", "tiny", "--data", str(d / "data"), "--tasks", "TERRa", "--epochs",
            str(LEARN["epochs"]), "--batch-size", "4", "--lr", str(LEARN["lr"]), "--warmup-ratio", "0",
            "--max-source-length", "64", "--max-target-length", "8", "--run", str(tmp_path / "run2"),
            "--checkpoint-dir", str(tmp_path / "ck2"), "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # `--` keeps torchrun's own parser away from our flags (it would read --run as its --run-path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rsg_eval.cli", "--", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck2", "run2"]  # one run folder, nothing else
    from rsg_eval.runs import RunFolder

    two = RunFolder(tmp_path / "run2")
    assert json.loads((two.path / "config.json").read_text())["world_size"] == 2
    rows2 = two.read_epochs()
    rows1 = single.results["TERRa"].state.history
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1]
    for a, b in zip(rows1, rows2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-6)
    m1 = json.loads((d / "run" / "metrics.json").read_text())["tasks"]["TERRa"]
    m2 = two.read_metrics()["tasks"]["TERRa"]
    assert m2 == pytest.approx(m1)


def test_a_hierarchical_checkpoint_can_be_fine_tuned(tmp_path):
    """--model may be a hierarchical checkpoint folder: load_model gives its seq2seq model (LM adapter inside
    lm_head), which trains, checkpoints and predicts like any T5."""
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.models.tiny import build_tiny
    from rsg_eval.training.finetune.run import run_finetune

    model, tok = build_tiny()
    HierarchicalT5.from_base(model, **head_labels()).save_pretrained(tmp_path / "hier", tokenizer=tok)
    learnable_terra(tmp_path / "data", n_train=8, n_val=4, n_test=2)
    out = run_finetune(str(tmp_path / "hier"), configs=load_config_set(None, dict(LEARN, epochs=1)),
                       tasks=["TERRa"], data=tmp_path / "data", run=str(tmp_path / "run"),
                       checkpoint_dir=tmp_path / "ck")
    assert out.trained == ["TERRa"] and out.results["TERRa"].state.step == 1
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ck" / "TERRa" / "best" / "model.safetensors"))
    assert any("adapter" in k for k in saved)  # the LM adapter is part of what is fine-tuned and saved


def test_nan_mid_task_stops_the_run_and_keeps_its_curve(tmp_path):
    """The LM head starts to emit NaN in training after epoch 1: the run stops with a message naming the step,
    epochs.csv keeps the epoch-1 row, and `last/` holds the state to resume from."""
    from rsg_eval.core.errors import RSGError
    from rsg_eval.models.loading import load_model
    from rsg_eval.runs import RunFolder
    from rsg_eval.engine import checkpoint as ck
    from rsg_eval.training.finetune.run import run_finetune

    learnable_terra(tmp_path / "data", n_train=16, n_val=4, n_test=2)
    calls = {"train_forwards": 0}

    def load_poisoned(*a, **kw):
        loaded = load_model(*a, **kw)

        def hook(mod, inp, out):
            if mod.training:  # scoring runs in eval mode and stays finite
                calls["train_forwards"] += 1
                if calls["train_forwards"] > 2:  # epoch 1 = 2 steps of batch 8
                    return out * float("nan")
            return None

        loaded.model.lm_head.register_forward_hook(hook)
        return loaded

    with pytest.raises(RSGError, match="loss became nan at epoch 2, optimizer step 3"):
        run_finetune("tiny", configs=load_config_set(None, LEARN), tasks=["TERRa"], data=tmp_path / "data",
                     run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck", load=load_poisoned)
    rows = RunFolder(tmp_path / "run").read_epochs()
    assert [(r["task"], r["epoch"], r["step"]) for r in rows] == [("TERRa", 1.0, 2)]
    assert ck.read_meta(ck.find(tmp_path / "ck" / "TERRa", "last"))["state"]["step"] == 2


def test_a_run_killed_mid_task_resumes_to_the_same_results(tmp_path):
    """Through the runner: kill TERRa after step 3 of 4, rerun the same call: the same epochs.csv, val metrics
    and test predictions as a run that was never interrupted."""
    from rsg_eval.runs import RunFolder
    from rsg_eval.training.finetune.run import run_finetune
    from rsg_eval.training.finetune.loop import Hooks

    learnable_terra(tmp_path / "data", n_train=16, n_val=4, n_test=2)
    cfg = load_config_set(None, dict(LEARN, epochs=2, save_every=1))

    class Killed(Exception):
        pass

    def kill(state, loss):
        if state.step == 3:
            raise Killed

    def call(name, hooks=None):
        return run_finetune("tiny", configs=cfg, tasks=["TERRa"], data=tmp_path / "data", run=str(tmp_path / name),
                            checkpoint_dir=tmp_path / f"ck-{name}", hooks=hooks)

    call("clean")
    with pytest.raises(Killed):
        call("killed", lambda task: Hooks(on_step=kill))
    assert not RunFolder(tmp_path / "killed").finished("test")
    out = call("killed")
    assert out.results["TERRa"].resumed_from == 3
    a, b = RunFolder(tmp_path / "clean"), RunFolder(tmp_path / "killed")
    assert a.read_epochs() == b.read_epochs()
    assert a.read_metrics()["tasks"] == b.read_metrics()["tasks"]
    assert a.read_logs("TERRa", "test") == b.read_logs("TERRa", "test")


def test_one_configuration_per_run_folder(tmp_path):
    """A finished task trained with --epochs 1 is not mixed with --epochs 2 in the same --run: refused (naming
    the setting, old -> new); --restart clears the results and the checkpoints and trains again. The states
    carry the val/test data file's sha256 (what reports compare)."""
    from rsg_eval.core.data import sha256_file
    from rsg_eval.core.errors import RSGError
    from rsg_eval.runs import RunFolder
    from rsg_eval.training.finetune.run import run_finetune

    learnable_terra(tmp_path / "data", n_train=4, n_val=4, n_test=2)

    def call(restart=False, **over):
        return run_finetune("tiny", configs=load_config_set(None, {**LEARN, "epochs": 1, **over}), tasks=["TERRa"],
                            data=tmp_path / "data", run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck",
                            restart=restart)

    call()
    run = RunFolder(tmp_path / "run")
    state = run.read_state("TERRa", "val")
    assert state["data_sha256"] == sha256_file(tmp_path / "data" / "TERRa" / "val.jsonl")
    assert state["settings_sha256"] == run.read_config()["settings_sha256"]
    before = run.state_path("TERRa", "test").read_bytes()
    with pytest.raises(RSGError) as exc:
        call(epochs=2)
    assert "TERRa/test hyperparameters.epochs: 1 -> 2" in str(exc.value) and "--restart" in str(exc.value)
    assert run.state_path("TERRa", "test").read_bytes() == before and not (run.path / "rsg.lock").exists()
    # batch 4 x accumulation 2 is the same global batch as 8 x 1: not a different configuration
    assert call(batch_size=4, grad_accum=2).skipped == ["TERRa"]
    out = call(restart=True, epochs=2)
    assert out.trained == ["TERRa"] and [r["epoch"] for r in run.read_epochs()] == [1.0, 2.0]
    assert run.read_config()["settings"]["model"] == "tiny"
    assert run.read_state("TERRa", "val")["task_settings"]["hyperparameters"]["epochs"] == 2


def test_a_broken_template_creates_nothing(tmp_path):
    """Templates (train targets too) are rendered before the model loads and before the run folder exists."""
    import textwrap

    from rsg_eval.core.errors import RSGError
    from rsg_eval.training.finetune.run import run_finetune

    learnable_terra(tmp_path / "data", n_train=4, n_val=4, n_test=2)
    evil = tmp_path / "evil.yaml"
    evil.write_text(textwrap.dedent("""\
        task: TERRa
        template: "{{ premise }} {{ hypothesis }}"
        choices: {entailment: "{{ premise.__class__.__mro__ }}", not_entailment: Нет}
        """), encoding="utf-8")

    def refuse(*a, **k):
        raise AssertionError("the model must not load before the templates are checked")

    with pytest.raises(RSGError, match="sandbox"):
        run_finetune("tiny", configs=load_config_set(None, dict(LEARN, template=str(evil))), tasks=["TERRa"],
                     data=tmp_path / "data", run=str(tmp_path / "runs" / "x"), checkpoint_dir=tmp_path / "ck",
                     load=refuse)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def test_cut_prompts_are_one_note_per_task_split_not_a_warning(tmp_path):
    """Issue 23 item 2: prompts longer than --max-source-length were a Python UserWarning (with the source path
    and code line) at every evaluation. Now: no warning, and one note per task split naming it and what to do."""
    import warnings

    from rsg_eval.training.finetune.run import Reporter, run_finetune

    class Notes(Reporter):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def note(self, text: str) -> None:
            self.notes.append(text)

    learnable_terra(tmp_path / "data", n_train=8, n_val=4, n_test=2)
    rep = Notes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        run_finetune("tiny", configs=load_config_set(None, dict(LEARN, epochs=2, max_source_len=6)), tasks=["TERRa"],
                     data=tmp_path / "data", run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck", reporter=rep)
    cut = [n for n in rep.notes if "prompts are longer" in n]
    # val is scored after each of the 2 epochs and once more for the predictions: still one note for it
    assert [n.split(":")[0] for n in cut] == ["TERRa/val", "TERRa/test"], rep.notes
    assert cut[0].startswith("TERRa/val: 4 of 4 prompts are longer than the model's 6 input tokens")
    assert "raise --max-source-length" in cut[0] and ".py" not in cut[0]


def test_max_train_examples_counts_muserc_questions(tmp_path):
    """Issue 23 item 13: `max_train_examples: 2` trains MuSeRC on its first 2 questions with all their answer
    options (an item there is one answer), not on 2 answers."""
    from rsg_eval.core.data import load_items
    from rsg_eval.core.tasks import limit_groups
    from rsg_eval.training.finetune.run import Reporter, run_finetune

    class Starts(Reporter):
        def __init__(self) -> None:
            self.pairs: dict[str, int] = {}

        def task_start(self, task, predicts, n_pairs, total_steps, resumed) -> None:
            self.pairs[task] = n_pairs

    items = load_items("sample", "MuSeRC", "train")
    first_two = [it for it in items if it.group in {items[0].group, next(i.group for i in items
                                                                         if i.group != items[0].group)}]
    assert len(first_two) == len(limit_groups(items, 2)) > 2
    rep = Starts()
    run_finetune("tiny", configs=load_config_set(None, dict(LEARN, epochs=1, max_steps=1, max_train_examples=2)),
                 tasks=["MuSeRC"], data="sample", run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck",
                 reporter=rep)
    assert rep.pairs == {"MuSeRC": len(first_two)}
