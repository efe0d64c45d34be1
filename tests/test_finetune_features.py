"""Issue 20 through `rsg finetune`'s runner: decoder-only fine-tuning (tiny-causal and a saved Llama-shaped folder:
trains, resumes, predicts the same at batch size 1 and 16), LoRA (the best checkpoint is an adapter folder that
--model loads to the run's own predictions), Adafactor (T5's settings as defaults), --report-to tensorboard (the
event files hold each step's scalars and each evaluation's metrics), and two processes equal one (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from rsg_eval.training.finetune.config import load_config_set  # noqa: E402
from tests._finetune_utils import learnable_terra, one_thread  # noqa: E402,F401 (one_thread: autouse fixture)

REPO = Path(__file__).resolve().parent.parent
LEARN = dict(epochs=2, batch_size=8, lr=3e-3, warmup_ratio=0.0, max_source_length=64, max_target_length=8,
             eval_batch_size=16)


def _run(model, tmp, name, *, hooks=None, report_to=None, **over):
    from rsg_eval.training.finetune.run import run_finetune

    return run_finetune(model, configs=load_config_set(None, {**LEARN, **over}), tasks=["TERRa"],
                        data=tmp / "data", run=str(tmp / name), checkpoint_dir=tmp / f"ck-{name}", hooks=hooks,
                        report_to=report_to)


def _test_preds(folder: Path) -> list[tuple]:
    from rsg_eval.runs import RunFolder

    return [(r["key"], r["pred"]) for r in RunFolder(folder).read_logs("TERRa", "test")]


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A saved Llama-shaped model folder (tiny-causal written with save_pretrained), and the learnable data."""
    from rsg_eval.models.tiny import build_tiny_causal

    d = tmp_path_factory.mktemp("causal")
    model, tok = build_tiny_causal(seed=3)
    model.save_pretrained(d / "llama")
    tok.save_pretrained(d / "llama")
    learnable_terra(d / "data", n_train=16, n_val=8, n_test=6)
    return d


def test_a_saved_llama_folder_fine_tunes_and_predicts_the_same_at_batch_1_and_16(llama_folder):
    from rsg_eval.models.loading import load_model
    from rsg_eval.scoring import predict, score_choices

    d = llama_folder
    out = _run(str(d / "llama"), d, "run-llama")
    hist = out.results["TERRa"].state.history
    assert out.trained == ["TERRa"] and len(hist) == 2
    best = out.results["TERRa"].best_dir
    loaded = load_model(best, causal_ok=True)  # best/ holds config + tokenizer: a model folder
    assert loaded.info["kind"] == "causal"
    logs = __import__("rsg_eval.runs", fromlist=["RunFolder"]).RunFolder(d / "run-llama").read_logs("TERRa", "test")
    prompts, choices = [r["prompt"] for r in logs], [r["choices"] for r in logs]
    s1 = score_choices(loaded.model, loaded.tokenizer, prompts, choices, batch_size=1)
    s16 = score_choices(loaded.model, loaded.tokenizer, prompts, choices, batch_size=16)
    labels = logs[0]["labels"]
    assert predict(s1) == predict(s16)
    assert [labels[i] for i in predict(s16)] == [r["pred"] for r in logs]  # the run's own predictions
    assert max(abs(a - b) for x, y in zip(s1, s16) for a, b in zip(x, y)) < 1e-4


def test_tiny_causal_learns_and_a_killed_run_resumes_to_the_same_results(llama_folder, tmp_path):
    from rsg_eval.runs import RunFolder
    from rsg_eval.training.finetune.loop import Hooks

    (tmp_path / "data").symlink_to(llama_folder / "data")

    class Killed(Exception):
        pass

    def kill(state, loss):
        if state.step == 3:
            raise Killed

    clean = _run("tiny-causal", tmp_path, "clean", save_every=1, epochs=3)
    rows = clean.results["TERRa"].state.history
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    with pytest.raises(Killed):
        _run("tiny-causal", tmp_path, "killed", save_every=1, epochs=3, hooks=lambda task: Hooks(on_step=kill))
    again = _run("tiny-causal", tmp_path, "killed", save_every=1, epochs=3)
    assert again.results["TERRa"].resumed_from == 3
    a, b = RunFolder(tmp_path / "clean"), RunFolder(tmp_path / "killed")
    assert a.read_epochs() == b.read_epochs()
    assert _test_preds(a.path) == _test_preds(b.path)


@pytest.mark.parametrize("model", ["tiny", "tiny-causal"])
def test_lora_best_checkpoint_is_an_adapter_that_predicts_as_the_run(tmp_path, model):
    """Both kinds: the run evaluates through the unmerged adapter (for a decoder-only model its scorer must reach
    the hidden states under peft's wrapper), and best/ reloads merged to the same predictions."""
    pytest.importorskip("peft")
    from rsg_eval.models.loading import load_model
    from rsg_eval.runs import RunFolder
    from rsg_eval.scoring import predict, score_choices

    learnable_terra(tmp_path / "data", n_train=16, n_val=8, n_test=6)
    out = _run(model, tmp_path, "lora", lora=4, lr=1e-2)
    best = out.results["TERRa"].best_dir
    cfg = json.loads((best / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == model and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert not (best / "config.json").exists()
    logs = RunFolder(tmp_path / "lora").read_logs("TERRa", "test")
    loaded = load_model(best, causal_ok=model != "tiny")
    assert loaded.info["source"] == "lora"
    scores = score_choices(loaded.model, loaded.tokenizer, [r["prompt"] for r in logs], [r["choices"] for r in logs],
                           batch_size=16)
    assert [logs[0]["labels"][i] for i in predict(scores)] == [r["pred"] for r in logs]
    for got, r in zip(scores, logs):  # merged on load vs the run's merge: the same sums to float rounding
        assert max(abs(a - b) for a, b in zip(got, r["scores"])) < 1e-3
    # the checkpoint holds what trained only (the adapter's A and B), marked so: the frozen base is not saved again
    from safetensors import safe_open

    with safe_open(str(best / "model.safetensors"), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert meta.get("rsg_weights") == "trainable"
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    # and the adapter really sits on the untouched base: reloading best/ over a fresh base gave the run's scores above


def test_adafactor_defaults_and_a_run():
    from rsg_eval.training.finetune.config import FinetuneConfig

    cfg = load_config_set(None, {"optimizer": "adafactor"}).for_task("TERRa")
    assert (cfg.lr, cfg.schedule, cfg.warmup_ratio) == (1e-3, "constant", 0.0)
    cfg = load_config_set(None, {"optimizer": "adafactor", "lr": 5e-4, "schedule": "linear"}).for_task("TERRa")
    assert (cfg.lr, cfg.schedule) == (5e-4, "linear")  # what the user sets wins
    # the new fields are recorded only when set: runs written before them keep their fingerprint
    assert "optimizer" not in FinetuneConfig().record() and "lora" not in FinetuneConfig().record()
    assert load_config_set(None, {"optimizer": "adafactor"}).for_task("TERRa").record()["optimizer"] == "adafactor"


def test_report_to_tensorboard_logs_every_step_and_evaluation(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rsg_eval.runs import RunFolder

    learnable_terra(tmp_path / "data", n_train=16, n_val=8, n_test=4)
    out = _run("tiny", tmp_path, "tb", report_to="tensorboard", optimizer="adafactor")
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"TERRa/train/loss", "TERRa/train/lr", "TERRa/train/grad_norm", "TERRa/train/tokens_per_s",
            "TERRa/eval/acc", "TERRa/eval/score", "TERRa/eval/train_loss"} <= tags
    steps = out.results["TERRa"].state.step
    assert [e.step for e in acc.Scalars("TERRa/train/loss")] == list(range(1, steps + 1))
    # Adafactor: the constant schedule, no warm-up (the --lr given here, 3e-3)
    assert all(e.value == pytest.approx(LEARN["lr"]) for e in acc.Scalars("TERRa/train/lr"))
    rows = RunFolder(tmp_path / "tb").read_epochs()
    assert [(e.step, e.value) for e in acc.Scalars("TERRa/eval/acc")] == \
        [(r["step"], pytest.approx(r["acc"])) for r in rows]
    # the loss at an evaluation is the token-weighted mean of the steps since the previous one (epochs.csv)
    losses = [e.value for e in acc.Scalars("TERRa/train/loss")]
    assert min(losses) < losses[0]


@pytest.mark.slow
def test_two_processes_match_one_for_a_decoder_only_model(llama_folder, tmp_path):
    """torchrun, two CPU processes (gloo), batch 4 each vs one process with batch 8, tiny-causal: the same losses
    and val metrics."""
    d = llama_folder
    (tmp_path / "data").symlink_to(d / "data")
    one = _run("tiny-causal", tmp_path, "one")
    args = ["finetune", "--model", "tiny-causal", "--data", str(d / "data"), "--tasks", "TERRa", "--epochs", "2",
            "--batch-size", "4", "--lr", str(LEARN["lr"]), "--warmup-ratio", "0", "--max-source-length", "64",
            "--max-target-length", "8", "--run", str(tmp_path / "two"), "--checkpoint-dir", str(tmp_path / "ck2"),
            "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rsg_eval.cli", "--", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from rsg_eval.runs import RunFolder

    rows1, rows2 = one.results["TERRa"].state.history, RunFolder(tmp_path / "two").read_epochs()
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1]
    for a, b in zip(rows1, rows2):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["acc"] == pytest.approx(a["acc"], abs=1e-6)


def test_a_killed_lora_run_resumes_to_the_same_results(tmp_path):
    pytest.importorskip("peft")
    from rsg_eval.runs import RunFolder
    from rsg_eval.training.finetune.loop import Hooks

    learnable_terra(tmp_path / "data", n_train=16, n_val=8, n_test=4)

    class Killed(Exception):
        pass

    def kill(state, loss):
        if state.step == 3:
            raise Killed

    _run("tiny", tmp_path, "clean", lora=4, lr=1e-2, save_every=1)
    with pytest.raises(Killed):
        _run("tiny", tmp_path, "killed", lora=4, lr=1e-2, save_every=1, hooks=lambda task: Hooks(on_step=kill))
    again = _run("tiny", tmp_path, "killed", lora=4, lr=1e-2, save_every=1)
    assert again.results["TERRa"].resumed_from == 3
    a, b = RunFolder(tmp_path / "clean"), RunFolder(tmp_path / "killed")
    assert a.read_epochs() == b.read_epochs()
    assert _test_preds(a.path) == _test_preds(b.path)
