"""`rsg bench ...`: benchmarks that print ratios measured in one run against the naive way.

Each part of the project adds its own subcommand from rsg_eval/commands/bench_<part>.py (`register(bench_app)`).
"""

from __future__ import annotations

import importlib

import typer

from rsg_eval.commands._common import RsgTyper

bench_app = RsgTyper(help="Benchmarks: speed and memory as ratios against the naive way, measured in one run.",
                        no_args_is_help=True)

BENCH_MODULES = ("bench_zeroshot", "bench_finetune", "bench_hmtl", "bench_corpus", "bench_gpu", "bench_memory")


def register(app: typer.Typer) -> None:
    for name in BENCH_MODULES:
        try:
            mod = importlib.import_module(f"rsg_eval.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rsg_eval.commands.{name}":
                raise
            continue
        mod.register(bench_app)
    app.add_typer(bench_app, name="bench")
