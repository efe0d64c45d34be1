"""`rsg train-hmtl`: train the hierarchical multi-task FRED-T5 (heavy imports inside the command body)."""

from __future__ import annotations

from typing import Optional

import typer

from rsg_eval.commands._common import THREADS_HELP, fsdp_offload_option, quiet_option, sharding_option
from rsg_eval.training.hmtl.config import default as _d   # torch-free: each default is stated once, there


def register(app: typer.Typer) -> None:
    app.command("train-hmtl")(train_hmtl)


def train_hmtl(
    model: str = typer.Option(..., "--model", "-m", help="Base model: 'tiny', a hub id, a local folder, or a "
                              "hierarchical checkpoint to continue from."),
    corpus: str = typer.Option(..., "--corpus", help="Multi-task corpus folder (train.jsonl, val.jsonl, "
                               "labels.json), or 'sample' for the bundled one."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (checkpoints, losses.csv/png, train.log). "
                            "Rerunning with the same settings resumes an interrupted run."),
    epochs: int = typer.Option(_d("epochs"), "--epochs", help="Epochs (paper: 4). An epoch ends when every train example has "
                               "been seen at least once: the largest task sets its length, smaller tasks repeat "
                               "(the log states how often)."),
    batch_size: int = typer.Option(_d("batch_size"), "--batch-size", "-b", help="Sequences per micro-step (paper: 'a batch of 12 "
                                   "sequences'); in all or per task, see --batch-reading."),
    grad_accum: int = typer.Option(_d("grad_accum"), "--grad-accum", help="Micro-steps per optimizer step (paper: 2)."),
    batch_reading: str = typer.Option(_d("batch_reading"), "--batch-reading", help="How to read the paper's 12: 'total' "
                                      "(default, closest to the text: 12 sequences per micro-step in all, dealt to "
                                      "the eight tasks in rotation; effective batch 24) or 'per-task' (12 of every "
                                      "task per micro-step; 192 per optimizer step)."),
    max_source_length: int = typer.Option(_d("max_source_length"), "--max-source-length", help="Max input tokens (paper: 512)."),
    max_target_length: int = typer.Option(_d("max_target_length"), "--max-target-length", help="Max target tokens, </s> included "
                                          "(paper: 'sequences up to 512 tokens')."),
    schedule: str = typer.Option(_d("schedule"), "--schedule", help="paper (default: the paper's CyclicLR exp_range, "
                                 "gamma per optimizer step, which sits at --lr-min after ~70 steps; the default so "
                                 "that a reproduction runs what the paper ran) | cycle-gamma (gamma once per "
                                 "cycle) | cosine (warm-up, then cosine decay)."),
    lr_min: float = typer.Option(_d("lr_min"), "--lr-min", help="Learning-rate floor (CyclicLR base_lr; paper: 1e-6)."),
    lr: float = typer.Option(_d("lr"), "--lr", help="Peak learning rate (CyclicLR max_lr; paper: 1e-4)."),
    gamma: float = typer.Option(_d("gamma"), "--gamma", help="paper: amplitude factor per optimizer step (paper: 0.9); "
                               "cycle-gamma: per cycle."),
    step_size_up: Optional[int] = typer.Option(None, "--step-size-up", help="Steps up per half cycle "
                                               "(paper: not stated).",
                                               show_default="paper: torch's 2000; cycle-gamma: half an epoch"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="cosine: warm-up steps.",
                                               show_default="6% of all steps"),
    weight_decay: float = typer.Option(_d("weight_decay"), "--weight-decay", help="AdamW weight decay (paper: not stated, so "
                                       "torch's AdamW default)."),
    clip_norm: float = typer.Option(_d("clip_norm"), "--clip-norm", help="Gradient clipping norm (paper: 1.0)."),
    task_weights: Optional[str] = typer.Option(None, "--task-weights", help="Loss weights, e.g. "
                                               "'ner=1,mc=0.5,title=2' (others 1; 0 drops a task). Default: "
                                               "the plain sum of the task losses, all 1 (our choice: the paper "
                                               "does not say how it combines them).",
                                               show_default="all 1"),
    split: str = typer.Option(_d("split"), "--encoder-split", help="Block-1 size: a layer count (6) or a fraction of "
                              "the encoder (0.25 = 6 of 24 for FRED-T5-1.7B, the paper's split)."),
    adapter_dim: Optional[int] = typer.Option(None, "--adapter-dim", help="Adapter bottleneck (paper: 'compact', "
                                              "size not stated).",
                                              show_default="d_model/16, 96 for FRED-T5-1.7B"),
    adapter_layout: str = typer.Option(_d("adapter_layout"), "--adapter-layout", help="per-head (default: MC, NER, NLI and "
                                       "LM each have an adapter) or shared-mc-ner (the paper's wording: one adapter "
                                       "for the MC and NER heads together, one for NLI, one for LM)."),
    adapter_activation: str = typer.Option(_d("adapter_activation"), "--adapter-activation", help="relu "
                                           "(default: the usual bottleneck adapter, h + up(relu(down(h)))) or "
                                           "linear (the paper's 'compact linear adapter' read literally: "
                                           "h + up(down(h)), an affine map the linear head after it could absorb, "
                                           "so it adds no capacity of its own). Saved in the checkpoint's config."),
    ner_loss: str = typer.Option(_d("ner_loss"), "--ner-loss", help="softmax (default, the paper's cross-entropy "
                                 "against one-hot labels: per token, outside or the innermost entity's type) or "
                                 "multilabel (a sigmoid per type: nested entities at once)."),
    bf16: str = typer.Option(_d("bf16"), "--bf16", help="bf16 autocast: auto (on a GPU that supports it), on, off "
                             "(paper: bf16 with fp32 master weights)."),
    gradient_checkpointing: bool = typer.Option(_d("gradient_checkpointing"), "--gradient-checkpointing/--no-gradient-checkpointing",
                                                help="Gradient checkpointing (paper: on)."),
    seed: int = typer.Option(_d("seed"), "--seed", help="Seed of the data order, heads and dropout (paper: not stated)."),
    max_steps_per_epoch: Optional[int] = typer.Option(None, "--max-steps-per-epoch", help="Cap on optimizer "
                                                      "steps per epoch (smoke runs).", show_default="no cap"),
    save_every: int = typer.Option(_d("save_every"), "--save-every", help="Also save a resume point every N optimizer steps; 0 = "
                                   "only after each epoch."),
    quiet: bool = quiet_option("No progress bar (log lines only)."),
    dist_timeout: float = typer.Option(_d("dist_timeout"), "--dist-timeout", min=1, help="Seconds a process may wait for the "
                                                                             "others under a launcher (torch's "
                                                                             "NCCL default is 600)."),
    early_stopping: int = typer.Option(_d("early_stopping"), "--early-stopping", min=0,
                                       help="Stop after N epochs without a lower mean val loss; 0 = off (the "
                                            "paper has no early stopping)."),
    sharding: Optional[str] = sharding_option(),
    fsdp_cpu_offload: bool = fsdp_offload_option(),
    optimizer: str = typer.Option(_d("optimizer"), "--optimizer", help="adamw, or adafactor (transformers', with "
                                                                     "T5's settings; far less memory)."),
    report_to: str = typer.Option(_d("report_to"), "--report-to", help="Experiment trackers, a comma list: none, "
                                                                     "tensorboard, wandb, mlflow (each an extra; "
                                                                     "rank 0 logs)."),
    restart: bool = typer.Option(False, "--restart", help="Clear --out's checkpoints, losses and log and start "
                                 "over (needed to change settings for an existing --out: one folder holds one "
                                 "configuration)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP, show_default="auto"),
) -> None:
    """Train the hierarchical multi-task FRED-T5 (topic + NER on Block 1, NLI on Block 2, generation)."""
    from rsg_eval.core.errors import RSGError
    from rsg_eval.training.hmtl.config import TrainConfig, parse_task_weights
    from rsg_eval.training.hmtl.train import train
    from rsg_eval.models.loading import require_seq2seq  # decoder-only models: refused before any work
    require_seq2seq(model, "rsg train-hmtl")
    from rsg_eval.engine.accelerate_config import read_accelerate_env, resolve_with_cli
    from rsg_eval.engine.optim import OPTIMIZERS
    from rsg_eval.engine.tracking import parse_report_to, require_backends

    # an accelerate config: its honoured keys fill our options, the others are refused (one line each)
    sharding, fsdp_cpu_offload, bf16, _ = resolve_with_cli(read_accelerate_env(), sharding=sharding,
                                                           fsdp_cpu_offload=fsdp_cpu_offload, bf16=bf16, device=None)
    if optimizer not in OPTIMIZERS:
        raise RSGError(f"unknown optimizer {optimizer!r}", field="--optimizer", expected=list(OPTIMIZERS))
    require_backends(parse_report_to(report_to))   # a missing extra: one line, before any work
    from rsg_eval.models.threads import choose_cpu_threads

    choose_cpu_threads(model, None, threads)

    if bf16 not in ("auto", "on", "off"):
        raise RSGError(f"unknown value {bf16!r}", field="--bf16", expected=["auto", "on", "off"])
    cfg = TrainConfig(
        model=model, corpus=corpus, out=out, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        batch_reading=batch_reading, adapter_layout=adapter_layout, adapter_activation=adapter_activation,
        ner_loss=ner_loss, max_source_length=max_source_length, max_target_length=max_target_length,
        schedule=schedule, lr_min=lr_min, lr=lr, gamma=gamma, step_size_up=step_size_up, warmup_steps=warmup_steps,
        weight_decay=weight_decay, clip_norm=clip_norm, task_weights=parse_task_weights(task_weights),
        split=split, adapter_dim=adapter_dim, bf16=bf16, gradient_checkpointing=gradient_checkpointing, seed=seed,
        max_steps_per_epoch=max_steps_per_epoch, save_every=save_every, dist_timeout=dist_timeout,
        early_stopping=early_stopping, sharding=sharding, fsdp_cpu_offload=fsdp_cpu_offload, optimizer=optimizer,
        report_to=report_to,
    )
    try:
        result = train(cfg, progress=not quiet, restart=restart)
    except KeyboardInterrupt as exc:
        typer.echo("interrupted: rerun the same command to resume from the last resume point", err=True)
        raise typer.Exit(getattr(exc, "exit_code", 130))   # 130 Ctrl-C, 143 SIGTERM (rsg_eval.engine.stop)
    typer.echo(f"final checkpoint: {result.final}")
