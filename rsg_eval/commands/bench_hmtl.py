"""`rsg bench hmtl`: topic/NER inference through Block 1 vs a full encoder pass (light at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(bench_app: typer.Typer) -> None:
    bench_app.command("hmtl")(hmtl_cmd)


def hmtl_cmd(
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
    d_model: int = typer.Option(256, "--d-model", min=8, help="Model width (scaled down from 1536)."),
    d_ff: int = typer.Option(704, "--d-ff", min=8, help="Feed-forward width (FRED's d_ff/d_model = 2.67)."),
    layers: int = typer.Option(24, "--layers", min=2, help="Encoder layers (FRED-T5-1.7B: 24)."),
    split: int = typer.Option(6, "--split", min=1, help="Block-1 layers (FRED-T5-1.7B: 6)."),
    batch: int = typer.Option(16, "--batch", min=1, help="Sequences per batch (same batch for both ways)."),
    seq_len: int = typer.Option(128, "--seq-len", min=4, help="Padded sequence length."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repeats per way (best kept)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Topic + NER inference: Block 1 only (early exit) vs the full encoder, on a random 24-layer T5.

    Exits 1 if the two ways disagree on any prediction.
    """
    from rich.table import Table

    from rsg_eval.commands._common import make_console
    from rsg_eval.errors import RSGError
    from rsg_eval.hmtl.bench import run_bench
    from rsg_eval.io import atomic_write_json

    if d_model % 4:
        raise RSGError("--d-model must be a multiple of 4 (4 attention heads)", field="d_model")
    if split >= layers:
        raise RSGError(f"--split {split} leaves no Block 2 in {layers} layers", field="split",
                       expected=f"1..{layers - 1}")
    console = make_console()
    with console.status("benchmark"):
        r = run_bench(d_model=d_model, d_ff=d_ff, layers=layers, split=split, batch=batch, seq_len=seq_len,
                      repeats=repeats, threads=threads, device=device)
    m = r["model"]
    table = Table(title=f"topic + NER inference, random T5 encoder d_model {m['d_model']}, {m['layers']} layers "
                        f"(Block 1 = {m['split']}), batch {r['batch']} x {r['seq_len']} tokens, {r['device']}, "
                        f"{r['threads']} threads")
    for col in ("way", "seconds / batch", "examples/s", "vs full encoder"):
        table.add_column(col, justify="left" if col == "way" else "right")
    table.add_row("full encoder, hidden_states[k]", f"{r['seconds']['full_encoder']:.4f}",
                  f"{r['examples_per_s']['full_encoder']:.1f}", "1.00x")
    table.add_row("Block 1 only (ours)", f"{r['seconds']['block1']:.4f}", f"{r['examples_per_s']['block1']:.1f}",
                  f"{r['speedup']:.2f}x")
    console.print(table)
    console.print(f"same predictions: {r['same_predictions']} (max |logit diff| {r['max_abs_logit_diff']:.2e})")
    if json_out:
        atomic_write_json(json_out, r)
    if not r["same_predictions"]:
        raise typer.Exit(1)
