"""Benchmark: topic + NER inference through Block 1 (early exit) against a full encoder pass, same batch.

The naive way is the "simplest exact split" (FREDT5_NOTES.md 3.1): run the whole encoder with
output_hidden_states=True and read the Block-1 output at hidden_states[k]. Ours runs layers [0, k) only. Both feed the
same MC and NER heads; the benchmark checks that the logits agree before it reports the speed ratio.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from rsg_eval.models.hierarchical import HierarchicalT5


def _naive(m: HierarchicalT5, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    enc = m.seq2seq.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h1 = enc.hidden_states[m.config.split_layer]                    # (B, T, d), raw Block-1 stream
    return m.heads["mc"](h1, mask), m.heads["ner"](h1, mask)


def _early_exit(m: HierarchicalT5, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h1, _, _ = m.encode_block1(ids, mask)
    return m.heads["mc"](h1, mask), m.heads["ner"](h1, mask)


def _time_pair(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of a and b, timed alternately so load from other processes hits both alike."""
    a(), b()                                       # warm-up (allocator, kernels)
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for fn, which in ((a, "a"), (b, "b")):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if which == "a":
                best_a = min(best_a, dt)
            else:
                best_b = min(best_b, dt)
    return best_a, best_b


@torch.no_grad()
def run_bench(*, d_model: int = 256, d_ff: int = 704, num_heads: int = 4, layers: int = 24, split: int = 6,
              batch: int = 16, seq_len: int = 128, repeats: int = 5, threads: int | None = None,
              device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Time both ways on one random T5 with FRED-T5-1.7B's depth and split (24 layers, 6 in Block 1)."""
    from rsg_eval.models.tiny import build_tiny

    if threads:
        torch.set_num_threads(threads)
    base, _ = build_tiny(seed=seed, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_model // num_heads,
                         num_layers=layers, num_decoder_layers=1)
    model = HierarchicalT5.from_base(base, split=split).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, base.config.vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):                          # ragged lengths: padding in the batch, as in real data
        mask[i, seq_len - (i * seq_len) // (2 * batch):] = 0
    ids = (ids * mask).to(device)
    mask = mask.to(device)
    a_mc, a_ner = _naive(model, ids, mask)
    b_mc, b_ner = _early_exit(model, ids, mask)
    same = bool(torch.equal(a_mc.argmax(-1), b_mc.argmax(-1)) and torch.equal(a_ner > 0, b_ner > 0))
    max_diff = float(max((a_mc - b_mc).abs().max(), (a_ner - b_ner).abs().max()))
    t_naive, t_ours = _time_pair(lambda: _naive(model, ids, mask), lambda: _early_exit(model, ids, mask), repeats)
    return {
        "model": {"d_model": d_model, "d_ff": d_ff, "num_heads": num_heads, "layers": layers, "split": split,
                  "encoder_parameters": sum(p.numel() for p in base.encoder.parameters())},
        "batch": batch, "seq_len": seq_len, "tokens": int(mask.sum()), "device": device,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "seconds": {"full_encoder": t_naive, "block1": t_ours},
        "examples_per_s": {"full_encoder": batch / t_naive, "block1": batch / t_ours},
        "speedup": t_naive / t_ours, "same_predictions": same, "max_abs_logit_diff": max_diff,
    }
