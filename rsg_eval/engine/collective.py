"""Everything the processes of one job say to each other. With rsg_eval.engine.sharding, the only module that calls
torch.distributed: the rest of the code asks here, so the rules (float64 sums, one host read per step, rank 0 acts
and every rank learns the outcome) are written once.

Every function takes the process layout (`rsg_eval.engine.runtime.Dist`, or anything with rank/world/main/active)
and does nothing collective in a lone process, so callers need no `if world > 1`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as tdist

from rsg_eval.core.errors import RSGError

T = TypeVar("T")


# ------------------------------------------------------------------------------------------- the process group

def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def join(backend: str, timeout: dt.timedelta) -> None:
    """Join the process group the launcher described (env:// rendezvous: MASTER_ADDR/PORT, RANK, WORLD_SIZE)."""
    tdist.init_process_group(backend, timeout=timeout)


def leave() -> None:
    """Leave the process group cleanly (a no-op when none was joined): a process that exits with it still up can
    abort in gloo's teardown while another is still running."""
    if is_initialized():
        tdist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors handed to a collective must live: the current GPU under NCCL, else the CPU."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(d: Any) -> None:
    if d.active:
        tdist.barrier()


def leave_together(d: Any, timeout_s: float) -> None:
    """Wait until every process arrives (the main one may still be writing results), at most `timeout_s` under
    gloo; a process that never comes is not waited for (its own error is already on its way)."""
    if not d.active:
        return
    try:
        if tdist.get_backend() == "gloo":
            tdist.monitored_barrier(timeout=dt.timedelta(seconds=timeout_s), wait_all_ranks=True)
        else:
            tdist.barrier()
    except RuntimeError:
        pass


# --------------------------------------------------------------------------------------------------- objects

def gather(obj: Any, d: Any) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out: list[Any] = [None] * d.world
    tdist.all_gather_object(out, obj)
    return out


def gather_to_main(obj: Any, d: Any) -> list[Any] | None:
    """Every rank's object (rank order) on rank 0; None on the others."""
    if not d.active:
        return [obj]
    out = [None] * d.world if d.main else None
    tdist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any, d: Any) -> Any:
    """Rank 0's object on every rank."""
    if not d.active:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def describe(exc: BaseException) -> str:
    """An error as one line for the other processes: an RSGError's own message, else its type and message."""
    return str(exc) if isinstance(exc, RSGError) else f"{type(exc).__name__}: {exc}"


def main_acts(d: Any, act: Callable[[], T], *, share: bool = True) -> T | None:
    """Rank 0 acts, every rank learns the outcome: `act()` runs on rank 0 only; its result (when `share`, else
    None on the other ranks: a lock or a claim that cannot travel) reaches every rank, and when it raises, every
    rank raises too: rank 0 its own exception, the others an error of the same RSGError class with the same
    message (an RSGError for anything else). So no process is left waiting in a collective for a partner that
    stopped: a full disk while rank 0 writes a checkpoint, or a run folder that refuses this configuration, stop
    every process alike."""
    if not d.active:
        return act()
    if d.main:
        try:
            out = act()
        except BaseException as exc:
            kind = type(exc) if isinstance(exc, RSGError) else RSGError
            broadcast(("error", kind, describe(exc)), d)
            raise
        broadcast(("ok", None, out if share else None), d)
        return out
    status, kind, value = broadcast(None, d)
    if status == "error":
        try:
            err = kind(value)
        except Exception:  # an RSGError subclass with a constructor of its own
            err = RSGError(value)
        raise err
    return value


# --------------------------------------------------------------------------------------------------- numbers

def all_sum_floats(values: Sequence[float], d: Any) -> list[float]:
    """Element-wise sum over ranks of a list of floats (float64), in one collective."""
    if not d.active:
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=comm_device())
    tdist.all_reduce(t)
    return t.tolist()


def all_sum_(t: torch.Tensor, d: Any) -> torch.Tensor:
    """Sum a tensor over ranks in place (moved to the collective's device and back if needed); returns it."""
    if not d.active:
        return t
    dev = comm_device()
    if t.device == dev:
        tdist.all_reduce(t)
        return t
    moved = t.to(dev)
    tdist.all_reduce(moved)
    t.copy_(moved)
    return t


def read_step(summed: torch.Tensor, same: torch.Tensor | None, d: Any) -> tuple[list[float], float]:
    """The one host read of an optimizer step: (`summed` (k,) summed over ranks, `same` as a float), in float64.

    `summed` holds per-rank values still on the device (a loss, or one loss per task); `same` is a 0-d value every
    rank already agrees on (the gradient norm after DDP's or FSDP's reduction; None: nan). Both reach the host in
    one transfer, so the step waits for the device once."""
    s = summed.detach().to(torch.float64).reshape(-1)
    if d.active:
        s = all_sum_(s.to(comm_device()), d)
    tail = same.detach().to(device=s.device, dtype=torch.float64).reshape(1) if same is not None \
        else torch.full((1,), float("nan"), dtype=torch.float64, device=s.device)
    vals = torch.cat([s, tail]).tolist()
    return vals[:-1], vals[-1]


def shard(n: int, d: Any, chunk: int = 1) -> list[int]:
    """Start offsets of this rank's chunks of a range of n items cut into `chunk`-sized pieces, dealt round-robin
    over the ranks (every rank gets a share; together they cover the range exactly once)."""
    return [s for k, s in enumerate(range(0, n, chunk)) if k % d.world == d.rank]


# ------------------------------------------------------------------------------------ processes on one machine

class file_lock:
    """`with file_lock(path):` one process at a time (any process on this machine, or on others sharing the folder
    where the filesystem supports locks): an exclusive flock on `path`, created if needed. Where fcntl does not
    exist (Windows) it locks nothing. Used instead of a collective where the wait may outlast any collective's
    timeout (one process tokenising a large corpus while the others wait for its cache)."""

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
