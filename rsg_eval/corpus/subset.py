"""A seeded, per-task stratified subset of a built corpus (the paper's 10k-example corpus), without re-annotating.

`cut_subset(corpus, out, train=10000)`: every task keeps its share of the corpus (largest-remainder rounding, at
least one example for a task that has any); inside a task the examples with the smallest seeded hash of their id are
taken, i.e. a uniform random sample that is the same on every machine. Val is cut the same way, by default one val
example per ten train examples: the paper's Figure 2 caption gives its 10k corpus as 10,000 train and 1,000
validation examples (the corpus' own proportion, 5 %, gave 526). The records are copied as they are (provenance
included) in the corpus' own order; labels.json is copied whole, so the heads keep all their classes. Memory: the
chosen line numbers only. Stdlib only.
"""

from __future__ import annotations

import heapq
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from rsg_eval.corpus.stage import key64
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import atomic_write_json, iter_jsonl, sha256_file


def allocate(counts: dict[str, int], n: int) -> dict[str, int]:
    """n split over the tasks in proportion to `counts` (largest remainder; ties by task name); each task with
    examples gets at least one when n allows, and never more than it has."""
    total = sum(counts.values())
    tasks = sorted(t for t, c in counts.items() if c > 0)
    if n >= total:
        return {t: counts[t] for t in tasks}
    quota = {t: n * counts[t] / total for t in tasks}
    out = {t: min(counts[t], int(quota[t])) for t in tasks}
    if n >= len(tasks):
        for t in tasks:
            if out[t] == 0:
                out[t] = 1
    rest = n - sum(out.values())
    order = sorted(tasks, key=lambda t: (-(quota[t] - int(quota[t])), t))
    while rest > 0:
        progressed = False
        for t in order:
            if rest and out[t] < counts[t]:
                out[t] += 1
                rest -= 1
                progressed = True
        if not progressed:
            break
    while rest < 0:   # the minimum of one per task overshot n: take back from the largest
        t = max(tasks, key=lambda t: (out[t], t))
        out[t] -= 1
        rest += 1
    return out


def _counts(path: Path) -> dict[str, int]:
    c: Counter = Counter()
    for _, rec in iter_jsonl(path):
        c[rec.get("task")] += 1
    return dict(c)


def _choose(path: Path, quota: dict[str, int], seed: int, split: str) -> set[int]:
    """Line numbers of the records to keep: per task the `quota[task]` smallest seeded keys (heaps of that size)."""
    heaps: dict[str, list[tuple[int, int]]] = {t: [] for t in quota}
    for line, rec in iter_jsonl(path):
        task = rec.get("task")
        k = quota.get(task, 0)
        if not k:
            continue
        key = key64(seed, "subset", split, task, rec.get("id", line))
        h = heaps[task]
        if len(h) < k:
            heapq.heappush(h, (-key, line))
        elif -h[0][0] > key:
            heapq.heapreplace(h, (-key, line))
    return {line for h in heaps.values() for _, line in h}


def _copy(src: Path, dst: Path, lines: set[int]) -> int:
    from rsg_eval.corpus.build import write_jsonl_atomic

    def rows():
        for line, rec in iter_jsonl(src):
            if line in lines:
                yield rec

    write_jsonl_atomic(dst, rows())
    return len(lines)


PAPER_VAL_PER_TRAIN = 0.1  # Figure 2's caption: 10,000 train and 1,000 validation examples


def parse_count(text: str | int, field: str = "--subset") -> int:
    """'10000', '10k' or '1m' -> a positive count."""
    raw = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = {"k": 1_000, "m": 1_000_000}.get(raw[-1:], 1)
    digits = raw[:-1] if mult > 1 else raw
    if not digits.isdigit() or int(digits) * mult <= 0:
        raise RSGError(f"bad count {text!r}", field=field, expected="a positive number such as 10000 or 10k")
    return int(digits) * mult


def cut_subset(corpus: Path, out: Path, train: int, val: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the subset into `out` (train.jsonl, val.jsonl, labels.json, summary.json); returns its summary.
    `val` None: train / 10 (PAPER_VAL_PER_TRAIN), at most the corpus' val."""
    corpus, out = Path(corpus), Path(out)
    src_train, src_val = corpus / "train.jsonl", corpus / "val.jsonl"
    if not src_train.is_file():
        raise RSGError("no train.jsonl: build the corpus first", file=corpus)
    if out.resolve() == corpus.resolve():
        raise RSGError("the subset would overwrite its own corpus", file=out, field="--subset-out")
    if train <= 0:
        raise RSGError(f"subset size {train}", field="--subset", expected="a positive number of train examples")
    c_train = _counts(src_train)
    c_val = _counts(src_val) if src_val.is_file() else {}
    n_train_all, n_val_all = sum(c_train.values()), sum(c_val.values())
    if train > n_train_all:
        raise RSGError(f"a subset of {train} train examples from a corpus of {n_train_all}", field="--subset",
                       expected=f"at most {n_train_all}")
    if val is None:
        val = round(train * PAPER_VAL_PER_TRAIN)
    val = min(val, n_val_all)
    q_train, q_val = allocate(c_train, train), allocate(c_val, val) if val else {}
    out.mkdir(parents=True, exist_ok=True)
    _copy(src_train, out / "train.jsonl", _choose(src_train, q_train, seed, "train"))
    if src_val.is_file():
        _copy(src_val, out / "val.jsonl", _choose(src_val, q_val, seed, "val"))
    if (corpus / "labels.json").is_file():
        shutil.copyfile(corpus / "labels.json", out / "labels.json")
    tasks = {t: {"train": q_train.get(t, 0), "val": q_val.get(t, 0), "of_train": c_train.get(t, 0),
                 "of_val": c_val.get(t, 0)} for t in sorted(set(c_train) | set(c_val))}
    summary = {"subset_of": str(corpus), "seed": seed, "tasks": tasks,
               "total": {"train": sum(q_train.values()), "val": sum(q_val.values())},
               "of": {"train": n_train_all, "val": n_val_all, "train_sha256": sha256_file(src_train)}}
    atomic_write_json(out / "summary.json", summary)
    return summary


def subset_table(summary: dict) -> Any:
    from rich.table import Table

    tab = Table(title=f"subset (seed {summary['seed']}) of {summary['subset_of']}")
    for col in ("task", "train", "val", "of train", "of val"):
        tab.add_column(col, justify="left" if col == "task" else "right")
    for t, d in summary["tasks"].items():
        tab.add_row(t, str(d["train"]), str(d["val"]), str(d["of_train"]), str(d["of_val"]))
    tab.add_row("total", str(summary["total"]["train"]), str(summary["total"]["val"]),
                str(summary["of"]["train"]), str(summary["of"]["val"]))
    return tab

