"""Fine-tuning hyper-parameters: one dataclass, YAML per-task overrides, and CLI flags on top. No torch.

Precedence, lowest first: the dataclass defaults, the YAML `defaults:` block, the YAML `tasks: {<Task>: ...}`
block for that task, then the flags the user typed on the command line (they win everywhere, because the user
asked for them explicitly in this run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from rsg_eval.core.errors import RSGError

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor")  # = rsg_eval.engine.optim.OPTIMIZERS (this module stays torch-free)
LORA_AUTO_RANK = 16  # the rank decoder-only models over 1e9 parameters get when --lora is not given
ISSUE20_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "lora": None, "lora_alpha": None, "lora_dropout": 0.05,
                                    "lora_targets": None}
# Adafactor's defaults where the user set none (T5's recipe: a constant 1e-3, no warm-up; engine/optim.py)
ADAFACTOR_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0}
NORMALIZE = ("sum", "token", "byte")


@dataclass
class FinetuneConfig:
    """Hyper-parameters for training one task. Defaults are small-model friendly; see
    configs/finetune_fredt5_1.7b.yaml for FRED-T5-1.7B."""

    epochs: int = 20
    batch_size: int = 8            # per device (per process); global batch = batch_size * world * grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    schedule: str = "linear"       # linear | cosine | constant (after warm-up)
    warmup_ratio: float = 0.06     # share of optimizer steps spent warming up (ignored when warmup_steps > 0)
    warmup_steps: int = 0
    max_grad_norm: float = 1.0     # 0 = no clipping
    max_source_length: int = 512   # encoder tokens; the template truncates the passage to fit
    max_target_length: int = 128   # decoder tokens incl. the explicit </s> (RuCoS answers are whole sentences)
    eval_every: int = 0            # optimizer steps between val evaluations; 0 = after every epoch
    eval_batch_size: int = 16
    normalize: str = "sum"         # rank-classification normalisation for val/test decoding
    early_stopping: int = 0        # stop after this many evaluations without improvement; 0 = off
    seed: int = 0
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    bf16: bool | None = None       # None = bf16 autocast when on a CUDA GPU that supports it; never on CPU
    dropout: float | None = None   # None = keep the model's dropout
    max_steps: int = 0             # cap on optimizer steps (smoke runs); 0 = no cap
    max_train_examples: int = 0    # use only the first N train items (MuSeRC: questions, RuCoS: passages); 0 = all
    template: str | None = None    # prompt template name; None = the task's default
    save_every: int = 0            # optimizer steps between `last` checkpoints; 0 = at every evaluation
    optimizer: str = "adamw"       # adamw | adafactor (engine.optim: T5's settings, constant lr, no warm-up)
    lora: int | None = None        # LoRA rank; None = auto (LoRA_AUTO_RANK for decoder-only models over 1e9
                                   # parameters, else full fine-tuning); 0 = full fine-tuning
    lora_alpha: float | None = None  # None = 2 x rank
    lora_dropout: float = 0.05
    lora_targets: str | None = None  # comma list of module names; None = the family's default (models/lora.py)

    def validate(self, where: str = "config") -> "FinetuneConfig":
        """Reject values that would fail deep inside torch; name the field and what is expected."""
        def bad(name: str, expected: str) -> RSGError:
            return RSGError(f"bad value {getattr(self, name)!r}", file=where, field=name, expected=expected)

        for name in ("epochs", "batch_size", "grad_accum", "max_source_length", "max_target_length",
                     "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "an integer >= 1")
        for name in ("eval_every", "early_stopping", "max_steps", "max_train_examples", "warmup_steps",
                     "save_every"):
            if int(getattr(self, name)) < 0:
                raise bad(name, "an integer >= 0")
        if not self.lr > 0:
            raise bad("lr", "a positive number")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "a number in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", SCHEDULES)
        if self.normalize not in NORMALIZE:
            raise bad("normalize", NORMALIZE)
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise bad("dropout", "a number in [0, 1) or null")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", "a number >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", OPTIMIZERS)
        if self.lora is not None and int(self.lora) < 0:
            raise bad("lora", "a rank >= 1, 0 for full fine-tuning, or null for auto")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise bad("lora_alpha", "a positive number or null (2 x rank)")
        if not 0 <= self.lora_dropout < 1:
            raise bad("lora_dropout", "a number in [0, 1)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def record(self) -> dict[str, Any]:
        """`to_dict` under the names checkpoints and run folders have always recorded (OLD_NAMES): what the
        fingerprints hash, so runs written before the fields were renamed stay resumable."""
        d = self.to_dict()
        for k, v in ISSUE20_DEFAULTS.items():  # fields added later: recorded only when set, so older runs resume
            if d.get(k) == v:
                d.pop(k)
        return {OLD_NAMES.get(k, k): v for k, v in d.items()}


# Field names equal the option names (--max-source-length, --max-target-length); before, these two were shorter.
# Config files may use either; fingerprints keep the old names (FinetuneConfig.record).
OLD_NAMES = {"max_source_length": "max_source_len", "max_target_length": "max_target_len"}
ALIASES = {old: new for new, old in OLD_NAMES.items()}


FIELD_NAMES = tuple(f.name for f in fields(FinetuneConfig))

# Defaults for the built-in random `tiny` model when no --config is given: the offline smoke path must be fast,
# and its scores are meaningless anyway (same values as configs/finetune_tiny.yaml).
TINY_DEFAULTS: dict[str, Any] = {"batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "max_source_length": 128,
                                 "max_target_length": 48, "eval_batch_size": 32}


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type; unknown field -> RSGError listing the valid ones."""
    name = ALIASES.get(name, name)
    if name not in FIELD_NAMES:
        raise RSGError(f"unknown setting {name!r}", file=where, field=name, expected=FIELD_NAMES)
    default = getattr(FinetuneConfig(), name)
    if value is None:
        return None
    try:
        if name == "adam_betas":
            b = tuple(float(x) for x in value)
            if len(b) != 2:
                raise ValueError
            return b
        if name in ("bf16",):  # auto (= None: on a GPU that supports it), on/off or true/false
            return None if str(value).lower() == "auto" else _as_bool(value)
        if name in ("dropout", "lora_alpha"):  # default None, else a number: not a string
            return float(value)
        if name == "lora":
            return int(value)
        if name == "lora_targets":
            return ",".join(t.strip() for t in str(value).split(",") if t.strip()) or None
        if isinstance(default, bool):
            return _as_bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise RSGError(f"bad value {value!r}", file=where, field=name,
                       expected=type(default).__name__ if default is not None else "a value") from None


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return value.lower() in ("true", "yes", "1", "on")
    raise ValueError(value)


@dataclass
class ConfigSet:
    """Per-task configs: `for_task(name)` applies defaults < YAML defaults < YAML task block < CLI flags."""

    yaml_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    yaml_tasks: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    cli: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "config"

    def for_task(self, task: str) -> FinetuneConfig:
        merged: dict[str, Any] = {}
        merged.update(self.yaml_defaults)
        merged.update(self.yaml_tasks.get(task, {}))
        merged.update(self.cli)
        if merged.get("optimizer") == "adafactor":
            for k, v in ADAFACTOR_DEFAULTS.items():
                merged.setdefault(k, v)
        return dataclasses.replace(FinetuneConfig(), **merged).validate(self.source)


def load_config_set(path: str | Path | None, cli: Mapping[str, Any] | None = None,
                    base: Mapping[str, Any] | None = None) -> ConfigSet:
    """Read a YAML config (`defaults:` and `tasks:` blocks; a flat mapping counts as `defaults`). `base` is used
    as the `defaults:` block when there is no file (the command passes TINY_DEFAULTS for `--model tiny`)."""
    cli_vals = {ALIASES.get(k, k): _coerce(k, v, "command line") for k, v in (cli or {}).items() if v is not None}
    if path is None:
        cs = ConfigSet(yaml_defaults={ALIASES.get(k, k): _coerce(k, v, "defaults") for k, v in (base or {}).items()},
                       cli=cli_vals, source="command line")
        cs.for_task("TERRa")  # validate early
        return cs

    from rsg_eval.core.tasks import get_task

    p = Path(path)
    from rsg_eval.core.io import read_yaml

    if not p.exists():
        raise RSGError("config file not found", file=p)
    raw = read_yaml(p) or {}
    if not isinstance(raw, dict):
        raise RSGError("the config must be a mapping", file=p, expected="defaults: {...}, tasks: {Task: {...}}")
    top = {k: v for k, v in raw.items() if k not in ("defaults", "tasks")}
    defaults = dict(raw.get("defaults") or {})
    defaults.update(top)
    yd = {ALIASES.get(k, k): _coerce(k, v, str(p)) for k, v in defaults.items()}
    yt: dict[str, dict[str, Any]] = {}
    for tname, block in (raw.get("tasks") or {}).items():
        spec = get_task(str(tname))  # unknown task -> RSGError listing the nine
        if not isinstance(block, dict):
            raise RSGError("a task block must be a mapping", file=p, field=f"tasks.{tname}")
        yt[spec.name] = {ALIASES.get(k, k): _coerce(k, v, f"{p} (tasks.{spec.name})") for k, v in block.items()}
    cs = ConfigSet(yaml_defaults=yd, yaml_tasks=yt, cli=cli_vals, source=str(p))
    for t in ["TERRa", *yt]:
        cs.for_task(t)
    return cs
