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
    split: int = typer.Option(6, "--encoder-split", min=1, help="Block-1 layers (FRED-T5-1.7B: 6)."),
    batch: int = typer.Option(16, "--batch-size", "-b", min=1, help="Sequences per batch (same batch for both "
                                                                    "ways)."),
    seq_len: int = typer.Option(128, "--source-length", min=4, help="Tokens per sequence (all padded to it)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed repeats per way (best kept)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads.",
                                          show_default="torch's"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here.",
                                            show_default="not written"),
    bf16: str = typer.Option("auto", "--bf16", help="bf16 autocast: auto (on a GPU with native bf16), on, off. "
                             "MFU is quoted for bf16 runs."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="bf16 peak of the device for MFU "
                                                "when it is not in the table.", show_default="the device table"),
) -> None:
    """Topic + NER inference: Block 1 only (early exit) vs the full encoder, on a random 24-layer T5.

    Exits 1 if the two ways disagree on any prediction.
    """
    from rich.table import Table

    from rsg_eval.commands._common import make_console
    from rsg_eval.core.errors import RSGError
    from rsg_eval.bench.hmtl import run_bench
    from rsg_eval.core.io import atomic_write_json

    if d_model % 4:
        raise RSGError("--d-model must be a multiple of 4 (4 attention heads)", field="d_model")
    if split >= layers:
        raise RSGError(f"--encoder-split {split} leaves no Block 2 in {layers} layers", field="--encoder-split",
                       expected=f"1..{layers - 1}")
    if bf16 not in ("auto", "on", "off"):
        raise RSGError(f"unknown value {bf16!r}", field="--bf16", expected=["auto", "on", "off"])
    import torch

    from rsg_eval.models.loading import cuda_bf16_native

    on_gpu = torch.device(device).type == "cuda"
    use_bf16 = on_gpu and (bf16 == "on" or (bf16 == "auto" and cuda_bf16_native()))
    console = make_console()
    with console.status("benchmark"):
        r = run_bench(d_model=d_model, d_ff=d_ff, layers=layers, split=split, batch=batch, seq_len=seq_len,
                      repeats=repeats, threads=threads, device=device, bf16=use_bf16, peak_tflops=peak_tflops)
    m = r["model"]
    table = Table(title=f"topic + NER inference, random T5 encoder d_model {m['d_model']}, {m['layers']} layers "
                        f"(Block 1 = {m['split']}), batch {r['batch']} x {r['seq_len']} tokens, {r['device']}, "
                        f"{r['threads']} threads")
    mfu = r["peak"] is not None
    for col in ("way", "seconds / batch", "examples/s", "vs full encoder", "TFLOP/s") + (("MFU",) if mfu else ()):
        table.add_column(col, justify="left" if col == "way" else "right")
    for key, label in (("full_encoder", "full encoder, hidden_states\\[k]"), ("block1", "Block 1 only (ours)")):
        cells = [label, f"{r['seconds'][key]:.4f}", f"{r['examples_per_s'][key]:.1f}",
                 f"{r['seconds']['full_encoder'] / r['seconds'][key]:.2f}x", f"{r['achieved_tflops'][key]:.3f}"]
        table.add_row(*(cells + ([f"{r['mfu'][key]:.1%}"] if mfu else [])))
    console.print(table)
    from rsg_eval.bench.flops import peak_line

    if mfu:
        console.print(peak_line(r["device_name"], (r["peak"]["name"], r["peak"]["tflops"])))
    else:
        console.print("MFU omitted: " + ("a CPU run" if r["device_name"] == "CPU" else "an fp32 run (--bf16 on for "
                                         "MFU against the bf16 peak)" if not r["bf16"] else
                                         f"no bf16 peak known for {r['device_name']!r} (--peak-tflops sets one)"))
    console.print(f"same predictions: {r['same_predictions']} (max |logit diff| {r['max_abs_logit_diff']:.2e})")
    if json_out:
        atomic_write_json(json_out, r)
    if not r["same_predictions"]:
        raise typer.Exit(1)
