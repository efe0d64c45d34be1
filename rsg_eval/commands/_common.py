"""Small shared CLI helpers (light: rich and typer only)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

# Rich lays output out for 80 columns when it does not write to a terminal, so a table piped to a file or `less`
# cuts names ("RuCoS-li…"). Off a terminal we give it this wide virtual width instead: tables still take only
# the room they need, and names print whole. A terminal keeps its own width; COLUMNS, when set, wins.
PIPE_WIDTH = 240


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console for command output: the terminal's width, or PIPE_WIDTH when piped or redirected."""
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return probe
    return Console(stderr=stderr, width=PIPE_WIDTH)


console = make_console()
err_console = make_console(stderr=True)

DATA_HELP = "RSG data: a folder like the official download (or a zip of it), or 'sample' for the bundled sample."
DATA_DEFAULT = "the download cache, $RSG_DATA_DIR"


def data_option(default: Optional[str] = None, help: str = DATA_HELP) -> typer.models.OptionInfo:
    return typer.Option(default, "--data", help=help, show_default=DATA_DEFAULT if default is None else True)


def tasks_option(help: str = "Tasks: names, comma-separated or after one --tasks (--tasks TERRa RCB).",
                 default: str = "all nine") -> typer.models.OptionInfo:
    return typer.Option(None, "--tasks", "-t", help=help, show_default=default)


# --threads of the commands that run a model (rsg_eval.models.threads chooses when it is not given). Written here,
# not imported from there, so that --help needs no torch.
THREADS_HELP = ("torch CPU threads. auto: for a small model (weights under 16 MiB, such as tiny) on a CPU, the idle "
                "cores (those not busy with other work, measured at start; at least 1), since threads on busy cores "
                "only wait on each other; otherwise torch's default, one per core. OMP_NUM_THREADS, when set, is respected.")


def quiet_option(help: str = "No progress bars.") -> typer.models.OptionInfo:
    return typer.Option(False, "--quiet", "-q", help=help)


def sharding_option() -> typer.models.OptionInfo:
    """--sharding for the training commands (rsg_eval.engine.sharding)."""
    return typer.Option(None, "--sharding", help="Data parallelism under torchrun or accelerate launch: ddp "
                                                 "(every GPU holds the whole model) or fsdp (FSDP2: weights, "
                                                 "gradients and AdamW state sharded over the GPUs; for models "
                                                 "that do not fit one GPU). One process: ignored.",
                        show_default="ddp under a launcher")


def fsdp_offload_option() -> typer.models.OptionInfo:
    return typer.Option(False, "--fsdp-cpu-offload", help="With --sharding fsdp: keep the weight shards, their "
                                                          "gradients and the optimizer step in CPU memory (slower; "
                                                          "fits the smallest GPUs).")


# ------------------------------------------------------------------------------------------ one CLI grammar
# One spelling per idea across all commands (tests/test_cli_grammar.py holds the table and walks every option).
# Spellings that commands used before are kept working for a release as hidden aliases: they are not options
# at all (so --help never lists them) but are rewritten to the canonical spelling before click parses, which
# guarantees that an alias parses to exactly the value of its canonical form.


@dataclass(frozen=True)
class Alias:
    """`old` parses as `new`; with `value`, `old` was a flag for one value of `new` (--no-bf16 = --bf16 off).
    It applies to every command that has the option `new` and has no option of its own spelled `old` (so the
    train-hmtl alias --split -> --encoder-split leaves zeroshot's data --split alone)."""

    old: str
    new: str
    value: Optional[str] = None


ALIASES: tuple[Alias, ...] = (
    Alias("--no-progress", "--quiet"),                  # train-hmtl, build-corpus
    Alias("--max-source-len", "--max-source-length"),   # finetune
    Alias("--max-length", "--max-source-length"),       # train-hmtl
    Alias("--src-len", "--max-source-length"),          # bench finetune
    Alias("--max-target-len", "--max-target-length"),   # finetune
    Alias("--tgt-len", "--max-target-length"),          # bench finetune
    Alias("--seq-len", "--source-length"),              # bench hmtl
    Alias("--no-bf16", "--bf16", "off"),                # finetune (its bare --bf16 is BARE_VALUES below)
    Alias("--rsg-data", "--data"),                      # build-corpus
    Alias("--data-dir", "--data"),                      # data download
    Alias("--save-steps", "--save-every"),              # train-hmtl
    Alias("--lr-max", "--lr"),                          # train-hmtl
    Alias("--rounds", "--repeats"),                     # bench finetune
    Alias("--batch", "--batch-size"),                   # bench hmtl
    Alias("--split", "--encoder-split"),                # train-hmtl, bench hmtl (--split is a data split)
)
# An option that takes a value but used to be a plain flag: given with no value, it means this value.
BARE_VALUES = {"--bf16": "on"}
# Options that also take the plain words after them (`--tasks TERRa RCB`), in commands without arguments.
GREEDY = ("--tasks",)


def canonical_args(command: Any, args: list[str]) -> tuple[list[str], list[str]]:
    """Rewrite hidden aliases in `args` for `command` (a click command). Returns (args, notes): a note per old
    spelling used, saying the new one."""
    names: dict[str, Any] = {}          # every spelling of every option -> the option
    for p in command.params:
        if p.param_type_name == "option":
            for n in (*p.opts, *p.secondary_opts):
                names[n] = p
    aliases = {a.old: a for a in ALIASES if a.new in names and a.old not in names}
    has_arguments = any(p.param_type_name == "argument" and not getattr(p, "hidden", False) for p in command.params)

    def takes_value(name: str) -> bool:
        p = names.get(name)
        return p is not None and not p.is_flag and not getattr(p, "count", False) and name in p.opts

    out: list[str] = []
    notes: list[str] = []
    greedy: Optional[str] = None
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a == "--":
            out += args[i - 1:]
            break
        if greedy and not a.startswith("-"):
            out += [greedy, a]
            continue
        greedy = None
        if not a.startswith("-") or a == "-":
            out.append(a)
            continue
        if a.startswith("--"):
            name, eq, _ = a.partition("=")
        else:  # a short option, its value maybe attached (-tTERRa)
            name, eq = a[:2], "=" if len(a) > 2 and takes_value(a[:2]) else ""
        if name in aliases and not (eq and aliases[name].value):
            al = aliases[name]
            if al.value is not None:
                out += [al.new, al.value]
                notes.append(f"{al.old} is now {al.new} {al.value}")
                continue
            notes.append(f"{al.old} is now {al.new}")
            a, name = al.new + a[len(name):], al.new
        if name in BARE_VALUES and takes_value(name) and not eq and (i >= len(args) or args[i].startswith("-")):
            out += [name, BARE_VALUES[name]]
            notes.append(f"{name} without a value is now {name} {BARE_VALUES[name]}")
            continue
        out.append(a)
        if takes_value(name) and not eq and i < len(args):
            out.append(args[i])
            i += 1
        p = names.get(name)
        if p is not None and not has_arguments and any(o in GREEDY for o in p.opts):
            greedy = name
    return out, notes


# Below this many columns typer's rich option table cuts long option names and defaults with "…"
# (--gradient-checkpointing/--no-gradient-checkpointing takes 52 of them); there --help falls back to click's plain
# layout, which wraps the help under a long name instead of cutting it. Measured: at 120 columns rich still cut
# `rsg finetune`, at 140 no command was cut.
NARROW_HELP = 140


def help_width() -> int:
    """The width --help is laid out for: TERMINAL_WIDTH (typer's own override), else what rich sees (COLUMNS or
    the terminal, 80 off a terminal)."""
    forced = os.environ.get("TERMINAL_WIDTH", "")
    return int(forced) if forced.isdigit() else Console().width


@contextlib.contextmanager
def _whole_words() -> Iterator[None]:
    """click wraps help text with a TextWrapper that breaks at hyphens, so `[default: gradient-checkpointing]` came
    out as `gradient-` / `checkpointing`: an option name no one can copy. For the plain layout only, its wrapper
    breaks at spaces alone."""
    try:
        from typer._click import _textwrap as tw  # typer vendors click
    except ImportError:  # pragma: no cover - an older typer on the real click
        from click import _textwrap as tw  # type: ignore[no-redef]
    init = tw.TextWrapper.__init__

    def whole(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("break_on_hyphens", False)
        init(self, *args, **kwargs)

    tw.TextWrapper.__init__ = whole  # type: ignore[method-assign]
    try:
        yield
    finally:
        tw.TextWrapper.__init__ = init  # type: ignore[method-assign]


def narrow_help(formatter: Any) -> bool:
    """True when --help should take click's plain layout (a narrow terminal); sets the formatter's width then."""
    width = help_width()
    if width >= NARROW_HELP:
        return False
    formatter.width = width
    return True


class RsgGroup(TyperGroup):
    """A typer group whose --help falls back to the plain layout on narrow terminals (see NARROW_HELP)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if narrow_help(formatter):  # click's own Group.format_help, under typer's rich one
            with _whole_words():
                super(TyperGroup, self).format_help(ctx, formatter)
        else:
            super().format_help(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        # click cuts each command's summary to fit one line ("..."); wrap it whole instead
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class RsgCommand(TyperCommand):
    """A typer command with the hidden aliases above and a usage line that shows arguments as NAME, [NAME] and
    NAME... (typer's own shows {name}, and `[]...` for a hidden argument). On a narrow terminal its --help is
    click's plain layout, so no option name or default is cut (NARROW_HELP)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A docstring's line breaks are where its source lines end, not the reader's: rich keeps them, so a
        # description broke mid-sentence ("The defaults shown / are the built-in ones"). One line per paragraph;
        # the terminal wraps it.
        if self.help:
            import inspect

            self.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(self.help).split("\n\n"))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if narrow_help(formatter):  # click's own Command.format_help, under typer's rich one
            with _whole_words():
                super(TyperCommand, self).format_help(ctx, formatter)
        else:
            super().format_help(ctx, formatter)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        args, notes = canonical_args(self, list(args))
        if notes and not ctx.resilient_parsing and os.environ.get("RANK", "0") == "0":
            for note in dict.fromkeys(notes):
                typer.echo(f"note: {note} (the old spelling still works for now; see --help)", err=True)
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name != "argument" or getattr(p, "hidden", False):
                continue
            name = p.metavar or (p.name or "").upper()
            pieces.append((name if p.required else f"[{name}]") + ("..." if p.nargs != 1 else ""))
        return pieces


class RsgTyper(typer.Typer):
    """typer.Typer whose commands are RsgCommand (and groups RsgGroup): use it for every app and sub-app of `rsg`."""

    def __init__(self, *args: Any, cls: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, cls=cls or RsgGroup, **kwargs)

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or RsgCommand, **kwargs)


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 task', '2 tasks', '0 tasks' ('many' for an irregular plural)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def fmt(x: object, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def print_zip(z: object, hint: str = "") -> None:
    """Say where a run's leaderboard zip is (runs.ZipResult), or which tasks a partial one lacks."""
    if z is None or getattr(z, "path", None) is None:
        return
    if z.complete:
        console.print(f"leaderboard zip: [bold green]{z.path}[/] (all nine tasks)", soft_wrap=True)
    else:  # soft_wrap: a path stays on one line, whole, also in a log file
        console.print(f"[yellow]partial zip[/] {z.path}: {len(z.tasks)} of 9 tasks; missing "
                      f"{', '.join(z.missing)}{hint}", soft_wrap=True)


# ------------------------------------------------------------------------------------------------- signals

def _own(sig: int) -> bool:
    """Whether this process may take `sig` over: never from a worker thread (signal.signal refuses), and never an
    ignored SIGINT (nohup, a background job: the user asked for it to be ignored)."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(sig) is not signal.SIG_IGN


@contextlib.contextmanager
def startup_signals(what: str = "rsg"):
    """Around the heavy imports of a command (torch, transformers: 1-2 s): Ctrl-C or SIGTERM ends the process at
    once, one line on stderr and status 130 / 143, through os._exit. A KeyboardInterrupt raised inside torch's
    import left a half-initialised extension whose teardown printed two tracebacks and sometimes crashed
    (SIGSEGV, 2 runs in 17). Nothing is held yet (no lock, no output), so there is nothing to clean up."""
    def handler(signum: int, frame: Any) -> None:
        os.write(2, f"{what}: interrupted while starting; nothing was written\n".encode())
        os._exit(143 if signum == signal.SIGTERM else 130)

    prev = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if _own(sig):
            prev[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in prev.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_signals():
    """While a command works: SIGTERM raises `errors.Terminated` (a KeyboardInterrupt), so the same code that
    handles Ctrl-C saves finished work and releases the run folder's lock; the CLI exits 143. Without it SIGTERM
    killed zero-shot on the spot and left its rsg.lock behind."""
    from rsg_eval.core.errors import Terminated

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    prev = signal.signal(signal.SIGTERM, handler) if _own(signal.SIGTERM) else None
    try:
        yield
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
