"""`rsg train-hmtl`: multi-task training of the hierarchical FRED-T5 with the paper's recipe as defaults.

Every optimizer step sees every task in the corpus. The paper's "a batch of 12 sequences ... accumulation 2,
effective batch 24" has two readings, both offered (`batch_reading`, dataset.BatchPlan): "total" (the default,
closest to the text: 12 sequences per micro-step in all, dealt to the eight tasks in rotation, 3 of each task per
optimizer step) and "per-task" (12 of every task per micro-step, 192 per optimizer step). Within a micro-step each
task's sequences go forward and backward on their own (the gradients add up exactly as for one summed loss, but
only one task's activations are alive at a time). Each task's loss enters the step as the mean over its examples in
that optimizer step, times the task weight: the objective is the weighted sum of the task losses (the paper's sum,
all weights 1). Then the gradient is clipped to norm 1.0, AdamW steps and the schedule steps once.

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
    last/                    checkpoint + trainer_state.pt for resuming (after each epoch and every --save-every)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rsg_eval.core.errors import RSGError
from rsg_eval.hmtl import schedules
from rsg_eval.corpus.load import open_corpus
from rsg_eval.hmtl.dataset import (BATCH_READINGS, TASK_INDEX, BatchPlan, build_split, collate, stream_positions,
                                   task_indices)
from rsg_eval.corpus.labels import TASKS
from rsg_eval.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from rsg_eval.models.hierarchical import (ADAPTER_LAYOUTS, NER_LOSSES, HierarchicalT5, is_hierarchical_dir,
                                          load_hierarchical, ner_softmax_logits)

STATE_NAME = "trainer_state.pt"
CODE_VERSION = "hmtl-1"   # bump when training changes what a checkpoint would contain: old outputs then refuse


@dataclass
class TrainConfig:
    model: str
    corpus: str
    out: str
    epochs: int = 4
    batch_size: int = 12                 # sequences per micro-step: in all ("total") or per task ("per-task")
    grad_accum: int = 2
    batch_reading: str = "total"         # the paper's "batch of 12 sequences": total (default) | per-task
    max_length: int = 512
    max_target_length: int = 512
    schedule: str = "paper"              # paper | cycle-gamma | cosine
    lr_min: float = 1e-6
    lr_max: float = 1e-4
    gamma: float = 0.9                   # paper: per optimizer step (exp_range); cycle-gamma: per cycle
    step_size_up: int | None = None      # paper: 2000 (torch default); cycle-gamma: half an epoch
    warmup_steps: int | None = None      # cosine: 6 % of all steps
    weight_decay: float = 0.01           # torch AdamW default
    clip_norm: float = 1.0
    task_weights: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASKS})
    split: str = "0.25"                  # Block 1 = a quarter of the encoder (6 of 24 for FRED-T5-1.7B)
    adapter_dim: int | None = None       # d_model // 16
    adapter_activation: str = "relu"
    adapter_layout: str = "per-head"     # per-head (4 adapters) | shared-mc-ner (the paper's 3: MC+NER, NLI, LM)
    ner_loss: str = "softmax"            # softmax (the paper's Eq. 1, innermost entity per token) | multilabel
    head_dropout: float = 0.1
    bf16: str = "auto"                   # auto = bf16 autocast on a GPU that supports it
    gradient_checkpointing: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None   # cap (smoke runs)
    save_steps: int = 0                  # also save a resume point every N optimizer steps (0 = per epoch only)
    lm_prefix: str = "auto"              # "<LM>" when the tokenizer has it (FRED), else ""
    val_batch_size: int | None = None
    dist_timeout: float = 7200.0         # seconds a process may wait for the others (several GPUs)

    def fingerprint_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("out", "save_steps", "val_batch_size", "dist_timeout"):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    out: Path
    final: Path | None
    history: list[dict[str, Any]]
    finished: bool
    steps: int


def parse_task_weights(spec: str | None) -> dict[str, float]:
    """"ner=1,mc=0.5" -> full weight dict (unnamed tasks keep 1.0)."""
    weights = {t: 1.0 for t in TASKS}
    if not spec:
        return weights
    for part in spec.split(","):
        if not part.strip():
            continue
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise RSGError(f"unknown task {name!r}", field="task-weights", expected=list(TASKS))
        try:
            weights[name] = float(val)
        except ValueError:
            raise RSGError(f"not a number: {val!r}", field=f"task-weights {name}") from None
        if weights[name] < 0:
            raise RSGError("weights must be >= 0", field=f"task-weights {name}")
    return weights


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


def task_loss(model: HierarchicalT5, batch: Any, ner_loss: str = "softmax") -> torch.Tensor:
    """One task's loss on one batch (a mean over its examples, or its real tokens). Computed in fp32 even under bf16
    autocast. MC, NLI and NER (default) use the paper's cross-entropy against one-hot targets, its Eq. 1."""
    ids, mask, y = batch.input_ids, batch.attention_mask, batch.target
    if batch.task == "mc":
        return F.cross_entropy(model.mc_logits(ids, mask).float(), y)
    if batch.task == "nli":
        return F.cross_entropy(model.nli_logits(ids, mask).float(), y)
    if batch.task == "ner" and ner_loss == "softmax":
        # per token, softmax over outside + 29 types against the innermost entity's type; padding (-100) ignored
        full = ner_softmax_logits(model.ner_logits(ids, mask).float())          # (B, T, 1 + n)
        return F.cross_entropy(full.flatten(0, 1), y.flatten(), ignore_index=-100)
    if batch.task == "ner":
        # multi-label: one binary cross-entropy per (token, type), averaged over real tokens and types.
        logits = model.ner_logits(ids, mask).float()                         # (B, T, n)
        per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        m = mask.unsqueeze(-1).to(per.dtype)
        return (per * m).sum() / (m.sum() * per.shape[-1]).clamp(min=1.0)
    return model.lm_loss(ids, mask, y)


@dataclass
class _DistState:
    """Process layout from the launcher's environment (`accelerate launch` and `torchrun` both set WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT), joined with a timeout (`--dist-timeout`, rsg_eval.training.dist). Gradients are
    averaged in buckets after the accumulation steps (rsg_eval.training.dist.BucketedGradAverage), so the model is
    never wrapped in DDP: each task's backward touches a different part of the network."""

    device: torch.device
    num_processes: int = 1
    process_index: int = 0
    local_index: int = 0

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def dist(self) -> Any:
        from rsg_eval.training.dist import Dist

        return Dist(rank=self.process_index, world=self.num_processes, local_rank=self.local_index)

    @classmethod
    def setup(cls, timeout_s: float | None = None) -> "_DistState":
        """This process's device, and the process group joined (a lone process joins nothing)."""
        from rsg_eval.training.dist import init_from_env, resolve_device

        d = init_from_env(timeout_s)
        device = resolve_device(None, d)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return cls(device, d.world, d.rank, d.local_rank)

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            torch.distributed.barrier()


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _use_bf16(setting: str, device: torch.device) -> bool:
    if setting == "auto":
        from rsg_eval.models.loading import cuda_bf16_native  # native bf16 only, not V100/T4 emulation
        return device.type == "cuda" and cuda_bf16_native()
    return setting in ("true", "yes", "1", "on")


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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
    from rsg_eval.training.dist import file_lock

    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / ".tokenise.lock"):
        splits = {}
        for split in ("train", "val"):
            ds, hit = build(split)
            splits[split] = ds
            if ds is not None:
                log(f"{split} data: {'tokenised cache' if hit else 'tokenised'} ({len(ds)} examples)")
    return splits["train"], splits["val"]


def _grad_averager(model: HierarchicalT5, world: int) -> Any:
    """Bucketed, overlapped gradient averaging over the processes (None for one process). The heads come first in
    the list, so last in the buckets: a step's last backward is a generation task's, which never touches them."""
    if world <= 1:
        return None
    from rsg_eval.training.dist import BucketedGradAverage

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    heads = [p for n, p in named if n.startswith("heads.")]
    rest = [p for n, p in named if not n.startswith("heads.")]
    return BucketedGradAverage(heads + rest, world)


_DAMAGED = ("the resume point is damaged (a disk error, or it was changed); delete {folder} and rerun the same "
            "command: training then starts again from the beginning")


def _load_resume_point(last: Path) -> dict[str, Any]:
    """The trainer state saved with `last` (written by this program, hence weights_only=False)."""
    import pickle
    import zipfile

    try:
        return torch.load(last / STATE_NAME, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
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


def _claim_out(cfg: TrainConfig, corpus: Any, state: "_DistState", restart: bool) -> Any:
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

    claim, err = None, None
    if state.is_main_process:
        legacy = (out / "run.json").is_file() and not (out / "settings.json").is_file()
        try:
            claim = claim_folder(out, "train-hmtl", out_settings(cfg, corpus), restart=restart,
                                 record="settings.json", has_results=has_results, clear=clear, option="--out",
                                 unrecorded="compare" if legacy else "refuse", main=True)
            try:
                if legacy and not restart:  # an --out from before settings.json: its run.json holds the recipe
                    _check_run_json(out / "run.json", cfg.fingerprint_dict())
                claim.write_record()
            except BaseException:
                claim.release()
                raise
        except RSGError as exc:
            err = exc
    if state.num_processes > 1:
        box = [str(err) if err is not None else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if err is None and box[0] is not None:
            raise RSGError(box[0])
    if err is not None:
        raise err
    return claim if claim is not None else contextlib.nullcontext()


def _check_run_json(run_file: Path, fp: dict[str, Any]) -> None:
    """Refuse when run.json's recorded config differs from `fp`, naming each setting old -> new."""
    prior = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
    if prior is not None and prior.get("config") != json.loads(json.dumps(fp)):
        from rsg_eval.runs import settings_diff

        changed = settings_diff(prior.get("config") or {}, json.loads(json.dumps(fp)))
        raise RSGError(f"the output folder holds a run with different settings ({'; '.join(changed)}); pass "
                       f"--restart to clear it and start over, or pick another --out", file=run_file, field="--out")


def _train(cfg: TrainConfig, held: contextlib.ExitStack, *, progress: bool, console: Any,
           on_step: Callable[[int], None] | None, restart: bool) -> TrainResult:
    import datasets

    datasets.disable_progress_bars()
    state = _DistState.setup(cfg.dist_timeout)
    device = state.device
    world, rank, main = state.num_processes, state.process_index, state.is_main_process
    out = Path(cfg.out)
    if cfg.schedule not in schedules.SCHEDULES:
        raise RSGError(f"unknown schedule {cfg.schedule!r}", field="schedule", expected=list(schedules.SCHEDULES))
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise RSGError("epochs, batch size and gradient accumulation must be >= 1", field="epochs")
    for name, value, choices in (("batch-reading", cfg.batch_reading, BATCH_READINGS),
                                 ("ner-loss", cfg.ner_loss, tuple(NER_LOSSES)),
                                 ("adapter-layout", cfg.adapter_layout, ADAPTER_LAYOUTS)):
        if value not in choices:
            raise RSGError(f"unknown value {value!r}", field=name, expected=list(choices))
    corpus = open_corpus(cfg.corpus)      # a missing corpus fails before anything is written
    held.enter_context(_claim_out(cfg, corpus, state, restart))   # creates --out, locked, one configuration
    state.wait_for_everyone()
    if console is None and main:
        from rich.console import Console
        console = Console(stderr=True)
    log = _Log(out / "train.log", console, main)

    run_file = out / "run.json"
    fp = cfg.fingerprint_dict()
    _check_run_json(run_file, fp)
    prior = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else None
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
        return build_split(corpus, split, tokenizer, cache_dir=cache, max_length=cfg.max_length,
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

    try:   # torch's fused kernel (CUDA; CPU since torch 2.4), as fine-tuning uses: one kernel over all parameters,
        # and its step counters stay on the device, where the for-each kernel reads one per tensor on the host
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_min, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):   # an older torch, or a device without the fused kernel
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr_min, weight_decay=cfg.weight_decay)
    scheduler = schedules.build_scheduler(
        optimizer, cfg.schedule, base_lr=cfg.lr_min, max_lr=cfg.lr_max, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, gamma=cfg.gamma, step_size_up=cfg.step_size_up,
        warmup_steps=cfg.warmup_steps)
    if cfg.schedule == "paper":
        up = cfg.step_size_up or schedules.TORCH_DEFAULT_STEP_SIZE_UP
        log(schedules.paper_note(cfg.lr_min, cfg.lr_max, up, cfg.gamma))
    bf16 = _use_bf16(cfg.bf16, device)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach every trainable part even when inputs need no grad.
        model.seq2seq.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.seq2seq.config.use_cache = False

    # ---- resume
    epoch, step, global_step = 0, 0, 0
    sums: dict[str, list[float]] = {t: [0.0, 0] for t in tasks}
    history: list[dict[str, Any]] = []
    last = out / "last"
    if (last / STATE_NAME).is_file():
        st = _load_resume_point(last)
        _load_weights(model, last)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        epoch, step, global_step = st["epoch"], st["step"], st["global_step"]
        sums, history = st["sums"], st["history"]
        _set_rng_state(st["rng"][rank] if rank < len(st["rng"]) else st["rng"][0])
        log(f"resuming at epoch {epoch + 1}, step {step} (global step {global_step})")
    else:
        torch.manual_seed(cfg.seed + rank)
    if main:
        atomic_write_json(run_file, {"config": fp, "finished": False, "history": history, "steps": global_step})

    def save_resume_point(e: int, s: int) -> None:
        rng = _rng_state()
        gathered = [rng]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, rng)
        if main:
            blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": e,
                    "step": s, "global_step": global_step, "sums": sums, "history": history, "rng": gathered}

            def extra(tmp: Path) -> None:
                torch.save(blob, tmp / STATE_NAME)
            model.save_pretrained(last, tokenizer=tokenizer, extra=extra)
        state.wait_for_everyone()

    trainable = [p for p in model.parameters() if p.requires_grad]
    averager = _grad_averager(model, world)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_ner = len(model.config.ner_labels)
    prog = None
    if progress and main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)
        prog.start()
    try:
        while epoch < cfg.epochs:
            bar = prog.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, completed=step,
                                info="") if prog else None
            model.train()
            # Each task's summed loss in the step, kept on the device: reading it per task batch (float(loss))
            # would make the host wait for the GPU 8 x grad_accum times a step, starving the queue; it is read
            # once per optimizer step below. float64 as the host sums were (MPS has none: float32 there).
            acc = torch.zeros(len(tasks), device=device,
                              dtype=torch.float32 if device.type == "mps" else torch.float64)   # (n_tasks,)
            slot = {t: k for k, t in enumerate(tasks)}
            while step < steps_per_epoch:
                in_step = plan.step_counts(step)     # examples of each task in this optimizer step, all processes
                jobs = [job for micro in range(cfg.grad_accum) for job in plan.micro(step, micro, rank)]
                for j, (t, start, count) in enumerate(jobs):
                    pos = stream_positions(len(tidx[t]), seed=cfg.seed, epoch=epoch, task=TASK_INDEX[t],
                                           start=start, count=count)
                    rows = train_ds[tidx[t][pos].tolist()]
                    batch = collate(rows, t, pad_id=pad_id, n_ner=n_ner, device=device, ner_loss=cfg.ner_loss)
                    with _autocast(device, bf16):
                        loss = task_loss(model, batch, cfg.ner_loss)
                    if averager is not None and j == len(jobs) - 1:
                        averager.arm()  # the step's last backward: reduce buckets as they complete
                    # the task's mean over its examples in the whole step: this batch's share is count / in_step
                    # (x world, because the all-reduce below averages over the processes)
                    (loss * (cfg.task_weights.get(t, 1.0) * count * world / in_step[t])).backward()
                    acc[slot[t]] += loss.detach().to(acc.dtype) * count
                if averager is not None:
                    averager.finish()       # every p.grad is now the average over the processes
                    # Loss bookkeeping over all processes, so every rank logs (and saves) the same numbers.
                    torch.distributed.all_reduce(acc)
                step_loss = acc.tolist()    # the step's one host sync
                acc.zero_()
                for k, t in enumerate(tasks):
                    sums[t][0] += step_loss[k]          # example-weighted: the epoch's mean over examples
                    sums[t][1] += in_step[t]
                torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                global_step += 1
                if prog:
                    cur = [sums[t][0] / sums[t][1] for t in tasks if sums[t][1]]
                    prog.update(bar, completed=step, info=f"mean loss {sum(cur) / max(1, len(cur)):.3f}  "
                                                          f"lr {optimizer.param_groups[0]['lr']:.2e}")
                if cfg.save_steps and global_step % cfg.save_steps == 0 and step < steps_per_epoch:
                    save_resume_point(epoch, step)
                if on_step is not None:
                    on_step(global_step)
            # ---- end of epoch: losses, checkpoint, resume point
            train_row = _loss_row(epoch + 1, "train", {t: sums[t][0] / sums[t][1] for t in tasks if sums[t][1]})
            history.append(train_row)
            if val_ds is not None and vidx:
                val = evaluate_losses(model, val_ds, vidx, tasks, batch_size=cfg.val_batch_size or cfg.batch_size,
                                      pad_id=pad_id, n_ner=n_ner, device=device, bf16=bf16, ner_loss=cfg.ner_loss,
                                      dist=state.dist)
                history.append(_loss_row(epoch + 1, "val", val))
            log(_describe(history[-2:] if val_ds is not None and vidx else history[-1:]))
            epoch += 1
            step = 0
            sums = {t: [0.0, 0] for t in tasks}
            if main:
                write_losses(out, history, tasks)
                model.save_pretrained(out / f"epoch-{epoch}", tokenizer=tokenizer)
            save_resume_point(epoch, 0)
            if main:
                atomic_write_json(run_file, {"config": fp, "finished": False, "history": history,
                                             "steps": global_step})
            if prog and bar is not None:
                prog.remove_task(bar)
    finally:
        if prog:
            prog.stop()
    final = out / "final"
    if main:
        _link_or_copy_dir(out / f"epoch-{cfg.epochs}", final)
        atomic_write_json(run_file, {"config": fp, "finished": True, "history": history, "steps": global_step})
        log(f"done: {global_step} optimizer steps; final checkpoint {final}; losses in {out / 'losses.csv'}")
    state.wait_for_everyone()
    return TrainResult(out, final, history, True, global_step)


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

    dist (rsg_eval.training.dist.Dist): several processes split the batches round-robin and sum their totals in one
    collective, so each evaluates 1/world of the split; the batches, hence the figures, are those of one process."""
    from rsg_eval.training.dist import Dist, all_sum_floats, shard

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
        total = torch.zeros((), device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
        n = 0
        for i in shard(len(rows_idx), d, batch_size):
            chunk = rows_idx[i:i + batch_size].tolist()
            batch = collate(ds[chunk], t, pad_id=pad_id, n_ner=n_ner, device=device, ner_loss=ner_loss)
            with _autocast(device, bf16):
                loss = task_loss(model, batch, ner_loss)
            total += loss.to(total.dtype) * len(chunk)
            n += len(chunk)
        names.append(t)
        sums += [total.item(), float(n)]
    sums = all_sum_floats(sums, d)
    model.train(was)
    return {t: sums[2 * k] / sums[2 * k + 1] for k, t in enumerate(names)}
