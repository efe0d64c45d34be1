"""Data parallelism with PyTorch's own wrappers: DistributedDataParallel, or FSDP2 (`fully_shard`).

    none  one process: the model as it is
    ddp   every process holds the whole model, gradients and AdamW state; DDP averages gradients in buckets while
          the backward pass runs (the default under a launcher)
    fsdp  FSDP2: parameters, gradients and optimizer state are sharded over the processes (each holds 1/world of
          them); each T5 block's parameters are gathered just before the block runs and freed after, gradients are
          reduce-scattered. What lets FRED-T5-1.7B fine-tune on two 24 GB or 48 GB cards (docs/finetune.md's memory
          table). With `cpu_offload` the shards, their gradients and the optimizer step live in CPU memory.

FSDP units: every module whose class the model names in `_no_split_modules` (T5Block for T5 / FRED-T5: transformers'
own list of modules that must stay whole), then the root for everything else (embeddings, final norms, heads, LM
head). bf16: a MixedPrecisionPolicy computes with bf16 copies of the gathered parameters and reduces gradients in
fp32, so the sharded master weights and the optimizer stay fp32, as under DDP with autocast.

Two rules follow from FSDP's collectives living inside the forward pass: every process must run the same modules
in the same order (the hierarchical recipe pads a task another process runs with a zero-weight batch), and code
that calls submodules directly (the scorer) needs the model gathered (`gathered`). Checkpoints are always written as
full, unsharded weights (`full_model_state`), so `--model` and a single-process resume read them.

With collective.py, the only module that calls torch.distributed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from rsg_eval.core.errors import RSGError

MODES = ("none", "ddp", "fsdp")


def resolve_mode(mode: str | None, d: Any) -> str:
    """The sharding of this run: None means ddp under a launcher (WORLD_SIZE > 1), none in one process. ddp and
    fsdp in a single process are plain training (there is nothing to share)."""
    if mode is None:
        return "ddp" if d.active else "none"
    if mode not in MODES:
        raise RSGError(f"unknown sharding {mode!r}", field="--sharding", expected=list(MODES))
    return mode if d.active else "none"


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards one by one: those whose class any submodule lists in `_no_split_modules`."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap(model: torch.nn.Module, mode: str = "none", *, device: torch.device | None = None,
         cpu_offload: bool = False, bf16: bool = False, find_unused: bool = False) -> torch.nn.Module:
    """`model` ready for data-parallel training (mode from `resolve_mode`). Call after loading the weights and
    before building the optimizer (under fsdp its parameters become sharded DTensors).

    find_unused: DDP looks for parameters a forward did not use (the hierarchical model: each task uses a part).
    Returns the module to call in training; `unwrap(returned)` is the bare model."""
    if mode == "none":
        if cpu_offload:
            raise RSGError("--fsdp-cpu-offload needs --sharding fsdp under a launcher (torchrun or accelerate "
                           "launch with several processes)", field="--fsdp-cpu-offload")
        return model
    if mode == "ddp":
        if cpu_offload:
            raise RSGError("--fsdp-cpu-offload needs --sharding fsdp", field="--fsdp-cpu-offload",
                           expected="--sharding fsdp")
        from torch.nn.parallel import DistributedDataParallel

        # gradient_as_bucket_view: the .grad tensors ARE the all-reduce buckets, not a second copy of every
        # gradient (FRED-T5-1.7B: 6.5 GiB less per GPU)
        return DistributedDataParallel(model, device_ids=[device.index] if device is not None and
                                       device.type == "cuda" else None, gradient_as_bucket_view=True,
                                       find_unused_parameters=find_unused)
    if mode != "fsdp":
        raise RSGError(f"unknown sharding {mode!r}", field="--sharding", expected=list(MODES))
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device is not None and device.type == "cuda")
    import warnings

    # FSDP2 warns when a unit returns a view (T5Block returns a tuple whose hidden states may be one): an in-place op
    # on it would skip the unit's pre-backward hook. transformers' T5Stack and HierarchicalT5 only read block
    # outputs (no in-place op), so the warning, repeated for every block, says nothing here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = shard_units(model)
    if not units:
        raise RSGError(f"{type(model).__name__} names no block to shard (_no_split_modules)", field="--sharding",
                       expected="ddp")
    for unit in units:
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DDP wrapper (an FSDP2 model is its own bare model)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Gradient accumulation: `sync=False` keeps this backward's gradients local (DDP's no_sync; FSDP keeps them
    unsharded and reduces them with the next synced backward). Only for steps where every micro-batch runs the
    same modules; the hierarchical recipe's tasks do not, so under fsdp it syncs every backward."""
    if sync:
        yield
        return
    if hasattr(model, "no_sync") and type(model).__name__ == "DistributedDataParallel":
        with model.no_sync():
            yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The bare model with every parameter gathered and kept gathered, for evaluation code that calls submodules
    directly (scoring calls the encoder, then the decoder, and block 0's relative position bias on its own, never
    the root's forward). Under fsdp each process then holds the whole model (in the compute dtype) until the block
    ends; the FSDP hooks find everything gathered and do nothing. Processes must still enter and leave together."""
    bare = unwrap(model)
    if not is_fsdp(bare):
        yield bare
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in bare.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    bare.set_reshard_after_forward(False)
    try:
        yield bare
    finally:
        bare.set_reshard_after_forward(True)
        for m in units:
            m.reshard()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's gradient norm) as the plain tensor every process agrees on; other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on the CPU (a collective under fsdp: every process calls it; rank 0 gets them,
    the others an empty dict). Keys are the bare model's."""
    bare = unwrap(model)
    if not is_fsdp(bare):
        return bare.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(bare, options=_options())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state, unsharded, keyed by parameter name (a collective under fsdp; rank 0 gets it).

    Without fsdp: `optimizer.state_dict()` as before (parameter indices), so resume points written before the
    engine and after it read alike."""
    bare = unwrap(model)
    if not is_fsdp(bare):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(bare, optimizer, options=_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a `full_optimizer_state` (either format) into `optimizer`; every process passes the whole state."""
    bare = unwrap(model)
    by_name = any(isinstance(k, str) for k in state.get("state", {})) or \
        any(isinstance(p, str) for g in state.get("param_groups", []) for p in g.get("params", []))
    if not by_name:
        if is_fsdp(bare):
            raise RSGError("this resume point was written without --sharding fsdp; resume it with the sharding it "
                           "was written with (or pass --restart)", field="--sharding")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(bare, optimizer, state, options=StateDictOptions(full_state_dict=True))
