"""Tokenised multi-task corpus through the `datasets` library: validated once, tokenised once, memory-mapped.

A split becomes an Arrow dataset saved under `<cache_dir>/<fingerprint>/<split>/` and re-opened with
`datasets.load_from_disk` (memory-mapped, so a 950 k-example corpus costs little RAM). The fingerprint covers the
files (path, size, mtime), the label sets, the tokenizer, the length limits and the template version, so any change
re-tokenises and an unchanged corpus is never tokenised twice.

Columns: task (int8, index into TASKS), input_ids (int32), labels (generation target ids ending in </s>; empty
otherwise), cls (mc/nli class index; -1 otherwise), ner_bits (one int64 per input token: bit t set = the token lies
inside an entity of type t; nested entities set several bits; "outside" = 0).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rsg_eval.errors import RSGError
from rsg_eval.hmtl.corpus import Corpus, iter_examples
from rsg_eval.hmtl.labels import GEN_TASKS, TASKS

DATA_VERSION = 1   # bump when templates or the tokenised layout change
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


def tokenize_batch(batch: dict[str, list], *, tokenizer: Any, max_length: int, max_target_length: int,
                   lm_prefix: str) -> dict[str, list]:
    """datasets.map function: encoder inputs, targets with an explicit </s>, class labels, NER bitmasks."""
    gen_ids = {TASK_INDEX[t] for t in GEN_TASKS}
    ner_id = TASK_INDEX["ner"]
    from rsg_eval.limits import cut_text

    # cut by characters first: a fast tokenizer encodes a whole text before truncating it (same ids kept)
    texts = [cut_text(lm_prefix + x if t in gen_ids else x, max_length) for t, x in zip(batch["task"], batch["input"])]
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    out: dict[str, list] = {"input_ids": enc["input_ids"], "labels": [], "cls": batch["label"], "ner_bits": []}
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
        else:
            out["ner_bits"].append([])
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


@dataclass
class Batch:
    task: str
    input_ids: Any          # (B, T) long
    attention_mask: Any     # (B, T) long
    target: Any             # mc/nli (B,) long; ner (B, T, n_types) float 0/1; generation (B, T') long, -100 = pad


def collate(rows: dict[str, list], task: str, *, pad_id: int, n_ner: int, device: Any = None) -> Batch:
    """Pad one single-task batch (columnar rows from `ds[indices]`) into tensors."""
    import torch

    ids = rows["input_ids"]
    T = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    if task in ("mc", "nli"):
        target = torch.as_tensor(rows["cls"], dtype=torch.long)
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
