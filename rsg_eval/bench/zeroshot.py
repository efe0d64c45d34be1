"""`rsg bench zeroshot`: examples per second of our rank classification against naive per-choice scoring.

One randomly initialised T5 (default d_model 256, 4 encoder + 4 decoder layers, gated-GELU, untied head; built by
`rsg_eval.models.tiny.build_tiny` with overrides) and, in the same run, four ways of scoring the same inputs:

- naive:        one full encoder + decoder pass per (prompt, choice), as lm-evaluation-harness does for seq2seq;
- encoder_once: the encoder once per prompt, the decoder recomputing its cross-attention K/V for every choice;
- kv_once:      the encoder AND the decoder's cross-attention K/V once per prompt;
- fast (ours):  as kv_once, and the choices' common token prefix decoded once per prompt (`score_choices`).

Inputs are synthetic but shaped like the real tasks, made from a fixed seed:
- RuCoS-like: a passage of several hundred tokens; 15 candidate entities, each choice = the query sentence with
  the entity in place of @placeholder (the shape of prompts/rucos/fill.yaml, the default template);
- PARus-like: a short premise and question; 2 short alternatives.
Predictions of the three ways must be identical (the report says so per case); the speed is a ratio of wall times.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from rsg_eval.models.tiny import _CORPUS, build_tiny
from rsg_eval.scoring import _score, predict

BENCH_MODEL = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4)
MODES = ("naive", "encoder_once", "kv_once", "fast")

_WORDS = sorted({w.strip(".,?!:;«»—()") for w in _CORPUS.split()} - {""})
_NAME_PARTS = ("Ива", "Пет", "Сер", "Ник", "Ол", "Ан", "Мар", "Кир", "Вол", "Лев", "Сок", "Мор", "Бел", "Гор")
_NAME_ENDS = ("ов", "ин", "ский", "енко", "ова", "ина", "ев", "ук")


@dataclass
class Case:
    """One input set: prompts and their choices."""

    name: str
    prompts: list[str]
    choices: list[list[str]]


@dataclass
class CaseResult:
    name: str
    docs: int
    choices_per_doc: float
    prompt_tokens: float          # mean encoder input length
    choice_tokens: float          # mean choice length, </s> included
    seconds: dict[str, float] = field(default_factory=dict)        # wall time per mode, best of the repeats
    cpu_seconds: dict[str, float] = field(default_factory=dict)    # process CPU time per mode, best of the repeats
    docs_per_s: dict[str, float] = field(default_factory=dict)     # by wall time
    ratio_vs_naive: dict[str, float] = field(default_factory=dict)  # wall time of naive / wall time of the mode
    cpu_ratio_vs_naive: dict[str, float] = field(default_factory=dict)  # the same by CPU time (robust on a
    #                                                                     machine shared with other jobs)
    same_predictions: bool = True
    max_abs_diff: float = 0.0     # largest |log-likelihood difference| against naive, over all choices and modes


# ----------------------------------------------------------------------------------------------- inputs


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _entity(rng: random.Random) -> str:
    return rng.choice(_NAME_PARTS) + rng.choice(_NAME_PARTS).lower() + rng.choice(_NAME_ENDS)


def rucos_like(docs: int, *, passage_words: int = 200, candidates: int = 15, seed: int = 0) -> Case:
    """Passages of several hundred tokens (about 1.5 tokens per word with the tiny BPE), 15 entity choices each."""
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


# ----------------------------------------------------------------------------------------------- timing


def _time_mode(model: Any, tokenizer: Any, case: Case, mode: str,
               batch_size: int) -> tuple[float, float, list[list[float]]]:
    """(wall seconds, process CPU seconds, scores). CPU time counts only this process's work, so it is the fairer
    measure when other jobs share the cores; on a GPU only the wall time means anything."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    scores = _score(model, tokenizer, case.prompts, case.choices, batch_size=batch_size, normalize="sum",
                    calibrate=False, calibration_prompts=None, max_input_tokens=None, progress=None, mode=mode)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, scores


def run_case(model: Any, tokenizer: Any, case: Case, *, batch_size: int = 16, repeats: int = 1,
             modes: tuple[str, ...] = MODES, on_step: Callable[[str], Any] | None = None) -> CaseResult:
    """Time each mode on the case (modes interleaved per repeat, best time kept) and compare predictions."""
    enc_lens = [len(x) for x in tokenizer(case.prompts, verbose=False)["input_ids"]]
    ch_lens = [len(x) + 1 for row in case.choices for x in tokenizer(row, add_special_tokens=False)["input_ids"]]
    res = CaseResult(case.name, len(case.prompts), sum(map(len, case.choices)) / len(case.choices),
                     sum(enc_lens) / len(enc_lens), sum(ch_lens) / len(ch_lens))
    # Warm-up on two documents so one-time costs (allocator, kernels) are not charged to the first mode.
    warm = Case(case.name, case.prompts[:2], case.choices[:2])
    for mode in modes:
        _time_mode(model, tokenizer, warm, mode, batch_size)
    scores: dict[str, list[list[float]]] = {}
    for _ in range(max(1, repeats)):
        for mode in modes:
            if on_step:
                on_step(f"{case.name}: {mode}")
            secs, cpu, scores[mode] = _time_mode(model, tokenizer, case, mode, batch_size)
            res.seconds[mode] = min(res.seconds.get(mode, float("inf")), secs)
            res.cpu_seconds[mode] = min(res.cpu_seconds.get(mode, float("inf")), cpu)
    ref = scores[modes[0]]
    ref_pred = predict(ref)
    for mode in modes:
        res.docs_per_s[mode] = res.docs / res.seconds[mode]
        res.ratio_vs_naive[mode] = res.seconds[modes[0]] / res.seconds[mode]
        res.cpu_ratio_vs_naive[mode] = res.cpu_seconds[modes[0]] / max(res.cpu_seconds[mode], 1e-9)
        res.same_predictions &= predict(scores[mode]) == ref_pred
        diffs = [abs(a - b) for ra, rb in zip(scores[mode], ref) for a, b in zip(ra, rb)]
        res.max_abs_diff = max(res.max_abs_diff, max(diffs))
    return res


def run_bench(*, docs: int = 16, parus_docs: int | None = None, device: str = "cpu", batch_size: int = 16,
              repeats: int = 1, threads: int | None = None, model_overrides: dict[str, Any] | None = None,
              passage_words: int = 200, candidates: int = 15,
              on_step: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run both cases on one model; returns a JSON-able report (model facts, per-case results)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_bench(docs=docs, parus_docs=parus_docs, device=device, batch_size=batch_size, repeats=repeats,
                          model_overrides=model_overrides, passage_words=passage_words, candidates=candidates,
                          on_step=on_step)
    finally:
        torch.set_num_threads(old_threads)


def _run_bench(*, docs, parus_docs, device, batch_size, repeats, model_overrides, passage_words, candidates,
               on_step) -> dict[str, Any]:
    overrides = dict(BENCH_MODEL)
    overrides.update(model_overrides or {})
    model, tokenizer = build_tiny(**overrides)
    model.to(device)
    cases = [rucos_like(docs, passage_words=passage_words, candidates=candidates),
             parus_like(parus_docs if parus_docs is not None else docs * 8)]
    results = [run_case(model, tokenizer, c, batch_size=batch_size, repeats=repeats, on_step=on_step)
               for c in cases]
    return {
        "model": {**{k: overrides[k] for k in sorted(overrides)}, "vocab": len(tokenizer),
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32"},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "repeats": repeats,
        "torch": torch.__version__,
        "cases": [asdict(r) for r in results],
    }
