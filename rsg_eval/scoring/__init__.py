"""Rank classification: the log-likelihood of each answer choice given its prompt, for seq2seq models (FRED-T5,
T5) and decoder-only models (Llama-, Qwen-, Mistral-, GPT-2-shaped, ruGPT-3).

`score_choices` is the fast path; the model's config says which architecture it is (`is_encoder_decoder`):
- seq2seq (`_seq2seq.py`): the encoder once per prompt; all choices of a prompt decoded side by side in one
  decoder row against that prompt's encoder states and cross-attention K/V (never copied per choice), the
  choices' common token prefix once; a choice scores its tokens followed by `</s>`;
- decoder-only (`_causal.py`): the prompt's KV cache once per prompt (with the choices' common prefix), all its
  choices in one row after it; a choice scores its tokens after the prompt, lm-evaluation-harness's boundary
  convention (the whole text encoded, split after the prompt's tokens).
Prompts are sorted by length (longest first) and the results put back in input order. Log-probabilities come
from an fp32 LM head (`_common.head_logits_fp32`) whatever the model dtype. Each batch of prompts syncs with the
host once (one `.tolist()` of its per-choice sums).

`score_choices_naive` is the reference: one full forward per (prompt, choice), as lm-evaluation-harness does.
The modes in between ("encoder_once", "prompt_once": no shared prefix) exist for the tests and
`rsg bench zeroshot`'s breakdown.

Batch size and out-of-memory: `batch_size` prompts per call (the naive ways: (prompt, choice) pairs per call);
"auto" starts at 64 on a GPU (16 on CPU) and halves on out-of-memory. The size that worked is remembered per
model for the rest of the run (every later call, each task and each calibration pass, starts there), and the
memory of a failed batch is freed after the exception handler has let go of it.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any, Callable, Sequence

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.scoring import _causal, _seq2seq
from rsg_eval.scoring._common import (CutPrompts, Encoded, count_cut_prompts, cut_prompts_note, input_device,
                                      pad, shared_prefix_len)

log = logging.getLogger(__name__)

NORMALIZATIONS = ("sum", "token", "byte")
DEFAULT_CALIBRATION_PROMPT = "N/A"
AUTO_START_CUDA = 64  # first try for batch_size="auto" on a GPU; halved on each out-of-memory
AUTO_START_CPU = 16   # on CPU there is no OOM to probe; bigger batches do not help there

Progress = Callable[[int], Any]  # called with the number of prompts just finished

# model -> {(requested batch size, mode): the size that worked}. Weak keys: forgotten with the model.
_WORKED: "weakref.WeakKeyDictionary[Any, dict[tuple, int]]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------- public API


def score_choices(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int | str = 16,
    normalize: str = "sum",
    calibrate: bool = False,
    calibration_prompts: Sequence[str] | str | None = None,
    max_input_tokens: int | None = None,
    progress: Progress | None = None,
) -> list[list[float]]:
    """Log-likelihood of each choice given its prompt; `result[i][j]` scores `choices[i][j]`.

    Seq2seq: the choice's tokens followed by `</s>` under the decoder. Decoder-only: the continuation's tokens
    (see `rsg_eval.scoring._causal` for the boundary convention) after the prompt.

    batch_size: an int, or "auto" (start large, halve on out-of-memory). It bounds the prompts per model call.
        An out-of-memory error halves it and retries the same batch; finished batches are kept, and the size that
        worked is remembered for this model (`forget_batch_size` resets it). Results do not depend on it (up to
        float noise).
    normalize: "sum" (total log-likelihood), "token" (mean per scored token; `</s>` included for seq2seq) or
        "byte" (per UTF-8 byte of the choice text; Cyrillic letters are 2 bytes).
    calibrate: subtract each choice's (equally normalised) score under a content-free prompt: `calibration_prompts`
        (one per prompt, or one string for all; default "N/A"). Identical (prompt, choices) pairs are scored once.
    max_input_tokens: seq2seq: longest encoder input; decoder-only: the context, prompt + choice. Default from the
        tokenizer / config (512 for FRED). Longer prompts keep their end (and a leading special token such as
        `<LM>` or BOS) and raise a warning.
    progress: called with the number of prompts finished after each batch.
    """
    return score_in_mode(model, tokenizer, prompts, choices, batch_size=batch_size, normalize=normalize,
                  calibrate=calibrate, calibration_prompts=calibration_prompts,
                  max_input_tokens=max_input_tokens, progress=progress, mode="fast")


def score_choices_naive(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int | str = 16,
    normalize: str = "sum",
    calibrate: bool = False,
    calibration_prompts: Sequence[str] | str | None = None,
    max_input_tokens: int | None = None,
    progress: Progress | None = None,
) -> list[list[float]]:
    """The reference: same contract as `score_choices`, one full forward per (prompt, choice)."""
    return score_in_mode(model, tokenizer, prompts, choices, batch_size=batch_size, normalize=normalize,
                  calibrate=calibrate, calibration_prompts=calibration_prompts,
                  max_input_tokens=max_input_tokens, progress=progress, mode="naive")


def predict(scores: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best choice per prompt (the first one on ties)."""
    return [max(range(len(row)), key=lambda j: (row[j], -j)) for row in scores]


def is_causal(model: Any) -> bool:
    """True for a decoder-only model (its config is not encoder-decoder)."""
    return not getattr(model.config, "is_encoder_decoder", False)


def modes_for(model: Any) -> tuple[str, ...]:
    """The ways of scoring this model's architecture supports, from the reference to ours."""
    return _arch(model).MODES


def encode_causal(model: Any, tokenizer: Any, prompts: list[str], choices: list[list[str]],
                  max_input_tokens: int | None = None) -> Encoded:
    """Decoder-only token ids exactly as rank classification scores them: per prompt its ids (the tokenizer's
    BOS kept, its end kept when cut to the context), per choice its continuation ids (lm-evaluation-harness's
    boundary: the whole text encoded and split after the prompt). Causal fine-tuning trains on these ids, so
    it learns the very tokens that are scored (rsg_eval.training.finetune.causal)."""
    limit = max_input_tokens or _default_max_tokens(model, tokenizer)
    return _causal.encode(model, tokenizer, prompts, choices, limit)


def forget_batch_size(model: Any) -> None:
    """Drop the batch sizes remembered for `model` (the next "auto" call probes from the start again)."""
    _WORKED.pop(model, None)


# ----------------------------------------------------------------------------------------------- driver


def _arch(model: Any) -> Any:
    return _causal if is_causal(model) else _seq2seq


def score_in_mode(model, tokenizer, prompts, choices, *, batch_size, normalize, calibrate, calibration_prompts,
           max_input_tokens, progress, mode: str = "fast") -> list[list[float]]:
    """mode: one of `modes_for(model)`; see the module docstring."""
    prompts, choices = list(prompts), [list(c) for c in choices]
    _check_args(prompts, choices, normalize, batch_size)
    arch = _arch(model)
    if mode not in arch.MODES:
        raise RSGError(f"no scoring mode {mode!r} for this model", field="mode", expected=arch.MODES)
    if not prompts:
        return []
    limit = max_input_tokens or _default_max_tokens(model, tokenizer)
    enc = arch.encode(model, tokenizer, prompts, choices, limit)
    was_training = model.training
    model.eval()  # dropout off while scoring (e.g. validation inside fine-tuning); the mode is restored after
    try:
        raw = _run(model, enc, batch_size, progress, mode, arch.BATCH_FNS[mode])
        scores = _normalize(raw, enc.choices, choices, normalize)
        if calibrate:
            base = _calibration_scores(model, tokenizer, prompts, choices, calibration_prompts, arch,
                                       batch_size=batch_size, normalize=normalize, limit=limit, mode=mode)
            scores = [[s - b for s, b in zip(row, brow)] for row, brow in zip(scores, base)]
    finally:
        model.train(was_training)
    return scores


def _check_args(prompts: list[str], choices: list[list[str]], normalize: str, batch_size: int | str) -> None:
    if len(prompts) != len(choices):
        raise RSGError(f"{len(prompts)} prompts but {len(choices)} choice lists", field="choices")
    if normalize not in NORMALIZATIONS:
        raise RSGError(f"unknown normalisation {normalize!r}", field="normalize", expected=NORMALIZATIONS)
    if batch_size != "auto" and not (isinstance(batch_size, int) and batch_size >= 1):
        raise RSGError(f"bad batch size {batch_size!r}", field="batch_size", expected="a positive int or 'auto'")
    for i, row in enumerate(choices):
        if not row:
            raise RSGError(f"prompt {i} has no answer choices", field="choices")


def _calibration_scores(model, tokenizer, prompts, choices, calibration_prompts, arch, *, batch_size, normalize,
                        limit, mode) -> list[list[float]]:
    """Scores under the content-free prompts, each distinct (prompt, choices) pair scored once."""
    if calibration_prompts is None or isinstance(calibration_prompts, str):
        cal = [calibration_prompts or DEFAULT_CALIBRATION_PROMPT] * len(prompts)
    else:
        cal = list(calibration_prompts)
        if len(cal) != len(prompts):
            raise RSGError(f"{len(cal)} calibration prompts for {len(prompts)} prompts", field="calibration_prompts")
    keys = [(p, tuple(c)) for p, c in zip(cal, choices)]
    unique = list(dict.fromkeys(keys))
    enc = arch.encode(model, tokenizer, [k[0] for k in unique], [list(k[1]) for k in unique], limit)
    raw = _run(model, enc, batch_size, None, mode, arch.BATCH_FNS[mode])
    normed = _normalize(raw, enc.choices, [list(k[1]) for k in unique], normalize)
    by_key = dict(zip(unique, normed))
    return [by_key[k] for k in keys]


def _default_max_tokens(model: Any, tokenizer: Any) -> int:
    from rsg_eval.models.loading import max_input_tokens

    return max_input_tokens(tokenizer, getattr(model, "config", None))


def _normalize(raw: list[list[float]], choice_ids: list[list[list[int]]], texts: list[list[str]],
               how: str) -> list[list[float]]:
    out = []
    for row, ids_row, text_row in zip(raw, choice_ids, texts):
        if how == "sum":
            out.append(list(row))
        elif how == "token":
            out.append([s / len(ids) for s, ids in zip(row, ids_row)])
        else:  # byte
            out.append([s / max(1, len(t.encode("utf-8"))) for s, t in zip(row, text_row)])
    return out


# ----------------------------------------------------------------------------------------------- batching + OOM


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    # CUDA/MPS say "out of memory"; the CPU allocator says "can't allocate memory".
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _start_batch_size(model: Any, batch_size: int | str, mode: str) -> int:
    worked = _WORKED.get(model, {}).get((batch_size, mode))
    if worked:
        return worked
    if batch_size != "auto":
        return int(batch_size)
    return AUTO_START_CUDA if input_device(model).type == "cuda" else AUTO_START_CPU


def _remember(model: Any, batch_size: int | str, mode: str, bs: int) -> None:
    try:
        _WORKED.setdefault(model, {})[(batch_size, mode)] = bs
    except TypeError:  # a model object that cannot be weakly referenced: nothing remembered
        pass


def _free_memory() -> None:
    # Called after the except block: the exception, its traceback and the failed batch's frames are gone, so
    # their tensors are unreferenced now; collect what reference cycles still hold, then hand the cached blocks
    # back so the smaller retry can use them.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(model: Any, enc: Encoded, batch_size: int | str, progress: Progress | None, mode: str,
         batch_fn: Callable[..., torch.Tensor]) -> list[list[float]]:
    """Score every (prompt, choice); returns the summed log-likelihood per choice, in input order.

    Prompts go longest first, so an out-of-memory shows up on the first batch. On OOM the batch size halves and
    the same batch is retried; results of finished batches are kept.
    """
    n = len(enc.prompts)
    order = sorted(range(n), key=lambda i: (-len(enc.prompts[i]), i))
    results: list[list[float] | None] = [None] * n
    bs = _start_batch_size(model, batch_size, mode)
    pos = 0
    while pos < n:
        idx = order[pos:pos + bs]
        failed = False
        try:
            with torch.inference_mode():
                sums = batch_fn(model, [enc.prompts[i] for i in idx], [enc.choices[i] for i in idx], bs)
                flat = sums.tolist()  # (n_choices,) -> host: the batch's one sync
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_oom(exc):
                raise
            failed = True
        if failed:
            _free_memory()  # here, not in the handler, where the traceback still held the failed batch
            if bs == 1:
                raise RSGError("out of memory even at batch size 1: use a smaller model, bf16, a shorter "
                               "max input length, or another device", field="batch_size")
            new = max(1, bs // 2)
            (log.info if batch_size == "auto" else log.warning)("out of memory at batch size %d; retrying with %d",
                                                                bs, new)
            bs = new
            continue
        _remember(model, batch_size, mode, bs)
        k = 0
        for i in idx:
            m = len(enc.choices[i])
            results[i] = flat[k:k + m]
            k += m
        pos += len(idx)
        if progress is not None:
            progress(len(idx))
    return results  # type: ignore[return-value]


__all__ = ["score_choices", "score_choices_naive", "predict", "is_causal", "modes_for", "forget_batch_size",
           "count_cut_prompts", "cut_prompts_note", "CutPrompts", "NORMALIZATIONS", "DEFAULT_CALIBRATION_PROMPT",
           "shared_prefix_len", "pad"]
