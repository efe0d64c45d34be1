"""Seq2seq scoring: the encoder once per prompt, and every choice of a prompt decoded against that prompt's states.

Conventions: the prompt is tokenised as the tokenizer does by default (T5's sentencepiece appends `</s>`, FRED's
GPT-2 BPE appends nothing: each model sees what it was trained on); a choice is tokenised without special tokens
and the model's eos id (`config.eos_token_id`, else the tokenizer's) is appended explicitly, because FRED's
tokenizer never appends it. The decoder input is `decoder_start_token_id` followed by the choice tokens shifted
right: x_0 = start, x_t = y_{t-1}, and the output at position t scores y_t.

T5 (the fast path, "prompt_once" / "fast"): the choices of one prompt go side by side in one decoder row,

    row = [x_0 .. x_L | tail of choice 1 | tail of choice 2 | ...]     (L = the choices' common prefix, 0 in
                                                                         "prompt_once"; tail_c = x_{L+1} .. x_{n_c-1})

so the decoder runs with batch = rows (one per prompt, unless a prompt's choices fill more than a row: see
`_plan_rows`), and its cross-attention reads each prompt's encoder states (B, S, d) and projects their K/V
(B, H, S, d_kv) once per layer, whatever the number of choices: nothing of size S is copied per choice (T5
cross-attention has no position bias, so where a query sits in the row does not matter to it). Self-attention
stays per choice through the bias we hand every block, (R, H, W, W): a tail token sees the shared prefix and the
earlier tokens of its own choice, at its true position in that choice (T5's relative position buckets come from
those positions, not from the column in the row). The output at column L scores y_L of every choice; the prefix
columns score the common tokens. Memory per choice is O(its tokens), never O(S).

The decoder layers are transformers' own T5Block modules, called with our position bias; nothing is patched.
Other seq2seq models (and T5 variants whose blocks differ) take "encoder_once": the encoder once per prompt, then
transformers' decoder per (prompt, choice) with the encoder states gathered per pair.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.scoring._common import (T5_TYPES, Encoded, Targets, chunks, has_plain_head, input_device, pad,
                                      prompts_cut, shared_prefix_len, sums_from_logits, sums_from_states, to_device)

MODES = ("naive", "encoder_once", "prompt_once", "fast")
ROW_MIN = 64  # a decoder row holds at least this many tokens (or the encoder length, if longer) before splitting


# ----------------------------------------------------------------------------------------------- tokenisation


def eos_id(model: Any, tokenizer: Any) -> int:
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise RSGError("neither the model config nor the tokenizer defines an end-of-sequence token",
                       field="eos_token_id")
    return int(eos)


def encode(model: Any, tokenizer: Any, prompts: list[str], choices: list[list[str]], limit: int) -> Encoded:
    eos = eos_id(model, tokenizer)
    prompt_ids = tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []))
    too_long = 0
    for i, ids in enumerate(prompt_ids):
        if len(ids) > limit:
            too_long += 1
            prompt_ids[i] = truncate_left(ids, limit, special)
    if too_long:
        prompts_cut(too_long, len(prompts), limit,
                    f"{too_long} of {len(prompts)} prompts are longer than the model's {limit} input tokens; their "
                    "start was cut (the prompt templates should shorten the passage instead)")
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
    return Encoded(prompts=[list(p) for p in prompt_ids], choices=out)


def truncate_left(ids: list[int], limit: int, special: set[int]) -> list[int]:
    """Keep the last `limit` tokens (the question and answer cue live at the end), but keep a leading special
    prefix such as FRED's `<LM>` (or a BOS), which sets the model's mode."""
    if limit >= 2 and ids and ids[0] in special:
        return [ids[0]] + ids[len(ids) - (limit - 1):]
    return ids[len(ids) - limit:]


# ----------------------------------------------------------------------------------------------- helpers


def _start_and_pad(model: Any) -> tuple[int, int]:
    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return int(start if start is not None else 0), int(pad_id)


def _teacher_forcing(targets: list[list[int]], start: int, pad_id: int, tg: Targets, first_seg: int) -> list[list[int]]:
    """Decoder inputs [start] + y[:-1] per target; records in `tg` that output (r, t) scores y_t for choice
    first_seg + r. Returns the input rows (not padded)."""
    width = max(len(y) for y in targets)
    rows = []
    for r, y in enumerate(targets):
        rows.append([start] + y[:-1])
        for t, tok in enumerate(y):
            tg.add(0, r * width + t, tok, first_seg + r)
    return rows


def _encoder(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, d)


def _flat_pairs(choices: list[list[list[int]]]) -> list[tuple[int, int]]:
    return [(p, j) for p in range(len(choices)) for j in range(len(choices[p]))]


# ----------------------------------------------------------------------------------------------- naive


def naive_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int) -> torch.Tensor:
    """The reference: one full encoder + decoder pass per (prompt, choice), `bs` pairs per call, as
    lm-evaluation-harness does for seq2seq models. Returns the per-choice sums (n_choices,), flat."""
    dev = input_device(model)
    start, pad_id = _start_and_pad(model)
    plain = has_plain_head(model)
    out = []
    for chunk in chunks(_flat_pairs(choices), bs):
        tg = Targets()
        dec_rows = _teacher_forcing([choices[p][j] for p, j in chunk], start, pad_id, tg, 0)
        ids, mask = pad([prompts[p] for p, _ in chunk], pad_id)
        dec_in, _ = pad(dec_rows, pad_id)
        tensors, pick = tg.host_tensors()
        ids, mask, dec_in, *tgt = to_device(dev, ids, mask, dec_in, *tensors)
        if plain:
            enc = _encoder(model, ids, mask)
            states = model.get_decoder()(input_ids=dec_in, encoder_hidden_states=enc, encoder_attention_mask=mask,
                                         use_cache=False).last_hidden_state  # (P, T, d)
            out.append(sums_from_states(model, [states], tgt, pick, n=len(chunk)))
        else:
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in, use_cache=False).logits
            out.append(sums_from_logits(logits, tgt, pick, n=len(chunk)))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- encoder once


def encoder_once_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int) -> torch.Tensor:
    """The encoder once per prompt; transformers' decoder per (prompt, choice), `bs` pairs per call, with the
    encoder states gathered per pair (P, S, d) and the decoder projecting its cross-attention K/V per pair.
    The path for seq2seq models other than T5."""
    dev = input_device(model)
    start, pad_id = _start_and_pad(model)
    pairs = _flat_pairs(choices)
    ids, mask = pad(prompts, pad_id)
    plans = []
    for chunk in chunks(pairs, bs):
        tg = Targets()
        dec_rows = _teacher_forcing([choices[p][j] for p, j in chunk], start, pad_id, tg, 0)
        plans.append((len(chunk), torch.tensor([p for p, _ in chunk]), pad(dec_rows, pad_id)[0], tg.host_tensors()))
    ids, mask = to_device(dev, ids, mask)
    enc = _encoder(model, ids, mask)  # (B, S, d)
    out = []
    for n, rows, dec_in, (tensors, pick) in plans:
        rows, dec_in, *tgt = to_device(dev, rows, dec_in, *tensors)
        enc_p, mask_p = enc.index_select(0, rows.to(enc.device)), mask.index_select(0, rows)  # (P, S, d), (P, S)
        if has_plain_head(model):
            states = model.get_decoder()(input_ids=dec_in, encoder_hidden_states=enc_p, encoder_attention_mask=mask_p,
                                         use_cache=False).last_hidden_state
            out.append(sums_from_states(model, [states], tgt, pick, n=n))
        else:
            from transformers.modeling_outputs import BaseModelOutput

            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc_p), attention_mask=mask_p,
                           decoder_input_ids=dec_in, use_cache=False).logits
            out.append(sums_from_logits(logits, tgt, pick, n=n))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- T5: choices in a row


def t5_packable(model: Any) -> bool:
    """True for a T5 whose decoder blocks we can drive with our own position bias (self-attention with a relative
    bias in block 0 only, plain cross-attention without one, no pruned heads)."""
    cfg = model.config
    if getattr(cfg, "model_type", "") not in T5_TYPES or not has_plain_head(model):
        return False
    dec = model.get_decoder()
    blocks = getattr(dec, "block", None)
    if not blocks or not all(hasattr(dec, a) for a in ("embed_tokens", "final_layer_norm", "dropout")):
        return False
    for i, block in enumerate(blocks):
        layers = getattr(block, "layer", ())
        if len(layers) != 3:
            return False
        sa, ca = getattr(layers[0], "SelfAttention", None), getattr(layers[1], "EncDecAttention", None)
        # transformers 5 dropped head pruning (no `pruned_heads` attribute): nothing can be pruned there
        if sa is None or ca is None or getattr(sa, "pruned_heads", None) or getattr(ca, "pruned_heads", None) \
                or ca.has_relative_attention_bias:
            return False
        if sa.has_relative_attention_bias != (i == 0):
            return False
    return True


def _block_kwargs(block: Any) -> set[str]:
    return set(inspect.signature(block.forward).parameters)


def _plan_rows(choices: list[list[list[int]]], share_prefix: bool, start: int, budget: int):
    """Host side of the packed decoder pass. Per row: the prompt it belongs to, its input ids, each column's
    position within its choice and its segment (0 = the shared prefix, c + 1 = choice c), and the targets.

    A prompt's choices share one row while it holds at most `budget` tokens; past that they continue in another
    row of the same prompt (which repeats the short prefix and reads the prompt's encoder states once more), so the
    self-attention scores of a row, (H, W, W), stay within those of its cross-attention, (H, W, S), and memory
    grows linearly with the choices' tokens however many choices a prompt has.
    """
    row_prompt, rows, positions, segments, scored = [], [], [], [], []
    seg_base = 0
    for b, ys in enumerate(choices):
        L = shared_prefix_len(ys) if share_prefix else 0
        open_row = False
        for k, y in enumerate(ys):
            tail = len(y) - L - 1  # own inputs after the prefix: x_{L+1} .. x_{n-1}
            if not open_row or (len(rows[-1]) + tail > budget and len(rows[-1]) > L + 1):
                row_prompt.append(b)
                rows.append([start] + ys[0][:L])  # x_0 .. x_L, common to every choice
                positions.append(list(range(L + 1)))
                segments.append([0] * (L + 1))
                scored.append([])
                open_row = True
            ids, pos, seg, marks = rows[-1], positions[-1], segments[-1], scored[-1]
            c = seg_base + k
            for t in range(L):                  # the common tokens y_0 .. y_{L-1}, read at columns 0 .. L-1
                marks.append((t, y[t], c))
            marks.append((L, y[L], c))          # y_L: the choice's first own token, read at column L
            for t in range(L + 1, len(y)):      # the tail: input x_t = y_{t-1} at position t scores y_t
                marks.append((len(ids), y[t], c))
                ids.append(y[t - 1])
                pos.append(t)
                seg.append(k + 1)
        seg_base += len(ys)
    width = max(len(r) for r in rows)
    tg = Targets()
    for r, marks in enumerate(scored):
        for col, tok, c in marks:
            tg.add(0, r * width + col, tok, c)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    seg_t = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    for r in range(len(rows)):
        pos_t[r, :len(positions[r])] = torch.tensor(positions[r])
        seg_t[r, :len(segments[r])] = torch.tensor(segments[r])
    return row_prompt, rows, pos_t, seg_t, tg


def _row_shape(choices: list[list[list[int]]], share_prefix: bool, budget: int) -> tuple[int, int]:
    """(rows, widest row) that `_plan_rows` makes with `budget`, from the lengths alone (no tensors)."""
    n_rows, width = 0, 1
    for ys in choices:
        L = shared_prefix_len(ys) if share_prefix else 0
        cur = 0
        for y in ys:
            tail = len(y) - L - 1
            if cur == 0 or (cur + tail > budget and cur > L + 1):
                if cur:
                    width = max(width, cur)
                n_rows += 1
                cur = L + 1
            cur += tail
        width = max(width, cur)
    return n_rows, width


def _row_budget(model: Any, choices: list[list[list[int]]], share_prefix: bool, enc_len: int) -> int:
    """The row budget with the least estimated decoder work for this batch. Every row is padded to the widest, so
    a prompt whose choices just overflow the default budget (the encoder length) left a short row padded to the
    full width, and each row's self-attention, (W, W), is computed in full: without a shared prefix that cost 1.7x
    (docs/benchmarks.md). Smaller budgets cut padding and W^2 but add rows, and each row projects its prompt's
    cross-attention K/V again; the estimate weighs both (matmul FLOPs per layer) and keeps the cheapest. Scores do
    not depend on it."""
    cfg = model.config
    d, ff = int(cfg.d_model), int(getattr(cfg, "d_ff", 4 * cfg.d_model))
    inner = int(getattr(cfg, "num_heads", 1)) * int(getattr(cfg, "d_kv", d // max(1, getattr(cfg, "num_heads", 1))))
    per_token = 2 * d * inner * 3 + 3 * d * ff        # self q,k,v,o + cross q,o and the gated feed-forward
    best, best_cost = None, None
    top = max(ROW_MIN, enc_len)
    # Two candidates only: the estimate counts FLOPs and misses per-row costs (copies, masks), which make many narrow
    # rows slower than it predicts; halving was measured to pay, a third or a quarter was not (benchmarks.md).
    for budget in sorted({top, *(b for b in (top // 2,) if b >= ROW_MIN)}, reverse=True):
        rows, width = _row_shape(choices, share_prefix, budget)
        cost = rows * (width * (per_token + 2 * inner * (width + enc_len)) + enc_len * 2 * d * inner)
        if best_cost is None or cost < best_cost:
            best, best_cost = budget, cost
    return best  # type: ignore[return-value]


def _self_attention_bias(attn: Any, pos: torch.Tensor, seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """T5 decoder self-attention bias for packed rows: (R, H, W, W) = relative position bias + visibility mask.

    pos, seg (R, W). Query i sees key j iff pos_j <= pos_i and j is in the shared prefix or in i's own choice;
    the relative position is pos_j - pos_i (a choice's true positions, whatever its column in the row).
    Padding queries see column 0 only (their outputs are never read; no row is fully masked).
    """
    rel = pos[:, None, :] - pos[:, :, None]  # (R, Wq, Wk): key position - query position
    buckets = attn._relative_position_bucket(rel, bidirectional=False,
                                             num_buckets=attn.relative_attention_num_buckets,
                                             max_distance=attn.relative_attention_max_distance)
    sq, sk = seg[:, :, None], seg[:, None, :]  # (R, Wq, 1), (R, 1, Wk)
    hidden = (rel > 0) | (sk < 0) | ((sk != 0) & (sk != sq))  # (R, Wq, Wk): what a query may not see
    del rel
    hidden[:, :, 0] &= sq[:, :, 0] >= 0  # padding queries see column 0
    bias = attn.relative_attention_bias(buckets).to(dtype).permute(0, 3, 1, 2)  # (R, H, Wq, Wk)
    return bias.masked_fill_(hidden[:, None], torch.finfo(dtype).min)


def _t5_packed_decode(model: Any, ids: torch.Tensor, self_bias: torch.Tensor, enc: torch.Tensor,
                      cross_bias: torch.Tensor) -> torch.Tensor:
    """transformers' T5 decoder blocks over packed rows: ids (R, W), self_bias (R, H, W, W), enc (R, S, d),
    cross_bias (R, 1, 1, S) -> final states (R, W, d). The blocks project each row's cross-attention K/V from
    `enc` once per layer: (R, H, S, d_kv), R = the prompts (plus a row per overflow)."""
    dec = model.get_decoder()
    h = dec.dropout(dec.embed_tokens(ids))
    extra = {}
    if "cache_position" in _block_kwargs(dec.block[0]):  # T5Block reads the query length from it
        extra["cache_position"] = torch.arange(ids.shape[1], device=ids.device)
    for block in dec.block:
        h = block(h, position_bias=self_bias, encoder_hidden_states=enc, encoder_decoder_position_bias=cross_bias,
                  use_cache=False, **extra)[0]
    return dec.dropout(dec.final_layer_norm(h))


def packed_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int,
                 share_prefix: bool = True) -> torch.Tensor:
    """Ours: the encoder once per prompt, all its choices in one decoder row (module docstring). `bs` prompts come
    in per call (the driver's batch); one encoder pass and one decoder pass for all of them."""
    if not t5_packable(model):
        return encoder_once_batch(model, prompts, choices, bs)
    dev = input_device(model)
    start, pad_id = _start_and_pad(model)
    ids, mask = pad(prompts, pad_id)  # (B, S)
    budget = _row_budget(model, choices, share_prefix, ids.shape[1])
    row_prompt, rows, pos, seg, tg = _plan_rows(choices, share_prefix, start, budget=budget)
    dec_in, _ = pad(rows, pad_id)     # (R, W), R >= B rows
    split = len(rows) > len(prompts)  # some prompt's choices fill more than one row
    host = [ids, mask, dec_in, pos, seg] + ([torch.tensor(row_prompt)] if split else [])
    tensors, pick = tg.host_tensors()
    moved = to_device(dev, *host, *tensors)
    ids, mask, dec_in, pos, seg = moved[:5]
    tgt = moved[len(host):]
    enc = _encoder(model, ids, mask)  # (B, S, d)
    if split:  # one copy of the encoder states per extra row (a row holds many choices), never per choice
        rows_of = moved[5]
        enc, mask = enc.index_select(0, rows_of.to(enc.device)), mask.index_select(0, rows_of)  # (R, S, d), (R, S)
    dtype = enc.dtype
    cross_bias = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (R, 1, 1, S)
    attn = model.get_decoder().block[0].layer[0].SelfAttention
    self_bias = _self_attention_bias(attn, pos.to(attn.relative_attention_bias.weight.device), seg.to(
        attn.relative_attention_bias.weight.device), dtype)
    states = _t5_packed_decode(model, dec_in, self_bias, enc, cross_bias)  # (R, W, d)
    return sums_from_states(model, [states], tgt, pick, n=sum(len(c) for c in choices))


def prompt_once_batch(model: Any, prompts: list[list[int]], choices: list[list[list[int]]], bs: int) -> torch.Tensor:
    return packed_batch(model, prompts, choices, bs, share_prefix=False)


BATCH_FNS = {"naive": naive_batch, "encoder_once": encoder_once_batch, "prompt_once": prompt_once_batch,
             "fast": packed_batch}
