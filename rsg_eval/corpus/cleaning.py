"""Cleaning rules with a count of what each one removed, and exact / near-duplicate removal. No torch.

Rules run in this order on every free-text field of a record; each is `drop` (the record goes), `strip` (the
offending characters go, the record stays) or `off`:

| rule    | default | what it matches |
|---------|---------|-----------------|
| control | strip   | control and format characters (Unicode Cc/Cf: NUL, zero-width spaces, soft hyphens, bidi marks) except tab and line breaks |
| markup  | strip   | HTML/XML tags, HTML entities, wiki markup (`[[`, `]]`, `{{`, `}}`, `'''`), Markdown image/link syntax |
| emoji   | drop    | emoji and pictographs (U+1F000-1FAFF, U+2600-27BF, flags, variation selector 16, keycaps) |
| special | drop    | other symbols (Unicode So/Co/Cn/Cs: box drawing, private use, unassigned, U+FFFD), except `special_allow` |

then `length` (characters of the record's main field, bounds per task) and `min_cyrillic` (share of Cyrillic
among the letters of all text fields). Records with character offsets (ner) cannot be stripped without moving the
offsets, so for them `strip` acts as `drop`.

Deduplication is per task: exact (normalised text: case-folded, whitespace collapsed) and near-duplicates by
MinHash LSH over word shingles (LSH band keys kept on disk, see Deduper); the first record of a cluster is kept.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
import tempfile
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from rsg_eval.corpus.records import MAIN_FIELD, RAW, TASKS, text_fields
from rsg_eval.core.errors import RSGError

RULES = ("control", "markup", "emoji", "special")
ACTIONS = ("drop", "strip", "off")

_EMOJI = re.compile(
    "[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u20E3\U0001F1E6-\U0001F1FF\u200D\u2300-\u23FF]"
)
_MARKUP = re.compile(
    r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>"      # <tag attr=...>, </tag>, <br/>
    r"|<!--.*?-->"                                   # comments
    r"|&(?:[A-Za-z]{2,8}|#\d{2,6}|#x[0-9A-Fa-f]{2,6});"  # &nbsp; &#171; &#xAB;
    r"|\[\[|\]\]|\{\{|\}\}|'''"                      # wiki links, templates, bold
    r"|!\[[^\]]*\]\([^)]*\)",                        # Markdown images
    re.S,
)
_KEEP_CONTROL = {"\n", "\t", "\r"}
DEFAULT_ALLOW = "№°§©®™€$£₽"  # symbols (Unicode So/Sc) common in Russian news text
_CYR = re.compile(r"[\u0400-\u04FF]+")
_DIGIT_US = re.compile(r"[\d_]+")
_SPACES = re.compile(r"[ \u00A0]{2,}")

DEFAULT_LENGTH: dict[str, tuple[int, int]] = {RAW: (200, 20000), "ner": (20, 20000), "mc": (20, 20000),
                                              "nli": (5, 5000), "paraphrase": (5, 2000), "qg": (50, 20000),
                                              "qa": (50, 20000), "summarization": (200, 20000),
                                              "title": (100, 20000)}


def _is_control(ch: str) -> bool:
    return ch not in _KEEP_CONTROL and unicodedata.category(ch) in ("Cc", "Cf") and not _EMOJI.match(ch)


def _is_special(ch: str, allow: str) -> bool:
    if ch in allow or _EMOJI.match(ch):
        return False
    return unicodedata.category(ch) in ("So", "Co", "Cn", "Cs") or ch == "\ufffd"


_PLAIN = re.compile(r"[\w ]+")  # letters, digits, "_" and the space: never control or special


@functools.lru_cache(maxsize=1 << 16)
def _char_hit(rule: str, ch: str, allow: str) -> bool:
    return _is_control(ch) if rule == "control" else _is_special(ch, allow)


def _hits(rule: str, text: str, allow: str) -> set[str]:
    """The distinct characters of `text` that `rule` matches. Only what is left after removing word characters and
    spaces is looked at, one cached test per distinct character (a per-character loop over whole texts costs
    ~10 ms per 3 KB text, hours on RULM)."""
    return {c for c in set(_PLAIN.sub("", text)) if _char_hit(rule, c, allow)}


def find(rule: str, text: str, allow: str = DEFAULT_ALLOW) -> bool:
    """Does `rule` match anywhere in `text`?"""
    if rule in ("control", "special"):
        return bool(_hits(rule, text, allow))
    if rule == "markup":
        return _MARKUP.search(text) is not None
    if rule == "emoji":
        return _EMOJI.search(text) is not None
    raise ValueError(rule)


def strip(rule: str, text: str, allow: str = DEFAULT_ALLOW) -> str:
    """`text` without what `rule` matches (markup: entities decoded, tags removed; runs of spaces collapsed)."""
    if rule in ("control", "special"):
        hits = _hits(rule, text, allow)
        out = re.sub("[" + "".join(re.escape(c) for c in sorted(hits)) + "]", "", text) if hits else text
    elif rule == "markup":
        out = _MARKUP.sub(lambda m: html.unescape(m.group(0)) if m.group(0).startswith("&") else " ", text)
    elif rule == "emoji":
        out = _EMOJI.sub("", text)
    else:
        raise ValueError(rule)
    return _SPACES.sub(" ", out).strip() if out != text else out


def cyrillic_share(text: str) -> float:
    """Cyrillic letters / all letters (1.0 for a text without letters, which the length rule handles)."""
    # letters = word characters - digits - "_", counted by deletion (fast runs; no per-character Python loop)
    letters = len(_DIGIT_US.sub("", text)) - len(_WORD.sub("", text))
    return (len(text) - len(_CYR.sub("", text))) / letters if letters else 1.0


@dataclass
class CleanConfig:
    actions: dict[str, str] = field(default_factory=lambda: {"control": "strip", "markup": "strip",
                                                             "emoji": "drop", "special": "drop"})
    special_allow: str = DEFAULT_ALLOW
    length: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_LENGTH))
    min_cyrillic: float = 0.5
    exact_dedup: bool = True
    near_dedup: bool = True
    near_threshold: float = 0.85
    num_perm: int = 128
    shingle: int = 5

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> CleanConfig:
        cfg = cls()
        d = dict(d or {})
        for rule in RULES:
            if rule in d:
                act = str(d.pop(rule))
                if act not in ACTIONS:
                    raise RSGError(f"unknown action {act!r} for cleaning rule {rule!r}", field=f"cleaning.{rule}",
                                   expected=ACTIONS)
                cfg.actions[rule] = act
        if "special_allow" in d:
            cfg.special_allow = str(d.pop("special_allow"))
        for task, bounds in (d.pop("length", None) or {}).items():
            if task not in (RAW, *TASKS) or not (isinstance(bounds, (list, tuple)) and len(bounds) == 2):
                raise RSGError(f"bad length bounds for {task!r}: {bounds!r}", field="cleaning.length",
                               expected=f"{{task: [min_chars, max_chars]}} for tasks {', '.join((RAW, *TASKS))}")
            cfg.length[task] = (int(bounds[0]), int(bounds[1]))
        if "min_cyrillic" in d:
            cfg.min_cyrillic = float(d.pop("min_cyrillic"))
        dd = d.pop("dedup", None) or {}
        cfg.exact_dedup = bool(dd.pop("exact", cfg.exact_dedup))
        cfg.near_dedup = bool(dd.pop("near", cfg.near_dedup))
        cfg.near_threshold = float(dd.pop("threshold", cfg.near_threshold))
        cfg.num_perm = int(dd.pop("num_perm", cfg.num_perm))
        cfg.shingle = int(dd.pop("shingle", cfg.shingle))
        if dd:
            raise RSGError(f"unknown dedup keys {sorted(dd)}", field="cleaning.dedup",
                           expected="exact, near, threshold, num_perm, shingle")
        if d:
            raise RSGError(f"unknown cleaning keys {sorted(d)}", field="cleaning",
                           expected=", ".join((*RULES, "special_allow", "length", "min_cyrillic", "dedup")))
        return cfg


class Cleaner:
    """Applies the rules; `counts[task][rule]` says how many records each rule dropped (`rule`) or changed
    (`rule:stripped`)."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.counts: dict[str, Counter] = {}

    def _count(self, task: str, key: str) -> None:
        self.counts.setdefault(task, Counter())[key] += 1

    def clean(self, rec: dict) -> dict | None:
        """The cleaned record, or None when a rule drops it (counted)."""
        task = rec["task"]
        fields = text_fields(rec)
        has_offsets = task == "ner"
        for rule in RULES:
            act = self.cfg.actions[rule]
            if act == "off":
                continue
            hit = [f for f in fields if find(rule, rec[f], self.cfg.special_allow)]
            if not hit:
                continue
            if act == "drop" or has_offsets:
                self._count(task, rule)
                return None
            rec = dict(rec)
            for f in hit:
                rec[f] = strip(rule, rec[f], self.cfg.special_allow)
            self._count(task, f"{rule}:stripped")
        lo, hi = self.cfg.length.get(task, (1, 10**9))
        n = len(rec[MAIN_FIELD.get(task, "text")])
        if n < lo or n > hi or any(not rec[f].strip() for f in fields):
            self._count(task, "length")
            return None
        if self.cfg.min_cyrillic > 0 and cyrillic_share(" ".join(rec[f] for f in fields)) < self.cfg.min_cyrillic:
            self._count(task, "cyrillic")
            return None
        return rec


_WORD = re.compile(r"\w+", re.U)


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.casefold()))


def dedup_key(rec: dict) -> str:
    """The text two records must share to be duplicates. qa/qg: the question and answer (many questions are asked
    about one context, so the context alone would merge them); others: all text fields."""
    if rec["task"] in ("qa", "qg"):
        return rec["question"] + "\n" + rec["answer"]
    return "\n".join(rec[f] for f in text_fields(rec))


@functools.lru_cache(maxsize=16)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that minimise the equal-weighted false positive + false negative probability mass
    of the LSH S-curve 1 - (1 - s^r)^b around `threshold`: the same choice as datasketch's MinHashLSH (checked in
    the tests), e.g. 8 bands of 16 rows for 0.85 and 128 permutations."""
    import numpy as np

    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 1.x calls it trapz
    s = np.linspace(0.0, 1.0, 2001)
    lo = s <= threshold
    best: tuple[float, int, int] | None = None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s ** r) ** b
            fp = trapezoid(p[lo], s[lo])
            fn = trapezoid(1.0 - p[~lo], s[~lo]) if (~lo).sum() > 1 else 0.0
            err = 0.5 * fp + 0.5 * fn
            if best is None or err < best[0]:
                best = (float(err), b, r)
    assert best is not None
    return best[1], best[2]


class KeyStore:
    """A set of signed 64-bit keys in an SQLite file: membership queries and inserts in batches.

    RAM is SQLite's page cache (`cache_mb`) whatever the number of keys; the keys themselves live on disk
    (~15-20 bytes each with the B-tree's overhead). `path=None` makes a temporary file removed on close.
    """

    def __init__(self, path: Path | None = None, cache_mb: int = 8) -> None:
        import sqlite3

        self._tmp = None
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rsg-dedup-")
            path = Path(self._tmp.name) / "keys.sqlite"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for p in (path, path.with_name(path.name + "-journal")):
            p.unlink(missing_ok=True)   # one build's keys only: never an earlier run's
        self.path = path
        self.con = sqlite3.connect(str(path), isolation_level=None)
        # a scratch index: no journal and no fsync (a crash only costs this run's dedup state, rebuilt on rerun)
        self.con.execute("PRAGMA journal_mode=OFF")
        self.con.execute("PRAGMA synchronous=OFF")
        self.con.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")
        self.con.execute("CREATE TABLE k (h INTEGER PRIMARY KEY)")
        self.size = 0

    def contains(self, keys: Iterable[int]) -> set[int]:
        """The subset of `keys` already stored."""
        keys = sorted(set(keys))
        found: set[int] = set()
        for i in range(0, len(keys), 900):   # below SQLite's oldest limit on bound parameters (999)
            part = keys[i:i + 900]
            found.update(r[0] for r in self.con.execute(
                f"SELECT h FROM k WHERE h IN ({','.join('?' * len(part))})", part))
        return found

    def add(self, keys: Iterable[int]) -> None:
        keys = sorted(set(keys))   # in key order: each B-tree page is visited once per batch
        if keys:
            self.con.execute("BEGIN")
            self.con.executemany("INSERT OR IGNORE INTO k VALUES (?)", ((k,) for k in keys))
            self.con.execute("COMMIT")
            self.size += len(keys)

    def close(self) -> None:
        self.con.close()   # idempotent
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _key(*parts: bytes) -> int:
    """A signed 64-bit key (SQLite's INTEGER) of the parts."""
    return int.from_bytes(hashlib.blake2b(b"\0".join(parts), digest_size=8).digest(), "little", signed=True)


_P = 0x9E3779B97F4A7C15   # odd 64-bit multiplier (golden ratio constant) combining a shingle's word values


@functools.lru_cache(maxsize=4)
def _hash_family(num_perm: int) -> tuple[Any, Any]:
    """(a, b) of num_perm multiply-shift hash functions h(x) = ((a * x + b) mod 2^64) >> 32, a odd; seeded."""
    import numpy as np

    rng = np.random.RandomState(1)
    a = rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.randint(0, 1 << 62, size=num_perm, dtype=np.uint64)
    return a, b


class MinHasher:
    """MinHash signatures of texts over word k-shingles, vectorised (datasketch 2 spends ~0.5 ms per record on
    setting up its MinHash objects; this takes ~0.05 ms).

    Each word gets a 32-bit value (CRC-32 of its UTF-8 bytes, computed in C for all words at once), a shingle the
    polynomial sum_j v[i+j] * P^j mod 2^64 of its k words (all windows at once, as the leakage guard does for
    n-grams), and the signature the minimum over the shingles of each of num_perm multiply-shift hash functions.
    The fraction of equal signature entries of two texts estimates the Jaccard similarity of their shingle sets.
    """

    def __init__(self, num_perm: int = 128, shingle: int = 5) -> None:
        import numpy as np

        self.num_perm, self.k = num_perm, shingle
        self.a, self.b = _hash_family(num_perm)
        self._pows = np.array([pow(_P, j, 1 << 64) for j in range(shingle)], dtype=np.uint64)   # (k,)

    def shingles(self, words: list[str]) -> Any:
        """(S,) uint64 values of the word k-shingles (one shingle of all words when there are fewer than k)."""
        import numpy as np

        vals = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))   # (W,)
        k = min(self.k, len(words))
        n = len(words) - k + 1
        acc = vals[:n].copy()                                                                     # (S,)
        with np.errstate(over="ignore"):
            for j in range(1, k):   # k vector steps instead of a (S, k) product and sum
                acc += vals[j:j + n] * self._pows[j]
        return acc

    def __call__(self, text: str) -> Any:
        """(num_perm,) uint64 signature of a normalised text (words separated by spaces; not empty)."""
        import numpy as np

        sh = self.shingles(text.split())                                                          # (S,)
        with np.errstate(over="ignore"):
            return ((sh[:, None] * self.a[None, :] + self.b[None, :]) >> np.uint64(32)).min(axis=0)   # (P,)


class Deduper:
    """Streaming per-task exact + near-duplicate filter; the first record of a cluster is kept.

    Near duplicates: MinHash signatures (`MinHasher`: `num_perm` hash functions over word shingles) cut into LSH
    bands (bands x rows from `lsh_params`, as datasketch's MinHashLSH would). Instead of an in-memory
    MinHashLSH (a Python dict entry per band per record: GBs at paper size), each band becomes one 64-bit key
    (hash of task, band number, band values) in a `KeyStore` on disk, next to one key per record for the exact
    check. A record is a near duplicate when it shares a band key with a kept record of its task, i.e. exactly
    datasketch's LSH candidate rule; memory stays at SQLite's page cache however many records pass.

    `filter` checks records in batches (one query and one insert per batch) with the same decisions as `keep`
    record by record.
    """

    def __init__(self, cfg: CleanConfig, path: Path | None = None, *, batch: int = 512) -> None:
        self.cfg = cfg
        self.counts: dict[str, Counter] = {}
        self.batch = batch
        self.bands, self.rows = lsh_params(cfg.near_threshold, cfg.num_perm)
        self.store = KeyStore(path)
        self.minhash = MinHasher(cfg.num_perm, cfg.shingle)

    def keys(self, rec: dict) -> tuple[int | None, list[int]]:
        """(exact key or None, band keys) of a record."""
        task = rec["task"].encode()
        norm = normalise(dedup_key(rec))
        exact = _key(task, b"exact", norm.encode("utf-8")) if self.cfg.exact_dedup else None
        bands: list[int] = []
        if self.cfg.near_dedup and norm:
            sig = self.minhash(norm)
            r = self.rows
            bands = [_key(task, b"band%d" % b, sig[b * r:(b + 1) * r].tobytes()) for b in range(self.bands)]
        return exact, bands

    def _decide(self, recs: list[dict]) -> list[bool]:
        keyed = [self.keys(r) for r in recs]
        stored = self.store.contains(k for e, bs in keyed for k in ([e] if e is not None else []) + bs)
        seen: set[int] = set()   # keys of records kept earlier in this batch
        new: list[int] = []
        out = []
        for rec, (exact, bands) in zip(recs, keyed):
            if exact is not None and (exact in stored or exact in seen):
                self.counts.setdefault(rec["task"], Counter())["exact duplicate"] += 1
                out.append(False)
                continue
            if any(b in stored or b in seen for b in bands):
                self.counts.setdefault(rec["task"], Counter())["near duplicate"] += 1
                out.append(False)
                continue
            mine = ([exact] if exact is not None else []) + bands
            seen.update(mine)
            new.extend(mine)
            out.append(True)
        self.store.add(new)
        return out

    def keep(self, rec: dict) -> bool:
        if not (self.cfg.exact_dedup or self.cfg.near_dedup):
            return True
        return self._decide([rec])[0]

    def filter(self, recs: Iterable[dict]) -> Iterator[dict]:
        if not (self.cfg.exact_dedup or self.cfg.near_dedup):
            yield from recs
            return
        buf: list[dict] = []
        for rec in recs:
            buf.append(rec)
            if len(buf) >= self.batch:
                yield from (r for r, ok in zip(buf, self._decide(buf)) if ok)
                buf = []
        if buf:
            yield from (r for r, ok in zip(buf, self._decide(buf)) if ok)

    def close(self) -> None:
        self.store.close()
