"""Decoder-only scoring: a choice's score is the sum of its tokens' log-probabilities after the prompt.

Tokenisation at the prompt/choice boundary (the convention of lm-evaluation-harness, kept for comparability with
its and MERA's numbers): the continuation is `delimiter + choice`, where the delimiter is one space unless the
prompt already ends in whitespace (our templates end in "Ответ:\n" and the like); the text `prompt + continuation`
is encoded as a whole and split after the prompt's own tokens, `continuation ids = encode(whole)[len(encode(prompt)):]`.
Encoding the continuation on its own would give SentencePiece tokenizers (Llama-2, Mistral) a different first
token than the same word gets in running text; encoding the whole and splitting gives the tokens the model reads
in running text, and the prompt's ids are the same for every choice (which the prompt cache needs). Should a
merge cross the boundary (the whole's tokens do not start with the prompt's), the continuation is encoded on its
own instead. No eos is appended: the answer is followed by more text, not by the end of a document.

BOS: the tokenizer decides, as the model was trained: prompt ids = what `tokenizer(prompt)` gives (Llama and
Mistral tokenizers prepend `<s>`; GPT-2-style ones such as ruGPT-3's, Qwen's and `tiny-causal`'s prepend
nothing); an eos the tokenizer appends is dropped. Truncation: prompt + the longest choice must fit the model's
context (`max_input_tokens`); the prompt keeps its end (and a leading BOS or special prefix).

Padding: right padding everywhere, with explicit masks (and explicit positions where the layout needs them), so no
padding-side setting of the tokenizer matters.

Ours ("prompt_once" / "fast"), for a batch of B prompts, two passes:
1. the context pass: prompt + the choices' common token prefix (the RuCoS query up to the entity; "fast" only),
   right-padded (B, S), once per prompt; it scores the common tokens and, at its last position, every choice's
   first own token, and leaves the KV cache (B, H, S, d) per layer;
2. the choices pass: the choices of a prompt side by side in one row after that cache, (R, Q) tokens, with a 4D
   mask (R, 1, Q, S + Q): a choice token sees its prompt's context and the earlier tokens of its own choice, at
   its true positions (position_ids). R = B rows, reading the cache as it is; only a prompt whose choices fill
   more than a row (`_plan`) gets a copy of its cache per extra row, never per choice: memory per choice is
   O(its tokens). Choices of one token need no second pass at all (" да" / " нет").
This layout runs on transformers' own model code for the families listed in PACKED_TYPES (4D masks and
position ids are honoured there); any other decoder-only model is scored the naive way, which is always exact.
The reference ("naive"): one full forward per (prompt, choice) over prompt + continuation, as lm-evaluation-harness.
"""

from __future__ import annotations

from typing import Any

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.scoring._common import (Encoded, Targets, chunks, has_plain_head, input_device, pad,
                                      prompts_cut, shared_prefix_len, sums_from_logits, sums_from_states, to_device)

MODES = ("naive", "prompt_once", "fast")
PACKED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")  # tested: llama, qwen2, gpt2 (tests/test_causal*)
_PACKED_ATTENTION = ("eager", "sdpa")  # flash-attention kernels take no 4D mask
ROW_MIN = 64  # a choices row holds at least this many tokens (or the context length, if longer) before splitting


# ----------------------------------------------------------------------------------------------- tokenisation


def delimiter(prompt: str) -> str:
    """What goes between the prompt and a choice: one space, unless the prompt ends in whitespace already."""
    return "" if not prompt or prompt[-1].isspace() else " "


def encode(model: Any, tokenizer: Any, prompts: list[str], choices: list[list[str]], limit: int) -> Encoded:
    """Prompt ids (with the tokenizer's BOS) and per choice its continuation ids; see the module docstring."""
    plain = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    wholes = [p + delimiter(p) + c for p, row in zip(prompts, choices) for c in row]
    whole_ids = tokenizer(wholes, add_special_tokens=False, verbose=False)["input_ids"] if wholes else []
    special = set(getattr(tokenizer, "all_special_ids", []))
    out_prompts, out_choices = [], []
    k = 0
    too_long = 0
    for i, (p_text, row) in enumerate(zip(prompts, choices)):
        ids = _with_leading_specials(full[i], plain[i], special)
        if not ids:
            raise RSGError(f"prompt {i} tokenises to nothing", field="prompt")
        conts = []
        for j, text in enumerate(row):
            whole = whole_ids[k]
            k += 1
            n = len(plain[i])
            cont = whole[n:] if whole[:n] == plain[i] else \
                tokenizer(delimiter(p_text) + text, add_special_tokens=False, verbose=False)["input_ids"]
            if not cont or not text:  # an empty choice would score the delimiter alone
                raise RSGError(f"answer choice {j} of prompt {i} ({text!r}) tokenises to nothing; "
                               "a verbaliser must produce at least one token", field="choices")
            conts.append(list(cont))
        need = max(len(c) for c in conts)
        if need >= limit:
            raise RSGError(f"an answer choice of prompt {i} is {need} tokens long, and the model's context is "
                           f"{limit} tokens: no room for the prompt", field="choices")
        if len(ids) + need > limit:
            too_long += 1
            ids = _keep_end(ids, limit - need, special)
        out_prompts.append(ids)
        out_choices.append(conts)
    if too_long:
        prompts_cut(too_long, len(prompts), limit,
                    f"{too_long} of {len(prompts)} prompts do not fit the model's {limit}-token context together "
                    "with their longest answer choice; their start was cut (the prompt templates should shorten "
                    "the passage instead)")
    return Encoded(prompts=out_prompts, choices=out_choices)


def _with_leading_specials(full: list[int], plain: list[int], special: set[int]) -> list[int]:
    """The prompt's ids as the tokenizer adds special tokens: leading ones (BOS) kept, trailing ones (an eos some
    tokenizers append) dropped, so the choice follows the prompt's last text token."""
    lead = 0
    while lead < len(full) and full[lead] in special and full[lead:lead + len(plain)] != plain:
        lead += 1
    return list(full[:lead]) + list(plain)


def _keep_end(ids: list[int], keep: int, special: set[int]) -> list[int]:
    if keep >= 2 and ids and ids[0] in special:
        return [ids[0]] + ids[len(ids) - (keep - 1):]
    return ids[len(ids) - keep:]


# ----------------------------------------------------------------------------------------------- helpers


def _pad_id(model: Any) -> int:
    """Any valid token id: padded positions are masked and never read."""
    cfg = model.config
    vocab = model.get_input_embeddings().num_embeddings
    for v in (cfg.pad_token_id, cfg.eos_token_id):
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None and 0 <= int(v) < vocab:
            return int(v)
    return 0


def packable(model: Any) -> bool:
    cfg = model.config
    return (getattr(cfg, "model_type", "") in PACKED_TYPES and has_plain_head(model)
            and getattr(cfg, "_attn_implementation", "eager") in _PACKED_ATTENTION)


def _base(model: Any) -> Any:
    """The transformer without its LM head (LlamaModel, GPT2Model): returns final hidden states and the cache.
    A peft-wrapped model (LoRA while it trains, unmerged) is unwrapped first: its own `base_model` is the LoRA
    wrapper around the whole LM, whose output has logits, not hidden states; the adapters stay in the layers."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


# ----------------------------------------------------------------------------------------------- naive


def naive_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int) -> torch.Tensor:
    """The reference: one forward over prompt + continuation per (prompt, choice), `bs` pairs per call."""
    dev = input_device(model)
    pad_id = _pad_id(model)
    pairs = [(p, j) for p in range(len(choices)) for j in range(len(choices[p]))]
    plain = has_plain_head(model)
    out = []
    for chunk in chunks(pairs, bs):
        seqs = [prompts[p] + choices[p][j] for p, j in chunk]
        width = max(len(s) for s in seqs)
        tg = Targets()
        for r, (p, j) in enumerate(chunk):
            n = len(prompts[p])
            for t, tok in enumerate(choices[p][j]):  # the output at position n - 1 + t predicts continuation t
                tg.add(0, r * width + n - 1 + t, tok, r)
        ids, mask = pad(seqs, pad_id)
        tensors, pick = tg.host_tensors()
        ids, mask, *tgt = to_device(dev, ids, mask, *tensors)
        if plain:
            states = _base(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            out.append(sums_from_states(model, [states], tgt, pick, n=len(chunk)))
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            out.append(sums_from_logits(logits, tgt, pick, n=len(chunk)))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- prompt cache


def _plan(prompts: list[list[int]], choices: list[list[list[int]]], share_prefix: bool, budget: int):
    """Host side of the two passes: the context per prompt, the choice rows (the prompt each belongs to, ids,
    positions, segments) and the targets (source 0: the context pass, source 1: the choices pass).

    A prompt's choices share one row while it holds at most `budget` tokens, then continue in another row of the
    same prompt (which reads a copy of that prompt's cache), so a row's attention scores stay (Q, S + Q) with
    Q <= max(budget, one choice) and memory grows linearly with the choices' tokens.
    """
    contexts, lengths, row_prompt, tails, tail_pos, tail_seg = [], [], [], [], [], []
    marks_ctx, marks_row = [], []  # (prompt or row, column, token, choice)
    base = 0
    for b, ys in enumerate(choices):
        L = shared_prefix_len(ys) if share_prefix else 0
        ctx = prompts[b] + ys[0][:L]
        s = len(ctx)
        contexts.append(ctx)
        lengths.append(s)
        open_row = False
        for k, y in enumerate(ys):
            c = base + k
            for t in range(L):                        # common tokens: context position len(prompt) - 1 + t
                marks_ctx.append((b, len(prompts[b]) - 1 + t, y[t], c))
            marks_ctx.append((b, s - 1, y[L], c))     # the first own token, from the context's last position
            own = len(y) - L - 1
            if own <= 0:
                continue
            if not open_row or (len(tails[-1]) + own > budget and tails[-1]):
                row_prompt.append(b)
                tails.append([])
                tail_pos.append([])
                tail_seg.append([])
                open_row = True
            ids, pos, seg = tails[-1], tail_pos[-1], tail_seg[-1]
            for t in range(L + 1, len(y)):            # input y_{t-1} at position s + (t - 1 - L) scores y_t
                marks_row.append((len(tails) - 1, len(ids), y[t], c))
                ids.append(y[t - 1])
                pos.append(s + t - 1 - L)
                seg.append(k)
        base += len(ys)
    wc = max(lengths)
    wt = max((len(t) for t in tails), default=0)
    tg = Targets(n_sources=2)
    for b, col, tok, c in marks_ctx:
        tg.add(0, b * wc + col, tok, c)
    for r, col, tok, c in marks_row:
        tg.add(1, r * wt + col, tok, c)
    return contexts, lengths, row_prompt, tails, tail_pos, tail_seg, tg


def _choices_mask(lengths: list[int], tail_pos: list[list[int]], tail_seg: list[list[int]], wc: int, wt: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Wt, Wc + Wt) additive mask of the choices pass: a choice token sees its prompt's context (columns
    < that prompt's length) and the earlier tokens of its own choice; padding queries see column 0 only."""
    B = len(lengths)
    pos = torch.full((B, wt), -1, dtype=torch.long)
    seg = torch.full((B, wt), -1, dtype=torch.long)
    for b in range(B):
        pos[b, :len(tail_pos[b])] = torch.tensor(tail_pos[b], dtype=torch.long)
        seg[b, :len(tail_seg[b])] = torch.tensor(tail_seg[b], dtype=torch.long)
    ctx_visible = torch.arange(wc)[None, None, :] < torch.tensor(lengths)[:, None, None]  # (B, 1, Wc)
    ctx_visible = ctx_visible.expand(B, wt, wc).clone()
    sq, sk = seg[:, :, None], seg[:, None, :]
    own = (sk >= 0) & (sk == sq) & (pos[:, None, :] <= pos[:, :, None])  # (B, Wt, Wt)
    pad_q = sq < 0  # (B, Wt, 1)
    ctx_visible[:, :, :1] |= pad_q
    visible = torch.cat([ctx_visible, own & ~pad_q], dim=2)  # (B, Wt, Wc + Wt)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def _tail_positions(tail_pos: list[list[int]], wt: int) -> torch.Tensor:
    out = torch.zeros((len(tail_pos), wt), dtype=torch.long)
    for b, p in enumerate(tail_pos):
        out[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    return out


def packed_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int,
                 share_prefix: bool = True) -> torch.Tensor:
    """Ours: the prompt (and the choices' common prefix) once per prompt, its choices in one row after its cache
    (module docstring). One context pass and at most one choices pass for the `bs` prompts of the batch."""
    if not packable(model):
        return naive_batch(model, prompts, choices, bs)
    wc = max(len(p) + shared_prefix_len(ys) * share_prefix for p, ys in zip(prompts, choices))
    contexts, lengths, row_prompt, tails, tail_pos, tail_seg, tg = _plan(prompts, choices, share_prefix,
                                                                          budget=max(ROW_MIN, wc))
    window = getattr(model.config, "sliding_window", None)
    longest = max([lengths[b] + len(t) for b, t in zip(row_prompt, tails)] + lengths)
    if isinstance(window, int) and 0 < window < longest:  # our mask has no window: take the exact naive way
        return naive_batch(model, prompts, choices, bs)
    dev = input_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    pad_id = _pad_id(model)
    ctx_ids, ctx_mask = pad(contexts, pad_id)  # (B, Wc)
    host = [ctx_ids, ctx_mask]
    if tails:
        wt = max(len(t) for t in tails)
        row_lengths = [lengths[b] for b in row_prompt]
        host += [pad(tails, pad_id)[0], _tail_positions(tail_pos, wt),  # (R, Wt), (R, Wt)
                 _choices_mask(row_lengths, tail_pos, tail_seg, ctx_ids.shape[1], wt, dtype),  # (R, 1, Wt, Wc + Wt)
                 torch.tensor(row_prompt)]
    tensors, pick = tg.host_tensors()
    moved = to_device(dev, *host, *tensors)
    tgt = moved[len(host):]
    base = _base(model)
    out = base(input_ids=moved[0], attention_mask=moved[1], use_cache=True)
    states = [out.last_hidden_state]  # (B, Wc, d)
    if tails:
        cache = out.past_key_values  # per layer (B, H_kv, Wc, d_head)
        if row_prompt != list(range(len(prompts))):  # rows != prompts: a copy of a prompt's cache per extra row
            cache.reorder_cache(moved[5])            # (a row holds many choices), and none for prompts without
        tail_out = base(input_ids=moved[2], attention_mask=moved[4], position_ids=moved[3], past_key_values=cache,
                        use_cache=True)
        states.append(tail_out.last_hidden_state)  # (R, Wt, d)
    return sums_from_states(model, states, tgt, pick, n=sum(len(c) for c in choices))


def prompt_once_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int) -> torch.Tensor:
    return packed_batch(model, prompts, choices, bs, share_prefix=False)


BATCH_FNS = {"naive": naive_batch, "prompt_once": prompt_once_batch, "fast": packed_batch}
