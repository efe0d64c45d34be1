"""`rsg train-hmtl`: train the hierarchical multi-task FRED-T5 (heavy imports inside the command body)."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("train-hmtl")(train_hmtl)


def train_hmtl(
    model: str = typer.Option(..., "--model", "-m", help="Base model: 'tiny', a hub id, a local folder, or a "
                              "hierarchical checkpoint to continue from."),
    corpus: str = typer.Option(..., "--corpus", help="Multi-task corpus folder (train.jsonl, val.jsonl, "
                               "labels.json), or 'sample' for the bundled one."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (checkpoints, losses.csv/png, train.log). "
                            "Rerunning with the same settings resumes an interrupted run."),
    epochs: int = typer.Option(4, help="Epochs (one epoch = one pass over the largest task)."),
    batch_size: int = typer.Option(12, "--batch-size", help="Physical batch per task and micro-step."),
    grad_accum: int = typer.Option(2, "--grad-accum", help="Micro-steps per optimizer step."),
    max_length: int = typer.Option(512, "--max-length", help="Max input tokens."),
    max_target_length: int = typer.Option(512, "--max-target-length", help="Max target tokens (with </s>)."),
    schedule: str = typer.Option("paper", help="paper (CyclicLR exp_range, gamma per step: collapses to the "
                                 "floor in ~70 steps, see docs/hmtl.md) | cycle-gamma | cosine."),
    lr_min: float = typer.Option(1e-6, "--lr-min", help="Learning-rate floor (CyclicLR base_lr)."),
    lr_max: float = typer.Option(1e-4, "--lr-max", help="Learning-rate peak (CyclicLR max_lr)."),
    gamma: float = typer.Option(0.9, help="paper: amplitude factor per optimizer step; cycle-gamma: per cycle."),
    step_size_up: Optional[int] = typer.Option(None, "--step-size-up", help="Steps up per half cycle "
                                               "(paper: 2000, torch's default; cycle-gamma: half an epoch)."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="cosine: warm-up steps "
                                               "(default 6% of all steps)."),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    clip_norm: float = typer.Option(1.0, "--clip-norm"),
    task_weights: Optional[str] = typer.Option(None, "--task-weights", help="Loss weights, e.g. "
                                               "'ner=1,mc=0.5,title=2' (others 1; 0 drops a task)."),
    split: str = typer.Option("0.25", help="Block-1 size: a layer count (6) or a fraction of the encoder (0.25 "
                              "= 6 of 24 for FRED-T5-1.7B)."),
    adapter_dim: Optional[int] = typer.Option(None, "--adapter-dim", help="Adapter bottleneck (d_model/16)."),
    bf16: str = typer.Option("auto", help="bf16 autocast: auto (on a GPU that supports it), on, off."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
    seed: int = typer.Option(0),
    max_steps_per_epoch: Optional[int] = typer.Option(None, "--max-steps-per-epoch", help="Cap (smoke runs)."),
    save_steps: int = typer.Option(0, "--save-steps", help="Also save a resume point every N optimizer steps."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (log lines only)."),
) -> None:
    """Train the hierarchical multi-task FRED-T5 (topic + NER on Block 1, NLI on Block 2, generation)."""
    from rsg_eval.errors import RSGError
    from rsg_eval.hmtl.train import TrainConfig, parse_task_weights, train

    if bf16 not in ("auto", "on", "off"):
        raise RSGError(f"unknown value {bf16!r}", field="bf16", expected=["auto", "on", "off"])
    cfg = TrainConfig(
        model=model, corpus=corpus, out=out, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        max_length=max_length, max_target_length=max_target_length, schedule=schedule, lr_min=lr_min,
        lr_max=lr_max, gamma=gamma, step_size_up=step_size_up, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_norm=clip_norm, task_weights=parse_task_weights(task_weights),
        split=split, adapter_dim=adapter_dim, bf16=bf16, gradient_checkpointing=gradient_checkpointing, seed=seed,
        max_steps_per_epoch=max_steps_per_epoch, save_steps=save_steps,
    )
    result = train(cfg, progress=not no_progress)
    typer.echo(f"final checkpoint: {result.final}")
