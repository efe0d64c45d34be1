"""Records on disk between the builder's stages, so its memory does not grow with the corpus. Stdlib only.

- `Spool`: an append-only JSON Lines file (one per task, and one of raw texts), read back as a stream.
- `HashSorter`: an external sort by a 64-bit key. Records go into 256 bucket files by the key's top byte; reading
  sorts one bucket at a time (a bucket above `max_bytes` is split again by the next byte), so memory is one
  bucket. Sorting by a seeded hash of the record id is how the builder shuffles (the order of the raw texts
  the teachers draw from, the order of train.jsonl) without holding the corpus.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import IO, Any, Iterator


def key64(*parts: Any) -> int:
    """An unsigned 64-bit hash of the parts (stable across processes and machines, unlike hash())."""
    data = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class Spool:
    """Append records to a JSON Lines file; iterate them back in order."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] | None = open(self.path, "w", encoding="utf-8", newline="\n")
        self.count = 0

    def add(self, rec: dict) -> None:
        assert self._fh is not None, "spool already closed"
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __iter__(self) -> Iterator[dict]:
        self.close()
        return iter_spool(self.path)


def iter_spool(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


class _Buckets:
    """Lines appended to many files through small in-memory buffers: at most one file is open at a time (an OS
    allows a process a few hundred), and at most `max_buffer` characters (~2 MB of Cyrillic text) wait in
    memory."""

    def __init__(self, folder: Path, max_buffer: int = 1 << 20) -> None:
        self.folder = folder
        self.max_buffer = max_buffer
        self._buf: dict[str, list[str]] = {}
        self._size = 0
        self.names: set[str] = set()

    def add(self, name: str, line: str) -> None:
        self._buf.setdefault(name, []).append(line)
        self._size += len(line)
        if self._size >= self.max_buffer:
            self.flush()

    def flush(self) -> None:
        for name, lines in self._buf.items():
            with open(self.folder / f"{name}.tsv", "a", encoding="utf-8", newline="\n") as fh:
                fh.writelines(lines)
            self.names.add(name)
        self._buf, self._size = {}, 0


class HashSorter:
    """Records sorted by a 64-bit key (ties: the order they were added), through bucket files on disk."""

    def __init__(self, folder: Path, *, max_bytes: int = 64 << 20) -> None:
        self.folder = Path(folder)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self.max_bytes = max_bytes
        self._buckets = _Buckets(self.folder)
        self.count = 0

    def add(self, key: int, rec: dict) -> None:
        line = f"{key:016x}\t{self.count:012d}\t{json.dumps(rec, ensure_ascii=False)}\n"
        self._buckets.add(line[:2], line)   # the key's top byte
        self.count += 1

    def __iter__(self) -> Iterator[dict]:
        self._buckets.flush()
        for name in sorted(self._buckets.names):
            yield from self._sorted(self.folder / f"{name}.tsv", level=1)

    def _sorted(self, path: Path, level: int) -> Iterator[dict]:
        if path.stat().st_size <= self.max_bytes or level >= 8:
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()
            lines.sort()   # "key<TAB>sequence<TAB>json": hex keys sort as numbers, the sequence breaks ties
            for line in lines:
                yield json.loads(line.split("\t", 2)[2])
            return
        # too big to sort in memory: split by the key's next byte (its first level + 1 bytes as a prefix)
        sub = path.with_suffix(".d")
        sub.mkdir()
        parts = _Buckets(sub)
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                parts.add(line[: 2 * (level + 1)], line)
        parts.flush()
        path.unlink()
        for name in sorted(parts.names):
            yield from self._sorted(sub / f"{name}.tsv", level + 1)

    def cleanup(self) -> None:
        self._buckets = _Buckets(self.folder)
        shutil.rmtree(self.folder, ignore_errors=True)


class SmallestKeys:
    """The `k` smallest distinct 64-bit keys of a stream, each with how often it occurred, in O(k) memory.

    Keys arrive through `add`; every `chunk` keys the buffer is merged into the kept set and cut back to the k
    smallest. A key cut off can never return: the k-th smallest key only decreases as keys arrive, so a later
    copy of a cut key is cut again, and the counts of the kept keys are exact. Used to pick a seeded sample
    (the records with the smallest hashes) and the validation groups (the groups with the smallest hashes)
    without holding every key.
    """

    def __init__(self, k: int, chunk: int = 1 << 16) -> None:
        import numpy as np

        self.k = max(0, int(k))
        self.chunk = chunk
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._buf: list[int] = []
        self.seen = 0          # keys added (with repeats)

    def add(self, key: int) -> None:
        self.seen += 1
        if self.k:
            self._buf.append(key)
            if len(self._buf) >= self.chunk:
                self._merge()

    def _merge(self) -> None:
        import numpy as np

        if not self._buf:
            return
        keys = np.concatenate([self.keys, np.array(self._buf, dtype=np.uint64)])
        counts = np.concatenate([self.counts, np.ones(len(self._buf), dtype=np.int64)])
        self._buf = []
        uniq, inv = np.unique(keys, return_inverse=True)        # sorted
        summed = np.bincount(inv, weights=counts, minlength=uniq.size).astype(np.int64)
        self.keys, self.counts = uniq[: self.k], summed[: self.k]

    def result(self) -> tuple[Any, Any]:
        """(keys ascending, their counts): the k smallest distinct keys (fewer when fewer were seen)."""
        self._merge()
        return self.keys, self.counts
