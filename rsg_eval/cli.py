"""The `rsg` command line. Thin: each command lives in rsg_eval/commands/<name>.py and imports its heavy
modules (torch, transformers) inside the command body, so `rsg --help` and the light commands start fast."""

from __future__ import annotations

import importlib
import os
import signal
import sys


def _quit_while_starting(signum: int, frame: object) -> None:
    os.write(2, b"rsg: interrupted while starting; nothing was written\n")
    os._exit(143 if signum == signal.SIGTERM else 130)


# Run as the `rsg` program (not imported by tests): Ctrl-C or SIGTERM while the command modules import is one line
# and status 130 / 143 (it was a traceback of importlib frames). main() hands the signals back to Python.
_STARTUP_SIGNALS: dict = {}
if os.path.basename(sys.argv[0] if sys.argv else "") == "rsg" or \
        (sys.argv[0] if sys.argv else "").endswith(os.path.join("rsg_eval", "__main__.py")):
    for _sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_sig) is not signal.SIG_IGN:
            _STARTUP_SIGNALS[_sig] = signal.signal(_sig, _quit_while_starting)

import typer  # noqa: E402

from rsg_eval import __version__  # noqa: E402
from rsg_eval.commands._common import RsgTyper  # noqa: E402
from rsg_eval.core.errors import RSGError  # noqa: E402

app = RsgTyper(
    name="rsg",
    help="Russian SuperGLUE for seq2seq (FRED-T5) and decoder-only models: data, metrics, zero-shot and few-shot, "
    "fine-tuning, the hierarchical FRED-T5, submissions and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module has `register(app)`. Order = order in `rsg --help`.
COMMAND_MODULES = (
    "data", "score", "submit", "prompts", "zeroshot", "finetune", "hmtl", "corpus", "report", "bench",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rsg-eval {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Russian SuperGLUE toolkit."""


for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"rsg_eval.commands.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"rsg_eval.commands.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Entry point: run the app, turning RSGError into one red line and exit status 2."""
    for sig, old in list(_STARTUP_SIGNALS.items()):  # started: Ctrl-C is a KeyboardInterrupt again
        signal.signal(sig, old)
        del _STARTUP_SIGNALS[sig]
    try:
        from rsg_eval.core.limits import check_all

        check_all()
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer.Exit(code) comes back as a return value here
            sys.exit(rc)
    except RSGError as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt) as exc:  # click turns a KeyboardInterrupt in a command into Abort
        from rsg_eval.core.errors import Terminated

        term = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
        print(f"rsg: {'terminated (SIGTERM)' if term else 'interrupted'}; finished work is kept", file=sys.stderr)
        sys.exit(143 if term else 130)
    except Exception as exc:  # click usage errors and the like
        from rsg_eval.core.io import storage_error

        err = storage_error(exc, getattr(exc, "filename", None))
        if err is not None:  # a full disk that no writer turned into an RSGError: still one line, exit 2
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            sys.exit(2)
        try:
            import click
        except ImportError:  # newer typer vendors click as typer._click
            from typer import _click as click  # type: ignore[no-redef]

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
