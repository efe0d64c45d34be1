"""Peak memory of `rsg build-corpus` against the number of records (`rsg bench corpus`). No torch.

Each size runs in a fresh Python process that builds a corpus from a synthetic source and reports its own peak
resident set size (Linux: VmHWM from /proc/self/status; elsewhere ru_maxrss): everything the process held at its
worst moment, the interpreter and imported modules included (~37 MB), not only Python objects (tracemalloc would
miss numpy buffers and SQLite's page cache). The synthetic records are summarisation pairs (texts of ~60-110 words
from a 20 000-word vocabulary with Zipf-like frequencies, summaries of ~15 words) with 1 % exact copies, 1 %
near copies (one word changed) and 1 % texts with emoji, so cleaning, both dedup kinds, the leakage guard
(against the bundled RSG sample), the capped split and the shuffled writing all do real work.

The peer ("naive") is the builder as it was before streaming: every record kept in Python lists until the end,
near duplicates found with datasketch's in-memory MinHashLSH over MinHash objects, the split and shuffle done in
memory. It runs the same cleaning and leakage guard.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_SYLLABLES = ("ка", "ло", "ми", "на", "ре", "ст", "во", "пра", "ти", "до", "зе", "мо", "гу", "ры", "бе", "ща",
              "ль", "ко", "по", "ше", "ви", "ар", "ен", "ол", "ус")


def _vocab(n: int, rng: random.Random) -> list[str]:
    words: dict[str, None] = {}
    while len(words) < n:
        words["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))] = None
    return list(words)


def write_synthetic(path: Path, n: int, seed: int = 0) -> dict[str, int]:
    """n JSON lines {"id", "body", "summary"} into `path`, streamed; returns how many of each kind were made."""
    rng = random.Random(seed)
    vocab = _vocab(20_000, rng)
    weights = [1.0 / (r + 1) for r in range(len(vocab))]   # Zipf-like word frequencies
    cum = list(__import__("itertools").accumulate(weights))
    made = {"plain": 0, "exact copy": 0, "near copy": 0, "emoji": 0}
    recent: list[tuple[str, str]] = []

    def sentence(k: int) -> str:
        words = rng.choices(vocab, cum_weights=cum, k=k)
        return words[0].capitalize() + " " + " ".join(words[1:]) + "."

    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = rng.random()
            if recent and r < 0.01:
                body, summary = rng.choice(recent)
                kind = "exact copy"
            elif recent and r < 0.02:
                body, summary = rng.choice(recent)
                words = body.split()
                words[rng.randrange(len(words))] = rng.choice(vocab)
                body, kind = " ".join(words), "near copy"
            else:
                body = " ".join(sentence(rng.randint(8, 14)) for _ in range(rng.randint(6, 9)))
                summary = sentence(rng.randint(10, 18))
                kind = "plain"
                if r < 0.03:
                    body, kind = body + " 🔥", "emoji"
            made[kind] += 1
            if kind == "plain":
                recent.append((body, summary))
                if len(recent) > 1000:
                    recent.pop(rng.randrange(len(recent)))
            fh.write(json.dumps({"id": f"s{i}", "body": body, "summary": summary}, ensure_ascii=False) + "\n")
    return made


def _config(source: Path) -> dict[str, Any]:
    return {"seed": 0, "val_fraction": 0.05,
            "sources": [{"name": "synthetic", "kind": "pairs", "task": "summarization", "path": str(source),
                         "fields": {"text": "body", "summary": "summary"}}],
            "cleaning": {"min_cyrillic": 0.5, "length": {"summarization": [100, 20000]}},
            "leakage": {"rsg_data": "sample", "ngram": 13}}


def _peak_mb() -> float:
    """This process' peak resident set size in MB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this address space. Not ru_maxrss: Linux keeps the
    larger of the parent's size at fork and the child's own peak in it across exec, so a child started from a
    big process (a test runner holding models) would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024   # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / (1 << 20)   # kB on Linux, bytes on macOS


def child(source: str, out: str, naive: bool) -> None:
    """Build once from `source` into `out` and print {"peak_mb", "seconds", ...} as JSON (run in its own process)."""
    from rsg_eval.corpus.config import parse_config

    cfg = parse_config(_config(Path(source)), Path(source).parent)
    t0 = time.perf_counter()
    if naive:
        built = naive_build(cfg, Path(out))
        disk = 0
    else:
        from rsg_eval.corpus.build import BuildOptions, build_corpus

        s = build_corpus(cfg, Path(out), BuildOptions(progress=False, echo=lambda m: None))
        built = s["total"]["train"] + s["total"]["val"]
        disk = (Path(out) / "work" / "dedup.sqlite").stat().st_size
    print(json.dumps({"peak_mb": round(_peak_mb(), 1), "seconds": round(time.perf_counter() - t0, 1),
                      "built": built, "dedup_index_mb": round(disk / 1e6, 1)}))


def naive_build(cfg: Any, out: Path) -> int:
    """The in-memory way (the builder before streaming), for comparison: lists, datasketch's MinHashLSH."""
    import hashlib

    from datasketch import MinHash, MinHashLSH

    from rsg_eval.corpus.build import leakage_index, public_record, BuildOptions, split_task, write_jsonl_atomic
    from rsg_eval.corpus.build import read_source
    from rsg_eval.corpus.cleaning import Cleaner, dedup_key, normalise
    from rsg_eval.corpus.records import Problems

    cleaner = Cleaner(cfg.cleaning)
    guard, _ = leakage_index(cfg, BuildOptions(echo=lambda m: None))
    lsh = MinHashLSH(threshold=cfg.cleaning.near_threshold, num_perm=cfg.cleaning.num_perm)
    seen: set[bytes] = set()
    recs: list[dict] = []
    for src in cfg.sources:
        for rec in read_source(src, cfg, Problems(), {}):
            rec = cleaner.clean(rec)
            if rec is None:
                continue
            norm = normalise(dedup_key(rec))
            digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            words = norm.split()
            mh = MinHash(num_perm=cfg.cleaning.num_perm, seed=1)
            mh.update_batch([" ".join(words[i:i + 5]).encode() for i in range(max(1, len(words) - 4))])
            if lsh.query(mh):
                continue
            lsh.insert(str(len(recs)), mh)
            if guard is not None and not guard.keep(rec):
                continue
            recs.append(rec)
    train, val = split_task(recs, seed=cfg.seed, task="summarization", val_fraction=cfg.val_fraction,
                            val_max=cfg.val_max)
    rng = random.Random(cfg.seed)
    rng.shuffle(train)
    rng.shuffle(val)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / "train.jsonl", (public_record(r) for r in train))
    write_jsonl_atomic(out / "val.jsonl", (public_record(r) for r in val))
    return len(train) + len(val)


def measure(n: int, *, naive: bool = False, workdir: Path | None = None, timeout: int = 7200) -> dict[str, Any]:
    """Write n synthetic records, build them in a fresh process, return that process' report."""
    with tempfile.TemporaryDirectory(prefix="rsg-bench-corpus-", dir=workdir) as tmp:
        src = Path(tmp) / "synthetic.jsonl"
        made = write_synthetic(src, n)
        env = dict(os.environ, PYTHONHASHSEED="0")
        code = ("import sys; from rsg_eval.bench.corpus import child; "
                f"child({str(src)!r}, {str(Path(tmp) / 'out')!r}, {naive!r})")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode != 0:
            from rsg_eval.core.errors import RSGError

            raise RSGError(f"the {n}-record run failed: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
        rep = json.loads(r.stdout.strip().splitlines()[-1])
        rep.update({"records": n, "way": "naive" if naive else "streaming", "made": made,
                    "source_mb": round(src.stat().st_size / 1e6, 1)})
        return rep
