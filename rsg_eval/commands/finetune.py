"""`rsg finetune --model M --epochs 20`: per-task fine-tuning through the prompt templates into a run folder.

Runs data-parallel unchanged under `accelerate launch` or `torchrun`. Heavy modules are imported inside the
command body only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from rsg_eval.commands._common import (THREADS_HELP, console, data_option, fmt, fsdp_offload_option, plural,
                                       print_zip, quiet_option, sharding_option, tasks_option)


# The options that set a FinetuneConfig field (option name -> config key; the keys are those of --config files
# and of the run folder's config.json: each equals its option's name).
CONFIG_KEYS = {"epochs": "epochs", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr",
               "schedule": "schedule", "warmup_ratio": "warmup_ratio", "max_source_length": "max_source_length",
               "max_target_length": "max_target_length", "eval_every": "eval_every",
               "early_stopping": "early_stopping", "max_steps": "max_steps", "save_every": "save_every",
               "seed": "seed", "normalize": "normalize", "template": "template",
               "gradient_checkpointing": "gradient_checkpointing", "bf16": "bf16",
               "group_by_length": "group_by_length", "optimizer": "optimizer", "lora": "lora",
               "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "lora_targets": "lora_targets"}


def register(app: typer.Typer) -> None:
    from rsg_eval.training.finetune.config import FinetuneConfig  # torch-free: the defaults --help shows

    d = FinetuneConfig()

    @app.command("finetune")
    def finetune_cmd(
        ctx: typer.Context,
        model: str = typer.Option(..., "--model", "-m", help="'tiny' or 'tiny-causal' (random, offline smoke "
                                                             "tests), a hub id such as ai-forever/FRED-T5-1.7B, a "
                                                             "local model folder (seq2seq or decoder-only), or a "
                                                             "hierarchical checkpoint folder."),
        epochs: int = typer.Option(d.epochs, "--epochs", help="Epochs per task."),
        tasks: Optional[List[str]] = tasks_option("Tasks: names, comma-separated or after one --tasks (--tasks "
                                                  "TERRa RCB). LiDiRus is predicted by the TERRa model."),
        data: Optional[str] = data_option(),
        run: Optional[str] = typer.Option(None, "--run", help="Run name under --root, or a folder path. Rerunning "
                                                              "resumes it.", show_default="<model>-finetune-<date>"),
        root: Path = typer.Option(Path("submissions"), "--root", help="Folder that holds run folders."),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with `defaults:` and per-task "
                                                                           "`tasks:` hyper-parameters (see "
                                                                           "configs/finetune_fredt5_1.7b.yaml); "
                                                                           "its values replace the defaults "
                                                                           "shown here, options typed here win "
                                                                           "over it.",
                                              show_default="none; --model tiny: configs/finetune_tiny.yaml"),
        batch_size: int = typer.Option(d.batch_size, "--batch-size", "-b", help="Examples per device per "
                                                                                 "micro-batch."),
        grad_accum: int = typer.Option(d.grad_accum, "--grad-accum", help="Micro-batches per optimizer step."),
        lr: float = typer.Option(d.lr, "--lr", help="Peak AdamW learning rate."),
        schedule: str = typer.Option(d.schedule, "--schedule", help="Decay after warm-up: linear, cosine or "
                                                                    "constant."),
        warmup_ratio: float = typer.Option(d.warmup_ratio, "--warmup-ratio", help="Share of the optimizer steps "
                                                                                  "spent warming up."),
        max_source_length: int = typer.Option(d.max_source_length, "--max-source-length",
                                              help="Encoder tokens; the template shortens the passage to fit "
                                                   "(config key max_source_length)."),
        max_target_length: int = typer.Option(d.max_target_length, "--max-target-length",
                                              help="Decoder tokens, </s> included (config key max_target_length)."),
        eval_every: int = typer.Option(d.eval_every, "--eval-every", help="Evaluate val every N optimizer steps; "
                                                                          "0 = after every epoch."),
        early_stopping: int = typer.Option(d.early_stopping, "--early-stopping", help="Stop a task after N "
                                                                                      "evaluations without "
                                                                                      "improvement; 0 = off."),
        max_steps: int = typer.Option(d.max_steps, "--max-steps", help="Cap optimizer steps per task; 0 = no "
                                                                       "cap."),
        save_every: int = typer.Option(d.save_every, "--save-every", help="Also save a resume point (last/) every "
                                                                          "N optimizer steps, bounding what a "
                                                                          "kill loses; 0 = at each evaluation."),
        seed: int = typer.Option(d.seed, "--seed", help="Seed for everything."),
        normalize: str = typer.Option(d.normalize, "--normalize", help="Val/test choice score: sum, token or "
                                                                       "byte, as in zero-shot."),
        template: Optional[str] = typer.Option(None, "--template", help="Template name for every task.",
                                               show_default="each task's default"),
        gradient_checkpointing: bool = typer.Option(d.gradient_checkpointing,
                                                    "--gradient-checkpointing/--no-gradient-checkpointing",
                                                    help="Recompute activations in backward to save memory."),
        bf16: str = typer.Option("auto", "--bf16", help="bf16 autocast: auto (on a GPU that supports it), on, off. "
                                                        "GPU only; never fp16."),
        group_by_length: bool = typer.Option(d.group_by_length, "--group-by-length/--no-group-by-length",
                                             help="Batch examples of similar length."),
        checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="Where best/ and last/ go, "
                                                                                     "per task.",
                                                      show_default="checkpoints/<run>/"),
        restart: bool = typer.Option(False, "--restart", help="Clear the run folder's results and the tasks' "
                                                              "checkpoints and start over (needed to change "
                                                              "settings in an existing --run: one folder holds "
                                                              "one configuration)."),
        device: Optional[str] = typer.Option(None, "--device", help="auto (this process's GPU, else CPU), cpu, "
                                                                    "cuda, cuda:N. Under torchrun or accelerate: "
                                                                    "auto or cuda (each process its own GPU).",
                                             show_default="auto"),
        dist_timeout: float = typer.Option(7200.0, "--dist-timeout", min=1, help="Seconds a process may wait for "
                                                                                 "the others under a launcher "
                                                                                 "(torch's NCCL default is 600)."),
        revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit).",
                                               show_default="the hub's default branch"),
        sharding: Optional[str] = sharding_option(),
        fsdp_cpu_offload: bool = fsdp_offload_option(),
        optimizer: str = typer.Option(d.optimizer, "--optimizer", help="adamw, or adafactor (transformers', with "
                                                                       "T5's settings: a constant --lr, 1e-3 by "
                                                                       "default, no warm-up; far less memory)."),
        lora: Optional[int] = typer.Option(None, "--lora", min=0, help="Train a LoRA adapter of this rank (peft, "
                                                                       "the [lora] extra); 0 = every weight.",
                                           show_default="LoRA 16 for decoder-only models over 1e9 parameters, "
                                                        "else 0"),
        lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA scale numerator.",
                                                   show_default="2 x rank"),
        lora_dropout: float = typer.Option(d.lora_dropout, "--lora-dropout", help="Dropout on the adapter's "
                                                                                  "input."),
        lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="Comma list of module names to "
                                                                                "adapt.",
                                                   show_default="T5: q,k,v,o; Llama-shaped: q_proj,k_proj,"
                                                                "v_proj,o_proj"),
        report_to: str = typer.Option("none", "--report-to", help="Experiment trackers, a comma list: none, "
                                                                  "tensorboard, wandb, mlflow (each an extra; "
                                                                  "rank 0 logs)."),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP, show_default="auto"),
        quiet: bool = quiet_option("No progress display."),
    ) -> None:
        """Fine-tune on each task (input: the rendered prompt; target: the gold answer + </s>), keep the best
        epoch by the task's val metric, and predict val and test by rank classification.

        Writes submissions/<run>/ like `rsg zeroshot` plus epochs.csv; checkpoints go to --checkpoint-dir.
        A killed run resumes from its last checkpoint when rerun; finished tasks are skipped. The defaults shown
        are the built-in ones: a --config file replaces them (and --model tiny without --config uses
        configs/finetune_tiny.yaml's smaller ones); options typed on the command line win over both.
        """
        _finetune(ctx, model=model, tasks=tasks, data=data, run=run, root=root, config=config,
                  checkpoint_dir=checkpoint_dir, restart=restart, device=device, dist_timeout=dist_timeout,
                  revision=revision, sharding=sharding, fsdp_cpu_offload=fsdp_cpu_offload, bf16=bf16,
                  report_to=report_to, threads=threads, quiet=quiet)


def _finetune(ctx: typer.Context, *, model: str, tasks: Optional[List[str]], data: Optional[str], run: Optional[str],
              root: Path, config: Optional[Path], checkpoint_dir: Optional[Path], restart: bool, device: Optional[str],
              dist_timeout: float, revision: Optional[str], sharding: Optional[str], fsdp_cpu_offload: bool, bf16: str,
              report_to: str, threads: Optional[int], quiet: bool) -> None:
    """`rsg finetune`'s body: the options (an accelerate config's included) into a ConfigSet, then run_finetune
    with the rich reporter. The hyper-parameter options are read from ctx.params (CONFIG_KEYS), so that only
    those typed on the command line override a --config file."""
    from rsg_eval.core.errors import RSGError
    from rsg_eval.training.finetune.config import TINY_DEFAULTS, load_config_set
    from rsg_eval.training.finetune.run import run_finetune
    from rsg_eval.engine.accelerate_config import read_accelerate_env, resolve_with_cli
    from rsg_eval.models.threads import choose_cpu_threads

    # an accelerate config: its honoured keys fill our options, the others are refused (one line each)
    sharding, fsdp_cpu_offload, bf16, device = resolve_with_cli(
        read_accelerate_env(), sharding=sharding, fsdp_cpu_offload=fsdp_cpu_offload, bf16=bf16, device=device)
    choose_cpu_threads(model, device, threads)
    if bf16 not in ("auto", "on", "off"):
        raise RSGError(f"unknown value {bf16!r}", field="--bf16", expected=["auto", "on", "off"])
    given = {name: value for name, value in ctx.params.items()
             if name in CONFIG_KEYS and ctx.get_parameter_source(name).name != "DEFAULT"}  # typed here
    flags = {CONFIG_KEYS[name]: value for name, value in given.items()}
    if bf16 != ctx.params["bf16"]:  # mixed_precision: bf16 in the accelerate config
        flags["bf16"] = bf16
    configs = load_config_set(config, flags, base=TINY_DEFAULTS if model in ("tiny", "tiny-causal") else None)
    task_list = [t.strip() for spec in (tasks or []) for t in spec.split(",") if t.strip()] or None
    reporter = _RichReporter(quiet)
    try:
        with reporter:
            out = run_finetune(model, configs=configs, tasks=task_list, data=data, run=run, root=root,
                               checkpoint_dir=checkpoint_dir, device=device, revision=revision,
                               restart=restart, reporter=reporter, dist_timeout=dist_timeout,
                               sharding_mode=sharding, fsdp_cpu_offload=fsdp_cpu_offload,
                               report_to=report_to)
    except KeyboardInterrupt as exc:
        console.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
        raise typer.Exit(getattr(exc, "exit_code", 130))  # 130 Ctrl-C, 143 SIGTERM (rsg_eval.engine.stop)
    if not reporter.main:
        return
    _summary(out)
    if out.failed:
        raise RSGError("not fine-tuned: " + "; ".join(out.failed.values()))


# The bar and the evaluation lines show one quantity under one label: the token-weighted mean train loss over the
# optimizer steps since the previous evaluation. The bar's value runs; at an evaluation step it is exactly what
# that evaluation logs (its line, and epochs.csv's train_loss).
LOSS_LABEL = "train loss {:.4f} (mean over the steps since the previous evaluation)"


class _RichReporter:
    """Progress on the main process only, in the order things happen: per task a header line, its evaluation
    lines while it trains (printed above the live bar, through the bar's own console), then the bar's final state
    and the best epoch. Each task has a bar of its own that stops when the task ends: piped to a file, where rich
    draws a bar only when it stops, the bar lands after its task's evaluation lines, not after every task's."""

    def __init__(self, quiet: bool) -> None:
        import os

        self.main = int(os.environ.get("RANK", "0")) == 0
        self.quiet = quiet or not self.main
        self.progress: Any = None
        self.bar: Any = None
        self.last_val = ""
        self.last_loss: float | None = None

    def __enter__(self) -> "_RichReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = self.bar = None

    def _print(self, text: str) -> None:
        (self.progress.console if self.progress is not None else console).print(text)

    def task_start(self, task: str, predicts: list[str], n_pairs: int, total_steps: int, resumed: int | None) -> None:
        if self.quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._stop()
        extra = f" (+ predicts {', '.join(p for p in predicts if p != task)})" if len(predicts) > 1 else ""
        console.print(f"[bold]{task}[/]{extra}: {n_pairs} training examples, {total_steps} optimizer steps"
                      + (f", resuming at step {resumed}" if resumed else ""))
        self.last_val, self.last_loss = "", None
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.progress.start()
        self.bar = self.progress.add_task(task, total=total_steps, completed=resumed or 0, info="")

    def step(self, task: str, state: Any, loss: float) -> None:
        if self.quiet or self.bar is None:
            return
        tokens = getattr(state, "loss_tokens", 0) or 0
        if tokens:  # token-weighted mean since the last evaluation, exactly as the next evaluation will log it
            self.last_loss = float(state.loss_sum) / float(tokens)
        shown = "" if self.last_loss is None else " " + LOSS_LABEL.format(self.last_loss)
        self.progress.update(self.bar, completed=state.step,
                             info=f"epoch {state.epoch + (1 if state.micro else 0)}{shown}{self.last_val}")

    def evaluated(self, task: str, row: dict) -> None:
        if self.quiet:
            return
        self.last_val = f", val score {row['score']:.4f} (last evaluation)"
        loss = row.get("train_loss")
        if isinstance(loss, (int, float)) and loss == loss:
            self.last_loss = float(loss)
        metrics = " ".join(f"{k} {fmt(v, 4)}" for k, v in row.items()
                           if k not in ("task", "epoch", "step", "train_loss"))
        head = LOSS_LABEL.format(loss) + ", " if isinstance(loss, (int, float)) else ""
        self._print(f"  {task} epoch {row['epoch']} step {row['step']}: {head}val {metrics}")

    def task_done(self, task: str, result: dict) -> None:
        if self.quiet:
            return
        self._stop()
        why = f", stopped: {result['stopped']}" if result.get("stopped") else ""
        console.print(f"  {task}: best val score {fmt(result['best_metrics'].get('score'), 4)} at "
                      f"epoch {result['best_epoch']} (step {result['best_step']}){why}")

    def skipped(self, task: str, why: str) -> None:
        if not self.quiet:
            self._print(f"[dim]{task}: {why}[/]")

    def note(self, text: str) -> None:
        if not self.quiet:
            self._print(text)


def _summary(out: Any) -> None:
    from rich.table import Table

    from rsg_eval.core.tasks import get_task

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
    console.print(f"run folder: [bold]{out.run.path}[/] ({plural(len(out.trained), 'task')} trained, "
                  f"{len(out.skipped)} skipped as already finished); per-epoch log: {out.run.path / 'epochs.csv'}")
    print_zip(out.zip)
