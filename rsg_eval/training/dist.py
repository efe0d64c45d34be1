"""Data-parallel plumbing. `accelerate launch` and `torchrun` both set RANK/WORLD_SIZE/LOCAL_RANK and the
rendezvous variables, so reading them here lets the same `rsg finetune` command run on one process or many
with no change by the user. Backend: nccl on CUDA, gloo on CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

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
        if self.active:
            tdist.barrier()

    def all_sum(self, value: float) -> float:
        """Sum a Python float over ranks (float64, so the sum does not depend on the reduction order much)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        tdist.all_reduce(t)
        return float(t.item())

    def all_sum_pair(self, summed: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
        """(`summed` summed over ranks, `same`) as Python floats, read in one device-to-host transfer: the one
        host sync of an optimizer step. `same` is a 0-d value every rank already agrees on (the gradient norm
        after DDP's all-reduce); the reduction runs in float64 like `all_sum`."""
        s = summed.detach().to(torch.float64).reshape(())
        if self.active:
            s = s.to(_comm_device())
            tdist.all_reduce(s)
        both = torch.stack([s, same.detach().to(device=s.device, dtype=torch.float64).reshape(())])
        a, b = both.tolist()
        return a, b

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
    if not tdist.is_initialized():
        timeout = timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_gpu(d))
            tdist.init_process_group("nccl", timeout=timeout)
        else:
            tdist.init_process_group("gloo", timeout=timeout)
    return d


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


# ------------------------------------------------------------------------------------------- gradient buckets

class BucketedGradAverage:
    """Average the gradients of `params` over the process group in flat buckets of about `bucket_mb`, instead of
    one all-reduce per tensor (FRED-T5-1.7B's hierarchical model has 582 gradient tensors, 6.96 GB).

    Buckets follow the reverse of the parameters' order, as DDP's do: a backward pass produces the last layers'
    gradients first. Call `arm()` just before the optimizer step's LAST backward pass: from then on a hook on
    every parameter notes when its gradient is final, and each bucket is launched (asynchronously) as soon as it and
    every bucket before it are complete, so the reduction overlaps the rest of that backward pass. `finish()` (after
    that backward) launches the buckets whose parameters it did not touch, waits for all, and leaves every
    `p.grad` holding the average over ranks (a parameter no rank touched keeps grad None; one touched elsewhere gets
    the others' contribution). Buckets launch in the same order on every rank, so the collectives always match.

    NCCL averages in the reduction (ReduceOp.AVG); gloo has no AVG, so there it sums and divides. At most `window`
    buckets are in flight, so the extra memory is about `window` x `bucket_mb`: the averaged bucket becomes the
    gradient (p.grad is a view into it) instead of being copied back."""

    def __init__(self, params: Any, world: int, *, bucket_mb: float = 200.0, window: int = 2) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.world = world
        self.window = max(1, window)
        self.buckets: list[list[torch.nn.Parameter]] = []
        limit = max(1, int(bucket_mb * 2**20))
        current: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(self.params):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype or p.device != current[0].device):
                self.buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(current)
        self._where = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._armed = False
        self._ready = [0] * len(self.buckets)
        self._seen: set[int] = set()
        self._next = 0
        self._inflight: list[tuple[int, torch.Tensor, Any]] = []
        self.launched_in_backward = 0    # buckets launched by the hooks in the last step (for tests and reports)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    def _op(self) -> Any:
        if tdist.get_backend() == "nccl":
            return tdist.ReduceOp.AVG, False
        return tdist.ReduceOp.SUM, True

    def arm(self) -> None:
        """The next backward pass is the step's last: launch buckets as they complete."""
        self._armed = True
        self._ready = [0] * len(self.buckets)
        self._seen = set()
        self._next = 0
        self.launched_in_backward = 0

    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed or id(p) in self._seen:
            return
        self._seen.add(id(p))
        i = self._where[id(p)]
        self._ready[i] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1
            self.launched_in_backward += 1

    def _launch(self, i: int) -> None:
        while len(self._inflight) >= self.window:
            self._complete(self._inflight.pop(0))
        bucket = self.buckets[i]
        flat = torch.empty(sum(p.numel() for p in bucket), dtype=bucket[0].dtype, device=bucket[0].device)
        off = 0
        for p in bucket:
            n = p.numel()
            if p.grad is None:
                flat[off:off + n].zero_()
            else:
                flat[off:off + n].copy_(p.grad.reshape(-1))
            off += n
        op, _ = self._op()
        self._inflight.append((i, flat, tdist.all_reduce(flat, op=op, async_op=True)))

    def _complete(self, item: tuple[int, torch.Tensor, Any]) -> None:
        i, flat, work = item
        work.wait()
        if self._op()[1]:
            flat.div_(self.world)
        off = 0
        for p in self.buckets[i]:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p)
            off += n

    def finish(self) -> None:
        """Launch what is left, wait for every bucket; p.grad = the average over ranks."""
        if not self._armed:  # arm() was not called: nothing launched yet
            self.arm()
            self.launched_in_backward = 0
        self._armed = False
        for i in range(self._next, len(self.buckets)):
            self._launch(i)
        self._next = len(self.buckets)
        while self._inflight:
            self._complete(self._inflight.pop(0))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def shard(n: int, d: Dist, chunk: int = 1) -> list[int]:
    """Start offsets of this rank's chunks of a range of n items cut into `chunk`-sized pieces, dealt round-robin
    over the ranks (every rank gets a share; together they cover the range exactly once)."""
    return [s for k, s in enumerate(range(0, n, chunk)) if k % d.world == d.rank]


def all_sum_floats(values: list[float], d: Dist) -> list[float]:
    """Element-wise sum over ranks of a list of floats (float64), in one collective."""
    if not d.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    tdist.all_reduce(t)
    return t.tolist()


class file_lock:
    """`with file_lock(path):` one process at a time (any process on this machine, or on others sharing the folder
    where the filesystem supports locks): an exclusive flock on `path`, created if needed. Where fcntl does not
    exist (Windows) it locks nothing."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self._fh: Any = None

    def __enter__(self) -> "file_lock":
        try:
            import fcntl
        except ImportError:
            return self
        self._fh = open(self.path, "a+b")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
