"""The multi-task corpus (docs/design.md "Multi-task corpus"): locate, validate, normalise. Stdlib only.

A corpus is a folder with `train.jsonl` (or `train-*.jsonl` shards), `val.jsonl` (or `val-*.jsonl`) and optional
`labels.json` (`{"mc": [topic names], "ner": [entity types]}`). One JSON object per line with a `task` field and that
task's fields; `id` and `source` are optional everywhere (except that a paraphrase's `source` is its input text).

Every record is checked on load; a problem raises RSGError naming the file, the line, the field and the valid
choices. Records become `Example`s: the encoder input text, and the target (a label index, a generation target or
entity spans), with the input templates below. The trainer and `--nli-head` evaluation share these templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import iter_jsonl
from rsg_eval.corpus.labels import GEN_TASKS, NEREL_TYPES, NLI_LABELS, TASKS
from rsg_eval.corpus.records import TASK_FIELDS  # the schema, defined once

# Encoder inputs for the generation tasks (Russian instructions, FRED's `<LM>` prefix added by the trainer when the
# tokenizer knows it) and for NLI. Changing them changes what a trained checkpoint expects: keep them stable.
GEN_TEMPLATES: dict[str, tuple[str, str]] = {   # task -> (input template, target field)
    "paraphrase": ("Перефразируй: {source}", "target"),
    "qg": ("Придумай вопрос по тексту, ответ на который: {answer}\nТекст: {context}", "question"),
    "qa": ("Ответь на вопрос по тексту.\nТекст: {context}\nВопрос: {question}", "answer"),
    "summarization": ("Кратко перескажи текст: {text}", "summary"),
    "title": ("Придумай заголовок к тексту: {text}", "title"),
}
NLI_TEMPLATE = "{premise}\nГипотеза: {hypothesis}"

SAMPLE = "sample"


@dataclass(frozen=True)
class Labels:
    mc: tuple[str, ...]
    ner: tuple[str, ...] = NEREL_TYPES
    nli: tuple[str, ...] = NLI_LABELS


@dataclass(frozen=True)
class Example:
    """One normalised record. `label` is a class index for mc/nli (else -1); `entities` are (start, end, type index)
    for ner; `target` is the generation target (else "")."""

    task: str
    input: str
    target: str = ""
    label: int = -1
    entities: tuple[tuple[int, int, int], ...] = ()
    where: str = ""          # "file:line", for messages


@dataclass
class Corpus:
    root: Path
    files: dict[str, list[Path]]           # split -> files
    labels: Labels
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> task -> records


def sample_dir() -> Path:
    return Path(str(resources.files("rsg_eval") / "samples" / "corpus_sample"))


def resolve_corpus_dir(spec: str | Path) -> Path:
    """`sample` = the bundled sample corpus; otherwise a folder that must hold train data."""
    path = sample_dir() if str(spec) == SAMPLE else Path(spec)
    if not path.is_dir():
        raise RSGError("corpus folder not found", file=path, expected="a folder with train.jsonl and val.jsonl, "
                       "or 'sample'")
    return path


def split_files(root: Path, split: str) -> list[Path]:
    files = ([root / f"{split}.jsonl"] if (root / f"{split}.jsonl").is_file() else []) \
        + sorted(root.glob(f"{split}-*.jsonl"))
    return files


def read_labels(root: Path) -> dict[str, list[str]]:
    f = root / "labels.json"
    if not f.is_file():
        return {}
    from rsg_eval.core.io import read_json

    data = read_json(f)
    if not isinstance(data, dict):
        raise RSGError("must be a JSON object", file=f, expected='{"mc": [...], "ner": [...]}')
    out: dict[str, list[str]] = {}
    for key, val in data.items():
        if key not in ("mc", "ner"):
            raise RSGError(f"unknown key {key!r}", file=f, field=key, expected=["mc", "ner"])
        if not isinstance(val, list) or not val or not all(isinstance(v, str) and v for v in val):
            raise RSGError("must be a non-empty list of names", file=f, field=key)
        if len(set(val)) != len(val):
            raise RSGError("names repeat", file=f, field=key)
        out[key] = list(val)
    return out


def iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Stream (line number, object) from a JSONL file without reading it whole (corpora reach ~1 GB)."""
    return iter_jsonl(path)


def _text(rec: dict, name: str, file: Path, line: int, *, allow_empty: bool = False) -> str:
    if name not in rec:
        raise RSGError("missing", file=file, line=line, field=name,
                       expected=f"fields of task '{rec['task']}': {', '.join(TASK_FIELDS[rec['task']])}")
    val = rec[name]
    if not isinstance(val, str):
        raise RSGError(f"a {type(val).__name__} instead of a string", file=file, line=line, field=name)
    if not allow_empty and not val.strip():
        raise RSGError("empty text", file=file, line=line, field=name)
    return val


def _entities(rec: dict, text: str, ner_labels: tuple[str, ...], file: Path, line: int
              ) -> tuple[tuple[int, int, int], ...]:
    ents = rec.get("entities")
    if not isinstance(ents, list):
        raise RSGError("missing or not a list", file=file, line=line, field="entities",
                       expected="[{start, end, type}, ...] (may be empty)")
    index = {t: i for i, t in enumerate(ner_labels)}
    out = []
    for j, e in enumerate(ents):
        fname = f"entities[{j}]"
        if not isinstance(e, dict) or not {"start", "end", "type"} <= set(e):
            raise RSGError("needs start, end and type", file=file, line=line, field=fname)
        s, t, typ = e["start"], e["end"], e["type"]
        if not (isinstance(s, int) and isinstance(t, int)) or isinstance(s, bool) or isinstance(t, bool):
            raise RSGError("start and end must be integers", file=file, line=line, field=fname)
        if not 0 <= s < t <= len(text):
            raise RSGError(f"span [{s}, {t}) outside the text of {len(text)} characters (end is exclusive)",
                           file=file, line=line, field=fname)
        if typ not in index:
            raise RSGError(f"unknown entity type {typ!r}", file=file, line=line, field=f"{fname}.type",
                           expected=list(ner_labels))
        out.append((s, t, index[typ]))
    return tuple(out)


def validate_record(rec: dict, labels: Labels, file: Path, line: int) -> Example:
    """Check one record against its task's fields and turn it into an Example (RSGError on any problem)."""
    task = rec.get("task")
    if task not in TASK_FIELDS:
        raise RSGError(f"unknown task {task!r}" if task is not None else "missing", file=file, line=line,
                       field="task", expected=list(TASKS))
    where = f"{file}:{line}"
    if task == "ner":
        text = _text(rec, "text", file, line)
        return Example("ner", text, entities=_entities(rec, text, labels.ner, file, line), where=where)
    if task == "mc":
        text = _text(rec, "text", file, line)
        lab = _text(rec, "label", file, line)
        if lab not in labels.mc:
            raise RSGError(f"unknown topic {lab!r}", file=file, line=line, field="label", expected=list(labels.mc))
        return Example("mc", text, label=labels.mc.index(lab), where=where)
    if task == "nli":
        premise, hyp = _text(rec, "premise", file, line), _text(rec, "hypothesis", file, line)
        lab = _text(rec, "label", file, line)
        if lab not in labels.nli:
            raise RSGError(f"unknown label {lab!r}", file=file, line=line, field="label", expected=list(labels.nli))
        return Example("nli", nli_input(premise, hyp), label=labels.nli.index(lab), where=where)
    template, target_field = GEN_TEMPLATES[task]
    values = {name: _text(rec, name, file, line) for name in TASK_FIELDS[task]}
    return Example(task, template.format(**values), target=values[target_field], where=where)


def nli_input(premise: str, hypothesis: str) -> str:
    return NLI_TEMPLATE.format(premise=premise.strip(), hypothesis=hypothesis.strip())


def _collect_mc_labels(files: list[Path]) -> tuple[str, ...]:
    seen: set[str] = set()
    for f in files:
        for _, rec in iter_records(f):
            if rec.get("task") == "mc" and isinstance(rec.get("label"), str):
                seen.add(rec["label"])
    return tuple(sorted(seen))


def open_corpus(spec: str | Path, *, require_val: bool = False) -> Corpus:
    """Locate a corpus and its label sets (no record is read yet except to collect topics without labels.json)."""
    root = resolve_corpus_dir(spec)
    files = {split: split_files(root, split) for split in ("train", "val")}
    if not files["train"]:
        raise RSGError("no training data", file=root, expected="train.jsonl or train-*.jsonl")
    if require_val and not files["val"]:
        raise RSGError("no validation data", file=root, expected="val.jsonl or val-*.jsonl")
    given = read_labels(root)
    mc = tuple(given["mc"]) if "mc" in given else _collect_mc_labels(files["train"])
    ner = tuple(given.get("ner", NEREL_TYPES))
    return Corpus(root=root, files=files, labels=Labels(mc=mc or ("topic_0",), ner=ner))


def iter_examples(corpus: Corpus, split: str) -> Iterator[Example]:
    """Validated examples of one split, file by file, in file order."""
    for f in corpus.files.get(split, []):
        for line, rec in iter_records(f):
            yield validate_record(rec, corpus.labels, f, line)


def load_examples(corpus: Corpus, split: str) -> list[Example]:
    examples = list(iter_examples(corpus, split))
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.task] = counts.get(ex.task, 0) + 1
    corpus.counts[split] = counts
    return examples


def gen_input(task: str, fields: dict[str, str]) -> str:
    """The encoder input of a generation task from its record fields (used by tests and inference helpers)."""
    if task not in GEN_TASKS:
        raise RSGError(f"not a generation task: {task!r}", field="task", expected=list(GEN_TASKS))
    return GEN_TEMPLATES[task][0].format(**fields)
