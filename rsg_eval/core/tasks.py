"""The nine Russian SuperGLUE tasks: one registry, typed items, and the real data quirks.

Torch-free. A task file is parsed into `Item`s, the unit a model predicts: a record for the
sentence-pair tasks, an answer option for MuSeRC, a query (= passage) for RuCoS. Every item carries the id the
leaderboard keys on (`key`), the unit that must never be split (`group`), its template fields, its possible
labels and its gold label. See docs/design.md for the contract and ../shared/docs/RSG_SPEC.md for the quirks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rsg_eval.core.errors import RSGError

TASK_NAMES: tuple[str, ...] = (
    "LiDiRus", "RCB", "PARus", "MuSeRC", "TERRa", "RUSSE", "RWSD", "DaNetQA", "RuCoS",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")

NLI2 = ("entailment", "not_entailment")
NLI3 = ("entailment", "contradiction", "neutral")
BOOL = (False, True)
BINARY = (0, 1)

# LiDiRus diagnostic columns, as in the file (values may join several tags with ';').
DIAGNOSTIC_KEYS = ("logic", "knowledge", "lexical-semantics", "predicate-argument-structure")


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one task."""

    name: str
    splits: tuple[str, ...]
    labels: tuple | None
    metrics: tuple[str, ...]
    train_from: str
    unit: str


TASKS: dict[str, TaskSpec] = {
    "LiDiRus": TaskSpec("LiDiRus", ("test",), NLI2, ("mcc",), "TERRa", "sentence pair"),
    "RCB": TaskSpec("RCB", SPLITS, NLI3, ("f1", "acc"), "RCB", "pair"),
    "PARus": TaskSpec("PARus", SPLITS, BINARY, ("acc",), "PARus", "item"),
    "MuSeRC": TaskSpec("MuSeRC", SPLITS, BINARY, ("f1a", "em"), "MuSeRC", "answer option"),
    "TERRa": TaskSpec("TERRa", SPLITS, NLI2, ("acc",), "TERRa", "pair"),
    "RUSSE": TaskSpec("RUSSE", SPLITS, BOOL, ("acc",), "RUSSE", "pair"),
    "RWSD": TaskSpec("RWSD", SPLITS, BOOL, ("acc",), "RWSD", "item"),
    "DaNetQA": TaskSpec("DaNetQA", SPLITS, BOOL, ("acc",), "DaNetQA", "item"),
    "RuCoS": TaskSpec("RuCoS", SPLITS, None, ("f1", "em"), "RuCoS", "query"),
}

# Records (lines) per split of the official v1.1 files, from ../shared/docs/RSG_SPEC.md's split-size table (HF
# dataset_infos.json, cross-checked against line counts, the sample submission and the human-benchmark reports).
# A record is a passage for MuSeRC (its questions and answer options are inside) and for RuCoS. `rsg data check`
# prints these beside the counts it finds, so a partial folder never passes as complete.
OFFICIAL_RECORDS: dict[str, dict[str, int]] = {
    "LiDiRus": {"test": 1104},
    "RCB": {"train": 438, "val": 220, "test": 438},
    "PARus": {"train": 400, "val": 100, "test": 500},
    "MuSeRC": {"train": 500, "val": 100, "test": 322},
    "TERRa": {"train": 2616, "val": 307, "test": 3198},
    "RUSSE": {"train": 19845, "val": 8505, "test": 18892},
    "RWSD": {"train": 606, "val": 204, "test": 154},
    "DaNetQA": {"train": 1749, "val": 821, "test": 805},
    "RuCoS": {"train": 72193, "val": 7577, "test": 7257},
}

_LOWER = {n.lower(): n for n in TASK_NAMES}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case-insensitively ("terra" -> TERRa)."""
    canon = _LOWER.get(str(name).strip().lower())
    if canon is None:
        raise RSGError(f"unknown task {name!r}", field="task", expected=TASK_NAMES)
    return TASKS[canon]


def resolve_tasks(names: Sequence[str] | str | None) -> list[str]:
    """Official names for a user's task list; None, empty or 'all' give all nine in leaderboard order.

    Accepts comma-separated strings too ("terra,rcb").
    """
    if names is None:
        return list(TASK_NAMES)
    if isinstance(names, str):
        names = [names]
    flat = [p for n in names for p in str(n).split(",") if p.strip()]
    if not flat or any(p.strip().lower() == "all" for p in flat):
        return list(TASK_NAMES)
    out: list[str] = []
    for p in flat:
        t = get_task(p).name
        if t not in out:
            out.append(t)
    return out


def check_split(task: str, split: str) -> str:
    """Validate a split name for a task (LiDiRus: val and test both read its labelled diagnostic file)."""
    valid = ("val", "test") if task == "LiDiRus" else SPLITS
    if split not in valid:
        raise RSGError(f"task {task} has no split {split!r}", field="split", expected=valid)
    return split


@dataclass(frozen=True)
class Item:
    """One thing a model predicts (see docs/design.md)."""

    task: str
    split: str
    key: int
    group: int
    doc: int
    fields: Mapping[str, Any]
    labels: tuple
    gold: Any | None
    meta: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Field readers that name the file, line and field on failure.


class _Rec:
    """A record plus where it came from, with typed getters that raise RSGError."""

    def __init__(self, rec: dict, file: str, line: int) -> None:
        self.rec, self.file, self.line = rec, file, line

    def err(self, msg: str, fld: str | None = None, expected: Any = None) -> RSGError:
        return RSGError(msg, file=self.file, line=self.line, field=fld, expected=expected)

    def get(self, key: str, types: type | tuple[type, ...], *, obj: dict | None = None, path: str = "") -> Any:
        src = self.rec if obj is None else obj
        name = f"{path}{key}"
        if not isinstance(src, dict):  # a list element that should be an object (RuCoS qas[0] = 5, answers = "x")
            raise self.err(f"expected an object, got {type(src).__name__} {src!r:.40}", path.rstrip(".") or None)
        if key not in src:
            raise self.err("missing field", name)
        val = src[key]
        # bool is an int subclass in Python: never accept it where an int is wanted.
        if isinstance(val, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise self.err(f"expected {_tname(types)}, got a boolean", name)
        if not isinstance(val, types):
            raise self.err(f"expected {_tname(types)}, got {type(val).__name__} {val!r:.40}", name)
        return val

    def idx(self, *, obj: dict | None = None, path: str = "", allow_str: bool = False) -> int:
        val = self.get("idx", (int, str) if allow_str else int, obj=obj, path=path)
        if isinstance(val, str):
            if not val.strip().lstrip("-").isdigit() or len(val.strip()) > 18:
                raise self.err(f"idx {val!r:.40} is not an integer (of at most 18 digits)", f"{path}idx")
            val = int(val)
        return val

    def label(self, allowed: tuple, *, obj: dict | None = None, path: str = "") -> Any:
        src = self.rec if obj is None else obj
        name = f"{path}label"
        if not isinstance(src, dict):
            raise self.err(f"expected an object, got {type(src).__name__} {src!r:.40}", path.rstrip(".") or None)
        if "label" not in src:
            raise self.err("missing field", name, allowed)
        val = src["label"]
        ok = any(val == a and type(val) is type(a) for a in allowed)
        if not ok:
            raise self.err(f"invalid label {val!r}", name, allowed)
        return val


def _tname(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join({"str": "a string", "int": "an integer", "bool": "a boolean", "dict": "an object",
                        "list": "a list"}.get(t.__name__, t.__name__) for t in ts)


# --------------------------------------------------------------------------------------------------------
# Quirk handling.

_WORD = re.compile(r"\w+", re.UNICODE)


def locate_word(sentence: str, lemma: str, start: int, end: int) -> tuple[str, int, int]:
    """Find the target word form in a RUSSE sentence; return (form, start, end) with end exclusive.

    The official offsets are unreliable (train/val cover the form plus one character, test cuts the last
    letter). We take the whole word token that overlaps `start`; if that token does not look like the lemma
    (shares less than half its prefix), we fall back to the token with the longest common prefix with it.
    """
    tokens = [(m.group(0), m.start(), m.end()) for m in _WORD.finditer(sentence)]
    if not tokens:
        return sentence[start:end], start, end

    def prefix(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a.lower().replace("ё", "е"), b.lower().replace("ё", "е")):
            if x != y:
                break
            n += 1
        return n

    need = max(1, min(len(lemma), 4) // 2)
    for tok, s, e in tokens:
        if s <= start < e or (start == e and s < e):
            if prefix(tok, lemma) >= need:
                return tok, s, e
            break
    best = max(tokens, key=lambda t: (prefix(t[0], lemma), -abs(t[1] - start)))
    if prefix(best[0], lemma) >= need:
        return best
    # Nothing resembles the lemma (e.g. suppletive forms): trust the offsets, trimmed to a word.
    for tok, s, e in tokens:
        if s <= start < e:
            return tok, s, e
    return sentence[start:end].strip(), start, end


_PUNCT_EDGES = re.compile(r"^\W+|\W+$", re.UNICODE)


def _norm_tok(t: str) -> str:
    return _PUNCT_EDGES.sub("", t).lower().replace("ё", "е")


def fix_span_index(text: str, span_text: str, index: int) -> tuple[int, bool]:
    """Correct a RWSD whitespace-token span index; return (index, was_fixed).

    The official index is the span's first token in `text.split()` and is occasionally wrong. If the tokens
    at `index` do not spell the span, take the occurrence of the span nearest to `index`.
    """
    toks = [_norm_tok(t) for t in text.split()]
    span = [_norm_tok(t) for t in span_text.split()]
    n = len(span)
    if n == 0:
        return index, False
    if 0 <= index <= len(toks) - n and toks[index:index + n] == span:
        return index, False
    hits = [i for i in range(len(toks) - n + 1) if toks[i:i + n] == span]
    if not hits:
        # Fall back to the first token only: spans sometimes differ in later words.
        hits = [i for i in range(len(toks)) if toks[i] == span[0]]
    if not hits:
        return index, False
    best = min(hits, key=lambda i: abs(i - index))
    return best, best != index


def rucos_passage(text: str) -> str:
    """Readable passage: '@highlight' markers become line breaks, '@header' markers are dropped."""
    text = text.replace("@header", " ")
    parts = [p.strip() for p in text.split("@highlight")]
    return "\n".join(p for p in parts if p)


def rucos_candidates(text: str, entities: list[dict], r: _Rec) -> tuple[str, ...]:
    """Distinct entity strings `text[start:end]` (end exclusive), in order of their first position."""
    spans = []
    for j, ent in enumerate(entities):
        if not isinstance(ent, dict):
            raise r.err("expected an object", f"passage.entities[{j}]")
        s = r.get("start", int, obj=ent, path=f"passage.entities[{j}].")
        e = r.get("end", int, obj=ent, path=f"passage.entities[{j}].")
        if not (0 <= s < e <= len(text)):
            raise r.err(f"entity offsets {s}:{e} lie outside the passage (length {len(text)})",
                        f"passage.entities[{j}]")
        spans.append((s, e))
    seen: dict[str, None] = {}
    for s, e in sorted(spans):
        ent = text[s:e].strip()
        if ent and ent not in seen:
            seen[ent] = None
    return tuple(seen)


# --------------------------------------------------------------------------------------------------------
# Per-task parsers: (record, split) -> list of items.


def _simple(task: str, r: _Rec, split: str, fields: dict, labels: tuple, meta: dict | None = None,
            allow_str_idx: bool = False, labelled: bool | None = None) -> list[Item]:
    key = r.idx(allow_str=allow_str_idx)
    has_label = split != "test" if labelled is None else labelled
    gold = r.label(labels) if has_label else None
    return [Item(task, split, key, key, key, fields, labels, gold, meta or {})]


def _parse_terra(r: _Rec, split: str) -> list[Item]:
    f = {"premise": r.get("premise", str), "hypothesis": r.get("hypothesis", str)}
    return _simple("TERRa", r, split, f, NLI2)


def _parse_lidirus(r: _Rec, split: str) -> list[Item]:
    s1, s2 = r.get("sentence1", str), r.get("sentence2", str)
    f = {"premise": s1, "hypothesis": s2, "sentence1": s1, "sentence2": s2}
    meta = {k: r.rec[k] for k in DIAGNOSTIC_KEYS if isinstance(r.rec.get(k), str) and r.rec[k].strip()}
    # The public diagnostic file carries gold labels; read them when present, whatever the split.
    return _simple("LiDiRus", r, split, f, NLI2, meta, allow_str_idx=True, labelled="label" in r.rec)


def _parse_rcb(r: _Rec, split: str) -> list[Item]:
    # Two official train rows carry the key "no_negation" instead of "negation" (RSG_SPEC 1.2).
    negation = r.rec.get("negation", r.rec.get("no_negation", ""))
    f = {"premise": r.get("premise", str), "hypothesis": r.get("hypothesis", str),
         "verb": str(r.rec.get("verb", "")), "negation": str(negation), "genre": str(r.rec.get("genre", ""))}
    return _simple("RCB", r, split, f, NLI3)


def _parse_parus(r: _Rec, split: str) -> list[Item]:
    q = r.get("question", str)
    if q not in ("cause", "effect"):
        raise r.err(f"invalid question {q!r}", "question", ("cause", "effect"))
    f = {"premise": r.get("premise", str), "choice1": r.get("choice1", str), "choice2": r.get("choice2", str),
         "question": q, "question_ru": "Что было причиной?" if q == "cause" else "Что произошло в результате?"}
    return _simple("PARus", r, split, f, BINARY)


def _parse_danetqa(r: _Rec, split: str) -> list[Item]:
    f = {"question": r.get("question", str), "passage": r.get("passage", str)}
    return _simple("DaNetQA", r, split, f, BOOL)


def _parse_russe(r: _Rec, split: str) -> list[Item]:
    word = r.get("word", str)
    f: dict[str, Any] = {"word": word}
    meta: dict[str, Any] = {}
    for k in ("1", "2"):
        sent = r.get(f"sentence{k}", str)
        start, end = r.get(f"start{k}", int), r.get(f"end{k}", int)
        form, s, e = locate_word(sent, word, start, end)
        f[f"sentence{k}"], f[f"form{k}"] = sent, form
        meta[f"span{k}"] = (s, e)
    return _simple("RUSSE", r, split, f, BOOL, meta)


def _parse_rwsd(r: _Rec, split: str) -> list[Item]:
    text = r.get("text", str)
    tgt = r.get("target", dict)
    s1 = r.get("span1_text", str, obj=tgt, path="target.")
    s2 = r.get("span2_text", str, obj=tgt, path="target.")
    i1, fixed1 = fix_span_index(text, s1, r.get("span1_index", int, obj=tgt, path="target."))
    i2, fixed2 = fix_span_index(text, s2, r.get("span2_index", int, obj=tgt, path="target."))
    f = {"text": text, "span1_text": s1, "span2_text": s2, "span1_index": i1, "span2_index": i2}
    meta = {"span_index_fixed": [k for k, fx in (("span1", fixed1), ("span2", fixed2)) if fx]}
    return _simple("RWSD", r, split, f, BOOL, meta)


def _parse_muserc(r: _Rec, split: str) -> list[Item]:
    pidx = r.idx()
    passage = r.get("passage", dict)
    text = r.get("text", str, obj=passage, path="passage.")
    questions = r.get("questions", list, obj=passage, path="passage.")
    items: list[Item] = []
    for qi, q in enumerate(questions):
        qp = f"passage.questions[{qi}]."
        if not isinstance(q, dict):
            raise r.err("expected an object", qp.rstrip("."))
        qidx = r.idx(obj=q, path=qp)
        qtext = r.get("question", str, obj=q, path=qp)
        answers = r.get("answers", list, obj=q, path=qp)
        for ai, a in enumerate(answers):
            ap = f"{qp}answers[{ai}]."
            if not isinstance(a, dict):
                raise r.err("expected an object", ap.rstrip("."))
            aidx = r.idx(obj=a, path=ap)
            gold = r.label(BINARY, obj=a, path=ap) if split != "test" else None
            f = {"passage": text, "question": qtext, "answer": r.get("text", str, obj=a, path=ap)}
            items.append(Item("MuSeRC", split, aidx, qidx, pidx, f, BINARY, gold,
                              {"passage_idx": pidx, "question_idx": qidx}))
    return items


def _parse_rucos(r: _Rec, split: str) -> list[Item]:
    pidx = r.idx()
    passage = r.get("passage", dict)
    text = r.get("text", str, obj=passage, path="passage.")
    cands = rucos_candidates(text, r.get("entities", list, obj=passage, path="passage."), r)
    qas = r.get("qas", list)
    if not qas:
        raise r.err("no query", "qas", "one query per passage")
    items: list[Item] = []
    for qi, qa in enumerate(qas):
        qp = f"qas[{qi}]."
        query = r.get("query", str, obj=qa, path=qp)
        if "@placeholder" not in query:
            raise r.err("query has no @placeholder", f"{qp}query")
        gold = None
        if split != "test":
            answers = r.get("answers", list, obj=qa, path=qp)
            golds: dict[str, None] = {}
            for ai, a in enumerate(answers):
                t = r.get("text", str, obj=a, path=f"{qp}answers[{ai}].").strip()
                if t:
                    golds[t] = None
            gold = tuple(golds)
        f = {"passage": rucos_passage(text), "query": query, "entities": list(cands)}
        # Submissions are keyed by the passage idx (one query per passage; qas idx == passage idx).
        key = pidx if len(qas) == 1 else r.idx(obj=qa, path=qp)
        items.append(Item("RuCoS", split, key, key, pidx, f, cands, gold, {"query_idx": r.idx(obj=qa, path=qp)}))
    return items


_PARSERS: dict[str, Callable[[_Rec, str], list[Item]]] = {
    "LiDiRus": _parse_lidirus, "RCB": _parse_rcb, "PARus": _parse_parus, "MuSeRC": _parse_muserc,
    "TERRa": _parse_terra, "RUSSE": _parse_russe, "RWSD": _parse_rwsd, "DaNetQA": _parse_danetqa,
    "RuCoS": _parse_rucos,
}


class EmptyTaskFile(RSGError):
    """A task file without records (or without anything to predict): an error wherever it is read, so that an
    empty val.jsonl cannot give empty metrics and exit status 0. Fine-tuning reports an empty train file as a
    task that cannot be trained (and goes on with the others)."""


def parse_records(task: str, split: str, records: list[tuple[int, dict]], source: str) -> list[Item]:
    """Parse (line number, record) pairs of one task file into items; duplicate ids are an error, and so is
    a file without a record or an item (an empty val.jsonl would otherwise give empty metrics and exit 0)."""
    task = get_task(task).name
    check_split(task, split)
    if not records:
        raise EmptyTaskFile(f"the {task} {split} file holds no records", file=source,
                       expected="one JSON object per line (download the data again, or drop this task with --tasks)")
    parser = _PARSERS[task]
    items: list[Item] = []
    seen: dict[int, int] = {}
    for lineno, rec in records:
        r = _Rec(rec, source, lineno)
        new = parser(r, split)
        for it in new:
            if it.key in seen:
                what = "answer idx" if task == "MuSeRC" else "idx"
                raise r.err(f"duplicate {what} {it.key} (first on line {seen[it.key]})", "idx")
            seen[it.key] = lineno
        items.extend(new)
    if not items:
        raise EmptyTaskFile(f"the {task} {split} file holds {len(records)} record(s) but nothing to predict",
                       file=source, expected="MuSeRC passages with questions and answers")
    return items


def limit_groups(items: Sequence[Item], n: int | None) -> list[Item]:
    """The items of the first `n` groups (a MuSeRC question or a RuCoS query is never split)."""
    if n is None:
        return list(items)
    out: list[Item] = []
    groups: set[int] = set()
    for it in items:
        if it.group not in groups:
            if len(groups) >= n:
                continue
            groups.add(it.group)
        out.append(it)
    return out
