"""Rank-classification scoring for fine-tuning: the val metrics each evaluation chooses the best state on, and the
val / test predictions of that state (training/finetune/run.py writes them to the run folder)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rsg_eval.engine.runtime import Dist
from rsg_eval.training.finetune.config import FinetuneConfig


@dataclass
class Prepared:
    items: list[Any]
    prompts: list[str]
    choices: list[list[str]]


def prepare(items: list[Any], template: Any, tokenizer: Any, max_len: int) -> Prepared:
    rendered = [template.render(it, tokenizer=tokenizer, max_tokens=max_len) for it in items]
    return Prepared(items, [r.prompt for r in rendered], [list(r.choices) for r in rendered])


def score_prepared(model: Any, tokenizer: Any, prep: Prepared, cfg: FinetuneConfig, dist: Dist,
                   max_len: int) -> list[list[float]]:
    """Rank-classification scores of every item's choices; ranks score whole groups round-robin and gather."""
    from rsg_eval.scoring import score_choices

    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(prep.items):
        groups.setdefault(it.group, []).append(i)
    mine = [i for g, idx in enumerate(groups.values()) if g % dist.world == dist.rank for i in idx]
    scores = score_choices(model, tokenizer, [prep.prompts[i] for i in mine], [prep.choices[i] for i in mine],
                           batch_size=cfg.eval_batch_size, normalize=cfg.normalize,
                           max_input_tokens=max_len) if mine else []
    out: list[list[float] | None] = [None] * len(prep.items)
    for part in dist.gather(list(zip(mine, [list(map(float, s)) for s in scores]))):
        for i, s in part:
            out[i] = s
    return out  # type: ignore[return-value]


def decide(items: Sequence[Any], scores: Sequence[Sequence[float]]) -> dict[Any, Any]:
    """{key: the label whose choice scored highest}; the first label wins ties (deterministic)."""
    preds = {}
    for it, s in zip(items, scores):
        best = max(range(len(s)), key=lambda j: (s[j], -j))
        preds[it.key] = it.labels[best]
    return preds


def val_metrics(task: str, prep: Prepared, scores: Sequence[Sequence[float]]) -> dict[str, float]:
    from rsg_eval.core import metrics

    m = metrics.score_items(task, prep.items, decide(prep.items, scores))
    return {k: float(v) for k, v in m.items()}


class Scorer:
    """score_prepared for one task's model, with one note per task split (not a warning per evaluation) when
    prompts were cut. `model_limit`: the model's own input limit (its info's max_input_tokens), which says
    whether raising --max-source-length would help."""

    def __init__(self, tokenizer: Any, cfg: FinetuneConfig, max_src: int, model_limit: Any,
                 note: Callable[[str], None]) -> None:
        self.tokenizer, self.cfg, self.max_src, self.model_limit, self.note = tokenizer, cfg, max_src, model_limit, note
        self.noted: set[str] = set()

    def __call__(self, m: torch.nn.Module, prep: Prepared, where: str, d: Dist) -> list[list[float]]:
        from rsg_eval.scoring import count_cut_prompts, cut_prompts_note

        max_src = self.max_src
        with count_cut_prompts() as cut:
            out = score_prepared(m, self.tokenizer, prep, self.cfg, d, max_src)
        if d.world > 1:  # each process scored its share of the groups: the note counts them all
            counts = d.gather((cut.n, cut.total))
            cut.n, cut.total, cut.limit = sum(c[0] for c in counts), sum(c[1] for c in counts), max_src
        if cut.n and where not in self.noted:
            self.noted.add(where)
            advice = ("raise --max-source-length or use a template that truncates the passage (its `truncate:` "
                      "field)" if max_src < int(self.model_limit or max_src + 1)
                      else "use a template that truncates the passage (its `truncate:` field)")
            self.note(cut_prompts_note(where, cut, advice))
        return out
