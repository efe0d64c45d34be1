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
MinHash LSH from `datasketch` over word shingles; the first record of a cluster is kept.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from rsg_eval.corpus.records import MAIN_FIELD, RAW, TASKS, text_fields
from rsg_eval.errors import RSGError

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


class Deduper:
    """Streaming per-task exact + near-duplicate filter (datasketch MinHash LSH). First seen wins."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.cfg = cfg
        self.exact: dict[str, set[bytes]] = {}
        self.lsh: dict[str, Any] = {}
        self.counts: dict[str, Counter] = {}
        self._n = 0

    def _minhash(self, norm: str) -> Any:
        from datasketch import MinHash

        words = norm.split()
        k = self.cfg.shingle
        shingles = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}
        mh = MinHash(num_perm=self.cfg.num_perm, seed=1)
        mh.update_batch([s.encode("utf-8") for s in shingles])
        return mh

    def keep(self, rec: dict) -> bool:
        task = rec["task"]
        norm = normalise(dedup_key(rec))
        if self.cfg.exact_dedup:
            digest = hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()
            seen = self.exact.setdefault(task, set())
            if digest in seen:
                self.counts.setdefault(task, Counter())["exact duplicate"] += 1
                return False
            seen.add(digest)
        if self.cfg.near_dedup and norm:
            from datasketch import MinHashLSH

            lsh = self.lsh.get(task)
            if lsh is None:
                lsh = self.lsh[task] = MinHashLSH(threshold=self.cfg.near_threshold, num_perm=self.cfg.num_perm)
            mh = self._minhash(norm)
            if lsh.query(mh):
                self.counts.setdefault(task, Counter())["near duplicate"] += 1
                return False
            self._n += 1
            lsh.insert(str(self._n), mh)
        return True

    def filter(self, recs: Iterable[dict]) -> Iterator[dict]:
        for rec in recs:
            if self.keep(rec):
                yield rec
