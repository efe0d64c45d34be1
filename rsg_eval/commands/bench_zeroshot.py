"""`rsg bench zeroshot`: our rank classification against naive per-choice scoring, in one run on one model.

Light at import time: torch and the benchmark are imported inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rsg_eval.commands._common import console, fmt


WAYS = (("naive", "naive"), ("encoder_once", "encoder once"), ("kv_once", "+ cross K/V once"),
        ("fast", "ours: + shared prefix"))


def register(bench_app: typer.Typer) -> None:
    bench_app.command("zeroshot")(zeroshot_cmd)


def zeroshot_cmd(
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
    docs: int = typer.Option(16, "--docs", min=1, help="RuCoS-like documents (15 choices each)."),
    parus_docs: Optional[int] = typer.Option(None, "--parus-docs", min=1,
                                             help="PARus-like documents (default 8 x --docs)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Same batch size for every way of scoring."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Timed repeats per way (best kept)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads (default: torch's)."),
    d_model: int = typer.Option(256, "--d-model", min=8, help="Model width."),
    layers: int = typer.Option(4, "--layers", min=1, help="Encoder layers = decoder layers."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
) -> None:
    """Examples/s of our scoring (encoder, cross-attention K/V, shared prefix once per prompt) vs naive scoring.

    One random T5 (default d_model 256, 4+4 layers), RuCoS-like inputs (passage of several hundred tokens,
    15 candidates) and PARus-like inputs (short, 2 choices). Fails (exit 1) if the predictions differ.
    """
    from rich.table import Table

    from rsg_eval.bench.zeroshot import run_bench
    from rsg_eval.errors import RSGError
    from rsg_eval.io import atomic_write_json
    from rsg_eval.models.loading import resolve_device

    dev = resolve_device(device)
    if d_model % 4:
        raise RSGError("--d-model must be a multiple of 4 (4 attention heads)", field="d_model")
    overrides = dict(d_model=d_model, d_ff=4 * d_model, d_kv=d_model // 4, num_layers=layers,
                     num_decoder_layers=layers)
    with console.status("benchmark") as status:
        report = run_bench(docs=docs, parus_docs=parus_docs, device=str(dev), batch_size=batch_size,
                           repeats=repeats, threads=threads, model_overrides=overrides,
                           on_step=lambda s: status.update(f"timing {s}"))
    m = report["model"]
    table = Table(title=f"zero-shot scoring, random T5 d_model {m['d_model']} {m['num_layers']}+"
                        f"{m['num_decoder_layers']} layers ({m['parameters'] / 1e6:.1f} M params), {report['device']}, "
                        f"{report['threads']} threads, batch {report['batch_size']}")
    for col in ("inputs", "scoring", "docs/s", "vs naive", "vs naive (CPU time)", "same preds", "max |dLL|"):
        table.add_column(col, justify="left" if col in ("inputs", "scoring") else "right")
    ok = True
    shapes: list[str] = []
    for c in report["cases"]:
        ok &= c["same_predictions"]
        shapes.append(f"{c['name']}: {c['docs']} docs x {c['choices_per_doc']:.0f} choices, prompt "
                      f"{c['prompt_tokens']:.0f} tokens, choice {c['choice_tokens']:.0f} tokens")
        for i, (mode, label) in enumerate(WAYS):
            table.add_row(c["name"] if i == 0 else "", label, fmt(c["docs_per_s"][mode], 2),
                          fmt(c["ratio_vs_naive"][mode], 1) + "x", fmt(c["cpu_ratio_vs_naive"][mode], 1) + "x",
                          ("yes" if c["same_predictions"] else "[red]NO[/]") if i == 0 else "",
                          f"{c['max_abs_diff']:.1e}" if i == 0 else "", end_section=i == len(WAYS) - 1)
    table.caption = "naive = one encoder+decoder pass per (prompt, choice), as lm-evaluation-harness; then " \
                    "the encoder once per prompt; + the decoder's cross-attention K/V once per prompt; ours: + " \
                    "the choices' common token prefix decoded once per prompt; " \
                    "ratios by wall time and by this process's CPU time (fairer on a shared machine)\n" + \
                    "\n".join(shapes)
    console.print(table)
    if json_out:
        atomic_write_json(json_out, report)
        console.print(f"report written to {json_out}")
    if not ok:
        console.print("[bold red]predictions differ between the ways of scoring[/]")
        raise typer.Exit(1)
