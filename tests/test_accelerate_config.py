"""accelerate launch configs (rsg_eval.engine.accelerate_config): honoured keys map onto rsg's options, keys rsg
would ignore are refused one line each. The environments are exactly what `accelerate launch` exports for a config
(accelerate/utils/launch.py), so no launcher is started here."""

from __future__ import annotations

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.engine.accelerate_config import LaunchSettings, read_accelerate_env, resolve_with_cli

# accelerate launch --use_fsdp with its own defaults (what `accelerate config` writes for FSDP, version 1)
FSDP_DEFAULTS = {
    "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "False",
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_MIN_NUM_PARAMS": "100000000",
    "FSDP_FORWARD_PREFETCH": "false", "FSDP_USE_ORIG_PARAMS": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "FSDP_SYNC_MODULE_STATES": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false",
}


def test_no_accelerate_no_settings():
    assert read_accelerate_env({"WORLD_SIZE": "2"}) == LaunchSettings()


def test_multi_gpu_config_only_sets_the_layout():
    s = read_accelerate_env({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO",
                             "ACCELERATE_USE_CPU": "False", "WORLD_SIZE": "4"})
    assert s == LaunchSettings(launched=True)
    assert resolve_with_cli(s, sharding=None, fsdp_cpu_offload=False, bf16="auto", device=None) == \
        (None, False, "auto", None)


def test_fsdp_config_with_offload_and_bf16_maps_onto_rsg_options():
    env = dict(FSDP_DEFAULTS, FSDP_OFFLOAD_PARAMS="true", ACCELERATE_MIXED_PRECISION="bf16",
               FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP", FSDP_TRANSFORMER_CLS_TO_WRAP="T5Block",
               FSDP_STATE_DICT_TYPE="FULL_STATE_DICT", FSDP_BACKWARD_PREFETCH="BACKWARD_PRE")
    s = read_accelerate_env(env)
    assert (s.sharding, s.cpu_offload, s.bf16, s.device) == ("fsdp", True, "on", None)
    assert resolve_with_cli(s, sharding=None, fsdp_cpu_offload=False, bf16="auto", device=None) == \
        ("fsdp", True, "on", None)
    with pytest.raises(RSGError, match="--sharding ddp contradicts"):
        resolve_with_cli(s, sharding="ddp", fsdp_cpu_offload=False, bf16="auto", device=None)
    with pytest.raises(RSGError, match="--bf16 off contradicts"):
        resolve_with_cli(s, sharding=None, fsdp_cpu_offload=False, bf16="off", device=None)


@pytest.mark.parametrize("key,value,says", [
    ("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", "FULL_SHARD"),
    ("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT", "full, unsharded weights"),
    ("FSDP_AUTO_WRAP_POLICY", "SIZE_BASED_WRAP", "per transformer block"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "true", "--gradient-checkpointing"),
    ("FSDP_TRANSFORMER_CLS_TO_WRAP", "BertLayer", "the model's own blocks"),
    ("ACCELERATE_MIXED_PRECISION", "fp16", "overflows in fp16"),
    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "torch.compile"),
    ("ACCELERATE_USE_DEEPSPEED", "true", "DeepSpeed"),
])
def test_ignored_keys_are_refused_naming_the_key(key, value, says):
    with pytest.raises(RSGError, match=says) as err:
        read_accelerate_env(dict(FSDP_DEFAULTS, **{key: value}))
    assert f"{key}" in str(err.value)


def test_every_refusal_is_its_own_line():
    env = dict(FSDP_DEFAULTS, FSDP_SHARDING_STRATEGY="NO_SHARD", ACCELERATE_MIXED_PRECISION="fp8")
    with pytest.raises(RSGError) as err:
        read_accelerate_env(env)
    lines = [ln for ln in str(err.value).splitlines() if ln.startswith("  ")]
    assert len(lines) == 2 and any("FSDP_SHARDING_STRATEGY" in ln for ln in lines)


def test_use_cpu_means_device_cpu():
    s = read_accelerate_env({"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"})
    assert s.device == "cpu"
    with pytest.raises(RSGError, match="use_cpu"):
        resolve_with_cli(s, sharding=None, fsdp_cpu_offload=False, bf16="auto", device="cuda")


@pytest.mark.parametrize("command", ["finetune", "train-hmtl"])
def test_the_commands_refuse_an_ignored_key_and_take_the_honoured_ones(tmp_path, monkeypatch, command):
    """Through the CLI: a refused key stops the command before any work, one line naming it; an FSDP config with
    offload reaches the recipe as --sharding fsdp --fsdp-cpu-offload."""
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    args = {"finetune": ["finetune", "--model", "tiny", "--data", "sample", "--tasks", "TERRa", "--run",
                         str(tmp_path / "r"), "-q"],
            "train-hmtl": ["train-hmtl", "--model", "tiny", "--corpus", "sample", "--out", str(tmp_path / "o"),
                           "--quiet"]}[command]
    for k, v in dict(FSDP_DEFAULTS, FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT").items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(app, args)  # in process the RSGError surfaces as is (`rsg` prints it, exit 2)
    assert isinstance(res.exception, RSGError) and "FSDP_STATE_DICT_TYPE=SHARDED_STATE_DICT" in str(res.exception)
    assert not (tmp_path / "r").exists() and not (tmp_path / "o").exists()

    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    seen = {}

    class Stop(Exception):
        pass

    if command == "finetune":
        from rsg_eval.training.finetune import run as recipe

        def fake(model, **kw):
            seen.update(sharding=kw["sharding_mode"], offload=kw["fsdp_cpu_offload"])
            raise Stop
        monkeypatch.setattr(recipe, "run_finetune", fake)
    else:
        from rsg_eval.training.hmtl import train as recipe

        def fake(cfg, **kw):
            seen.update(sharding=cfg.sharding, offload=cfg.fsdp_cpu_offload)
            raise Stop
        monkeypatch.setattr(recipe, "train", fake)
    res = CliRunner().invoke(app, args)
    assert isinstance(res.exception, Stop), res.output
    assert seen == {"sharding": "fsdp", "offload": True}
