"""Timing shared by the benchmarks: a clock read only after the device has finished the work queued before it.

CUDA kernels run asynchronously: without a `torch.cuda.synchronize()` at both ends a timer measures how fast Python
queues kernels, not how fast the GPU runs them. Every benchmark reads its clock through `sync` or `Stopwatch`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch


def sync(device: Any = None) -> None:
    """Wait for the device's queued work (a no-op on CPU). device: a torch.device, "cuda:N", or None = every GPU
    this process touched (the current one)."""
    if not torch.cuda.is_available():
        return
    if device is None:
        torch.cuda.synchronize()
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Stopwatch:
    """`with Stopwatch(device) as sw: ...` -> sw.seconds (wall) and sw.cpu_seconds (this process), both ends
    after a device sync."""

    def __init__(self, device: Any = None) -> None:
        self.device = device
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t
        self.cpu_seconds = time.process_time() - self._c


def best_of(fns: Sequence[Callable[[], Any]], repeats: int, device: Any = None, warmup: int = 1) -> list[float]:
    """Fastest wall time of each function over `repeats` rounds, the functions taking turns within a round so that
    load from other processes hits them alike; `warmup` untimed rounds first (allocator, kernels, autotuning)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(max(1, repeats)):
        for i, fn in enumerate(fns):
            with Stopwatch(device) as sw:
                fn()
            best[i] = min(best[i], sw.seconds)
    return best
