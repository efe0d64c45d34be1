"""`rsg train-hmtl`: multi-task training of the hierarchical FRED-T5 with the paper's recipe as defaults.

Every optimizer step sees every task in the corpus. The paper's "a batch of 12 sequences ... accumulation 2,
effective batch 24" has two readings, both offered (`batch_reading`, dataset.BatchPlan): "total" (the default,
closest to the text: 12 sequences per micro-step in all, dealt to the eight tasks in rotation, 3 of each task per
optimizer step) and "per-task" (12 of every task per micro-step, 192 per optimizer step). Within a micro-step each
task's sequences go forward and backward on their own (the gradients add up exactly as for one summed loss, but
only one task's activations are alive at a time). Each task's loss enters the step as the mean over its examples in
that optimizer step, times the task weight: the objective is the weighted sum of the task losses, all weights 1 by
default. The plain sum is our choice: the paper processes "the batches of all eight tasks" every iteration but does
not say how their losses are combined. Then the gradient is clipped to norm 1.0, AdamW steps and the schedule steps
once (rsg_eval.engine.step.finish_step: one host read of the task losses and the gradient norm; a non-finite loss or
norm skips the step, saves the resume point of the last good step and stops with a message).

Several processes (torchrun, accelerate launch): PyTorch's DDP (default) or FSDP2 (`--sharding fsdp`) wrap the
model, whose `forward(task, ...)` is each task's loss. DDP is told that a forward uses only part of the model
(find_unused_parameters: the head tasks never reach the decoder). Under FSDP every process must run the same modules
in the same order, so where the "total" reading deals a task to one process and not another, the others run a
one-example batch of it with weight 0; gradients are reduced after every backward (a task's blocks are not all
reached by the step's last one). SIGINT / SIGTERM stop at the next optimizer step with a resume point (exit 130 /
143); rerunning resumes. `--early-stopping N` stops after N epochs without a better mean val loss (off by default:
the paper has none).

An epoch ends when every train example has been seen at least once: the largest task sets its length, smaller tasks
are reshuffled and repeated; the log states the plan at start. The order of every task's stream depends only on
(seed, epoch, task); together with the saved RNG, optimizer and schedule state this makes a resumed run reproduce the
uninterrupted one exactly.

Output folder (one configuration: `rsg_eval.runs.claim_folder` locks it on the main process and refuses other
settings unless --restart, which clears everything below but cache/):
    settings.json            the settings the outputs were made with (model and corpus content, recipe, code)
    rsg.lock                 held while a training process runs
    run.json                 the training config (resume refuses a different one) and whether training finished
    train.log                the log, including the batch plan and the schedule note
    losses.csv / losses.png  per epoch, train and val: the MEAN loss over the tasks (the paper's "average train /
                             validation loss", Figures 2-3) as the headline, and each task's loss
    epoch-N/                 a hierarchical checkpoint after each epoch (`--model out/epoch-N` everywhere)
    final/                   the last epoch's checkpoint (hard links, no extra disk)
    last/                    checkpoint + trainer_state.pt for resuming (after each epoch, every --save-every, and at
                             a stop); trainer_state.pt holds tensors and plain values only, read weights_only
    cache/                   the tokenised corpus (datasets, memory-mapped)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rsg_eval.engine import collective, rng, runtime, sharding
from rsg_eval.engine.early_stop import EarlyStopping
from rsg_eval.engine.optim import make_optimizer
from rsg_eval.engine.runtime import Dist
from rsg_eval.engine.step import StepGuard, finish_step
from rsg_eval.engine.stop import StopRequest
from rsg_eval.engine.tracking import Throughput, make_tracker, step_scalars
from rsg_eval.runs import fingerprint as settings_fingerprint
from rsg_eval.core.errors import RSGError
from rsg_eval.training.hmtl import schedules
from rsg_eval.training.hmtl.config import TrainConfig, parse_task_weights  # noqa: F401  (re-exported)
from rsg_eval.corpus.load import open_corpus
from rsg_eval.training.hmtl.dataset import (BATCH_READINGS, TASK_INDEX, BatchPlan, build_split, collate, stream_positions,
                                   task_indices)
from rsg_eval.corpus.labels import TASKS
from rsg_eval.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from rsg_eval.models.adapters import ADAPTER_ACTIVATIONS
from rsg_eval.models.hierarchical import (ADAPTER_LAYOUTS, NER_LOSSES, HierarchicalT5, is_hierarchical_dir,
                                          load_hierarchical)

STATE_NAME = "trainer_state.pt"
CODE_VERSION = "hmtl-1"   # bump when training changes what a checkpoint would contain: old outputs then refuse


@dataclass
class TrainResult:
    out: Path
    final: Path | None
    history: list[dict[str, Any]]
    finished: bool
    steps: int


# ---------------------------------------------------------------------------- small pieces
class _Log:
    def __init__(self, path: Path | None, console: Any, main: bool) -> None:
        self.path, self.console, self.main = path, console, main

    def __call__(self, msg: str, level: str = "INFO") -> None:
        if not self.main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {msg}"
        if self.console is not None:
            style = {"WARN": "bold yellow", "ERROR": "bold red"}.get(level, "")
            self.console.print(f"[{style}]{level}[/] {msg}" if style else msg, highlight=False, soft_wrap=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def task_loss(model: Any, batch: Any, ner_loss: str = "softmax") -> torch.Tensor:
    """One task's loss on one batch through the model's forward (HierarchicalT5.forward; `model` may be its DDP or
    FSDP wrapper): a mean over its examples, or its real tokens, in fp32 even under bf16 autocast."""
    return model(batch.task, input_ids=batch.input_ids, attention_mask=batch.attention_mask, target=batch.target,
                 ner_loss=ner_loss)


def _link_or_copy_dir(src: Path, dst: Path) -> None:
    """dst = a copy of src made of hard links where the filesystem allows (no extra disk for big weights)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def write_losses(out: Path, history: list[dict[str, Any]], tasks: list[str]) -> None:
    """losses.csv (epoch, split, mean over the tasks, one column per task) and losses.png (train and val panels)."""
    cols = ["epoch", "split", "mean"] + tasks
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / "losses.csv", buf.getvalue())
    plot_losses(history, tasks, out / "losses.png")


def plot_losses(history: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, split in zip(axes, ("train", "val")):
        rows = [r for r in history if r["split"] == split]
        if rows:
            ep = [r["epoch"] for r in rows]
            for t in tasks:
                ys = [r.get(t) for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(ep, [y if y is not None else math.nan for y in ys], marker="o", label=t)
            ax.plot(ep, [r["mean"] for r in rows], marker="s", color="black", linewidth=2.5,
                    label="mean over tasks")
        ax.set_title(f"{split} loss: mean over tasks (the paper's Figures 2-3) and per task")
        ax.set_yscale("log")     # generation losses are an order of magnitude above the head losses
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------- model setup
def _build_model(cfg: TrainConfig, labels: Any, device: torch.device, log: _Log) -> tuple[HierarchicalT5, Any]:
    if is_hierarchical_dir(cfg.model):
        model, tokenizer = load_hierarchical(cfg.model)
        if list(model.config.mc_labels) != list(labels.mc) or list(model.config.ner_labels) != list(labels.ner):
            raise RSGError("the checkpoint's topic or entity labels differ from the corpus labels", file=cfg.model,
                           field="mc_labels", expected=list(labels.mc))
        log(f"continuing from the hierarchical checkpoint {cfg.model}")
    else:
        from rsg_eval.models.loading import load_model

        loaded = load_model(cfg.model, device="cpu", dtype=torch.float32)
        tokenizer = loaded.tokenizer
        # Heads and adapters start from a fixed seed, so every process (and a resumed run) builds the same model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = HierarchicalT5.from_base(
                loaded.model, split=cfg.split, adapter_dim=cfg.adapter_dim,
                adapter_activation=cfg.adapter_activation, head_dropout=cfg.head_dropout,
                mc_labels=list(labels.mc), ner_labels=list(labels.ner), nli_labels=list(labels.nli),
                base_model=cfg.model, adapter_layout=cfg.adapter_layout, ner_loss=cfg.ner_loss)
    if model.config.adapter_layout != cfg.adapter_layout:
        raise RSGError(f"the checkpoint has adapter layout {model.config.adapter_layout!r}", file=cfg.model,
                       field="adapter-layout", expected=[model.config.adapter_layout])
    if model.config.adapter_activation != cfg.adapter_activation:
        raise RSGError(f"the checkpoint has adapter activation {model.config.adapter_activation!r}", file=cfg.model,
                       field="adapter-activation", expected=[model.config.adapter_activation])
    # The NER head has the same 29 outputs under both losses; the checkpoint records the loss it was trained with.
    model.config.ner_representation = NER_LOSSES[cfg.ner_loss]
    if tokenizer is None:
        raise RSGError("the model has no tokenizer files", file=cfg.model)
    model.to(device)
    return model, tokenizer


def _load_weights(model: HierarchicalT5, path: Path) -> None:
    """Copy a saved checkpoint's weights into the model being trained (strict: same structure)."""
    from rsg_eval.models.weight_files import check_weight_files

    check_weight_files(path, hint=_DAMAGED.format(folder=path))  # a damaged file: one line, not a traceback
    src, _ = load_hierarchical(path)
    model.load_state_dict(src.state_dict(), strict=True)


def _tokenise(cfg: TrainConfig, cache: Path, build: Callable[[str], tuple[Any, bool]], log: _Log) -> tuple[Any, Any]:
    """Tokenise (or open) both splits, every process on its own, outside any collective: the first process to take
    the cache folder's lock tokenises, the others wait on the lock (not in a collective, whose timeout would end the
    job while a large corpus is tokenised) and then open its cache. Nodes without a shared folder each tokenise
    their own."""
    from rsg_eval.engine.collective import file_lock

    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / ".tokenise.lock"):
        splits = {}
        for split in ("train", "val"):
            ds, hit = build(split)
            splits[split] = ds
            if ds is not None:
                log(f"{split} data: {'tokenised cache' if hit else 'tokenised'} ({len(ds)} examples)")
    return splits["train"], splits["val"]


_DAMAGED = ("the resume point is damaged (a disk error, or it was changed); delete {folder} and rerun the same "
            "command: training then starts again from the beginning")


def _load_resume_point(last: Path) -> dict[str, Any]:
    """The trainer state saved with `last`, read with `torch.load(weights_only=True)`: tensors and plain values
    only, no pickled object is ever executed. States written before the engine hold the same kinds of values
    (optimizer and schedule state dicts, counters, loss sums, history, RNG tensors), so they read the same way; a
    file holding anything else is refused with one line."""
    import pickle
    import zipfile

    try:
        return torch.load(last / STATE_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise RSGError("the trainer state holds Python objects other than tensors and plain values, which are "
                           "not loaded (no pickle is executed); delete " + str(last) + " to start the run over, or "
                           "pass --restart", file=last / STATE_NAME) from None
        raise RSGError(f"not a loadable trainer state ({type(exc).__name__}): " + _DAMAGED.format(folder=last),
                       file=last / STATE_NAME) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        raise RSGError(f"not a loadable trainer state ({type(exc).__name__}): " + _DAMAGED.format(folder=last),
                       file=last / STATE_NAME) from None


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, progress: bool = True, console: Any = None,
          on_step: Callable[[int], None] | None = None, restart: bool = False) -> TrainResult:
    """Train (or resume) into cfg.out. `on_step(global_step)` runs after each optimizer step (tests use it to
    simulate an interruption). `restart` clears the folder's outputs (not the tokenised cache) and starts over;
    without it, a folder holding outputs of other settings is refused."""
    with contextlib.ExitStack() as held:  # the folder's lock, released however training ends
        return _train(cfg, held, progress=progress, console=console, on_step=on_step, restart=restart)


def out_settings(cfg: TrainConfig, corpus: Any) -> dict[str, Any]:
    """What the outputs depend on: the recipe (TrainConfig.fingerprint_dict), the corpus's content instead of
    its path, the base model's content when it is a local folder, and the code version."""
    from rsg_eval.models.loading import TINY_NAME, _dir_fingerprint
    from rsg_eval.runs import files_fingerprint

    settings = {k: v for k, v in cfg.fingerprint_dict().items() if k != "corpus"}
    files = [f for fs in corpus.files.values() for f in fs]
    labels = Path(corpus.root) / "labels.json"
    settings["corpus_sha256"] = files_fingerprint(files + ([labels] if labels.is_file() else []))
    model = Path(cfg.model).expanduser()
    if cfg.model != TINY_NAME and model.is_dir():
        settings["model_dir"] = _dir_fingerprint(model)
    settings["code_version"] = CODE_VERSION
    return json.loads(json.dumps(settings))


_OUTPUTS = ("last", "final", "run.json", "losses.csv", "losses.png", "train.log", "settings.json")


def _claim_out(cfg: TrainConfig, corpus: Any, d: Dist, restart: bool) -> Any:
    """The main process locks --out and checks its settings; a refusal is raised on every process."""
    from rsg_eval.runs import claim_folder

    out = Path(cfg.out)

    def has_results() -> bool:
        return any((out / n).exists() for n in ("last", "final", "run.json")) or any(out.glob("epoch-*"))

    def clear() -> None:
        for p in [*(out / n for n in _OUTPUTS), *out.glob("epoch-*"), *out.glob(".*.tmp")]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def claim_it() -> Any:
        legacy = (out / "run.json").is_file() and not (out / "settings.json").is_file()
        claim = claim_folder(out, "train-hmtl", out_settings(cfg, corpus), restart=restart,
                             record="settings.json", has_results=has_results, clear=clear, option="--out",
                             unrecorded="compare" if legacy else "refuse", main=True,
                             legacy_names=(*_OUTPUTS, *(p.name for p in out.glob("epoch-*"))))
        try:
            if legacy and not restart:  # an --out from before settings.json: its run.json holds the recipe
                _check_run_json(out / "run.json", cfg.fingerprint_dict())
            claim.write_record()
        except BaseException:
            claim.release()
            raise
        return claim

    claim = collective.main_acts(d, claim_it, share=False)   # a refusal is raised on every process
    return claim if claim is not None else contextlib.nullcontext()


def _check_run_json(run_file: Path, fp: dict[str, Any]) -> None:
    """Refuse when run.json's recorded config differs from `fp`, naming each setting old -> new."""
    prior = read_json(run_file) if run_file.is_file() else None
    if prior is not None and prior.get("config") != json.loads(json.dumps(fp)):
        from rsg_eval.runs import settings_diff

        changed = settings_diff(prior.get("config") or {}, json.loads(json.dumps(fp)))
        raise RSGError(f"the output folder holds a run with different settings ({'; '.join(changed)}); pass "
                       f"--restart to clear it and start over, or pick another --out", file=run_file, field="--out")


def _train(cfg: TrainConfig, held: contextlib.ExitStack, *, progress: bool, console: Any,
           on_step: Callable[[int], None] | None, restart: bool) -> TrainResult:
    # One function on purpose: this is the recipe's explicit loop (setup, resume, steps, epoch ends), read top to
    # bottom; everything shared with fine-tuning is an engine call.
    import datasets

    datasets.disable_progress_bars()
    d, device = runtime.setup(None, cfg.dist_timeout)
    world, rank, main = d.world, d.rank, d.main
    mode = sharding.resolve_mode(cfg.sharding, d)
    if cfg.fsdp_cpu_offload and mode != "fsdp":
        raise RSGError("--fsdp-cpu-offload needs --sharding fsdp under a launcher (torchrun or accelerate launch "
                       "with several processes)", field="--fsdp-cpu-offload", expected="--sharding fsdp")
    out = Path(cfg.out)
    if cfg.schedule not in schedules.SCHEDULES:
        raise RSGError(f"unknown schedule {cfg.schedule!r}", field="schedule", expected=list(schedules.SCHEDULES))
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise RSGError("epochs, batch size and gradient accumulation must be >= 1", field="epochs")
    if cfg.early_stopping < 0:
        raise RSGError(f"bad value {cfg.early_stopping}", field="--early-stopping", expected="an integer >= 0")
    for name, value, choices in (("batch-reading", cfg.batch_reading, BATCH_READINGS),
                                 ("ner-loss", cfg.ner_loss, tuple(NER_LOSSES)),
                                 ("adapter-layout", cfg.adapter_layout, ADAPTER_LAYOUTS),
                                 ("adapter-activation", cfg.adapter_activation, ADAPTER_ACTIVATIONS)):
        if value not in choices:
            raise RSGError(f"unknown value {value!r}", field=name, expected=list(choices))
    corpus = open_corpus(cfg.corpus)      # a missing corpus fails before anything is written
    held.enter_context(_claim_out(cfg, corpus, d, restart))   # creates --out, locked, one configuration
    d.barrier()
    if console is None and main:
        from rich.console import Console
        console = Console(stderr=True)
    log = _Log(out / "train.log", console, main)

    run_file = out / "run.json"
    fp = cfg.fingerprint_dict()
    _check_run_json(run_file, fp)
    prior = read_json(run_file) if run_file.is_file() else None
    if prior is not None and prior.get("finished"):
        log(f"{out} already holds a finished run; nothing to do")
        hist = prior.get("history", [])
        return TrainResult(out, out / "final", hist, True, prior.get("steps", 0))

    model, tokenizer = _build_model(cfg, corpus.labels, device, log)
    lm_prefix = cfg.lm_prefix
    if lm_prefix == "auto":
        lm_prefix = "<LM>" if "<LM>" in tokenizer.get_vocab() else ""

    cache = out / "cache"
    def build(split: str) -> tuple[Any, bool]:
        return build_split(corpus, split, tokenizer, cache_dir=cache, max_length=cfg.max_source_length,
                           max_target_length=cfg.max_target_length, lm_prefix=lm_prefix)

    train_ds, val_ds = _tokenise(cfg, cache, build, log)
    tidx = task_indices(train_ds)
    tasks = [t for t in TASKS if t in tidx and cfg.task_weights.get(t, 1.0) > 0]
    if not tasks:
        raise RSGError("the corpus has no training examples of any weighted task", file=corpus.root)
    missing = [t for t in TASKS if t not in tidx]
    if missing:
        log(f"the corpus has no examples of {', '.join(missing)}; training the other tasks", "WARN")
    vidx = task_indices(val_ds) if val_ds is not None else {}
    if val_ds is None:
        log("the corpus has no val split: only train losses are reported", "WARN")
    if cfg.early_stopping and not vidx:
        raise RSGError("--early-stopping needs a val split in the corpus", field="--early-stopping")

    plan = BatchPlan(tuple((t, len(tidx[t])) for t in tasks), batch_size=cfg.batch_size,
                     grad_accum=cfg.grad_accum, world=world, reading=cfg.batch_reading)
    steps_per_epoch = plan.steps_per_epoch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    for line in plan.describe(steps_per_epoch):
        log(line)
    log(f"{len(tasks)} tasks, {steps_per_epoch} optimizer steps per epoch x {cfg.epochs} epochs = {total_steps} steps")
    if cfg.batch_reading == "total" and cfg.batch_size * cfg.grad_accum * world < len(tasks):
        log(f"{cfg.batch_size * cfg.grad_accum * world} sequences per optimizer step cannot hold all "
            f"{len(tasks)} tasks: they take turns across steps")
    if world > 1:
        log(f"{world} processes, sharding {mode}" + (" with CPU offload" if cfg.fsdp_cpu_offload else ""))

    bf16 = runtime.use_bf16(cfg.bf16, device)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach every trainable part even when inputs need no grad.
        model.seq2seq.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.seq2seq.config.use_cache = False

    # ---- resume: the full weights go in before sharding, the optimizer state after
    last = out / "last"
    st = _load_resume_point(last) if (last / STATE_NAME).is_file() else None
    if st is not None:
        _load_weights(model, last)
    wrapped = sharding.wrap(model, mode, device=device, cpu_offload=cfg.fsdp_cpu_offload, bf16=bf16,
                            find_unused=True)
    fsdp = mode == "fsdp"
    # AdamW over every parameter, weight decay on all of them as torch's AdamW applies it (the paper's recipe
    # states none; fine-tuning's optimizer exempts norms and biases instead): the recipe's results stay as they were
    optimizer = make_optimizer(wrapped.parameters(), name=cfg.optimizer, lr=cfg.lr_min,
                               weight_decay=cfg.weight_decay)
    scheduler = schedules.build_scheduler(
        optimizer, cfg.schedule, base_lr=cfg.lr_min, max_lr=cfg.lr, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, gamma=cfg.gamma, step_size_up=cfg.step_size_up,
        warmup_steps=cfg.warmup_steps)
    if cfg.schedule == "paper":
        up = cfg.step_size_up or schedules.TORCH_DEFAULT_STEP_SIZE_UP
        log(schedules.paper_note(cfg.lr_min, cfg.lr, up, cfg.gamma))

    epoch, step, global_step = 0, 0, 0
    sums: dict[str, list[float]] = {t: [0.0, 0] for t in tasks}
    history: list[dict[str, Any]] = []
    stopper = EarlyStopping(cfg.early_stopping, higher_is_better=False)
    guard = StepGuard(tolerance=0)    # one non-finite step stops training (its learning rate is too high)
    if st is not None:
        sharding.load_optimizer_state(wrapped, optimizer, st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        epoch, step, global_step = st["epoch"], st["step"], st["global_step"]
        sums, history = st["sums"], st["history"]
        stopper = EarlyStopping.from_json(st.get("early_stopping"), cfg.early_stopping, False)
        guard.skipped = int(st.get("skipped_steps", 0))
        mine = rng.pick(st["rng"], rank)
        if mine is not None:
            rng.restore(mine)
        log(f"resuming at epoch {epoch + 1}, step {step} (global step {global_step})")
    else:
        torch.manual_seed(cfg.seed + rank)
    if main:
        atomic_write_json(run_file, {"config": fp, "finished": False, "history": history, "steps": global_step})
    # --report-to: only rank 0 gets a real tracker; the output folder's name and config fingerprint name its run
    tracker = make_tracker(cfg.report_to, run_dir=out, run_name=out.name, fingerprint=settings_fingerprint(fp),
                           rank=rank)
    if global_step == 0:
        tracker.log_config(fp)
    meter = Throughput()

    def save_model(path: Path, extra: Callable[[Path], None] | None = None) -> None:
        """A hierarchical checkpoint of the full weights (gathered from every process's shards under fsdp)."""
        full = sharding.full_model_state(wrapped) if fsdp else None
        collective.main_acts(d, lambda: model.save_pretrained(path, tokenizer=tokenizer, extra=extra, state=full),
                             share=False)

    def save_resume_point(e: int, s: int, snapshot: dict[str, Any] | None = None) -> None:
        gathered = d.gather(rng.to_json(snapshot or rng.snapshot()))   # every process's generators, JSON
        opt_state = sharding.full_optimizer_state(wrapped, optimizer)
        blob = {"optimizer": opt_state, "scheduler": scheduler.state_dict(), "epoch": e, "step": s,
                "global_step": global_step, "sums": sums, "history": history, "rng": gathered,
                "early_stopping": stopper.to_json(), "skipped_steps": guard.skipped}

        def extra(tmp: Path) -> None:
            torch.save(blob, tmp / STATE_NAME)
        save_model(last, extra)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_ner = len(model.config.ner_labels)
    slot = {t: k for k, t in enumerate(tasks)}
    prog = None
    if progress and main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)
        prog.start()
    stopped_early = halt = False
    try:
        with StopRequest() as stop:
            while epoch < cfg.epochs and not stopped_early:
                bar = prog.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, completed=step,
                                    info="") if prog else None
                model.train()
                while step < steps_per_epoch:
                    snapshot = rng.snapshot()   # the generators at this step boundary (a skipped step resumes here)
                    in_step = plan.step_counts(step)   # examples of each task in this optimizer step, all processes
                    jobs = _step_jobs(plan, step, cfg.grad_accum, rank, world, aligned=fsdp)
                    # Each task's summed loss in the step, kept on the device and read once per optimizer step
                    # (finish_step). float64 as the host sums were.
                    acc = torch.zeros(len(tasks), device=device, dtype=torch.float64)   # (n_tasks,)
                    seen = 0   # this process's input + target tokens in the step, counted on the host
                    for j, (t, start, count) in enumerate(jobs):
                        pos = stream_positions(len(tidx[t]), seed=cfg.seed, epoch=epoch, task=TASK_INDEX[t],
                                               start=start, count=max(count, 1))
                        rows = train_ds[tidx[t][pos].tolist()]
                        if count:
                            seen += sum(len(x) for x in rows["input_ids"]) + sum(len(x) for x in rows.get(
                                "labels", ()))
                        batch = collate(rows, t, pad_id=pad_id, n_ner=n_ner, device=device, ner_loss=cfg.ner_loss)
                        # the task's mean over its examples in the whole step: this batch's share is count / in_step
                        # (x world, because DDP and FSDP average the gradients over the processes); count 0: a
                        # batch run only so that every process runs the same modules (fsdp)
                        scale = cfg.task_weights.get(t, 1.0) * count * world / in_step[t] if count else 0.0
                        # DDP: gradients stay local until the step's last backward; FSDP: reduced every backward
                        with sharding.grad_sync(wrapped, sync=fsdp or j == len(jobs) - 1):
                            with runtime.autocast(device, bf16):
                                loss = task_loss(wrapped, batch, cfg.ner_loss)
                            (loss * scale).backward()
                        acc[slot[t]] += loss.detach().to(acc.dtype) * count
                    lr_now = float(optimizer.param_groups[0]["lr"])   # this step's rate (the schedule moves it)
                    done = finish_step(wrapped.parameters(), optimizer, scheduler, acc, d, max_norm=cfg.clip_norm,
                                       guard=guard)
                    if guard.exceeded:
                        save_resume_point(epoch, step, snapshot)   # the weights are still the last good step's
                        bad = next((t for t, v in zip(tasks, done.losses) if not math.isfinite(v)), None)
                        what = f"loss of task {bad}" if bad else f"gradient norm ({done.grad_norm})"
                        raise RSGError(f"the training {what} became non-finite at epoch {epoch + 1}, optimizer "
                                       f"step {step + 1}; training stopped. The last good state is saved in {last}. "
                                       f"Lower --lr or raise the warm-up, then rerun the same command to resume",
                                       field="train_loss")
                    for k, t in enumerate(tasks):
                        sums[t][0] += done.losses[k]      # example-weighted: the epoch's mean over examples
                        sums[t][1] += in_step[t]
                    step += 1
                    global_step += 1
                    # per task its mean loss in this step (over its examples), and their mean: as losses.csv
                    per_task = {t: done.losses[k] / in_step[t] for k, t in enumerate(tasks) if in_step[t]}
                    tracker.log_scalars(global_step, step_scalars(
                        loss=sum(per_task.values()) / max(1, len(per_task)), lr=lr_now, grad_norm=done.grad_norm,
                        tokens_per_s=meter.tick(seen * world),   # every process's share is alike: x world
                        task_losses=per_task))
                    if prog:
                        cur = [sums[t][0] / sums[t][1] for t in tasks if sums[t][1]]
                        prog.update(bar, completed=step, info=f"mean loss {sum(cur) / max(1, len(cur)):.3f}  "
                                                              f"lr {optimizer.param_groups[0]['lr']:.2e}")
                    saved = bool(cfg.save_every and global_step % cfg.save_every == 0 and step < steps_per_epoch)
                    if saved:
                        save_resume_point(epoch, step)
                    if on_step is not None:
                        on_step(global_step)
                    if stop.agreed(d):    # Ctrl-C / SIGTERM: every process stops at this same step boundary
                        if step < steps_per_epoch:
                            if not saved:
                                save_resume_point(epoch, step)
                            raise stop.stopped(f"stopped at epoch {epoch + 1}, step {step}; the resume point is "
                                               f"saved in {last}: rerun the same command to continue")
                        halt = True   # the epoch's last step: finish the epoch (it saves), then stop
                # ---- end of epoch: losses, checkpoint, resume point
                train_row = _loss_row(epoch + 1, "train", {t: sums[t][0] / sums[t][1] for t in tasks if sums[t][1]})
                history.append(train_row)
                if val_ds is not None and vidx:
                    val = evaluate_losses(wrapped if fsdp else model, val_ds, vidx, tasks,
                                          batch_size=cfg.val_batch_size or cfg.batch_size, pad_id=pad_id,
                                          n_ner=n_ner, device=device, bf16=bf16, ner_loss=cfg.ner_loss,
                                          dist=Dist() if fsdp else d)
                    history.append(_loss_row(epoch + 1, "val", val))
                    tracker.log_scalars(global_step, {"eval/loss": history[-1]["mean"],
                                                      **{f"eval/loss/{t}": v for t, v in val.items()}})
                    stopper.update(history[-1]["mean"])
                    stopped_early = stopper.stop
                log(_describe(history[-2:] if val_ds is not None and vidx else history[-1:]))
                epoch += 1
                step = 0
                sums = {t: [0.0, 0] for t in tasks}
                if main:
                    write_losses(out, history, tasks)
                save_model(out / f"epoch-{epoch}")
                save_resume_point(epoch, 0)
                if main:
                    atomic_write_json(run_file, {"config": fp, "finished": False, "history": history,
                                                 "steps": global_step})
                if prog and bar is not None:
                    prog.remove_task(bar)
                if stopped_early:
                    log(f"early stopping: the mean val loss has not improved for {cfg.early_stopping} epoch(s) "
                        f"(best {stopper.best:.4f}); stopping after epoch {epoch}")
                if halt and epoch < cfg.epochs and not stopped_early:
                    raise stop.stopped(f"stopped after epoch {epoch}; the resume point is saved in {last}: rerun "
                                       f"the same command to continue")
    finally:
        if prog:
            prog.stop()
        tracker.close()
    final = out / "final"
    if main:
        _link_or_copy_dir(out / f"epoch-{epoch}", final)
        atomic_write_json(run_file, {"config": fp, "finished": True, "history": history, "steps": global_step,
                                     **({"stopped": "early_stopping"} if stopped_early else {})})
        steps = f"{global_step} optimizer step" + ("" if global_step == 1 else "s")
        log(f"done: {steps}; final checkpoint {final}; losses in {out / 'losses.csv'}")
    d.barrier()
    return TrainResult(out, final, history, True, global_step)


def _step_jobs(plan: BatchPlan, step: int, grad_accum: int, rank: int, world: int, *, aligned: bool
               ) -> list[tuple[str, int, int]]:
    """(task, stream start, count) of this process's batches in optimizer step `step`.

    aligned (fsdp): every process runs the same tasks in the same order in each micro-step; where another process
    has a task this one has not, this one gets it with count 0 (a one-example batch whose loss is weighted 0), so
    all processes gather the same blocks' shards in the same order."""
    jobs: list[tuple[str, int, int]] = []
    for micro in range(grad_accum):
        mine = plan.micro(step, micro, rank)
        if not aligned:
            jobs += mine
            continue
        have = {t: (t, a, n) for t, a, n in mine}
        everyone = {t for r in range(world) for t, _, _ in plan.micro(step, micro, r)}
        jobs += [have.get(t, (t, 0, 0)) for t in plan.tasks if t in everyone]
    return jobs


def _loss_row(epoch: int, split: str, losses: dict[str, float]) -> dict[str, Any]:
    """One losses.csv row: each task's mean loss and their unweighted mean over the tasks (the paper's "average
    loss" of Figures 2-3). Task weights scale the gradient, not this curve, so runs with different weights compare."""
    row: dict[str, Any] = {"epoch": epoch, "split": split}
    row.update(losses)
    row["mean"] = sum(losses.values()) / len(losses) if losses else math.nan
    return row


def _describe(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        per = " ".join(f"{t}={r[t]:.3f}" for t in TASKS if t in r)
        parts.append(f"epoch {r['epoch']} {r['split']}: mean over tasks {r['mean']:.4f} ({per})")
    return "; ".join(parts)


@torch.no_grad()
def evaluate_losses(model: HierarchicalT5, ds: Any, idx: dict[str, Any], tasks: list[str], *, batch_size: int,
                    pad_id: int, n_ner: int, device: torch.device, bf16: bool, ner_loss: str = "softmax",
                    dist: Any = None) -> dict[str, float]:
    """Mean loss per task over the whole split (batch losses weighted by batch size), in eval mode.

    dist (rsg_eval.engine.runtime.Dist): several processes split the batches round-robin and sum their totals in one
    collective, so each evaluates 1/world of the split; the batches, hence the figures, are those of one process."""
    from rsg_eval.engine.collective import all_sum_floats, shard

    d = dist or Dist()
    was = model.training
    model.eval()
    sums: list[float] = []
    names: list[str] = []
    for t in tasks:
        rows_idx = idx.get(t)
        if rows_idx is None or not len(rows_idx):
            continue
        # summed on the device, read once per task (not once per batch: each read waits for the GPU)
        total = torch.zeros((), device=device, dtype=torch.float64)
        n = 0
        for i in shard(len(rows_idx), d, batch_size):
            chunk = rows_idx[i:i + batch_size].tolist()
            batch = collate(ds[chunk], t, pad_id=pad_id, n_ner=n_ner, device=device, ner_loss=ner_loss)
            with runtime.autocast(device, bf16):
                loss = task_loss(model, batch, ner_loss)
            total += loss.to(total.dtype) * len(chunk)
            n += len(chunk)
        names.append(t)
        sums += [total.item(), float(n)]
    sums = all_sum_floats(sums, d)
    model.train(was)
    return {t: sums[2 * k] / sums[2 * k + 1] for k, t in enumerate(names)}
