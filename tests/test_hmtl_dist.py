"""`rsg train-hmtl` on two gloo processes matches one process: the bucketed gradient averaging (overlapping the
last backward), the val losses computed in shards, and the corpus tokenised by one process under the cache lock."""

from __future__ import annotations

import csv
import os
import socket

import pytest
import torch

from _hmtl_utils import one_thread  # noqa: F401  (autouse fixture)

pytestmark = pytest.mark.slow

# dropout off everywhere (heads included), so that the processes' different dropout seeds do not matter
KW = dict(model="tiny", corpus="sample", epochs=2, schedule="cosine", lr_min=1e-5, lr=3e-3,
          max_steps_per_epoch=2, max_source_length=48, max_target_length=16, gradient_checkpointing=True,
          batch_reading="per-task", head_dropout=0.0, batch_size=2)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from rsg_eval.training.hmtl.train import TrainConfig, train

    train(TrainConfig(out=out, grad_accum=1, **KW), progress=False)


def _rows(out):
    with open(os.path.join(out, "losses.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_two_processes_match_one(tmp_path):
    """2 processes x grad_accum 1 read the same global slots per step as 1 process x grad_accum 2 (BatchPlan), so
    train and val losses and the final weights agree to float rounding."""
    import torch.multiprocessing as mp

    from rsg_eval.training.hmtl.train import TrainConfig, train
    from rsg_eval.models.hierarchical import load_hierarchical

    one = tmp_path / "one"
    train(TrainConfig(out=str(one), grad_accum=2, **KW), progress=False)
    two = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(two)), nprocs=2, join=True, start_method="spawn")
    r1, r2 = _rows(one), _rows(two)
    assert [(r["epoch"], r["split"]) for r in r1] == [(r["epoch"], r["split"]) for r in r2]
    for a, b in zip(r1, r2):
        for k in a:
            if k not in ("epoch", "split") and a[k]:
                assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-4, abs=1e-6), (a["split"], k)
    m1, _ = load_hierarchical(one / "final")
    m2, _ = load_hierarchical(two / "final")
    for (n, p1), (_, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-6, msg=n)
    # one process tokenised each split (holding the cache's lock), the other opened that cache
    assert sorted(p.name for p in (two / "cache").glob("*/*")) == ["train", "val"]
