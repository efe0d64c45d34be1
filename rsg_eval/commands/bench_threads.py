"""`rsg bench threads`: 1 CPU thread against N on the tiny model, in one process (rsg_eval.bench.threads)."""

from __future__ import annotations

import typer


def register(bench_app: typer.Typer) -> None:
    bench_app.command("threads")(threads_cmd)


def threads_cmd(
    threads: int = typer.Option(2, "--threads", min=2, help="The thread count compared with 1."),
    rounds: int = typer.Option(3, "--repeats", min=1, help="Interleaved rounds (1, N, N, 1, ...); the best is kept."),
) -> None:
    """Zero-shot scoring and training steps of the tiny model at 1 torch thread and at N: the measurement behind
    the commands' automatic thread choice on a CPU (the idle cores for small models)."""
    from rsg_eval.bench.threads import compare, lines

    for line in lines(compare(threads, rounds)):
        typer.echo(line)
