"""Tokenised multi-task corpus through the `datasets` library: validated once, tokenised once, memory-mapped.

A split becomes an Arrow dataset saved under `<cache_dir>/<fingerprint>/<split>/` and re-opened with
`datasets.load_from_disk` (memory-mapped, so a 950 k-example corpus costs little RAM). The fingerprint covers the
files (path, size, mtime), the label sets, the tokenizer, the length limits and the template version, so any change
re-tokenises and an unchanged corpus is never tokenised twice.

Columns: task (int8, index into TASKS), input_ids (int32), labels (generation target ids ending in </s>; empty
otherwise), cls (mc/nli class index; -1 otherwise), and for NER one value per input token in each of two encodings:
ner_tag (int32, the paper's one-hot target for softmax cross-entropy: 0 = outside every entity, 1 + t = the
INNERMOST entity covering the token has type t) and ner_bits (int64, the multi-label target: bit t set = the token
lies inside an entity of type t; nested entities set several bits; outside = 0).

The batch plan (`BatchPlan`) says which examples of which task each micro-step takes, under either reading of the
paper's "a batch of 12 sequences": 12 in total per micro-step spread over the tasks in rotation ("total"), or 12 of
every task ("per-task"). Either way an epoch ends when every train example has been seen at least once.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rsg_eval.core.errors import RSGError
from rsg_eval.corpus.load import Corpus, iter_examples
from rsg_eval.corpus.labels import GEN_TASKS, TASKS

DATA_VERSION = 2   # bump when templates or the tokenised layout change (2: ner_tag column)
TASK_INDEX = {t: i for i, t in enumerate(TASKS)}


def ensure_fast(tokenizer: Any) -> Any:
    """NER labels need token character offsets, which only fast tokenizers give. FRED's GPT2Tokenizer is slow:
    convert it (vocab + merges) and check on a probe that ids are unchanged."""
    if getattr(tokenizer, "is_fast", False):
        return tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    fast = PreTrainedTokenizerFast(tokenizer_object=convert_slow_tokenizer(tokenizer),
                                   **{k: getattr(tokenizer, k) for k in
                                      ("pad_token", "eos_token", "bos_token", "unk_token") if getattr(tokenizer, k)})
    probe = "<LM>Иван Петров приехал в Москву 5 мая 2021 года. Hello, world!"
    if fast(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
        raise RSGError("the tokenizer is not a fast tokenizer and converting it changes the token ids; NER needs "
                       "character offsets", field="tokenizer", expected="a tokenizer with tokenizer.json")
    return fast


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The backend JSON also holds the truncation/padding settings of the last call: leave those out.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def split_fingerprint(corpus: Corpus, split: str, tokenizer: Any, max_length: int, max_target_length: int,
                      lm_prefix: str) -> str:
    parts: dict[str, Any] = {
        "v": DATA_VERSION, "split": split, "max_length": max_length, "max_target_length": max_target_length,
        "lm_prefix": lm_prefix, "tok": tokenizer_fingerprint(tokenizer),
        "labels": [list(corpus.labels.mc), list(corpus.labels.ner), list(corpus.labels.nli)],
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in corpus.files.get(split, [])],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _raw_rows(corpus: Corpus, split: str):
    # Generator for Dataset.from_generator: validated records, flattened for Arrow.
    for ex in iter_examples(corpus, split):
        yield {"task": TASK_INDEX[ex.task], "input": ex.input, "target": ex.target, "label": ex.label,
               "ent_start": [e[0] for e in ex.entities], "ent_end": [e[1] for e in ex.entities],
               "ent_type": [e[2] for e in ex.entities]}


def ner_bits_for(offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
    """One bitmask per token: bit t set when the token's characters overlap an entity of type t.

    Tokens with an empty span (special tokens) stay 0. Byte-level BPE tokens carry their leading space, which
    never makes them overlap an entity that starts after the space.
    """
    bits = []
    for s, e in offsets:
        b = 0
        if e > s:
            for a, z, t in spans:
                if s < z and e > a:
                    b |= 1 << t
        bits.append(b)
    return bits


def ner_tags_for(offsets: list[tuple[int, int]], spans: list[tuple[int, int, int]]) -> list[int]:
    """One class per token for the softmax loss: 0 = outside, 1 + t = type t of the innermost entity covering it.

    Nested entities: the innermost (shortest) span labels the token, ties broken by the lower type index. So in
    "Московский государственный университет" (ORGANIZATION) with "Московский" (CITY) inside, the first token is
    CITY and the rest ORGANIZATION: both entities keep tokens. (The outermost rule would erase every inner entity.)
    Overlap as in `ner_bits_for`: a token belongs to a span when their characters overlap."""
    tags = []
    for s, e in offsets:
        best = None
        if e > s:
            for a, z, t in spans:
                if s < z and e > a and (best is None or (z - a, t) < best):
                    best = (z - a, t)
        tags.append(0 if best is None else best[1] + 1)
    return tags


def tokenize_batch(batch: dict[str, list], *, tokenizer: Any, max_length: int, max_target_length: int,
                   lm_prefix: str) -> dict[str, list]:
    """datasets.map function: encoder inputs, targets with an explicit </s>, class labels, NER bitmasks."""
    gen_ids = {TASK_INDEX[t] for t in GEN_TASKS}
    ner_id = TASK_INDEX["ner"]
    from rsg_eval.core.limits import cut_text

    # cut by characters first: a fast tokenizer encodes a whole text before truncating it (same ids kept)
    texts = [cut_text(lm_prefix + x if t in gen_ids else x, max_length) for t, x in zip(batch["task"], batch["input"])]
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": enc["input_ids"], "labels": [], "cls": batch["label"], "ner_bits": [],
                            "ner_tag": []}
    for i, task in enumerate(batch["task"]):
        if task in gen_ids:
            # FRED's tokenizer appends no </s>; the target must end in it explicitly (FREDT5_NOTES.md 0.5).
            ids = tokenizer(cut_text(batch["target"][i], max_target_length), add_special_tokens=False, truncation=True,
                            max_length=max_target_length - 1)["input_ids"]
            out["labels"].append(ids + [eos])
        else:
            out["labels"].append([])
        if task == ner_id:
            spans = list(zip(batch["ent_start"][i], batch["ent_end"][i], batch["ent_type"][i]))
            out["ner_bits"].append(ner_bits_for(enc["offset_mapping"][i], spans))
            out["ner_tag"].append(ner_tags_for(enc["offset_mapping"][i], spans))
        else:
            out["ner_bits"].append([])
            out["ner_tag"].append([])
    return out


def build_split(corpus: Corpus, split: str, tokenizer: Any, *, cache_dir: str | Path, max_length: int = 512,
                max_target_length: int = 512, lm_prefix: str = "", num_proc: int | None = None
                ) -> tuple[Any, bool] | tuple[None, bool]:
    """(memory-mapped tokenised dataset or None when the split has no files, whether it came from the cache)."""
    import datasets

    if not corpus.files.get(split):
        return None, False
    fast = ensure_fast(tokenizer)
    fp = split_fingerprint(corpus, split, fast, max_length, max_target_length, lm_prefix)
    target = Path(cache_dir) / fp / split
    if (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target)), True
    work = Path(cache_dir) / fp / f".work-{split}"
    feats = datasets.Features({
        "task": datasets.Value("int8"), "input": datasets.Value("string"), "target": datasets.Value("string"),
        "label": datasets.Value("int32"), "ent_start": datasets.Sequence(datasets.Value("int32")),
        "ent_end": datasets.Sequence(datasets.Value("int32")), "ent_type": datasets.Sequence(datasets.Value("int32")),
    })
    # Validation happens inside the generator: the first bad record stops the build with its file and line.
    import shutil

    try:
        raw = datasets.Dataset.from_generator(_raw_rows, gen_kwargs={"corpus": corpus, "split": split},
                                              features=feats, cache_dir=str(work / "raw"), fingerprint=fp + "-raw")
    except Exception as exc:   # datasets wraps errors raised in the generator; surface our RSGError as it is
        shutil.rmtree(work, ignore_errors=True)
        cause = exc
        while cause is not None and not isinstance(cause, RSGError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    out_feats = datasets.Features({
        "task": datasets.Value("int8"), "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")), "cls": datasets.Value("int32"),
        "ner_bits": datasets.Sequence(datasets.Value("int64")),
        "ner_tag": datasets.Sequence(datasets.Value("int32")),
    })
    tok = raw.map(tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc,
                  fn_kwargs={"tokenizer": fast, "max_length": max_length, "max_target_length": max_target_length,
                             "lm_prefix": lm_prefix},
                  remove_columns=["input", "target", "label", "ent_start", "ent_end", "ent_type"],
                  features=out_feats, new_fingerprint=fp + "-tok", cache_file_name=str(work / "tok.arrow"),
                  desc=f"tokenising {split}")
    tmp = target.with_name(f".{split}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_to_disk(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    del raw, tok
    shutil.rmtree(work, ignore_errors=True)
    return datasets.load_from_disk(str(target)), False


# ---------------------------------------------------------------------------- sampling and batches
def task_indices(ds: Any) -> dict[str, np.ndarray]:
    """Row indices of each task present in the dataset, in row order."""
    col = np.asarray(ds["task"], dtype=np.int64)
    return {t: np.flatnonzero(col == i) for t, i in TASK_INDEX.items() if (col == i).any()}


@lru_cache(maxsize=64)
def _permutation(n: int, seed: int, epoch: int, task: int, rnd: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, task, rnd]).permutation(n)


def stream_positions(n: int, *, seed: int, epoch: int, task: int, start: int, count: int) -> np.ndarray:
    """Positions [start, start+count) of a task's endless stream: fresh permutations of its n rows, one after the
    other. Smaller tasks wrap around within an epoch; the order depends only on (seed, epoch, task), which makes
    resuming mid-epoch reproduce the uninterrupted run exactly."""
    out = np.empty(count, dtype=np.int64)
    pos, filled = start, 0
    while filled < count:
        rnd, off = divmod(pos, n)
        take = min(n - off, count - filled)
        out[filled:filled + take] = _permutation(n, seed, epoch, task, rnd)[off:off + take]
        filled += take
        pos += take
    return out


BATCH_READINGS = ("total", "per-task")


@dataclass(frozen=True)
class BatchPlan:
    """Which examples each micro-step takes, from the tasks' train sizes (in trainer order), torch-free.

    reading "total": `batch_size` sequences per micro-step IN ALL, dealt to the tasks in rotation: the global slot
    s = ((step * grad_accum + micro) * world + rank) * batch_size + j goes to task s mod k (k tasks), so every task
    gets batch_size * grad_accum * world / k sequences per optimizer step, exactly when that divides, else within
    one (12 over 8 tasks: 2 or 1 per micro-step, 3 per optimizer step of 2 micro-steps).
    reading "per-task": `batch_size` sequences of EVERY task per micro-step (k * batch_size in all).
    Each task reads its own endless stream of reshuffled passes (`stream_positions`). An epoch ends when every train
    example has been seen at least once: the task with the most examples per share sets its length, and the others
    repeat (`repeats`).
    """

    sizes: tuple[tuple[str, int], ...]     # (task, train examples), trainer order
    batch_size: int
    grad_accum: int = 1
    world: int = 1
    reading: str = "total"

    def __post_init__(self) -> None:
        if self.reading not in BATCH_READINGS:
            raise RSGError(f"unknown batch reading {self.reading!r}", field="batch-reading",
                           expected=list(BATCH_READINGS))
        if not self.sizes or any(n < 1 for _, n in self.sizes):
            raise RSGError("every trained task needs at least one train example", field="corpus")

    @property
    def tasks(self) -> list[str]:
        return [t for t, _ in self.sizes]

    @property
    def k(self) -> int:
        return len(self.sizes)

    @property
    def per_micro(self) -> int:
        """Sequences one process runs per micro-step, all tasks together."""
        return self.batch_size if self.reading == "total" else self.batch_size * self.k

    @property
    def per_step(self) -> int:
        """Sequences per optimizer step over all micro-steps and processes."""
        return self.per_micro * self.grad_accum * self.world

    @property
    def per_task_per_step(self) -> float:
        """Sequences of each task per optimizer step (on average under the rotation of the "total" reading)."""
        return self.per_step / self.k

    def _before(self, i: int, slot: int) -> int:
        # slots of task i among the global slots [0, slot) ("total" reading)
        return (slot - i + self.k - 1) // self.k

    def taken(self, i: int, steps: int) -> int:
        """Examples of task i (trainer order) read in the first `steps` optimizer steps."""
        if self.reading == "per-task":
            return steps * self.batch_size * self.grad_accum * self.world
        return self._before(i, steps * self.per_step)

    def micro(self, step: int, micro: int, rank: int) -> list[tuple[str, int, int]]:
        """(task, stream start, count) of one process's micro-step; tasks with no slot are left out."""
        g = (step * self.grad_accum + micro) * self.world + rank
        if self.reading == "per-task":
            return [(t, g * self.batch_size, self.batch_size) for t in self.tasks]
        s0 = g * self.batch_size
        out = []
        for i, t in enumerate(self.tasks):
            a, b = self._before(i, s0), self._before(i, s0 + self.batch_size)
            if b > a:
                out.append((t, a, b - a))
        return out

    def step_counts(self, step: int) -> dict[str, int]:
        """Examples of each task in optimizer step `step` over all micro-steps and processes (the divisor that
        makes each task's loss the mean over its examples in the step)."""
        return {t: self.taken(i, step + 1) - self.taken(i, step) for i, t in enumerate(self.tasks)}

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps until every train example has been read at least once."""
        if self.reading == "per-task":
            return max(math.ceil(n / (self.batch_size * self.grad_accum * self.world)) for _, n in self.sizes)
        # task i's n-th example is global slot i + k (n - 1): the epoch must reach past it
        return max(math.ceil((self.k * (n - 1) + i + 1) / self.per_step) for i, (_, n) in enumerate(self.sizes))

    def repeats(self, steps: int | None = None) -> dict[str, float]:
        """How many times each task's data is read in an epoch (or in `steps` optimizer steps): 1.0 = once."""
        steps = self.steps_per_epoch if steps is None else steps
        return {t: self.taken(i, steps) / n for i, (t, n) in enumerate(self.sizes)}

    def describe(self, steps: int | None = None) -> list[str]:
        """Log lines: the reading, examples per task per step, optimizer steps per epoch, repeats per task."""
        steps = self.steps_per_epoch if steps is None else steps
        k, b, acc, w = self.k, self.batch_size, self.grad_accum, self.world
        if self.reading == "total":
            lo, hi = b // k, -(-b // k)
            share = f"{lo}" if lo == hi else f"{lo} or {hi}"
            head = (f"batch reading 'total': {b} sequences per micro-step in all, dealt to the {k} tasks in rotation "
                    f"({share} of each task per micro-step)")
        else:
            head = f"batch reading 'per-task': {b} sequences of each of the {k} tasks per micro-step ({b * k} in all)"
        pt = self.per_task_per_step
        lines = [head + f"; {acc} micro-step(s) x {w} process(es) = {self.per_step} sequences per optimizer step, "
                 f"{pt:g} of each task" + ("" if float(pt).is_integer() else " on average"),
                 f"epoch = every train example seen at least once: {self.steps_per_epoch} optimizer steps"
                 + ("" if steps == self.steps_per_epoch else f" (this run stops each epoch after {steps}: "
                                                              "--max-steps-per-epoch)")]
        sizes = dict(self.sizes)
        lines.append("times each task's data is read per epoch: " + ", ".join(
            f"{t} {r:.2f}x of {sizes[t]}" for t, r in self.repeats().items()))
        return lines


@dataclass
class Batch:
    task: str
    input_ids: Any          # (B, T) long
    attention_mask: Any     # (B, T) long
    target: Any             # mc/nli (B,) long; generation (B, T') long, -100 = pad; ner: softmax (B, T) long class
                            # (0 = outside, 1 + type), -100 = pad; multilabel (B, T, n_types) float 0/1


def collate(rows: dict[str, list], task: str, *, pad_id: int, n_ner: int, device: Any = None,
            ner_loss: str = "softmax") -> Batch:
    """Pad one single-task batch (columnar rows from `ds[indices]`) into tensors."""
    import torch

    from rsg_eval.scoring import pad

    ids = rows["input_ids"]
    input_ids, mask = pad(ids, pad_id)   # (B, T) each
    T = input_ids.shape[1]
    if task in ("mc", "nli"):
        target = torch.as_tensor(rows["cls"], dtype=torch.long)
    elif task == "ner" and ner_loss == "softmax":
        target = torch.full((len(ids), T), -100, dtype=torch.long)
        for i, tags in enumerate(rows["ner_tag"]):
            target[i, : len(tags)] = torch.as_tensor(tags, dtype=torch.long)
    elif task == "ner":
        bits = torch.zeros((len(ids), T), dtype=torch.long)
        for i, b in enumerate(rows["ner_bits"]):
            bits[i, : len(b)] = torch.as_tensor(b, dtype=torch.long)
        target = ((bits.unsqueeze(-1) >> torch.arange(n_ner)) & 1).float()     # (B, T, n_ner)
    else:
        labs = rows["labels"]
        L = max(len(x) for x in labs)
        target = torch.full((len(labs), L), -100, dtype=torch.long)
        for i, x in enumerate(labs):
            target[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
    if device is not None:
        input_ids, mask, target = input_ids.to(device), mask.to(device), target.to(device)
    return Batch(task, input_ids, mask, target)
