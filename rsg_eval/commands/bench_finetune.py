"""`rsg bench finetune`: training throughput and peak memory, length-grouped batches vs plain shuffled ones; with
`--against hf-trainer`, our training loop against transformers' Seq2SeqTrainer on the same token pairs.

Heavy modules are imported inside the command body only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from rsg_eval.commands._common import console

PRESETS = ("fredt5-1.7b", "tiny")
PEERS = ("hf-trainer",)


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("finetune")
    def bench_finetune_cmd(
        models: Optional[List[str]] = typer.Option(None, "--model", "-m", help="tiny and/or small (d_model 256, "
                                                                               "4+4 layers); --against takes one.",
                                                   show_default="both; --against: small"),
        examples: Optional[int] = typer.Option(None, "--examples", help="Example pool per model.",
                                               show_default="tiny 256, small 64; --against: the whole train split"),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Examples per step.",
                                                 show_default="8; --preset: 12"),
        max_src: int = typer.Option(512, "--max-source-length", help="Longest source (synthetic lengths 30 up to "
                                                                     "it)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads.",
                                              show_default="torch's"),
        preset: Optional[str] = typer.Option(None, "--preset", help="fredt5-1.7b: time training steps of a "
                                                                    "random FRED-T5-1.7B-sized model (needs a "
                                                                    "GPU): batch 12, length 512, bf16, gradient "
                                                                    "checkpointing, with MFU. tiny: the same "
                                                                    "procedure on the tiny model (any device).",
                                            show_default="none: the tiny/small comparison"),
        rounds: int = typer.Option(2, "--repeats", help="Alternate shuffled/grouped this many times per model and "
                                                       "keep each one's fastest epoch (load on a shared machine "
                                                       "only ever slows a run down). --against interleaves its "
                                                       "runs in turns instead."),
        steps: int = typer.Option(5, "--steps", min=1, help="Timed steps for --preset (after 2 warm-up steps)."),
        tgt_len: int = typer.Option(512, "--max-target-length", help="Target length for --preset (every target "
                                                                      "this long)."),
        checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing",
                                           help="Gradient checkpointing in --preset."),
        against: Optional[str] = typer.Option(None, "--against", help="hf-trainer: our loop vs transformers' "
                                                                      "Seq2SeqTrainer (group_by_length=True) on "
                                                                      "one epoch of the same token pairs, same "
                                                                      "init and optimizer, losses compared.",
                                              show_default="none: the tiny/small comparison"),
        data: Optional[str] = typer.Option(None, "--data", help="--against: RSG data folder or zip; without the "
                                                                "task's train split, synthetic TERRa-shaped pairs.",
                                           show_default="the data cache"),
        task: str = typer.Option("TERRa", "--task", help="--against: the task whose train split is used."),
        check_steps: int = typer.Option(40, "--check-steps", min=0, help="--against: steps the Trainer also runs "
                                                                         "on our exact batches, whose losses must "
                                                                         "match ours (0 = skip)."),
        breakdown: bool = typer.Option(False, "--breakdown", help="--against: also time our loop with "
                                                                  "transformers' own GELU/RMS-norm modules."),
        profile: int = typer.Option(0, "--profile", min=0, help="--against: instead of timing epochs, profile this "
                                                                "many steps of the Trainer, of our loop with "
                                                                "transformers' modules and of ours, and print "
                                                                "the ops that take the time (0 = time epochs)."),
        peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", help="bf16 peak of the device for MFU "
                                                                                "when it is not in the table.",
                                                    show_default="the device table"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here.",
                                                show_default="not written"),
    ) -> None:
        """Examples/s, tokens/s and peak memory of fine-tuning steps; ratios grouped / ungrouped in one run."""
        import torch

        from rsg_eval.core.errors import RSGError
        from rsg_eval.bench import finetune as bench

        if threads:
            torch.set_num_threads(threads)
        if against is not None:
            if against not in PEERS:
                raise RSGError(f"unknown peer {against!r}", field="against", expected=list(PEERS))
            _against(models, examples, batch_size or 8, data, task, check_steps, breakdown, json_out, profile)
            return
        if preset:
            if preset not in PRESETS:
                raise RSGError(f"unknown preset {preset!r}", field="preset", expected=list(PRESETS))
            _preset(bench, preset, batch_size or 12, steps, tgt_len, checkpointing, peak_tflops, json_out)
            return
        batch = batch_size or 8
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
                    row = bench.run_config(model, pairs, batch, grouped, device, name=name)
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
        _table(rows, device, batch, threads or torch.get_num_threads(), peak_tflops)
        if json_out:
            from dataclasses import asdict

            from rsg_eval.core.io import atomic_write_json

            atomic_write_json(json_out, {"device": str(device), "batch": batch, "rows": [asdict(r) for r in rows]})


def _table(rows: list[Any], device: Any, batch_size: int, threads: int, peak_tflops: float | None) -> None:
    import torch
    from rich.table import Table

    from rsg_eval.bench.flops import device_peak, peak_line, utilisation

    name = torch.cuda.get_device_name(device) if getattr(device, "type", "") == "cuda" else "CPU"
    peak = ("--peak-tflops", peak_tflops) if peak_tflops else (device_peak(name) if name != "CPU" else None)
    t = Table(title=f"fine-tuning throughput on {device} (batch {batch_size}, {threads} threads, one epoch over "
                    "the same examples per row, fastest of the rounds; peak memory: highest of the rounds)")
    cols = ["model", "batches", "examples/s", "tokens/s", "ex/CPU-s", "padding share", "model TFLOP/s",
            "peak MiB", "speed-up (wall)", "speed-up (CPU)", "memory ratio"] + (["MFU"] if peak else [])
    for col in cols:
        t.add_column(col, justify="left" if col in ("model", "batches") else "right")
    plain = {r.model: r for r in rows if not r.grouped}
    for r in rows:
        base = plain.get(r.model)
        speed = f"{r.examples_per_s / base.examples_per_s:.2f}x" if base and r.grouped else "1.00x"
        cpu = f"{r.examples_per_cpu_s / base.examples_per_cpu_s:.2f}x" if base and r.grouped else "1.00x"
        mem = f"{r.peak_mb / base.peak_mb:.2f}" if base and r.grouped and base.peak_mb > 0 else "1.00"
        cells = [r.model, "grouped" if r.grouped else "shuffled", f"{r.examples_per_s:.2f}",
                 f"{r.tokens_per_s:.0f}", f"{r.examples_per_cpu_s:.2f}", f"{1 - r.tokens / r.padded_tokens:.1%}",
                 f"{r.model_flops / r.seconds / 1e12:.3f}", f"{r.peak_mb:.1f}", speed, cpu, mem]
        if peak:
            cells.append(f"{utilisation(r.model_flops, r.seconds, peak[1]):.1%}")
        t.add_row(*cells)
    from rich.console import Console

    wide = Console(width=max(console.width, 140))
    wide.print(t)
    wide.print(f"model FLOPs: encoder-decoder count on real tokens (docs/benchmarks.md); {peak_line(name, peak)}")


def _preset(bench: Any, preset: str, batch: int, steps: int, tgt_len: int, checkpointing: bool,
            peak_tflops: float | None, json_out: Path | None) -> None:
    import torch

    from rsg_eval.bench.flops import peak_line
    from rsg_eval.core.errors import RSGError

    if preset == "fredt5-1.7b" and not torch.cuda.is_available():
        raise RSGError("--preset fredt5-1.7b needs a CUDA GPU (a 1.7B model does not train on CPU in useful time); "
                       "--preset tiny runs the same procedure on the tiny model", field="preset")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src_len = 512 if preset == "fredt5-1.7b" else 64
    tgt = tgt_len if preset == "fredt5-1.7b" else min(tgt_len, 16)
    r = bench.preset_step(preset, dev, batch=batch, steps=steps, src_len=src_len, tgt_len=tgt,
                          checkpointing=checkpointing, peak_tflops=peak_tflops)
    console.print(f"{preset}-sized random model ({r['parameters'] / 1e6:.0f}M parameters) on {r['device']}: "
                  f"batch {r['batch']}, source {r['src_len']}, target {r['tgt_len']}, "
                  f"{'bf16 autocast' if r['bf16'] else 'fp32'}, gradient checkpointing "
                  f"{'on' if checkpointing else 'off'}, fp32 AdamW states")
    mfu = f", MFU {r['mfu']:.1%}, HFU {r['hfu']:.1%}" if r["mfu"] is not None else ""
    peak_mem = f"{r['peak_mib'] / 1024:.1f} GiB" if dev.type == "cuda" else f"{r['peak_mib']:.0f} MiB (RSS)"
    console.print(f"step time {r['step_seconds']:.3f} s ({r['examples_per_s']:.2f} examples/s, "
                  f"{r['tokens_per_s']:.0f} tokens/s, {r['achieved_tflops']:.2f} model TFLOP/s{mfu}); peak "
                  f"memory {peak_mem} ({r['steps']} timed steps after {r['warmup_steps']} warm-up steps)")
    console.print(f"model FLOPs per step {r['model_tflop_per_step']:.2f} T, hardware (with recompute) "
                  f"{r['hardware_tflop_per_step']:.2f} T; "
                  + peak_line(r["device"], (r["peak"]["name"], r["peak"]["tflops"]) if r["peak"] else None))
    if json_out:
        from rsg_eval.core.io import atomic_write_json

        atomic_write_json(json_out, r)


def _against(models: list[str] | None, examples: int | None, batch: int, data: str | None, task: str,
             check_steps: int, breakdown: bool, json_out: Path | None, profile: int = 0) -> None:
    import torch

    from rsg_eval.core.errors import RSGError
    from rsg_eval.bench import finetune as bench, hf_trainer as bench_hf
    from rsg_eval.training.finetune.config import FinetuneConfig

    name = (models or ["small"])[0]
    if name not in ("tiny", "small") or (models and len(models) > 1):
        raise RSGError(f"--against takes one model, tiny or small, not {models!r}", field="model",
                       expected=["tiny", "small"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def factory() -> Any:
        return bench_hf.bench_model(name)

    _, tok = factory()
    cfg = FinetuneConfig(epochs=1, batch_size=batch)
    pairs = bench_hf.task_pairs(tok, data, task, cfg)
    source = f"{task} train split ({data or 'the data cache'})"
    if not pairs:
        pairs = bench_hf.terra_shaped_pairs(examples or 2616, len(tok))
        source = f"synthetic TERRa-shaped pairs (no {task} train split in {data or 'the data cache'})"
        console.print(f"[yellow]{source}[/]")
    if examples:
        pairs = pairs[:examples]
    from rsg_eval.models.loading import cuda_bf16_native

    bf16 = device.type == "cuda" and cuda_bf16_native()
    if profile:
        _profile(factory, pairs, cfg, device, profile, json_out)
        return
    with console.status("benchmark") as status:
        report = bench_hf.compare(name, pairs, cfg, device, check_steps=check_steps, breakdown=breakdown,
                                  bf16=bf16, on_run=lambda s: status.update(f"timing {s}"))
    report.update({"model": name, "pairs": len(pairs), "source": source, "batch": batch, "device": str(device),
                   "threads": torch.get_num_threads(), "bf16": bf16})
    _against_table(report)
    if json_out:
        from rsg_eval.core.io import atomic_write_json

        atomic_write_json(json_out, report)
        console.print(f"report written to {json_out}")


def _profile(factory: Any, pairs: Any, cfg: Any, device: Any, steps: int, json_out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from rsg_eval.bench import hf_trainer as bench_hf

    out = Console(width=max(console.width, 130))
    report = {}
    for key, label, kw in (("hf-grouped", "Seq2SeqTrainer, group_by_length=True", dict(hf=True)),
                           ("ours-plain", "our loop, transformers' GELU/RMS-norm", dict(fused_kernels=False)),
                           ("ours", "our loop (fused kernels, fused AdamW)", {})):
        with console.status(f"profiling {label}"):
            r = bench_hf.profile_steps(factory, pairs, cfg, device, steps=steps, **kw)
        report[key] = r
        t = Table(title=f"{label}: {r['total_ms_per_step']:.0f} ms of op time per step ({steps} profiled steps)")
        for col in ("op", "calls/step", "ms/step", "share"):
            t.add_column(col, justify="left" if col == "op" else "right")
        for row in r["top"]:
            t.add_row(row["op"], f"{row['calls_per_step']:.0f}", f"{row['ms_per_step']:.1f}", f"{row['share']:.1%}")
        out.print(t)
    if json_out:
        from rsg_eval.core.io import atomic_write_json

        atomic_write_json(json_out, report)


def _against_table(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = {"ours": "rsg finetune loop (ours)", "hf-grouped": "Seq2SeqTrainer, group_by_length=True",
              "ours-plain": "ours with transformers' GELU/RMS-norm", "hf-same": "Seq2SeqTrainer on our batches"}
    t = Table(title=f"one epoch of fine-tuning: {r['pairs']} pairs of the {r['source']}, model {r['model']}, batch "
                    f"{r['batch']}, {r['device']}, {r['threads']} threads; each run in its own process, the runs "
                    f"taking turns every {r['turn_steps']} steps, so load from other jobs falls on all alike")
    for col in ("run", "steps", "seconds", "CPU s (runner thread)", "examples/s", "peak MiB", "speed-up (wall)",
                "speed-up (CPU)"):
        t.add_column(col, justify="left" if col == "run" else "right")
    hf = r["runs"]["hf-grouped"]
    for key, run in r["runs"].items():
        full = key != "hf-same"
        t.add_row(labels[key], str(run["steps"]), f"{run['seconds']:.1f}", f"{run['cpu_seconds']:.1f}",
                  f"{run['examples'] / run['seconds']:.2f}", f"{run['peak_mb']:.0f}",
                  f"{hf['seconds'] / run['seconds']:.2f}x" if full else "",
                  f"{hf['cpu_seconds'] / run['cpu_seconds']:.2f}x" if full else "")
    out = Console(width=max(console.width, 130))
    out.print(t)
    out.print(f"ours vs the grouped Trainer: [bold]{r['speedup_wall']:.2f}x[/] by wall time, "
              f"{r['speedup_cpu']:.2f}x by CPU time")
    if (r.get("threads") or 1) > 1:
        out.print(f"with {r['threads']} torch threads the CPU columns count the runner's own thread, not the work of "
                  "the others: read the wall-time figures")
    if "same_batches_max_abs_loss_diff" in r:
        out.print(f"same batches, first {r['same_batches_steps']} steps: largest per-step loss difference "
                  f"{r['same_batches_max_abs_loss_diff']:.2e} (float rounding; same model, optimizer, schedule)"
                  + (f"; ours {r['same_batches_speedup_wall']:.2f}x the Trainer's speed on these very batches"
                     if "same_batches_speedup_wall" in r else ""))
    ours_w, hf_w = r["loss_windows"]["ours"], r["loss_windows"]["hf-grouped"]
    out.print("mean loss per tenth of the epoch, ours:    " + " ".join(f"{x:.3f}" for x in ours_w))
    out.print("mean loss per tenth of the epoch, Trainer: " + " ".join(f"{x:.3f}" for x in hf_w))
    if "fused_kernels_speedup_cpu" in r:
        out.print(f"breakdown: fused GELU/RMS-norm kernels {r['fused_kernels_speedup_cpu']:.2f}x (CPU time); our "
                  f"loop without them vs the Trainer {r['loop_vs_hf_without_fused_kernels_cpu']:.2f}x")
