"""Fused kernels for training a T5: the same functions as transformers' modules, in fewer passes over memory.

transformers' T5 (FRED-T5 included) computes its gated-GELU activation (`gelu_new`) as a Python formula:
pow, mul, add, mul, tanh, add, mul, mul, each a pass over the (B, S, d_ff) activation, and autograd keeps most
of their outputs for the backward pass. `F.gelu(x, approximate="tanh")` is the very same formula,
0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in one kernel forward and one backward. On one CPU thread this
alone makes a d_model 256 T5's training step ~1.3x faster (docs/benchmarks.md); on a GPU the chain is
memory-bound, so the saving is larger in share.

T5LayerNorm (RMS norm in fp32 without mean or bias) becomes `F.rms_norm` where torch has it (>= 2.4), with the
same fp32 arithmetic: autocast is switched off inside and the input is taken as fp32, as T5LayerNorm does.

`fused_t5(model)` swaps them in for the duration of a `with` block and restores the original modules after, so a
checkpoint, the scorer or a user of the model afterwards sees transformers' modules (the state dict never
changes: neither swap owns a parameter of its own). Outputs agree with the originals to float rounding
(tests/test_finetune_speed.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F


class TanhGELU(torch.nn.Module):
    """transformers' NewGELUActivation (`gelu_new`) as torch's fused tanh-approximate GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def _rms_forward(norm: Any) -> Any:
    """A forward for one T5LayerNorm `norm` that calls F.rms_norm in fp32 (the original's arithmetic)."""
    eps = norm.variance_epsilon
    original = norm.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        # read at call time: FSDP swaps the gathered weight in for each forward (a sharded DTensor between)
        weight = norm.weight
        if weight.dtype != torch.float32:  # a half-precision model: the original casts at the end; keep it
            return original(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            return F.rms_norm(hidden.float(), (hidden.shape[-1],), weight, eps)

    return forward


@contextlib.contextmanager
def fused_t5(model: torch.nn.Module, *, enabled: bool = True) -> Iterator[int]:
    """Swap in the fused GELU and RMS norm inside `model` for the block; yields how many modules were swapped."""
    if not enabled:
        yield 0
        return
    from transformers.activations import NewGELUActivation
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    swapped_children: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    patched_norms: list[torch.nn.Module] = []
    has_rms = hasattr(F, "rms_norm")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, TanhGELU())
                swapped_children.append((parent, name, child))
            elif has_rms and isinstance(child, T5LayerNorm) and "forward" not in vars(child):
                child.forward = _rms_forward(child)  # instance attribute shadows the class method
                patched_norms.append(child)
    try:
        yield len(swapped_children) + len(patched_norms)
    finally:
        for parent, name, child in swapped_children:
            setattr(parent, name, child)
        for norm in patched_norms:
            del norm.forward
