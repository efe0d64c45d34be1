"""Small file helpers: atomic writes, storage errors in words, and strict JSON Lines reading. Stdlib only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rsg_eval.core.errors import RSGError
from rsg_eval.core.limits import LINE_BYTES

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and `os.replace`.

    A crash (or a full disk) leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    with guarded_write(path):
        _atomic_write_bytes(path, data)
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
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


# ----------------------------------------------------------------------------------------- storage errors

class WriteError(RSGError):
    """Writing an output failed for a reason the user can fix (full disk, quota, read-only file system).

    Raised by every writer of the package (atomic writers, checkpoint savers) after removing its temporary
    files, so the output is either the old one or absent, never half-written."""


# errno -> the reason in words. Only conditions of the storage, not bugs: a full disk is the user's to fix.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is larger than the file system allows",
    errno.EROFS: "the file system is read-only",
}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) report an errno


def write_failure(exc: BaseException, path: str | Path | None = None) -> str | None:
    """The reason a write failed, in words, when `exc` is a storage condition the user can fix; else None.

    Knows a plain OSError (its errno), safetensors' SafetensorError (text "... (os error 28)") and torch.save's
    RuntimeError from its zip writer, which carries no errno ("[enforce fail at inline_container.cc] unexpected
    pos ..."): that one is read as a full disk when the folder has less than 64 MiB free."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the storage error may be the cause of a library error
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[exc.errno]
        text = str(exc)
        # sqlite3 (the corpus builder's dedup index) reports SQLITE_FULL (13) as "database or disk is full"
        if getattr(exc, "sqlite_errorcode", None) == 13 or (
                type(exc).__module__ == "sqlite3" and "database or disk is full" in text):
            return "the disk is full"
        m = _OS_ERROR_IN_TEXT.search(text) if type(exc).__name__ == "SafetensorError" else None
        if m and int(m.group(1)) in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[int(m.group(1))]
        # torch's writer only: its reader fails with "PytorchStreamReader failed reading ..." (a damaged file)
        if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or
                                              ("inline_container" in text and "unexpected pos" in text)):
            free = _free_bytes(path)
            if free is not None and free < 64 << 20:
                return f"the disk is full ({free >> 20} MiB free)"
            return "torch could not write the file (the disk may be full)"
        exc = exc.__cause__ or exc.__context__
    return None


def _free_bytes(path: str | Path | None) -> int | None:
    p = Path(path) if path is not None else None
    while p is not None and not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p if p is not None else ".").free
    except OSError:
        return None


def storage_error(exc: BaseException, path: str | Path | None) -> WriteError | None:
    """A WriteError naming `path` and what to do, when `exc` is a storage condition (see write_failure)."""
    why = write_failure(exc, path)
    if why is None:
        return None
    return WriteError(f"could not write {'this file' if path is not None else 'an output'}: {why}. Free some "
                      "space (or write elsewhere) and run the same command again: finished work is kept", file=path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (data files and zips can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def guarded_write(path: str | Path | None) -> Iterator[None]:
    """Turn a storage failure inside the block into a WriteError naming `path`; other errors pass unchanged.

    The block is responsible for removing its own temporary files (it sees the original exception first)."""
    try:
        yield
    except RSGError:
        raise
    except Exception as exc:
        err = storage_error(exc, path)
        if err is None:
            raise
        raise err from None


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


_NON_EMPTY_LINE = re.compile(r"[^\n]+")


def iter_lines(text: str, source: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, line) for every non-empty line of `text`, split on "\\n" only; a CRLF's "\\r" stays on
    the line (callers strip it).

    Not str.splitlines(): that also breaks at \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85, U+2028 and U+2029, and JSON
    allows U+0085, U+2028 and U+2029 raw inside strings, so a RuCoS entity holding one would be cut in two.
    Runs of empty lines are skipped inside the regex engine: a file of a billion newlines costs no memory and
    little time. A line longer than RSG_MAX_LINE_BYTES (UTF-8) is an RSGError naming `source` and the line."""
    cap = LINE_BYTES.value()
    lineno, pos = 1, 0
    for m in _NON_EMPTY_LINE.finditer(text):
        lineno += text.count("\n", pos, m.start())
        pos = m.start()
        line = m.group()
        # A character is 1 to 4 bytes in UTF-8: encode only the lines whose length leaves it open.
        if len(line) > cap // 4 and (len(line) > cap or len(line.encode("utf-8", "surrogatepass")) > cap):
            raise LINE_BYTES.error("line too long", file=source, line=lineno)
        yield lineno, line


def iter_jsonl_text(text: str, source: str) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from JSON Lines text; tolerate a BOM, CRLF and blank lines.

    Lines are split on "\\n" only (see iter_lines). Raises RSGError naming `source` and the line for a
    non-JSON line, a line that is not an object, or a line over RSG_MAX_LINE_BYTES.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, raw in iter_lines(text, source):
        rec = _parse_line(raw, source, lineno)
        if rec is not None:
            yield lineno, rec


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Stream (line number, record) from a JSON Lines file without reading it whole (corpora reach ~1 GB).

    Reads bytes line by line (split on b"\\n" only) so that a bad UTF-8 sequence is reported on its own line;
    BOM and CRLF tolerated. A line is read with a bound (RSG_MAX_LINE_BYTES), so a file that is one huge
    line fails fast instead of filling memory.
    """
    path = Path(path)
    cap = LINE_BYTES.value()
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise RSGError("file not found", file=path) from None
    with fh:
        lineno = 0
        while True:
            raw = fh.readline(cap + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > cap and not raw.endswith(b"\n"):
                raise LINE_BYTES.error("line too long", file=path, line=lineno)
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
