"""Data-parallel plumbing. `accelerate launch` and `torchrun` both set RANK/WORLD_SIZE/LOCAL_RANK and the
rendezvous variables, so reading them here lets the same `rsg finetune` command run on one process or many
with no change by the user. Backend: nccl on CUDA, gloo on CPU."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


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
        if self.active:
            tdist.barrier()

    def all_sum(self, value: float) -> float:
        """Sum a Python float over ranks (float64, so the sum does not depend on the reduction order much)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        tdist.all_reduce(t)
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's object on every rank."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


def _comm_device() -> torch.device:
    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(timeout_s: float | None = None) -> Dist:
    """Join the process group the launcher described in the environment; a lone process gets Dist().

    timeout_s: how long a collective may wait for a slow process (torch's default when None)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not tdist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            tdist.init_process_group("nccl", **kw)
        else:
            tdist.init_process_group("gloo", **kw)
    return Dist(rank=rank, world=world, local_rank=local)


def default_device(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")
