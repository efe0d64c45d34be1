"""Inference with the hierarchical model's Block-1 heads (early exit): topics and nested named entities."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def decode_spans(offsets: Sequence[tuple[int, int]], active: Sequence[Sequence[bool]], types: Sequence[str]
                 ) -> list[dict[str, Any]]:
    """Token-level multi-label NER output -> character spans, one list over all types (nested spans allowed).

    offsets: (T,) character span of each token ((0, 0) for special tokens); active: (T, n_types) booleans.
    A run of consecutive real tokens carrying type t becomes one entity of type t, from the first token's start
    (its leading space skipped) to the last token's end. Sorted by (start, -end, type).
    """
    spans: list[dict[str, Any]] = []
    for t, name in enumerate(types):
        start = end = None
        for (s, e), row in zip(offsets, active):
            on = e > s and bool(row[t])
            if on and start is None:
                start, end = s, e
            elif on:
                end = e
            elif start is not None and e > s:
                spans.append({"start": start, "end": end, "type": name})
                start = None
        if start is not None:
            spans.append({"start": start, "end": end, "type": name})
    spans.sort(key=lambda d: (d["start"], -d["end"], d["type"]))
    return spans


def _strip_space(text: str, span: dict[str, Any]) -> dict[str, Any]:
    # Byte-level BPE tokens carry their leading space; an entity does not.
    s, e = span["start"], span["end"]
    while s < e and text[s].isspace():
        s += 1
    return {**span, "start": s, "end": e, "text": text[s:e]}


@torch.no_grad()
def predict_topics(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512) -> list[str]:
    """Topic label per text, from Block 1 only."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    dev = next(model.parameters()).device
    logits = model.mc_logits(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))      # (B, n_mc)
    return [model.config.mc_labels[i] for i in logits.argmax(-1).tolist()]


@torch.no_grad()
def predict_entities(model: Any, tokenizer: Any, texts: Sequence[str], *, threshold: float = 0.5,
                     max_length: int = 512) -> list[list[dict[str, Any]]]:
    """Entities per text ({start, end, type, text}), from Block 1 only. A softmax-trained head (the default) gives
    one type per token, the innermost entity's, so entities come out flat; a multi-label head (sigmoid >
    `threshold` per type) can give nested ones."""
    from rsg_eval.training.hmtl.dataset import ensure_fast

    fast = ensure_fast(tokenizer)
    enc = fast(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
               return_offsets_mapping=True)
    dev = next(model.parameters()).device
    logits = model.ner_logits(enc["input_ids"].to(dev), enc["attention_mask"].to(dev)).float()   # (B, T, n)
    n = logits.shape[-1]
    if model.config.ner_representation == "softmax-innermost":
        # class 0 = outside (its logit is fixed at 0), 1 + t = type t
        from rsg_eval.models.hierarchical import ner_softmax_logits

        cls = ner_softmax_logits(logits).argmax(-1)                                              # (B, T)
        active_all = cls.unsqueeze(-1) == torch.arange(1, n + 1, device=cls.device)            # (B, T, n)
    else:
        active_all = torch.sigmoid(logits) > threshold
    out = []
    for i, text in enumerate(texts):
        offs = [tuple(o) for o in enc["offset_mapping"][i].tolist()]
        act = active_all[i].cpu().tolist()
        out.append([_strip_space(text, sp) for sp in decode_spans(offs, act, model.config.ner_labels)])
    return out
