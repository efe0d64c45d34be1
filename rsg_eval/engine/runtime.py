"""The runtime every command that runs a model shares: the process layout (rank, world, local rank), the one device
rule and the one bf16 rule.

`accelerate launch` and `torchrun` both set RANK/WORLD_SIZE/LOCAL_RANK and the rendezvous variables, so reading
them here lets the same `rsg finetune`, `rsg train-hmtl` or `rsg zeroshot` command run on one process or many with
no change by the user. Backend: nccl on CUDA, gloo on CPU. The process group itself is joined through
rsg_eval.engine.collective (the only module besides sharding that calls torch.distributed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import contextlib
from typing import Iterator

import torch

from rsg_eval.engine import collective
from rsg_eval.core.errors import RSGError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        collective.barrier(self)

    def all_sum(self, value: float) -> float:
        """Sum a Python float over ranks (float64, so the sum does not depend on the reduction order much)."""
        return collective.all_sum_floats([value], self)[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        return collective.gather(obj, self)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        return collective.broadcast(obj, self)


# How long a collective may wait for the slowest rank before the job fails. torch's NCCL default is 10 minutes,
# shorter than rank 0 writing a 21 GB FRED-T5-1.7B checkpoint to a slow disk; 2 hours still ends a truly hung job.
DEFAULT_TIMEOUT_S = 7200.0


def env_layout() -> Dist:
    """The process layout the launcher (torchrun, accelerate launch) put in the environment, without joining any
    group: RANK, WORLD_SIZE, LOCAL_RANK (default: RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    return Dist(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", str(rank))))


def init_from_env(timeout_s: float | None = None) -> Dist:
    """Join the process group the launcher described in the environment; a lone process gets Dist().

    timeout_s: how long any collective may wait (default DEFAULT_TIMEOUT_S)."""
    d = env_layout()
    if not d.active:
        return d
    if not collective.is_initialized():
        timeout = timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_gpu(d))
            collective.join("nccl", timeout)
        else:
            collective.join("gloo", timeout)
        # Who is who, for naming a process that dies later (gone_peers): one small gather while all are alive
        import socket

        if collective.is_initialized():
            try:
                _PEERS[:] = d.gather((socket.gethostname(), os.getpid()))
            except (RuntimeError, ValueError):  # naming a dead peer is a nicety: never a reason to fail here
                _PEERS.clear()
    return d


_PEERS: list = []   # (host, PID) of each rank, filled by init_from_env


def gone_peers() -> str | None:
    """The processes of this launch that are no longer running, in words ("process 1 of 2 (PID 4242)"), for
    the one line that says why a run stopped (torchrun stops the others with SIGTERM when one is killed, and a
    collective with a dead process fails with a socket error that names nobody); None when none is known gone.
    Only processes on this host can be checked."""
    import socket

    me = socket.gethostname()
    gone = []
    for rank, (host, pid) in enumerate(_PEERS):
        if host != me or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            gone.append(f"process {rank} of {len(_PEERS)} (PID {pid})")
        except OSError:
            pass
    if not gone:
        return None
    return (f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone (killed, or out of memory); the launcher "
            "stopped the others. Finished tasks are kept: rerun the same command to resume")


def local_gpu(d: Dist) -> int:
    """This process's GPU index: LOCAL_RANK, or 0 when the launcher shows each process only its own GPU
    (CUDA_VISIBLE_DEVICES per process, as `srun --gpus-per-task=1` does)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if d.local_rank >= count:
        raise RSGError(f"LOCAL_RANK is {d.local_rank} but this process sees only {count} GPU(s)",
                       field="LOCAL_RANK", expected=f"0..{count - 1}")
    return d.local_rank


def resolve_device(spec: str | None, d: Dist) -> torch.device:
    """The device this process trains on, from --device (cpu, cuda, cuda:N or None) and the process layout.

    Under a launcher every process takes its own GPU (`local_gpu`): "cuda" and None mean that GPU. An explicit
    index would put every rank on the same GPU (NCCL then fails, or the ranks crowd one device), so it is refused
    unless each process sees a single GPU anyway."""
    if spec is None or spec == "auto":
        return torch.device("cuda", local_gpu(d)) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise RSGError(f"unknown device {spec!r}", field="device", expected="cpu, cuda, cuda:N") from None
    if dev.type != "cuda":
        return dev
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if d.active and dev.index is not None and visible != 1:
        raise RSGError(f"--device {spec} under a launcher with {d.world} processes would put every process on GPU "
                       f"{dev.index}; each process takes its own GPU (cuda:LOCAL_RANK) when you pass --device cuda "
                       f"or leave --device out", field="device", expected="cuda")
    if not torch.cuda.is_available():
        raise RSGError("CUDA device requested but torch sees no GPU", field="device", expected="cpu")
    if dev.index is None:
        return torch.device("cuda", local_gpu(d))
    return dev


def default_device(d: Dist) -> torch.device:
    return resolve_device(None, d)


def setup(device: str | None = None, timeout_s: float | None = None) -> tuple[Dist, torch.device]:
    """Join the launcher's process group (if any) and pick this process's device; a CUDA device becomes the
    current one. The usual first line of a command that trains."""
    d = init_from_env(timeout_s)
    dev = resolve_device(device, d)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return d, dev


# ------------------------------------------------------------------------------------------------- precision

BF16_SETTINGS = ("auto", "on", "off")


def use_bf16(setting: str | bool | None, device: torch.device) -> bool:
    """The one bf16 rule of training: bf16 autocast (fp32 master weights) on a CUDA GPU, never fp16, never on CPU.

    setting: "auto" / None = on where the GPU computes bf16 natively (not V100/T4 emulation); "on" / True = on
    (CUDA); "off" / False = off. On CPU it is always off: CPU autocast would change the arithmetic of the exact
    one-process references the tests compare against, and gains nothing on the CPUs we run."""
    if device.type != "cuda":
        return False
    if setting is None or setting == "auto":
        from rsg_eval.models.loading import cuda_bf16_native  # native bf16 only, not V100/T4 emulation

        return cuda_bf16_native()
    if isinstance(setting, str):
        return setting.lower() in ("on", "true", "yes", "1")
    return bool(setting)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    """bf16 autocast on `device` when `enabled` (the only precision training uses); a no-op otherwise."""
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield
