"""How many CPU threads torch uses, chosen by the commands that run a model (zeroshot, finetune, train-hmtl).

On a CPU, torch starts one thread per core. For a small model that is slower, not faster: its matmuls are too
small to split, and the threads wait on each other (and on every other job of a shared machine). Measured in one
process on the shared 2-core development machine (docs/benchmarks.md, "CPU threads"): the tiny model scored the
sample's prompts and took training steps 5-15x faster with 1 thread than with 2. A large model's matmuls do split
well, so it keeps torch's default. The size that decides is the weights' bytes (on disk, or the built-in tiny
models), known before the model is loaded.

`--threads N` sets the count; OMP_NUM_THREADS set by the user is respected (nothing is changed then).
"""

from __future__ import annotations

import os
from pathlib import Path

# Weights below this many bytes (fp32: 4 M parameters; the tiny models have 0.3 M) run on 1 CPU thread.
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


def choose_cpu_threads(model: str, device: str | None, requested: int | None) -> int | None:
    """Set torch's CPU thread count for running `model` on `device`: `requested` when given, 1 for a small model
    on the CPU, else leave torch's default. Returns the count set (None: unchanged)."""
    import torch

    if requested is not None:
        torch.set_num_threads(int(requested))
        return int(requested)
    if os.environ.get("OMP_NUM_THREADS") or not on_cpu(device):
        return None
    size = weights_bytes(model)
    if size is None or size >= SMALL_WEIGHTS_BYTES:
        return None
    torch.set_num_threads(1)
    return 1
