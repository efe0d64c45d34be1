"""`rsg bench corpus`: peak memory of `rsg build-corpus` at growing corpus sizes (light at import time)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(bench_app: typer.Typer) -> None:
    bench_app.command("corpus")(corpus_cmd)


def _sizes(text: str) -> list[int]:
    from rsg_eval.core.errors import RSGError

    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        mult = 1_000_000 if part.endswith("m") else 1000 if part.endswith("k") else 1
        try:
            out.append(int(float(part.rstrip("mk")) * mult))
        except ValueError:
            raise RSGError(f"bad size {part!r}", field="--sizes", expected="e.g. 10k,100k,1m") from None
    return out


def corpus_cmd(
    sizes: str = typer.Option("10k,100k,1m", "--sizes", help="Synthetic records per run (k = 1000, m = 10^6)."),
    naive_max: int = typer.Option(100_000, "--naive-max", help="Also run the in-memory builder (the naive way) "
                                  "up to this many records (0: never; it holds every record)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Folder for the synthetic data and the "
                                           "builds (~3 GB at 1M records).", show_default="the system temp folder"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here.",
                                            show_default="not written"),
) -> None:
    """Peak RSS of a fresh process building N synthetic records, streaming builder vs the in-memory way.

    Goal: a flat line, the largest run within 1.5x of the smallest.
    """
    from rich.console import Console
    from rich.table import Table

    from rsg_eval.bench.corpus import measure
    from rsg_eval.core.io import atomic_write_json

    console = Console()
    rows = []
    for n in _sizes(sizes):
        for naive in ((False, True) if n <= naive_max else (False,)):
            with console.status(f"{'naive' if naive else 'streaming'} build of {n} records"):
                rows.append(measure(n, naive=naive, workdir=workdir))
    base = {w: next((r["peak_mb"] for r in rows if r["way"] == w), None) for w in ("streaming", "naive")}
    table = Table(title="rsg build-corpus: peak RSS of a fresh process (VmHWM, interpreter and imports "
                        "included) vs records")
    for col in ("records", "way", "peak RSS MB", "vs smallest", "seconds", "built", "dedup index on disk MB"):
        table.add_column(col, justify="left" if col == "way" else "right")
    for r in rows:
        table.add_row(f"{r['records']:,}", r["way"], f"{r['peak_mb']:.0f}", f"{r['peak_mb'] / base[r['way']]:.2f}x",
                      f"{r['seconds']:.0f}", f"{r['built']:,}", f"{r['dedup_index_mb']:.0f}" if r["way"] ==
                      "streaming" else "-")
    console.print(table)
    stream = [r for r in rows if r["way"] == "streaming"]
    if len(stream) > 1:
        ratio = stream[-1]["peak_mb"] / stream[0]["peak_mb"]
        console.print(f"streaming: {stream[-1]['records']:,} vs {stream[0]['records']:,} records = {ratio:.2f}x "
                      f"peak memory (goal: at most 1.5x)")
    if json_out:
        atomic_write_json(json_out, {"rows": rows})
