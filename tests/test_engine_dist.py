"""The engine's data parallelism on two gloo CPU processes, for both recipes: one process, DDP and FSDP2 give the
same per-step losses (gradient accumulation included) and the same final metrics; a run killed under FSDP and
rerun ends where the uninterrupted one does; the checkpoint FSDP writes is full weights that `--model` loads.

Tolerance: relative 1e-4 on losses and weights (the processes sum the same terms in another order, in float32),
exact on accuracies (the same predictions).
"""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
from _warm_rsg import warm_spawn

torch = pytest.importorskip("torch")

from tests._finetune_utils import learnable_terra, one_thread  # noqa: E402,F401  (one_thread: autouse fixture)

pytestmark = pytest.mark.slow

# fine-tuning: batch 4 per step in all (one process x 4, or two x 2), accumulation 2, dropout off (the processes'
# dropout streams differ), a step checkpoint after every step (the kill test resumes from one)
FT = dict(epochs=2, lr=3e-3, warmup_ratio=0.0, max_source_length=48, max_target_length=8, eval_batch_size=16,
          grad_accum=2, dropout=0.0, save_every=1)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


class _Kill(Exception):
    pass


def _finetune(root: Path, name: str, mode: str | None, world: int, kill_at: int = 0) -> dict:
    """One `run_finetune` of TERRa into root/name; per-step losses recorded (rank 0 writes them to steps.json)."""
    from rsg_eval.engine.runtime import env_layout
    from rsg_eval.training.finetune.config import load_config_set
    from rsg_eval.training.finetune.loop import Hooks
    from rsg_eval.training.finetune.run import run_finetune

    steps: list[float] = []

    def on_step(state, loss):
        steps.append(loss)
        if kill_at and state.step == kill_at:
            raise _Kill

    kw = dict(configs=load_config_set(None, dict(FT, batch_size=4 // world)), tasks=["TERRa"],
              data=root / "data", run=str(root / name / "run"), checkpoint_dir=root / name / "ck",
              hooks=lambda task: Hooks(on_step=on_step), sharding_mode=mode, dist_timeout=120)
    try:
        run_finetune("tiny", **kw)
    except _Kill:
        run_finetune("tiny", **kw)   # the rerun resumes from the step checkpoint
    if env_layout().main:
        (root / name / "steps.json").write_text(json.dumps(steps))
    return {"steps": steps}


# (name, sharding, kill at step): one launch of two processes runs them one after the other (start-up is most of
# the cost of a small run)
FT_RUNS = (("ddp", "ddp", 0), ("fsdp", "fsdp", 0), ("fsdp-killed", "fsdp", 3))


def _ft_worker(rank: int, world: int, port: int, root: str) -> None:
    from rsg_eval.engine import collective

    _env(rank, world, port)
    for name, mode, kill_at in FT_RUNS:
        _finetune(Path(root), name, mode, world, kill_at)
    collective.leave()


def _spawn(warm_bin: Path, fn, *args) -> None:
    """Two processes running fn(rank, *args), forked from the warm server (tests/_warm_rsg.py) rather than spawned:
    the same fresh process per rank, without importing torch twice more."""
    warm_spawn(warm_bin, fn, *args, nprocs=2)


def _ft_result(folder: Path) -> tuple[list[float], list[dict], dict]:
    steps = json.loads((folder / "steps.json").read_text())
    with open(folder / "run" / "epochs.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    metrics = json.loads((folder / "run" / "metrics.json").read_text())["tasks"]["TERRa"]
    return steps, rows, metrics


@pytest.fixture(scope="module")
def ft_runs(tmp_path_factory, warm_rsg):
    root = tmp_path_factory.mktemp("ft")
    learnable_terra(root / "data", n_train=12, n_val=8, n_test=4)
    _finetune(root, "one", None, 1)
    _spawn(warm_rsg, _ft_worker, 2, _port(), str(root))
    return root


def _same_run(a: Path, b: Path) -> None:
    sa, ra, ma = _ft_result(a)
    sb, rb, mb = _ft_result(b)
    assert len(sa) == len(sb) == 4   # 12 pairs: 3 micro-batches of 4, 2 optimizer steps an epoch, 2 epochs
    assert sb == pytest.approx(sa, rel=1e-4)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert float(y["train_loss"]) == pytest.approx(float(x["train_loss"]), rel=1e-4)
        assert float(y["acc"]) == float(x["acc"])
    assert mb == pytest.approx(ma, rel=1e-6)


def test_finetune_ddp_and_fsdp_match_one_process(ft_runs):
    _same_run(ft_runs / "one", ft_runs / "ddp")
    _same_run(ft_runs / "one", ft_runs / "fsdp")
    cfg = json.loads((ft_runs / "fsdp" / "run" / "config.json").read_text())
    assert (cfg["world_size"], cfg["sharding"]) == (2, "fsdp")


def test_finetune_killed_under_fsdp_resumes_to_the_same_result(ft_runs):
    # the first call recorded steps 1-3 and was killed mid-epoch; the rerun went on from step 3's checkpoint
    _same_run(ft_runs / "fsdp", ft_runs / "fsdp-killed")


def test_the_fsdp_checkpoint_is_full_weights_that_model_loads(ft_runs):
    from rsg_eval.models.loading import load_model

    one = load_model(str(ft_runs / "one" / "ck" / "TERRa" / "best")).model.state_dict()
    fsdp = load_model(str(ft_runs / "fsdp" / "ck" / "TERRa" / "best")).model.state_dict()
    assert set(one) == set(fsdp)
    for k in one:
        torch.testing.assert_close(fsdp[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------- train-hmtl
# "total" reading with 2 sequences per micro-step: the two processes get different tasks in a micro-step, which
# DDP handles as unused parameters and FSDP by zero-weight batches; head dropout off
HM = dict(model="tiny", corpus="sample", epochs=2, schedule="cosine", lr_min=1e-5, lr=3e-3, max_steps_per_epoch=2,
          max_source_length=48, max_target_length=16, gradient_checkpointing=True, batch_reading="total",
          head_dropout=0.0, batch_size=2)


HM_RUNS = (("ddp", "ddp", 0), ("fsdp", "fsdp", 0), ("fsdp-killed", "fsdp", 3))


def _hm_worker(rank: int, world: int, port: int, root: str) -> None:
    _env(rank, world, port)
    from rsg_eval.engine import collective
    from rsg_eval.training.hmtl.train import TrainConfig, train

    for name, mode, kill_at in HM_RUNS:
        cfg = TrainConfig(out=str(Path(root) / name), grad_accum=1, sharding=mode, save_every=1, dist_timeout=120,
                          **HM)

        def on_step(g, kill_at=kill_at):
            if kill_at and g == kill_at:
                raise _Kill

        try:
            train(cfg, progress=False, on_step=on_step)
        except _Kill:
            train(cfg, progress=False)
    collective.leave()


def _hm_rows(out: Path) -> list[dict]:
    with open(out / "losses.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _hm_same(a: Path, b: Path) -> None:
    from rsg_eval.models.hierarchical import load_hierarchical

    ra, rb = _hm_rows(a), _hm_rows(b)
    assert [(r["epoch"], r["split"]) for r in ra] == [(r["epoch"], r["split"]) for r in rb]
    for x, y in zip(ra, rb):
        for k in x:
            if k not in ("epoch", "split") and x[k]:
                assert float(y[k]) == pytest.approx(float(x[k]), rel=1e-4, abs=1e-6), (x["split"], k)
    m1, _ = load_hierarchical(a / "final")
    m2, _ = load_hierarchical(b / "final")
    s1, s2 = m1.state_dict(), m2.state_dict()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def hm_runs(tmp_path_factory, warm_rsg):
    from rsg_eval.training.hmtl.train import TrainConfig, train

    root = tmp_path_factory.mktemp("hm")
    # one process with accumulation 2 reads the global slots two processes read with accumulation 1
    train(TrainConfig(out=str(root / "one"), grad_accum=2, **HM), progress=False)
    _spawn(warm_rsg, _hm_worker, 2, _port(), str(root))
    return root


def test_hmtl_ddp_and_fsdp_match_one_process(hm_runs):
    """(Was tests/test_hmtl_dist.py for the hand-written bucketed all-reduce, under the per-task reading; the
    "total" reading here is the harder case: the processes run different tasks in a micro-step.)"""
    _hm_same(hm_runs / "one", hm_runs / "ddp")
    _hm_same(hm_runs / "one", hm_runs / "fsdp")
    # one process tokenised each split (holding the cache's lock), the other opened that cache
    assert sorted(p.name for p in (hm_runs / "ddp" / "cache").glob("*/*")) == ["train", "val"]


def test_hmtl_killed_under_fsdp_resumes_to_the_same_result(hm_runs):
    _hm_same(hm_runs / "fsdp", hm_runs / "fsdp-killed")
