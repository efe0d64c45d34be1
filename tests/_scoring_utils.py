"""Shared inputs and instruments for the scoring tests (seq2seq and decoder-only)."""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch import nn

PROMPTS = [
    "<LM>Мальчик уронил стакан на каменный пол кухни. Что произошло в результате?",
    "Текст: Иван Петрович работал учителем в сельской школе. Вопрос: он учитель?\nОтвет:",
    "<LM>Поезд опоздал на сорок минут из-за снегопада, поэтому",
    "Да?",
    "<LM>Учёные из университета опубликовали статью о климате Арктики и таянии льдов, а журналисты задали "
    "вопросы министру о поддержке науки в России.",
]
CHOICES = [
    ["Стакан разбился.", "Стакан остался целым."],
    ["да", "нет", "не знаю"],
    ["мы пропустили начало концерта", "мы пришли вовремя", "поезд", "мёд"],
    ["нет"],
    ["Правительство России приняло решение.", "Команда выиграла матч.", "Бабушка испекла пирог."],
]

# RuCoS-style choices: one query with different entities, so they share a long token prefix; edge cases:
# a duplicate, a choice that is a prefix of another, one-token choices, several prefix lengths.
QUERY = "Журналисты задали вопросы министру {} о поддержке науки в России."
PREFIX_PROMPTS = [PROMPTS[4], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
PREFIX_CHOICES = [
    [QUERY.format(e) for e in ("Иванову", "Петрову", "Сидорову", "Иванову")],
    ["Стакан разбился на мелкие осколки", "Стакан разбился на мелкие осколки и звенел", "Стакан разбился"],
    ["Учёные из университета опубликовали статью", "Учёные из университета опубликовали книгу"],
    ["да", "нет"],
]


def close(a, b, tol=1e-4):
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            assert abs(x - y) <= tol * max(1.0, abs(y)), (x, y)


def max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


class OOMAbove:
    """A forward pre-hook on a real module that raises CUDA's OOM error for batches above `limit` rows, as a GPU
    would (or the CPU allocator's error with `cpu=True`); counts the rows of the batches that ran. When `keep`
    is set, the hook allocates a tensor first (standing for the failed batch's activations) and keeps a weak
    reference to it, so a test can tell whether it was still alive when the scorer freed memory."""

    def __init__(self, limit: int, after_calls: int = 0, cpu: bool = False, keep: bool = False):
        self.limit, self.after_calls, self.cpu, self.keep = limit, after_calls, cpu, keep
        self.calls = 0
        self.raised = 0
        self.rows_done = 0
        self.batches: list[int] = []  # rows of every batch that ran
        self.held = None  # weakref to the last failed batch's big tensor

    def __call__(self, module, args, kwargs):
        import weakref

        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        if ids.shape[0] > self.limit and self.calls > self.after_calls:
            self.raised += 1
            if self.keep:
                activations = torch.ones(1 << 16)  # referenced from this frame, i.e. from the traceback
                self.held = weakref.ref(activations)
            if self.cpu:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.rows_done += ids.shape[0]
        self.batches.append(ids.shape[0])


SYNC_METHODS = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


# transformers 5 builds attention masks with `padding_mask.all()` (masking_utils: a host read inside every model
# call, to skip an all-ones mask); the one-sync-per-batch property is ours only under 4.x, where nothing else reads.
TRANSFORMERS5 = int(__import__("transformers").__version__.split(".")[0]) >= 5
SYNC_REASON = "transformers 5's mask builder reads the padding mask on the host (not our code)"


@contextlib.contextmanager
def count_syncs() -> Iterator[Counter]:
    """Count the calls that read a tensor's value on the host (each one waits for the GPU there): `.tolist()`,
    `.item()`, `float(t)`, `int(t)`, `bool(t)` / `if t`, `t.numpy()`, `t.cpu()`. A CUDA-free stand-in for a sync
    counter; it sees our code and transformers' alike."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)
        return counted

    try:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class FP32Head(nn.Module):
    """A reference LM head: the same weight, the matmul in fp32 (not an nn.Linear, so the scorer runs it as is)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h.float(), self.weight.float())
