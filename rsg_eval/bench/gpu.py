"""`rsg bench gpu`: the one command to run the day a GPU is there. At FRED-T5-1.7B size with random weights
(FREDT5_NOTES.md 1.1), in about five minutes on one H100/H200, it measures:

  finetune      one `rsg finetune` training step at batch 12 x 512 -> 512, bf16 autocast, gradient checkpointing,
                fused AdamW: step time, model/hardware FLOPs, MFU/HFU, peak memory (rsg_eval.bench.finetune);
  hierarchical  one `rsg train-hmtl` optimizer step: a batch of 12 x 512 of every one of the eight tasks (targets
                of 512 for the five generation tasks), gradient accumulation 1, checkpointing: time, MFU, memory;
  zeroshot      rank classification at the RuCoS shape (passages near 512 tokens, 15 candidate sentences): prompts/s
                and peak memory, ours against naive per-choice scoring, and whether both predict the same;
  early_exit    topic + NER inference through Block 1 (6 of 24 layers) against the full encoder, batch 16 x 512.

Every timer ends after `torch.cuda.synchronize()`. A section that the GPU cannot hold (its memory estimate is above
the device's total, or it runs out of memory) is skipped with a line saying so; so is one that would start after
the time budget. The result is one JSON file and one table (also written as Markdown next to the JSON).

`--tiny` runs every section at tiny size on the CPU in seconds: the command's own test, and a check that all its
parts still fit together.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rsg_eval.bench.flops import T5Dims, device_peak, forward_flops, utilisation
from rsg_eval.bench.timing import Stopwatch, sync

SECTIONS = ("finetune", "hierarchical", "zeroshot", "early_exit")
# Memory each section needs at full size (GiB, rounded up from the CPU audit of issue 15 and the states: fp32
# weights + gradients + AdamW moments of 1.74 B parameters are 26 GiB before any activation).
NEEDS_GIB = {"finetune": 34, "hierarchical": 36, "zeroshot": 14, "early_exit": 6}


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run of the command: full (FRED-T5-1.7B) or tiny."""

    model: str                    # rsg_eval.bench.finetune.build_model name
    batch: int
    src_len: int
    tgt_len: int
    steps: int                    # timed fine-tuning steps (after `warmup`)
    warmup: int
    hmtl_steps: int
    zs_docs: int
    zs_passage_words: int
    zs_candidates: int
    zs_batch: int
    ee: dict[str, int]            # rsg_eval.bench.hmtl.run_bench shape
    ee_repeats: int


FULL = Sizes(model="fredt5-1.7b", batch=12, src_len=512, tgt_len=512, steps=5, warmup=2, hmtl_steps=2,
             zs_docs=32, zs_passage_words=240, zs_candidates=15, zs_batch=16,
             ee=dict(d_model=1536, d_ff=4096, num_heads=24, layers=24, split=6, batch=16, seq_len=512),
             ee_repeats=5)
TINY = Sizes(model="tiny", batch=2, src_len=32, tgt_len=8, steps=1, warmup=1, hmtl_steps=1,
             zs_docs=2, zs_passage_words=20, zs_candidates=3, zs_batch=4,
             ee=dict(d_model=32, d_ff=64, num_heads=4, layers=4, split=1, batch=2, seq_len=16), ee_repeats=1)


def _bf16_native() -> bool:
    from rsg_eval.models.loading import cuda_bf16_native

    return cuda_bf16_native()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------- sections

def section_finetune(s: Sizes, device: torch.device, peak: float | None) -> dict[str, Any]:
    from rsg_eval.bench.finetune import preset_step

    r = preset_step(s.model, device, batch=s.batch, steps=s.steps, src_len=s.src_len, tgt_len=s.tgt_len,
                    checkpointing=True, warmup=s.warmup, peak_tflops=peak)
    return {"step_seconds": r["step_seconds"], "examples_per_s": r["examples_per_s"], "mfu": r["mfu"],
            "hfu": r["hfu"], "peak_mib": r["peak_mib"] if device.type == "cuda" else None, "model_tflop_per_step": r["model_tflop_per_step"],
            "hardware_tflop_per_step": r["hardware_tflop_per_step"], "achieved_tflops": r["achieved_tflops"],
            "shape": f"batch {s.batch} x {s.src_len} -> {s.tgt_len}, bf16 {r['bf16']}, checkpointing"}


def hierarchical_step_flops(d: T5Dims, split: int, batch: int, src: int, tgt: int, tasks: list[str]) -> int:
    """Model FLOPs of one hierarchical optimizer step (one batch per task): the generation tasks run the whole
    model, NLI the whole encoder, topic and NER Block 1 only (heads and adapters are negligible and left out)."""
    from rsg_eval.corpus.labels import GEN_TASKS

    total = 0
    for t in tasks:
        if t in GEN_TASKS:
            total += 3 * forward_flops(d, src, tgt)
        elif t == "nli":
            total += 3 * forward_flops(d, src, 0, decoder=False)
        else:
            total += 3 * forward_flops(d, src, 0, encoder_layers=split, decoder=False)
    return batch * total


def section_hierarchical(s: Sizes, device: torch.device, peak: float | None) -> dict[str, Any]:
    """One optimizer step exactly as `rsg train-hmtl` runs it (rsg_eval.training.hmtl.train.task_loss per task, backward,
    clipping, AdamW), on random batches of fixed shape."""
    from rsg_eval.training.hmtl.dataset import collate
    from rsg_eval.corpus.labels import TASKS
    from rsg_eval.training.hmtl.train import TrainConfig, task_loss
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.bench.finetune import build_model

    ner_loss = TrainConfig.__dataclass_fields__["ner_loss"].default  # what `rsg train-hmtl` trains by default
    base, vocab = build_model(s.model, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HierarchicalT5.from_base(base, split="0.25", **head_labels()).to(device).train()
    model.seq2seq.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.seq2seq.config.use_cache = False
    bf16 = device.type == "cuda" and _bf16_native()
    g = torch.Generator().manual_seed(0)
    n_mc, n_ner = len(model.config.mc_labels), len(model.config.ner_labels)
    b, S, T = s.batch, s.src_len, s.tgt_len

    def ints(n: int, lo: int, hi: int) -> list[int]:
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    def batch(task: str) -> Any:
        # columnar rows as the tokenised corpus gives them (dataset.py), padded by the trainer's own collate
        rows = {"input_ids": [ints(S, 5, vocab) for _ in range(b)], "labels": [ints(T, 5, vocab) for _ in range(b)],
                "cls": ints(b, 0, n_mc if task == "mc" else 3), "ner_tag": [ints(S, 0, n_ner + 1) for _ in range(b)],
                "ner_bits": [ints(S, 0, 2 ** min(n_ner, 20)) for _ in range(b)]}
        return collate(rows, task, pad_id=0, n_ner=n_ner, device=device, ner_loss=ner_loss)

    batches = [batch(t) for t in TASKS]
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(params, lr=1e-6)
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        for bt in batches:
            with cast():
                loss = task_loss(model, bt, ner_loss)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, AdamW states
    _reset_peak(device)
    with Stopwatch(device) as sw:
        for _ in range(s.hmtl_steps):
            step()
    secs = sw.seconds / s.hmtl_steps
    flops = hierarchical_step_flops(T5Dims.from_config(base.config), model.config.split_layer, b, S, T, list(TASKS))
    out = {"step_seconds": secs, "examples_per_s": b * len(TASKS) / secs, "model_tflop_per_step": flops / 1e12,
           "achieved_tflops": flops / secs / 1e12, "mfu": utilisation(flops, secs, peak),
           "peak_mib": _peak_mib(device),
           "shape": f"{len(TASKS)} tasks x batch {b} x {S} (generation targets {T}), bf16 {bf16}, checkpointing"}
    del model, base, opt, batches
    return out


def _zeroshot_compare(model: Any, tokenizer: Any, case: Any, batch_size: int, device: torch.device
                      ) -> dict[str, Any]:
    """Naive vs our scoring on one case through the scoring bench's `compare_ways` (rsg_eval.bench.zeroshot: it
    times each way with synchronised clocks, checks the predictions and measures each way's peak memory):
    {"naive": way, "ours": way, "same_predictions", "ways": {way: {seconds, prompts_per_s, peak_mib}}}."""
    from rsg_eval.bench.zeroshot import compare_ways
    from rsg_eval.scoring import modes_for

    modes = modes_for(model)            # from the reference (naive) to ours
    ways = (modes[0], modes[-1])
    res = compare_ways(model, tokenizer, case, ways=ways, batch_size=batch_size, repeats=1)
    return {"naive": ways[0], "ours": ways[1], "same_predictions": bool(res["same_predictions"]),
            "ways": {w: {"seconds": r["seconds"], "prompts_per_s": r["prompts_per_s"],
                         "peak_mib": (r["peak_memory_bytes"] / 2**20 if r.get("peak_memory_bytes") is not None
                                      else None)}
                     for w, r in res["ways"].items()}}


def section_zeroshot(s: Sizes, device: torch.device, peak: float | None) -> dict[str, Any]:
    from rsg_eval.bench.zeroshot import rucos_like
    from rsg_eval.models.tiny import build_tiny_tokenizer
    from rsg_eval.bench.finetune import build_model

    model, _ = build_model(s.model, device)
    model.eval()
    if device.type == "cuda" and _bf16_native():
        model.to(torch.bfloat16)  # as `rsg zeroshot --dtype auto` loads it on such a GPU
    tok = build_tiny_tokenizer()
    case = rucos_like(s.zs_docs, passage_words=s.zs_passage_words, candidates=s.zs_candidates)
    lens = [len(x) for x in tok(case.prompts, verbose=False)["input_ids"]]
    with torch.no_grad():
        r = _zeroshot_compare(model, tok, case, s.zs_batch, device)
    naive, ours = r["ways"][r["naive"]], r["ways"][r["ours"]]
    out = {"prompts_per_s": {"naive": naive["prompts_per_s"], "ours": ours["prompts_per_s"]},
           "speedup": naive["seconds"] / ours["seconds"],
           "peak_mib": {"naive": naive["peak_mib"], "ours": ours["peak_mib"]},
           "same_predictions": r["same_predictions"], "dtype": str(next(model.parameters()).dtype),
           "shape": f"{s.zs_docs} RuCoS-like prompts of {sum(lens) / len(lens):.0f} tokens x {s.zs_candidates} "
                    f"candidates, batch {s.zs_batch}"}
    del model
    return out


def section_early_exit(s: Sizes, device: torch.device, peak: float | None) -> dict[str, Any]:
    from rsg_eval.bench.hmtl import run_bench

    bf16 = device.type == "cuda" and _bf16_native()
    r = run_bench(**s.ee, repeats=s.ee_repeats, device=str(device), bf16=bf16, peak_tflops=peak)
    return {"speedup": r["speedup"], "same_predictions": r["same_predictions"],
            "seconds": r["seconds"], "mfu": r["mfu"], "peak_mib": r.get("peak_memory_mib"),
            "shape": f"batch {r['batch']} x {r['seq_len']}, Block 1 = {r['model']['split']} of "
                     f"{r['model']['layers']} layers, bf16 {bf16}"}


RUNNERS: dict[str, Callable[[Sizes, torch.device, float | None], dict[str, Any]]] = {
    "finetune": section_finetune, "hierarchical": section_hierarchical, "zeroshot": section_zeroshot,
    "early_exit": section_early_exit}


# ----------------------------------------------------------------------------------------------- the run

def skip_reason(section: str, *, tiny: bool, total_gib: float | None, used_s: float, budget_s: float) -> str | None:
    """Why a section is skipped before it starts (None: run it)."""
    if used_s > budget_s:
        return f"the time budget of {budget_s:.0f} s was spent ({used_s:.0f} s) before this section"
    if not tiny and total_gib is not None and total_gib < NEEDS_GIB[section]:
        return f"needs about {NEEDS_GIB[section]} GiB of GPU memory; this GPU has {total_gib:.0f} GiB"
    return None


def run(*, tiny: bool = False, device: str | None = None, sections: tuple[str, ...] = SECTIONS,
        budget_s: float = 600.0, peak_tflops: float | None = None,
        on_section: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run the sections; a JSON-able report. Each section: {"status": "ok", ...figures} or {"status": "skipped",
    "why": ...}."""
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tiny and device is None:
        dev = torch.device("cpu")
    sizes = TINY if tiny else FULL
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    total_gib = torch.cuda.get_device_properties(dev).total_memory / 2**30 if dev.type == "cuda" else None
    known = (("--peak-tflops", peak_tflops) if peak_tflops else (device_peak(name) if dev.type == "cuda" else None))
    report: dict[str, Any] = {
        "device": name, "memory_gib": total_gib, "size": "tiny" if tiny else "fredt5-1.7b",
        "torch": torch.__version__, "peak": {"name": known[0], "tflops": known[1]} if known else None,
        "sections": {}}
    t_start = time.perf_counter()
    for sec in sections:
        if on_section:
            on_section(sec)
        why = skip_reason(sec, tiny=tiny, total_gib=total_gib, used_s=time.perf_counter() - t_start,
                          budget_s=budget_s)
        if why:
            report["sections"][sec] = {"status": "skipped", "why": why}
            continue
        _free(dev)
        t0 = time.perf_counter()
        try:
            res = RUNNERS[sec](sizes, dev, known[1] if known else None)
            res = {"status": "ok", **res}
        except torch.cuda.OutOfMemoryError:
            res = {"status": "skipped", "why": f"out of GPU memory ({total_gib:.0f} GiB) at this size"}
        res["wall_seconds"] = time.perf_counter() - t0
        report["sections"][sec] = res
        _free(dev)
    report["total_seconds"] = time.perf_counter() - t_start
    return report


def _pct(x: Any) -> str:
    return f"{x:.1%}" if isinstance(x, (int, float)) else "-"


def _mib(x: Any) -> str:
    return f"{x / 1024:.1f} GiB" if isinstance(x, (int, float)) else "-"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """[section, what, figure, MFU, peak memory, shape] rows of the report, for the console and the Markdown."""
    rows = []
    for sec, r in report["sections"].items():
        if r.get("status") != "ok":
            rows.append([sec, "skipped", r.get("why", ""), "-", "-", ""])
            continue
        if sec == "finetune":
            rows.append([sec, "training step", f"{r['step_seconds']:.3f} s ({r['examples_per_s']:.1f} ex/s)",
                         f"{_pct(r['mfu'])} (HFU {_pct(r['hfu'])})", _mib(r["peak_mib"]), r["shape"]])
        elif sec == "hierarchical":
            rows.append([sec, "optimizer step, all tasks", f"{r['step_seconds']:.3f} s", _pct(r["mfu"]),
                         _mib(r["peak_mib"]), r["shape"]])
        elif sec == "zeroshot":
            p = r["prompts_per_s"]
            same = "same predictions" if r["same_predictions"] else "PREDICTIONS DIFFER"
            rows.append([sec, "ours vs naive", f"{p['ours']:.2f} vs {p['naive']:.2f} prompts/s "
                                               f"({r['speedup']:.1f}x, {same})", "-",
                         f"{_mib(r['peak_mib']['ours'])} vs {_mib(r['peak_mib']['naive'])}", r["shape"]])
        else:
            same = "same predictions" if r["same_predictions"] else "PREDICTIONS DIFFER"
            rows.append([sec, "Block 1 vs full encoder", f"{r['speedup']:.2f}x ({same})",
                         _pct((r.get("mfu") or {}).get("block1")), _mib(r["peak_mib"]), r["shape"]])
    return rows


HEADER = ["section", "what", "figure", "MFU", "peak memory", "shape"]


def markdown(report: dict[str, Any]) -> str:
    from rsg_eval.bench.flops import peak_line

    peak = report["peak"]
    lines = [f"# rsg bench gpu: {report['device']} ({report['size']}, torch {report['torch']})", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(report)]
    lines += ["", peak_line(report["device"], (peak["name"], peak["tflops"]) if peak else None),
              f"total {report['total_seconds']:.0f} s", ""]
    return "\n".join(lines)
