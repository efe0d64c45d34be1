"""Synthetic run folders for the report tests, written file by file as docs/design.md ("Run folders") fixes
them, so the report side is tested without a model. Values are drawn from a seeded generator."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

LABELS: dict[str, list] = {
    "LiDiRus": ["entailment", "not_entailment"], "TERRa": ["entailment", "not_entailment"],
    "RCB": ["entailment", "contradiction", "neutral"], "PARus": [0, 1], "MuSeRC": [0, 1],
    "RUSSE": [False, True], "RWSD": [False, True], "DaNetQA": [False, True],
}
ENTITIES = ["Москва", "Путин", "ЕС", "Косово", "Медведев", "Россия"]
DIAG = ["Negation", "Quantifiers", "Lexical entailment", None]


def row(key: Any, group: Any, gold: Any, pred: Any, labels: list, prompt: str = "", meta: dict | None = None) -> dict:
    return {"key": key, "group": group, "doc": group, "prompt": prompt or f"prompt {key}",
            "choices": [str(x) for x in labels], "labels": labels, "scores": [0.0] * len(labels),
            "pred": pred, "gold": gold, "meta": meta or {}}


def make_rows(task: str, n: int, acc: float, seed: int = 0, *, answers_per_q: tuple[int, int] = (2, 4)) -> list[dict]:
    """n items (MuSeRC: n questions) whose predictions are right with probability `acc`.

    The items and gold labels depend on the task only; `seed` draws the predictions, so runs with different
    seeds are paired on the same examples."""
    rnd = random.Random(f"{task}-gold")
    prnd = random.Random(f"{task}-{seed}")
    rows: list[dict] = []
    if task == "RuCoS":
        for i in range(n):
            gold = rnd.choice(ENTITIES)
            pred = gold if prnd.random() < acc else prnd.choice([e for e in ENTITIES if e != gold])
            rows.append(row(i, i, [gold], pred, ENTITIES, f"Запрос {i}: @placeholder ..."))
        return rows
    labels = LABELS[task]
    key = 0
    for i in range(n):
        k = rnd.randint(*answers_per_q) if task == "MuSeRC" else 1
        for _ in range(k):
            gold = rnd.choice(labels)
            pred = gold if prnd.random() < acc else prnd.choice([x for x in labels if x != gold])
            meta = {}
            if task == "LiDiRus":
                tag = rnd.choice(DIAG)
                meta = {"logic": tag} if tag else {"knowledge": "World knowledge"}
            rows.append(row(key, i, gold, pred, labels, f"{task} пример {key}: посылка и гипотеза", meta))
            key += 1
    return rows


def write_run(root: Path, name: str, tasks: dict[str, list[dict]], *, config: dict | None = None,
              split: str = "val", epochs: list[dict] | None = None, with_metrics: bool = True) -> Path:
    """A run folder: config.json, logs/<split>/<Task>.jsonl, metrics.json (via rsg_eval.core.metrics), epochs.csv."""
    from rsg_eval.core import metrics

    path = Path(root) / name
    (path / "logs" / split).mkdir(parents=True, exist_ok=True)
    cfg = {"kind": "zeroshot", "model": "tiny", "template": "default", "seed": 0, "split": split,
           "tasks": list(tasks), "data": "synthetic"}
    cfg.update(config or {})
    (path / "config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    scores = {}
    for task, rows in tasks.items():
        with (path / "logs" / split / f"{task}.jsonl").open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        lab = [r for r in rows if r["gold"] is not None]
        if lab:
            scores[task] = metrics.score(task, [r["gold"] for r in lab], [r["pred"] for r in lab],
                                         groups=[r["group"] for r in lab])
    if with_metrics:
        m = {"split": split, "tasks": scores, "total": metrics.total({t: s["score"] for t, s in scores.items()}),
             "lidirus_diagnostics": {}}
        (path / "metrics.json").write_text(json.dumps(m), encoding="utf-8")
    if epochs:
        with (path / "epochs.csv").open("w", encoding="utf-8", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(epochs[0]))
            w.writeheader()
            w.writerows(epochs)
    return path


def all_tasks(acc: float, seed: int = 0, n: int = 40) -> dict[str, list[dict]]:
    return {t: make_rows(t, n, acc, seed) for t in
            ["LiDiRus", "RCB", "PARus", "MuSeRC", "TERRa", "RUSSE", "RWSD", "DaNetQA", "RuCoS"]}
