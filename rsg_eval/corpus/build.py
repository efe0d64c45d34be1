"""`rsg build-corpus`: read the sources, clean, deduplicate, guard against RSG leakage, annotate raw texts with
teacher models, split per task and write the multi-task corpus (docs/design.md "Multi-task corpus").

Output folder:
  train.jsonl, val.jsonl   one record per line, `task` + that task's fields (+ `id`, `source`), shuffled (seeded)
  labels.json              {"mc": [topic classes], "ner": [entity types]}
  summary.json             examples per task and split, length percentiles, sources, and what every stage removed
  problems.txt             every skipped bad record, file:line: message (only when there were any)
  work/annotate/<job>/     annotation shards (resumable; safe to delete once the corpus is written)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rsg_eval.corpus import annotate as ann
from rsg_eval.corpus.brat import iter_brat
from rsg_eval.corpus.cleaning import Cleaner, Deduper
from rsg_eval.corpus.config import CorpusConfig, SourceConfig
from rsg_eval.corpus.leakage import LeakageGuard, build_rsg_index
from rsg_eval.corpus.readers import iter_nli, iter_pairs, iter_texts, iter_topics
from rsg_eval.corpus.records import MAIN_FIELD, RAW, TASKS, Problems
from rsg_eval.errors import RSGError
from rsg_eval.io import atomic_write_json, atomic_write_text, guarded_write


@dataclass
class BuildOptions:
    limit: int | None = None                   # per source, for a quick trial
    teachers: dict[str, str] = field(default_factory=dict)   # --teacher task=MODEL
    rsg_data: str | None = None                # --data (overrides the config)
    strict: bool = False                       # stop at the first bad record / failing batch
    retry_failed: bool = False                 # recompute shards that had failing batches
    device: str | None = None
    progress: bool = True
    echo: Callable[[str], None] = print
    teacher_objects: dict[str, Any] | None = None             # ready teachers (tests)
    on_shard: Callable[[ann.ShardEvent], None] | None = None  # called after every shard (tests, progress)


def read_source(src: SourceConfig, cfg: CorpusConfig, problems: Problems, dropped: dict[str, int]) -> Iterator[dict]:
    o = src.opts
    if src.kind == "text":
        return iter_texts(src.path, text_field=o.get("text_field", "text"), id_field=o.get("id_field"),
                          problems=problems, source=src.name)
    if src.kind == "brat":
        type_map = {str(k): str(v) for k, v in (o.get("type_map") or {}).items()}
        return iter_brat(src.path, types=cfg.ner_types, type_map=type_map,
                         discontinuous=o.get("discontinuous", "span"), max_chars=int(o.get("max_chars", 0)),
                         problems=problems, source=src.name)
    if src.kind == "topic":
        return iter_topics(src.path, text_field=o.get("text_field", "text"), label_field=o.get("label_field", "label"),
                           label_map=o.get("label_map"), classes=cfg.mc_classes, id_field=o.get("id_field"),
                           problems=problems, source=src.name, dropped=dropped)
    if src.kind == "nli":
        return iter_nli(src.path, premise_field=o.get("premise_field", "premise"),
                        hypothesis_field=o.get("hypothesis_field", "hypothesis"),
                        label_field=o.get("label_field", "label"), label_map=o.get("label_map"),
                        id_field=o.get("id_field"), problems=problems, source=src.name, dropped=dropped)
    return iter_pairs(src.path, task=o["task"], fields={str(k): str(v) for k, v in o["fields"].items()},
                      group_field=o.get("group_field"), id_field=o.get("id_field"), problems=problems,
                      source=src.name)


def percentiles(values: list[int], qs: Iterable[int] = (5, 50, 95)) -> dict[str, int]:
    """Nearest-rank percentiles (p5, p50, p95) and the max; {} for no values."""
    if not values:
        return {}
    v = sorted(values)
    out = {f"p{q}": v[min(len(v) - 1, max(0, -(-q * len(v) // 100) - 1))] for q in qs}
    out["max"] = v[-1]
    return out


def split_task(recs: list[dict], *, seed: int, task: str, val_fraction: float, val_max: int | None
               ) -> tuple[list[dict], list[dict]]:
    """Seeded train/val split of one task by groups (pieces of one document never straddle the split)."""
    groups: dict[str, list[dict]] = {}
    for r in recs:
        groups.setdefault(r.get("_group") or r["id"], []).append(r)
    keys = list(groups)
    if len(keys) < 2 or val_fraction <= 0:
        return list(recs), []
    random.Random(f"{seed}:{task}").shuffle(keys)
    target = max(1, round(val_fraction * len(recs)))
    if val_max is not None:
        target = min(target, val_max)
    val, train, n = [], [], 0
    for k in keys:
        if n < target and len(keys) - len(val) > 1 and target > 0:
            val.append(k)
            n += len(groups[k])
        else:
            train.append(k)
    return [r for k in train for r in groups[k]], [r for k in val for r in groups[k]]


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    """Stream JSON lines into a temporary file next to `path`, fsync, then rename (like rsg_eval.io's atomic
    writers, without holding the whole file in memory: a full corpus is a few GB of text). A full disk is one
    line naming the file (rsg_eval.io.guarded_write), with the temporary file removed."""
    with guarded_write(path):
        _write_jsonl_atomic(path, rows)
    return path


def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _public(rec: dict) -> dict:
    """The record as written: internal `_` keys dropped; the source name goes to `source`, except for paraphrase,
    whose `source` field is its input text (docs/design.md), so there it goes to `origin`."""
    out = {k: v for k, v in rec.items() if not k.startswith("_")}
    out["origin" if rec["task"] == "paraphrase" else "source"] = rec["_src"]
    return out


def _leakage_index(cfg: CorpusConfig, opts: BuildOptions) -> tuple[LeakageGuard | None, dict]:
    if not cfg.leakage:
        opts.echo("warning: the leakage guard is switched off in the config")
        return None, {"applied": False, "reason": "disabled in the config"}
    spec = opts.rsg_data or cfg.rsg_data
    try:
        index, seen = build_rsg_index(spec, n=cfg.ngram, splits=cfg.leakage_splits)
    except RSGError as err:
        if spec is not None:
            raise
        opts.echo(f"warning: leakage guard NOT applied ({err}); pass --data DIR to check the corpus against "
                  "RSG val/test texts")
        return None, {"applied": False, "reason": str(err)}
    if not seen:
        raise RSGError("no RSG val/test files found for the leakage guard", file=spec, field="--data")
    return LeakageGuard(index), {"applied": True, "rsg_data": str(spec) if spec else "cache",
                                 "reference_texts": seen}


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def build_corpus(cfg: CorpusConfig, out: Path, opts: BuildOptions | None = None) -> dict:
    """Build the corpus into `out`; returns the summary (also saved as out/summary.json)."""
    opts = opts or BuildOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems = Problems(strict=opts.strict, echo=opts.echo)
    cleaner, deduper = Cleaner(cfg.cleaning), Deduper(cfg.cleaning)
    specs = cfg.teacher_specs(opts.teachers)
    guard, leak_info = _leakage_index(cfg, opts)

    prog = _progress(opts.progress)
    if prog is not None:
        prog.start()
    try:
        return _build(cfg, out, opts, problems, cleaner, deduper, specs, guard, leak_info, prog)
    finally:
        if prog is not None:
            prog.stop()


def _build(cfg: CorpusConfig, out: Path, opts: BuildOptions, problems: Problems, cleaner: Cleaner, deduper: Deduper,
           specs: dict, guard: LeakageGuard | None, leak_info: dict, prog: Any) -> dict:
    # 1. read -> clean -> dedup -> leakage, per source, streaming.
    by_task: dict[str, list[dict]] = {t: [] for t in (RAW, *TASKS)}
    read_counts: dict[str, dict[str, int]] = {}
    label_dropped: dict[str, int] = {}
    for src in cfg.sources:
        counts = read_counts.setdefault(src.name, Counter())
        recs = read_source(src, cfg, problems, label_dropped)
        limit = min((x for x in (opts.limit, src.limit) if x is not None), default=None)
        if limit is not None:
            recs = itertools.islice(recs, limit)
        bar = prog.add_task(f"read {src.name}", total=limit) if prog is not None else None
        for rec in recs:
            counts["read"] += 1
            if bar is not None and counts["read"] % 256 == 0:
                prog.update(bar, completed=counts["read"])
            if src.clean:
                rec = cleaner.clean(rec)
                if rec is None:
                    continue
            if src.dedup and not deduper.keep(rec):
                continue
            if guard is not None and not guard.keep(rec):
                continue
            counts["kept"] += 1
            by_task[rec["task"]].append(rec)
        if bar is not None:
            prog.update(bar, completed=counts["read"], total=counts["read"])

    # 2. annotate the raw texts.
    texts = by_task.pop(RAW)
    report = ann.AnnotateReport()
    if texts:
        runnable = {j: w for j, w in cfg.shares.items() if all(t in specs for t in ann.JOBS[j])}
        for j in cfg.shares:
            if j not in runnable and cfg.shares[j] > 0:
                need = " and ".join(f"--teacher {t}=MODEL" for t in ann.JOBS[j] if t not in specs)
                opts.echo(f"note: annotation job {j} skipped: it needs {need}")
        if not runnable:
            opts.echo(f"warning: {len(texts)} raw texts were read but no teacher model was given; they are unused")
        assigned = ann.assign_jobs(texts, runnable, cfg.seed)
        for job, job_texts in assigned.items():
            recs = ann.annotate_job(job, job_texts, specs, opts.teacher_objects, out / "work",
                                    shard_size=cfg.shard_size,
                                    on_error="stop" if opts.strict else cfg.on_error, report=report,
                                    device=opts.device or cfg.device, retry_failed=opts.retry_failed,
                                    echo=opts.echo, on_shard=opts.on_shard, progress=prog)
            for rec in recs:
                # generated text can repeat memorised evaluation text, so it is checked too
                if guard is not None and not guard.keep(rec):
                    continue
                if not deduper.keep(rec):
                    continue
                by_task[rec["task"]].append(rec)

    # 3. split and write.
    train, val, per_task = [], [], {}
    for task in TASKS:
        recs = by_task[task]
        if not recs:
            continue
        tr, va = split_task(recs, seed=cfg.seed, task=task, val_fraction=cfg.val_fraction, val_max=cfg.val_max)
        train += tr
        val += va
        per_task[task] = {"train": len(tr), "val": len(va),
                          "chars": percentiles([len(r[MAIN_FIELD[task]]) for r in recs]),
                          "sources": dict(Counter(r["_src"] for r in recs))}
    if not train:
        raise RSGError("the corpus is empty after reading, cleaning and filtering (see the counts above)",
                       file=out)
    rng = random.Random(cfg.seed)
    rng.shuffle(train)
    rng.shuffle(val)
    mc = cfg.mc_classes or tuple(sorted({r["label"] for r in by_task["mc"]}))
    labels = {"mc": list(mc), "ner": list(cfg.ner_types)} if mc else {"ner": list(cfg.ner_types)}
    write_jsonl_atomic(out / "train.jsonl", (_public(r) for r in train))
    write_jsonl_atomic(out / "val.jsonl", (_public(r) for r in val))
    atomic_write_json(out / "labels.json", labels)
    if problems.all_messages:
        atomic_write_text(out / "problems.txt", "".join(m + "\n" for m in problems.all_messages))
    else:
        (out / "problems.txt").unlink(missing_ok=True)  # left by an earlier run
    summary = {
        "tasks": per_task,
        "total": {"train": len(train), "val": len(val)},
        "sources": {k: dict(v) for k, v in read_counts.items()},
        "cleaning": {t: dict(c) for t, c in cleaner.counts.items()},
        "dedup": {t: dict(c) for t, c in deduper.counts.items()},
        "labels_dropped_by_map": label_dropped,
        "leakage": {**leak_info, **(guard.to_json() if guard else {})},
        "annotation": report.to_json(),
        "problems": problems.to_json(),
        "seed": cfg.seed, "val_fraction": cfg.val_fraction, "limit": opts.limit,
        "teachers": {t: s.model for t, s in specs.items()},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def summary_table(summary: dict) -> Any:
    """A rich Table: examples per task and split, length percentiles (characters), sources."""
    from rich.table import Table

    tab = Table(title="corpus")
    for col in ("task", "train", "val", "chars p5/p50/p95", "sources"):
        tab.add_column(col, justify="right" if col in ("train", "val") else "left")
    for task, d in summary["tasks"].items():
        c = d["chars"]
        tab.add_row(task, str(d["train"]), str(d["val"]), f"{c.get('p5')}/{c.get('p50')}/{c.get('p95')}",
                    ", ".join(f"{k} {v}" for k, v in d["sources"].items()))
    tab.add_row("total", str(summary["total"]["train"]), str(summary["total"]["val"]), "", "")
    return tab


def removal_lines(summary: dict) -> list[str]:
    """One line per stage that removed something (for the console)."""
    lines = []
    for stage in ("cleaning", "dedup"):
        for task, c in summary[stage].items():
            if c:
                lines.append(f"{stage} {task}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    leak = summary["leakage"]
    if leak.get("applied"):
        lines.append(f"leakage guard ({leak['ngram']}-grams, {leak['reference_ngrams']} RSG n-grams): dropped "
                     + (", ".join(f"{t} {n}" for t, n in leak["dropped_per_task"].items()) or "nothing"))
    for job, c in summary["annotation"]["stats"].items():
        lines.append(f"annotation {job}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    if summary["problems"]["total"]:
        lines.append(f"bad records skipped: {summary['problems']['skipped_per_source']}")
    if summary["labels_dropped_by_map"]:
        lines.append(f"labels mapped to null (dropped on purpose): {summary['labels_dropped_by_map']}")
    return lines
