"""`rsg train-hmtl`'s settings: one dataclass whose defaults are the paper's recipe, and --task-weights parsing.
No torch: the command reads its option defaults from here, so each default is stated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rsg_eval.core.errors import RSGError
from rsg_eval.corpus.labels import TASKS


@dataclass
class TrainConfig:
    model: str
    corpus: str
    out: str
    epochs: int = 4
    batch_size: int = 12                 # sequences per micro-step: in all ("total") or per task ("per-task")
    grad_accum: int = 2
    batch_reading: str = "total"         # the paper's "batch of 12 sequences": total (default) | per-task
    max_source_length: int = 512
    max_target_length: int = 512
    schedule: str = "paper"              # paper | cycle-gamma | cosine
    lr_min: float = 1e-6
    lr: float = 1e-4                     # the peak (CyclicLR max_lr)
    gamma: float = 0.9                   # paper: per optimizer step (exp_range); cycle-gamma: per cycle
    step_size_up: int | None = None      # paper: 2000 (torch default); cycle-gamma: half an epoch
    warmup_steps: int | None = None      # cosine: 6 % of all steps
    weight_decay: float = 0.01           # torch AdamW default
    clip_norm: float = 1.0
    task_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    split: str = "0.25"                  # Block 1 = a quarter of the encoder (6 of 24 for FRED-T5-1.7B)
    adapter_dim: int | None = None       # d_model // 16
    adapter_activation: str = "relu"     # relu | linear (the paper's wording; see models/adapters.py)
    adapter_layout: str = "per-head"     # per-head (4 adapters) | shared-mc-ner (the paper's 3: MC+NER, NLI, LM)
    ner_loss: str = "softmax"            # softmax (the paper's Eq. 1, innermost entity per token) | multilabel
    head_dropout: float = 0.1
    bf16: str = "auto"                   # auto = bf16 autocast on a GPU that supports it
    gradient_checkpointing: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None   # cap (smoke runs)
    save_every: int = 0                  # also save a resume point every N optimizer steps (0 = per epoch only)
    lm_prefix: str = "auto"              # "<LM>" when the tokenizer has it (FRED), else ""
    val_batch_size: int | None = None
    dist_timeout: float = 7200.0         # seconds a process may wait for the others (several GPUs)
    early_stopping: int = 0              # stop after N epochs without a better mean val loss; 0 = off (paper: none)
    sharding: str | None = None          # none | ddp | fsdp; None = ddp under a launcher (rsg_eval.engine.sharding)
    fsdp_cpu_offload: bool = False
    optimizer: str = "adamw"             # adamw | adafactor (engine.optim; transformers' Adafactor, T5's settings)
    report_to: str = "none"              # experiment trackers: none | tensorboard | wandb | mlflow, a comma list

    def fingerprint_dict(self) -> dict[str, Any]:
        """The settings a run's outputs depend on, under the names run.json and settings.json have always used
        (OLD_NAMES), so output folders written before the fields were renamed stay resumable."""
        d = asdict(self)
        for k in ("out", "save_every", "val_batch_size", "dist_timeout", "sharding", "fsdp_cpu_offload",
                  "report_to"):
            d.pop(k)
        d = {OLD_NAMES.get(k, k): v for k, v in d.items()}
        if not d["early_stopping"]:
            d.pop("early_stopping")   # off: the fingerprint of runs written before the option existed
        if d["optimizer"] == "adamw":
            d.pop("optimizer")        # likewise
        return d



# Field names equal the option names (--max-source-length, --lr, --save-every); before they did not. A recorded
# config uses the old names, and `from_dict` reads either.
OLD_NAMES = {"max_source_length": "max_length", "lr": "lr_max", "save_every": "save_steps"}


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a mapping that may use the old field names (OLD_NAMES)."""
    new = {v: k for k, v in OLD_NAMES.items()}
    return TrainConfig(**{new.get(k, k): v for k, v in d.items()})


def default(name: str) -> Any:
    """The default of TrainConfig field `name` (what `rsg train-hmtl --help` shows)."""
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]


def parse_task_weights(spec: str | None) -> dict[str, float]:
    """"ner=1,mc=0.5" -> full weight dict (unnamed tasks keep 1.0)."""
    weights = {t: 1.0 for t in TASKS}
    if not spec:
        return weights
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise RSGError(f"unknown task {name!r}", field="task-weights", expected=list(TASKS))
        try:
            weights[name] = float(val)
        except ValueError:
            raise RSGError(f"not a number: {val!r}", field=f"task-weights {name}") from None
        if weights[name] < 0:
            raise RSGError("weights must be >= 0", field=f"task-weights {name}")
    return weights
