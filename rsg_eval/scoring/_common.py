"""Pieces both architectures share: padded batches, the host-side plan of which outputs to read, the fp32 LM head.

The scoring passes follow one pattern per batch of prompts, so that the GPU never waits on the host mid-batch:
1. everything index-like (token ids, positions, which output row scores which token of which choice) is built on
   the host as plain lists and moved to the device in one go;
2. the model runs;
3. only the output rows that score a choice token are gathered, (N, d); the LM head runs on them in fp32, one
   matmul with the head weight upcast; log-softmax, gather, and a segment sum give one fp32 sum per choice;
4. the driver reads that (n_choices,) tensor with one `.tolist()`: the batch's only host sync.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from rsg_eval.models.untied import scales_decoder_output

T5_TYPES = ("t5", "mt5")
# Decoder-only families whose logits are exactly `lm_head(final hidden state)` (no soft-capping, logit scale or
# bias), so the fp32 head below reproduces them; others are scored from the model's own logits.
PLAIN_HEAD_CAUSAL = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
HEAD_CHUNK_BYTES = 256 << 20  # fp32 logits per LM-head chunk: 1,300 rows of a 50k vocabulary


@dataclass
class CutPrompts:
    """Prompts whose start was cut to fit the model, counted inside `count_cut_prompts()`: `n` of `total` prompts
    scored, against a limit of `limit` tokens."""

    n: int = 0
    total: int = 0
    limit: int | None = None


_CUT_SINK: contextvars.ContextVar[CutPrompts | None] = contextvars.ContextVar("rsg_cut_prompts", default=None)


@contextlib.contextmanager
def count_cut_prompts() -> Iterator[CutPrompts]:
    """Count the prompts the encoders cut inside this block, instead of a Python warning per call: the commands
    turn the count into one note of their own per task and split (a warning prints a source path and repeats
    at every evaluation)."""
    sink = CutPrompts()
    token = _CUT_SINK.set(sink)
    try:
        yield sink
    finally:
        _CUT_SINK.reset(token)


def cut_prompts_note(where: str, cut: CutPrompts, advice: str) -> str:
    """The one-line note a command prints for a task split whose prompts were cut (no source path, no code)."""
    return (f"{where}: {cut.n} of {cut.total} prompts are longer than the model's {cut.limit} input tokens and "
            f"lost their start; {advice}")


def prompts_cut(n: int, total: int, limit: int, message: str) -> None:
    """An encoder cut the start of `n` of `total` prompts to fit `limit` tokens: counted when a command is
    counting (count_cut_prompts), else a UserWarning with `message` for library callers."""
    sink = _CUT_SINK.get()
    if sink is None:
        warnings.warn(message, stacklevel=6)
        return
    sink.n += n
    sink.total += total
    sink.limit = limit


@dataclass
class Encoded:
    """Token ids for one call: per prompt its ids, and per choice the ids whose log-probabilities are summed."""

    prompts: list[list[int]]
    choices: list[list[list[int]]]


@dataclass
class Targets:
    """Which output rows a batch reads and what it scores there, built on the host.

    `rows[s]` lists flat indices (row * width + column) into source s's (R, W, d) states (a pass can have two
    sources: the decoder-only prompt pass and the choices pass); each distinct position is read once even when
    several choices score a token there (the shared-prefix position). Scored token m reads distribution `pick[m]`
    (an index into the concatenated rows), its id is `token[m]`, and its log-probability is added to choice
    `seg[m]` (the choice's index in the batch, flat).
    """

    n_sources: int = 1
    rows: list[list[int]] = field(default_factory=list)
    pick: list[tuple[int, int]] = field(default_factory=list)
    token: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    _seen: list[dict[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = [[] for _ in range(self.n_sources)]
        self._seen = [{} for _ in range(self.n_sources)]

    def add(self, source: int, flat_row: int, token: int, seg: int) -> None:
        seen = self._seen[source]
        r = seen.get(flat_row)
        if r is None:
            r = seen[flat_row] = len(self.rows[source])
            self.rows[source].append(flat_row)
        self.pick.append((source, r))
        self.token.append(token)
        self.seg.append(seg)

    def host_tensors(self) -> tuple[list[torch.Tensor], list[tuple[int, int, int, int]]]:
        """([rows of source 0, ..., pick, token, seg] as CPU long tensors, head chunks).

        The scored tokens are sorted by the row they read, so that the rows can go through the LM head in chunks
        of at most `head_rows(V)` (bounded memory for the (rows, V) fp32 logits): chunk (a, b, lo, hi) covers
        rows a..b-1 and scored tokens lo..hi-1.
        """
        offsets = [0]
        for r in self.rows:
            offsets.append(offsets[-1] + len(r))
        pick = [offsets[s] + r for s, r in self.pick]
        order = sorted(range(len(pick)), key=pick.__getitem__)
        pick = [pick[m] for m in order]
        tensors = [_long(r) for r in self.rows] + [_long(pick), _long([self.token[m] for m in order]),
                                                   _long([self.seg[m] for m in order])]
        return tensors, pick


def head_chunks(pick_sorted: list[int], n_rows: int, vocab: int) -> list[tuple[int, int, int, int]]:
    """Split `n_rows` scored rows into chunks whose fp32 logits (rows x vocab) stay under HEAD_CHUNK_BYTES;
    (a, b, lo, hi): rows a..b-1 are read by the scored tokens lo..hi-1 (`pick_sorted` is sorted)."""
    step = max(1, HEAD_CHUNK_BYTES // (4 * max(1, vocab)))
    out = []
    lo = 0
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        hi = bisect.bisect_left(pick_sorted, b, lo)
        out.append((a, b, lo, hi))
        lo = hi
    return out


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad on the host to (N, L) ids and a (N, L) 0/1 mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host tensors to the device; on CUDA through pinned memory, so the copies do not stall the host."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.pin_memory().to(device, non_blocking=True) for t in tensors]


def input_device(model: Any) -> torch.device:
    """Where input ids go: the embedding's device (the first GPU of a model spread with a device_map)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def chunks(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def shared_prefix_len(row: list[list[int]]) -> int:
    """Tokens all choices of one prompt share at the start, capped so each choice keeps at least one own token."""
    if len(row) < 2:
        return 0
    n = 0
    shortest = min(len(c) for c in row)
    while n < shortest - 1 and all(c[n] == row[0][n] for c in row):
        n += 1
    return n


# ----------------------------------------------------------------------------------------------- LM head in fp32


def has_plain_head(model: Any) -> bool:
    """True when logits = lm_head(states) (T5 scaled by d_model^-0.5 if tied), so `head_logits_fp32` applies."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if getattr(cfg, "is_encoder_decoder", False):
        return kind in T5_TYPES
    return kind in PLAIN_HEAD_CAUSAL


def _linear_head(model: Any) -> tuple[nn.Module | None, nn.Linear] | None:
    """(adapter or None, the vocabulary projection) when the head is a Linear, possibly behind an LM adapter
    (the hierarchical model's AdaptedLMHead: `proj(adapter(h))`)."""
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return None, head
    adapter, proj = getattr(head, "adapter", None), getattr(head, "proj", None)
    if isinstance(adapter, nn.Module) and isinstance(proj, nn.Linear):
        return adapter, proj
    return None


def head_logits_fp32(model: Any, states: torch.Tensor) -> torch.Tensor:
    """Final decoder states (N, d) -> logits (N, V) in fp32: one fp32 matmul with the upcast head weight.

    In bf16 the head's own output is rounded to bf16 (a step of 0.125 at logit magnitudes 16-32), which can flip
    near-ties; only the N scored positions go through this, so the upcast costs a (V, d) weight copy per batch,
    not a (P, T, V) tensor. A head we do not recognise runs as it is and is upcast after.
    """
    cfg = model.config
    if scales_decoder_output(cfg):  # transformers 4.x: tied T5 head; 5.x: scale_decoder_outputs
        states = states * (cfg.d_model ** -0.5)  # as T5ForConditionalGeneration does before a tied head
    parts = _linear_head(model)
    if parts is None:
        return model.get_output_embeddings()(states).float()
    adapter, proj = parts
    if adapter is not None:
        states = adapter(states.to(proj.weight.device))
    w = proj.weight
    bias = proj.bias.float() if proj.bias is not None else None
    return nn.functional.linear(states.to(w.device).float(), w.float(), bias)


def _chunked_sums(logits_of: Any, n_rows: int, vocab: int, pick_sorted: list[int], pick: torch.Tensor,
                  token: torch.Tensor, seg: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Per-choice sums (n,) fp32 of log p(token) = logit[token] - logsumexp(logits), the (rows, V) fp32 logits
    made a chunk at a time by `logits_of(a, b)`; no (rows, V) log-softmax tensor, no host sync."""
    pick, token, seg = pick.to(device), token.to(device), seg.to(device)
    lp = torch.empty(pick.shape[0], dtype=torch.float32, device=device)  # (M,) one per scored token
    for a, b, lo, hi in head_chunks(pick_sorted, n_rows, vocab):
        if lo == hi:
            continue
        logits = logits_of(a, b).to(device)  # (b - a, V) fp32
        rows = pick[lo:hi] - a
        lp[lo:hi] = logits[rows, token[lo:hi]] - torch.logsumexp(logits, dim=-1)[rows]
    return torch.zeros(n, dtype=torch.float32, device=device).index_add_(0, seg, lp)


def sums_from_states(model: Any, states: list[torch.Tensor], tensors: list[torch.Tensor], pick_sorted: list[int],
                     n: int) -> torch.Tensor:
    """Gather the scored rows of each source's (R, W, d) states, then the fp32 head chunk by chunk, and sum the
    scored tokens' log-probabilities per choice: (n,) fp32. `tensors`: [rows per source..., pick, token, seg]."""
    *rows, pick, token, seg = tensors
    picked = [h.reshape(-1, h.shape[-1]).index_select(0, r.to(h.device)) for h, r in zip(states, rows)
              if r.numel()]
    dev = picked[0].device
    sel = torch.cat([p.to(dev) for p in picked])  # (N, d), model dtype
    weight = getattr(model.get_output_embeddings(), "weight", None)
    vocab = weight.shape[0] if weight is not None else int(model.config.vocab_size)
    return _chunked_sums(lambda a, b: head_logits_fp32(model, sel[a:b]), sel.shape[0], vocab, pick_sorted,
                         pick, token, seg, n, dev)


def sums_from_logits(logits: torch.Tensor, tensors: list[torch.Tensor], pick_sorted: list[int],
                     n: int) -> torch.Tensor:
    """For models scored from their own logits (R, W, V): the scored rows, upcast chunk by chunk, summed."""
    rows, pick, token, seg = tensors
    sel = logits.reshape(-1, logits.shape[-1]).index_select(0, rows.to(logits.device))  # (N, V)
    return _chunked_sums(lambda a, b: sel[a:b].float(), sel.shape[0], sel.shape[-1], pick_sorted, pick, token,
                         seg, n, sel.device)
