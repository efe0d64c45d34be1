"""Label sets of the hierarchical model's heads. Stdlib only."""

from __future__ import annotations

# NEREL's 29 entity types (FREDT5_NOTES.md 4.1), alphabetical. The NER head has 29 outputs per token. Default
# (the paper's softmax cross-entropy): per token a softmax over [outside, 29 types], outside being a fixed logit 0
# and the target the innermost entity's type. Option: a 29-way multi-label sigmoid (nested types at once; an
# "outside" token is all zeros).
NEREL_TYPES: tuple[str, ...] = (
    "AGE", "AWARD", "CITY", "COUNTRY", "CRIME", "DATE", "DISEASE", "DISTRICT", "EVENT", "FACILITY", "FAMILY",
    "IDEOLOGY", "LANGUAGE", "LAW", "LOCATION", "MONEY", "NATIONALITY", "NUMBER", "ORDINAL", "ORGANIZATION",
    "PENALTY", "PERCENT", "PERSON", "PRODUCT", "PROFESSION", "RELIGION", "STATE_OR_PROVINCE", "TIME",
    "WORK_OF_ART",
)
NLI_LABELS: tuple[str, ...] = ("entailment", "contradiction", "neutral")
DEFAULT_MC_CLASSES = 17  # the paper's topic head size; the real names come from the corpus' labels.json
TASKS: tuple[str, ...] = ("ner", "mc", "nli", "paraphrase", "qg", "qa", "summarization", "title")
CLS_TASKS: tuple[str, ...] = ("ner", "mc", "nli")
GEN_TASKS: tuple[str, ...] = ("paraphrase", "qg", "qa", "summarization", "title")


def head_labels(mc: list[str] | None = None) -> dict[str, list[str]]:
    """The label names of the hierarchical model's three heads, as `HierarchicalT5.from_base` takes them: the
    corpus' topic names (`mc`; by default DEFAULT_MC_CLASSES placeholders), NEREL's types and the NLI labels."""
    return {"mc_labels": list(mc) if mc is not None else [f"topic_{i}" for i in range(DEFAULT_MC_CLASSES)],
            "ner_labels": list(NEREL_TYPES), "nli_labels": list(NLI_LABELS)}
