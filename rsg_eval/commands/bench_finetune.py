"""`rsg bench finetune`: training throughput and peak memory, length-grouped batches vs plain shuffled ones.

Heavy modules are imported inside the command body only.
"""

from __future__ import annotations

from typing import Any, List, Optional

import typer

from rsg_eval.commands._common import console


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("finetune")
    def bench_finetune_cmd(
        models: Optional[List[str]] = typer.Option(None, "--model", help="tiny and/or small (d_model 256, 4+4 "
                                                                         "layers); default both."),
        examples: Optional[int] = typer.Option(None, "--examples", help="Example pool per model (default: tiny "
                                                                        "256, small 64)."),
        batch_size: int = typer.Option(8, "--batch-size", "-b", help="Examples per step."),
        max_src: int = typer.Option(512, "--src-len", help="Longest source (synthetic lengths 30-512)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
        preset: Optional[str] = typer.Option(None, "--preset", help="fredt5-1.7b: time training steps of a "
                                                                    "random FRED-T5-1.7B-sized model (needs a "
                                                                    "GPU): batch 12, length 512, bf16, gradient "
                                                                    "checkpointing."),
        rounds: int = typer.Option(2, "--rounds", help="Alternate shuffled/grouped this many times per model and "
                                                       "keep each one's fastest epoch (load on a shared machine "
                                                       "only ever slows a run down)."),
        steps: int = typer.Option(5, "--steps", help="Timed steps for --preset (after 2 warm-up steps)."),
        tgt_len: int = typer.Option(512, "--tgt-len", help="Target length for --preset."),
        no_checkpointing: bool = typer.Option(False, "--no-gradient-checkpointing",
                                              help="--preset without gradient checkpointing."),
    ) -> None:
        """Examples/s, tokens/s and peak memory of fine-tuning steps; ratios grouped / ungrouped in one run."""
        import torch

        from rsg_eval.errors import RSGError
        from rsg_eval.training import bench

        if threads:
            torch.set_num_threads(threads)
        if preset:
            if preset != "fredt5-1.7b":
                raise RSGError(f"unknown preset {preset!r}", field="preset", expected=["fredt5-1.7b"])
            _preset(bench, batch_size if batch_size != 8 else 12, steps, tgt_len, not no_checkpointing)
            return
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        names = models or ["tiny", "small"]
        rows = []
        for name in names:
            if name not in ("tiny", "small"):
                raise RSGError(f"unknown model {name!r}", field="model", expected=["tiny", "small"])
            model, vocab = bench.build_model(name, device)
            n = examples or (256 if name == "tiny" else 64)
            pairs = bench.synthetic_pairs(n, vocab, max_src, 32)
            best: dict[bool, Any] = {}
            for r in range(rounds):
                for grouped in (False, True):
                    row = bench.run_config(model, pairs, batch_size, grouped, device, name=name)
                    console.print(f"{name} round {r + 1} grouped={grouped}: {row.examples_per_s:.2f} ex/s "
                                  f"({row.examples_per_cpu_s:.2f} per CPU-second), {row.tokens_per_s:.0f} tok/s, "
                                  f"peak {row.peak_mb:.1f} MiB")
                    if grouped not in best or row.seconds < best[grouped].seconds:
                        peak = max(row.peak_mb, best[grouped].peak_mb) if grouped in best else row.peak_mb
                        best[grouped] = row
                        row.peak_mb = peak
                    else:
                        best[grouped].peak_mb = max(best[grouped].peak_mb, row.peak_mb)
            rows += [best[False], best[True]]
            del model
        _table(rows, device, batch_size, threads or torch.get_num_threads())


def _table(rows: list[Any], device: Any, batch_size: int, threads: int) -> None:
    from rich.table import Table

    t = Table(title=f"fine-tuning throughput on {device} (batch {batch_size}, {threads} threads, one epoch over "
                    "the same examples per row, fastest of the rounds; peak memory: highest of the rounds)")
    for col in ("model", "batches", "examples/s", "tokens/s", "ex/CPU-s", "padding share", "peak MiB",
                "speed-up (wall)", "speed-up (CPU)", "memory ratio"):
        t.add_column(col, justify="left" if col in ("model", "batches") else "right")
    plain = {r.model: r for r in rows if not r.grouped}
    for r in rows:
        base = plain.get(r.model)
        speed = f"{r.examples_per_s / base.examples_per_s:.2f}x" if base and r.grouped else "1.00x"
        cpu = f"{r.examples_per_cpu_s / base.examples_per_cpu_s:.2f}x" if base and r.grouped else "1.00x"
        mem = f"{r.peak_mb / base.peak_mb:.2f}" if base and r.grouped and base.peak_mb > 0 else "1.00"
        t.add_row(r.model, "grouped" if r.grouped else "shuffled", f"{r.examples_per_s:.2f}",
                  f"{r.tokens_per_s:.0f}", f"{r.examples_per_cpu_s:.2f}", f"{1 - r.tokens / r.padded_tokens:.1%}",
                  f"{r.peak_mb:.1f}", speed, cpu, mem)
    from rich.console import Console

    Console(width=max(console.width, 130)).print(t)


def _preset(bench: Any, batch: int, steps: int, tgt_len: int, checkpointing: bool) -> None:
    import torch

    from rsg_eval.errors import RSGError

    if not torch.cuda.is_available():
        raise RSGError("--preset fredt5-1.7b needs a CUDA GPU (a 1.7B model does not train on CPU in useful time)",
                       field="preset")
    dev = torch.device("cuda")
    model, vocab = bench.build_model("fredt5-1.7b", dev)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    pairs = bench.synthetic_pairs(batch * steps, vocab, 512, tgt_len, fixed=True)
    from rsg_eval.models.loading import cuda_bf16_native  # native bf16 only, not V100/T4 emulation
    bf16 = cuda_bf16_native()
    row = bench.run_config(model, pairs, batch, False, dev, name="fredt5-1.7b", bf16=bf16, warmup=2,
                           max_steps=steps)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"FRED-T5-1.7B-sized random model ({params / 1e6:.0f}M parameters) on "
                  f"{torch.cuda.get_device_name()}: batch {batch}, source 512, target {tgt_len}, "
                  f"{'bf16 autocast' if bf16 else 'fp32 (no bf16 on this GPU)'}, gradient checkpointing "
                  f"{'on' if checkpointing else 'off'}, fp32 AdamW states")
    console.print(f"step time {row.seconds / row.steps:.3f} s ({row.examples_per_s:.2f} examples/s, "
                  f"{row.tokens_per_s:.0f} tokens/s); peak GPU memory {row.peak_mb / 1024:.1f} GiB "
                  f"({row.steps} timed steps after 2 warm-up steps)")
