"""`rsg bench gpu`: the one command to run the day a GPU is there (rsg_eval/bench/gpu.py); light at import time."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from rsg_eval.commands._common import console


def register(bench_app: typer.Typer) -> None:
    bench_app.command("gpu")(gpu_cmd)


def gpu_cmd(
    tiny: bool = typer.Option(False, "--tiny", help="Every section at tiny size on the CPU, in seconds (a check "
                                                    "that the command works; its figures mean nothing)."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cuda:N.",
                                         show_default="the first GPU; --tiny: cpu"),
    out: Path = typer.Option(Path("bench-gpu"), "--out", "-o", help="Write OUT.json and OUT.md (the table)."),
    sections: Optional[List[str]] = typer.Option(None, "--section", help="Only these sections (repeatable): "
                                                                         "finetune, hierarchical, zeroshot, "
                                                                         "early_exit.", show_default="all four"),
    budget: float = typer.Option(600.0, "--budget", min=1, help="Seconds; a section that would start later is "
                                                                "skipped with a line."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="bf16 peak of the device for MFU "
                                                                            "when it is not in the table.",
                                                show_default="the device table"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads.",
                                          show_default="torch's"),
) -> None:
    """FRED-T5-1.7B-sized random model on one GPU: fine-tuning step (time, MFU, memory), hierarchical step,
    zero-shot scoring at the RuCoS shape (ours vs naive) and the early-exit ratio; one JSON and one table."""
    import torch
    from rich.table import Table

    from rsg_eval.bench import gpu
    from rsg_eval.bench.flops import peak_line
    from rsg_eval.core.errors import RSGError
    from rsg_eval.core.io import atomic_write_json, atomic_write_text

    if threads:
        torch.set_num_threads(threads)
    chosen = tuple(sections) if sections else gpu.SECTIONS
    bad = [s for s in chosen if s not in gpu.SECTIONS]
    if bad:
        raise RSGError(f"unknown section {bad[0]!r}", field="section", expected=list(gpu.SECTIONS))
    if device:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise RSGError(f"unknown device {device!r}", field="device", expected="cpu, cuda, cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RSGError("CUDA device requested but torch sees no GPU", field="device")
        if dev.type != "cuda" and not tiny:
            raise RSGError("only --tiny runs on the CPU (a 1.7B model does not train there in useful time)",
                           field="device", expected="cuda, cuda:N")
    elif not tiny and not torch.cuda.is_available():
        raise RSGError("rsg bench gpu needs a CUDA GPU; --tiny runs every section at tiny size on the CPU",
                       field="device")
    with console.status("rsg bench gpu") as status:
        report = gpu.run(tiny=tiny, device=device, sections=chosen, budget_s=budget, peak_tflops=peak_tflops,
                         on_section=lambda s: status.update(f"section {s}"))
    t = Table(title=f"rsg bench gpu on {report['device']} ({report['size']}; {report['total_seconds']:.0f} s)")
    for col in gpu.HEADER:
        t.add_column(col, justify="right" if col in ("MFU", "peak memory") else "left")
    for row in gpu.table_rows(report):
        t.add_row(*row)
    from rich.console import Console

    wide = Console(width=max(console.width, 160))
    wide.print(t)
    peak = report["peak"]
    wide.print(peak_line(report["device"], (peak["name"], peak["tflops"]) if peak else None))
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, gpu.markdown(report))
    console.print(f"written: {json_path}, {md_path}")
