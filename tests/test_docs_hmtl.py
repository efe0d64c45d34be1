"""docs/hmtl.md's batch-plan figures are recomputed from the code, so the page cannot drift from what
`rsg train-hmtl` does: the paper-size table under both readings, and the plan it prints for the bundled sample."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rsg_eval.training.hmtl.dataset import BatchPlan

PAGE = Path(__file__).resolve().parents[1] / "docs" / "hmtl.md"

# The paper-size corpus as the page derives it (configs/corpus_example.yaml scaled to ~950k), trainer order.
PAPER_SIZES = (("ner", 2000), ("mc", 60000), ("nli", 392702), ("paraphrase", 70800), ("qg", 141500),
               ("qa", 141500), ("summarization", 70800), ("title", 70800))


def _table() -> dict[str, list[str]]:
    text = PAGE.read_text(encoding="utf-8")
    block = text.split("| | `total` (default) | `per-task` |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in block.splitlines()[2:] if line.startswith("|")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def _n(cell: str) -> float:
    return float(re.match(r"[\d,.]+", cell).group(0).replace(",", ""))


def _check_plan_rows(table: dict, col: int, plan: BatchPlan) -> None:
    """The rows both plan tables of the page share, in column `col`, against the planner's numbers."""
    assert _n(table["sequences per micro-step"][col]) == plan.per_micro
    assert _n(table["sequences per optimizer step"][col]) == plan.per_step
    assert _n(table["of each task per optimizer step"][col]) == plan.per_task_per_step
    assert _n(table["optimizer steps per epoch"][col]) == plan.steps_per_epoch
    assert _n(table["optimizer steps in 4 epochs"][col]) == 4 * plan.steps_per_epoch
    assert _n(table["sequences per epoch"][col]) == plan.steps_per_epoch * plan.per_step


def test_paper_size_table_is_what_the_plan_computes():
    assert sum(n for _, n in PAPER_SIZES) == pytest.approx(950_000, rel=0.001)
    table = _table()
    plans = [BatchPlan(PAPER_SIZES, batch_size=12, grad_accum=2, reading=r) for r in ("total", "per-task")]
    for col, plan in enumerate(plans):
        _check_plan_rows(table, col, plan)
        rep = plan.repeats()
        for label, tasks in (("ner (2,000)", ["ner"]), ("mc (60,000)", ["mc"]), ("nli (392,702)", ["nli"]),
                             ("qa, qg (141,500 each)", ["qa", "qg"]),
                             ("summarization, title, paraphrase (70,800 each)",
                              ["summarization", "title", "paraphrase"])):
            cell = table[f"{label} read per epoch"][col]
            for t in tasks:
                assert cell == f"{rep[t]:.2f}x", (label, t, col)
    # the page's own sizes are these
    text = PAGE.read_text(encoding="utf-8")
    for name, n in PAPER_SIZES:
        assert f"{n:,}" in text, name


def test_sample_plan_in_the_page_is_the_log():
    from rsg_eval.corpus.load import load_examples, open_corpus
    from rsg_eval.corpus.labels import TASKS

    c = open_corpus("sample")
    load_examples(c, "train")
    plan = BatchPlan(tuple((t, c.counts["train"][t]) for t in TASKS), batch_size=12, grad_accum=2)
    text = PAGE.read_text(encoding="utf-8")
    for line in plan.describe():
        assert line in text, line


def _paper_recipe_table() -> dict[str, list[str]]:
    text = PAGE.read_text(encoding="utf-8")
    block = text.split("| corpus_paper.yaml's plan | `total` (default) | `per-task` |", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in block.splitlines()[1:] if line.startswith("|")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def test_paper_recipe_table_is_what_the_planner_computes():
    """Issue 23 item 13: the page shows configs/corpus_paper.yaml's plan, recomputed here from the recipe itself."""
    from rsg_eval.corpus.config import load_config, planned_train_sizes
    from rsg_eval.corpus.labels import TASKS

    cfg = load_config(PAGE.parents[1] / "configs" / "corpus_paper.yaml")
    sizes = planned_train_sizes(cfg, TASKS)
    assert [t for t, _ in sizes] == list(TASKS)
    table = _paper_recipe_table()
    plans = [BatchPlan(sizes, batch_size=12, grad_accum=2, reading=r) for r in ("total", "per-task")]
    for col, plan in enumerate(plans):
        _check_plan_rows(table, col, plan)
        (label,) = [k for k in table if k.startswith("each task (")]
        assert label == f"each task ({sizes[0][1]:,} train examples) read per epoch"
        assert {n for _, n in sizes} == {sizes[0][1]}
        assert {f"{r:.2f}x" for r in plan.repeats().values()} == {table[label][col]}
