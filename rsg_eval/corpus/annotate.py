"""Automatic annotation by teacher models, in resumable shards.

Jobs and the teachers they need (`--teacher TASK=MODEL`, a hub id or a local folder):

| job           | teachers   | writes records        |
|---------------|------------|-----------------------|
| qa            | qg + qa    | qa and qg: the qg teacher (text2text) writes a question about a passage, the extractive qa teacher (e.g. mdeberta-v3-base-squad2) answers it; kept when its answer score >= `min_score` |
| summarization | summarization | summarization     |
| title         | title      | title                 |
| paraphrase    | paraphrase | paraphrase (per sentence) |

Teachers run as transformers pipelines (`text2text-generation`, `question-answering`) in batches, on the GPU when
one is present. Each job's inputs are cut into shards of `shard_size` texts; a shard is written atomically to
`work/annotate/<job>/shard-NNNNN.jsonl` with its fingerprint (teachers, options, the input texts) in the first
line, so a rerun reuses every finished shard whose fingerprint matches and starts at the first missing one.

Weak annotations are filtered and counted: empty outputs, degenerate ones (a token repeated, few distinct tokens,
a character pattern looping), copies of the input, and for qa answers below the score threshold or empty (the
teacher's "no answer"). A batch on which a teacher raises is named in a message, skipped and counted (or stops the
run with `on_error: stop`); finished shards stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from rsg_eval.corpus.cleaning import normalise
from rsg_eval.errors import RSGError
from rsg_eval.io import atomic_write_text

TEACHER_TASKS = ("qa", "qg", "summarization", "title", "paraphrase")
JOBS: dict[str, tuple[str, ...]] = {"qa": ("qg", "qa"), "summarization": ("summarization",),
                                    "title": ("title",), "paraphrase": ("paraphrase",)}
FORMAT_VERSION = 1

# Default per-teacher options; a config's `teachers.<task>` mapping overrides them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qa": {"min_score": 0.3, "max_answer_len": 30, "batch_size": 16},
    "qg": {"prompt": "{text}", "max_new_tokens": 48, "unit": "text", "max_chars": 2000},
    "summarization": {"prompt": "{text}", "max_new_tokens": 160, "unit": "text", "max_chars": 4000},
    "title": {"prompt": "{text}", "max_new_tokens": 32, "unit": "text", "max_chars": 4000},
    "paraphrase": {"prompt": "{text}", "max_new_tokens": 96, "unit": "sentence", "max_chars": 300,
                   "per_text": 1},
}


@dataclass
class TeacherSpec:
    task: str
    model: str
    revision: str | None = None
    batch_size: int = 8
    prompt: str = "{text}"           # the model input; "{text}" is replaced by the passage / sentence
    max_new_tokens: int = 64
    max_input_tokens: int = 512
    num_beams: int = 1
    unit: str = "text"               # text: the passage (cut to max_chars at a sentence end); sentence: sentences
    max_chars: int = 2000
    per_text: int = 1                # sentences per text (unit: sentence)
    min_score: float = 0.3           # qa: the teacher's answer score threshold
    max_answer_len: int = 30         # qa: tokens
    dtype: str | None = None         # e.g. bfloat16 on a GPU; None = the model's default (float32)
    filter: bool = True              # drop empty / broken / repeated / copied outputs (off: inspect a teacher)

    @classmethod
    def make(cls, task: str, opts: dict[str, Any]) -> TeacherSpec:
        if task not in TEACHER_TASKS:
            raise RSGError(f"no teacher task {task!r}", field="--teacher", expected=TEACHER_TASKS)
        merged = {**_DEFAULTS.get(task, {}), **opts}
        known = set(cls.__dataclass_fields__) - {"task"}
        bad = sorted(set(merged) - known)
        if bad:
            raise RSGError(f"unknown teacher options {bad} for {task}", field=f"teachers.{task}",
                           expected=", ".join(sorted(known)))
        if not merged.get("model"):
            raise RSGError(f"teacher {task} has no model", field=f"teachers.{task}.model",
                           expected="a hub id or a local folder (or --teacher {task}=MODEL)")
        if merged.get("unit", "text") not in ("text", "sentence"):
            raise RSGError(f"unknown unit {merged['unit']!r}", field=f"teachers.{task}.unit",
                           expected=("text", "sentence"))
        return cls(task=task, **merged)


# ---------------------------------------------------------------- filters (no model)

_REPEAT_CHARS = re.compile(r"(.{1,6}?)\1{4,}", re.S)


def degenerate(output: str, source: str | None = None) -> str | None:
    """Why a generated text is unusable ("empty", "repeated", "copy"), or None when it is fine."""
    out = output.strip()
    if not out or not any(c.isalnum() for c in out):
        return "empty"
    if "\ufffd" in out:
        return "broken"  # undecodable bytes: a byte-level tokenizer produced half a character
    toks = out.split()
    run = 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        if run >= 3:
            return "repeated"
    if len(toks) >= 6 and len(set(toks)) / len(toks) < 0.5:
        return "repeated"
    if _REPEAT_CHARS.search(out):
        return "repeated"
    if source is not None and normalise(out) == normalise(source):
        return "copy"
    return None


_SENT_END = re.compile(r"(?<=[.!?…])[\"»”)]*\s+(?=[\"«„(]*[A-ZА-ЯЁ0-9])")


def sentences(text: str) -> list[str]:
    """A rule-based sentence split (end punctuation, then a space and a capital or a digit)."""
    return [s.strip() for s in _SENT_END.split(text) if s.strip()]


def cut(text: str, max_chars: int) -> str:
    """`text` cut to at most max_chars at the last sentence end that fits (a hard cut when none does)."""
    if len(text) <= max_chars:
        return text
    out = ""
    for s in sentences(text):
        nxt = (out + " " + s).strip()
        if len(nxt) > max_chars:
            break
        out = nxt
    return out or text[:max_chars]


def units(text: str, spec: TeacherSpec) -> list[str]:
    if spec.unit == "sentence":
        return [s for s in sentences(text) if 20 <= len(s) <= spec.max_chars][: spec.per_text]
    return [cut(text, spec.max_chars)]


# ---------------------------------------------------------------- teachers (transformers pipelines)

class Generator(Protocol):
    spec: TeacherSpec

    def __call__(self, texts: Sequence[str]) -> list[str]: ...


class Answerer(Protocol):
    spec: TeacherSpec

    def __call__(self, contexts: Sequence[str], questions: Sequence[str]) -> list[tuple[str, float, int]]: ...


def pick_device(device: str | None = "auto") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def _dtype(name: str | None) -> Any:
    if not name:
        return None
    import torch

    try:
        return getattr(torch, name)
    except AttributeError:
        raise RSGError(f"unknown dtype {name!r}", field="dtype", expected="float32, bfloat16, float16") from None


def _load_pipeline(kind: str, spec: TeacherSpec, name: str, device: str | None) -> Any:
    """A transformers pipeline for a teacher (remote code off); any load failure is one clear RSGError."""
    from transformers import pipeline

    kw: dict[str, Any] = {"trust_remote_code": False}
    if spec.dtype:
        kw["dtype"] = _dtype(spec.dtype)
    try:
        return pipeline(kind, model=spec.model, tokenizer=spec.model, revision=spec.revision,
                        device=pick_device(device), **kw)
    except Exception as exc:  # hub unreachable, a model of the wrong kind, ...: one line, no traceback
        raise RSGError(f"cannot load teacher {name}={spec.model} as a {kind} pipeline: "
                       f"{type(exc).__name__}: {exc}".splitlines()[0],
                       field="--teacher", expected="a hub id (reachable) or a local model folder") from None


class Text2TextTeacher:
    """A seq2seq teacher as a `text2text-generation` pipeline; one call = one batch."""

    def __init__(self, spec: TeacherSpec, device: str | None = "auto") -> None:
        self.spec = spec
        self.pipe = _load_pipeline("text2text-generation", spec, spec.task, device)
        # FRED-T5's tokenizer has no model_max_length, so truncation=True alone would not cut long passages
        tok = self.pipe.tokenizer
        tok.model_max_length = min(int(getattr(tok, "model_max_length", spec.max_input_tokens)),
                                   spec.max_input_tokens)

    def __call__(self, texts: Sequence[str]) -> list[str]:
        prompts = [self.spec.prompt.replace("{text}", t) for t in texts]
        outs = self.pipe(prompts, batch_size=len(prompts), max_new_tokens=self.spec.max_new_tokens,
                         num_beams=self.spec.num_beams, do_sample=False, truncation=True)
        return [(o[0] if isinstance(o, list) else o)["generated_text"] for o in outs]


class ExtractiveQATeacher:
    """An extractive QA teacher as a `question-answering` pipeline; returns (answer, score, start) per question."""

    def __init__(self, spec: TeacherSpec, device: str | None = "auto") -> None:
        self.spec = spec
        self.pipe = _load_pipeline("question-answering", spec, "qa", device)
        # never more tokens than the model has positions for (a BERT-style model: model_max_length)
        self.max_seq_len = min(spec.max_input_tokens, int(getattr(self.pipe.tokenizer, "model_max_length", 10**9)))

    def __call__(self, contexts: Sequence[str], questions: Sequence[str]) -> list[tuple[str, float, int]]:
        outs = self.pipe(question=list(questions), context=list(contexts), batch_size=len(contexts),
                         handle_impossible_answer=True, max_answer_len=self.spec.max_answer_len,
                         max_seq_len=self.max_seq_len)
        if isinstance(outs, dict):
            outs = [outs]
        return [(o["answer"], float(o["score"]), int(o["start"])) for o in outs]


def load_teachers(specs: dict[str, TeacherSpec], device: str | None = "auto") -> dict[str, Any]:
    return {t: (ExtractiveQATeacher if t == "qa" else Text2TextTeacher)(s, device) for t, s in specs.items()}


# ---------------------------------------------------------------- jobs


@dataclass
class Unit:
    """One teacher input: a passage or sentence of a raw text."""

    id: str
    group: str
    source: str
    text: str


def make_units(texts: Sequence[dict], spec: TeacherSpec) -> list[Unit]:
    out = []
    for rec in texts:
        for k, u in enumerate(units(rec["text"], spec)):
            uid = rec["id"] if spec.unit == "text" else f"{rec['id']}#s{k}"
            out.append(Unit(uid, rec.get("_group", rec["id"]), rec["_src"], u))
    return out


def run_batch(job: str, batch: Sequence[Unit], teachers: dict[str, Any], stats: Counter) -> list[dict]:
    """Annotate one batch; filtered outputs are counted in `stats` under "<task>: <reason>"."""
    if job == "qa":
        return _run_qa(batch, teachers["qg"], teachers["qa"], stats)
    outs = teachers[job]([u.text for u in batch])
    field_in, field_out = {"summarization": ("text", "summary"), "title": ("text", "title"),
                           "paraphrase": ("source", "target")}[job]
    recs = []
    for u, o in zip(batch, outs):
        o = o.strip()
        why = degenerate(o, u.text) if teachers[job].spec.filter else (None if o else "empty")
        if why:
            stats[f"{job}: {why}"] += 1
            continue
        recs.append({"task": job, field_in: u.text, field_out: o, "_src": u.source, "id": f"{u.id}#{job}",
                     "_group": u.group})
    return recs


def _run_qa(batch: Sequence[Unit], qg: Generator, qa: Answerer, stats: Counter) -> list[dict]:
    questions = [q.strip() for q in qg([u.text for u in batch])]
    ok = []
    for u, q in zip(batch, questions):
        why = degenerate(q, u.text) if qg.spec.filter else (None if q else "empty")
        if why:
            stats[f"qg: {why}"] += 1
        else:
            ok.append((u, q))
    if not ok:
        return []
    answers = qa([u.text for u, _ in ok], [q for _, q in ok])
    recs = []
    for (u, q), (ans, score, _start) in zip(ok, answers):
        ans = ans.strip()
        if not ans:
            stats["qa: no answer"] += 1
            continue
        if score < qa.spec.min_score:
            stats["qa: low score"] += 1
            continue
        if qa.spec.filter and degenerate(ans) in ("repeated", "broken"):
            stats["qa: degenerate"] += 1
            continue
        base = {"context": u.text, "_src": u.source, "_group": u.group}
        recs.append({"task": "qa", **base, "question": q, "answer": ans, "id": f"{u.id}#qa",
                     "teacher_score": round(score, 4)})
        recs.append({"task": "qg", **base, "answer": ans, "question": q, "id": f"{u.id}#qg"})
    return recs


# ---------------------------------------------------------------- shards


@dataclass
class ShardEvent:
    job: str
    index: int
    reused: bool
    path: Path


@dataclass
class AnnotateReport:
    stats: dict[str, Counter] = field(default_factory=dict)     # job -> counts (kept, filtered, failed)
    shards: dict[str, dict[str, int]] = field(default_factory=dict)  # job -> {"done": n, "reused": m}
    failed_batches: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"stats": {j: dict(c) for j, c in self.stats.items()}, "shards": self.shards,
                "failed_batches": self.failed_batches[:50]}


def _fingerprint(job: str, specs: dict[str, TeacherSpec], units_: Sequence[Unit]) -> str:
    h = hashlib.sha256()
    # batch_size is left out: lowering it after an out-of-memory error must not throw away finished shards
    teachers = {t: {k: v for k, v in asdict(specs[t]).items() if k != "batch_size"} for t in JOBS[job]}
    h.update(json.dumps({"v": FORMAT_VERSION, "job": job, "teachers": teachers}, sort_keys=True).encode())
    for u in units_:
        h.update(u.id.encode() + b"\0" + u.text.encode() + b"\0")
    return h.hexdigest()


def _read_shard(path: Path, fp: str) -> tuple[list[dict], dict] | None:
    """A finished shard's records and meta, or None when it is missing or made from other inputs/teachers."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        return None
    try:
        meta = json.loads(lines[0]).get("_shard") or {}
        if meta.get("fingerprint") != fp:
            return None
        return [json.loads(x) for x in lines[1:] if x.strip()], meta
    except (json.JSONDecodeError, AttributeError):
        return None  # a damaged shard is redone


def annotate_job(job: str, texts: Sequence[dict], specs: dict[str, TeacherSpec], teachers: dict[str, Any] | None,
                 work: Path, *, shard_size: int, on_error: str, report: AnnotateReport,
                 device: str | None = "auto", retry_failed: bool = False, echo: Callable[[str], None] = print,
                 on_shard: Callable[[ShardEvent], None] | None = None, progress: Any = None) -> list[dict]:
    """Run one job over `texts` (raw text records) shard by shard; returns the kept records of all shards.

    `teachers` may hold ready teacher objects (tests pass wrapped ones); missing ones are loaded lazily, only when
    a shard actually has to be computed, so a fully resumed run loads no model.
    """
    main_spec = specs["qg" if job == "qa" else job]
    all_units = make_units(texts, main_spec)
    stats = report.stats.setdefault(job, Counter())
    shard_stat = report.shards.setdefault(job, {"done": 0, "reused": 0})
    teachers = dict(teachers or {})
    folder = work / "annotate" / job
    out: list[dict] = []
    task_id = progress.add_task(f"annotate {job}", total=len(all_units)) if progress is not None else None
    for si, start in enumerate(range(0, len(all_units), shard_size)):
        chunk = all_units[start:start + shard_size]
        path = folder / f"shard-{si:05d}.jsonl"
        fp = _fingerprint(job, specs, chunk)
        prev = _read_shard(path, fp)
        if prev is not None and not (retry_failed and prev[1].get("failed_batches")):
            recs, meta = prev
            stats.update(meta.get("stats", {}))
            report.failed_batches.extend(meta.get("failed_batches", []))
            shard_stat["reused"] += 1
            out.extend(recs)
            if progress is not None:
                progress.advance(task_id, len(chunk))
            if on_shard:
                on_shard(ShardEvent(job, si, True, path))
            continue
        for t in JOBS[job]:
            if t not in teachers:
                teachers[t] = load_teachers({t: specs[t]}, device)[t]
        recs, sstats, failed = [], Counter(), []
        bs = specs["qa"].batch_size if job == "qa" else main_spec.batch_size
        bs = min(bs, main_spec.batch_size)
        for bi, b0 in enumerate(range(0, len(chunk), bs)):
            batch = chunk[b0:b0 + bs]
            try:
                recs.extend(run_batch(job, batch, teachers, sstats))
            except Exception as exc:  # a teacher error on one batch must not cost the finished shards
                what = (f"teacher {job} failed on shard {si} batch {bi} (texts {start + b0}-{start + b0 + len(batch) - 1}, "
                        f"first id {batch[0].id}): {type(exc).__name__}: {exc}")
                if on_error == "stop":
                    raise RSGError(what + "; finished shards are kept, rerun to resume",
                                   file=path) from exc
                echo(f"skipped: {what}")
                failed.append(what)
                sstats["failed batches"] += 1
                sstats["failed texts"] += len(batch)
            if progress is not None:
                progress.advance(task_id, len(batch))
        sstats["kept records"] += len(recs)
        meta = {"fingerprint": fp, "job": job, "index": si, "units": len(chunk), "stats": dict(sstats),
                "failed_batches": failed}
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                        for r in [{"_shard": meta}, *recs]))
        stats.update(sstats)
        report.failed_batches.extend(failed)
        shard_stat["done"] += 1
        out.extend(recs)
        if on_shard:
            on_shard(ShardEvent(job, si, False, path))
    return out


def assign_jobs(texts: Sequence[dict], shares: dict[str, float], seed: int = 0) -> dict[str, list[dict]]:
    """Give every raw text to exactly one job, in proportion to `shares`.

    Text i goes to the job furthest below its share after texts 0..i-1 (ties: the order of `shares`), so the
    proportions are exact up to one text, and the assignment of a prefix (a `--limit` trial) is the prefix of the
    full run's assignment. `seed` is unused: the split is deterministic by position.
    """
    jobs = [j for j, w in shares.items() if w > 0]
    out: dict[str, list[dict]] = {j: [] for j in jobs}
    if not jobs:
        return out
    total = sum(shares[j] for j in jobs)
    for i, rec in enumerate(texts):
        # deficit of job j after i texts: i * share_j - assigned_j; the largest deficit + share takes text i
        j = max(jobs, key=lambda k: ((i + 1) * shares[k] / total - len(out[k]), -jobs.index(k)))
        out[j].append(rec)
    return out
