"""Readers for the sources a user brings. Stdlib only (Parquet through pyarrow, imported when needed).

Every reader yields corpus records (dicts with `task`, the task's fields, `source`, `id`, and an internal `_group`
that keeps pieces of one document on the same side of the train/val split). A bad row is reported to `Problems`
(file and line named) and skipped, or stops the run in strict mode.

Tables: `.jsonl` (also `.jsonl.gz`, `.jsonl.zst` with the `zstandard` package), `.csv` / `.tsv` (header row),
`.parquet`. A folder is read file by file in sorted order.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
from pathlib import Path
from typing import Any, Iterator

from rsg_eval.corpus.records import NLI_LABELS, Problems, make_id
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import loads_json, open_regular
from rsg_eval.core.limits import LINE_BYTES

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".jsonl.zst", ".csv.gz", ".txt")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in sorted(TABLE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _open_binary(path: Path) -> Any:
    """A source file as a binary stream (decompressed for .gz/.zst); a regular file only (a FIFO never blocks)."""
    name = path.name.lower()
    fh = open_regular(path)
    if name.endswith(".gz"):
        return gzip.open(fh, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            fh.close()
            raise RSGError("reading .zst needs the `zstandard` package (pip install zstandard), or decompress "
                           "the file first (zstd -d FILE)", file=path) from None
        return zstandard.ZstdDecompressor().stream_reader(fh, closefd=True)
    return fh


def _lines(file: Path, fh: Any, problems: Problems, source: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a binary stream, read with a bound (RSG_MAX_LINE_BYTES): a line over
    it, or one that is not UTF-8, is named (problems) and skipped, never read whole or a traceback."""
    cap = LINE_BYTES.value()
    lineno = 0
    while True:
        try:
            raw = fh.readline(cap + 1)
        except (OSError, EOFError, ValueError) as exc:  # a damaged .gz/.zst stream
            problems.add(source, RSGError(f"damaged compressed file ({exc})", file=file, line=lineno + 1))
            return
        if not raw:
            return
        lineno += 1
        if len(raw) > cap and not raw.endswith(b"\n"):
            problems.add(source, LINE_BYTES.error("line too long", file=file, line=lineno))
            while raw and not raw.endswith(b"\n"):  # skip the rest of it without keeping it
                raw = fh.readline(cap + 1)
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.add(source, RSGError(f"not UTF-8 text (byte {exc.start} of the line)", file=file, line=lineno))


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in suffixes)
        if not files:
            raise RSGError("no readable files in this folder", file=path, expected=", ".join(suffixes))
        return files
    raise RSGError("source path not found", file=path)


def iter_rows(path: Path, problems: Problems, source: str) -> Iterator[tuple[Path, int, dict]]:
    """(file, line or row number, row) for every row of a JSONL/CSV/TSV/Parquet file or folder of them."""
    for file in _files(path, (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz", ".jsonl.zst", ".csv.gz")):
        suf = _suffix(file)
        if suf == ".parquet":
            yield from _parquet_rows(file)
        elif suf in (".csv", ".tsv", ".csv.gz"):
            with _open_binary(file) as fh:
                reader = csv.DictReader((text for _, text in _lines(file, fh, problems, source)),
                                        delimiter="\t" if suf == ".tsv" else ",")
                for row in reader:
                    # DictReader's line_num is the physical line of the row's end (1-based, header = 1).
                    if None in row:
                        problems.add(source, RSGError("more cells than header columns", file=file,
                                                      line=reader.line_num))
                        continue
                    yield file, reader.line_num, row
        else:
            with _open_binary(file) as fh:
                for lineno, line in _lines(file, fh, problems, source):
                    if not line.strip():
                        continue
                    try:
                        row = loads_json(line, file=file, line=lineno)
                    except RSGError as err:
                        problems.add(source, err)
                        continue
                    if not isinstance(row, dict):
                        problems.add(source, RSGError("not a JSON object", file=file, line=lineno))
                        continue
                    yield file, lineno, row


def _parquet_rows(file: Path) -> Iterator[tuple[Path, int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RSGError("reading Parquet needs pyarrow (pip install pyarrow)", file=file) from None
    n = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield file, n, row  # "line" = row number, 1-based


def _field(row: dict, name: str, file: Path, line: int, *, required: bool = True) -> Any:
    """A column value; dotted names reach into nested JSON objects (`meta.title`)."""
    cur: Any = row
    for part in name.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if required:
                raise RSGError(f"no field {name!r}", file=file, line=line, field=name,
                               expected=", ".join(map(str, row)) or "a non-empty row")
            return None
        cur = cur[part]
    return cur


def _text(row: dict, name: str, file: Path, line: int) -> str:
    val = _field(row, name, file, line)
    if not isinstance(val, str) or not val.strip():
        raise RSGError(f"empty or not text: {val!r}"[:120], file=file, line=line, field=name, expected="a string")
    return val


def _rid(source: str, path: Path, file: Path, line: int, row: dict, id_field: str | None) -> str:
    if id_field and row.get(id_field) is not None:
        return make_id(source, row[id_field])
    rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
    return make_id(source, rel, line)


def iter_texts(path: Path, *, text_field: str = "text", id_field: str | None = None, problems: Problems,
               source: str) -> Iterator[dict]:
    """Raw texts for annotation: a table with a text column, a .txt file (one text), or a folder of .txt files."""
    if path.is_dir() and any(path.rglob("*.txt")) and not any(
            _suffix(p) in (".jsonl", ".parquet", ".csv") for p in path.rglob("*") if p.is_file()):
        for file in sorted(path.rglob("*.txt")):
            try:
                text = file.read_bytes().decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError as exc:
                problems.add(source, RSGError(f"not UTF-8 text (byte {exc.start})", file=file))
                continue
            if not text.strip():
                problems.add(source, RSGError("empty file", file=file))
                continue
            rid = make_id(source, file.relative_to(path).as_posix())
            yield {"task": "text", "text": text, "_src": source, "id": rid, "_group": rid}
        return
    if path.is_file() and _suffix(path) == ".txt":
        text = path.read_bytes().decode("utf-8", errors="replace").lstrip("\ufeff")
        yield {"task": "text", "text": text, "_src": source, "id": make_id(source, path.name),
               "_group": make_id(source, path.name)}
        return
    for file, line, row in iter_rows(path, problems, source):
        try:
            text = _text(row, text_field, file, line)
        except RSGError as err:
            problems.add(source, err)
            continue
        rid = _rid(source, path, file, line, row, id_field)
        yield {"task": "text", "text": text, "_src": source, "id": rid, "_group": rid}


def _map_label(raw: Any, label_map: dict[str, Any] | None, allowed: tuple[str, ...] | None, file: Path,
               line: int, field: str) -> str | None:
    """Raw label -> class name. None = dropped on purpose (mapped to null). RSGError for an unknown label."""
    key = str(raw).strip() if not isinstance(raw, bool) else str(raw).lower()
    if label_map is not None:
        if key not in label_map:
            raise RSGError(f"label {raw!r} is not in the label map", file=file, line=line, field=field,
                           expected=", ".join(label_map))
        name = label_map[key]
        if name is None:
            return None
    else:
        name = key
    if allowed is not None and name not in allowed:
        raise RSGError(f"label {name!r} is not a class of this head", file=file, line=line, field=field,
                       expected=", ".join(allowed))
    return str(name)


def iter_topics(path: Path, *, text_field: str = "text", label_field: str = "label",
                label_map: dict[str, Any] | None, classes: tuple[str, ...] | None, id_field: str | None = None,
                problems: Problems, source: str, dropped: dict[str, int]) -> Iterator[dict]:
    """Topic classification rows -> `mc` records; `label_map` maps the source's labels to the head's classes."""
    for file, line, row in iter_rows(path, problems, source):
        try:
            text = _text(row, text_field, file, line)
            label = _map_label(_field(row, label_field, file, line), label_map, classes, file, line, label_field)
        except RSGError as err:
            problems.add(source, err)
            continue
        if label is None:
            dropped["label mapped to null"] = dropped.get("label mapped to null", 0) + 1
            continue
        rid = _rid(source, path, file, line, row, id_field)
        yield {"task": "mc", "text": text, "label": label, "_src": source, "id": rid, "_group": rid}


def iter_nli(path: Path, *, premise_field: str = "premise", hypothesis_field: str = "hypothesis",
             label_field: str = "label", label_map: dict[str, Any] | None, id_field: str | None = None,
             problems: Problems, source: str, dropped: dict[str, int]) -> Iterator[dict]:
    """NLI pairs -> `nli` records; `label_map` maps label names/ids to entailment / contradiction / neutral."""
    for file, line, row in iter_rows(path, problems, source):
        try:
            premise = _text(row, premise_field, file, line)
            hypothesis = _text(row, hypothesis_field, file, line)
            label = _map_label(_field(row, label_field, file, line), label_map, NLI_LABELS, file, line, label_field)
        except RSGError as err:
            problems.add(source, err)
            continue
        if label is None:
            dropped["label mapped to null"] = dropped.get("label mapped to null", 0) + 1
            continue
        rid = _rid(source, path, file, line, row, id_field)
        yield {"task": "nli", "premise": premise, "hypothesis": hypothesis, "label": label, "_src": source,
               "id": rid, "_group": rid}


def iter_pairs(path: Path, *, task: str, fields: dict[str, str], group_field: str | None = None,
               id_field: str | None = None, problems: Problems, source: str) -> Iterator[dict]:
    """Ready pairs for a generation task (paraphrase/simplification, qa, qg, summarization, title).

    `fields` maps each of the task's fields to a column, e.g. {source: "INPUT:source", target: "OUTPUT:output"}.
    Rows with the same `group_field` value (or, by default, the same first field: e.g. one source sentence with
    several references) stay on one side of the train/val split.
    """
    from rsg_eval.corpus.records import TASK_FIELDS

    want = TASK_FIELDS[task]
    missing = [f for f in want if f not in fields]
    if missing:
        raise RSGError(f"source {source!r}: no column given for {missing}", field="fields", expected=list(want))
    for file, line, row in iter_rows(path, problems, source):
        try:
            rec = {f: _text(row, fields[f], file, line) for f in want}
        except RSGError as err:
            problems.add(source, err)
            continue
        rid = _rid(source, path, file, line, row, id_field)
        group = str(row.get(group_field)) if group_field else rec[want[0]]
        gid = hashlib.blake2b(group.encode("utf-8"), digest_size=8).hexdigest()
        yield {"task": task, **rec, "_src": source, "id": rid, "_group": make_id(source, "g", gid)}
