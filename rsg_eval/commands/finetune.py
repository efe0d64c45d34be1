"""`rsg finetune --model M --epochs 20`: per-task fine-tuning through the prompt templates into a run folder.

Runs data-parallel unchanged under `accelerate launch` or `torchrun`. Heavy modules are imported inside the
command body only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from rsg_eval.commands._common import console, fmt, print_zip


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model: str = typer.Option(..., "--model", "-m", help="'tiny' (random, offline smoke test), a hub id such "
                                                             "as ai-forever/FRED-T5-1.7B, a local model folder, "
                                                             "or a hierarchical checkpoint folder."),
        epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs per task (default 20)."),
        tasks: Optional[List[str]] = typer.Option(None, "--tasks", "-t", help="Tasks (names or comma-separated; "
                                                                              "default all nine). LiDiRus is "
                                                                              "predicted by the TERRa model."),
        data: Optional[str] = typer.Option(None, "--data", help="RSG data: a folder like the official download, "
                                                                "a zip of it, or 'sample'; default: the download "
                                                                "cache ($RSG_DATA_DIR)."),
        run: Optional[str] = typer.Option(None, "--run", help="Run name under --root, or a folder path; default "
                                                              "<model>-finetune-<date>. Rerunning resumes it."),
        root: Path = typer.Option(Path("submissions"), "--root", help="Folder that holds run folders."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with `defaults:` and per-task "
                                                                           "`tasks:` hyper-parameters (see "
                                                                           "configs/finetune_fredt5_1.7b.yaml)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Examples per device per "
                                                                                  "micro-batch (default 8)."),
        grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step."),
        lr: Optional[float] = typer.Option(None, "--lr", help="Peak AdamW learning rate (default 1e-4)."),
        schedule: Optional[str] = typer.Option(None, "--schedule", help="Decay after warm-up: linear, cosine, "
                                                                        "constant."),
        warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Share of steps warming up."),
        max_source_len: Optional[int] = typer.Option(None, "--max-source-len", help="Encoder tokens (512)."),
        max_target_len: Optional[int] = typer.Option(None, "--max-target-len", help="Decoder tokens incl. </s>."),
        eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate val every N optimizer "
                                                                            "steps (default: every epoch)."),
        early_stopping: Optional[int] = typer.Option(None, "--early-stopping", help="Stop a task after N "
                                                                                    "evaluations without "
                                                                                    "improvement (0 = off)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap optimizer steps per task."),
        save_every: Optional[int] = typer.Option(None, "--save-every", help="Also save last/ every N optimizer "
                                                                            "steps (default: at each "
                                                                            "evaluation), bounding what a kill "
                                                                            "loses."),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed for everything (default 0)."),
        normalize: Optional[str] = typer.Option(None, "--normalize", help="Val/test choice score: sum "
                                                                          "(default), token or byte, as in "
                                                                          "zero-shot."),
        template: Optional[str] = typer.Option(None, "--template", help="Template name for every task; default: "
                                                                        "each task's default."),
        gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/"
                                                                    "--no-gradient-checkpointing",
                                                              help="Recompute activations in backward to save "
                                                                   "memory."),
        bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (GPU only; default on "
                                                                           "when the GPU supports it). Never "
                                                                           "fp16."),
        group_by_length: Optional[bool] = typer.Option(None, "--group-by-length/--no-group-by-length",
                                                       help="Batch examples of similar length (default on)."),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where best/ and last/ go, "
                                                                                     "per task; default "
                                                                                     "checkpoints/<run>/."),
        restart: bool = typer.Option(False, "--restart", help="Clear the run folder's results and the tasks' "
                                                              "checkpoints and start over (needed to change "
                                                              "settings in an existing --run: one folder holds "
                                                              "one configuration)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: this "
                                                                    "process's GPU, else CPU)."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
        more_tasks: Optional[List[str]] = typer.Argument(None, hidden=True, metavar="",
                                                         help="Further task names after --tasks."),
    ) -> None:
        """Fine-tune on each task (input: the rendered prompt; target: the gold answer + </s>), keep the best
        epoch by the task's val metric, and predict val and test by rank classification.

        Writes submissions/<run>/ like `rsg zeroshot` plus epochs.csv; checkpoints go to --checkpoint-dir.
        A killed run resumes from its last checkpoint when rerun; finished tasks are skipped.
        """
        from rsg_eval.errors import RSGError
        from rsg_eval.training.config import TINY_DEFAULTS, load_config_set
        from rsg_eval.training.finetune import run_finetune
        from rsg_eval.models.loading import require_seq2seq  # decoder-only models: refused before any work
        require_seq2seq(model, "rsg finetune")

        flags = {"epochs": epochs, "batch_size": batch_size, "grad_accum": grad_accum, "lr": lr,
                 "schedule": schedule, "warmup_ratio": warmup_ratio, "max_source_len": max_source_len,
                 "max_target_len": max_target_len, "eval_every": eval_every, "early_stopping": early_stopping,
                 "max_steps": max_steps, "save_every": save_every, "seed": seed, "normalize": normalize,
                 "template": template,
                 "gradient_checkpointing": gradient_checkpointing, "bf16": bf16, "group_by_length": group_by_length}
        configs = load_config_set(config, {k: v for k, v in flags.items() if v is not None},
                                  base=TINY_DEFAULTS if model == "tiny" else None)
        if more_tasks:  # `--tasks TERRa RCB`: typer options take one value, the rest arrive as arguments
            if not tasks:
                raise RSGError(f"unexpected argument(s) {' '.join(more_tasks)}", expected="task names after --tasks")
            tasks = list(tasks) + list(more_tasks)
        task_list = [t.strip() for spec in (tasks or []) for t in spec.split(",") if t.strip()] or None
        reporter = _RichReporter(quiet)
        try:
            with reporter:
                out = run_finetune(model, configs=configs, tasks=task_list, data=data, run=run, root=root,
                                   checkpoint_dir=checkpoint_dir, device=device, revision=revision,
                                   restart=restart, reporter=reporter)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
            raise typer.Exit(130)
        if not reporter.main:
            return
        _summary(out)
        if out.failed:
            raise RSGError("not fine-tuned: " + "; ".join(out.failed.values()))


class _RichReporter:
    """Rich progress (task bar with epoch, step, loss, last val score) on the main process only."""

    def __init__(self, quiet: bool) -> None:
        import os

        self.main = int(os.environ.get("RANK", "0")) == 0
        self.quiet = quiet or not self.main
        self.progress: Any = None
        self.bar: Any = None
        self.last_val = ""

    def __enter__(self) -> "_RichReporter":
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=console, transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def task_start(self, task: str, predicts: list[str], n_pairs: int, total_steps: int, resumed: int | None) -> None:
        if self.quiet:
            return
        extra = f" (+ predicts {', '.join(p for p in predicts if p != task)})" if len(predicts) > 1 else ""
        self.progress.console.print(f"[bold]{task}[/]{extra}: {n_pairs} training examples, {total_steps} "
                                    f"optimizer steps" + (f", resuming at step {resumed}" if resumed else ""))
        self.last_val = ""
        self.bar = self.progress.add_task(task, total=total_steps, completed=resumed or 0, info="")

    def step(self, task: str, state: Any, loss: float) -> None:
        if self.quiet or self.bar is None:
            return
        self.progress.update(self.bar, completed=state.step,
                             info=f"epoch {state.epoch + (1 if state.micro else 0)} step {state.step} loss "
                                  f"{loss:.4f}{self.last_val}")

    def evaluated(self, task: str, row: dict) -> None:
        if self.quiet:
            return
        self.last_val = f" val {row['score']:.4f}"
        metrics = " ".join(f"{k} {fmt(v, 4)}" for k, v in row.items() if k not in ("task", "epoch", "step"))
        self.progress.console.print(f"  {task} epoch {row['epoch']} step {row['step']}: {metrics}")

    def task_done(self, task: str, result: dict) -> None:
        if self.quiet:
            return
        why = f", stopped: {result['stopped']}" if result.get("stopped") else ""
        self.progress.console.print(f"  {task}: best val score {fmt(result['best_metrics'].get('score'), 4)} at "
                                    f"epoch {result['best_epoch']} (step {result['best_step']}){why}")

    def skipped(self, task: str, why: str) -> None:
        if not self.quiet:
            self.progress.console.print(f"[dim]{task}: {why}[/]")

    def note(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text)


def _summary(out: Any) -> None:
    from rich.table import Table

    from rsg_eval.tasks import get_task

    m = out.metrics or {}
    if m.get("tasks"):
        table = Table(title=f"val metrics, best epoch per task ({out.run.path})")
        for col, just in (("task", "left"), ("metrics", "left"), ("score", "right")):
            table.add_column(col, justify=just)
        for name, vals in m["tasks"].items():
            table.add_row(name, " / ".join(f"{k} {vals[k]:.4f}" for k in get_task(name).metrics),
                          f"{vals['score']:.4f}")
        table.add_row("[bold]total[/]", "mean of the nine task scores" if m.get("total") is not None
                      else "needs all nine tasks", fmt(m.get("total"), 4))
        console.print(table)
    console.print(f"run folder: [bold]{out.run.path}[/] ({len(out.trained)} tasks trained, {len(out.skipped)} "
                  f"skipped as already finished); per-epoch log: {out.run.path / 'epochs.csv'}")
    print_zip(out.zip)
