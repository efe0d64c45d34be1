"""`rsg bench zeroshot`: prompts per second and peak memory of our rank classification against naive scoring.

One randomly initialised model per run, of either architecture, and in the same run every way of scoring the same
inputs (`rsg_eval.scoring.modes_for(model)`):

seq2seq (`--arch seq2seq`, a T5 built by `rsg_eval.models.tiny.build_tiny`: d_model 256, 4 + 4 layers, gated-GELU,
untied head):
- naive:        one full encoder + decoder pass per (prompt, choice), as lm-evaluation-harness does;
- encoder_once: the encoder once per prompt; transformers' decoder per (prompt, choice), the encoder states copied
                per pair and the cross-attention K/V projected per pair (the path for non-T5 seq2seq models);
- prompt_once:  the encoder once per prompt, every choice of a prompt in one decoder row against that prompt's
                states and K/V (nothing of the prompt's length copied per choice);
- fast (ours):  as prompt_once, and the choices' common token prefix decoded once per prompt (`score_choices`).
decoder-only (`--arch causal`, a Llama built by `build_tiny_causal`: hidden 256, 4 layers):
- naive:        one forward over prompt + choice per (prompt, choice), as lm-evaluation-harness does;
- prompt_once:  the prompt's KV cache once per prompt, every choice of a prompt in one row after it;
- fast (ours):  as prompt_once, with the choices' common prefix in the cached context.

Inputs are synthetic but shaped like the real tasks, made from a fixed seed:
- RuCoS-like: a passage of several hundred tokens; 15 candidate entities, each choice = the query sentence with
  the entity in place of @placeholder (the shape of prompts/rucos/fill.yaml, the default template);
- PARus-like: a short premise and question; 2 short alternatives.

Timing: every timer is synchronised with the device (torch.cuda.synchronize on a GPU). Each way runs once untimed
(warm-up), then `repeats` timed runs interleaved across the ways; the best is kept. Peak memory is measured in a
separate untimed run per way (the whole case at the batch size; and one prompt with all its choices in one call, the
comparison per prompt, since the batch size counts prompts for ours and (prompt, choice) pairs for the naive ways):
on a GPU, torch.cuda.max_memory_allocated above what was allocated before the run
(weights excluded); on CPU, the peak of the bytes held by tensors allocated during the run, from torch.profiler's
memory events (weights excluded; allocator caching and Python objects are not counted).

`compare_ways` is the entry point for other benchmarks (`rsg bench gpu` calls it at the RuCoS shape).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rsg_eval.models.tiny import TINY_CORPUS, build_tiny, build_tiny_causal
from rsg_eval.scoring import score_in_mode, modes_for, predict

BENCH_MODEL = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4)
BENCH_CAUSAL_MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4)
ARCHS = ("seq2seq", "causal")
MEMORY_CUDA = "torch.cuda.max_memory_allocated during the run, above the allocation before it (weights excluded)"
MEMORY_CPU = ("peak bytes held by tensors allocated during the run, from torch.profiler memory events "
              "(weights excluded)")

_WORDS = sorted({w.strip(".,?!:;«»—()") for w in TINY_CORPUS.split()} - {""})
_NAME_PARTS = ("Ива", "Пет", "Сер", "Ник", "Ол", "Ан", "Мар", "Кир", "Вол", "Лев", "Сок", "Мор", "Бел", "Гор")
_NAME_ENDS = ("ов", "ин", "ский", "енко", "ова", "ина", "ев", "ук")


@dataclass
class Case:
    """One input set: prompts and their choices."""

    name: str
    prompts: list[str]
    choices: list[list[str]]


# ----------------------------------------------------------------------------------------------- inputs


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _entity(rng: random.Random) -> str:
    return rng.choice(_NAME_PARTS) + rng.choice(_NAME_PARTS).lower() + rng.choice(_NAME_ENDS)


def rucos_like(docs: int, *, passage_words: int = 200, candidates: int = 15, seed: int = 0) -> Case:
    """Passages of several hundred tokens (about 1.5 tokens per word with the tiny BPE), `candidates` entity
    choices each (the query sentence with the entity filled in)."""
    rng = random.Random(seed)
    prompts, choices = [], []
    for _ in range(docs):
        ents = list(dict.fromkeys(_entity(rng) for _ in range(candidates * 3)))[:candidates]
        sents = []
        while sum(len(s.split()) for s in sents) < passage_words:
            s = _sentence(rng, rng.randint(8, 16))
            sents.append(s[:-1] + " " + rng.choice(ents) + ".")
        query = _sentence(rng, 12)[:-1] + " @placeholder " + _sentence(rng, 5).lower()
        prompts.append("<LM>" + " ".join(sents))
        choices.append([query.replace("@placeholder", e) for e in ents])
    return Case("RuCoS-like", prompts, choices)


def parus_like(docs: int, *, seed: int = 1) -> Case:
    """A short premise and question, two short alternatives."""
    rng = random.Random(seed)
    prompts, choices = [], []
    for _ in range(docs):
        question = rng.choice(("Что было причиной?", "Что произошло в результате?"))
        prompts.append("<LM>" + _sentence(rng, rng.randint(5, 9)) + "\n" + question)
        choices.append([_sentence(rng, rng.randint(3, 6)), _sentence(rng, rng.randint(3, 6))])
    return Case("PARus-like", prompts, choices)


# ----------------------------------------------------------------------------------------------- measuring


def _device_of(model: Any) -> torch.device:
    return model.get_input_embeddings().weight.device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _score_way(model: Any, tokenizer: Any, case: Case, way: str, batch_size: int) -> list[list[float]]:
    return score_in_mode(model, tokenizer, case.prompts, case.choices, batch_size=batch_size, normalize="sum",
                  calibrate=False, calibration_prompts=None, max_input_tokens=None, progress=None, mode=way)


def _time_way(model: Any, tokenizer: Any, case: Case, way: str, batch_size: int) -> tuple[float, float, list]:
    """(wall seconds, process CPU seconds, scores), the timer synchronised with the device at both ends. CPU
    time counts only this process's work, the fairer measure when other jobs share the cores; on a GPU only the
    wall time means anything."""
    dev = _device_of(model)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    scores = _score_way(model, tokenizer, case, way, batch_size)
    _sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0, scores


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None, str]:
    """Run `fn()` once; return (its result, peak bytes it allocated above the start, what was measured)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        out = fn()
        _sync(device)
        return out, int(torch.cuda.max_memory_allocated(device) - start), MEMORY_CUDA
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler logs a line to stderr at start and at stop
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # a torch without these profiler internals: no figure rather than a wrong one
        return out, None, MEMORY_CPU
    held = peak = 0
    for _, nbytes in sorted(events):
        held += nbytes
        peak = max(peak, held)
    return out, int(peak), MEMORY_CPU


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ log lines bypass Python's sys.stderr) for the profiler's start and stop."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def case_shape(tokenizer: Any, case: Case) -> dict[str, Any]:
    enc = [len(x) for x in tokenizer(case.prompts, verbose=False)["input_ids"]]
    ch = [len(x) for row in case.choices for x in tokenizer(row, add_special_tokens=False)["input_ids"]]
    return {"case": case.name, "prompts": len(case.prompts),
            "choices_per_prompt": sum(map(len, case.choices)) / len(case.choices),
            "prompt_tokens": sum(enc) / len(enc), "choice_tokens": sum(ch) / len(ch)}


def compare_ways(model: Any, tokenizer: Any, case: Case, *, ways: Sequence[str] | None = None,
                 batch_size: int = 16, repeats: int = 1, memory: bool = True, warmup: bool = True,
                 on_step: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Time each way of scoring `case` on a loaded model; compare their predictions; measure peak memory.

    model, tokenizer: any model `score_choices` takes (seq2seq or decoder-only), on its device, in its dtype.
    case: a `Case` (`rucos_like(docs, passage_words=..., candidates=...)` gives the RuCoS shape).
    ways: names from `rsg_eval.scoring.modes_for(model)`; default all of them. The first is the reference for
        the ratios and the prediction check (keep "naive" first).
    batch_size: the same for every way (prompts per call; the naive ways: pairs per call).
    repeats: timed runs per way, interleaved across ways, best kept (after one untimed warm-up if `warmup`).
    memory: also run each way twice more, untimed, to measure its peak memory (see `peak_memory`): on the
        whole case at `batch_size`, and on the first prompt alone with all its choices in one call.

    Returns a JSON-able dict:
        {"case", "prompts", "choices_per_prompt", "prompt_tokens", "choice_tokens",   # the input's shape
         "batch_size", "device", "dtype",
         "ways": {way: {"seconds", "cpu_seconds", "prompts_per_s", "ratio_vs_naive", "cpu_ratio_vs_naive",
                        "peak_memory_bytes": the run above (None when not measured),
                        "peak_memory_one_prompt_bytes": the case's first prompt alone, all its choices in one
                            call (batch size = its number of choices), the fair per-prompt comparison: the
                            same batch size means prompts per call to ours, pairs per call to the naive ways}},
         "memory_measure": what peak_memory_bytes means on this device,
         "same_predictions": bool (every way picks the same choice as the first way for every prompt),
         "max_abs_diff": largest |log-likelihood difference| against the first way}
    """
    ways = list(ways or modes_for(model))
    dev = _device_of(model)
    res: dict[str, Any] = {**case_shape(tokenizer, case), "batch_size": batch_size, "device": str(dev),
                           "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
                           "ways": {w: {} for w in ways}, "memory_measure": None}
    if warmup:  # one-time costs (allocator, kernels, tokenizer caches) are not charged to the first way
        small = Case(case.name, case.prompts[:2], case.choices[:2])
        for way in ways:
            _score_way(model, tokenizer, small, way, batch_size)
    scores: dict[str, list[list[float]]] = {}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(max(1, repeats)):
        for way in ways:
            if on_step:
                on_step(f"{case.name}: {way}")
            secs, cpu, scores[way] = _time_way(model, tokenizer, case, way, batch_size)
            old = best.get(way, (float("inf"), float("inf")))
            best[way] = (min(old[0], secs), min(old[1], cpu))
    ref = ways[0]
    res["same_predictions"] = all(predict(scores[w]) == predict(scores[ref]) for w in ways)
    res["max_abs_diff"] = max(abs(a - b) for w in ways for ra, rb in zip(scores[w], scores[ref])
                              for a, b in zip(ra, rb))
    for way in ways:
        secs, cpu = best[way]
        row = res["ways"][way]
        row.update(seconds=secs, cpu_seconds=cpu, prompts_per_s=len(case.prompts) / secs,
                   ratio_vs_naive=best[ref][0] / secs, cpu_ratio_vs_naive=best[ref][1] / max(cpu, 1e-9),
                   peak_memory_bytes=None)
        row["peak_memory_one_prompt_bytes"] = None
        if memory:
            if on_step:
                on_step(f"{case.name}: {way} (memory)")
            _, row["peak_memory_bytes"], res["memory_measure"] = peak_memory(
                lambda way=way: _score_way(model, tokenizer, case, way, batch_size), dev)
            # One prompt with all its choices in one call, whichever way: what scoring a prompt holds at once.
            one = Case(case.name, case.prompts[:1], case.choices[:1])
            _, row["peak_memory_one_prompt_bytes"], _ = peak_memory(
                lambda way=way: _score_way(model, tokenizer, one, way, len(one.choices[0])), dev)
    return res


# ----------------------------------------------------------------------------------------------- the command's run


def build_bench_model(arch: str = "seq2seq", overrides: dict[str, Any] | None = None) -> tuple[Any, Any, dict]:
    """The benchmark's random model of `arch`: (model, tokenizer, its shape for the report)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    shape = dict(BENCH_MODEL if arch == "seq2seq" else BENCH_CAUSAL_MODEL)
    shape.update(overrides or {})
    model, tokenizer = (build_tiny if arch == "seq2seq" else build_tiny_causal)(**shape)
    return model, tokenizer, shape


def run_bench(*, arch: str = "seq2seq", docs: int = 16, parus_docs: int | None = None, device: str = "cpu",
              batch_size: int = 16, repeats: int = 1, threads: int | None = None,
              model_overrides: dict[str, Any] | None = None, passage_words: int = 200, candidates: int = 15,
              memory: bool = True, on_step: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Both cases on one random model of `arch`; returns a JSON-able report (model facts, per-case results)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        model, tokenizer, shape = build_bench_model(arch, model_overrides)
        model.to(device)
        cases = [rucos_like(docs, passage_words=passage_words, candidates=candidates),
                 parus_like(parus_docs if parus_docs is not None else docs * 8)]
        results = [compare_ways(model, tokenizer, c, batch_size=batch_size, repeats=repeats, memory=memory,
                                on_step=on_step) for c in cases]
        return {
            "arch": arch,
            "model": {**{k: shape[k] for k in sorted(shape)}, "model_type": model.config.model_type,
                      "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
                      "dtype": "float32"},
            "device": str(device),
            "threads": torch.get_num_threads(),
            "batch_size": batch_size,
            "repeats": repeats,
            "torch": torch.__version__,
            "cases": results,
        }
    finally:
        torch.set_num_threads(old_threads)
