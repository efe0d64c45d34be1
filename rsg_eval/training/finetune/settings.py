"""What a fine-tuning run's results depend on, and the records that say so: the training units (LiDiRus rides on
TERRa), the templates checked on one item of every split, the data files' hashes, the settings the run folder is
claimed with (`run_settings`, compared on every later call) and config.json (`run_config`)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from rsg_eval import runs
from rsg_eval.core.errors import RSGError
from rsg_eval.engine.runtime import Dist
from rsg_eval.training.finetune.config import ConfigSet, FinetuneConfig

CODE_VERSION = "finetune-1"   # bump when training or decoding changes what a finished task would contain
SPLITS = ("val", "test")


def training_units(tasks: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(train task, [tasks it predicts])] in leaderboard order of the trained task: LiDiRus rides on TERRa."""
    from rsg_eval.core.tasks import TASK_NAMES, get_task

    units: dict[str, list[str]] = {}
    for t in tasks:
        src = get_task(t).train_from
        units.setdefault(src, [])
        if t not in units[src]:
            units[src].append(t)
    order = {n: i for i, n in enumerate(TASK_NAMES)}
    ordered = sorted(units.items(), key=lambda kv: order[kv[0]])
    return [(k, sorted(v, key=lambda n: (n != k, order[n]))) for k, v in ordered]


def versions() -> dict[str, str]:
    import transformers

    from rsg_eval import __version__

    return {"rsg_eval": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_templates(units: list[tuple[str, list[str]]], templates: dict[str, Any], source: Any) -> None:
    """Render each unit's template on the first item of every split it reads (train targets included), so a
    template that fails does so before a model loads or a file is written. Reads only the first records of
    each file (a RuCoS train file is large)."""
    import itertools

    from rsg_eval.core.io import iter_jsonl
    from rsg_eval.core.tasks import parse_records

    for train_task, predicts in units:
        tpl = templates[train_task]
        for t, split in [(train_task, "train"), *((p, s) for p in predicts for s in SPLITS)]:
            if not source.has(t, split):
                continue
            path = source.path(t, split)
            head = list(itertools.islice(iter_jsonl(path), 4))
            if not head and split == "train":
                continue  # an empty train file: reported later as a task with nothing to train on (others go on)
            first = next((it for it in parse_records(t, split, head, str(path)) if it.labels), None)
            if first is not None:
                tpl.render(first)


def data_shas(source: Any, units: list[tuple[str, list[str]]]) -> dict[str, str | None]:
    """{"Task/split": sha256 of the data file} for every file the units read (None: not in the data)."""
    from rsg_eval.core.data import sha256_file

    out: dict[str, str | None] = {}
    for train_task, predicts in units:
        for t, split in [(train_task, "train"), (train_task, "val"), *((p, s) for p in predicts for s in SPLITS)]:
            out[f"{t}/{split}"] = sha256_file(source.path(t, split)) if source.has(t, split) else None
    return out


# Hyper-parameters the results do not depend on (or only through the global batch, recorded instead).
NOT_SETTINGS = ("eval_batch_size", "save_every", "gradient_checkpointing", "batch_size", "grad_accum")


def result_config(cfg: FinetuneConfig, dist: Dist) -> dict[str, Any]:
    """The hyper-parameters a task's results depend on: all but NOT_SETTINGS, plus the global batch."""
    hp = {k: v for k, v in cfg.record().items() if k not in NOT_SETTINGS}
    hp["global_batch"] = cfg.batch_size * cfg.grad_accum * dist.world
    return hp


def run_settings(model: str, revision: str | None, units: list[tuple[str, list[str]]], templates: dict[str, Any],
                 configs: ConfigSet, source: Any, dist: Dist, shas: dict[str, str | None]) -> tuple[dict, dict]:
    """(run-level settings, {(task, split): per-task settings}) for `RunFolder.claim`. Per task split: the
    template, the data files (its own, and the train/val files its model was trained and selected on) and the
    hyper-parameters of the task that trains it, with the global batch instead of per-device batch x
    accumulation (so 2 processes x batch 4 resume 1 x 8)."""
    from rsg_eval.runs.provenance import data_identity

    settings: dict[str, Any] = {"model": model, "revision": revision, "code_version": CODE_VERSION,
                                "data": data_identity(source)}
    from rsg_eval.models.loading import TINY_NAME, _dir_fingerprint

    local = Path(model).expanduser()
    if model != TINY_NAME and local.is_dir():
        settings["model_dir"] = _dir_fingerprint(local)
    per_task: dict[tuple[str, str], dict] = {}
    for train_task, predicts in units:
        hp = result_config(configs.for_task(train_task), dist)
        tpl = templates[train_task]
        for t in predicts:
            for split in SPLITS:
                per_task[(t, split)] = {
                    "trained_on": train_task, "template": tpl.name, "template_sha256": tpl.sha256,
                    "hyperparameters": hp, "data_sha256": shas.get(f"{t}/{split}"),
                    "train_data_sha256": shas.get(f"{train_task}/train"),
                    "selection_data_sha256": shas.get(f"{train_task}/val")}
    return settings, per_task


def merged_config(folder: runs.RunFolder, cfg: dict[str, Any]) -> dict[str, Any]:
    """This call's config merged with what earlier calls on the folder recorded (their tasks stay listed)."""
    from rsg_eval.core.tasks import TASK_NAMES

    try:
        old = folder.read_config() or {}
    except RSGError:
        old = {}
    for key in ("template", "template_sha256", "trained_on", "hyperparameters"):
        if isinstance(old.get(key), dict):
            cfg[key] = {**old[key], **cfg[key]}
    cfg["tasks"] = [t for t in TASK_NAMES if t in set(old.get("tasks") or []) | set(cfg["tasks"])]
    return cfg


def run_config(model, revision, names, units, templates, configs: ConfigSet, source, dist: Dist,
                ckpt_root: Path, mode: str = "none") -> dict[str, Any]:
    return {
        "kind": "finetune",
        "model": model,
        "revision": revision,
        "template": {t: templates[tt].name for tt, ps in units for t in ps},
        "template_sha256": {t: templates[tt].sha256 for tt, ps in units for t in ps},
        "versions": versions(),
        "seed": configs.for_task(units[0][0]).seed if units else 0,
        "split": "all",
        "tasks": list(names),
        "data": str(source),
        "trained_on": {t: tt for tt, ps in units for t in ps},
        "hyperparameters": {tt: configs.for_task(tt).to_dict() for tt, _ in units},
        "world_size": dist.world,
        "sharding": mode,
        "checkpoint_dir": str(ckpt_root),
        "code_version": CODE_VERSION,
        "command": " ".join(sys.argv),
    }
