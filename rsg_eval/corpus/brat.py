"""NEREL's brat standoff format (.txt + .ann) -> our NER records, character offsets kept. Stdlib only.

An entity line is `T<n>\\t<TYPE> <start> <end>[;<start> <end>...]\\t<surface text>`; offsets are characters of the
.txt, end exclusive. Nested and overlapping entities are kept as they are. Relation (R), event (E), attribute
(A/M), normalisation (N, NEREL v1.1's Wikidata links) and note (#) lines are ignored.

Discontinuous entities (`s1 e1;s2 e2`) become, by the `discontinuous` option: `span` (default) one entity over
s1..e_last that also carries `fragments: [[s1, e1], [s2, e2]]`; `fragments` one entity per fragment; `drop` none.

Some NEREL .txt files start with a byte-order mark. Whether a tool counted it in the offsets differs, so the BOM is
removed from the text and the offsets are shifted by one when that makes more surface texts match; likewise a
text with CRLF line ends is read with LF when the offsets were counted that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rsg_eval.corpus.records import Problems, make_id
from rsg_eval.core.errors import RSGError, clip

_SPAN = re.compile(r"^(\d{1,15}) (\d{1,15})$")  # 15 digits: far past any text, never int()'s limit


@dataclass(frozen=True)
class Entity:
    type: str
    spans: tuple[tuple[int, int], ...]
    surface: str
    line: int


def _decode(path: Path) -> str:
    from rsg_eval.core.io import read_bytes

    try:
        return read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RSGError(f"not UTF-8 text (byte {exc.start})", file=path) from None


def parse_ann_line(line: str, path: Path, lineno: int) -> Entity | None:
    """One .ann line -> an Entity (T lines) or None (other kinds); RSGError for a malformed T line."""
    if not line.strip() or line[0] in "RAMENU#*":
        return None
    if line[0] != "T":
        raise RSGError(f"unknown annotation line {line[:40]!r}", file=path, line=lineno,
                       expected="T/R/E/A/M/N/# lines")
    parts = line.split("\t")
    if len(parts) < 3:
        raise RSGError("an entity line needs three tab-separated columns", file=path, line=lineno,
                       expected="T<n>\\t<TYPE> <start> <end>\\t<text>")
    head = parts[1].split(" ", 1)
    if len(head) != 2 or not head[0]:
        raise RSGError(f"no type and offsets in {clip(repr(parts[1]), 120)}", file=path, line=lineno,
                       expected="<TYPE> <start> <end>")
    spans = []
    for frag in head[1].split(";"):
        m = _SPAN.match(frag.strip())
        if not m:
            raise RSGError(f"bad offsets {clip(repr(head[1]), 120)}", file=path, line=lineno,
                           expected="<start> <end>[;<start> <end>...]")
        s, e = int(m.group(1)), int(m.group(2))
        if e <= s:
            raise RSGError(f"end {e} not after start {s}", file=path, line=lineno)
        spans.append((s, e))
    return Entity(head[0], tuple(spans), "\t".join(parts[2:]), lineno)


def _surface(text: str, spans: tuple[tuple[int, int], ...], shift: int) -> str | None:
    out = []
    for s, e in spans:
        s, e = s - shift, e - shift
        if s < 0 or e > len(text):
            return None
        out.append(text[s:e])
    return " ".join(out)


def _matches(text: str, ent: Entity, shift: int) -> bool:
    got = _surface(text, ent.spans, shift)
    # brat writes the fragments of a discontinuous entity joined by one space; compare whitespace-insensitively.
    return got is not None and got.split() == ent.surface.split()


def read_brat_doc(txt: Path, ann: Path, *, types: tuple[str, ...] | None, type_map: dict[str, str] | None,
                  discontinuous: str, problems: Problems, source: str) -> tuple[str, list[dict]] | None:
    """One document -> (text, entities), or None when a bad entity line made us skip it (counted in problems)."""
    try:
        text = _decode(txt)
        ann_text = _decode(ann).lstrip("\ufeff")
    except RSGError as err:  # a bad document is named and skipped, like a bad row
        problems.add(source, err)
        return None
    had_bom = text.startswith("\ufeff")
    if had_bom:
        text = text[1:]
    ents: list[Entity] = []
    for lineno, line in enumerate(ann_text.splitlines(), start=1):
        try:
            ent = parse_ann_line(line, ann, lineno)
        except RSGError as err:
            problems.add(source, err)
            return None
        if ent is not None:
            ents.append(ent)
    # Readings of the offsets: with or without the BOM as character 0, with CRLF line ends as two characters or
    # as one (a tool that read the file with universal newlines). The first reading that matches the most surface
    # texts wins; ties keep the plain one.
    readings = [(text, 0)] + ([(text, 1)] if had_bom else [])
    if "\r\n" in text:
        readings += [(text.replace("\r\n", "\n"), sh) for _, sh in list(readings)]
    if ents and len(readings) > 1:
        text, shift = max(readings, key=lambda r: sum(_matches(r[0], e, r[1]) for e in ents))
    else:
        shift = 0
    out: list[dict] = []
    for ent in ents:
        etype = type_map.get(ent.type, ent.type) if type_map else ent.type
        if types is not None and etype not in types:
            problems.add(source, RSGError(f"entity type {ent.type!r} is not one of the NER classes", file=ann,
                                          line=ent.line, field="type", expected="the types in labels.ner or type_map"))
            return None
        last = max(e for _, e in ent.spans) - shift
        if min(s for s, _ in ent.spans) - shift < 0 or last > len(text):
            problems.add(source, RSGError(f"offsets {clip(str(ent.spans), 120)} outside the text ({len(text)} characters in {txt.name})",
                                          file=ann, line=ent.line))
            return None
        if not _matches(text, ent, shift):
            got = _surface(text, ent.spans, shift)
            problems.add(source, RSGError(f"offsets give {clip(repr(got), 120)} but the line says "
                                          f"{clip(repr(ent.surface), 120)}", file=ann,
                                          line=ent.line, expected="offsets into the .txt in characters"))
            return None
        spans = [(s - shift, e - shift) for s, e in ent.spans]
        if len(spans) == 1:
            out.append({"start": spans[0][0], "end": spans[0][1], "type": etype})
        elif discontinuous == "span":
            out.append({"start": spans[0][0], "end": spans[-1][1], "type": etype, "fragments": [list(p) for p in spans]})
        elif discontinuous == "fragments":
            out.extend({"start": s, "end": e, "type": etype} for s, e in spans)
        # "drop": nothing
    out.sort(key=lambda d: (d["start"], -d["end"], d["type"]))
    return text, out


def chunk_doc(text: str, entities: list[dict], max_chars: int) -> list[tuple[int, str, list[dict]]]:
    """Cut a long document at line breaks into pieces of at most ~max_chars, never inside an entity.

    Returns (offset of the piece in the document, piece text, entities with offsets relative to the piece).
    Empty pieces (blank lines only) are dropped; a single line longer than max_chars stays whole.
    """
    if max_chars <= 0 or len(text) <= max_chars:
        return [(0, text, entities)] if text.strip() else []
    # Candidate cut points: just after each "\n" that no entity straddles.
    covered = [False] * (len(text) + 1)
    for ent in entities:
        for i in range(ent["start"] + 1, ent["end"]):
            covered[i] = True
    cuts = [i + 1 for i, ch in enumerate(text) if ch == "\n" and not covered[i + 1]]
    pieces, start, last_ok = [], 0, None
    for c in cuts + [len(text)]:
        if c - start > max_chars and last_ok is not None:
            pieces.append((start, last_ok))
            start = last_ok
        last_ok = c
    pieces.append((start, len(text)))
    out = []
    for s, e in pieces:
        piece = text[s:e]
        if not piece.strip():
            continue
        ents = [dict(d, start=d["start"] - s, end=d["end"] - s,
                     **({"fragments": [[a - s, b - s] for a, b in d["fragments"]]} if "fragments" in d else {}))
                for d in entities if s <= d["start"] and d["end"] <= e]
        out.append((s, piece, ents))
    return out


def iter_brat(folder: Path, *, types: tuple[str, ...] | None, type_map: dict[str, str] | None = None,
              discontinuous: str = "span", max_chars: int = 0, problems: Problems, source: str) -> Iterator[dict]:
    """NER records from every <name>.txt with a <name>.ann under `folder` (recursively), in sorted path order."""
    if discontinuous not in ("span", "fragments", "drop"):
        raise RSGError(f"unknown discontinuous mode {discontinuous!r}", field="discontinuous",
                       expected=("span", "fragments", "drop"))
    if not folder.is_dir():
        raise RSGError("brat folder not found", file=folder)
    txts = sorted(folder.rglob("*.txt"))
    if not txts:
        raise RSGError("no .txt files", file=folder, expected="brat .txt + .ann pairs")
    for txt in txts:
        ann = txt.with_suffix(".ann")
        if not ann.exists():
            problems.add(source, RSGError("no .ann file next to this .txt", file=txt))
            continue
        doc = read_brat_doc(txt, ann, types=types, type_map=type_map, discontinuous=discontinuous,
                            problems=problems, source=source)
        if doc is None:
            continue
        rel = txt.relative_to(folder).with_suffix("").as_posix()
        for off, piece, ents in chunk_doc(doc[0], doc[1], max_chars):
            rid = make_id(source, rel) if off == 0 and len(piece) == len(doc[0]) else make_id(source, rel, off)
            yield {"task": "ner", "text": piece, "entities": ents, "_src": source, "id": rid,
                   "_group": make_id(source, rel)}
