"""Small file helpers: atomic writes, storage errors in words, and strict JSON Lines reading. Stdlib only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rsg_eval.core.errors import RSGError
from rsg_eval.core.limits import JSON_DEPTH, LINE_BYTES, YAML_NODES

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
    what = "this file" if path is not None else "an output"
    return WriteError(f"could not write {what}: {why}. {remedy(why)}: finished work is kept", file=path)


def remedy(why: str) -> str:
    """What the user does about a storage failure `why` (from write_failure), as a sentence without its stop."""
    if why == _STORAGE_ERRNOS[errno.EROFS]:  # no space to free: another place is the only way
        return ("Write elsewhere (a --run, --root or --out on a writable disk), or remount the file system "
                "writable, and run the command again")
    return "Free some space (or write elsewhere) and run the same command again"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (data files and zips can be large)."""
    h = hashlib.sha256()
    with open_regular(path) as fh:
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
    rec = loads_json(line, file=source, line=lineno, expected="one JSON object per line")
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
    fh = open_regular(path)
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


# ----------------------------------------------------------------------------------------- safe readers
#
# Every JSON and YAML the tool reads goes through these: data and prediction lines, run folders' config.json,
# metrics.json and states, model folders' config.json, safetensors headers, corpus sources, templates, configs.
# A crafted file (nested 5,000 deep, an integer of 5,000 digits, a lone surrogate, a YAML alias bomb) is one
# RSGError naming the file, line and field, never a RecursionError, ValueError or minutes of work.

def open_regular(path: str | Path):
    """`path` opened for binary reading, refused (RSGError) unless it is a regular file.

    A FIFO is opened non-blocking (a plain open() would wait for a writer forever) and refused from its fstat;
    a folder, a device or a socket likewise. Missing -> "file not found"."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RSGError("file not found", file=path) from None
    except IsADirectoryError:
        raise RSGError("a folder, not a file", file=path, expected="a regular file") from None
    except OSError as exc:
        raise RSGError(f"cannot be read ({exc.strerror or exc})", file=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else \
                "a device or socket"
            raise RSGError(f"{kind}, not a file", file=path, expected="a regular file")
        if hasattr(os, "O_NONBLOCK"):
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def zip_member_problem(info: Any) -> str | None:
    """Why a zip member (zipfile.ZipInfo) cannot be read by Python's zipfile, before trying: encrypted, or
    compressed with a method it lacks (AES, deflate64, ...). None when it can be read. Both readers of zips
    (data zips, prediction zips) ask this first, so neither meets zipfile's RuntimeError/NotImplementedError."""
    import zipfile

    if info.flag_bits & 0x1:
        return "is encrypted (password-protected); zip it again without a password"
    supported = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
    if info.compress_type not in supported:
        return (f"uses compression method {info.compress_type}, which Python's zipfile cannot read; zip it again "
                "with deflate (the default of every zip tool)")
    return None


def is_regular_file(path: str | Path) -> bool:
    """True for a regular file (following symlinks); False for a FIFO, folder, device, dangling link, missing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_bytes(path: str | Path, cap: int | None = None) -> bytes:
    """A regular file's bytes (open_regular), at most `cap` of them plus one (callers compare with `cap`)."""
    with open_regular(path) as fh:
        return fh.read() if cap is None else fh.read(cap + 1)


def read_text(path: str | Path, *, encoding: str = "utf-8-sig") -> str:
    """A regular file's text; "not UTF-8 text" named with its line instead of a UnicodeDecodeError."""
    data = read_bytes(path)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise RSGError("not UTF-8 text", file=path, line=data[: exc.start].count(b"\n") + 1) from None


# A \u escape of a surrogate (D800-DFFF) in JSON text: only then can a parsed string hold a lone one
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Brackets outside strings, for the depth check (strings are removed first)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _json_depth_over(text: str, cap: int) -> bool:
    """True when the JSON `text` nests lists/objects deeper than `cap`. Cheap for ordinary text: a text with
    fewer than `cap` opening brackets cannot be that deep (str.count runs in C)."""
    if text.count("[") + text.count("{") <= cap:
        return False
    depth = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > cap:
                return True
        else:
            depth -= 1
    return False


def _lone_surrogate(value: Any, path: str = "", depth: int = 0) -> str | None:
    """The field path ("" for the top) of the first string (key or value) in `value` holding a lone
    surrogate, else None. Iterative over lists/dicts up to the depth limit checked before."""
    stack = [(value, path)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(v, dict):
            for k, x in v.items():
                sub = f"{where}.{k}" if where else str(k)
                if isinstance(k, str):
                    try:
                        k.encode("utf-8")
                    except UnicodeEncodeError:
                        return where or "(a key)"
                stack.append((x, sub))
        elif isinstance(v, list):
            stack.extend((x, f"{where}[{i}]") for i, x in enumerate(v))
    return None


def surrogate_error(field: str | None, *, file: Any = None, line: int | None = None) -> RSGError:
    return RSGError("a lone surrogate (\\ud800-\\udfff without its pair) in a string: not valid Unicode text, "
                    "which no tokenizer or file can hold", file=file, line=line, field=field or None,
                    expected="text written as UTF-8, or surrogate pairs that form one character")


def loads_json(text: str | bytes, *, file: Any = None, line: int | None = None, expected: Any = None) -> Any:
    """Parse JSON text safely: RSGError naming `file` and `line` for invalid JSON, nesting deeper than
    RSG_MAX_JSON_DEPTH, an integer beyond Python's conversion limit (4,300 digits) and a lone surrogate.

    The checks cost nothing for ordinary text (one str.count, one regex search)."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RSGError("not UTF-8 text", file=file,
                           line=(line or 1) + bytes(text)[: exc.start].count(b"\n")) from None
    cap = JSON_DEPTH.value()
    if _json_depth_over(text, cap):
        raise JSON_DEPTH.error(f"JSON nested more than {cap:,} levels deep", file=file, line=line)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        at = (line + exc.lineno - 1) if line is not None else exc.lineno
        col = f" at column {exc.colno}" if line is not None else ""
        tail = "; the line may be truncated" if line is not None else ""
        raise RSGError(f"not valid JSON ({exc.msg}{col}){tail}", file=file, line=at, expected=expected) from None
    except RecursionError:  # unreachable after the depth check unless the limit was raised very high
        raise JSON_DEPTH.error("JSON nested too deep to read", file=file, line=line) from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise RSGError(f"a number too long to read ({_short_reason(exc)})", file=file, line=line,
                       expected="numbers of at most 4,300 digits") from None
    if _SURROGATE_ESCAPE.search(text):
        where = _lone_surrogate(value)
        if where is not None:
            raise surrogate_error(where, file=file, line=line)
    return value


def _short_reason(exc: BaseException) -> str:
    text = str(exc).split(";")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def read_json(path: str | Path, *, max_bytes: int | None = None) -> Any:
    """A JSON file parsed with `loads_json` (a regular file only: a FIFO or folder is one line). With
    `max_bytes`, a larger file is refused before it is read."""
    path = Path(path)
    data = read_bytes(path, max_bytes)
    if max_bytes is not None and len(data) > max_bytes:
        raise RSGError(f"over {max_bytes:,} bytes, too large for this file", file=path)
    return loads_json(data, file=path)


def json_depth(value: Any) -> int:
    """How deep lists and dicts nest in a parsed value (iterative: a deep value cannot overflow the stack)."""
    best, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            best = max(best, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, (list, tuple)):
            best = max(best, d)
            stack.extend((x, d + 1) for x in v)
    return best


def load_yaml(text: str, *, file: Any = None) -> Any:
    """Parse YAML with yaml.SafeLoader, bounded: RSGError naming `file` (and the line) for a syntax error, an
    alias bomb (more than RSG_MAX_YAML_NODES values once aliases are expanded), nesting deeper than
    RSG_MAX_JSON_DEPTH, an integer beyond Python's conversion limit or a lone surrogate.

    PyYAML builds an aliased value once and shares it, so a bomb loads fast; it is everything that walks the
    result afterwards (hashing settings, rendering, comparing) that runs for minutes. So the expanded size is
    counted while the document is composed, before anything is built."""
    import yaml

    budget, depth_cap = YAML_NODES.value(), JSON_DEPTH.value()

    class _Bounded(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._sizes: dict[int, int] = {}
            self._depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
            if self.check_event(yaml.AliasEvent):
                return super().compose_node(parent, index)
            self._depth += 1
            if self._depth > depth_cap:
                mark = self.peek_event().start_mark
                raise JSON_DEPTH.error(f"YAML nested more than {depth_cap:,} levels deep", file=file,
                                       line=mark.line + 1)
            try:
                node = super().compose_node(parent, index)
            finally:
                self._depth -= 1
            if isinstance(node, yaml.SequenceNode):
                kids = node.value
            elif isinstance(node, yaml.MappingNode):
                kids = [x for pair in node.value for x in pair]
            else:
                kids = []
            size = 1 + sum(self._sizes.get(id(k), 1) for k in kids)
            self._sizes[id(node)] = size
            if size > budget:
                raise YAML_NODES.error(f"the YAML expands to more than {budget:,} values (aliases *name "
                                       "repeating other values: an alias bomb?)", file=file,
                                       line=node.start_mark.line + 1)
            return node

    loader = _Bounded(text)
    try:
        value = loader.get_single_data()
    except RSGError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RSGError(f"not valid YAML: {problem}", file=file,
                       line=mark.line + 1 if mark is not None else None) from None
    except RecursionError:
        raise JSON_DEPTH.error("YAML nested too deep to read", file=file) from None
    except ValueError as exc:  # an integer beyond the conversion limit, a bad date, ...
        raise RSGError(f"a value that cannot be read ({_short_reason(exc)})", file=file) from None
    finally:
        loader.dispose()
    if json_depth(value) > depth_cap:  # merge keys (<<) can nest deeper than the text shows
        raise JSON_DEPTH.error(f"YAML nested more than {depth_cap:,} levels deep", file=file)
    where = _lone_surrogate(value)
    if where is not None:
        raise surrogate_error(where, file=file)
    return value


def read_yaml(path: str | Path) -> Any:
    """A YAML file (regular file only) parsed with `load_yaml`."""
    return load_yaml(read_text(path), file=path)
