"""Finishing an optimizer step, the same way in every recipe.

The recipe runs its micro-batches (forward, its own loss scaling, backward) and keeps its loss sum on the device;
`finish_step` then clips the gradient, reads the loss and the gradient norm to the host in ONE transfer (the step's
only wait for the device), and either applies the step (optimizer, schedule, zero_grad) or, when the loss or the
norm is not finite, skips it: the gradients are dropped, the parameters stay those of the last good step, and
`StepGuard.skipped` counts it. A recipe that may not go on after a skipped step (both do not, today: one bad step
means a learning rate too high) saves its resume point and stops with `StepGuard.message`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from rsg_eval.engine import collective, sharding


@dataclass
class StepOutcome:
    losses: list[float]       # the recipe's loss sums, summed over processes (one value, or one per task)
    grad_norm: float          # total gradient norm before clipping (nan when not computed)
    applied: bool             # False: not finite, the step was skipped

    @property
    def loss(self) -> float:
        return self.losses[0]


@dataclass
class StepGuard:
    """Counts skipped (non-finite) steps; `tolerance` consecutive ones are allowed before `exceeded`."""

    tolerance: int = 0
    skipped: int = 0
    in_a_row: int = 0

    def note(self, applied: bool) -> None:
        if applied:
            self.in_a_row = 0
        else:
            self.skipped += 1
            self.in_a_row += 1

    @property
    def exceeded(self) -> bool:
        return self.in_a_row > self.tolerance


def finish_step(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any,
                loss_sum: torch.Tensor, d: Any, *, max_norm: float = 0.0,
                guard: StepGuard | None = None) -> StepOutcome:
    """Clip, read, guard, step, schedule, zero the gradients.

    params: the trained parameters (of the wrapped model: under fsdp their gradients are shards, and the norm is
    the whole model's); loss_sum: this process's loss sum(s) of the step, a 0-d or (k,) tensor on the device;
    max_norm: clip the total gradient norm to this (0 = no clipping, the norm is still computed for the guard).
    """
    params = [p for p in params if p.grad is not None]
    if params:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norm = sharding.full_value(norm)
    else:
        norm = None
    losses, norm_value = collective.read_step(loss_sum, norm, d)
    applied = all(math.isfinite(v) for v in losses) and (norm is None or math.isfinite(norm_value))
    if applied:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if guard is not None:
        guard.note(applied)
    return StepOutcome(losses, norm_value, applied)
