"""The one user-facing error type: it names the file, line, field and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


class RSGError(Exception):
    """A problem the user can fix (bad input file, unknown name, bad option).

    The CLI prints it without a traceback and exits with status 2.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        expected: Any = None,
    ) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.expected = expected
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file + (f":{self.line}" if self.line is not None else "") + ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        field = f"field '{self.field}': " if self.field else ""
        exp = ""
        if self.expected is not None:
            e = self.expected
            if isinstance(e, (list, tuple, set, frozenset)):
                e = ", ".join(repr(x) if not isinstance(x, str) else x for x in e)
            exp = f" (expected: {e})"
        return f"{where}{field}{self.message}{exp}"


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception (`commands._common.stop_signals`): every `except KeyboardInterrupt` and
    `finally` that saves finished work and releases a run folder's lock runs for it as for Ctrl-C; the CLI then
    exits with status 143 (128 + SIGTERM) instead of 130."""


def clip(text: str, limit: int = 300) -> str:
    """`text` cut to about `limit` characters, its middle replaced by "... (N characters) ...": a message built
    from crafted input (an entity of 100,000 fragments, a 200 MB line) stays one readable line."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = max(limit // 2 - 20, 10)
    return f"{text[:half]}... ({len(text):,} characters) ...{text[-half:]}"


def choices_text(values: Iterable[Any]) -> str:
    """Comma-separated list of valid choices, for error messages."""
    return ", ".join(str(v) for v in values)
