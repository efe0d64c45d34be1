"""Learning-rate schedules for `rsg train-hmtl`, as plain formulas (torch-free) plus a torch builder.

`paper` (the default, so that a reproduction runs what the paper ran): torch's CyclicLR, mode exp_range, gamma
0.9, base 1e-6, max 1e-4, cycle_momentum off: the paper's recipe, implemented as written. exp_range multiplies the
amplitude by gamma ** t where t is the GLOBAL optimizer step, so with gamma 0.9 the learning rate peaks within ~10
steps and sits at the 1e-6 floor after ~70 steps for the rest of training (FREDT5_NOTES.md 0.1 and 3.4). The trainer
states this in a note at start; the two alternatives do what the paper describes in words:

`cycle-gamma`: the same triangle, but the amplitude shrinks by gamma once per CYCLE (default: one cycle per epoch).
`cosine`: linear warm-up from the floor to the peak, then cosine decay back to the floor at the last step.

Steps are optimizer steps (one scheduler step per optimizer step, i.e. per 2 micro-batches with accumulation 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("paper", "cycle-gamma", "cosine")
TORCH_DEFAULT_STEP_SIZE_UP = 2000


def _triangle(t: int, up: int, down: int) -> tuple[int, float]:
    """torch CyclicLR's cycle number (1-based) and triangle height in [0, 1] at step t."""
    total = up + down
    ratio = up / total
    cycle = math.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    scale = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    return cycle, scale


def exp_range_lr(t: int, base: float, peak: float, up: int, down: int | None = None, gamma: float = 0.9) -> float:
    """torch CyclicLR(mode="exp_range") at step t: base + (peak - base) * triangle(t) * gamma ** t."""
    _, scale = _triangle(t, up, down or up)
    return base + (peak - base) * scale * gamma ** t


def cycle_gamma_lr(t: int, base: float, peak: float, up: int, down: int | None = None, gamma: float = 0.9) -> float:
    """Triangular cycles whose amplitude shrinks by gamma once per cycle: gamma ** (cycle - 1)."""
    cycle, scale = _triangle(t, up, down or up)
    return base + (peak - base) * scale * gamma ** (cycle - 1)


def warmup_cosine_lr(t: int, base: float, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up base -> peak over `warmup` steps, then cosine peak -> base reaching base at step `total`."""
    if warmup > 0 and t < warmup:
        return base + (peak - base) * t / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (t - warmup) / span)
    return base + (peak - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ExpRangeSummary:
    peak_lr: float
    peak_step: int
    floor_step: int          # first step after the peak where the amplitude is under 1 % of the peak amplitude
    lr_at_100: float


def summarize_exp_range(base: float, peak: float, up: int, gamma: float, horizon: int = 100_000) -> ExpRangeSummary:
    """Where the paper's schedule peaks and when it collapses to its floor (numbers for the warning)."""
    lrs = [exp_range_lr(t, base, peak, up, up, gamma) for t in range(min(horizon, 4 * up + 200))]
    peak_step = max(range(len(lrs)), key=lambda t: lrs[t])
    amp = lrs[peak_step] - base
    floor_step = next((t for t in range(peak_step + 1, len(lrs)) if lrs[t] - base < 0.01 * amp), len(lrs))
    return ExpRangeSummary(lrs[peak_step], peak_step, floor_step, lrs[100] if len(lrs) > 100 else lrs[-1])


def paper_note(base: float, peak: float, up: int, gamma: float) -> str:
    """The start-of-training note for `--schedule paper`: the fact, why it is the default, the alternatives."""
    s = summarize_exp_range(base, peak, up, gamma)
    return (f"note: schedule 'paper' is the paper's CyclicLR exp_range ({base:g} to {peak:g}, gamma {gamma} per "
            f"optimizer step, step_size_up {up}); it is the default so that a reproduction runs what the paper ran. "
            f"With these values the learning rate peaks at {s.peak_lr:.3g} at step {s.peak_step} and is within 1% "
            f"of {base:g} from step {s.floor_step} on. Alternatives: --schedule cycle-gamma (the same triangle, "
            f"amplitude x gamma once per cycle) or --schedule cosine (warm-up to --lr, then cosine decay).")


def default_step_size_up(schedule: str, steps_per_epoch: int) -> int:
    """paper: torch's default 2000; cycle-gamma: half an epoch up, half down (one cycle per epoch)."""
    if schedule == "paper":
        return TORCH_DEFAULT_STEP_SIZE_UP
    return max(1, steps_per_epoch // 2)


def build_scheduler(optimizer: Any, schedule: str, *, base_lr: float, max_lr: float, total_steps: int,
                    steps_per_epoch: int, gamma: float = 0.9, step_size_up: int | None = None,
                    warmup_steps: int | None = None) -> Any:
    """A torch LR scheduler stepped once per optimizer step. Sets the optimizer's lr for step 0."""
    import torch

    if schedule not in SCHEDULES:
        from rsg_eval.core.errors import RSGError
        raise RSGError(f"unknown schedule {schedule!r}", field="schedule", expected=list(SCHEDULES))
    up = step_size_up or default_step_size_up(schedule, steps_per_epoch)
    if schedule == "paper":
        # The recipe itself. cycle_momentum=False: with AdamW torch would otherwise cycle beta1 (0.8-0.9).
        return torch.optim.lr_scheduler.CyclicLR(
            optimizer, base_lr=base_lr, max_lr=max_lr, step_size_up=up, mode="exp_range", gamma=gamma,
            cycle_momentum=False)
    for group in optimizer.param_groups:   # LambdaLR multiplies this initial lr by the factor below
        group["lr"] = max_lr
        group["initial_lr"] = max_lr
    if schedule == "cycle-gamma":
        def factor(t: int) -> float:
            return cycle_gamma_lr(t, base_lr, max_lr, up, up, gamma) / max_lr
    else:
        warm = warmup_steps if warmup_steps is not None else max(1, round(0.06 * total_steps))

        def factor(t: int) -> float:
            return warmup_cosine_lr(t, base_lr, max_lr, warm, total_steps) / max_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
