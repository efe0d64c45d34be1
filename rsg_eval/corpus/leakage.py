"""The leakage guard: drop corpus examples that share a long word n-gram with an RSG val or test text. No torch.

RULM holds news and encyclopedia text, and so do RuCoS, DaNetQA and MuSeRC. An example whose text shares
`n` consecutive word tokens (default 13, the GPT-3 contamination window) with any val/test passage, question,
premise, hypothesis or sentence of the RSG data is dropped, so that zero-shot scores of a model trained on the
corpus are not inflated by memorised evaluation text.

Tokens are case-folded `\\w+` runs. Each token gets a 32-bit value (CRC-32 of its UTF-8 bytes, computed in C
without a Python call per token and without a cache that would grow with the corpus); an n-gram's value is the
polynomial sum_j v[i+j] * P**j mod 2**64, computed for all windows of a text at once with numpy. The RSG side
is a sorted uint64 array, so memory is 8 bytes per distinct n-gram and a lookup is a binary search.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from typing import Any, Iterable

import numpy as np

from rsg_eval.corpus.records import text_fields

_WORD = re.compile(r"\w+", re.U)
_P = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio constant)


class NgramIndex:
    """Distinct word n-grams of a set of reference texts, each tagged with the reference it came from."""

    def __init__(self, n: int = 13) -> None:
        if n < 3:
            raise ValueError("n-gram length below 3 would drop ordinary phrases")
        self.n = n
        self._pows = np.array([pow(int(_P), j, 1 << 64) for j in range(n)], dtype=np.uint64)  # (n,)
        self._parts: list[np.ndarray] = []
        self._owners: list[np.ndarray] = []
        self.names: list[str] = []  # owner id -> "RuCoS/val" etc.
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.owner = np.zeros(0, dtype=np.int32)

    def ngram_hashes(self, text: str) -> np.ndarray:
        """(T - n + 1,) uint64 values of the text's word n-grams (empty when it has fewer than n words)."""
        toks = _WORD.findall(text.casefold())
        if len(toks) < self.n:
            return np.zeros(0, dtype=np.uint64)
        vals = np.fromiter(map(zlib.crc32, map(str.encode, toks)), dtype=np.uint64, count=len(toks))  # (T,)
        m = len(toks) - self.n + 1
        acc = vals[:m].copy()  # (T-n+1,)
        with np.errstate(over="ignore"):
            for j in range(1, self.n):  # n vector steps; wraps mod 2**64
                acc += vals[j:j + m] * self._pows[j]
        return acc

    def add(self, texts: Iterable[str], name: str) -> int:
        """Index reference texts under `name`; returns how many distinct texts were added."""
        owner = len(self.names)
        self.names.append(name)
        seen: set[str] = set()
        for t in texts:
            if t in seen:
                continue
            seen.add(t)
            h = self.ngram_hashes(t)
            if h.size:
                self._parts.append(h)
                self._owners.append(np.full(h.size, owner, dtype=np.int32))
        return len(seen)

    def freeze(self) -> None:
        """Merge the added parts into one sorted array (call after the last add)."""
        if self._parts:
            h = np.concatenate([self.hashes, *self._parts])
            o = np.concatenate([self.owner, *self._owners])
            order = np.argsort(h, kind="stable")
            self.hashes, self.owner = h[order], o[order]
            self._parts, self._owners = [], []

    def __len__(self) -> int:
        return int(self.hashes.size)

    def match(self, text: str) -> str | None:
        """The name of a reference that shares an n-gram with `text`, or None."""
        if not self.hashes.size:
            return None
        h = self.ngram_hashes(text)
        if not h.size:
            return None
        pos = np.searchsorted(self.hashes, h)  # (W,)
        pos = np.minimum(pos, self.hashes.size - 1)
        hit = np.nonzero(self.hashes[pos] == h)[0]
        if not hit.size:
            return None
        return self.names[int(self.owner[pos[hit[0]]])]


def _strings(fields: Any) -> Iterable[str]:
    for v in fields.values():
        if isinstance(v, str):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, str))


def build_rsg_index(data: Any, n: int = 13, splits: tuple[str, ...] = ("val", "test")) -> tuple[NgramIndex, dict]:
    """Index every text field of every RSG task's val/test items (those present in `data`).

    Returns the index and {"Task/split": number of distinct texts} for the summary.
    """
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.tasks import TASK_NAMES, get_task
    from rsg_eval.core.data import load_items

    src = resolve_data(data)
    index = NgramIndex(n)
    seen: dict[str, int] = {}
    done_files: set[str] = set()
    for task in TASK_NAMES:
        for split in splits:
            if split not in get_task(task).splits and task != "LiDiRus":
                continue
            if not src.has(task, split):
                continue
            path = str(src.path(task, split))
            if path in done_files:  # LiDiRus: val and test are one file
                continue
            done_files.add(path)
            items = load_items(src, task, split)
            seen[f"{task}/{split}"] = index.add((s for it in items for s in _strings(it.fields)), f"{task}/{split}")
    index.freeze()
    return index, seen


class LeakageGuard:
    """Drops records whose text fields share an n-gram with the index; counts drops per task and RSG source."""

    def __init__(self, index: NgramIndex) -> None:
        self.index = index
        self.dropped: Counter = Counter()
        self.matched: dict[str, Counter] = {}

    def keep(self, rec: dict, fields: tuple[str, ...] | None = None) -> bool:
        for f in fields or text_fields(rec):
            hit = self.index.match(rec[f])
            if hit is not None:
                self.dropped[rec["task"]] += 1
                self.matched.setdefault(rec["task"], Counter())[hit] += 1
                return False
        return True

    def to_json(self) -> dict:
        return {"ngram": self.index.n, "reference_ngrams": len(self.index), "dropped_per_task": dict(self.dropped),
                "matched_rsg": {t: dict(c) for t, c in self.matched.items()}}
