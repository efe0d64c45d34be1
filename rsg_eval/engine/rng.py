"""Random generator states of one process (python, numpy, torch CPU, every CUDA device) as JSON-able values, so
they sit in a checkpoint's meta.json next to the position they belong to, one entry per rank, and a resumed run
draws exactly what the uninterrupted one would have drawn (dropout masks, shuffles)."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def snapshot() -> dict[str, Any]:
    """This process's generator states as they are (cheap: taken at every step boundary, converted to JSON
    by `to_json` only when a checkpoint is written)."""
    out: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def to_json(snap: dict[str, Any]) -> dict[str, Any]:
    """A `snapshot` as JSON-able values."""
    np_state = snap["numpy"]
    out: dict[str, Any] = {
        "python": _py_state_to_json(snap["python"]),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(snap["torch"].numpy().tobytes()).decode("ascii"),
    }
    if "cuda" in snap:
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in snap["cuda"]]
    return out


def state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and every CUDA device) generator states of this process, JSON-able."""
    return to_json(snapshot())


def restore(state: dict[str, Any]) -> None:
    """Set this process's generators from a `state()` / `to_json` value. Entries written before python and numpy
    were captured (train-hmtl before the engine: torch and cuda only) restore what they hold."""
    if "python" in state:
        random.setstate(_py_state_from_json(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_as_tensor(s) for s in state["cuda"]])


def pick(states: list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """This rank's entry of a per-rank list (rank 0's when the list is shorter; None when empty)."""
    if not states:
        return None
    return states[rank] if rank < len(states) else states[0]


def _as_tensor(v: Any) -> torch.Tensor:
    # base64 (JSON) or, in trainer states written before the engine, a uint8 tensor as torch.save stored it
    return v.clone() if isinstance(v, torch.Tensor) else _bytes_tensor(v)


def _bytes_tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()


def _py_state_to_json(st: tuple) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_state_from_json(js: list) -> tuple:
    return (js[0], tuple(js[1]), js[2])
