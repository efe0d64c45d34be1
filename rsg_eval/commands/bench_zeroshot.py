"""`rsg bench zeroshot`: our rank classification against naive per-choice scoring, in one run on one model.

Light at import time: torch and the benchmark are imported inside the command body.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rsg_eval.commands._common import console, fmt

LABELS = {"naive": "naive", "encoder_once": "encoder once", "prompt_once": "prompt once", "fast": "ours"}
CAPTIONS = {
    "seq2seq": "naive = one encoder+decoder pass per (prompt, choice), as lm-evaluation-harness; encoder once = "
               "the encoder once per prompt, transformers' decoder per pair (encoder states and cross-attention "
               "K/V copied/projected per pair); prompt once = all choices of a prompt in one decoder row against "
               "its K/V; ours: + the choices' common token prefix once per prompt",
    "causal": "naive = one forward over prompt + choice per (prompt, choice), as lm-evaluation-harness; prompt "
              "once = the prompt's KV cache once per prompt, all its choices in one row after it; ours: + the "
              "choices' common token prefix in the cached context",
}


def register(bench_app: typer.Typer) -> None:
    bench_app.command("zeroshot")(zeroshot_cmd)


def zeroshot_cmd(
    arch: str = typer.Option("seq2seq", "--arch", help="seq2seq (a random T5) or causal (a random Llama)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
    docs: int = typer.Option(16, "--docs", min=1, help="RuCoS-like documents."),
    candidates: int = typer.Option(15, "--candidates", min=2, help="Candidate entities per RuCoS-like document."),
    parus_docs: Optional[int] = typer.Option(None, "--parus-docs", min=1, help="PARus-like documents.",
                                             show_default="8 x --docs"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1, help="Same batch size for every way of "
                                                                         "scoring."),
    repeats: int = typer.Option(1, "--repeats", min=1, help="Timed repeats per way (best kept)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads.",
                                          show_default="torch's"),
    d_model: int = typer.Option(256, "--d-model", min=8, help="Model width."),
    layers: int = typer.Option(4, "--layers", min=1, help="Layers (seq2seq: encoder = decoder layers)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Also measure each way's peak memory (one "
                                                                   "more untimed run per way)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here.",
                                            show_default="not written"),
    templates: Optional[int] = typer.Option(None, "--templates", min=2, help="Instead: time one `rsg zeroshot "
                                                                            "--templates` process scoring K "
                                                                            "templates per task against K "
                                                                            "one-template processes (whole "
                                                                            "processes).", show_default="off"),
    model: str = typer.Option("tiny", "--model", "-m", help="With --templates: the model the processes load."),
    data: str = typer.Option("sample", "--data", help="With --templates: the data the processes read."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="With --templates: comma-separated tasks.",
                                        show_default="all nine"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="With --templates: groups per task split.",
                                        show_default="all"),
) -> None:
    """Prompts/s and peak memory of our scoring (prompt once, choices side by side, shared prefix once) vs naive.

    One random model (seq2seq: T5 d_model 256, 4+4 layers; causal: Llama hidden 256, 4 layers), RuCoS-like inputs
    (passage of several hundred tokens, 15 candidates) and PARus-like inputs (short, 2 choices). Every timer is
    synchronised with the device. Fails (exit 1) if the predictions differ.
    """
    from rich.table import Table

    from rsg_eval.bench.zeroshot import ARCHS, run_bench
    from rsg_eval.core.errors import RSGError
    from rsg_eval.core.io import atomic_write_json
    from rsg_eval.models.loading import resolve_device

    if templates is not None:
        _templates_bench(templates, model=model, data=data, tasks=tasks, limit=limit, batch_size=batch_size,
                         device=device, threads=threads, json_out=json_out)
        return
    if arch not in ARCHS:
        raise RSGError(f"unknown architecture {arch!r}", field="--arch", expected=ARCHS)
    dev = resolve_device(device)
    if d_model % 4:
        raise RSGError("--d-model must be a multiple of 4 (4 attention heads)", field="d_model")
    if arch == "seq2seq":
        overrides = dict(d_model=d_model, d_ff=4 * d_model, d_kv=d_model // 4, num_layers=layers,
                         num_decoder_layers=layers)
    else:
        overrides = dict(hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=layers)
    with console.status("benchmark") as status:
        report = run_bench(arch=arch, docs=docs, parus_docs=parus_docs, device=str(dev), batch_size=batch_size,
                           repeats=repeats, threads=threads, model_overrides=overrides, memory=memory,
                           candidates=candidates,
                           on_step=lambda s: status.update(f"timing {s}"))
    m = report["model"]
    width = m.get("d_model", m.get("hidden_size"))
    depth = (f"{m['num_layers']}+{m['num_decoder_layers']}" if arch == "seq2seq" else str(m["num_hidden_layers"]))
    table = Table(title=f"zero-shot scoring, random {m['model_type']} width {width}, {depth} layers "
                        f"({m['parameters'] / 1e6:.1f} M params), {report['device']}, {report['threads']} threads, "
                        f"batch {report['batch_size']}")
    for col in ("inputs", "scoring", "prompts/s", "vs naive", "vs naive CPU", "peak MiB", "1 prompt MiB",
                "same preds", "max |dLL|"):
        table.add_column(col, justify="left" if col in ("inputs", "scoring") else "right")
    ok = True
    shapes: list[str] = []
    measure = None
    for c in report["cases"]:
        ok &= c["same_predictions"]
        measure = c.get("memory_measure") or measure
        shapes.append(f"{c['case']}: {c['prompts']} prompts x {c['choices_per_prompt']:.0f} choices, prompt "
                      f"{c['prompt_tokens']:.0f} tokens, choice {c['choice_tokens']:.0f} tokens")
        ways = list(c["ways"])
        for i, way in enumerate(ways):
            w = c["ways"][way]
            peak, one = w.get("peak_memory_bytes"), w.get("peak_memory_one_prompt_bytes")
            table.add_row(c["case"] if i == 0 else "", LABELS.get(way, way), fmt(w["prompts_per_s"], 2),
                          fmt(w["ratio_vs_naive"], 1) + "x", fmt(w["cpu_ratio_vs_naive"], 1) + "x",
                          f"{peak / 2 ** 20:.1f}" if peak is not None else "-",
                          f"{one / 2 ** 20:.1f}" if one is not None else "-",
                          ("yes" if c["same_predictions"] else "[red]NO[/]") if i == 0 else "",
                          f"{c['max_abs_diff']:.1e}" if i == 0 else "", end_section=i == len(ways) - 1)
    table.caption = (CAPTIONS[arch] + "; ratios by wall time and by this process's CPU time (fairer on a shared "
                     "machine)" + (f"; peak memory: {measure}; peak MiB: the run above (batch size = prompts "
                                   "per call for ours, pairs per call for naive); 1 prompt MiB: one prompt with "
                                   "all its choices in one call" if measure else "") + "\n" + "\n".join(shapes))
    console.print(table)
    if json_out:
        atomic_write_json(json_out, report)
        console.print(f"report written to {json_out}")
    if not ok:
        console.print("[bold red]predictions differ between the ways of scoring[/]")
        raise typer.Exit(1)


def _templates_bench(k: int, *, model: str, data: str, tasks: Optional[str], limit: Optional[int], batch_size: int,
                     device: str, threads: Optional[int], json_out: Optional[Path]) -> None:
    """`--templates K`: rsg_eval.bench.templates, printed as one table."""
    from rich.table import Table

    from rsg_eval.bench.templates import run_templates_bench
    from rsg_eval.core.io import atomic_write_json

    with console.status("benchmark") as status:
        rep = run_templates_bench(k=k, model=model, data=data, tasks=tasks.split(",") if tasks else None,
                                  limit=limit, batch_size=batch_size, device=device, threads=threads,
                                  on_step=lambda s: status.update(f"timing {s}"))
    table = Table(title=f"{k} templates per task: one process vs {k} ({model}, {data}, {len(rep['tasks'])} tasks, "
                        f"split {rep['split']}, {device})")
    for col in ("processes", "wall s", "CPU s", "vs one process (wall)", "vs one process (CPU)"):
        table.add_column(col, justify="left" if col == "processes" else "right")
    table.add_row(f"{k} x rsg zeroshot --template tI", fmt(rep["separate_wall_s"], 1), fmt(rep["separate_cpu_s"], 1),
                  fmt(rep["ratio_wall"], 2) + "x", fmt(rep["ratio_cpu"], 2) + "x")
    table.add_row(f"1 x rsg zeroshot --templates t0,..,t{k - 1}", fmt(rep["multi"]["wall_s"], 1),
                  fmt(rep["multi"]["cpu_s"], 1), "1.00x", "1.00x")
    load = rep.get("load_avg")
    table.caption = (f"whole processes, one after the other; CPU = user + system time of the processes; same "
                     f"predictions for every template: {'yes' if rep['same_predictions'] else 'NO'}; machine: "
                     f"{rep['cpu_count']} CPUs" + (f", load average {load[0]:.1f} at the end" if load else ""))
    console.print(table)
    if json_out:
        atomic_write_json(json_out, rep)
        console.print(f"report written to {json_out}")
