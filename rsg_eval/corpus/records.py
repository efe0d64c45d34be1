"""Corpus record shapes (docs/design.md "Multi-task corpus") and the collector of bad-input problems. Stdlib only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from rsg_eval.core.errors import RSGError
# One definition of the heads' label sets and the task list, shared with the trainer (stdlib only).
from rsg_eval.corpus.labels import GEN_TASKS, NEREL_TYPES, NLI_LABELS, TASKS  # noqa: F401 (re-exported)

# The eight tasks of the hierarchical model and the fields each record carries (the corpus schema, defined once:
# build-corpus writes it, corpus/load.py checks it on read).
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "ner": ("text", "entities"),
    "mc": ("text", "label"),
    "nli": ("premise", "hypothesis", "label"),
    "paraphrase": ("source", "target"),
    "qg": ("context", "answer", "question"),
    "qa": ("context", "question", "answer"),
    "summarization": ("text", "summary"),
    "title": ("text", "title"),
}
# Free-text fields (cleaned, checked for leakage); labels and entity spans are not text.
TEXT_FIELDS: dict[str, tuple[str, ...]] = {t: tuple(f for f in fs if f not in ("label", "entities"))
                                           for t, fs in TASK_FIELDS.items()}
# The field that stands for a record in length statistics.
MAIN_FIELD: dict[str, str] = {"ner": "text", "mc": "text", "nli": "premise", "paraphrase": "source",
                              "qg": "context", "qa": "context", "summarization": "text", "title": "text"}
# Pseudo-task of raw texts waiting for automatic annotation.
RAW = "text"



def text_fields(rec: dict) -> tuple[str, ...]:
    """The free-text fields of a record (raw texts: `text`)."""
    return TEXT_FIELDS.get(rec["task"], ("text",))


def make_id(source: str, *parts: Any) -> str:
    return ":".join([source, *(str(p) for p in parts)])


@dataclass
class Problems:
    """Collects bad-input problems: each is an RSGError naming the file and line.

    strict=True re-raises the first one (the run stops); otherwise the bad record is skipped, counted per source,
    and the first `keep` messages are kept for the summary (and echoed through `echo`).
    """

    strict: bool = False
    keep: int = 50
    echo: Callable[[str], None] | None = None
    counts: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    all_messages: list[str] = field(default_factory=list)   # up to 100 000, written to problems.txt
    echoed_note: bool = False

    def add(self, source: str, err: RSGError) -> None:
        if self.strict:
            raise err
        from rsg_eval.core.errors import clip

        self.counts[source] += 1
        text = clip(str(err), 1000)  # one line each, however large the crafted record
        if len(self.all_messages) < 100_000:
            self.all_messages.append(text)
        if len(self.messages) == self.keep and not self.echoed_note and self.echo is not None:
            self.echoed_note = True
            self.echo("(more bad records are skipped silently; all of them are listed in problems.txt)")
        if len(self.messages) < self.keep:
            self.messages.append(text)
            if self.echo is not None:
                self.echo(f"skipped: {text}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {"skipped_per_source": dict(self.counts), "total": self.total, "first_messages": self.messages}
