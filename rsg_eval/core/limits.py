"""Size and work limits that keep crafted input from taking all memory, disk or time. Stdlib only.

Each limit has a default far above anything the real RSG data, submissions or templates need, and an environment
variable that raises (or lowers) it. An error caused by a limit names the limit and that variable, so the user
knows both what was refused and how to allow it. docs/bad-input.md lists them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rsg_eval.core.errors import RSGError

MiB = 1 << 20
#: the largest value any limit accepts: far above every real need, and small enough for every use of a limit (a
#: read size, a slice, a loop bound) to stay a machine integer (10^26 made `readline` raise OverflowError)
MAX_VALUE = 10 ** 15


@dataclass(frozen=True)
class Limit:
    env: str          # the environment variable that overrides the default
    default: int
    unit: str         # "bytes", "characters", ... (for messages)
    what: str         # what is limited, for docs and messages

    def value(self) -> int:
        """The limit in force: the environment variable when set (a positive integer), else the default."""
        raw = os.environ.get(self.env)
        if raw is None or not raw.strip():
            return self.default
        text = raw.strip().replace(",", "").replace("_", "")
        n = int(text) if text.isdecimal() and len(text) <= 20 else 0  # isdecimal: no sign, no int() digit limit
        if not 0 < n <= MAX_VALUE:
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            raise RSGError(f"{self.env}={shown!r} is not a positive integer of at most {MAX_VALUE:,}", field=self.env,
                           expected=f"a number of {self.unit}; the default is {self.default:,}")
        return n

    def hint(self) -> str:
        """'limit: N units (RSG_X; set RSG_X=... to raise it)' for the end of an error message."""
        return f"limit {self.value():,} {self.unit}: set the environment variable {self.env} to a larger number " \
               f"to allow it"

    def error(self, message: str, **where) -> RSGError:
        """An RSGError for input over this limit: `message` first, then the limit and how to raise it."""
        return RSGError(f"{message} ({self.hint()})", **where)


# Reading files.
LINE_BYTES = Limit("RSG_MAX_LINE_BYTES", 16 * MiB, "bytes",
                   "one line of a JSON Lines file (data, predictions, run logs, corpora)")
SUBMISSION_BYTES = Limit("RSG_MAX_SUBMISSION_BYTES", 32 * MiB, "bytes",
                         "one prediction file, uncompressed (the largest official one, RUSSE, is under 1 MB)")
# Data zips (`--data some.zip`, `rsg data download`): checked before anything is extracted.
ZIP_BYTES = Limit("RSG_MAX_ZIP_BYTES", 2048 * MiB, "bytes",
                  "the task files extracted from one data zip, uncompressed, together")
ZIP_RATIO = Limit("RSG_MAX_ZIP_RATIO", 100, "to 1",
                  "the compression ratio of one member of a data zip (JSON Lines text compresses about 5 to 1)")
# Prompts.
PROMPT_CHARS = Limit("RSG_MAX_PROMPT_CHARS", 100_000, "characters",
                     "a rendered prompt or answer choice, and any string a template builds")
CHARS_PER_TOKEN = Limit("RSG_MAX_CHARS_PER_TOKEN", 32, "characters per token",
                        "how much of a text field is kept before tokenisation: the model's input length in tokens "
                        "times this (a token is 2 to 5 characters of Russian text)")
TEMPLATE_STEPS = Limit("RSG_MAX_TEMPLATE_STEPS", 10_000, "steps",
                       "loop iterations, calls and filters (a macro call counts 10) while rendering one template "
                       "for one item; the bundled templates take under 100")

# Structured files (JSON, YAML): nesting and the size of a YAML document once its aliases are expanded.
JSON_DEPTH = Limit("RSG_MAX_JSON_DEPTH", 100, "levels",
                   "how deep lists and objects nest in a JSON or YAML value (the RSG data nests 5 deep)")
YAML_NODES = Limit("RSG_MAX_YAML_NODES", 100_000, "nodes",
                   "the values of one YAML file once its aliases (*name) are expanded (an alias bomb expands to "
                   "billions); the bundled templates and configs hold under 1,000")

ALL: tuple[Limit, ...] = (LINE_BYTES, SUBMISSION_BYTES, ZIP_BYTES, ZIP_RATIO, PROMPT_CHARS, CHARS_PER_TOKEN,
                          TEMPLATE_STEPS, JSON_DEPTH, YAML_NODES)


def check_all() -> None:
    """Read every limit once (the CLI does at start): a variable out of range is one line before any work, not
    the same complaint in every cell of a table or an OverflowError deep in a reader."""
    for limit in ALL:
        limit.value()


def cut_text(text: str, max_tokens: int) -> str:
    """`text` cut to `max_tokens` x RSG_MAX_CHARS_PER_TOKEN characters, its start kept: what a tokenizer that
    truncates to `max_tokens` keeps lies inside (no token spans that many characters), and a crafted 200 MB
    text never reaches the tokenizer whole (fast tokenizers encode everything before truncating)."""
    cap = max_tokens * CHARS_PER_TOKEN.value()
    return text[:cap] if len(text) > cap else text
