"""Adafactor with the T5 fine-tuning recipe's settings, and optimizer-state sizes for `rsg bench` (AdamW vs Adafactor).

`make_adafactor(params, lr, weight_decay)` is transformers' `Adafactor` (Shazeer & Stern 2018) with:
- `relative_step=False`: the step size is the given `lr`, not Adafactor's own 1/sqrt(step) schedule;
- a fixed learning rate and NO warm-up by default (`warmup_init=False`, and `--optimizer adafactor` defaults to the
  constant schedule): the T5 paper fine-tunes with Adafactor at a constant 1e-3 and no warm-up; Adafactor's
  update clipping (`clip_threshold=1.0`: an update's RMS is capped at 1) keeps the first steps bounded without one;
- `scale_parameter=False`: the step is not multiplied by each tensor's RMS, so `lr` means the same for every
  tensor (with relative_step off, scaling would make the real step size depend on the initialisation);
- `beta1=None`: no first moment. With it, Adafactor keeps for a (n, m) matrix one row and one column of the
  factored second moment, n + m floats, instead of AdamW's two full n x m moments; vectors keep a full second
  moment. That is where the memory goes: FRED-T5-1.7B's AdamW states are ~13.9 GB (2 x 4 bytes x 1.74e9), its
  Adafactor states a few MB (`state_bytes`, computed from the shapes on the meta device);
- `decay_rate=-0.8`, `eps=(1e-30, 1e-3)`: transformers' defaults, the paper's.

Fold into engine/optim.py (the optimizer factory) when the engine lands.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

ADAFACTOR_SETTINGS: dict[str, Any] = dict(scale_parameter=False, relative_step=False, warmup_init=False,
                                          clip_threshold=1.0, decay_rate=-0.8, beta1=None, eps=(1e-30, 1e-3))
ADAFACTOR_DEFAULT_LR = 1e-3  # T5's fine-tuning rate with Adafactor
OPTIMIZERS = ("adamw", "adafactor")


def make_adafactor(params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """transformers' Adafactor with the settings above; `params` may be tensors or param groups."""
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=weight_decay, **ADAFACTOR_SETTINGS)


def state_bytes(shapes: Iterable[tuple[int, ...]], optimizer: str, state_dtype_bytes: int = 4) -> int:
    """Bytes of optimizer state for parameters of these shapes (fp32 states: 4 bytes; torch keeps AdamW's
    moments in the parameter dtype, so bf16 weights give 2), without building any tensor:
    - adamw: exp_avg + exp_avg_sq, each the parameter's size, plus a step counter per tensor (one fp32 scalar:
      torch's fused/foreach AdamW keeps it as a tensor);
    - adafactor (beta1=None): a matrix (..., n, m) keeps exp_avg_sq_row (..., n) and exp_avg_sq_col (..., m); a
      vector keeps exp_avg_sq of its size; plus the tensor's RMS (a 0-d fp32 tensor) and a step (a Python number)."""
    total = 0
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        if optimizer == "adamw":
            total += 2 * numel * state_dtype_bytes + 4
        elif optimizer == "adafactor":
            if len(shape) >= 2:
                lead = numel // (shape[-1] * shape[-2])
                total += lead * (shape[-2] + shape[-1]) * state_dtype_bytes + 4
            else:
                total += numel * state_dtype_bytes + 4
        else:
            raise ValueError(optimizer)
    return total


def measured_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer holds in its state right now (after at least one step)."""
    seen: set[int] = set()
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def trainable_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """The shapes of a model's trainable parameters, each tensor once (tied ones count once); works on the meta
    device, so a 1.7B model's shapes cost no memory."""
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def memory_table(model: torch.nn.Module) -> dict[str, int]:
    """Weights, gradients and each optimizer's states in bytes (fp32 training), from the shapes alone: the
    `rsg bench` column for AdamW vs Adafactor."""
    shapes = trainable_shapes(model)
    weights = sum(p.numel() * 4 for p in model.parameters())
    grads = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return {"weights": weights, "gradients": grads, "adamw_states": state_bytes(shapes, "adamw"),
            "adafactor_states": state_bytes(shapes, "adafactor")}
