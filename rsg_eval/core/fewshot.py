"""Few-shot examples for `rsg zeroshot --num-fewshot K`: which solved training examples go before each item.

Light module (no torch). The pool of a task is the train split of `TaskSpec.train_from` (TERRa's for LiDiRus),
labelled items only, in whole groups: a MuSeRC question with its answers, a RuCoS query with its passage. A shot
is one item of a drawn group (MuSeRC: one answer of the question, so the shot reads "passage, question, this
answer, Да/Нет"; RuCoS: the passage and its query filled with a gold entity).

The draw for one item depends only on (seed, task, item key) and the pool, never on the batch size, the number of
processes, `--limit` or the task order: each item gets its own `random.Random` seeded from a hash of those three,
and only `Random.random()` is used (its sequence is the part of the `random` module that Python keeps stable across
versions). The item itself never shows up among its own shots: pool groups whose text equals the item's (the
passage for MuSeRC and RuCoS, every field otherwise) are skipped, so a train file that repeats a val record does
not hand the model its answer.

API::

    pool_path(data, task) -> Path                   the train file (RSGError naming what is missing)
    load_pool(data, task) -> ShotPool               RSGError naming the file when there is no usable train split
    draw_shots(pool, item, k, seed) -> list[Item]   at most k (fewer when the pool is smaller), in draw order
    item_seed(seed, task, key) -> int
    shot_id(item) -> int                            what the per-item logs record for a shot (its key)
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError
from rsg_eval.core.tasks import Item, get_task
from rsg_eval.core.data import load_items

# Tasks whose shots are judged "the same text as the item" by the passage alone: a shot from the item's own
# passage would show another question (or the same query) on the text the model is being tested on.
_PASSAGE_IDENTITY = ("MuSeRC", "RuCoS")
_SPACE = re.compile(r"\s+")


@dataclass
class ShotPool:
    """Solved train examples of one task in whole groups (see the module docstring)."""

    task: str                              # the task the shots are rendered for (LiDiRus for TERRa's train)
    source: str                            # "TERRa/train": where they come from
    path: Path
    groups: list[list[Item]]               # in file order; every item has a gold label
    by_identity: dict[str, list[int]] = field(default_factory=dict)   # identity -> indices into groups

    def __len__(self) -> int:
        return len(self.groups)


def identity(task: str, fields: Any) -> str:
    """The text that makes two examples "the same" (case and whitespace ignored)."""
    name = get_task(task).name
    if name in _PASSAGE_IDENTITY:
        picked: Any = str(fields.get("passage", ""))
    else:
        picked = {k: fields[k] for k in sorted(fields)}
    text = json.dumps(picked, ensure_ascii=False, sort_keys=True, default=str)
    return _SPACE.sub(" ", text).strip().casefold()


def _solved(item: Item) -> bool:
    gold = item.gold
    if gold is None:
        return False
    if isinstance(gold, tuple):  # RuCoS: the gold answer strings
        return bool(gold) and bool(item.labels)
    return True


def _as_task(item: Item, task: str) -> Item:
    """A TERRa train item dressed as a LiDiRus one (LiDiRus templates may use sentence1/sentence2)."""
    if item.task == task:
        return item
    fields = dict(item.fields)
    if task == "LiDiRus":
        fields.setdefault("sentence1", fields.get("premise"))
        fields.setdefault("sentence2", fields.get("hypothesis"))
    return Item(task, item.split, item.key, item.group, item.doc, fields, item.labels, item.gold,
                {**dict(item.meta or {}), "source_task": item.task})


def pool_path(data: Any, task: str) -> Path:
    """The train file the shots of `task` come from; RSGError naming what is missing (and the way out)."""
    spec = get_task(task)
    if not hasattr(data, "path"):
        return Path(data)
    try:
        return data.path(spec.train_from, "train")
    except RSGError as exc:
        raise RSGError(f"few-shot examples for {spec.name} come from {spec.train_from}'s train split: "
                       f"{exc.message}", file=exc.file, field="--num-fewshot",
                       expected=f"{spec.train_from}/train.jsonl in the data, or --num-fewshot 0") from None


def load_pool(data: Any, task: str) -> ShotPool:
    """The shot pool of `task`: its `train_from` task's train split, grouped, labelled items only."""
    spec = get_task(task)
    src_task = spec.train_from
    path = pool_path(data, task)
    items = [_as_task(it, spec.name) for it in load_items(path, src_task, "train")]
    groups: dict[tuple[int, int], list[Item]] = {}
    for it in items:
        if _solved(it):
            groups.setdefault((it.doc, it.group), []).append(it)
    if not groups:
        raise RSGError(f"no labelled examples to draw few-shot examples from for {spec.name}", file=path,
                       field="--num-fewshot", expected=f"labelled records in {src_task}/train.jsonl, or "
                                                       f"--num-fewshot 0")
    pool = ShotPool(spec.name, f"{src_task}/train", path, list(groups.values()))
    for i, grp in enumerate(pool.groups):
        for ident in {identity(spec.name, it.fields) for it in grp}:
            pool.by_identity.setdefault(ident, []).append(i)
    return pool


def item_seed(seed: int, task: str, key: Any) -> int:
    """A 64-bit seed for one item's draw, from the run's few-shot seed, the task and the item key."""
    blob = json.dumps([int(seed), get_task(task).name, key], default=str).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def draw_shots(pool: ShotPool, item: Item, k: int, seed: int) -> list[Item]:
    """Up to `k` solved examples for `item`: distinct groups, never one with the item's own text."""
    if k <= 0 or not pool.groups:
        return []
    excluded = set(pool.by_identity.get(identity(pool.task, item.fields), ()))
    n = len(pool.groups)
    want = min(k, n - len(excluded))
    rng = random.Random(item_seed(seed, item.task, item.key))
    chosen: list[int] = []
    if want * 4 <= n:
        seen: set[int] = set(excluded)
        # Rejection sampling with random() only (stable across Python versions, unlike sample()/choice()): k is
        # small next to the pool in practice, so few draws are rejected.
        while len(chosen) < want:
            i = int(rng.random() * n)
            if i not in seen:
                seen.add(i)
                chosen.append(i)
    else:
        # K near (or beyond: capped above) the pool's size: rejection sampling would draw ~n log n times per
        # item. A partial Fisher-Yates shuffle of the allowed groups draws `want` times, still with random() only.
        left = [i for i in range(n) if i not in excluded]
        for j in range(want):
            r = j + int(rng.random() * (len(left) - j))
            left[j], left[r] = left[r], left[j]
        chosen = left[:want]
    shots = []
    for i in chosen:
        grp = pool.groups[i]
        shots.append(grp[int(rng.random() * len(grp))] if len(grp) > 1 else grp[0])
    return shots


def shot_id(item: Item) -> Any:
    """What a per-item log row records for one of its shots: the train item's key (MuSeRC: the answer idx)."""
    return item.key


def gold_label(item: Item) -> Any:
    """The label whose answer text a shot shows: the gold label; RuCoS: the first gold answer that is one of
    the passage's candidates (else the first gold answer)."""
    if isinstance(item.gold, tuple):
        for g in item.gold:
            if g in item.labels:
                return g
        return item.gold[0]
    return item.gold
