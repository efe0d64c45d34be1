"""Training pairs from task items, and the deterministic length-grouped batch plan.

A pair is (encoder ids, decoder target ids ending in </s>). The batch plan of an epoch is a pure function of
(seed, epoch, lengths, batch size, world size), so a resumed run rebuilds it and skips to its position instead
of pickling a sampler, and every data-parallel rank derives the same global batches without talking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from rsg_eval.core.errors import RSGError


@dataclass(frozen=True)
class Pair:
    src: tuple[int, ...]     # encoder input ids (prompt, truncated by the template to max_source_len)
    tgt: tuple[int, ...]     # decoder target ids: the gold choice's tokens then </s>
    key: Any = None          # the item's key, for error messages and debugging
    cut: bool = False        # the target was longer than max_target_len and lost its tail

    @property
    def length(self) -> int:
        return len(self.src) + len(self.tgt)


def gold_targets(item: Any) -> list[Any]:
    """The labels one item trains on: its gold label; RuCoS: each distinct gold entity among its candidates."""
    if item.gold is None:
        return []
    golds = list(item.gold) if isinstance(item.gold, (tuple, list)) else [item.gold]
    out: list[Any] = []
    for g in golds:
        # `in`/`index` on labels compare by ==; bool labels (False/True) and int labels (0/1) never mix within
        # one task, so False == 0 cannot pick a wrong label here.
        if g in item.labels and g not in out:
            out.append(g)
    return out


def encode_source(tokenizer: Any, prompt: str, max_len: int) -> list[int]:
    """Encoder ids for a prompt exactly as rank classification (rsg_eval.scoring) encodes it: the tokenizer's
    own special tokens (T5's SentencePiece appends </s>, FRED's GPT2 tokenizer appends nothing); an input
    longer than `max_len` keeps its end (the question) and a leading special prefix such as `<LM>`. The
    templates shorten the passage first, so this cut is rare."""
    ids = list(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])  # cut below
    if len(ids) <= max_len:
        return ids
    special = set(getattr(tokenizer, "all_special_ids", []))
    if max_len >= 2 and ids[0] in special:
        return [ids[0]] + ids[len(ids) - (max_len - 1):]
    return ids[len(ids) - max_len:]


def encode_target(tokenizer: Any, text: str, max_len: int) -> list[int]:
    """Decoder target ids: the choice text without special tokens, then </s> appended explicitly.

    FRED-T5's tokenizer appends no </s>, and a T5 tokenizer would append its own; we add it ourselves so both
    end in exactly one </s> (the scorer scores a choice followed by </s> too)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RSGError("the tokenizer has no eos_token (</s>); fine-tuning targets must end in it",
                       field="tokenizer.eos_token")
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])  # cut below
    while ids and ids[-1] == eos:  # never two </s>
        ids.pop()
    return ids[: max_len - 1] + [eos]


def build_pairs(
    items: Iterable[Any],
    render: Callable[[Any], Any],
    tokenizer: Any,
    max_source_len: int,
    max_target_len: int,
) -> list[Pair]:
    """One pair per (item, gold target). MuSeRC items are answers, so every answer trains (yes or no);
    RuCoS gives one pair per gold entity. `render(item)` returns the template's Rendered(prompt, choices)."""
    pairs: list[Pair] = []
    for item, prompt, texts in gold_answers(items, render):
        src = tuple(encode_source(tokenizer, prompt, max_source_len))
        for text in texts:
            full = encode_target(tokenizer, text, 1 << 30)
            tgt = full if len(full) <= max_target_len else full[: max_target_len - 1] + full[-1:]
            pairs.append(Pair(src, tuple(tgt), item.key, len(full) > max_target_len))
    return pairs


def gold_answers(items: Iterable[Any], render: Callable[[Any], Any]) -> Iterator[tuple[Any, str, list[str]]]:
    """(item, its rendered prompt, the answer text of each gold target) for every item with a gold label: what
    both pair builders (seq2seq here, decoder-only in causal.py) train on."""
    for item in items:
        targets = gold_targets(item)
        if not targets:
            continue
        rendered = render(item)
        yield item, rendered.prompt, [rendered.choices[list(item.labels).index(g)] for g in targets]


def epoch_plan(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    group_by_length: bool = True,
    world: int = 1,
    mega: int = 50,
) -> list[list[int]]:
    """The global micro-batches of one epoch: lists of pair indices, `batch_size * world` each (the last may be
    shorter). Length grouping: shuffle, cut into mega-batches of `mega` global batches, sort each by length
    (longest first), cut into batches, shuffle the batch order. Padding waste drops; order stays random."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch, 7919])  # a stream per (seed, epoch): resumable, rank-independent
    perm = rng.permutation(n)
    gb = batch_size * world
    if group_by_length:
        lens = np.asarray(lengths)
        chunks = []
        for start in range(0, n, gb * mega):
            part = perm[start : start + gb * mega]
            # stable sort by descending length, so ties keep the shuffled order
            chunks.append(part[np.argsort(-lens[part], kind="stable")])
        perm = np.concatenate(chunks) if chunks else perm
    batches = [perm[i : i + gb].tolist() for i in range(0, n, gb)]
    if group_by_length and len(batches) > 1:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    return batches


def rank_slice(batch: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's share of a global micro-batch and its weight (0.0 for a padding example when a short last
    batch has fewer examples than ranks: every rank must run forward/backward for DDP to stay in step)."""
    mine = batch[rank::world]
    if mine:
        return mine, 1.0
    return batch[:1], 0.0


def collate(pairs: Sequence[Pair], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids/attention_mask (B, S), labels (B, T) with -100 at padding."""
    import torch

    b = len(pairs)
    s = max(len(p.src) for p in pairs)
    t = max(len(p.tgt) for p in pairs)
    input_ids = torch.full((b, s), pad_id, dtype=torch.long)
    attention = torch.zeros((b, s), dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    for i, p in enumerate(pairs):
        input_ids[i, : len(p.src)] = torch.tensor(p.src, dtype=torch.long)
        attention[i, : len(p.src)] = 1
        labels[i, : len(p.tgt)] = torch.tensor(p.tgt, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
