"""The fine-tuning loop for one task: AdamW, warm-up + decay, accumulation, clipping, bf16 autocast on GPU,
val evaluation with best-state tracking, early stopping, exact resume, data parallelism (DDP or FSDP).

The loop is this recipe's own; what it shares with train-hmtl comes from rsg_eval.engine: the optimizer factory,
`finish_step` (clip, one host read, non-finite guard, step, schedule), the stop on SIGINT/SIGTERM, checkpoints,
RNG capture and the DDP/FSDP wrapping.

Loss normalisation: every optimizer step minimises the mean token NLL over all target tokens of that step (all
micro-batches, all ranks). Each rank knows the global token count because the batch plan is deterministic, so
   loss_micro = sum_tokens(nll) / tokens_in_step * world
gives, after DDP averages gradients over ranks, exactly the gradient of a single process that saw the whole
global batch. That is what makes a two-process run match a one-process run with twice the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from rsg_eval.engine import checkpoint as ck
from rsg_eval.engine import collective, rng, sharding
from rsg_eval.engine.optim import make_optimizer, param_groups
from rsg_eval.engine.runtime import Dist
from rsg_eval.engine.step import StepGuard, finish_step
from rsg_eval.engine.stop import StopRequest
from rsg_eval.core.errors import RSGError
from rsg_eval.models.kernels import fused_t5
from rsg_eval.training.finetune.config import FinetuneConfig
from rsg_eval.engine.tracking import Throughput, step_scalars
from rsg_eval.training.finetune.causal import causal_nll_sum, collate_causal
from rsg_eval.training.finetune.data import Pair, collate, epoch_plan, rank_slice

# Settings that may change between a run and its resume without breaking exactness of what was done so far.
RESUME_MAY_CHANGE = ("lr", "max_grad_norm", "early_stopping", "eval_batch_size", "normalize", "save_every")


class NoTrainingData(RSGError):
    """The task has nothing to train on (empty train split, or no item with a gold label)."""


@dataclass
class TrainState:
    """Everything besides tensors needed to continue a task exactly where it stopped (JSON-able)."""

    epoch: int = 0                    # epoch in progress (0-based)
    micro: int = 0                    # global micro-batches of this epoch already consumed (a step boundary)
    step: int = 0                     # optimizer steps done
    loss_sum: float = 0.0             # summed token NLL since the last evaluation
    loss_tokens: float = 0.0
    best_score: float | None = None
    best_step: int = -1
    best_epoch: float = 0.0
    best_metrics: dict[str, float] = field(default_factory=dict)
    evals_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    stopped: str = ""                 # "", "early_stopping", "max_steps"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        return cls(**{k: d[k] for k in (f.name for f in dataclasses.fields(cls)) if k in d})


@dataclass
class Hooks:
    """Callbacks for progress display and tests. `on_step(state, loss)` runs after every optimizer step and
    after that step's checkpoint, so raising in it simulates a kill at a step boundary."""

    on_step: Callable[[TrainState, float], None] | None = None
    on_eval: Callable[[TrainState, dict[str, Any]], None] | None = None
    on_start: Callable[[TrainState, int, int], None] | None = None   # (state, total_steps, steps_per_epoch)
    # (step, {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"}) after every applied step: what
    # --report-to logs (rsg_eval.engine.tracking.step_scalars); no extra device read, the step already made one
    on_metrics: Callable[[int, dict[str, float]], None] | None = None


@dataclass
class TrainResult:
    state: TrainState
    best_dir: Path | None             # best/ checkpoint folder (None when no evaluation ran)
    resumed_from: int | None          # the step a resume started from, None for a fresh start


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for the update with 0-based index `step`.

    Warm-up: (step + 1) / warmup, so the first update is not wasted at lr 0. Then from 1 at step `warmup`
    down to 1 / (total - warmup) at the last step (linear), or the cosine of the same progress; never 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)  # 0 at the first decayed step
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if progress < 1 else 0.0


def plan_sizes(n_pairs: int, cfg: FinetuneConfig, world: int) -> tuple[int, int, int]:
    """(micro-batches per epoch, optimizer steps per epoch, total optimizer steps)."""
    micro = math.ceil(n_pairs / (cfg.batch_size * world))
    per_epoch = math.ceil(micro / cfg.grad_accum)
    total = per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    return micro, per_epoch, total


seed_everything = rng.seed_everything


def _set_dropout(model: torch.nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def _trajectory_config(cfg: FinetuneConfig) -> dict[str, Any]:
    d = cfg.record()
    for k in RESUME_MAY_CHANGE:
        d.pop(k, None)
    return d


@dataclass
class _Run:
    """What the loop reads, built once by `_setup`: the model (bare and wrapped), optimizer and schedule, the
    step counts, the trainer state (fresh or resumed) and the call's arguments the loop's helpers need."""
    task: str
    pairs: Sequence[Pair]
    net: torch.nn.Module               # the bare model
    wrapped: torch.nn.Module           # DDP wrapper, or net itself (sharded in place under fsdp, or one process)
    opt: torch.optim.Optimizer
    sched: Any
    dist: Dist
    device: torch.device
    ckpt_dir: Path
    fp: dict[str, Any]                 # what a resume must match
    state: TrainState
    best_dir: Path | None
    resumed: int | None                # the step a resume started from
    total: int                         # optimizer steps in all
    per_epoch: int                     # optimizer steps per epoch
    pad_id: int
    make_batch: Callable[..., dict[str, torch.Tensor]]
    run_micro: Callable[..., torch.Tensor]
    autocast: Callable[[], Any]
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    hooks: Hooks
    files: Callable[[Path], None] | None


def train(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[Pair],
    cfg: FinetuneConfig,
    *,
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    ckpt_dir: Path,
    fingerprint: dict[str, Any],
    device: torch.device,
    dist: Dist = Dist(),
    bf16: bool = False,
    hooks: Hooks | None = None,
    task: str = "task",
    fused_kernels: bool = True,
    sharding_mode: str = "none",
    cpu_offload: bool = False,
    files: Callable[[Path], None] | None = None,
) -> TrainResult:
    """Train `model` (a seq2seq LM, already on `device`, fp32 master weights) on `pairs`.

    `evaluate(model)` runs on every rank with the bare model in eval mode and returns the val metrics with a
    "score" key (higher is better); under fsdp every rank must score the same items (sharding.gathered).
    Checkpoints go to ckpt_dir/{last,best}; a `last` with the same fingerprint is resumed, a finished one is
    returned as is. `sharding_mode`: none | ddp | fsdp (sharding.resolve_mode), `cpu_offload` for fsdp; `files(dir)`
    adds the config and tokenizer to `best/` so `--model` loads it. `fused_kernels`: train with torch's fused GELU
    and RMS norm in place of transformers' (rsg_eval.models.kernels; restored on return); off only to measure.
    The model is wrapped (DDP, or sharded in place under fsdp) for the duration of the call."""
    run = _setup(model, tokenizer, pairs, cfg, evaluate=evaluate, ckpt_dir=ckpt_dir, fingerprint=fingerprint,
                 device=device, dist=dist, bf16=bf16, hooks=hooks or Hooks(), task=task,
                 sharding_mode=sharding_mode, cpu_offload=cpu_offload, files=files)
    if isinstance(run, TrainResult):   # the task finished in an earlier run
        return run
    return _loop(run, cfg, fused_kernels)


def _setup(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[Pair], cfg: FinetuneConfig, *,
           evaluate: Callable[[torch.nn.Module], dict[str, float]], ckpt_dir: Path, fingerprint: dict[str, Any],
           device: torch.device, dist: Dist, bf16: bool, hooks: Hooks, task: str, sharding_mode: str,
           cpu_offload: bool, files: Callable[[Path], None] | None) -> _Run | TrainResult:
    """Seed, dropout, checkpointing, the step counts, the resume point (its weights before sharding, its optimizer
    and schedule after), the wrapper, the optimizer and the schedule; a TrainResult when `last` is finished."""
    if not pairs:
        raise NoTrainingData(f"{task}: no training examples (the train split is empty or has no gold labels)",
                             field="train")
    net = model
    seed_everything(cfg.seed)
    if cfg.dropout is not None:
        _set_dropout(net, cfg.dropout)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing works with DDP, FSDP and frozen inputs; the KV cache is useless in training
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.config.use_cache = False
    _, per_epoch, total = plan_sizes(len(pairs), cfg, dist.world)
    warm = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    fp = dict(fingerprint, n_pairs=len(pairs), world=dist.world, config=_trajectory_config(cfg))

    last, state = _resume_point(ckpt_dir, fp, task)
    best_dir = ck.find(ckpt_dir, "best")
    if state.done:
        return TrainResult(state, best_dir, state.step)
    if last is not None:
        ck.load_weights(net, last / ck.WEIGHTS)   # full weights, before any sharding
    wrapped = sharding.wrap(net, sharding_mode, device=device, cpu_offload=cpu_offload, bf16=bf16)
    opt = make_optimizer(param_groups(net, cfg.weight_decay), name=cfg.optimizer, lr=cfg.lr,
                         betas=tuple(cfg.adam_betas),
                         eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.schedule))
    resumed = _resume_optimizer(last, wrapped, opt, sched, cfg, dist) if last is not None else None

    # decoder-only models: prompt + answer in one sequence, the loss on the answer tokens (finetune/causal.py)
    causal = not getattr(net.config, "is_encoder_decoder", False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and device.type == "cuda" \
        else contextlib.nullcontext
    return _Run(task=task, pairs=pairs, net=net, wrapped=wrapped, opt=opt, sched=sched, dist=dist, device=device,
                ckpt_dir=ckpt_dir, fp=fp, state=state, best_dir=best_dir, resumed=resumed, total=total,
                per_epoch=per_epoch, pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
                make_batch=collate_causal if causal else collate,
                run_micro=forward_backward_causal if causal else forward_backward, autocast=autocast,
                evaluate=evaluate, hooks=hooks, files=files)


# The recipe's one explicit loop (epochs, optimizer steps, the non-finite guard, evaluation, saves, the clean stop),
# read top to bottom; setup and evaluation are helpers, what it shares with train-hmtl an engine call.
def _loop(r: _Run, cfg: FinetuneConfig, fused_kernels: bool) -> TrainResult:
    state, dist, pairs, hooks = r.state, r.dist, r.pairs, r.hooks
    if hooks.on_start:
        hooks.on_start(state, r.total, r.per_epoch)
    meter = Throughput()
    lengths = [p.length for p in pairs]
    guard = StepGuard(tolerance=0)   # one non-finite step stops the task (its learning rate is too high)
    r.net.train()
    with StopRequest() as stop, fused_t5(r.net, enabled=fused_kernels):
        while state.epoch < cfg.epochs and not state.done:
            plan = epoch_plan(lengths, cfg.batch_size, cfg.seed, state.epoch,
                              group_by_length=cfg.group_by_length, world=dist.world)
            while state.micro < len(plan):
                snapshot = rng.snapshot()  # the RNG at this step boundary, saved with any checkpoint of it
                group = plan[state.micro : state.micro + cfg.grad_accum]
                tokens = sum(len(pairs[i].tgt) for gb in group for i in gb)  # global target tokens of this step
                local_nll = _forward_backward_step(r, group, tokens)
                lr_now = float(r.opt.param_groups[0]["lr"])  # this step's rate (the schedule moves it after)
                out = finish_step(r.wrapped.parameters(), r.opt, r.sched, local_nll, dist,
                                  max_norm=cfg.max_grad_norm, guard=guard)
                step_nll, norm_value = out.loss, out.grad_norm
                step_loss = step_nll / tokens
                if guard.exceeded:
                    _save_last(r, snapshot)  # parameters are still those after the last good step
                    what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                    raise RSGError(
                        f"{r.task}: the training {what} became {step_loss if what == 'loss' else norm_value} at "
                        f"epoch {state.epoch + 1}, optimizer step {state.step + 1}; training stopped. The last good "
                        f"state (after step {state.step}) is saved in {r.ckpt_dir / 'last'}. Lower --lr, raise the "
                        f"warm-up, keep bf16 rather than fp16, then rerun the same command to resume from it",
                        field="train_loss")
                state.step += 1
                if hooks.on_metrics:
                    seen = sum(pairs[i].length for gb in group for i in gb)  # input + target tokens, all ranks
                    hooks.on_metrics(state.step, step_scalars(loss=step_loss, lr=lr_now, grad_norm=norm_value,
                                                              tokens_per_s=meter.tick(seen)))
                state.micro += len(group)
                state.loss_sum += step_nll
                state.loss_tokens += tokens
                end_of_epoch = state.micro >= len(plan)
                evaluated = _evaluate_if_due(r, cfg, len(plan), end_of_epoch)
                saved = evaluated or state.done or bool(cfg.save_every and state.step % cfg.save_every == 0)
                if saved:
                    _save_last(r, rng.snapshot())
                if hooks.on_step:
                    hooks.on_step(state, step_loss)
                # Ctrl-C / SIGTERM: every rank agrees and stops at this same step boundary
                if stop.agreed(dist):
                    if not saved and not state.done:
                        _save_last(r, rng.snapshot())
                    raise stop.stopped(f"{r.task}: stopped at step {state.step}; its state is saved in "
                                       f"{r.ckpt_dir / 'last'}")
                if state.done or end_of_epoch:
                    break  # a new epoch needs its own plan (the outer loop builds it)
        if not state.done:  # epochs ran out without a final evaluation (cannot happen, kept as a guard)
            state.done = True
            _save_last(r, rng.snapshot())
        return TrainResult(state, r.best_dir, r.resumed)


def _forward_backward_step(r: _Run, group: Sequence[Sequence[int]], tokens: int) -> torch.Tensor:
    """Forward and backward of this rank's share of the step's micro-batches (`group`: global micro-batches of
    pair indices), each scaled to the step's mean token NLL over `tokens` target tokens, all ranks. Returns this
    rank's summed NLL as a 0-d float64 tensor on the device (no host sync)."""
    dist = r.dist
    local_nll = torch.zeros((), dtype=torch.float64, device=r.device)  # stays on the device: no sync
    for j, gb in enumerate(group):
        mine, weight = rank_slice(gb, dist.rank, dist.world)
        batch = to_device(r.make_batch([r.pairs[i] for i in mine], r.pad_id), r.device)
        # every micro-batch runs every block, so gradients may stay local until the step's last one
        with sharding.grad_sync(r.wrapped, sync=j == len(group) - 1):
            nll = r.run_micro(r.wrapped, r.net, batch, weight * dist.world / tokens, r.autocast)
        local_nll += nll * weight
    return local_nll


def _evaluate_if_due(r: _Run, cfg: FinetuneConfig, plan_len: int, end_of_epoch: bool) -> bool:
    """After an optimizer step: move to the next epoch at its end, evaluate when due (every --eval-every steps, else
    at each epoch's end; always at the step cap and after the last epoch) and mark the task done (early stopping,
    step cap, last epoch). True when it evaluated."""
    state = r.state
    at_cap = bool(cfg.max_steps) and state.step >= cfg.max_steps
    due = (cfg.eval_every and state.step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch) or \
        at_cap or (end_of_epoch and state.epoch + 1 >= cfg.epochs)
    if not due:
        if end_of_epoch:
            state.epoch += 1
            state.micro = 0
        return False
    if end_of_epoch:
        state.epoch += 1
        state.micro = 0
        mark = float(state.epoch)
    else:
        mark = round(state.epoch + state.micro / plan_len, 3)
    _run_eval(r, mark)
    if cfg.early_stopping and state.evals_since_best >= cfg.early_stopping:
        state.done, state.stopped = True, "early_stopping"
    if at_cap:
        state.done, state.stopped = True, state.stopped or "max_steps"
    if state.epoch >= cfg.epochs:
        state.done = True
    return True


def _run_eval(r: _Run, epoch_mark: float) -> None:
    """Evaluate (bare model, eval mode), add the history row, keep `best` when the score improved."""
    state = r.state
    r.net.eval()
    with torch.no_grad(), r.autocast(), sharding.gathered(r.wrapped) as bare:
        metrics = r.evaluate(bare)
    r.net.train()
    train_loss = state.loss_sum / state.loss_tokens if state.loss_tokens else float("nan")
    row = {"task": r.task, "epoch": epoch_mark, "step": state.step, "train_loss": train_loss, **metrics}
    state.history.append(row)
    state.loss_sum = state.loss_tokens = 0.0
    score = float(metrics["score"])
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step, state.best_epoch = score, state.step, epoch_mark
        state.best_metrics = dict(metrics)
        state.evals_since_best = 0
        r.best_dir = _save(r.dist, r.ckpt_dir, "best", r.wrapped,
                           {"task": r.task, "step": state.step, "epoch": epoch_mark, "metrics": metrics,
                            "fingerprint": r.fp}, None, r.files)
    else:
        state.evals_since_best += 1
    if r.hooks.on_eval:
        r.hooks.on_eval(state, row)


def _save_last(r: _Run, rng_snapshot: dict[str, Any]) -> None:
    """ckpt_dir/last: weights, trainer state, every rank's generators (`rng_snapshot` on this one), optimizer and
    schedule."""
    meta = {"task": r.task, "state": r.state.to_json(), "fingerprint": r.fp,
            "rng": r.dist.gather(rng.to_json(rng_snapshot)), "saved_at": time.time()}
    extra = {"optimizer": sharding.full_optimizer_state(r.wrapped, r.opt), "scheduler": r.sched.state_dict()}
    _save(r.dist, r.ckpt_dir, "last", r.wrapped, meta, extra)


def forward_backward(ddp: torch.nn.Module, net: torch.nn.Module, batch: dict[str, torch.Tensor], scale: float,
                     autocast: Callable[[], Any] = contextlib.nullcontext) -> torch.Tensor:
    """One micro-batch: forward (under `autocast`), summed token NLL, backward of NLL * scale.

    batch: input_ids/attention_mask (B, S), labels (B, T) with -100 at padding. Returns the summed NLL as a
    detached 0-d fp32 tensor on the device (no host sync here; the loop reads it once per optimizer step).
    `ddp` is what runs the forward (the DDP wrapper or the model itself); `net` is the bare model."""
    with autocast():
        dec_in = net.prepare_decoder_input_ids_from_labels(labels=batch["labels"])  # (B, T), starts with pad
        out = ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec_in,
                  use_cache=False)
    # (B, T, V): the NLL in fp32 at least, even under bf16 autocast (a float64 model keeps float64)
    logits = out.logits if out.logits.dtype == torch.float64 else out.logits.float()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1), ignore_index=-100,
                          reduction="sum")
    (nll * scale).backward()
    return nll.detach()


def forward_backward_causal(ddp: torch.nn.Module, net: torch.nn.Module, batch: dict[str, torch.Tensor],
                            scale: float, autocast: Callable[[], Any] = contextlib.nullcontext) -> torch.Tensor:
    """forward_backward for a decoder-only model: batch from collate_causal (prompt masked with -100), the summed
    NLL of the answer tokens (finetune/causal.py), backward of NLL * scale; detached, no host sync."""
    with autocast():
        nll = causal_nll_sum(ddp, batch)
    (nll * scale).backward()
    return nll.detach()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Host tensors to the device; on CUDA through pinned memory without blocking, so the copy overlaps the
    queue of kernels still running from the previous micro-batch."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def _save(dist: Dist, root: Path, name: str, wrapped: torch.nn.Module, meta: dict, extra: dict | None,
          files: Callable[[Path], None] | None = None) -> Path:
    """Rank 0 writes (the full weights: gathered from the shards under fsdp, every rank taking part); the others
    learn whether it worked, so every rank raises the same error or none."""
    bare = sharding.unwrap(wrapped)
    state = sharding.full_model_state(wrapped) if sharding.is_fsdp(bare) else None
    # a model with frozen weights (LoRA) saves what trains only; the frozen base is rebuilt from --model on resume
    collective.main_acts(dist, lambda: ck.write_checkpoint(root, name, bare, meta, extra, state=state,
                                                           files=files, trainable_only=True), share=False)
    return root / name


def _resume_point(ckpt_dir: Path, fp: dict, task: str) -> tuple[Path | None, TrainState]:
    """(the `last` folder to resume, its trainer state); (None, a fresh state) when there is none. A `last` made
    with other settings is refused, naming the first that differs."""
    last = ck.find(ckpt_dir, "last")
    if last is None:
        return None, TrainState()
    meta = ck.read_meta(last)
    old = meta.get("fingerprint", {})
    diff = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
    if diff:
        k = diff[0]
        detail = ""
        if k == "config":
            ck_keys = [c for c in sorted(set(old.get("config", {})) | set(fp["config"]))
                       if old.get("config", {}).get(c) != fp["config"].get(c)]
            detail = f" (setting {ck_keys[0]!r}: {old.get('config', {}).get(ck_keys[0])!r} -> " \
                     f"{fp['config'].get(ck_keys[0])!r})" if ck_keys else ""
        raise RSGError(
            f"{task}: the checkpoint in {last} was made with a different {k}{detail}; rerun with the same "
            f"settings to resume it, or pass --restart to discard unfinished checkpoints",
            file=last / "meta.json", field=k)
    return last, TrainState.from_json(meta["state"])


def _resume_optimizer(last: Path, wrapped: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
                      cfg: FinetuneConfig, dist: Dist) -> int:
    """Optimizer, schedule and this rank's RNG from `last`; returns the step it resumes from."""
    meta = ck.read_meta(last)
    state = TrainState.from_json(meta["state"])
    tr = ck.load_training(last)
    sharding.load_optimizer_state(wrapped, opt, tr["optimizer"])
    sched.load_state_dict(tr["scheduler"])
    # lr may change on resume (e.g. after a NaN): rescale the schedule's base, keep its position
    sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
    for g, f in zip(opt.param_groups, [sched.lr_lambdas[0](sched.last_epoch)] * len(opt.param_groups)):
        g["lr"] = cfg.lr * f
        g["initial_lr"] = cfg.lr
    mine = rng.pick(meta.get("rng") or [], dist.rank)
    if mine is not None:
        rng.restore(mine)
    return state.step
