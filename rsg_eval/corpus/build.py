"""`rsg build-corpus`: read the sources, clean, deduplicate, guard against RSG leakage, annotate raw texts with
teacher models up to each task's size target, cap, split per task and write the multi-task corpus
(docs/design.md "Multi-task corpus"; docs/corpus.md walks through every step).

Memory does not grow with the corpus: records flow from stage to stage through files under work/stage/ (per-task
spools, hash-bucketed sorts), the duplicate index is an SQLite file (cleaning.KeyStore), and the per-task
bookkeeping is counters plus O(val size) keys (stage.SmallestKeys). `rsg bench corpus` measures it.

Output folder:
  train.jsonl, val.jsonl   one record per line, `task` + that task's fields (+ `id`, `source`, and for teacher-made
                           records `teacher`, `teacher_score`, ...), in a seeded shuffled order
  labels.json              {"mc": [topic classes], "ner": [entity types]}
  summary.json             per task: target, built, train/val, sources, teacher-made, dropped; the teachers'
                           ids and revisions; what every stage removed; the build fingerprint
  problems.txt             every skipped bad record, file:line: message (only when there were any)
  work/annotate/<job>/     annotation shards (resumable; safe to delete once the corpus is written)
  work/stage/, work/dedup.sqlite   scratch space of the last run
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rsg_eval.corpus import annotate as ann
from rsg_eval.corpus.brat import iter_brat
from rsg_eval.corpus.cleaning import Cleaner, Deduper
from rsg_eval.corpus.config import CorpusConfig, SourceConfig, val_records
from rsg_eval.corpus.leakage import LeakageGuard, build_rsg_index
from rsg_eval.corpus.readers import iter_nli, iter_pairs, iter_texts, iter_topics
from rsg_eval.corpus.records import MAIN_FIELD, NLI_LABELS, RAW, TASKS, Problems
from rsg_eval.corpus.split import KeySet, percentiles, split_task, val_groups  # noqa: F401 (split_task re-exported)
from rsg_eval.corpus.stage import HashSorter, SmallestKeys, Spool, iter_spool, key64
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import atomic_write_json, atomic_write_text, guarded_write
from rsg_eval.corpus.summary import removal_lines, summary_table  # noqa: F401 (re-exported)

BUILD_FORMAT = 2
MAX_ROUNDS = 8   # rounds of handing texts to the jobs still below their targets


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


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    """Stream JSON lines into a temporary file next to `path`, fsync, then rename (like rsg_eval.core.io's atomic
    writers, without holding the whole file in memory: a full corpus is a few GB of text). A full disk is one
    line naming the file (rsg_eval.core.io.guarded_write), with the temporary file removed."""
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


def public_record(rec: dict) -> dict:
    """The record as written: internal `_` keys dropped; the source name goes to `source`, except for paraphrase,
    whose `source` field is its input text (docs/design.md), so there it goes to `origin`."""
    out = {k: v for k, v in rec.items() if not k.startswith("_")}
    out["origin" if rec["task"] == "paraphrase" else "source"] = rec["_src"]
    return out


def leakage_index(cfg: CorpusConfig, opts: BuildOptions) -> tuple[LeakageGuard | None, dict]:
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


def build_fingerprint(cfg: CorpusConfig, opts: BuildOptions) -> str:
    """What a finished corpus was built from: the config as read, the options that change the output, and each
    source's size and modification time (so a redownloaded source counts as a change)."""
    srcs = []
    for s in cfg.sources:
        p = Path(s.path)
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        srcs.append([s.name, [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]])
    spec = {"v": BUILD_FORMAT, "config": cfg.raw, "base": str(cfg.base), "limit": opts.limit,
            "teachers": opts.teachers, "rsg_data": opts.rsg_data, "sources": srcs}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def finished_build(out: Path, fingerprint: str) -> dict | None:
    """The summary of a corpus in `out` that was built to the end with this fingerprint, else None."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("build", {}).get("fingerprint") != fingerprint or not (out / "train.jsonl").is_file():
        return None
    return summary


def build_corpus(cfg: CorpusConfig, out: Path, opts: BuildOptions | None = None) -> dict:
    """Build the corpus into `out`; returns the summary (also saved as out/summary.json)."""
    opts = opts or BuildOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems = Problems(strict=opts.strict, echo=opts.echo)
    specs = cfg.teacher_specs(opts.teachers)
    guard, leak_info = leakage_index(cfg, opts)
    work = out / "work"
    stage = work / "stage"
    if stage.exists():
        shutil.rmtree(stage)   # the last run's scratch files; annotation shards (work/annotate) are kept
    stage.mkdir(parents=True)
    cleaner, deduper = Cleaner(cfg.cleaning), Deduper(cfg.cleaning, work / "dedup.sqlite")
    prog = _progress(opts.progress)
    if prog is not None:
        prog.start()
    try:
        b = _Builder(cfg, out, opts, problems, cleaner, deduper, specs, guard, prog)
        with guarded_write(work):   # a full disk under work/ (stage files, shards) is one line naming it
            summary = b.run()
    except BaseException:
        # the stage files and the dedup index are this run's scratch (a rerun rebuilds them): give their space
        # back, which matters most when the disk is what failed; finished annotation shards are kept
        deduper.close()
        shutil.rmtree(stage, ignore_errors=True)
        (work / "dedup.sqlite").unlink(missing_ok=True)
        raise
    finally:
        if prog is not None:
            prog.stop()
        deduper.close()
    summary["leakage"] = {**leak_info, **(guard.to_json() if guard else {})}
    summary["build"] = {"fingerprint": build_fingerprint(cfg, opts), "format": BUILD_FORMAT}
    atomic_write_json(out / "summary.json", summary)
    shutil.rmtree(stage, ignore_errors=True)
    return summary


class _Builder:
    def __init__(self, cfg: CorpusConfig, out: Path, opts: BuildOptions, problems: Problems, cleaner: Cleaner,
                 deduper: Deduper, specs: dict, guard: LeakageGuard | None, prog: Any) -> None:
        self.cfg, self.out, self.opts, self.problems = cfg, out, opts, problems
        self.cleaner, self.deduper, self.specs, self.guard, self.prog = cleaner, deduper, specs, guard, prog
        self.stage = out / "work" / "stage"
        self.spools = {t: Spool(self.stage / f"{t}.jsonl") for t in TASKS}
        self.labelled: Counter = Counter()     # task -> records from labelled sources (the spools' first lines)
        self.report = ann.AnnotateReport()
        self.texts_info: dict[str, Any] = {}
        self._teachers: dict[str, Any] = dict(opts.teacher_objects or {})

    # ------------------------------------------------------------ 1. read -> clean -> dedup -> leakage

    def read(self) -> HashSorter:
        texts = HashSorter(self.stage / "texts")
        self.read_counts: dict[str, Counter] = {}
        self.label_dropped: dict[str, int] = {}
        for src in self.cfg.sources:
            counts = self.read_counts.setdefault(src.name, Counter())
            recs = read_source(src, self.cfg, self.problems, self.label_dropped)
            limit = min((x for x in (self.opts.limit, src.limit) if x is not None), default=None)
            if limit is not None:
                recs = itertools.islice(recs, limit)
            bar = self.prog.add_task(f"read {src.name}", total=limit) if self.prog is not None else None

            def cleaned(recs: Iterable[dict] = recs, src: SourceConfig = src, counts: Counter = counts,
                        bar: Any = bar) -> Iterator[dict]:
                for rec in recs:
                    counts["read"] += 1
                    if bar is not None and counts["read"] % 256 == 0:
                        self.prog.update(bar, completed=counts["read"])
                    if src.clean:
                        rec = self.cleaner.clean(rec)
                        if rec is None:
                            continue
                    yield rec

            stream = self.deduper.filter(cleaned()) if src.dedup else cleaned()
            for rec in stream:
                if self.guard is not None and not self.guard.keep(rec):
                    continue
                counts["kept"] += 1
                if rec["task"] == RAW:
                    # the teachers draw texts in a seeded random order: sorted by a hash of seed and id
                    texts.add(key64(self.cfg.seed, "text", rec["id"]), rec)
                else:
                    self.spools[rec["task"]].add(rec)
                    self.labelled[rec["task"]] += 1
            if bar is not None:
                self.prog.update(bar, completed=counts["read"], total=counts["read"])
        return texts

    # ------------------------------------------------------------ 2. annotate

    def teacher(self, task: str) -> Any:
        t = self._teachers.get(task)
        if t is None:
            from rsg_eval.corpus.teachers import load_teacher

            t = self._teachers[task] = load_teacher(
                self.specs[task], self.opts.device or self.cfg.device, ner_types=self.cfg.ner_types,
                mc_classes=self.cfg.mc_classes or (), nli_labels=NLI_LABELS)
        return t

    def _pool(self, texts: HashSorter) -> tuple[Path, int]:
        """The raw texts in their seeded order, each text source cut to its `sample` size."""
        caps = {s.name: s.opts.get("sample") for s in self.cfg.sources if s.kind == "text"}
        taken: Counter = Counter()
        not_sampled: Counter = Counter()
        pool = Spool(self.stage / "pool-1.jsonl")
        for rec in texts:
            cap = caps.get(rec["_src"])
            if cap is not None and taken[rec["_src"]] >= cap:
                not_sampled[rec["_src"]] += 1
                continue
            taken[rec["_src"]] += 1
            rec["_pos"] = pool.count
            pool.add(rec)
        pool.close()
        texts.cleanup()
        self.texts_info.update({"pool": pool.count, "not_sampled": dict(not_sampled)})
        return pool.path, pool.count

    def _plan(self) -> tuple[dict[str, float], dict[str, int | None]]:
        """(weights, quotas) per runnable job: from the size targets (what labelled sources leave to teachers),
        or, without targets, the config's shares and no quota."""
        cfg, specs = self.cfg, self.specs
        runnable = [j for j in ann.JOBS if all(t in specs for t in ann.JOBS[j])]
        if cfg.targets is None:
            for j, w in cfg.shares.items():
                if j not in runnable and w > 0:
                    need = " and ".join(f"--teacher {t}=MODEL" for t in ann.JOBS[j] if t not in specs)
                    self.opts.echo(f"note: annotation job {j} skipped: it needs {need}")
            return {j: cfg.shares.get(j, 0.0) for j in runnable}, {j: None for j in runnable}
        need = {t: max(0, n - self.labelled[t]) for t, n in cfg.targets.items()}
        for t, n in need.items():
            job = "qa" if t == "qg" else t
            if n > 0 and job not in runnable:
                missing = " and ".join(f"--teacher {x}=MODEL" for x in ann.JOBS[job] if x not in specs)
                self.opts.echo(f"note: {t} is {n} examples below its target and has no teacher ({missing})")
        quotas: dict[str, int | None] = {}
        weights = {}
        for j in runnable:
            quotas[j] = max((need.get(t, 0) for t in ann.JOB_TASKS[j]), default=0)
            weights[j] = quotas[j] / self._per_text(j)
        return weights, quotas

    def annotate(self, texts: HashSorter) -> None:
        if not texts.count:
            texts.cleanup()
            return
        weights, quotas = self._plan()
        if not any(w > 0 for w in weights.values()):
            if not weights:
                self.opts.echo(f"warning: {texts.count} raw texts were read but no teacher model was given; "
                               "they are unused")
            texts.cleanup()
            self.texts_info.update({"pool": texts.count, "used": {}, "unused": texts.count, "rounds": 0})
            return
        pool, n_pool = self._pool(texts)
        made: Counter = Counter()          # task -> teacher records kept (after the leakage guard and dedup)
        used: Counter = Counter()          # job -> texts consumed
        next_index = {j: 0 for j in weights}
        expected = {j: self._per_text(j) for j in weights}
        active = [j for j in weights if weights[j] > 0]
        rnd = 0
        while active and n_pool and rnd < MAX_ROUNDS:
            rnd += 1
            before = sum(made.values())
            if all(quotas[j] is None for j in active):
                want, limit = {j: weights[j] for j in active}, n_pool   # no targets: every text, by shares
            else:
                # texts each job still needs, at the yield seen so far (records kept per text used; at first the
                # units per text); only that many are handed out, the rest wait for later rounds
                want = {}
                for j in active:
                    y = made[ann.JOB_TASKS[j][0]] / used[j] if used[j] else expected[j]
                    want[j] = math.ceil((quotas[j] - made[ann.JOB_TASKS[j][0]]) / max(y, 0.05))
                limit = min(n_pool, sum(want.values()))
            assigner = ann.Assigner(want)
            files = {j: Spool(self.stage / f"{j}.round{rnd}.jsonl") for j in assigner.jobs}
            reserve = Spool(self.stage / f"reserve-{rnd}.jsonl")
            for i, rec in enumerate(iter_spool(pool)):
                if i < limit:
                    files[assigner.next()].add(rec)
                else:
                    reserve.add(rec)
            leftovers = [iter(reserve)]
            for j in assigner.jobs:
                it = iter(files[j])
                quota, task = quotas[j], ann.JOB_TASKS[j][0]
                shards = ann.annotate_shards(
                    j, it, self.specs, self.teacher, self.out / "work", shard_size=self.cfg.shard_size,
                    on_error="stop" if self.opts.strict else self.cfg.on_error, report=self.report,
                    first_index=next_index[j], retry_failed=self.opts.retry_failed, echo=self.opts.echo,
                    on_shard=self.opts.on_shard, progress=self.prog)
                for shard in shards:
                    next_index[j] = shard.index + 1
                    used[j] += shard.texts
                    self._keep_generated(shard.records, made)
                    if quota is not None and made[task] >= quota:
                        break
                shards.close()
                leftovers.append(it)   # what the job did not reach: texts for the next round
            nxt = Spool(self.stage / f"pool-{rnd + 1}.jsonl")
            for rec in heapq.merge(*leftovers, key=lambda r: r["_pos"]):
                nxt.add(rec)
            nxt.close()
            pool, n_pool = nxt.path, nxt.count
            active = [j for j in active if quotas[j] is not None and made[ann.JOB_TASKS[j][0]] < quotas[j]]
            if sum(made.values()) == before:
                break   # the teachers kept nothing from a whole round: more rounds would not either
        self.texts_info.update({"used": dict(used), "unused": n_pool, "rounds": rnd,
                                "quotas": {j: q for j, q in quotas.items() if q}})

    def _per_text(self, job: str) -> int:
        """Units (so at most records) one text gives a job."""
        spec = ann.unit_spec(job, self.specs)
        return max(1, spec.per_text) if spec.unit == "sentence" or job == "nli" else 1

    def _keep_generated(self, recs: list[dict], made: Counter) -> None:
        # generated text can repeat memorised evaluation text, so it passes the leakage guard too
        if self.guard is not None:
            recs = [r for r in recs if self.guard.keep(r)]
        for rec in self.deduper.filter(recs):
            self.spools[rec["task"]].add(rec)
            made[rec["task"]] += 1

    # ------------------------------------------------------------ 3. cap, split, write

    def finish_task(self, task: str, train: HashSorter, val: HashSorter) -> dict | None:
        import numpy as np

        spool = self.spools[task]
        n_all, n_lab = spool.count, self.labelled[task]
        if not n_all:
            spool.close()
            return None
        seed, cfg = self.cfg.seed, self.cfg
        target = cfg.targets.get(task) if cfg.targets is not None else None
        # The cap: labelled examples first (a seeded sample of them when there are more than the target), then
        # teacher-made ones in the order they were made.
        lab_keep: KeySet | None = None
        teach_keep = n_all - n_lab
        if target is not None:
            if n_lab > target:
                small = SmallestKeys(target)
                for i, rec in enumerate(spool):
                    if i >= n_lab:
                        break
                    small.add(key64(seed, "cap", task, rec["id"], i))
                lab_keep = KeySet(small.result()[0])
                teach_keep = 0
            else:
                teach_keep = min(teach_keep, target - n_lab)

        def kept() -> Iterator[dict]:
            for i, rec in enumerate(spool):
                if i < n_lab:
                    if lab_keep is None or key64(seed, "cap", task, rec["id"], i) in lab_keep:
                        yield rec
                elif i - n_lab < teach_keep:
                    yield rec
                else:
                    return

        n = (min(n_lab, target) if lab_keep is not None else n_lab) + teach_keep
        # The split: groups with the smallest seeded keys go to val (only O(val size) keys are held).
        vt = val_records(n, cfg.val_fraction, cfg.val_max)
        small = SmallestKeys(vt + 1)
        for rec in kept():
            small.add(key64(seed, "split", task, rec.get("_group") or rec["id"]))
        keys, counts = small.result()
        distinct_more = int(counts.sum()) < small.seen   # some groups were cut off: more than vt + 1 exist
        val_keys = KeySet(val_groups(keys, counts, n=n, val_fraction=cfg.val_fraction, val_max=cfg.val_max,
                                      distinct_more=distinct_more))
        d: dict[str, Any] = {"target": target, "built": 0, "train": 0, "val": 0}
        lengths: Counter = Counter()
        sources: Counter = Counter()
        labels: Counter = Counter()
        for rec in kept():
            side = "val" if key64(seed, "split", task, rec.get("_group") or rec["id"]) in val_keys else "train"
            d[side] += 1
            lengths[len(rec[MAIN_FIELD[task]])] += 1
            sources[rec["_src"] + (" (teacher)" if "teacher" in rec else "")] += 1
            if task in ("mc", "nli"):
                labels[rec["label"]] += 1
            (val if side == "val" else train).add(key64(seed, "order", task, rec["id"]), public_record(rec))
        d["built"] = d["train"] + d["val"]
        d["capped"] = n_all - d["built"]
        d["teacher_made"] = sum(v for k, v in sources.items() if k.endswith(" (teacher)"))
        d["chars"] = percentiles(lengths)
        d["sources"] = dict(sources)
        if labels:
            d["labels"] = dict(sorted(labels.items()))
        if task == "mc":
            self.mc_seen.update(labels)
        d["teacher_dropped"] = self._dropped(task)
        return d

    def _dropped(self, task: str) -> int:
        """Teacher outputs of `task` dropped by a threshold or filter (failed batches not included)."""
        return sum(v for stats in self.report.stats.values() for k, v in stats.items()
                   if k.startswith(f"{task}: "))

    def run(self) -> dict:
        texts = self.read()
        self.annotate(texts)
        self.deduper.close()   # nothing more to deduplicate: hand its page cache back before the last stage
        train, val = HashSorter(self.stage / "out-train"), HashSorter(self.stage / "out-val")
        self.mc_seen: Counter = Counter()
        per_task = {}
        for task in TASKS:
            d = self.finish_task(task, train, val)
            if d is not None:
                per_task[task] = d
        n_train, n_val = train.count, val.count
        if not n_train:
            raise RSGError("the corpus is empty after reading, cleaning and filtering (see the counts above)",
                           file=self.out)
        mc = self.cfg.mc_classes or tuple(sorted(self.mc_seen))
        labels = {"mc": list(mc), "ner": list(self.cfg.ner_types)} if mc else {"ner": list(self.cfg.ner_types)}
        write_jsonl_atomic(self.out / "train.jsonl", train)
        write_jsonl_atomic(self.out / "val.jsonl", val)
        train.cleanup()
        val.cleanup()
        atomic_write_json(self.out / "labels.json", labels)
        if self.problems.all_messages:
            atomic_write_text(self.out / "problems.txt", "".join(m + "\n" for m in self.problems.all_messages))
        else:
            (self.out / "problems.txt").unlink(missing_ok=True)  # left by an earlier run
        cfg = self.cfg
        targets = cfg.targets or {}
        teachers = {}
        for t, s in self.specs.items():
            seen = self.report.teachers.get(t, {})
            teachers[t] = {"model": s.model, "revision": s.revision, "commits": seen.get("commits", []),
                           "kind": s.kind, "min_score": s.min_score}
            for k in ("type_map", "label_map"):
                if seen.get(k):
                    teachers[t][k] = seen[k]
        return {
            "tasks": per_task,
            "total": {"train": n_train, "val": n_val, "target": cfg.total if cfg.targets is not None else None},
            "targets": targets or None,
            "sources": {k: dict(v) for k, v in self.read_counts.items()},
            "cleaning": {t: dict(c) for t, c in self.cleaner.counts.items()},
            "dedup": {t: dict(c) for t, c in self.deduper.counts.items()},
            "labels_dropped_by_map": self.label_dropped,
            "annotation": {**self.report.to_json(), "texts": self.texts_info},
            "problems": self.problems.to_json(),
            "seed": cfg.seed, "val_fraction": cfg.val_fraction, "val_max": cfg.val_max, "limit": self.opts.limit,
            "teachers": teachers,
        }
