"""Small file helpers: atomic writes and strict JSON Lines reading. Stdlib only."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rsg_eval.errors import RSGError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and `os.replace`.

    A crash (or a full disk) leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def dumps_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return atomic_write_text(path, dumps_jsonl(rows))


def _parse_line(line: str, source: str, lineno: int) -> dict | None:
    """One JSON Lines line -> its object (None for a blank line); RSGError naming the file and line."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RSGError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); the line may be truncated",
            file=source, line=lineno, expected="one JSON object per line",
        ) from None
    if not isinstance(rec, dict):
        raise RSGError(f"a JSON {type(rec).__name__} instead of an object",
                       file=source, line=lineno, expected="one JSON object per line")
    return rec


def iter_jsonl_text(text: str, source: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from JSON Lines text; tolerate a BOM, CRLF and blank lines.

    Raises RSGError naming `source` and the line for a non-JSON line or a line that is not an object.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, raw in enumerate(text.splitlines(), start=1):
        rec = _parse_line(raw, source, lineno)
        if rec is not None:
            yield lineno, rec


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Stream (line number, record) from a JSON Lines file without reading it whole (corpora reach ~1 GB).

    Reads bytes line by line so that a bad UTF-8 sequence is reported on its own line; BOM and CRLF tolerated.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise RSGError("file not found", file=path) from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RSGError("not UTF-8 text", file=path, line=lineno) from None
            rec = _parse_line(text, str(path), lineno)
            if rec is not None:
                yield lineno, rec


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Read a JSON Lines file into (line number, record) pairs; errors name the file and line."""
    return list(iter_jsonl(path))
