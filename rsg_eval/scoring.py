"""Rank classification for seq2seq models: the log-likelihood of each answer choice under the decoder.

`score_choices` is the fast path. For a batch of prompts it
1. runs the encoder ONCE per prompt (lm-evaluation-harness re-encodes the prompt for every choice);
2. computes every decoder layer's cross-attention keys and values ONCE per prompt (they depend only on the
   encoder output, so they are the same for every choice) and hands them to the decoder through a pre-filled
   `EncoderDecoderCache`, gathered per (prompt, choice) pair, so the decoder skips the K/V projections;
3. runs the decoder on the choices only (teacher forcing), batched, and sums the log-probabilities of the choice
   tokens followed by `</s>`.
Prompts are sorted by length (longest first) and the results are put back in input order.

`score_choices_naive` is the reference: one full forward pass (encoder + decoder) per (prompt, choice) pair, as
lm-evaluation-harness does for seq2seq models. Tests check the two agree; `rsg bench zeroshot` times them.

Conventions (both paths): the prompt is tokenised as the tokenizer does by default (T5's sentencepiece appends
`</s>`, FRED's GPT-2 BPE appends nothing: each model sees what it was trained on); a choice is tokenised without
special tokens and the model's eos id (`config.eos_token_id`, else the tokenizer's) is appended explicitly, because
FRED's tokenizer never appends it. The decoder input is `decoder_start_token_id` followed by the choice tokens
shifted right. Log-probabilities are computed in fp32 whatever the model dtype.
"""

from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rsg_eval.errors import RSGError

log = logging.getLogger(__name__)

NORMALIZATIONS = ("sum", "token", "byte")
DEFAULT_CALIBRATION_PROMPT = "N/A"
AUTO_START_CUDA = 64  # first try for batch_size="auto" on a GPU; halved on each out-of-memory
AUTO_START_CPU = 16   # on CPU there is no OOM to probe; bigger batches do not help there

Progress = Callable[[int], Any]  # called with the number of prompts just finished


@dataclass
class _Encoded:
    """Token ids for one call: prompt ids (truncated) and, per prompt, each choice's ids ending in eos."""

    prompts: list[list[int]]
    choices: list[list[list[int]]]


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
    """Log-likelihood of each choice (followed by `</s>`) given its prompt; `result[i][j]` scores `choices[i][j]`.

    batch_size: an int, or "auto" (start large, halve on out-of-memory, re-detected on every call). It bounds both
        the prompts per encoder call and the (prompt, choice) pairs per decoder call. An out-of-memory error halves
        it and retries the same batch; finished batches are kept. Results do not depend on it (up to float noise).
    normalize: "sum" (total log-likelihood), "token" (mean per choice token, `</s>` included) or "byte" (per UTF-8
        byte of the choice text; Cyrillic letters are 2 bytes).
    calibrate: subtract each choice's (equally normalised) score under a content-free prompt: `calibration_prompts`
        (one per prompt, or one string for all; default "N/A"). Identical (prompt, choices) pairs are scored once.
    max_input_tokens: longest encoder input; default from the tokenizer (512 for FRED). Longer prompts keep their
        end (and a leading special prefix token such as `<LM>`) and raise a warning.
    progress: called with the number of prompts finished after each encoder batch.
    """
    return _score(model, tokenizer, prompts, choices, batch_size=batch_size, normalize=normalize,
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
    """The reference: same contract as `score_choices`, one full encoder + decoder pass per (prompt, choice)."""
    return _score(model, tokenizer, prompts, choices, batch_size=batch_size, normalize=normalize,
                  calibrate=calibrate, calibration_prompts=calibration_prompts,
                  max_input_tokens=max_input_tokens, progress=progress, mode="naive")


def predict(scores: Sequence[Sequence[float]]) -> list[int]:
    """Index of the best choice per prompt (the first one on ties)."""
    return [max(range(len(row)), key=lambda j: (row[j], -j)) for row in scores]


# ----------------------------------------------------------------------------------------------- driver


def _score(model, tokenizer, prompts, choices, *, batch_size, normalize, calibrate, calibration_prompts,
           max_input_tokens, progress, mode: str = "fast") -> list[list[float]]:
    """mode: "fast" (ours: encoder, cross-attention K/V and the choices' shared prefix once per prompt),
    "kv_once" (no shared prefix), "encoder_once" (the decoder recomputes K/V per choice) or "naive" (full pass
    per choice). All but "fast" are kept for the tests and the benchmark's breakdown."""
    prompts, choices = list(prompts), [list(c) for c in choices]
    _check_args(prompts, choices, normalize, batch_size)
    if not prompts:
        return []
    limit = max_input_tokens or _default_max_tokens(model, tokenizer)
    enc = _encode(tokenizer, prompts, choices, limit, _eos_id(model, tokenizer))
    was_training = model.training
    model.eval()  # dropout off while scoring (e.g. validation inside fine-tuning); the mode is restored after
    try:
        raw = _run(model, enc, batch_size, progress, mode)
        scores = _normalize(raw, enc.choices, choices, normalize)
        if calibrate:
            base = _calibration_scores(model, tokenizer, prompts, choices, calibration_prompts,
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


def _calibration_scores(model, tokenizer, prompts, choices, calibration_prompts, *, batch_size, normalize, limit,
                        mode) -> list[list[float]]:
    """Scores under the content-free prompts, each distinct (prompt, choices) pair scored once."""
    if calibration_prompts is None or isinstance(calibration_prompts, str):
        cal = [calibration_prompts or DEFAULT_CALIBRATION_PROMPT] * len(prompts)
    else:
        cal = list(calibration_prompts)
        if len(cal) != len(prompts):
            raise RSGError(f"{len(cal)} calibration prompts for {len(prompts)} prompts", field="calibration_prompts")
    keys = [(p, tuple(c)) for p, c in zip(cal, choices)]
    unique = list(dict.fromkeys(keys))
    enc = _encode(tokenizer, [k[0] for k in unique], [list(k[1]) for k in unique], limit, _eos_id(model, tokenizer))
    raw = _run(model, enc, batch_size, None, mode)
    normed = _normalize(raw, enc.choices, [list(k[1]) for k in unique], normalize)
    by_key = dict(zip(unique, normed))
    return [by_key[k] for k in keys]


# ----------------------------------------------------------------------------------------------- tokenisation


def _eos_id(model: Any, tokenizer: Any) -> int:
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise RSGError("neither the model config nor the tokenizer defines an end-of-sequence token",
                       field="eos_token_id")
    return int(eos)


def _default_max_tokens(model: Any, tokenizer: Any) -> int:
    from rsg_eval.models.loading import max_input_tokens

    return max_input_tokens(tokenizer, getattr(model, "config", None))


def _encode(tokenizer: Any, prompts: list[str], choices: list[list[str]], limit: int, eos: int) -> _Encoded:
    prompt_ids = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []))
    too_long = 0
    for i, ids in enumerate(prompt_ids):
        if len(ids) > limit:
            too_long += 1
            prompt_ids[i] = _truncate_left(ids, limit, special)
    if too_long:
        warnings.warn(
            f"{too_long} of {len(prompts)} prompts are longer than the model's {limit} input tokens; their start "
            "was cut (the prompt templates should shorten the passage instead)",
            stacklevel=4,
        )
    flat = [c for row in choices for c in row]
    flat_ids = tokenizer(flat, add_special_tokens=False, verbose=False)["input_ids"] if flat else []
    out: list[list[list[int]]] = []
    k = 0
    for i, row in enumerate(choices):
        ids_row = []
        for j, text in enumerate(row):
            ids = list(flat_ids[k])
            k += 1
            if not ids:
                raise RSGError(f"answer choice {j} of prompt {i} ({text!r}) tokenises to nothing; "
                               "a verbaliser must produce at least one token", field="choices")
            ids_row.append(ids + [eos])
        out.append(ids_row)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise RSGError(f"prompt {i} tokenises to nothing", field="prompt")
    return _Encoded(prompts=[list(p) for p in prompt_ids], choices=out)


def _truncate_left(ids: list[int], limit: int, special: set[int]) -> list[int]:
    """Keep the last `limit` tokens (the question and answer cue live at the end), but keep a leading special
    prefix such as FRED's `<LM>`, which sets the model's mode."""
    if limit >= 2 and ids and ids[0] in special:
        return [ids[0]] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


def _normalize(raw: list[list[tuple[float, int]]], choice_ids: list[list[list[int]]], texts: list[list[str]],
               how: str) -> list[list[float]]:
    out = []
    for row, text_row in zip(raw, texts):
        if how == "sum":
            out.append([s for s, _ in row])
        elif how == "token":
            out.append([s / n for s, n in row])
        else:  # byte
            out.append([s / max(1, len(t.encode("utf-8"))) for (s, _), t in zip(row, text_row)])
    return out


# ----------------------------------------------------------------------------------------------- batching + OOM


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    # CUDA/MPS say "out of memory"; the CPU allocator says "can't allocate memory".
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _start_batch_size(model: Any, batch_size: int | str) -> int:
    if batch_size != "auto":
        return int(batch_size)
    dev = next(model.parameters()).device
    return AUTO_START_CUDA if dev.type == "cuda" else AUTO_START_CPU


def _free_memory() -> None:
    # The failed batch's tensors are only referenced from the dropped exception by now; collect them, then hand
    # the cached blocks back so the smaller retry can use them. Nothing to do on CPU (and gc.collect is slow).
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _run(model: Any, enc: _Encoded, batch_size: int | str, progress: Progress | None,
         mode: str) -> list[list[tuple[float, int]]]:
    """Score every (prompt, choice); returns (sum log-likelihood, token count) per choice, in input order.

    Prompts go longest first, so with "auto" an out-of-memory shows up on the first batch. On OOM the batch
    size halves and the same batch is retried; results of finished batches are kept.
    """
    n = len(enc.prompts)
    order = sorted(range(n), key=lambda i: (-len(enc.prompts[i]), i))
    results: list[list[tuple[float, int]] | None] = [None] * n
    bs = _start_batch_size(model, batch_size)
    pos = 0
    while pos < n:
        idx = order[pos:pos + bs]
        try:
            with torch.inference_mode():
                part = _BATCH_FNS[mode](model, [enc.prompts[i] for i in idx], [enc.choices[i] for i in idx], bs)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_oom(exc):
                raise
            _free_memory()
            if bs == 1:
                raise RSGError("out of memory even at batch size 1: use a smaller model, bf16, a shorter "
                               "max input length, or another device", field="batch_size") from None
            new = max(1, bs // 2)
            (log.info if batch_size == "auto" else log.warning)("out of memory at batch size %d; retrying with %d",
                                                                bs, new)
            bs = new
            continue
        for i, r in zip(idx, part):
            results[i] = r
        pos += len(idx)
        if progress is not None:
            progress(len(idx))
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- model passes


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (N, L) ids and a (N, L) 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _decoder_io(model: Any, targets: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Teacher forcing: decoder input = [start] + target[:-1]; returns (P, T) input ids, labels, label mask."""
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    labels, mask = _pad(targets, pad, device)
    dec_in = torch.full_like(labels, pad)
    dec_in[:, 0] = start
    dec_in[:, 1:] = labels[:, :-1]
    return dec_in, labels, mask


def _sum_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[tuple[float, int]]:
    """logits (P, T, V), labels/mask (P, T) -> per row (sum of log p(label), number of labels)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * mask  # (P, T)
    sums = tok.sum(-1).tolist()
    counts = mask.sum(-1).tolist()
    return [(float(s), int(c)) for s, c in zip(sums, counts)]


def _lm_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Decoder states (P, T, d) -> logits (P, T, V), as T5ForConditionalGeneration does (scaled if tied)."""
    if getattr(model.config, "tie_word_embeddings", False) and getattr(model.config, "model_type", "") in (
            "t5", "mt5"):
        hidden = hidden * (model.config.d_model ** -0.5)
    return model.lm_head(hidden)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _naive_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]],
                 bs: int) -> list[list[tuple[float, int]]]:
    """One full forward (encoder + decoder) per (prompt, choice) pair, `bs` pairs at a time."""
    dev = _device(model)
    pad = model.config.pad_token_id or 0
    pairs = [(p, j) for p in range(len(prompts)) for j in range(len(choices[p]))]
    flat: list[tuple[float, int]] = []
    for start in range(0, len(pairs), bs):
        chunk = pairs[start:start + bs]
        input_ids, attn = _pad([prompts[p] for p, _ in chunk], pad, dev)
        dec_in, labels, lmask = _decoder_io(model, [choices[p][j] for p, j in chunk], dev)
        logits = model(input_ids=input_ids, attention_mask=attn, decoder_input_ids=dec_in, use_cache=False).logits
        flat.extend(_sum_logprobs(logits, labels, lmask))
    return _regroup(flat, choices)


def _regroup(flat: list[tuple[float, int]], choices: list[list[list[int]]]) -> list[list[tuple[float, int]]]:
    out, k = [], 0
    for row in choices:
        out.append(flat[k:k + len(row)])
        k += len(row)
    return out


def _cache_api_available() -> bool:
    """The K/V reuse needs transformers' layered cache classes (4.56+); older versions use encoder-once only."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, EncoderDecoderCache  # noqa: F401
    except ImportError:
        return False
    return True


def _cross_attention_layers(model: Any) -> list[Any] | None:
    """The decoder's cross-attention modules when the model is a T5 whose K/V we can precompute, else None."""
    if getattr(model.config, "model_type", "") not in ("t5", "mt5") or not _cache_api_available():
        return None
    blocks = getattr(model.get_decoder(), "block", None)
    if blocks is None:
        return None
    layers = []
    for block in blocks:
        att = getattr(block.layer[1], "EncDecAttention", None) if len(block.layer) > 1 else None
        if att is None or not all(hasattr(att, a) for a in ("k", "v", "n_heads", "key_value_proj_dim")):
            return None
        layers.append(att)
    return layers


def _fast_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int,
                cache_kv: bool = True, share_prefix: bool = True) -> list[list[tuple[float, int]]]:
    """Encoder once per prompt, cross-attention K/V once per prompt, then the decoder over choice batches.

    When the choices of a prompt share a long token prefix (RuCoS: the query sentence with each entity filled
    in), that prefix is decoded once per prompt too and its self-attention K/V reused (`_decode_shared_prefix`).
    """
    dev = _device(model)
    pad = model.config.pad_token_id or 0
    input_ids, attn = _pad(prompts, pad, dev)  # (B, S)
    enc = model.get_encoder()(input_ids=input_ids, attention_mask=attn).last_hidden_state  # (B, S, d)
    cross = _cross_attention_layers(model) if cache_kv else None
    kv = None
    if cross is not None:
        # Per decoder layer: k, v of shape (B, H, S, d_kv), exactly what T5Attention computes from the encoder output.
        B, S, _ = enc.shape
        kv = [(a.k(enc).view(B, S, a.n_heads, a.key_value_proj_dim).transpose(1, 2),
               a.v(enc).view(B, S, a.n_heads, a.key_value_proj_dim).transpose(1, 2)) for a in cross]
    if kv is not None and share_prefix:
        shared = [_shared_prefix_len(row) for row in choices]
        if _prefix_worth_it(shared, choices):
            return _decode_shared_prefix(model, enc, attn, kv, choices, shared, bs)
    pairs = [(p, j) for p in range(len(prompts)) for j in range(len(choices[p]))]
    flat: list[tuple[float, int]] = []
    for start in range(0, len(pairs), bs):
        chunk = pairs[start:start + bs]
        rows = torch.tensor([p for p, _ in chunk], device=dev)  # (P,) which prompt each pair belongs to
        dec_in, labels, lmask = _decoder_io(model, [choices[p][j] for p, j in chunk], dev)
        if kv is not None:
            hidden = _decode_with_cached_kv(model, enc, attn, kv, rows, dec_in)
            logits = _lm_logits(model, hidden)
        else:  # any other seq2seq: still one encoder pass per prompt, the decoder recomputes K/V
            from transformers.modeling_outputs import BaseModelOutput

            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc.index_select(0, rows)),
                           attention_mask=attn.index_select(0, rows), decoder_input_ids=dec_in,
                           use_cache=False).logits
        flat.extend(_sum_logprobs(logits, labels, lmask))
    return _regroup(flat, choices)


def _decode_with_cached_kv(model: Any, enc: torch.Tensor, attn: torch.Tensor,
                           kv: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor,
                           dec_in: torch.Tensor) -> torch.Tensor:
    """Run the T5 decoder for P pairs with the cross-attention K/V taken from `kv` (gathered by `rows`).

    A pre-filled EncoderDecoderCache marks every layer's cross-attention as "already updated", so T5Attention
    reads K/V from it instead of projecting `encoder_hidden_states`. The cache layers hold the gathered tensors
    as they are (DynamicLayer would copy them through torch.cat) and the self-attention side stores nothing
    (one full pass over the choice, nothing to extend). `encoder_hidden_states` is still passed, gathered: T5Stack
    needs its shape, and should a transformers version ignore the cache, the result stays correct (only slower).
    Returns the decoder's last hidden state (P, T, d).
    """
    from transformers.cache_utils import EncoderDecoderCache

    P = rows.shape[0]
    cross = _FrozenCache([(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv])  # (P, H, S, d_kv)
    cache = EncoderDecoderCache(_NoStoreCache(), cross)  # is_updated is True for every layer
    out = model.get_decoder()(
        input_ids=dec_in,
        encoder_hidden_states=enc.index_select(0, rows),  # (P, S, d)
        encoder_attention_mask=attn.index_select(0, rows),
        past_key_values=cache,
        use_cache=False,
        return_dict=True,
    )
    return out.last_hidden_state


def _cache_classes() -> tuple[type, type]:
    """Two small Cache subclasses, built lazily so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class _FrozenLayer(DynamicLayer):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.dtype, self.device = keys.dtype, keys.device
            self.keys, self.values = keys, values
            self.is_initialized = True

    class _PassThroughLayer(DynamicLayer):
        def update(self, key_states, value_states, cache_kwargs=None):  # noqa: ANN001 - transformers' signature
            return key_states, value_states

    class FrozenCache(DynamicCache):
        """Cross-attention K/V given up front, one (keys, values) pair per decoder layer."""

        def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            super().__init__()
            self.layers = [_FrozenLayer(k, v) for k, v in kv]

    class NoStoreCache(DynamicCache):
        """Self-attention cache that keeps nothing: the whole choice is decoded in one pass."""

        def __init__(self) -> None:
            super().__init__()
            self.layer_class_to_replicate = _PassThroughLayer

    return FrozenCache, NoStoreCache


def _FrozenCache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:  # noqa: N802 - reads like a class
    return _CACHE_CLASSES()[0](kv)


def _NoStoreCache() -> Any:  # noqa: N802
    return _CACHE_CLASSES()[1]()


_cache_cls: tuple[type, type] | None = None


def _CACHE_CLASSES() -> tuple[type, type]:  # noqa: N802
    global _cache_cls
    if _cache_cls is None:
        _cache_cls = _cache_classes()
    return _cache_cls


def _shared_prefix_len(row: list[list[int]]) -> int:
    """Tokens all choices of one prompt share at the start, capped so each choice keeps at least one own token."""
    if len(row) < 2:
        return 0
    n = 0
    shortest = min(len(c) for c in row)
    while n < shortest - 1 and all(c[n] == row[0][n] for c in row):
        n += 1
    return n


def _prefix_worth_it(shared: list[int], choices: list[list[list[int]]]) -> bool:
    """Use the shared-prefix path when it saves at least a fifth of the decoder tokens (it costs one more pass)."""
    saved = sum(L * (len(row) - 1) for L, row in zip(shared, choices))
    total = sum(len(c) for row in choices for c in row)
    return saved * 5 >= total and saved > 0


def _decode_shared_prefix(model: Any, enc: torch.Tensor, attn: torch.Tensor,
                          kv: list[tuple[torch.Tensor, torch.Tensor]], choices: list[list[list[int]]],
                          shared: list[int], bs: int) -> list[list[tuple[float, int]]]:
    """Decode each prompt's common choice prefix once, then only each choice's own tail.

    With choice tokens y_0..y_{n-1} (ending in </s>) and L = shared[b] tokens common to all choices of prompt b,
    the decoder inputs x_0 = start, x_t = y_{t-1} are common for t <= L, so (causal decoder) are the states at
    positions 0..L: one pass over them per prompt gives log p(y_t) for t < L (common), the distribution of y_L
    (read per choice), and the self-attention K/V of positions 0..L. The tail pass feeds x_{L+1}..x_{n-1} with
    those K/V as its past (T5's relative positions follow from the cache length), grouped so that all pairs in
    one call share the same L (so the past needs no padding).
    """
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    dev = enc.device
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    decoder = model.get_decoder()
    B = len(choices)

    # 1) Shared pass, one row per prompt: inputs x_0..x_L, right-padded to (B, Lmax + 1).
    ids, _ = _pad([[start] + choices[b][0][:shared[b]] for b in range(B)], pad, dev)
    self_cache = DynamicCache()
    out = decoder(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=attn,
                  past_key_values=EncoderDecoderCache(self_cache, _FrozenCache(kv)), use_cache=True,
                  return_dict=True)
    logp = torch.log_softmax(_lm_logits(model, out.last_hidden_state).float(), dim=-1)  # (B, Lmax + 1, V)
    self_kv = [(layer.keys, layer.values) for layer in self_cache.layers]  # each (B, H, Lmax + 1, d_kv)
    common = []
    for b in range(B):
        L = shared[b]
        y = torch.tensor(choices[b][0][:L], device=dev, dtype=torch.long)
        common.append(float(logp[b, :L].gather(-1, y.unsqueeze(-1)).sum()) if L else 0.0)

    # 2) Tails, grouped by L so one call's past has one length.
    pairs = sorted(((shared[b], b, j) for b in range(B) for j in range(len(choices[b]))))
    results: dict[tuple[int, int], tuple[float, int]] = {}
    k = 0
    while k < len(pairs):
        L = pairs[k][0]
        chunk = [pairs[k]]
        k += 1
        while k < len(pairs) and pairs[k][0] == L and len(chunk) < bs:
            chunk.append(pairs[k])
            k += 1
        rows = torch.tensor([b for _, b, _ in chunk], device=dev)
        first = [float(logp[b, L, choices[b][j][L]]) for _, b, j in chunk]  # log p(y_L): position L's output
        tails = [choices[b][j][L:] for _, b, j in chunk]  # y_L..y_{n-1}: inputs y_L..y_{n-2}, labels y_{L+1}..
        tail_sums = [0.0] * len(chunk)
        if max(len(t) for t in tails) > 1:
            labels, lmask = _pad([t[1:] or [pad] for t in tails], pad, dev)
            lmask = lmask * torch.tensor([[1] if len(t) > 1 else [0] for t in tails], device=dev)
            dec_in, _ = _pad([t[:-1] or [pad] for t in tails], pad, dev)  # (P, m)
            past = [(sk.index_select(0, rows)[:, :, :L + 1], sv.index_select(0, rows)[:, :, :L + 1])
                    for sk, sv in self_kv]
            cross = [(ck.index_select(0, rows), cv.index_select(0, rows)) for ck, cv in kv]
            out = decoder(input_ids=dec_in, encoder_hidden_states=enc.index_select(0, rows),
                          encoder_attention_mask=attn.index_select(0, rows),
                          past_key_values=EncoderDecoderCache(_FrozenCache(past), _FrozenCache(cross)),
                          use_cache=True, return_dict=True)
            tail_sums = [s for s, _ in _sum_logprobs(_lm_logits(model, out.last_hidden_state), labels, lmask)]
        for (_, b, j), f, t in zip(chunk, first, tail_sums):
            results[(b, j)] = (common[b] + f + t, len(choices[b][j]))
    return [[results[(b, j)] for j in range(len(choices[b]))] for b in range(B)]


def _encoder_once_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]],
                        bs: int) -> list[list[tuple[float, int]]]:
    return _fast_batch(model, prompts, choices, bs, cache_kv=False)


def _kv_once_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]],
                   bs: int) -> list[list[tuple[float, int]]]:
    return _fast_batch(model, prompts, choices, bs, share_prefix=False)


# Ways of scoring, from the reference to ours; all but "fast" exist for tests and the benchmark's breakdown.
_BATCH_FNS = {"naive": _naive_batch, "encoder_once": _encoder_once_batch, "kv_once": _kv_once_batch,
              "fast": _fast_batch}
