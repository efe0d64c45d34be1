"""The optimizer factory both recipes use.

AdamW with two parameter groups (decay on matrices; none on biases and norm scales, the usual AdamW practice), with
torch's fused kernel where this torch has one for the device (CUDA; CPU since torch 2.4): one kernel over all
parameters instead of about ten passes per tensor, the same update up to float rounding, and its step counters stay
on the device. transformers' Trainer uses it by default too (`adamw_torch_fused`).

Adafactor (`--optimizer adafactor`) is transformers' `Adafactor` (Shazeer & Stern 2018) with the T5 fine-tuning
recipe's settings (ADAFACTOR_SETTINGS):
- `relative_step=False`: the step size is the given learning rate, not Adafactor's own 1/sqrt(step) schedule;
- a fixed learning rate and NO warm-up by default (`warmup_init=False`; the recipes default to the constant schedule
  and no warm-up for Adafactor): the T5 paper fine-tunes with Adafactor at a constant 1e-3 without warm-up, and
  Adafactor's update clipping (`clip_threshold=1.0`: an update's RMS is capped at 1) bounds the first steps;
- `scale_parameter=False`: the step is not multiplied by each tensor's RMS, so the learning rate means the same for
  every tensor (with relative_step off, scaling would tie the real step size to the initialisation);
- `beta1=None`: no first moment. A (n, m) matrix keeps one row and one column of the factored second moment,
  n + m floats, instead of AdamW's two full n x m moments; vectors keep a full second moment. FRED-T5-1.7B:
  AdamW's states 13.9 GB, Adafactor's 8 MB (`state_bytes` from the shapes, `rsg bench memory --optimizer`);
- `decay_rate=-0.8`, `eps=(1e-30, 1e-3)`: transformers' defaults, the paper's.
Adafactor takes no betas/eps of AdamW's; weight decay goes through the same two parameter groups.

The memory table (rsg_eval.bench.memory) reads each optimizer's state size from `state_bytes`, by parameter shape.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from rsg_eval.core.errors import RSGError

OPTIMIZERS = ("adamw", "adafactor")
ADAFACTOR_SETTINGS: dict[str, Any] = dict(scale_parameter=False, relative_step=False, warmup_init=False,
                                          clip_threshold=1.0, decay_rate=-0.8, beta1=None, eps=(1e-30, 1e-3))


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
    if name == "adafactor":
        return make_adafactor(params, lr, weight_decay)
    kw: dict[str, Any] = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch, a device or a DTensor without the fused kernel
        return torch.optim.AdamW(params, **kw)


def make_adafactor(params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """transformers' Adafactor with ADAFACTOR_SETTINGS (module docstring); `params` may be tensors or groups."""
    from transformers.optimization import Adafactor

    return Adafactor(list(params), lr=lr, weight_decay=weight_decay, **ADAFACTOR_SETTINGS)


def state_bytes_per_param(name: str = "adamw", param_bytes: int = 4) -> float:
    """Optimizer state per parameter in bytes, for the memory table: AdamW keeps two moments in the parameter's
    dtype (fp32 master weights: 8 bytes). Issue 20's Adafactor keeps factored second moments (rows + columns per
    matrix), so its figure depends on the shapes: it belongs in `state_bytes` below."""
    if name == "adamw":
        return 2.0 * param_bytes
    if name == "adafactor":
        raise ValueError("Adafactor's state depends on the shapes: use state_bytes")
    raise RSGError(f"unknown optimizer {name!r}", field="--optimizer", expected=list(OPTIMIZERS))


def state_bytes(shapes: Iterable[tuple[int, ...]], name: str = "adamw", param_bytes: int = 4) -> int:
    """Optimizer state in bytes for parameters of these shapes, without building a tensor (the meta device's
    shapes of a 1.7B model cost nothing). AdamW: two moments in the parameter dtype (its step counters, one 4-byte
    scalar per tensor, are left out). Adafactor (beta1=None): a matrix (..., n, m) keeps exp_avg_sq_row (..., n) and
    exp_avg_sq_col (..., m) in fp32, a vector a full exp_avg_sq, each tensor a 0-d fp32 RMS."""
    shapes = list(shapes)
    if name == "adafactor":
        total = 0
        for shape in shapes:
            numel = _numel(shape)
            if len(shape) >= 2:
                total += numel // (int(shape[-1]) * int(shape[-2])) * (int(shape[-2]) + int(shape[-1])) * 4 + 4
            else:
                total += numel * 4 + 4
        return total
    n = sum(_numel(s) for s in shapes)
    return int(n * state_bytes_per_param(name, param_bytes))


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds in its state now (after a step): what `state_bytes` predicts."""
    seen: set[int] = set()
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
