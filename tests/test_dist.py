"""Several processes, checked on one CPU by faking the launcher's environment: the process-group timeout option,
the device each rank takes (an explicit cuda:N is refused), and the collective helpers in one process."""

from __future__ import annotations

from datetime import timedelta

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.core.errors import RSGError  # noqa: E402
from rsg_eval.engine import collective as C  # noqa: E402
from rsg_eval.engine import runtime as D  # noqa: E402


@pytest.fixture
def rank1_of_2(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    return D.env_layout()


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_env_layout_reads_the_launcher(rank1_of_2, monkeypatch):
    assert rank1_of_2 == D.Dist(rank=1, world=2, local_rank=1) and rank1_of_2.active
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.env_layout() == D.Dist()


def test_an_explicit_gpu_under_a_launcher_is_refused(rank1_of_2, monkeypatch):
    with pytest.raises(RSGError, match="would put every process on GPU 0") as exc:
        D.resolve_device("cuda:0", rank1_of_2)
    assert exc.value.field == "device"
    _gpus(monkeypatch, 4)
    with pytest.raises(RSGError, match="GPU 0"):
        D.resolve_device("cuda:0", rank1_of_2)
    # "cuda" or nothing: this process's own GPU
    assert D.resolve_device("cuda", rank1_of_2) == torch.device("cuda", 1)
    assert D.resolve_device(None, rank1_of_2) == torch.device("cuda", 1)
    assert D.resolve_device("cpu", rank1_of_2) == torch.device("cpu")
    # each process sees only its own GPU (CUDA_VISIBLE_DEVICES per process): cuda:0 is that GPU, and so is "cuda"
    _gpus(monkeypatch, 1)
    assert D.resolve_device("cuda:0", rank1_of_2) == torch.device("cuda", 0)
    assert D.resolve_device("cuda", rank1_of_2) == torch.device("cuda", 0)
    # a lone process may name any GPU
    _gpus(monkeypatch, 4)
    assert D.resolve_device("cuda:3", D.Dist()) == torch.device("cuda", 3)
    with pytest.raises(RSGError, match="LOCAL_RANK is 5"):
        D.resolve_device("cuda", D.Dist(rank=5, world=8, local_rank=5))


def test_cuda_without_a_gpu_and_unknown_devices():
    _no = D.Dist()
    if not torch.cuda.is_available():
        with pytest.raises(RSGError, match="sees no GPU"):
            D.resolve_device("cuda", _no)
    with pytest.raises(RSGError, match="unknown device"):
        D.resolve_device("tpu:0", _no)


def test_the_process_group_gets_the_timeout(rank1_of_2, monkeypatch):
    seen = []
    monkeypatch.setattr(C.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(C.tdist, "init_process_group", lambda backend, **kw: seen.append((backend, kw)))
    _gpus(monkeypatch, 0)
    assert D.init_from_env() == rank1_of_2
    assert seen[-1] == ("gloo", {"timeout": timedelta(seconds=D.DEFAULT_TIMEOUT_S)})
    assert D.DEFAULT_TIMEOUT_S >= 3600  # much longer than NCCL's 10 minutes
    D.init_from_env(90)
    assert seen[-1][1]["timeout"] == timedelta(seconds=90)


def test_finetune_refuses_a_fixed_gpu_under_a_launcher_before_any_work(rank1_of_2, monkeypatch, tmp_path):
    """`rsg finetune --device cuda:0` under torchrun: one clear error, and nothing written (it used to put every
    rank on GPU 0)."""
    from rsg_eval.training.finetune import run as finetune
    from rsg_eval.training.finetune.config import load_config_set

    timeouts = []
    monkeypatch.setattr(finetune, "init_from_env", lambda t=None: timeouts.append(t) or rank1_of_2)
    with pytest.raises(RSGError, match="every process on GPU 0"):
        finetune.run_finetune("tiny", configs=load_config_set(None, {}), tasks=["TERRa"], data="sample",
                              run=str(tmp_path / "run"), checkpoint_dir=tmp_path / "ck", device="cuda:0",
                              dist_timeout=123)
    assert timeouts == [123]
    assert list(tmp_path.iterdir()) == []


def test_cli_passes_the_timeout(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from rsg_eval.cli import app
    from rsg_eval.training.finetune import run as finetune

    class Stop(Exception):
        pass

    seen = []

    def fake(t=None):
        seen.append(t)
        raise Stop

    monkeypatch.setattr(finetune, "init_from_env", fake)
    res = CliRunner().invoke(app, ["finetune", "--model", "tiny", "--data", "sample", "--tasks", "TERRa",
                                   "--dist-timeout", "45", "--run", str(tmp_path / "r"), "-q"])
    assert isinstance(res.exception, Stop) and seen == [45.0]


def test_shards_cover_the_range_once():
    parts = [C.shard(23, D.Dist(rank=r, world=3, local_rank=r), chunk=4) for r in range(3)]
    assert sorted(s for p in parts for s in p) == list(range(0, 23, 4))
    assert parts[0] == [0, 12] and parts[2] == [8, 20]
    assert C.shard(5, D.Dist()) == [0, 1, 2, 3, 4]
    assert C.all_sum_floats([1.5, 2.0], D.Dist()) == [1.5, 2.0]


def test_main_acts_in_one_process_returns_or_raises():
    assert C.main_acts(D.Dist(), lambda: 41 + 1) == 42
    with pytest.raises(RSGError, match="refused"):
        C.main_acts(D.Dist(), lambda: (_ for _ in ()).throw(RSGError("refused")))


def test_read_step_reads_losses_and_norm_together():
    vals, norm = C.read_step(torch.tensor([1.5, 2.5]), torch.tensor(3.0), D.Dist())
    assert vals == [1.5, 2.5] and norm == 3.0
    vals, norm = C.read_step(torch.tensor(4.0), None, D.Dist())
    assert vals == [4.0] and norm != norm  # nan: no gradient


def test_zeroshot_refuses_a_fixed_gpu_or_a_device_map_under_a_launcher_before_any_work(rank1_of_2, monkeypatch,
                                                                                        tmp_path):
    """`rsg zeroshot --device cuda:0` under torchrun would score every shard on GPU 0 (it used to be taken as
    given); `--device-map` needs one process. Both are refused on every process before a run folder exists."""
    from rsg_eval.eval import zeroshot
    from rsg_eval.engine import runtime as dist_mod

    monkeypatch.setattr(dist_mod, "init_from_env", lambda timeout_s=None: rank1_of_2)
    for extra, msg in (({"device": "cuda:0"}, "every process on GPU 0"), ({"device_map": "auto"}, "one process")):
        opts = zeroshot.ZeroShotOptions(model="tiny", data="sample", tasks=["TERRa"], run=str(tmp_path / "run"),
                                        **extra)
        with pytest.raises(RSGError, match=msg):
            zeroshot.run_zeroshot(opts, show_progress=False)
    assert list(tmp_path.iterdir()) == []
    # "cuda" (or nothing) is this process's own GPU, as in fine-tuning
    _gpus(monkeypatch, 2)
    assert zeroshot.device_for(zeroshot.ZeroShotOptions(model="tiny", device="cuda"), rank1_of_2) == "cuda:1"
