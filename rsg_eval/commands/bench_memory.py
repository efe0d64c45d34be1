"""`rsg bench memory`: per-GPU memory of full fine-tuning of FRED-T5-1.7B on one or several GPUs, with and without
FSDP, computed on the meta device (light at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(bench_app: typer.Typer) -> None:
    bench_app.command("memory")(memory_cmd)


def memory_cmd(
    batch: int = typer.Option(12, "--batch-size", "-b", min=1, help="Sequences per GPU per micro-batch."),
    source_length: int = typer.Option(512, "--max-source-length", min=1, help="Encoder tokens per sequence."),
    target_length: int = typer.Option(128, "--max-target-length", min=1, help="Decoder tokens per sequence "
                                                                               "(fine-tuning's default)."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="Activations with per-block checkpointing, as training runs."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="Optimizer whose state the table counts: adamw or adafactor (a second table shows both)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the table as JSON here.",
                                            show_default="not written"),
) -> None:
    """Weights, gradients, optimizer state and activations per GPU for FRED-T5-1.7B: one 80 GB card, two 48 GB,
    two or four 24 GB with DDP or FSDP (with and without CPU offload). Computed on the meta device (shapes only,
    nothing allocated): GPU rows are computed, not measured, until a GPU measures them."""
    from rsg_eval.bench import memory
    from rsg_eval.commands._common import make_console
    from rsg_eval.engine.optim import OPTIMIZERS
    from rsg_eval.core.errors import RSGError
    from rsg_eval.core.io import atomic_write_json

    if optimizer not in OPTIMIZERS:
        raise RSGError(f"unknown optimizer {optimizer!r}", field="--optimizer", expected=list(OPTIMIZERS))
    console = make_console()
    with console.status("building FRED-T5-1.7B on the meta device"):
        shape = memory.measure(memory.fred_config(), batch, source_length, target_length)
    table = memory.rows(shape, optimizer=optimizer, checkpointing=gradient_checkpointing)
    typer.echo(memory.markdown(table, shape, batch=batch, src_len=source_length, tgt_len=target_length,
                               optimizer=optimizer, checkpointing=gradient_checkpointing))
    typer.echo(memory.optimizer_comparison(shape, checkpointing=gradient_checkpointing))
    if json_out is not None:
        atomic_write_json(json_out, memory.as_json(table, shape))
