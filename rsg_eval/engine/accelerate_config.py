"""What an `accelerate launch` config means to `rsg finetune` and `rsg train-hmtl`: honoured keys, refused keys.

`accelerate launch --config_file CFG -m rsg_eval.cli finetune ...` starts the processes and passes the config to
each one as environment variables (ACCELERATE_*, FSDP_*). rsg runs its own engine (PyTorch's DDP and FSDP2), not
accelerate's `Accelerator`, so a key is either mapped onto an rsg option or refused here, before any work: nothing
in the config is silently ignored.

Honoured (config key -> rsg):
- num_processes / num_machines / machine_rank / main_process_* / multi_gpu -> the process layout (WORLD_SIZE, RANK,
  LOCAL_RANK, MASTER_ADDR/PORT: read by the engine's runtime like torchrun's);
- distributed_type: FSDP (ACCELERATE_USE_FSDP) -> `--sharding fsdp` (FSDP2 `fully_shard`, whichever fsdp_version);
- fsdp_offload_params -> `--fsdp-cpu-offload`;
- mixed_precision: bf16 -> `--bf16 on`; no -> rsg's own `--bf16` rule (auto: bf16 on a GPU that computes it);
- use_cpu -> `--device cpu`.
Accepted because they say what rsg does anyway: fsdp_sharding_strategy FULL_SHARD, fsdp_reshard_after_forward
true, fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP with the model's own block classes (rsg shards every module in
the model's `_no_split_modules`: T5Block, LlamaDecoderLayer, ...), fsdp_state_dict_type FULL_STATE_DICT (rsg writes
full weights), fsdp_use_orig_params true, fsdp_sync_module_states true, fsdp_forward_prefetch false,
fsdp_backward_prefetch BACKWARD_PRE, fsdp_activation_checkpointing false, dynamo_backend no, fsdp_min_num_params
(only read by the refused SIZE_BASED_WRAP), fsdp_cpu_ram_efficient_loading (accelerate's default true: rsg loads
the model in every process before sharding; said once in the log, it changes memory at load time only).
Refused (one line each, naming the key and what to do): any other value of the keys above, DeepSpeed, Megatron-LM,
a parallelism config (tensor/context parallel), fp16/fp8 mixed precision (T5 overflows in fp16), a dynamo backend,
fsdp_ignored_modules, fsdp_activation_checkpointing true (use `--gradient-checkpointing`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping

from rsg_eval.core.errors import RSGError

log = logging.getLogger(__name__)

KNOWN_BLOCKS = ("T5Block", "LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer",
                "GPT2Block")

# FSDP key -> (accepted values (lower case), what to do instead). Checked only when the config names FSDP.
_FSDP_ACCEPTED: dict[str, tuple[tuple[str, ...], str]] = {
    "FSDP_SHARDING_STRATEGY": (("full_shard", "1"), "rsg's FSDP2 always shards parameters, gradients and "
                               "optimizer state (FULL_SHARD); use --sharding ddp for no sharding"),
    "FSDP_RESHARD_AFTER_FORWARD": (("true", "full_shard"), "rsg frees each block's gathered parameters after "
                                   "its forward; set it to true"),
    "FSDP_AUTO_WRAP_POLICY": (("transformer_based_wrap",), "rsg shards per transformer block (the model's "
                              "_no_split_modules); set TRANSFORMER_BASED_WRAP or leave it out"),
    "FSDP_STATE_DICT_TYPE": (("full_state_dict",), "rsg writes full, unsharded weights that --model loads; set "
                             "FULL_STATE_DICT or leave it out"),
    "FSDP_USE_ORIG_PARAMS": (("true",), "FSDP2 always trains the original parameters; set it to true"),
    "FSDP_SYNC_MODULE_STATES": (("true",), "every process loads the same weights; set it to true"),
    "FSDP_FORWARD_PREFETCH": (("false",), "rsg does not prefetch the next block in the forward; set it to false"),
    "FSDP_BACKWARD_PREFETCH": (("backward_pre",), "FSDP2 prefetches before each block's backward "
                               "(BACKWARD_PRE); set that or leave it out"),
    "FSDP_ACTIVATION_CHECKPOINTING": (("false",), "use rsg's --gradient-checkpointing instead and set it to false"),
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": (("false",), "rsg has no activation offload; set it to false"),
}
_TRUE = ("true", "1", "yes")


@dataclass(frozen=True)
class LaunchSettings:
    """What the accelerate config asks of rsg: None = not said (rsg's own option or default applies)."""

    launched: bool = False           # started by accelerate launch (ACCELERATE_* present)
    sharding: str | None = None      # "fsdp" when the config names FSDP
    cpu_offload: bool | None = None  # fsdp_offload_params
    bf16: str | None = None          # "on" for mixed_precision bf16
    device: str | None = None        # "cpu" for use_cpu


def read_accelerate_env(env: Mapping[str, str] | None = None) -> LaunchSettings:
    """The settings of an accelerate config passed through the environment; one RSGError listing every key rsg
    would otherwise ignore (a line each)."""
    env = os.environ if env is None else env
    if not any(k.startswith("ACCELERATE_") for k in env):
        return LaunchSettings()
    refused: list[str] = []

    def flag(key: str) -> bool:
        return env.get(key, "false").strip().lower() in _TRUE

    for key, what in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"),
                      ("ACCELERATE_USE_PARALLELISM_CONFIG", "a parallelism config (tensor/context parallel)")):
        if flag(key):
            refused.append(f"{key}: {what} is not supported; use --sharding ddp or fsdp")
    mp = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    bf16 = None
    if mp == "bf16":
        bf16 = "on"
    elif mp not in ("no", ""):
        refused.append(f"ACCELERATE_MIXED_PRECISION={mp}: T5 overflows in fp16 and rsg has no fp8; use bf16 or no")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if dynamo not in ("no", ""):
        refused.append(f"ACCELERATE_DYNAMO_BACKEND={dynamo}: rsg does not torch.compile the model; set no")
    sharding = offload = None
    if flag("ACCELERATE_USE_FSDP"):
        sharding = "fsdp"
        offload = flag("FSDP_OFFLOAD_PARAMS")
        for key, (ok, instead) in _FSDP_ACCEPTED.items():
            value = env.get(key)
            if value is not None and value.strip().lower() not in ok:
                refused.append(f"{key}={value}: {instead}")
        classes = [c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
        unknown = [c for c in classes if c not in KNOWN_BLOCKS]
        if unknown:
            refused.append(f"FSDP_TRANSFORMER_CLS_TO_WRAP={','.join(classes)}: rsg shards the model's own blocks "
                           f"({', '.join(KNOWN_BLOCKS)}); leave it out")
        if env.get("FSDP_IGNORED_MODULES"):
            refused.append("FSDP_IGNORED_MODULES: rsg shards every block; leave it out")
        if flag("FSDP_CPU_RAM_EFFICIENT_LOADING"):
            log.info("accelerate's fsdp_cpu_ram_efficient_loading: every process loads the model before sharding")
    if refused:
        raise RSGError("the accelerate config asks for what rsg would ignore:\n  " + "\n  ".join(refused),
                       field="accelerate config", expected="the keys listed in docs/finetune.md (accelerate launch)")
    return LaunchSettings(launched=True, sharding=sharding, cpu_offload=offload, bf16=bf16,
                          device="cpu" if flag("ACCELERATE_USE_CPU") else None)


def resolve_with_cli(settings: LaunchSettings, *, sharding: str | None, fsdp_cpu_offload: bool, bf16: str,
                     device: str | None) -> tuple[str | None, bool, str, str | None]:
    """The command's (sharding, fsdp_cpu_offload, bf16, device) after the accelerate config: the config fills
    what the command line left at its default; a contradiction is one error."""
    if settings.sharding and sharding not in (None, settings.sharding):
        raise RSGError(f"--sharding {sharding} contradicts the accelerate config (distributed_type FSDP)",
                       field="--sharding", expected="fsdp, or a config without FSDP")
    if settings.bf16 == "on" and bf16 == "off":
        raise RSGError("--bf16 off contradicts the accelerate config (mixed_precision bf16)", field="--bf16",
                       expected="on or auto, or mixed_precision: no in the config")
    if settings.device == "cpu" and device not in (None, "auto", "cpu"):
        raise RSGError(f"--device {device} contradicts the accelerate config (use_cpu)", field="--device",
                       expected="cpu, or use_cpu: false in the config")
    return (settings.sharding or sharding, bool(settings.cpu_offload) or fsdp_cpu_offload,
            settings.bf16 or bf16, settings.device or device)
