"""How many CPU threads torch uses, chosen by the commands that run a model (zeroshot, finetune, train-hmtl).

On a CPU, torch starts one thread per core whatever else the machine runs. For a small model that is what hurts:
on the 2-core development machine (docs/benchmarks.md, "CPU threads") the tiny model ran 1.5x faster on 2 threads
than on 1 while the machine was quiet, but 4.5x slower on 2 than on 1 while other jobs kept it busy (threads that
wait on a busy core wait on each other too). So a small model gets the idle cores: the cores this process may use less those busy
with other work, at least 1. Busy is measured, not guessed from the load average (which counts kernel threads
blocked on I/O: an idle VM here showed 1.0): the share of non-idle time in /proc/stat over 0.1 s when the command
starts (Linux; elsewhere every core counts as idle). A large model's matmuls split well and it keeps torch's default. The size that
decides is the weights' bytes (on disk, or the built-in tiny models), known before the model is loaded.

`--threads N` sets the count; OMP_NUM_THREADS set by the user is respected (nothing is changed then).
"""

from __future__ import annotations

import os
from pathlib import Path

# Weights below this many bytes (fp32: 4 M parameters; the tiny models have 0.3 M) run on the idle cores only.
SMALL_WEIGHTS_BYTES = 16 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_bytes(model: str) -> int | None:
    """Bytes of a model's weight files: a local folder's (two levels down, for hierarchical checkpoints), a hub
    model's from the local hub cache, 0 for the built-in tiny models; None when unknown."""
    from rsg_eval.models.loading import TINY_CAUSAL_NAME, TINY_NAME

    if model in (TINY_NAME, TINY_CAUSAL_NAME):
        return 0
    path = Path(model).expanduser()
    if path.is_dir():
        files = [f for pattern in ("*", "*/*") for f in path.glob(pattern)
                 if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
        return sum(f.stat().st_size for f in files) if files else None
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(model, name)
            if isinstance(hit, str):
                return Path(hit).stat().st_size
    except Exception:  # noqa: BLE001 - not a hub id, no cache: unknown size, torch's default stays
        return None
    return None


def on_cpu(device: str | None) -> bool:
    """Will the model run on the CPU? `device` as the commands take it (None/auto: the GPU when there is one)."""
    import torch

    if device in (None, "", "auto"):
        return not torch.cuda.is_available()
    return str(device).startswith("cpu")


BUSY_SAMPLE_S = 0.1


def busy_cores(interval: float = BUSY_SAMPLE_S) -> float | None:
    """How many cores other work keeps busy: the machine's non-idle share of CPU time over `interval` seconds
    (/proc/stat's first line: user nice system idle iowait irq softirq steal), times its core count. This process
    sleeps meanwhile, so it measures the others. None where /proc/stat cannot be read."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:9]]
        return sum(ticks), ticks[3] + ticks[4]   # all, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def idle_cores() -> int:
    """Cores this process may use that other work does not keep busy, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    busy = busy_cores()
    if busy is None:   # not measurable here: every core counts as idle
        return cores
    return max(1, min(cores, round(cores - busy)))


def choose_cpu_threads(model: str, device: str | None, requested: int | None) -> int | None:
    """Set torch's CPU thread count for running `model` on `device`: `requested` when given, the idle cores (at
    most torch's default) for a small model on the CPU, else leave torch's default. Returns the count set (None:
    unchanged)."""
    import torch

    if requested is not None:
        torch.set_num_threads(int(requested))
        return int(requested)
    if os.environ.get("OMP_NUM_THREADS") or not on_cpu(device):
        return None
    size = weights_bytes(model)
    if size is None or size >= SMALL_WEIGHTS_BYTES:
        return None
    n = min(torch.get_num_threads(), idle_cores())
    torch.set_num_threads(n)
    return n
