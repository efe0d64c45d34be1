"""The process group of a multi-process zero-shot run (`accelerate launch` / `torchrun`), seen from the runner.

Thin, runner-shaped wrappers over `rsg_eval.engine.collective` (which owns every collective call) and the one
device rule (`rsg_eval.engine.runtime.resolve_device`): how long to wait, what a failure on one process tells
the others, and where each process scores.
"""

from __future__ import annotations

from typing import Any

from rsg_eval.core.errors import RSGError
from rsg_eval.eval.plan import ZeroShotOptions

# How long a process that has finished its shards waits for the others at the final gather (torch's default, 30
# minutes for gloo and 10 for NCCL, is shorter than one slow shard of a 13B model can take).
DIST_TIMEOUT_S = 12 * 3600
LEAVE_TIMEOUT_S = 600  # the final wait for the main process to finish writing (gloo; NCCL waits DIST_TIMEOUT_S)


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, RSGError) else f"{type(exc).__name__}: {exc}"


def on_main(dist: Any, fn: Any) -> Any:
    """Run `fn` on the main process only and hand its result to every process; when it fails there, every
    process raises (none is left waiting for a message that never comes)."""
    from rsg_eval.engine.collective import main_acts

    return main_acts(dist, fn)


def agree(dist: Any, exc: BaseException | None) -> None:
    """Every process reports whether its step worked; if one failed, all stop."""
    if dist.active:
        msgs = dist.gather(None if exc is None else describe(exc))
        if exc is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                raise RSGError(f"process {bad[0][0]} of {dist.world} failed: {bad[0][1]}")
    if exc is not None:
        raise exc


def gather_to_main(dist: Any, obj: Any) -> list[Any] | None:
    """Every process's object on the main process (in rank order); None elsewhere."""
    from rsg_eval.engine.collective import gather_to_main as gather

    return gather(obj, dist)


def device_for(opts: ZeroShotOptions, dist: Any) -> str | None:
    """Under a launcher each process scores on its own GPU (cuda:LOCAL_RANK); an explicit --device cuda:N would put
    every process on GPU N and is refused (rsg_eval.engine.runtime.resolve_device, as in fine-tuning)."""
    if not dist.active:
        return opts.device
    if opts.device_map is not None:  # one model over several GPUs in one process: no room for a process per GPU
        raise RSGError(f"--device-map {opts.device_map} spreads one model over the GPUs of one process; under "
                       "torchrun/accelerate each process holds a whole model: run it in one process", field="--device-map",
                       expected="--device-map in a single process, or several processes without it")
    from rsg_eval.engine.runtime import resolve_device

    return str(resolve_device(opts.device, dist))


def leave_together_after_writing(dist: Any) -> None:
    """Every process waits here until the main one is done writing: under torchrun a process that exits with an
    error first gets the others killed, perhaps while the main one still writes the finished tasks' results."""
    from rsg_eval.engine.collective import leave_together

    leave_together(dist, LEAVE_TIMEOUT_S)  # bounded under gloo: a process that is gone is not waited for


def shutdown_distributed() -> None:
    """End of a `rsg zeroshot` process: leave the process group cleanly (a process that exits with it still up
    can abort in gloo's teardown while another is still running). A no-op in a single process."""
    from rsg_eval.engine.collective import leave

    leave()

