"""Automatic annotation of raw texts by teacher models, in resumable shards.

Jobs and the teachers they need (`teachers.<task>` in the config or `--teacher TASK=MODEL`; the teacher kinds are
in rsg_eval/corpus/teachers.py):

| job           | teachers | unit (default)      | writes |
|---------------|----------|---------------------|--------|
| ner           | ner      | passage             | ner: the teacher's entity spans, its labels mapped onto the NER types (unmapped ones dropped, counted) |
| mc            | mc       | passage             | mc: the top topic among the head's classes |
| nli           | nli      | adjacent sentences  | nli: (sentence i, sentence i+1) of one text, labelled entailment / contradiction / neutral |
| qa            | qg + qa  | passage             | qa and qg: the qg teacher writes a question about the passage, the extractive qa teacher (the paper's mdeberta-v3-base-squad2) answers it with a span |
| summarization | summarization | passage        | summarization |
| title         | title    | passage             | title |
| paraphrase    | paraphrase | sentence          | paraphrase |

Every record a teacher made carries its provenance: `teacher` (the model id) and `teacher_score` (its confidence,
the value `min_score` filters on); qa records also `question_teacher` / `question_score`, qg records
`answer_teacher` / `answer_score`. What a threshold or a filter drops is counted per job ("mc: low score",
"ner: unmapped type MISC", ...).

Each job reads its texts in shards of `shard_size` texts; a shard is written atomically to
`work/annotate/<job>/shard-NNNNN.jsonl` with a fingerprint (the teachers and their options, the inputs) and the
teachers' resolved revisions in its first line, so a rerun reuses every finished shard whose fingerprint matches
and loads a teacher only when a shard has to be computed. Inside a shard the units are batched by length (less
padding on a GPU); a batch on which a teacher raises is named, skipped and counted (or stops the run with
`on_error: stop`); finished shards stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from rsg_eval.corpus.cleaning import normalise
from rsg_eval.corpus.teachers import TEACHER_TASKS, TeacherSpec  # noqa: F401 (re-exported for the config)
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import atomic_write_text

JOBS: dict[str, tuple[str, ...]] = {"ner": ("ner",), "mc": ("mc",), "nli": ("nli",), "qa": ("qg", "qa"),
                                    "summarization": ("summarization",), "title": ("title",),
                                    "paraphrase": ("paraphrase",)}
JOB_TASKS: dict[str, tuple[str, ...]] = {**{j: (j,) for j in JOBS}, "qa": ("qa", "qg")}
FORMAT_VERSION = 2


def unit_spec(job: str, specs: dict[str, TeacherSpec]) -> TeacherSpec:
    """The teacher whose options (unit, max_chars, per_text) cut a job's texts into units."""
    return specs["qg" if job == "qa" else job]


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


# ---------------------------------------------------------------- units


@dataclass
class Unit:
    """One teacher input: a passage or a sentence of a raw text (nli: two adjacent sentences)."""

    id: str
    group: str
    source: str
    text: str
    pair: str | None = None


def units(text: str, spec: TeacherSpec) -> list[str]:
    if spec.unit == "sentence":
        return [s for s in sentences(text) if 20 <= len(s) <= spec.max_chars][: spec.per_text]
    return [cut(text, spec.max_chars)]


def make_units(job: str, rec: dict, spec: TeacherSpec) -> list[Unit]:
    group, src = rec.get("_group", rec["id"]), rec["_src"]
    if job == "nli":
        sents = sentences(rec["text"])
        ok = [20 <= len(s) <= spec.max_chars for s in sents]
        pairs = [(a, b) for i, (a, b) in enumerate(zip(sents, sents[1:])) if ok[i] and ok[i + 1]]
        return [Unit(f"{rec['id']}#p{k}", group, src, a, b) for k, (a, b) in enumerate(pairs[: spec.per_text])]
    out = []
    for k, u in enumerate(units(rec["text"], spec)):
        out.append(Unit(rec["id"] if spec.unit == "text" else f"{rec['id']}#s{k}", group, src, u))
    return out


# ---------------------------------------------------------------- running one batch


def _model(teacher: Any) -> str:
    return teacher.spec.model


def _made_by(teacher: Any, score: float | None) -> dict:
    return {"teacher": _model(teacher), "teacher_score": None if score is None else round(float(score), 4)}


def _base(u: Unit) -> dict:
    return {"_src": u.source, "_group": u.group}


def run_batch(job: str, batch: Sequence[Unit], teachers: dict[str, Any], stats: Counter) -> list[list[dict]]:
    """Annotate one batch: the kept records of each unit (a list per unit, in order). What a filter or a threshold
    drops is counted in `stats` under "<task>: <reason>"."""
    return _RUNNERS[job](batch, teachers, stats)


def _run_ner(batch: Sequence[Unit], teachers: dict[str, Any], stats: Counter) -> list[list[dict]]:
    t = teachers["ner"]
    out = []
    for u, spans in zip(batch, t([u.text for u in batch])):
        ents, seen = [], set()
        for sp in spans:
            typ = t.types.get(sp.label)
            if typ is None:
                stats[f"ner: unmapped type {sp.label}"] += 1
                continue
            s, e = sp.start, sp.end
            while s < e and u.text[s].isspace():
                s += 1
            while e > s and u.text[e - 1].isspace():
                e -= 1
            if not 0 <= s < e <= len(u.text):
                stats["ner: bad span"] += 1
                continue
            if (s, e, typ) not in seen:
                seen.add((s, e, typ))
                ents.append({"start": s, "end": e, "type": typ, "score": round(sp.score, 4)})
        if not ents and not t.spec.keep_empty:
            stats["ner: no entity"] += 1
            out.append([])
            continue
        # the record's confidence is its weakest entity: a text is kept only when every entity in it is sure,
        # since dropping one entity would teach its span as "outside"
        score = min((x["score"] for x in ents), default=None)
        if score is not None and score < t.spec.min_score:
            stats["ner: low score"] += 1
            out.append([])
            continue
        ents.sort(key=lambda d: (d["start"], -d["end"], d["type"]))
        out.append([{"task": "ner", "text": u.text, "entities": ents, "id": f"{u.id}#ner", **_base(u),
                     **_made_by(t, score)}])
    return out


def _run_classify(task: str, batch: Sequence[Unit], teachers: dict[str, Any], stats: Counter) -> list[list[dict]]:
    t = teachers[task]
    inputs = [u.text for u in batch] if task == "mc" else [{"text": u.text, "text_pair": u.pair} for u in batch]
    out = []
    for u, (lab, cls, score) in zip(batch, t(inputs)):
        if cls is None:
            stats[f"{task}: unmapped label {lab}"] += 1
            out.append([])
        elif score < t.spec.min_score:
            stats[f"{task}: low score"] += 1
            out.append([])
        elif task == "mc":
            out.append([{"task": "mc", "text": u.text, "label": cls, "id": f"{u.id}#mc", **_base(u),
                         **_made_by(t, score)}])
        else:
            out.append([{"task": "nli", "premise": u.text, "hypothesis": u.pair, "label": cls, "id": f"{u.id}#nli",
                         **_base(u), **_made_by(t, score)}])
    return out


_GEN_FIELDS = {"summarization": ("text", "summary"), "title": ("text", "title"), "paraphrase": ("source", "target")}


def _generated(task: str, t: Any, u_text: str, text: str, score: float, stats: Counter) -> bool:
    why = degenerate(text, u_text) if t.spec.filter else (None if text else "empty")
    if why:
        stats[f"{task}: {why}"] += 1
        return False
    if score < t.spec.min_score:
        stats[f"{task}: low score"] += 1
        return False
    return True


def _run_generate(task: str, batch: Sequence[Unit], teachers: dict[str, Any], stats: Counter) -> list[list[dict]]:
    t = teachers[task]
    f_in, f_out = _GEN_FIELDS[task]
    out = []
    for u, (text, score) in zip(batch, t([u.text for u in batch])):
        if not _generated(task, t, u.text, text, score, stats):
            out.append([])
            continue
        out.append([{"task": task, f_in: u.text, f_out: text, "id": f"{u.id}#{task}", **_base(u),
                     **_made_by(t, score)}])
    return out


def _run_qa(batch: Sequence[Unit], teachers: dict[str, Any], stats: Counter) -> list[list[dict]]:
    qg, qa = teachers["qg"], teachers["qa"]
    out: list[list[dict]] = [[] for _ in batch]
    ok = []
    for i, (u, (q, q_score)) in enumerate(zip(batch, qg([u.text for u in batch]))):
        if _generated("qg", qg, u.text, q, q_score, stats):
            ok.append((i, u, q, q_score))
    if not ok:
        return out
    answers = qa([u.text for _, u, _, _ in ok], [q for _, _, q, _ in ok])
    for (i, u, q, q_score), (ans, score, _start) in zip(ok, answers):
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
        base = {"context": u.text, **_base(u)}
        q_score, score = round(q_score, 4), round(score, 4)
        out[i] = [{"task": "qa", **base, "question": q, "answer": ans, "id": f"{u.id}#qa", **_made_by(qa, score),
                   "question_teacher": _model(qg), "question_score": q_score},
                  {"task": "qg", **base, "answer": ans, "question": q, "id": f"{u.id}#qg", **_made_by(qg, q_score),
                   "answer_teacher": _model(qa), "answer_score": score}]
    return out


_RUNNERS: dict[str, Callable[[Sequence[Unit], dict[str, Any], Counter], list[list[dict]]]] = {
    "ner": _run_ner,
    "mc": lambda b, t, s: _run_classify("mc", b, t, s),
    "nli": lambda b, t, s: _run_classify("nli", b, t, s),
    "qa": _run_qa,
    **{task: (lambda task: lambda b, t, s: _run_generate(task, b, t, s))(task) for task in _GEN_FIELDS},
}


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
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {model, revision, commits, kind}

    def note_teachers(self, infos: dict[str, dict]) -> None:
        for task, info in infos.items():
            cur = self.teachers.setdefault(task, {k: v for k, v in info.items() if k != "commit"})
            commits = cur.setdefault("commits", [])
            if info.get("commit") not in commits:
                commits.append(info.get("commit"))

    def to_json(self) -> dict:
        return {"stats": {j: dict(c) for j, c in self.stats.items()}, "shards": self.shards,
                "failed_batches": self.failed_batches[:50], "teachers": self.teachers}


def fingerprint(job: str, specs: dict[str, TeacherSpec], units_: Sequence[Unit]) -> str:
    h = hashlib.sha256()
    # batch_size is left out: lowering it after an out-of-memory error must not throw away finished shards
    teachers = {t: {k: v for k, v in asdict(specs[t]).items() if k != "batch_size"} for t in JOBS[job]}
    h.update(json.dumps({"v": FORMAT_VERSION, "job": job, "teachers": teachers}, sort_keys=True).encode())
    for u in units_:
        h.update(u.id.encode() + b"\0" + u.text.encode() + b"\0" + (u.pair or "").encode() + b"\0")
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


def _info(teacher: Any) -> dict:
    info = getattr(teacher, "info", None)
    return dict(info) if info else {"model": teacher.spec.model, "revision": teacher.spec.revision, "commit": None}


@dataclass
class Shard:
    index: int
    texts: int          # raw texts the shard consumed
    records: list[dict]
    reused: bool


def annotate_shards(job: str, texts: Iterable[dict], specs: dict[str, TeacherSpec], get_teacher: Callable[[str], Any],
                    work: Path, *, shard_size: int, on_error: str, report: AnnotateReport, first_index: int = 0,
                    retry_failed: bool = False, echo: Callable[[str], None] = print,
                    on_shard: Callable[[ShardEvent], None] | None = None, progress: Any = None) -> Iterator[Shard]:
    """Run one job over `texts` (raw text records, streamed) shard by shard, yielding each shard's kept records.

    The caller may stop early (a size target reached): shards not asked for are never computed. Teachers come
    from `get_teacher(task)` and are asked for only when a shard actually has to be computed, so a fully resumed
    run loads no model. Shards are numbered from `first_index` (a later round of the same job continues them).
    """
    spec = unit_spec(job, specs)
    stats = report.stats.setdefault(job, Counter())
    shard_stat = report.shards.setdefault(job, {"done": 0, "reused": 0})
    folder = work / "annotate" / job
    task_id = progress.add_task(f"annotate {job}", total=None) if progress is not None else None
    it = iter(texts)
    si = first_index
    while True:
        chunk_texts = [t for _, t in zip(range(shard_size), it)]
        if not chunk_texts:
            return
        chunk = [u for rec in chunk_texts for u in make_units(job, rec, spec)]
        path = folder / f"shard-{si:05d}.jsonl"
        fp = fingerprint(job, specs, chunk)
        prev = _read_shard(path, fp)
        if prev is not None and not (retry_failed and prev[1].get("failed_batches")):
            recs, meta = prev
            stats.update(meta.get("stats", {}))
            report.failed_batches.extend(meta.get("failed_batches", []))
            report.note_teachers(meta.get("teachers", {}))
            shard_stat["reused"] += 1
            if progress is not None:
                progress.advance(task_id, len(chunk_texts))
            if on_shard:
                on_shard(ShardEvent(job, si, True, path))
            yield Shard(si, len(chunk_texts), recs, True)
            si += 1
            continue
        teachers = {t: get_teacher(t) for t in JOBS[job]} if chunk else {}
        per_unit: list[list[dict]] = [[] for _ in chunk]
        sstats: Counter = Counter()
        failed: list[str] = []
        bs = min(specs[t].batch_size for t in JOBS[job])
        # batches of similar length: less padding; the records go back to the units' order afterwards
        order = sorted(range(len(chunk)), key=lambda i: (len(chunk[i].text) + len(chunk[i].pair or ""), i))
        for bi, b0 in enumerate(range(0, len(order), bs)):
            idx = order[b0:b0 + bs]
            batch = [chunk[i] for i in idx]
            try:
                for i, recs in zip(idx, run_batch(job, batch, teachers, sstats)):
                    per_unit[i] = recs
            except Exception as exc:  # a teacher error on one batch must not cost the finished shards
                what = (f"teacher {job} failed on shard {si} batch {bi} ({len(batch)} inputs, first id "
                        f"{batch[0].id}): {type(exc).__name__}: {exc}")
                if on_error == "stop":
                    raise RSGError(what + "; finished shards are kept, rerun to resume", file=path) from exc
                echo(f"skipped: {what}")
                failed.append(what)
                sstats["failed batches"] += 1
                sstats["failed texts"] += len(batch)
        recs = [r for rs in per_unit for r in rs]
        sstats["kept records"] += len(recs)
        infos = {t: _info(tch) for t, tch in teachers.items()}
        meta = {"fingerprint": fp, "job": job, "index": si, "texts": len(chunk_texts), "units": len(chunk),
                "stats": dict(sstats), "failed_batches": failed, "teachers": infos}
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"_shard": meta}, *recs]))
        stats.update(sstats)
        report.failed_batches.extend(failed)
        report.note_teachers(infos)
        shard_stat["done"] += 1
        if progress is not None:
            progress.advance(task_id, len(chunk_texts))
        if on_shard:
            on_shard(ShardEvent(job, si, False, path))
        yield Shard(si, len(chunk_texts), recs, False)
        si += 1


# ---------------------------------------------------------------- dividing the texts among the jobs


class Assigner:
    """Gives each text, in order, to the job furthest below its share (ties: the order of `shares`).

    The proportions are exact up to one text, and the assignment of a prefix (a `--limit` trial) is the prefix of
    the full run's assignment. Only counts are kept, so it streams.
    """

    def __init__(self, shares: dict[str, float]) -> None:
        self.jobs = [j for j, w in shares.items() if w > 0]
        self.total = sum(shares[j] for j in self.jobs)
        self.shares = shares
        self.counts = {j: 0 for j in self.jobs}
        self.n = 0

    def next(self) -> str | None:
        if not self.jobs:
            return None
        self.n += 1
        # deficit of job j after n texts: n * share_j - assigned_j; the largest takes the text
        j = max(self.jobs, key=lambda k: (self.n * self.shares[k] / self.total - self.counts[k], -self.jobs.index(k)))
        self.counts[j] += 1
        return j


def assign_jobs(texts: Sequence[dict], shares: dict[str, float], seed: int = 0) -> dict[str, list[dict]]:
    """Give every text to exactly one job, in proportion to `shares` (see Assigner). `seed` is unused."""
    a = Assigner(shares)
    out: dict[str, list[dict]] = {j: [] for j in a.jobs}
    for rec in texts:
        out[a.next()].append(rec)
    return out


def load_teachers(specs: dict[str, TeacherSpec], device: str | None = "auto", **label_sets: Any) -> dict[str, Any]:
    """Load teachers by spec (tests and tools); label_sets: ner_types, mc_classes, nli_labels."""
    from rsg_eval.corpus.teachers import load_teacher

    return {t: load_teacher(s, device, **label_sets) for t, s in specs.items()}
