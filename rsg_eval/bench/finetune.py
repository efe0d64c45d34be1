"""Training-throughput benchmark behind `rsg bench finetune`.

One optimizer step is what `loop.train` does (same `forward_backward`, AdamW, clipping), on synthetic
examples whose lengths mix short inputs (TERRa/RCB/PARus-like, 30-120 tokens) and long ones (DaNetQA/MuSeRC/
RuCoS-like, 200-512), with short targets. Each configuration runs one epoch over the same example pool, so
grouped and ungrouped batching see the same examples; tokens/s counts real (non-padding) tokens.

Peak memory: on GPU `torch.cuda.max_memory_allocated` after a reset; on CPU the peak resident set size
(sampled every 5 ms from /proc/self/statm by a thread) above the level before the configuration started,
with the allocator trimmed in between (`malloc_trim`), since tracemalloc does not see torch's allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rsg_eval.bench.timing import sync
from rsg_eval.training.finetune.data import Pair, collate, epoch_plan
from rsg_eval.engine.optim import make_optimizer, param_groups
from rsg_eval.training.finetune.loop import forward_backward

# d_model 256, 4+4 layers: the "small" model of the zero-shot benchmark too
SMALL = dict(d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=4, num_decoder_layers=4)
# FRED-T5-1.7B's shape (FREDT5_NOTES.md 1.1), random weights
FRED_1_7B = dict(d_model=1536, d_ff=4096, num_heads=24, d_kv=64, num_layers=24, num_decoder_layers=24,
                 vocab_size=50364, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)


@dataclass
class BenchRow:
    model: str
    grouped: bool
    examples: int
    steps: int
    seconds: float         # wall clock
    cpu_seconds: float     # process CPU time: robust to other load on a shared machine (CPU runs only)
    tokens: int            # real (non-pad) source + target tokens processed
    padded_tokens: int     # positions computed, padding included
    peak_mb: float
    model_flops: int = 0     # matmul FLOPs the steps had to do (real tokens, no recompute): rsg_eval.bench.flops
    hardware_flops: int = 0  # what the device ran (padded shapes, checkpointing's recompute)

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def examples_per_cpu_s(self) -> float:
        return self.examples / self.cpu_seconds


def synthetic_pairs(n: int, vocab: int, max_src: int, max_tgt: int, seed: int = 0,
                    fixed: bool = False) -> list[Pair]:
    """`n` random-token pairs. fixed=True: every source max_src and target max_tgt long (a worst-case step)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        if fixed:
            s, t = max_src, max_tgt
        else:
            s = int(rng.integers(30, 121)) if i % 2 == 0 else int(rng.integers(200, 513))
            s, t = min(s, max_src), min(int(rng.integers(2, 21)), max_tgt)
        pairs.append(Pair(tuple(int(x) for x in rng.integers(5, vocab, size=s)),
                          tuple(int(x) for x in rng.integers(5, vocab, size=t - 1)) + (2,)))
    return pairs


class RssPeak:
    """Peak RSS (bytes) of this process while the context is open, sampled from /proc/self/statm."""

    def __init__(self, every: float = 0.005) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self.page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self) -> "RssPeak":
        self.base = self.rss()
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build_model(name: str, device: torch.device) -> tuple[torch.nn.Module, int]:
    """(random model in train mode on device, vocab size): tiny, small (d256 4+4) or fredt5-1.7b."""
    from transformers import T5Config

    from rsg_eval.models.untied import build_t5

    from rsg_eval.models.tiny import build_tiny

    if name == "tiny":
        model, tok = build_tiny()
    elif name == "small":
        model, tok = build_tiny(**SMALL)
    elif name == "fredt5-1.7b":
        with torch.device(device) if device.type == "cuda" else contextlib.nullcontext():
            model = build_t5(T5Config(**FRED_1_7B))  # FRED's separate head under transformers 4 and 5
        return model.to(device).train(), FRED_1_7B["vocab_size"]
    else:
        raise ValueError(name)
    return model.to(device).train(), len(tok)


def run_config(model: torch.nn.Module, pairs: list[Pair], batch_size: int, grouped: bool, device: torch.device, *,
               name: str, bf16: bool = False, warmup: int = 1, max_steps: int = 0) -> BenchRow:
    """`warmup` untimed steps, then one timed epoch (or `max_steps` steps) of real optimizer steps over `pairs`.

    The steps are `loop.train`'s: the same forward/backward, fused AdamW, clipping and fused GELU / RMS-norm
    kernels. Warm-up batches are the first examples, taken round the pool when it is smaller than the warm-up."""
    from rsg_eval.bench.flops import T5Dims, hardware_flops, model_flops
    from rsg_eval.training.finetune.config import FinetuneConfig
    from rsg_eval.models.kernels import fused_t5

    opt = make_optimizer(param_groups(model, 0.0), lr=1e-5)
    plan = epoch_plan([p.length for p in pairs], batch_size, seed=0, epoch=0, group_by_length=grouped)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and device.type == "cuda" \
        else contextlib.nullcontext
    shapes: list[tuple[int, int, int]] = []

    def step(batch_idx: list[int]) -> tuple[int, int]:
        chosen = [pairs[i] for i in batch_idx]
        b = {k: v.to(device) for k, v in collate(chosen, 0).items()}
        shapes.append((len(chosen), b["input_ids"].shape[1], b["labels"].shape[1]))
        tokens = sum(len(p.tgt) for p in chosen)
        forward_backward(model, model, b, 1.0 / tokens, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (sum(p.length for p in chosen),
                b["input_ids"].numel() + b["labels"].numel())

    timed = plan[:max_steps] if max_steps else plan
    with fused_t5(model):
        # warm-up (allocator, kernels), not timed: the same first examples for every configuration, so the timed
        # epoch below covers exactly the same examples with and without grouping
        for w in range(warmup):
            step([(w * batch_size + i) % len(pairs) for i in range(batch_size)])
        shapes.clear()
        trim_heap()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        tok = pad = ex = 0
        with RssPeak() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            for idx in timed:
                a, b = step(idx)
                tok, pad, ex = tok + a, pad + b, ex + len(idx)
            sync(device)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else (mem.peak - mem.base) / 2**20
    dims = T5Dims.from_config(model.config)
    done = [pairs[i] for idx in timed for i in idx]
    mflops = model_flops(dims, [len(p.src) for p in done], [len(p.tgt) for p in done])
    ckpt = bool(getattr(model, "is_gradient_checkpointing", False))
    hflops = hardware_flops(dims, shapes, checkpointing=ckpt)
    del opt
    trim_heap()
    return BenchRow(name, grouped, ex, len(timed), secs, cpu, tok, pad, peak, mflops, hflops)


def preset_step(name: str, device: torch.device, *, batch: int, steps: int, src_len: int = 512,
                tgt_len: int = 512, checkpointing: bool = True, bf16: bool | None = None, warmup: int = 2,
                peak_tflops: float | None = None) -> dict[str, Any]:
    """Time `steps` training steps of a random `name` model ("fredt5-1.7b", or "tiny" for checks on CPU) on
    fixed-size batches (batch x src_len -> tgt_len), after `warmup` untimed steps; a JSON-able result with step
    time, model/hardware FLOPs, MFU/HFU against the device's bf16 peak and peak memory."""
    from rsg_eval.bench.flops import device_peak, utilisation

    if steps < 1 or batch < 1:
        raise ValueError("steps and batch must be >= 1")
    model, vocab = build_model(name, device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if bf16 is None:
        from rsg_eval.models.loading import cuda_bf16_native

        bf16 = device.type == "cuda" and cuda_bf16_native()
    pairs = synthetic_pairs(batch * steps, vocab, src_len, tgt_len, fixed=True)
    row = run_config(model, pairs, batch, False, device, name=name, bf16=bf16, warmup=warmup, max_steps=steps)
    params = sum(p.numel() for p in model.parameters())
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = ("--peak-tflops", peak_tflops) if peak_tflops else (device_peak(dev_name) if device.type == "cuda"
                                                                 else None)
    step_s = row.seconds / row.steps
    out = {
        "model": name, "parameters": params, "device": dev_name, "batch": batch, "src_len": src_len,
        "tgt_len": tgt_len, "bf16": bf16, "gradient_checkpointing": checkpointing, "warmup_steps": warmup,
        "steps": row.steps, "examples": row.examples, "step_seconds": step_s,
        "examples_per_s": row.examples_per_s, "tokens_per_s": row.tokens_per_s, "peak_mib": row.peak_mb,
        "model_tflop_per_step": row.model_flops / row.steps / 1e12,
        "hardware_tflop_per_step": row.hardware_flops / row.steps / 1e12,
        "achieved_tflops": row.model_flops / row.seconds / 1e12,
        "peak": {"name": peak[0], "tflops": peak[1]} if peak else None,
        "mfu": utilisation(row.model_flops, row.seconds, peak[1] if peak else None),
        "hfu": utilisation(row.hardware_flops, row.seconds, peak[1] if peak else None),
    }
    del model
    trim_heap()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
