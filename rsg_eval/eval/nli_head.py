"""`rsg zeroshot --nli-head`: answer TERRa, LiDiRus and RCB with a hierarchical checkpoint's NLI head.

Blocks 1 and 2 run, the decoder does not. The input is the same "premise + Гипотеза: hypothesis" text the trainer
used (`rsg_eval.corpus.load.NLI_TEMPLATE`). The head gives p(entailment), p(contradiction), p(neutral):

- RCB (three classes): the most probable of the three;
- TERRa, LiDiRus (two classes): entailment when p(entailment) > p(contradiction) + p(neutral), i.e. the two
  non-entailment classes are merged into `not_entailment`.

The result is an ordinary run folder (kind "nli-head") written with rsg_eval.runs, so reports compare it with a
prompted zero-shot run of the same checkpoint. Logged scores are log-probabilities of the task's labels.
Finished tasks with the same fingerprint are skipped on a rerun.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.corpus.load import nli_input

KIND = "nli-head"
NLI_TASKS = ("LiDiRus", "RCB", "TERRa")     # leaderboard order
CODE_VERSION = 1
SPLIT_CHOICES = ("val", "test", "all")


@dataclass
class NLIHeadResult:
    """What the run did, with the fields `rsg zeroshot`'s summary reads (rsg_eval.eval.zeroshot.ZeroShotResult's)."""

    run: Any                                    # rsg_eval.runs.RunFolder
    done: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict | None = None
    zip: Any = None                             # rsg_eval.runs.ZipResult: submission-partial.zip (3 of 9 tasks)
    outcomes: list[Any] = field(default_factory=list)   # rsg_eval.eval.zeroshot.TaskOutcome per (task, split)
    interrupted: bool = False
    main: bool = True


@torch.no_grad()
def nli_probabilities(hier: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                      max_length: int = 512) -> torch.Tensor:
    """(N, n_nli) probabilities in the head's label order for (premise, hypothesis) pairs; batched by length so
    padding stays small (padding does not change a result: pooling and attention are masked)."""
    from rsg_eval.core.limits import cut_text

    texts = [cut_text(nli_input(p, h), max_length) for p, h in pairs]  # never tokenise a crafted 200 MB text
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty((len(texts), len(hier.config.nli_labels)), dtype=torch.float32)
    device = next(hier.parameters()).device
    hier.eval()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        logits = hier.nli_logits(enc["input_ids"].to(device), enc["attention_mask"].to(device))   # (b, 3)
        out[idx] = torch.softmax(logits.float(), dim=-1).cpu()
    return out


def decide(task: str, probs: torch.Tensor, head_labels: Sequence[str], item_labels: Sequence[Any]
           ) -> tuple[Any, list[float]]:
    """(predicted canonical label, log-probability per item label) for one item."""
    p = {name: float(probs[i]) for i, name in enumerate(head_labels)}
    if task == "RCB":
        scores = [p[str(lab)] for lab in item_labels]
    else:   # TERRa, LiDiRus: entailment vs not_entailment (= contradiction + neutral)
        ent = p["entailment"]
        scores = [ent if lab == "entailment" else 1.0 - ent for lab in item_labels]
    import math

    logs = [math.log(max(s, 1e-12)) for s in scores]
    best = max(range(len(scores)), key=lambda i: scores[i])
    return item_labels[best], logs


def _splits(split: str) -> list[str]:
    if split not in SPLIT_CHOICES:
        raise RSGError(f"unknown split {split!r}", field="--split", expected=list(SPLIT_CHOICES))
    return ["val", "test"] if split == "all" else [split]


def _tasks(tasks: Sequence[str] | str | None) -> list[str]:
    from rsg_eval.core.tasks import resolve_tasks

    if tasks is None or (isinstance(tasks, str) and tasks.lower() == "all"):
        return list(NLI_TASKS)
    names = resolve_tasks(list(tasks) if not isinstance(tasks, str) else [tasks])
    bad = [t for t in names if t not in NLI_TASKS]
    if bad:
        raise RSGError(f"the NLI head answers only entailment tasks, not {', '.join(bad)}", field="--tasks",
                       expected=list(NLI_TASKS))
    return [t for t in NLI_TASKS if t in names]


def run_nli_head_eval(model_path: str | Path | None = None, *, model: str | Path | None = None, data: Any = None,
                      tasks: Sequence[str] | str | None = None, split: str = "val", run_dir: str | Path | None = None,
                      run: str | None = None, root: str | Path = "submissions", limit: int | None = None,
                      batch_size: int | str = 16, device: str | None = None, dtype: str | None = None,
                      console: Any = None, loaded: Any = None, restart: bool = False) -> NLIHeadResult:
    """Evaluate the NLI head of a hierarchical checkpoint on TERRa / LiDiRus / RCB into a run folder.

    `model_path` (or `model`, the zero-shot CLI's name for it) is the checkpoint directory; `run_dir` (or `run`
    under `root`) the run folder, by default `<root>/<model>-nli-head-<date>`. `loaded` skips loading. The run
    folder holds one configuration (`RunFolder.claim`): other settings are refused unless `restart`.
    """
    from rich.console import Console

    from rsg_eval.core.data import resolve_data, sha256_file
    from rsg_eval.runs import RunFolder, fingerprint, run_path
    from rsg_eval.core.tasks import limit_groups
    from rsg_eval.core.data import load_items

    console = console or Console(stderr=True)
    model_id = str(model_path if model_path is not None else model or "")
    if not model_id:
        raise RSGError("no model given", field="--model", expected="a hierarchical checkpoint directory")
    if limit is not None and limit < 1:
        raise RSGError(f"--limit must be at least 1, got {limit}", field="--limit")
    bs = 16 if batch_size == "auto" else int(batch_size)
    from rsg_eval.models.hierarchical import is_hierarchical_dir

    if loaded is None and not is_hierarchical_dir(model_id):
        raise RSGError("--nli-head needs a hierarchical checkpoint (a folder with hmtl_config.json), e.g. "
                       "out/final from `rsg train-hmtl`", file=model_id, field="--model")
    names = _tasks(tasks)
    src = resolve_data(data)
    from rsg_eval.models.loading import _dir_fingerprint

    ident = {"model": model_id, "model_dir": _dir_fingerprint(Path(model_id)) if Path(model_id).is_dir() else None,
             "dtype": dtype or "auto"}
    jobs = []
    for task in names:
        for sp in _splits(split):
            items = limit_groups(load_items(src, task, sp), limit)
            parts = {**ident, "task": task, "split": sp, "kind": KIND, "code_version": CODE_VERSION,
                     "limit": limit, "data_sha256": sha256_file(src.path(task, sp))}
            jobs.append((task, sp, items, parts, fingerprint(parts)))

    tags = [f"limit{limit}"] if limit else []
    folder = RunFolder(Path(run_dir) if run_dir is not None else
                       run_path(run, model=model_id, kind=KIND, tags=tags, root=root))
    from rsg_eval.runs.provenance import data_identity

    settings = {**ident, "code_version": CODE_VERSION, "limit": limit, "data": data_identity(src)}
    claim = folder.claim(KIND, settings, per_task={(j[0], j[1]): {"data_sha256": j[3]["data_sha256"]} for j in jobs},
                         restart=restart)
    try:
        return _evaluate(folder, jobs, model_id, src, loaded, bs, limit, split, device, dtype, console)
    finally:
        claim.release()


def _evaluate(folder: Any, jobs: list, model_id: str, src: Any, loaded: Any, bs: int, limit: int | None,
              split: str, device: str | None, dtype: str | None, console: Any) -> NLIHeadResult:
    """run_nli_head_eval's work once the run folder is claimed."""
    from rsg_eval.runs import log_row
    from rsg_eval.eval.zeroshot import TaskOutcome

    result = NLIHeadResult(folder)
    pending = []
    for job in jobs:
        if folder.is_done(job[0], job[1], job[4]):
            result.skipped.append((job[0], job[1]))
            result.outcomes.append(TaskOutcome(job[0], job[1], "skipped", len(job[2])))
            console.print(f"[dim]{job[0]}/{job[1]}: already finished with the same settings, skipped[/]")
        else:
            pending.append(job)
    if pending and loaded is None:
        from rsg_eval.models.loading import load_model

        console.print(f"loading hierarchical checkpoint [bold]{model_id}[/] ...")
        loaded = load_model(model_id, device=device, dtype=dtype)
    hier = loaded.info.get("hierarchical") if loaded is not None else None
    if pending and hier is None:
        raise RSGError("the model has no NLI head (not a hierarchical checkpoint)", file=model_id, field="--model")
    _write_config(folder, model_id, src, jobs, loaded, bs, limit, split)
    for task, sp, items, parts, fp in pending:
        t0 = time.perf_counter()
        probs = nli_probabilities(hier, loaded.tokenizer, [(it.fields["premise"], it.fields["hypothesis"])
                                                           for it in items], batch_size=bs)
        preds, rows = {}, []
        for it, pr in zip(items, probs):
            label, scores = decide(task, pr, hier.config.nli_labels, it.labels)
            preds[it.key] = label
            rows.append(log_row(it, label, prompt=nli_input(it.fields["premise"], it.fields["hypothesis"]),
                                choices=[str(lab) for lab in it.labels], scores=scores))
        folder.write_task(task, sp, items, preds, rows, fp, parts=parts,
                          extra={"seconds": round(time.perf_counter() - t0, 3), "kind": KIND})
        result.done.append((task, sp))
        seconds = time.perf_counter() - t0
        result.outcomes.append(TaskOutcome(task, sp, "done", len(items), seconds))
        console.print(f"{task}/{sp}: {len(items)} items through the NLI head ({seconds:.1f} s)")
    # The metrics table, the run folder and the zip are for the caller to print (`rsg zeroshot`: print_summary).
    if folder.finished("val"):
        result.metrics = folder.write_metrics("val")
    if folder.finished("test"):
        result.zip = folder.build_zip()
    return result


def _write_config(folder: Any, model_id: str, src: Any, jobs: list, loaded: Any, bs: int, limit: int | None,
                  split: str) -> None:
    from rsg_eval import __version__
    from rsg_eval.core.tasks import TASK_NAMES

    old = folder.read_config() or {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tasks = set(old.get("tasks", [])) | {j[0] for j in jobs}
    splits = set(old.get("splits", [])) | {j[1] for j in jobs}
    hier = loaded.info.get("hierarchical") if loaded is not None else None
    cfg = {
        **old, "kind": KIND, "model": model_id, "revision": None, "template": "nli-head",
        "template_sha256": {}, "seed": 0, "limit": limit, "batch_size": bs,
        "split": "all" if splits >= {"val", "test"} else sorted(splits)[0], "splits": sorted(splits),
        "tasks": [t for t in TASK_NAMES if t in tasks], "data": str(src),
        "versions": {"rsg-eval": __version__, "torch": torch.__version__},
        "nli": {"input": "premise\\nГипотеза: hypothesis", "two_class_rule":
                "entailment iff p(entailment) > p(contradiction) + p(neutral)",
                "head_labels": list(hier.config.nli_labels) if hier is not None else old.get("nli", {}).get(
                    "head_labels"),
                "split_layer": hier.config.split_layer if hier is not None else None},
        "created": old.get("created", now), "updated": now,
    }
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_config(cfg)
