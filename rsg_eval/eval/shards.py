"""The shard store of a zero-shot run (`rsg_eval.eval.zeroshot`): shards are the unit of work.

A pending task split is cut into runs of `shard_size` items; the cut depends on nothing but the items and the size,
so the same shards (and the same batches inside them, hence the same floats) come out of 1 process or 8, and a
shard scored by an interrupted run of any width is reused by the next. Each finished shard is saved under
state/shards/ at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rsg_eval.core.errors import RSGError
from rsg_eval.eval.plan import Job, ZeroShotOptions
from rsg_eval.runs import RunFolder, fingerprint

SHARD_DIR = Path("state") / "shards"


@dataclass
class Shard:
    key: str           # the input's fingerprint: job parts without the split, plus the shard size
    task: str
    index: int
    start: int
    end: int
    job: Job           # the first pending job with this input (LiDiRus val and test share one input)
    cost: float        # rough work estimate for sharing shards out among processes

    @property
    def id(self) -> tuple[str, int]:
        return self.key, self.index

    @property
    def file_name(self) -> str:
        return f"{self.task}-{self.key[:16]}-{self.index:05d}.json"

    def keys(self) -> list:
        return [it.key for it in self.job.items[self.start:self.end]]


def input_key(job: Job, opts: ZeroShotOptions) -> str:
    return fingerprint({**{k: v for k, v in job.parts.items() if k != "split"}, "shard_size": opts.shard_size})


def item_cost(item: Any) -> float:
    """Characters the encoder reads plus a share per answer choice the decoder scores."""
    chars = sum(len(v) for v in item.fields.values() if isinstance(v, str))
    return chars + 64 * len(item.labels)


def plan_shards(pending: Sequence[Job], opts: ZeroShotOptions) -> tuple[list[Shard], dict[str, list[Job]]]:
    """Shards of the pending jobs (one set per distinct input), in job order, and the jobs of each input."""
    shards: list[Shard] = []
    jobs_of: dict[str, list[Job]] = {}
    for job in pending:
        key = input_key(job, opts)
        if key in jobs_of:
            jobs_of[key].append(job)
            continue
        jobs_of[key] = [job]
        for i, start in enumerate(range(0, len(job.items), opts.shard_size)):
            end = min(start + opts.shard_size, len(job.items))
            shards.append(Shard(key, job.task, i, start, end, job,
                                 sum(item_cost(it) for it in job.items[start:end])))
    return shards, jobs_of


def assign(shards: Sequence[Shard], world: int) -> list[list[Shard]]:
    """Share shards out among `world` processes: each next shard to the least loaded one (ties: lowest rank).
    Who scores a shard never changes what it holds, so this only balances time."""
    loads = [0.0] * world
    out: list[list[Shard]] = [[] for _ in range(world)]
    for sh in shards:
        r = min(range(world), key=lambda i: (loads[i], i))
        loads[r] += sh.cost
        out[r].append(sh)
    return out


def shard_path(run: RunFolder, sh: Shard) -> Path:
    return run.path / SHARD_DIR / sh.file_name


def read_shard(run: RunFolder, sh: Shard) -> dict | None:
    """A finished shard's result from disk, or None when absent or not exactly this shard (then it is redone)."""
    from rsg_eval.core.io import read_json

    path = shard_path(run, sh)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except RSGError:  # damaged or crafted (not JSON, too deep, ...): redone
        return None
    keys = sh.keys()
    rows = data.get("rows") if isinstance(data, dict) else None
    if (not isinstance(rows, list) or data.get("key") != sh.key or data.get("index") != sh.index
            or data.get("keys") != keys or [r.get("key") if isinstance(r, dict) else None for r in rows] != keys):
        return None
    return data


def write_shard(run: RunFolder, sh: Shard, result: dict) -> None:
    from rsg_eval.core.io import atomic_write_json

    path = shard_path(run, sh)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=None)


def remove_stale_shards(run: RunFolder, shards: Sequence[Shard], tasks: set[str]) -> None:
    """Shard files of these tasks that no pending shard will read (other settings, or left by a run killed
    between writing a task and removing its shards) can never be used again: remove them."""
    folder = run.path / SHARD_DIR
    if not folder.is_dir():
        return
    live = {sh.file_name for sh in shards}
    for f in folder.glob("*.json"):
        if f.name.split("-", 1)[0] in tasks and f.name not in live:
            f.unlink(missing_ok=True)
