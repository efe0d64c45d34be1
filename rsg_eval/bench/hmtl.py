"""Benchmark: topic + NER inference through Block 1 (early exit) against a full encoder pass, same batch.

The naive way is the "simplest exact split" (FREDT5_NOTES.md 3.1): run the whole encoder with
output_hidden_states=True and read the Block-1 output at hidden_states[k]. Ours runs layers [0, k) only. Both feed the
same MC and NER heads; the benchmark checks that the logits agree before it reports the speed ratio.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from rsg_eval.bench.timing import best_of
from rsg_eval.corpus.labels import head_labels
from rsg_eval.models.hierarchical import HierarchicalT5


def _naive(m: HierarchicalT5, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    enc = m.seq2seq.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h1 = enc.hidden_states[m.config.split_layer]                    # (B, T, d), raw Block-1 stream
    return m.heads["mc"](h1, mask), m.heads["ner"](h1, mask)


def _early_exit(m: HierarchicalT5, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h1, _, _ = m.encode_block1(ids, mask)
    return m.heads["mc"](h1, mask), m.heads["ner"](h1, mask)


def _time_pair(a: Callable[[], Any], b: Callable[[], Any], repeats: int,
               device: Any = None) -> tuple[float, float]:
    """Best-of-`repeats` seconds of a and b, timed alternately so load from other processes hits both alike; each
    timing ends after a device sync (rsg_eval.bench.timing), so on a GPU it measures the kernels, not their launch."""
    t_a, t_b = best_of([a, b], repeats, device=device)
    return t_a, t_b


@torch.no_grad()
def run_bench(*, d_model: int = 256, d_ff: int = 704, num_heads: int = 4, layers: int = 24, split: int = 6,
              batch: int = 16, seq_len: int = 128, repeats: int = 5, threads: int | None = None,
              device: str = "cpu", seed: int = 0, bf16: bool = False,
              peak_tflops: float | None = None) -> dict[str, Any]:
    """Time both ways on one random T5 with FRED-T5-1.7B's depth and split (24 layers, 6 in Block 1).

    bf16: autocast on a GPU (the dtype MFU is quoted against); FLOPs and MFU from rsg_eval.bench.flops."""
    from rsg_eval.bench.flops import T5Dims, device_peak, forward_flops, utilisation
    from rsg_eval.models.tiny import build_tiny

    if threads:
        torch.set_num_threads(threads)
    base, _ = build_tiny(seed=seed, d_model=d_model, d_ff=d_ff, num_heads=num_heads, d_kv=d_model // num_heads,
                         num_layers=layers, num_decoder_layers=1)
    model = HierarchicalT5.from_base(base, split=split, **head_labels()).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, base.config.vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):                          # ragged lengths: padding in the batch, as in real data
        mask[i, seq_len - (i * seq_len) // (2 * batch):] = 0
    ids = (ids * mask).to(device)
    mask = mask.to(device)
    dev = torch.device(device)
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and dev.type == "cuda" \
        else contextlib.nullcontext

    def naive() -> Any:
        with cast():
            return _naive(model, ids, mask)

    def ours() -> Any:
        with cast():
            return _early_exit(model, ids, mask)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    a_mc, a_ner = naive()
    b_mc, b_ner = ours()
    same = bool(torch.equal(a_mc.argmax(-1), b_mc.argmax(-1)) and torch.equal(a_ner > 0, b_ner > 0))
    max_diff = float(max((a_mc.float() - b_mc.float()).abs().max(), (a_ner.float() - b_ner.float()).abs().max()))
    t_naive, t_ours = _time_pair(naive, ours, repeats, device=dev)
    dims = T5Dims.from_config(base.config)
    real = [int(n) for n in mask.sum(1).tolist()]
    flops_full = sum(forward_flops(dims, n, 0, decoder=False) for n in real)      # encoder only, real tokens
    flops_block1 = sum(forward_flops(dims, n, 0, encoder_layers=split, decoder=False) for n in real)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    peak = ("--peak-tflops", peak_tflops) if peak_tflops else (device_peak(dev_name) if dev.type == "cuda" and bf16
                                                                 else None)
    return {
        "model": {"d_model": d_model, "d_ff": d_ff, "num_heads": num_heads, "layers": layers, "split": split,
                  "encoder_parameters": sum(p.numel() for p in base.encoder.parameters())},
        "batch": batch, "seq_len": seq_len, "tokens": int(mask.sum()), "device": device,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "seconds": {"full_encoder": t_naive, "block1": t_ours},
        "examples_per_s": {"full_encoder": batch / t_naive, "block1": batch / t_ours},
        "speedup": t_naive / t_ours, "same_predictions": same, "max_abs_logit_diff": max_diff,
        "bf16": bool(bf16 and dev.type == "cuda"), "device_name": dev_name,
        "model_tflop": {"full_encoder": flops_full / 1e12, "block1": flops_block1 / 1e12},
        "achieved_tflops": {"full_encoder": flops_full / t_naive / 1e12, "block1": flops_block1 / t_ours / 1e12},
        "peak": {"name": peak[0], "tflops": peak[1]} if peak else None,
        "mfu": {"full_encoder": utilisation(flops_full, t_naive, peak[1] if peak else None),
                "block1": utilisation(flops_block1, t_ours, peak[1] if peak else None)},
        "peak_memory_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
