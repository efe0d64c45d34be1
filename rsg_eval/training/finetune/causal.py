"""Decoder-only fine-tuning's building blocks: prompt-masked causal-LM pairs, their collate, the LoRA default.

A decoder-only model is fine-tuned on the answer verbaliser the way rank classification scores it, so training
and prediction see the same tokens:
- the pair's ids come from `rsg_eval.scoring.encode_causal`, the scorer's own encoding: the rendered prompt (the
  same templates as zero-shot, BOS as the tokenizer adds it) and the gold choice's continuation (a space
  delimiter unless the prompt ends in whitespace, the whole text split after the prompt; no eos, as the scorer
  appends none). `Pair.src` holds the prompt ids, `Pair.tgt` the answer ids, so `Pair.length` is the sequence
  length and the seq2seq recipe's length bucketing (`data.epoch_plan`) applies unchanged;
- the loss is the causal-LM cross-entropy on the answer tokens only: `labels` is -100 on the prompt and on
  padding, so `model(**batch).loss` (transformers shifts labels by one inside) averages over answer tokens;
- prediction is rank classification (`rsg_eval.scoring.score_choices`), exactly as `rsg zeroshot` scores.

Models over `LORA_DEFAULT_ABOVE` parameters (1e9: a 1.3B-3B decoder with AdamW needs 16 bytes a parameter, over
20 GB before activations) train with LoRA by default (`DEFAULT_LORA_RANK`); smaller ones fine-tune fully.

"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from rsg_eval.scoring import encode_causal
from rsg_eval.training.finetune.data import Pair, gold_answers

LORA_DEFAULT_ABOVE = 1_000_000_000
DEFAULT_LORA_RANK = 16


def lora_by_default(n_parameters: int) -> bool:
    """True when a decoder-only model is big enough that `rsg finetune` trains LoRA unless told otherwise."""
    return n_parameters > LORA_DEFAULT_ABOVE


def build_causal_pairs(items: Iterable[Any], render: Callable[[Any], Any], model: Any, tokenizer: Any,
                       max_input_tokens: int | None = None) -> list[Pair]:
    """One pair per (item, gold target), as `data.build_pairs` for seq2seq: src = the prompt's ids, tgt = the
    gold choice's continuation ids, both as the scorer encodes them (its context limit applied: a long prompt
    keeps its end). `render(item)` returns the template's Rendered(prompt, choices)."""
    prompts: list[str] = []
    answers: list[list[str]] = []
    keys: list[Any] = []
    for item, prompt, texts in gold_answers(items, render):
        for text in texts:
            prompts.append(prompt)
            answers.append([text])
            keys.append(item.key)
    if not prompts:
        return []
    enc = encode_causal(model, tokenizer, prompts, answers, max_input_tokens)
    return [Pair(tuple(p), tuple(c[0]), k) for p, c, k in zip(enc.prompts, enc.choices, keys)]


def collate_causal(pairs: Sequence[Pair], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors for a causal LM: input_ids/attention_mask (B, L) = prompt then answer, labels (B, L)
    = the answer's ids at the answer's positions and -100 elsewhere (prompt, padding). The model shifts labels
    by one, so position t's logits are scored against token t+1: the last prompt position predicts the first
    answer token, and no position predicts past the answer."""
    import torch

    b = len(pairs)
    length = max(len(p.src) + len(p.tgt) for p in pairs)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    labels = torch.full((b, length), -100, dtype=torch.long)
    for i, p in enumerate(pairs):
        n, m = len(p.src), len(p.tgt)
        input_ids[i, : n + m] = torch.tensor(p.src + p.tgt, dtype=torch.long)
        attention[i, : n + m] = 1
        labels[i, n: n + m] = torch.tensor(p.tgt, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def causal_nll_sum(model: Any, batch: dict[str, Any]) -> Any:
    """One micro-batch's summed answer-token NLL in fp32 (a 0-d tensor on the device, no host read), for the
    recipe's per-token loss scaling across micro-batches and processes (the seq2seq recipe sums the same way).

    Logits (B, L, V) at position t score token t+1: logits[:, :-1] against labels[:, 1:], -100 ignored."""
    import torch
    import torch.nn.functional as F

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")


def answer_tokens(batch: dict[str, Any]) -> int:
    """How many tokens a batch's loss averages over (for per-token loss weighting across micro-batches)."""
    return int((batch["labels"] != -100).sum())
