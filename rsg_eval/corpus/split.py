"""The seeded train/val split of the multi-task corpus (`rsg_eval.corpus.build`): by groups, so the pieces of one
document never straddle it, and the same in memory (`split_task`) and streamed (the builder's `val_groups`); plus
the length percentiles the build summary reports.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from rsg_eval.corpus.stage import key64


def percentiles(values: Iterable[int] | Mapping[int, int], qs: Iterable[int] = (5, 50, 95)) -> dict[str, int]:
    """Nearest-rank percentiles (p5, p50, p95) and the max, of values or of a {value: count} histogram; {} for
    none."""
    hist = Counter(values) if not isinstance(values, Mapping) else values
    n = sum(hist.values())
    if not n:
        return {}
    items = sorted(hist.items())
    out = {}
    for q in qs:
        rank = min(n - 1, max(0, -(-q * n // 100) - 1))   # 0-based nearest rank
        seen = 0
        for v, c in items:
            seen += c
            if seen > rank:
                out[f"p{q}"] = v
                break
    out["max"] = items[-1][0]
    return out


def val_groups(keys: Any, counts: Any, *, n: int, val_fraction: float, val_max: int | None, distinct_more: bool
                ) -> Any:
    """The validation groups: the groups with the smallest seeded keys (a seeded shuffle of the groups), taken
    while fewer than round(val_fraction * n) records (at most val_max) are in val, always leaving a group for
    train. `keys`/`counts` are the smallest distinct group keys ascending and their record counts;
    `distinct_more` says whether more distinct groups exist than were passed."""
    import numpy as np

    if val_fraction <= 0 or (keys.size < 2 and not distinct_more):
        return keys[:0]
    target = max(1, round(val_fraction * n))
    if val_max is not None:
        target = min(target, val_max)
    if target <= 0:
        return keys[:0]
    before = np.concatenate([[0], np.cumsum(counts)[:-1]])   # records in val before taking each group
    k = int((before < target).sum())
    if not distinct_more:
        k = min(k, keys.size - 1)
    return keys[:k]


class KeySet:
    """Membership in a sorted uint64 array: 8 bytes per key (a Python set of ints takes ~70)."""

    def __init__(self, keys: Any) -> None:
        import numpy as np

        self.keys = np.sort(np.asarray(keys, dtype=np.uint64))

    def __contains__(self, key: int) -> bool:
        import numpy as np

        if not self.keys.size:
            return False
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        return i < self.keys.size and int(self.keys[i]) == key

    def __len__(self) -> int:
        return int(self.keys.size)


def split_task(recs: list[dict], *, seed: int, task: str, val_fraction: float, val_max: int | None
               ) -> tuple[list[dict], list[dict]]:
    """Seeded train/val split of one task by groups (pieces of one document never straddle the split); the same
    rule the streaming builder applies."""
    import numpy as np

    gk = [key64(seed, "split", task, r.get("_group") or r["id"]) for r in recs]
    keys, counts = np.unique(np.array(gk, dtype=np.uint64), return_counts=True)
    val = set(val_groups(keys, counts, n=len(recs), val_fraction=val_fraction, val_max=val_max,
                          distinct_more=False).tolist())
    return [r for r, k in zip(recs, gk) if k not in val], [r for r, k in zip(recs, gk) if k in val]
