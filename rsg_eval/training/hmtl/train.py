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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import atomic_write_json, read_json
from rsg_eval.corpus.labels import TASKS
from rsg_eval.corpus.load import open_corpus
from rsg_eval.engine import collective, rng, runtime, sharding
from rsg_eval.engine.early_stop import EarlyStopping
from rsg_eval.engine.optim import make_optimizer
from rsg_eval.engine.runtime import Dist
from rsg_eval.engine.step import StepGuard, finish_step
from rsg_eval.engine.stop import StopRequest
from rsg_eval.engine.tracking import Throughput, make_tracker, step_scalars
from rsg_eval.models.adapters import ADAPTER_ACTIVATIONS
from rsg_eval.models.hierarchical import (ADAPTER_LAYOUTS, NER_LOSSES, HierarchicalT5, is_hierarchical_dir,
                                          load_hierarchical)
from rsg_eval.runs import fingerprint as settings_fingerprint
from rsg_eval.training.hmtl import schedules
from rsg_eval.training.hmtl.config import TrainConfig, parse_task_weights  # noqa: F401  (re-exported)
from rsg_eval.training.hmtl.dataset import (BATCH_READINGS, TASK_INDEX, BatchPlan, build_split, collate,
                                            stream_positions, task_indices)
from rsg_eval.training.hmtl.losses import evaluate_losses, task_loss  # noqa: F401  (task_loss re-exported)
from rsg_eval.training.hmtl.outputs import (Log, check_run_json, claim_out, describe, link_or_copy_dir, loss_row,
                                            write_losses)

STATE_NAME = "trainer_state.pt"


@dataclass
class TrainResult:
    out: Path
    final: Path | None
    history: list[dict[str, Any]]
    finished: bool
    steps: int


# ---------------------------------------------------------------------------- model setup
def _build_model(cfg: TrainConfig, labels: Any, device: torch.device, log: Log) -> tuple[HierarchicalT5, Any]:
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


def _tokenise(cfg: TrainConfig, cache: Path, build: Callable[[str], tuple[Any, bool]], log: Log) -> tuple[Any, Any]:
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


# ---------------------------------------------------------------------------- setup
@dataclass
class _Setup:
    """What the loop reads, built once by `_setup`: the processes, the data and its batch plan, the model (and its
    DDP / FSDP wrapper), the optimizer and schedule, and the resume point's trainer state (None on a fresh start)."""
    d: Dist
    device: torch.device
    bf16: bool
    fsdp: bool
    out: Path
    log: Log
    fp: dict[str, Any]                 # the recipe's fingerprint (run.json's "config")
    model: HierarchicalT5
    tokenizer: Any
    wrapped: Any                       # model under DDP / FSDP; model itself in one process
    train_ds: Any
    val_ds: Any
    tidx: dict[str, Any]               # task -> its rows in train_ds
    vidx: dict[str, Any]               # task -> its rows in val_ds ({} without a val split)
    tasks: list[str]                   # the trained tasks, in TASKS order
    plan: BatchPlan
    steps_per_epoch: int
    optimizer: Any
    scheduler: Any
    resume: dict[str, Any] | None      # trainer_state.pt of last/, or None

    @property
    def last(self) -> Path:
        return self.out / "last"

    @property
    def run_file(self) -> Path:
        return self.out / "run.json"


@dataclass
class _State:
    """The counters the loop advances and a resume point saves."""
    epoch: int
    step: int
    global_step: int
    sums: dict[str, list[float]]       # task -> [summed loss, examples] in the current epoch
    history: list[dict[str, Any]]      # losses.csv rows
    stopper: EarlyStopping
    guard: StepGuard


def _check_options(cfg: TrainConfig, mode: str) -> None:
    """Refuse a bad option value before anything is read or written."""
    if cfg.fsdp_cpu_offload and mode != "fsdp":
        raise RSGError("--fsdp-cpu-offload needs --sharding fsdp under a launcher (torchrun or accelerate launch "
                       "with several processes)", field="--fsdp-cpu-offload", expected="--sharding fsdp")
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


def _setup(cfg: TrainConfig, held: contextlib.ExitStack, console: Any, restart: bool) -> _Setup | TrainResult:
    """Options, processes, the claimed output folder, model, data, batch plan, sharding, optimizer, schedule and the
    resume point; a TrainResult when the folder already holds a finished run."""
    import datasets

    datasets.disable_progress_bars()
    d, device = runtime.setup(None, cfg.dist_timeout)
    mode = sharding.resolve_mode(cfg.sharding, d)
    _check_options(cfg, mode)
    out = Path(cfg.out)
    corpus = open_corpus(cfg.corpus)      # a missing corpus fails before anything is written
    held.enter_context(claim_out(cfg, corpus, d, restart))   # creates --out, locked, one configuration
    d.barrier()
    if console is None and d.main:
        from rich.console import Console
        console = Console(stderr=True)
    log = Log(out / "train.log", console, d.main)

    run_file = out / "run.json"
    fp = cfg.fingerprint_dict()
    check_run_json(run_file, fp)
    prior = read_json(run_file) if run_file.is_file() else None
    if prior is not None and prior.get("finished"):
        log(f"{out} already holds a finished run; nothing to do")
        hist = prior.get("history", [])
        return TrainResult(out, out / "final", hist, True, prior.get("steps", 0))

    model, tokenizer = _build_model(cfg, corpus.labels, device, log)
    train_ds, val_ds, tidx, vidx, tasks = _data(cfg, corpus, tokenizer, out / "cache", log)
    plan, steps_per_epoch = _batch_plan(cfg, tasks, tidx, d.world, mode, log)
    bf16 = runtime.use_bf16(cfg.bf16, device)
    wrapped, optimizer, scheduler, st = _optimise(cfg, model, mode, device, bf16, out / "last",
                                                  steps_per_epoch, log)
    return _Setup(d=d, device=device, bf16=bf16, fsdp=mode == "fsdp", out=out, log=log, fp=fp, model=model,
                  tokenizer=tokenizer, wrapped=wrapped, train_ds=train_ds, val_ds=val_ds, tidx=tidx, vidx=vidx,
                  tasks=tasks, plan=plan, steps_per_epoch=steps_per_epoch, optimizer=optimizer,
                  scheduler=scheduler, resume=st)


def _data(cfg: TrainConfig, corpus: Any, tokenizer: Any, cache: Path, log: Log
          ) -> tuple[Any, Any, dict[str, Any], dict[str, Any], list[str]]:
    """Both splits tokenised, each task's rows in them, and the tasks to train (present and weighted)."""
    lm_prefix = cfg.lm_prefix
    if lm_prefix == "auto":
        lm_prefix = "<LM>" if "<LM>" in tokenizer.get_vocab() else ""

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
    return train_ds, val_ds, tidx, vidx, tasks


def _batch_plan(cfg: TrainConfig, tasks: list[str], tidx: dict[str, Any], world: int, mode: str, log: Log
                ) -> tuple[BatchPlan, int]:
    """The batch plan and the optimizer steps per epoch, stated in the log."""
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
    return plan, steps_per_epoch


def _optimise(cfg: TrainConfig, model: HierarchicalT5, mode: str, device: torch.device, bf16: bool, last: Path,
              steps_per_epoch: int, log: Log) -> tuple[Any, Any, Any, dict[str, Any] | None]:
    """(wrapped model, optimizer, scheduler, trainer state of the resume point or None). The resume point's full
    weights go in before sharding; its optimizer state goes in after (_start_state)."""
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach every trainable part even when inputs need no grad.
        model.seq2seq.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.seq2seq.config.use_cache = False
    st = _load_resume_point(last) if (last / STATE_NAME).is_file() else None
    if st is not None:
        _load_weights(model, last)
    wrapped = sharding.wrap(model, mode, device=device, cpu_offload=cfg.fsdp_cpu_offload, bf16=bf16,
                            find_unused=True)
    # AdamW over every parameter, weight decay on all of them as torch's AdamW applies it (the paper's recipe
    # states none; fine-tuning's optimizer exempts norms and biases instead): the recipe's results stay as they were
    optimizer = make_optimizer(wrapped.parameters(), name=cfg.optimizer, lr=cfg.lr_min,
                               weight_decay=cfg.weight_decay)
    scheduler = schedules.build_scheduler(
        optimizer, cfg.schedule, base_lr=cfg.lr_min, max_lr=cfg.lr, total_steps=steps_per_epoch * cfg.epochs,
        steps_per_epoch=steps_per_epoch, gamma=cfg.gamma, step_size_up=cfg.step_size_up,
        warmup_steps=cfg.warmup_steps)
    if cfg.schedule == "paper":
        up = cfg.step_size_up or schedules.TORCH_DEFAULT_STEP_SIZE_UP
        log(schedules.paper_note(cfg.lr_min, cfg.lr, up, cfg.gamma))
    return wrapped, optimizer, scheduler, st


def _start_state(cfg: TrainConfig, s: _Setup) -> _State:
    """Fresh counters, or the resume point's: counters, history, optimizer, schedule, early stopping, this
    process's generators."""
    st = _State(epoch=0, step=0, global_step=0, sums={t: [0.0, 0] for t in s.tasks}, history=[],
                stopper=EarlyStopping(cfg.early_stopping, higher_is_better=False),
                guard=StepGuard(tolerance=0))   # one non-finite step stops training (its learning rate is too high)
    saved = s.resume
    if saved is not None:
        sharding.load_optimizer_state(s.wrapped, s.optimizer, saved["optimizer"])
        s.scheduler.load_state_dict(saved["scheduler"])
        st.epoch, st.step, st.global_step = saved["epoch"], saved["step"], saved["global_step"]
        st.sums, st.history = saved["sums"], saved["history"]
        st.stopper = EarlyStopping.from_json(saved.get("early_stopping"), cfg.early_stopping, False)
        st.guard.skipped = int(saved.get("skipped_steps", 0))
        mine = rng.pick(saved["rng"], s.d.rank)
        if mine is not None:
            rng.restore(mine)
        s.log(f"resuming at epoch {st.epoch + 1}, step {st.step} (global step {st.global_step})")
    else:
        torch.manual_seed(cfg.seed + s.d.rank)
    return st


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, progress: bool = True, console: Any = None,
          on_step: Callable[[int], None] | None = None, restart: bool = False) -> TrainResult:
    """Train (or resume) into cfg.out. `on_step(global_step)` runs after each optimizer step (tests use it to
    simulate an interruption). `restart` clears the folder's outputs (not the tokenised cache) and starts over;
    without it, a folder holding outputs of other settings is refused."""
    with contextlib.ExitStack() as held:  # the folder's lock, released however training ends
        s = _setup(cfg, held, console, restart)
        if isinstance(s, TrainResult):    # the folder holds a finished run
            return s
        return _loop(cfg, s, progress=progress, on_step=on_step)


# The recipe's one explicit loop (epochs, optimizer steps, the non-finite guard, saves, the clean stop), read top to
# bottom; setup, the step's forward/backward and the epoch's end are helpers, the shared parts engine calls.
def _loop(cfg: TrainConfig, s: _Setup, *, progress: bool, on_step: Callable[[int], None] | None) -> TrainResult:
    st = _start_state(cfg, s)
    d, tasks, optimizer = s.d, s.tasks, s.optimizer
    if d.main:
        atomic_write_json(s.run_file, {"config": s.fp, "finished": False, "history": st.history,
                                       "steps": st.global_step})
    # --report-to: only rank 0 gets a real tracker; the output folder's name and config fingerprint name its run
    tracker = make_tracker(cfg.report_to, run_dir=s.out, run_name=s.out.name,
                           fingerprint=settings_fingerprint(s.fp), rank=d.rank)
    if st.global_step == 0:
        tracker.log_config(s.fp)
    meter = Throughput()
    prog = _progress_bar(s.log.console) if progress and d.main else None
    stopped_early = halt = False
    try:
        with StopRequest() as stop:
            while st.epoch < cfg.epochs and not stopped_early:
                bar = prog.add_task(f"epoch {st.epoch + 1}/{cfg.epochs}", total=s.steps_per_epoch,
                                    completed=st.step, info="") if prog else None
                s.model.train()
                while st.step < s.steps_per_epoch:
                    snapshot = rng.snapshot()   # the generators at this step boundary (a skipped step resumes here)
                    in_step = s.plan.step_counts(st.step)   # each task's examples in this optimizer step, all processes
                    acc, seen = _forward_backward(cfg, s, st, in_step)
                    lr_now = float(optimizer.param_groups[0]["lr"])   # this step's rate (the schedule moves it)
                    done = finish_step(s.wrapped.parameters(), optimizer, s.scheduler, acc, d,
                                       max_norm=cfg.clip_norm, guard=st.guard)
                    if st.guard.exceeded:
                        _save_resume_point(s, st, snapshot)   # the weights are still the last good step's
                        bad = next((t for t, v in zip(tasks, done.losses) if not math.isfinite(v)), None)
                        what = f"loss of task {bad}" if bad else f"gradient norm ({done.grad_norm})"
                        raise RSGError(f"the training {what} became non-finite at epoch {st.epoch + 1}, optimizer "
                                       f"step {st.step + 1}; training stopped. The last good state is saved in "
                                       f"{s.last}. Lower --lr or raise the warm-up, then rerun the same command to "
                                       f"resume", field="train_loss")
                    for k, t in enumerate(tasks):
                        st.sums[t][0] += done.losses[k]      # example-weighted: the epoch's mean over examples
                        st.sums[t][1] += in_step[t]
                    st.step += 1
                    st.global_step += 1
                    # per task its mean loss in this step (over its examples), and their mean: as losses.csv
                    per_task = {t: done.losses[k] / in_step[t] for k, t in enumerate(tasks) if in_step[t]}
                    tracker.log_scalars(st.global_step, step_scalars(
                        loss=sum(per_task.values()) / max(1, len(per_task)), lr=lr_now, grad_norm=done.grad_norm,
                        tokens_per_s=meter.tick(seen * d.world),   # every process's share is alike: x world
                        task_losses=per_task))
                    if prog:
                        cur = [st.sums[t][0] / st.sums[t][1] for t in tasks if st.sums[t][1]]
                        prog.update(bar, completed=st.step, info=f"mean loss {sum(cur) / max(1, len(cur)):.3f}  "
                                                                 f"lr {optimizer.param_groups[0]['lr']:.2e}")
                    saved = bool(cfg.save_every and st.global_step % cfg.save_every == 0
                                 and st.step < s.steps_per_epoch)
                    if saved:
                        _save_resume_point(s, st)
                    if on_step is not None:
                        on_step(st.global_step)
                    if stop.agreed(d):    # Ctrl-C / SIGTERM: every process stops at this same step boundary
                        if st.step < s.steps_per_epoch:
                            if not saved:
                                _save_resume_point(s, st)
                            raise stop.stopped(f"stopped at epoch {st.epoch + 1}, step {st.step}; the resume point "
                                               f"is saved in {s.last}: rerun the same command to continue")
                        halt = True   # the epoch's last step: finish the epoch (it saves), then stop
                stopped_early = _end_epoch(cfg, s, st, tracker)
                if prog and bar is not None:
                    prog.remove_task(bar)
                if stopped_early:
                    s.log(f"early stopping: the mean val loss has not improved for {cfg.early_stopping} epoch(s) "
                          f"(best {st.stopper.best:.4f}); stopping after epoch {st.epoch}")
                if halt and st.epoch < cfg.epochs and not stopped_early:
                    raise stop.stopped(f"stopped after epoch {st.epoch}; the resume point is saved in {s.last}: "
                                       f"rerun the same command to continue")
    finally:
        if prog:
            prog.stop()
        tracker.close()
    return _finish(s, st, stopped_early)


def _progress_bar(console: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)
    prog.start()
    return prog


def _forward_backward(cfg: TrainConfig, s: _Setup, st: _State, in_step: dict[str, int]) -> tuple[torch.Tensor, int]:
    """This process's batches of optimizer step st.step, forward and backward, each task's loss scaled to its
    weighted mean over the step's examples. Returns (each task's summed loss in the step, on the device: (n_tasks,)
    float64, read once by finish_step; this process's input + target tokens in the step, counted on the host)."""
    world, fsdp = s.d.world, s.fsdp
    pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
    n_ner = len(s.model.config.ner_labels)
    slot = {t: k for k, t in enumerate(s.tasks)}
    jobs = _step_jobs(s.plan, st.step, cfg.grad_accum, s.d.rank, world, aligned=fsdp)
    # float64 as the host sums were
    acc = torch.zeros(len(s.tasks), device=s.device, dtype=torch.float64)   # (n_tasks,)
    seen = 0
    for j, (t, start, count) in enumerate(jobs):
        pos = stream_positions(len(s.tidx[t]), seed=cfg.seed, epoch=st.epoch, task=TASK_INDEX[t],
                               start=start, count=max(count, 1))
        rows = s.train_ds[s.tidx[t][pos].tolist()]
        if count:
            seen += sum(len(x) for x in rows["input_ids"]) + sum(len(x) for x in rows.get("labels", ()))
        batch = collate(rows, t, pad_id=pad_id, n_ner=n_ner, device=s.device, ner_loss=cfg.ner_loss)
        # the task's mean over its examples in the whole step: this batch's share is count / in_step
        # (x world, because DDP and FSDP average the gradients over the processes); count 0: a
        # batch run only so that every process runs the same modules (fsdp)
        scale = cfg.task_weights.get(t, 1.0) * count * world / in_step[t] if count else 0.0
        # DDP: gradients stay local until the step's last backward; FSDP: reduced every backward
        with sharding.grad_sync(s.wrapped, sync=fsdp or j == len(jobs) - 1):
            with runtime.autocast(s.device, s.bf16):
                loss = task_loss(s.wrapped, batch, cfg.ner_loss)
            (loss * scale).backward()
        acc[slot[t]] += loss.detach().to(acc.dtype) * count
    return acc, seen


def _end_epoch(cfg: TrainConfig, s: _Setup, st: _State, tracker: Any) -> bool:
    """The epoch's train (and val) loss rows, losses.csv/png, the epoch's checkpoint, the resume point and run.json;
    the counters move to the next epoch. True when early stopping ends training here."""
    tasks, stopped_early = s.tasks, False
    st.history.append(loss_row(st.epoch + 1, "train",
                               {t: st.sums[t][0] / st.sums[t][1] for t in tasks if st.sums[t][1]}))
    if s.val_ds is not None and s.vidx:
        pad_id = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else 0
        val = evaluate_losses(s.wrapped if s.fsdp else s.model, s.val_ds, s.vidx, tasks,
                              batch_size=cfg.val_batch_size or cfg.batch_size, pad_id=pad_id,
                              n_ner=len(s.model.config.ner_labels), device=s.device, bf16=s.bf16,
                              ner_loss=cfg.ner_loss, dist=Dist() if s.fsdp else s.d)
        st.history.append(loss_row(st.epoch + 1, "val", val))
        tracker.log_scalars(st.global_step, {"eval/loss": st.history[-1]["mean"],
                                             **{f"eval/loss/{t}": v for t, v in val.items()}})
        st.stopper.update(st.history[-1]["mean"])
        stopped_early = st.stopper.stop
    s.log(describe(st.history[-2:] if s.val_ds is not None and s.vidx else st.history[-1:]))
    st.epoch += 1
    st.step = 0
    st.sums = {t: [0.0, 0] for t in tasks}
    if s.d.main:
        write_losses(s.out, st.history, tasks)
    _save_model(s, s.out / f"epoch-{st.epoch}")
    _save_resume_point(s, st)
    if s.d.main:
        atomic_write_json(s.run_file, {"config": s.fp, "finished": False, "history": st.history,
                                       "steps": st.global_step})
    return stopped_early


def _save_model(s: _Setup, path: Path, extra: Callable[[Path], None] | None = None) -> None:
    """A hierarchical checkpoint of the full weights (gathered from every process's shards under fsdp)."""
    full = sharding.full_model_state(s.wrapped) if s.fsdp else None
    collective.main_acts(s.d, lambda: s.model.save_pretrained(path, tokenizer=s.tokenizer, extra=extra, state=full),
                         share=False)


def _save_resume_point(s: _Setup, st: _State, snapshot: dict[str, Any] | None = None) -> None:
    """last/: the weights and trainer_state.pt (optimizer, schedule, counters at st.epoch / st.step, history, every
    process's generators: `snapshot`, or now)."""
    gathered = s.d.gather(rng.to_json(snapshot or rng.snapshot()))   # every process's generators, JSON
    opt_state = sharding.full_optimizer_state(s.wrapped, s.optimizer)
    blob = {"optimizer": opt_state, "scheduler": s.scheduler.state_dict(), "epoch": st.epoch, "step": st.step,
            "global_step": st.global_step, "sums": st.sums, "history": st.history, "rng": gathered,
            "early_stopping": st.stopper.to_json(), "skipped_steps": st.guard.skipped}

    def extra(tmp: Path) -> None:
        torch.save(blob, tmp / STATE_NAME)
    _save_model(s, s.last, extra)


def _finish(s: _Setup, st: _State, stopped_early: bool) -> TrainResult:
    """final/ (hard links to the last epoch's checkpoint) and run.json marked finished."""
    final = s.out / "final"
    if s.d.main:
        link_or_copy_dir(s.out / f"epoch-{st.epoch}", final)
        atomic_write_json(s.run_file, {"config": s.fp, "finished": True, "history": st.history,
                                       "steps": st.global_step,
                                       **({"stopped": "early_stopping"} if stopped_early else {})})
        steps = f"{st.global_step} optimizer step" + ("" if st.global_step == 1 else "s")
        s.log(f"done: {steps}; final checkpoint {final}; losses in {s.out / 'losses.csv'}")
    s.d.barrier()
    return TrainResult(s.out, final, st.history, True, st.global_step)


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
