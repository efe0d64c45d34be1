"""LoRA through `peft`: wrap a model, save the adapter beside its base's name, load an adapter folder as a model.

`wrap(model, LoraSettings(rank=8))` freezes the base and adds low-rank updates B·A (B zero at the start, so the
wrapped model computes exactly what the base does until it trains) to the target projections:

- rank R: `--lora R`; alpha defaults to 2·R (a scale alpha/R of 2, the ratio the LoRA paper's GPT-3 runs and most
  recipes use, so changing R does not change the step size); dropout 0.05 on the adapter's input;
- target modules by family: T5 (FRED-T5) `q k v o` (every attention projection, self and cross: the layout of
  the LoRA paper's attention-only setting), Llama-shaped models `q_proj k_proj v_proj o_proj`, GPT-2 `c_attn
  c_proj`; any other family must name its targets (`--lora-targets`).

An adapter folder holds peft's `adapter_config.json` and `adapter_model.safetensors`, plus the tokenizer; the
config's `base_model_name_or_path` is the base model's hub id, built-in name (`tiny`) or absolute folder path.
`load_model(folder)` (models/loading.py) loads that base, then `apply_adapter` applies the adapter and, by default,
merges it into the base weights (W + alpha/R·B·A) so scoring runs at the base model's speed with no adapter layers.

peft is an optional extra (`pip install -e ".[lora]"`): only LoRA needs it, and everything else works without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rsg_eval.core.errors import RSGError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
EXTRA = "lora"
DEFAULT_DROPOUT = 0.05
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "t5": ("q", "k", "v", "o"), "mt5": ("q", "k", "v", "o"), "umt5": ("q", "k", "v", "o"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"), "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"), "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "gpt2": ("c_attn", "c_proj"),
}


@dataclass(frozen=True)
class LoraSettings:
    """`--lora R`, `--lora-alpha` (default 2·R), `--lora-dropout` (0.05), `--lora-targets` (family default)."""

    rank: int
    alpha: float | None = None
    dropout: float = DEFAULT_DROPOUT
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise RSGError(f"LoRA rank must be a positive integer, got {self.rank!r}", field="lora",
                           expected="an integer such as 8 or 16")
        if self.alpha is not None and not self.alpha > 0:
            raise RSGError(f"LoRA alpha must be positive, got {self.alpha!r}", field="lora-alpha",
                           expected="a positive number (default 2 x rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise RSGError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}", field="lora-dropout",
                           expected="a number from 0 up to (not including) 1")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise RSGError(f"LoRA needs the peft package: pip install -e \".[{EXTRA}]\" (or pip install peft)",
                       field="lora") from None
    return peft


def default_targets(model: Any) -> tuple[str, ...]:
    kind = getattr(model.config, "model_type", "")
    if kind not in DEFAULT_TARGETS:
        raise RSGError(f"no default LoRA target modules for model type {kind!r}: name them with --lora-targets",
                       field="lora-targets", expected=", ".join(sorted(DEFAULT_TARGETS)) + " have defaults")
    return DEFAULT_TARGETS[kind]


def wrap(model: Any, settings: LoraSettings) -> Any:
    """The base frozen, LoRA layers on the target modules: a peft model whose trainable parameters are the
    adapters only. The wrapped model's outputs equal the base's until it trains (B starts at zero)."""
    peft = require_peft()
    targets = list(settings.targets or default_targets(model))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise RSGError(f"LoRA target modules {missing} are not in this model", field="lora-targets",
                       expected="module names such as " + ", ".join(sorted(n for n in names if n)[:12]))
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    cfg = peft.LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.dropout,
                          target_modules=targets, bias="none",
                          task_type=peft.TaskType.SEQ_2_SEQ_LM if seq2seq else peft.TaskType.CAUSAL_LM)
    return peft.get_peft_model(model, cfg)


def adapter_names(model: Any) -> list[str]:
    """Names of the trainable (adapter) parameters of a wrapped model."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def base_reference(base: str | Path) -> str:
    """What adapter_config.json records as the base: a built-in name or hub id as given, a folder as its absolute
    path (so the adapter loads from any working directory)."""
    name = str(base)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def save_adapter(model: Any, folder: str | Path, base: str | Path, tokenizer: Any = None) -> Path:
    """Write the adapter (peft's files, safetensors) and the tokenizer to `folder`, naming `base` as its base."""
    folder = Path(folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    cfg_file = folder / ADAPTER_CONFIG
    data = json.loads(cfg_file.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_reference(base)
    from rsg_eval.core.io import atomic_write_text

    atomic_write_text(cfg_file, json.dumps(data, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_base(folder: Path) -> str:
    """The base model an adapter folder names, or one clear error."""
    f = folder / ADAPTER_CONFIG
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RSGError(f"not valid JSON ({exc.msg})", file=f, line=exc.lineno) from None
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not isinstance(base, str) or not base:
        raise RSGError("adapter config names no base model", file=f, field="base_model_name_or_path",
                       expected="the base model's hub id, 'tiny', or its folder")
    if isinstance(data, dict) and data.get("peft_type", "LORA") != "LORA":
        raise RSGError(f"only LoRA adapters are supported, this one is {data.get('peft_type')!r}", file=f,
                       field="peft_type", expected="LORA")
    return base


def apply_adapter(model: Any, folder: Path, *, merge: bool = True) -> Any:
    """The base `model` with the adapter in `folder` applied and, by default, merged into its weights (a plain
    transformers model again). load_model calls this after loading the base the adapter names."""
    peft = require_peft()
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RSGError(f"could not apply the adapter to its base model: {first}", file=folder) from exc
    out = wrapped.merge_and_unload() if merge else wrapped
    out.eval()
    return out


def adapter_tokenizer(folder: Path) -> Any:
    """The tokenizer saved with the adapter, or None (then the base's is used)."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def merged_state_equal(a: Any, b: Any) -> bool:
    """True when two models hold bit-identical tensors under the same names (tests, checks)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
