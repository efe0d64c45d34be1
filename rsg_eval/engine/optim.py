"""The optimizer factory both recipes use.

AdamW with two parameter groups (decay on matrices; none on biases and norm scales, the usual AdamW practice), with
torch's fused kernel where this torch has one for the device (CUDA; CPU since torch 2.4): one kernel over all
parameters instead of about ten passes per tensor, the same update up to float rounding, and its step counters stay
on the device. transformers' Trainer uses it by default too (`adamw_torch_fused`).

OPTIMIZERS lists the choices; issue 20 adds "adafactor" in `make_optimizer` and `state_bytes` (the memory table,
rsg_eval.bench.memory, reads the optimizer's state size from there, by parameter shape).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from rsg_eval.core.errors import RSGError

OPTIMIZERS = ("adamw",)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: no decay on biases and layer-norm scales (anything 1-d, or named *norm*)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params: Iterable[Any], *, name: str = "adamw", lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """An optimizer over `params` (tensors or `param_groups`; a group's own weight_decay wins over
    `weight_decay`). name: one of OPTIMIZERS."""
    if name not in OPTIMIZERS:
        raise RSGError(f"unknown optimizer {name!r}", field="--optimizer", expected=list(OPTIMIZERS))
    params = list(params)
    # hook (issue 20): `if name == "adafactor": return transformers' Adafactor(params, lr=lr, ...)` here
    kw: dict[str, Any] = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch, a device or a DTensor without the fused kernel
        return torch.optim.AdamW(params, **kw)


def state_bytes_per_param(name: str = "adamw", param_bytes: int = 4) -> float:
    """Optimizer state per parameter in bytes, for the memory table: AdamW keeps two moments in the parameter's
    dtype (fp32 master weights: 8 bytes). Issue 20's Adafactor keeps factored second moments (rows + columns per
    matrix), so its figure depends on the shapes: it belongs in `state_bytes` below."""
    if name == "adamw":
        return 2.0 * param_bytes
    raise RSGError(f"unknown optimizer {name!r}", field="--optimizer", expected=list(OPTIMIZERS))


def state_bytes(shapes: Iterable[tuple[int, ...]], name: str = "adamw", param_bytes: int = 4) -> int:
    """Optimizer state in bytes for parameters of these shapes (hook for optimizers whose state is not a fixed
    multiple of the parameter count)."""
    n = sum(_numel(s) for s in shapes)
    return int(n * state_bytes_per_param(name, param_bytes))


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
