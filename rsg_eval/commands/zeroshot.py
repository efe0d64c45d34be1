"""`rsg zeroshot --model M`: zero-shot rank classification on all nine tasks into a run folder.

Heavy modules (torch, transformers) are imported inside the command body only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from rsg_eval.commands._common import THREADS_HELP, console, data_option, fmt, print_zip, quiet_option, tasks_option


def register(app: typer.Typer) -> None:
    @app.command("zeroshot")
    def zeroshot_cmd(
        model: str = typer.Option(..., "--model", "-m", help="'tiny' (random seq2seq, offline smoke test), "
                                                             "'tiny-causal' (its decoder-only twin), a hub id such "
                                                             "as ai-forever/FRED-T5-1.7B, or a local model folder."),
        data: Optional[str] = data_option(),
        tasks: Optional[List[str]] = tasks_option(),
        split: str = typer.Option("all", "--split", help="val (scored locally), test (for the leaderboard zip) or "
                                                         "all (both)."),
        template: Optional[str] = typer.Option(None, "--template", help="Template name for every task (see `rsg "
                                                                        "prompts list`) or a .yaml path.",
                                               show_default="each task's default"),
        templates: Optional[str] = typer.Option(None, "--templates", help="Score several templates per task in "
                                                                          "one run: all, NAME,NAME or tag:VALUE "
                                                                          "(e.g. tag:cloze); each template's "
                                                                          "results go to templates/<Task>/<name>/ "
                                                                          "and the spread to spread.json.",
                                                show_default="one template"),
        select: str = typer.Option("default", "--select", help="With --templates: whose results go to "
                                                               "metrics.json and the zip: default (each task's "
                                                               "default template) or best-val (the best val "
                                                               "score: optimistic on val)."),
        batch_size: str = typer.Option("16", "--batch-size", "-b", help="Prompts per batch, or 'auto' (halves on "
                                                                        "out-of-memory). Results do not depend on "
                                                                        "it."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N groups per task and split (a "
                                                                  "MuSeRC question or RuCoS query stays whole).",
                                            show_default="all"),
        run: Optional[str] = typer.Option(None, "--run", help="Run name under --root, or a folder path. Rerunning "
                                                              "with the same name resumes.",
                                          show_default="<model>-zeroshot[-settings]-<date>"),
        root: Path = typer.Option(Path("submissions"), "--root", help="Folder that holds run folders."),
        restart: bool = typer.Option(False, "--restart", help="Clear the run folder's results and start over "
                                                              "(needed to change settings in an existing "
                                                              "--run: one folder holds one configuration)."),
        normalize: str = typer.Option("sum", "--normalize", help="Choice score: sum (total log-likelihood), "
                                                                 "token (per token) or byte (per UTF-8 byte)."),
        calibrate: bool = typer.Option(False, "--calibrate", help="Subtract each choice's score under a "
                                                                  "content-free input (text fields -> 'N/A'); "
                                                                  "the same as --calibration on."),
        calibration: Optional[str] = typer.Option(None, "--calibration", help="off, on (= --calibrate) or both: "
                                                                              "every template scored without "
                                                                              "and with calibration (two "
                                                                              "columns in the spread).",
                                                  show_default="off"),
        device: Optional[str] = typer.Option(None, "--device", help="auto (this process's GPU, else CPU), cpu, "
                                                                    "cuda, cuda:N.", show_default="auto"),
        device_map: Optional[str] = typer.Option(None, "--device-map", help="auto: spread a model too big for "
                                                                            "one GPU over the visible GPUs (and "
                                                                            "CPU memory), in one process; "
                                                                            "instead of --device.",
                                                  show_default="off"),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="Weights dtype: auto (bf16 on a GPU that has "
                                                                  "it, else fp32), bf16, fp32. fp16 is refused "
                                                                  "for T5.", show_default="auto"),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit).",
                                               show_default="the hub's default branch"),
        prefix: Optional[str] = typer.Option(None, "--prefix", help="Override the templates' prefix; '' for "
                                                                    "none.", show_default="the template's, "
                                                                                          "FRED-T5 '<LM>'"),
        num_fewshot: int = typer.Option(0, "--num-fewshot", help="Solved examples from the train split (TERRa's "
                                                                  "for LiDiRus) put before each item, drawn per "
                                                                  "item; dropped first when the input is too "
                                                                  "long."),
        fewshot_seed: Optional[int] = typer.Option(None, "--fewshot-seed", help="Seed of the few-shot draw (the "
                                                   "only random step of a zero-shot run).", show_default="0"),
        shard_size: int = typer.Option(256, "--shard-size", hidden=True, help="Items per shard: the unit shared "
                                                                              "out among processes and saved for "
                                                                              "resume."),
        nli_head: bool = typer.Option(False, "--nli-head", help="Hierarchical checkpoints: evaluate TERRa, RCB "
                                                                "and LiDiRus with the NLI head instead of "
                                                                "prompts."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP, show_default="auto"),
        quiet: bool = quiet_option(),
    ) -> None:
        """Zero-shot (or --num-fewshot) evaluation: score each answer choice by its log-likelihood, pick the best.

        Writes submissions/<run>/ (config.json, metrics.json, predictions/, logs/, state/, submission.zip) and
        resumes an interrupted run: finished tasks with unchanged settings are skipped. Runs unchanged on several
        GPUs under `accelerate launch -m rsg_eval zeroshot ...` or torchrun (the items are shared out).
        """
        from rsg_eval.commands._common import startup_signals
        from rsg_eval.core.errors import RSGError

        with startup_signals("rsg zeroshot"):  # torch and transformers import here, before any work
            import torch  # noqa: F401
            import transformers  # noqa: F401

            from rsg_eval.eval.zeroshot import ZeroShotOptions, parse_batch_size
            from rsg_eval.models.threads import choose_cpu_threads

        if nli_head and num_fewshot:
            raise RSGError("--num-fewshot puts solved examples into prompts; --nli-head uses no prompts",
                           field="--num-fewshot", expected="one of --nli-head or --num-fewshot")
        if device_map is not None and device not in (None, "auto"):  # refused before any work, as load_model would
            raise RSGError(f"--device {device} and --device-map {device_map} both place the model: give one",
                           field="--device-map", expected="--device-map alone, or --device alone")
        choose_cpu_threads(model, "auto" if device_map else device, threads)
        if nli_head:
            _nli_head(model=model, data=data, tasks=tasks, split=split, limit=limit, run=run, root=root,
                      batch_size=parse_batch_size(batch_size), device=device, dtype=dtype, restart=restart)
            return
        opts = ZeroShotOptions(model=model, data=data, tasks=tasks, split=split, template=template,
                               templates=templates, select=select,
                               batch_size=batch_size, limit=limit, run=run, root=root, normalize=normalize,
                               calibrate=_calibration(calibrate, calibration), device=device, dtype=dtype,
                               revision=revision, prefix=prefix, num_fewshot=num_fewshot, fewshot_seed=fewshot_seed,
                               shard_size=shard_size, device_map=device_map, restart=restart)
        _prompted(opts, quiet)


def _calibration(calibrate: bool, calibration: str | None) -> bool | str:
    """--calibrate and --calibration (off | on | both) as ZeroShotOptions.calibrate: False, True or "both"."""
    from rsg_eval.core.errors import RSGError

    if calibration is None:
        return calibrate
    if calibration not in ("off", "on", "both"):
        raise RSGError(f"unknown calibration {calibration!r}", field="--calibration",
                       expected=["off", "on", "both"])
    if calibrate and calibration == "off":
        raise RSGError("--calibrate and --calibration off disagree", field="--calibration",
                       expected="one of them")
    return {"off": False, "on": True, "both": "both"}[calibration]


def _nli_head(*, model: str, restart: bool, **kw: object) -> None:
    """`--nli-head`: TERRa, RCB and LiDiRus through a hierarchical checkpoint's NLI head (rsg_eval.eval.nli_head)."""
    from rsg_eval.commands._common import stop_signals
    from rsg_eval.core.errors import Terminated
    from rsg_eval.eval.nli_head import run_nli_head_eval
    from rsg_eval.models.loading import require_seq2seq

    require_seq2seq(model, "--nli-head")
    try:
        with stop_signals():
            result = run_nli_head_eval(model=model, **kw, console=console, **({"restart": True} if restart else {}))
    except KeyboardInterrupt as exc:
        term = isinstance(exc, Terminated)
        console.print(f"[yellow]{'terminated (SIGTERM)' if term else 'interrupted'}[/]: finished work is "
                      "kept; rerun the same command to resume")
        raise typer.Exit(143 if term else 130) from None
    print_summary(result, NLI_ZIP_HINT)


def _prompted(opts: Any, quiet: bool) -> None:
    """The prompted run (rsg_eval.eval.zeroshot.run_zeroshot), its summary and exit code."""
    from rsg_eval.commands._common import stop_signals
    from rsg_eval.core.errors import Terminated
    from rsg_eval.eval.zeroshot import run_zeroshot, shutdown_distributed

    try:
        with stop_signals():
            result = run_zeroshot(opts, console=console, show_progress=not quiet)
    except KeyboardInterrupt as exc:  # before the run's own handling (loading the model): typer would exit 130
        # silently; the lock is already released by run_zeroshot's finally
        term = isinstance(exc, Terminated)
        _name_gone_peer()
        console.print(f"[yellow]{'terminated (SIGTERM)' if term else 'interrupted'}[/]: finished work is kept; "
                      "rerun the same command to resume")
        raise typer.Exit(143 if term else 130) from None
    finally:
        shutdown_distributed()
    if not result.main:  # the other processes of a multi-process run: the main one reports
        return
    print_summary(result)
    if result.interrupted:
        _name_gone_peer()
        raise typer.Exit(143 if result.terminated else 130)


def _name_gone_peer() -> None:
    """Under torchrun: when the run stopped because another process died, say which (engine.runtime.gone_peers)."""
    import sys

    dist = sys.modules.get("rsg_eval.engine.runtime")
    who = dist.gone_peers() if dist is not None else None
    if who:
        console.print(f"[red]error:[/] {who}", highlight=False, soft_wrap=True)


# The NLI head answers the three entailment tasks only, so its zip is always partial: say so, and what to do.
NLI_ZIP_HINT = (" (the NLI head answers only LiDiRus, RCB and TERRa; for an upload, add the other six tasks' "
                "predictions/test files from a prompted run and zip them with `rsg submit zip`)")


def print_summary(result: object, zip_hint: str = " (run them with --split test to complete submission.zip)"
                  ) -> None:
    """Final rich table of val metrics, then where the run folder and zip are (ZeroShotResult, NLIHeadResult)."""
    from rich.table import Table

    from rsg_eval.core.tasks import get_task

    res = result  # rsg_eval.eval.zeroshot.ZeroShotResult
    m = res.metrics
    if m and m.get("tasks"):
        table = Table(title=f"val metrics ({res.run.path})")
        for col, just in (("task", "left"), ("metrics", "left"), ("score", "right"), ("items", "right")):
            table.add_column(col, justify=just)
        for name, vals in m["tasks"].items():
            ms = " / ".join(f"{k} {vals[k]:.4f}" for k in get_task(name).metrics)
            table.add_row(name, ms, f"{vals['score']:.4f}", str(m.get("counts", {}).get(name, "")))
        total = m.get("total")
        table.add_row("[bold]total[/]", "mean of the nine task scores" if total is not None
                      else "needs all nine tasks", fmt(total, 4), "")
        console.print(table)
    if m and m.get("spread"):
        print_spread(m)
    done = sum(o.status == "done" for o in res.outcomes)
    skipped = sum(o.status == "skipped" for o in res.outcomes)
    truncated = sum(o.n_truncated for o in res.outcomes)
    console.print(f"run folder: [bold]{res.run.path}[/] ({done} task splits evaluated, {skipped} skipped as "
                  f"already finished{f', {truncated} prompts had their passage shortened' if truncated else ''})",
                  soft_wrap=True)
    print_zip(res.zip, zip_hint)


def print_spread(m: dict) -> None:
    """Multi-template runs: the spread over templates per task (val), and which rule filled metrics.json/the zip."""
    from rich.table import Table

    table = Table(title="val score over templates (spread.json has every template with its 95% interval)")
    for col, just in (("task", "left"), ("calibration", "left"), ("n", "right"), ("mean", "right"),
                      ("sd", "right"), ("min", "right"), ("max", "right"), ("best", "left"), ("worst", "left")):
        table.add_column(col, justify=just)
    for task, cols in m["spread"].items():
        for col, s in cols.items():
            table.add_row(task, "on" if col == "calibrated" else "off", str(s["n"]), fmt(s["mean"], 4),
                          fmt(s["sd"], 4), fmt(s["min"], 4), fmt(s["max"], 4), s["best"] or "", s["worst"] or "")
    for col, t in (m.get("spread_total") or {}).items():
        if t:
            table.add_row("[bold]total[/]", "on" if col == "calibrated" else "off", "", fmt(t["mean"], 4), "",
                          fmt(t["min"], 4), fmt(t["max"], 4), "", "")
    console.print(table)
    rule = m.get("select")
    what = "each task's default template" if rule == "default" else "the best val score per task"
    chosen = ", ".join(f"{t}: {v}" for t, v in (m.get("selected") or {}).items())
    console.print(f"metrics.json and the zip use {what}"
                  + (": picked on val, so these val scores are optimistic" if rule == "best-val" else "")
                  + f" ({chosen})", soft_wrap=True)
