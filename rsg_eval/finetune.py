"""Per-task fine-tuning (`rsg finetune`). The implementation lives in the `rsg_eval.training` package:
config (hyper-parameters), data (pairs, batch plan), loop (the training loop), checkpoint, dist, finetune (runner).
"""

from __future__ import annotations

from rsg_eval.training.config import ConfigSet, FinetuneConfig, load_config_set
from rsg_eval.training.finetune import FinetuneOutcome, Reporter, run_finetune, training_units

__all__ = ["ConfigSet", "FinetuneConfig", "FinetuneOutcome", "Reporter", "load_config_set", "run_finetune",
           "training_units"]
