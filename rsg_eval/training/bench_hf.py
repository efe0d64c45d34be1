"""`rsg bench finetune --against hf-trainer`: our training loop against transformers' Seq2SeqTrainer, in one run.

What a user would pick instead of `rsg finetune` is the Seq2SeqTrainer with `group_by_length=True` (length-grouped
batches; without it the Trainer pads far more and is much slower). Both sides get:

- the same token pairs (a task's train split rendered through its default template, as `rsg finetune` builds
  them; or TERRa-shaped synthetic pairs when the data is not there, said in the report);
- the same model init (a fresh random model from the same seed for every run);
- the same optimizer and schedule: our AdamW (fused where torch has it, as the Trainer's default
  `adamw_torch_fused`) and our warm-up + linear decay, handed to the Trainer through `optimizers=`;
- batch size, gradient clipping 1.0, one epoch; no evaluation, no checkpoint inside the timed span.

Runs:
  ours          `loop.train` itself (its checkpoints and evaluation hook fall outside the timed span);
  hf-grouped    the Trainer with its own LengthGroupedSampler: the speed figure;
  hf-same       the Trainer fed our exact batches for the first `check_steps` steps: per-step losses must agree
                with ours to float rounding, which shows both optimise the same thing the same way;
  ours-plain    (breakdown only) our loop with transformers' own GELU/RMS-norm modules, to split the gain into
                the fused kernels and the rest of the loop.

The timed span runs from the first step's start to the last step's end, each end after `torch.cuda.synchronize()`
on a GPU (rsg_eval.bench.timing). CPU time of the process is reported too: on a machine shared with other jobs it is
the fairer measure.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rsg_eval.bench.timing import sync
from rsg_eval.training.config import FinetuneConfig
from rsg_eval.training.data import Pair, build_pairs, epoch_plan


@dataclass
class PeerRun:
    name: str
    steps: int
    examples: int
    seconds: float                  # wall clock of the timed span
    cpu_seconds: float              # process CPU time of the same span
    losses: list[float]             # mean token NLL of each optimizer step
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step (ours, hf-same)
    peak_mb: float = 0.0

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds


# --------------------------------------------------------------------------------------------- the pairs

def task_pairs(tokenizer: Any, data: Any, task: str = "TERRa", cfg: FinetuneConfig | None = None) -> list[Pair] | None:
    """The task's train pairs exactly as `rsg finetune` builds them (default template, default lengths); None
    when the data source has no train split of the task."""
    from rsg_eval.data import resolve_data
    from rsg_eval.prompts import load_template
    from rsg_eval.tasks import get_task, load_items

    cfg = cfg or FinetuneConfig()
    task = get_task(task).name
    try:
        source = resolve_data(data)
    except Exception:  # noqa: BLE001 - no cache folder yet: the caller falls back to synthetic pairs
        return None
    if not source.has(task, "train"):
        return None
    tpl = load_template(task)
    items = load_items(source, task, "train")
    max_src = cfg.max_source_len
    return build_pairs(items, lambda it: tpl.render(it, tokenizer=tokenizer, max_tokens=max_src), tokenizer,
                       max_src, cfg.max_target_len)


def terra_shaped_pairs(n: int, vocab: int, seed: int = 0) -> list[Pair]:
    """`n` random-token pairs with TERRa's shape under the tiny tokenizer: sources 40-512 tokens (median ~175,
    a long right tail, as the real split), targets of 3-4 tokens ("Да"/"Нет" + </s>)."""
    rng = np.random.default_rng(seed)
    src = np.clip(rng.lognormal(np.log(175), 0.45, size=n), 40, 512).astype(int)
    out = []
    for s in src:
        t = int(rng.integers(3, 5))
        out.append(Pair(tuple(int(x) for x in rng.integers(5, vocab, size=int(s))),
                        tuple(int(x) for x in rng.integers(5, vocab, size=t - 1)) + (2,)))
    return out


# --------------------------------------------------------------------------------------------- runs

class _Span:
    """Wall and CPU time between `start()` and `stop()`, each taken after a device sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = self.c0 = self.t1 = self.c1 = 0.0
        self.marks: list[float] = []

    def start(self) -> None:
        sync(self.device)
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        self.marks = [self.t0]

    def mark(self) -> None:
        self.marks.append(time.perf_counter())

    def stop(self) -> None:
        sync(self.device)
        self.t1, self.c1 = time.perf_counter(), time.process_time()

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    @property
    def cpu(self) -> float:
        return self.c1 - self.c0


def run_ours(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[Pair], cfg: FinetuneConfig,
             device: torch.device, *, bf16: bool = False, fused_kernels: bool = True,
             name: str = "ours") -> PeerRun:
    """One epoch of `loop.train` on `pairs`; timed from its first step to the end of its last one."""
    from rsg_eval.training.bench import _RssPeak, _trim
    from rsg_eval.training.loop import Hooks, train

    span = _Span(device)
    losses: list[float] = []
    step_ends: list[float] = []

    def on_start(state: Any, total: int, per_epoch: int) -> None:
        span.start()

    def on_step(state: Any, loss: float) -> None:
        losses.append(loss)
        step_ends.append(time.perf_counter())

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        span.stop()  # the last optimizer step is done; evaluation and checkpoints are outside the span
        return {"score": 0.0}

    _trim()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="rsg-bench-") as tmp, _RssPeak() as mem:
        model.train()
        res = train(model, tokenizer, list(pairs), cfg, evaluate=evaluate, ckpt_dir=Path(tmp),
                    fingerprint={"bench": name}, device=device, bf16=bf16, hooks=Hooks(on_step, None, on_start),
                    fused_kernels=fused_kernels, task="bench")
    # step_ends[-1] comes after the final evaluation and checkpoint: the last step's own time is unknown there
    steps = [b - a for a, b in zip([span.t0] + step_ends[:-2], step_ends[:-1])]
    examples = sum(len(b) for b in epoch_plan([p.length for p in pairs], cfg.batch_size, cfg.seed, 0,
                                              group_by_length=cfg.group_by_length)[: res.state.step])
    return PeerRun(name, res.state.step, examples, span.seconds, span.cpu, losses, steps, _peak(device, mem))


def run_hf(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[Pair], cfg: FinetuneConfig,
           device: torch.device, *, bf16: bool = False, batches: list[list[int]] | None = None,
           max_steps: int = 0, name: str = "hf-grouped") -> PeerRun:
    """transformers' Seq2SeqTrainer on `pairs`: its own length-grouped sampler, or exactly `batches` (a list of
    index lists, e.g. our epoch plan) when given; our optimizer and schedule through `optimizers=`."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from rsg_eval.training.bench import _RssPeak, _trim
    from rsg_eval.training.loop import _param_groups, lr_factor, make_adamw, plan_sizes

    data = [{"input_ids": list(p.src), "attention_mask": [1] * len(p.src), "labels": list(p.tgt)} for p in pairs]
    _, per_epoch, total = plan_sizes(len(pairs), cfg, 1)
    warm = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    span = _Span(device)
    losses: list[torch.Tensor] = []
    n_steps = min(max_steps, per_epoch) if max_steps else per_epoch

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            span.start()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            span.mark()
            if state.global_step >= n_steps:
                span.stop()

    class Trainer(Seq2SeqTrainer):
        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(*args, **kwargs)
            losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())  # no host sync
            return loss

        def get_train_dataloader(self) -> Any:
            if batches is None:
                return super().get_train_dataloader()
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=batches,
                                                       collate_fn=self.data_collator,
                                                       pin_memory=device.type == "cuda"))

    with tempfile.TemporaryDirectory(prefix="rsg-bench-hf-") as tmp:
        args = Seq2SeqTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
            max_steps=n_steps if max_steps else -1, learning_rate=cfg.lr, max_grad_norm=cfg.max_grad_norm,
            group_by_length=batches is None, save_strategy="no", eval_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed, use_cpu=device.type == "cpu",
            bf16=bf16, gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None)
        model.to(device).train()
        opt = make_adamw(_param_groups(model, cfg.weight_decay), cfg, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.schedule))
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          processing_class=tokenizer, optimizers=(opt, sched), callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict would clutter the report
        _trim()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with _RssPeak() as mem:
            trainer.train()
    if not span.t1:
        span.stop()
    steps = [b - a for a, b in zip(span.marks, span.marks[1:])]
    order = batches[:n_steps] if batches is not None else None
    examples = sum(len(b) for b in order) if order is not None else min(len(pairs), n_steps * cfg.batch_size)
    values = torch.stack(losses).tolist() if losses else []
    return PeerRun(name, n_steps, examples, span.seconds, span.cpu, values[:n_steps], steps, _peak(device, mem))


def _peak(device: torch.device, mem: Any) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (mem.peak - mem.base) / 2**20


# --------------------------------------------------------------------------------------------- the report

def windows(losses: Sequence[float], n: int = 10) -> list[float]:
    """Mean loss over `n` equal stretches of an epoch (the trajectory at a scale where batch order washes out)."""
    parts = np.array_split(np.asarray(losses, dtype=float), min(n, len(losses)) or 1)
    return [float(p.mean()) for p in parts if len(p)]


def compare(model_factory: Callable[[], tuple[torch.nn.Module, Any]], pairs: Sequence[Pair],
            cfg: FinetuneConfig, device: torch.device, *, check_steps: int = 40, breakdown: bool = False,
            bf16: bool = False, rounds: int = 1, on_run: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """All runs on fresh models from `model_factory()` ((model, tokenizer), same seed every call); a JSON-able
    report with the speed ratios and the loss comparisons. The timed runs take turns `rounds` times; each keeps
    its fastest wall time and, separately, its lowest CPU time (load from other jobs only ever adds)."""
    def fresh() -> tuple[torch.nn.Module, Any]:
        m, tok = model_factory()
        return m.to(device).train(), tok

    runs: dict[str, PeerRun] = {}
    plan = epoch_plan([p.length for p in pairs], cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length)
    # one-time costs of the process (thread pools, allocator, first kernels) go to two untimed steps of each
    warm = FinetuneConfig(**{**cfg.to_dict(), "adam_betas": tuple(cfg.adam_betas), "max_steps": 2})
    if on_run:
        on_run("warm-up")
    m, tok = fresh()
    run_ours(m, tok, pairs, warm, device, bf16=bf16)
    m, tok = fresh()
    run_hf(m, tok, pairs, cfg, device, bf16=bf16, max_steps=2)
    timed = ["ours", "hf-grouped"] + (["ours-plain"] if breakdown else [])
    todo = [n for _ in range(max(1, rounds)) for n in timed] + (["hf-same"] if check_steps else [])
    for name in todo:
        if on_run:
            on_run(name)
        m, tok = fresh()
        if name == "ours":
            run = run_ours(m, tok, pairs, cfg, device, bf16=bf16)
        elif name == "ours-plain":
            run = run_ours(m, tok, pairs, cfg, device, bf16=bf16, fused_kernels=False, name=name)
        elif name == "hf-grouped":
            run = run_hf(m, tok, pairs, cfg, device, bf16=bf16)
        else:
            run = run_hf(m, tok, pairs, cfg, device, bf16=bf16, batches=plan, max_steps=check_steps, name=name)
        del m
        prev = runs.get(name)
        if prev is not None:
            cpu = min(prev.cpu_seconds, run.cpu_seconds)
            run = run if run.seconds < prev.seconds else prev
            run.cpu_seconds = cpu
        runs[name] = run
    ours, hf = runs["ours"], runs["hf-grouped"]
    report: dict[str, Any] = {
        "runs": {k: asdict(v) for k, v in runs.items()},
        "rounds": max(1, rounds),
        "speedup_wall": hf.seconds / ours.seconds,
        "speedup_cpu": hf.cpu_seconds / ours.cpu_seconds,
        "loss_windows": {"ours": windows(ours.losses), "hf-grouped": windows(hf.losses)},
    }
    a, b = report["loss_windows"]["ours"], report["loss_windows"]["hf-grouped"]
    report["loss_windows_max_rel_diff"] = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    if "hf-same" in runs:
        same = runs["hf-same"]
        k = min(len(same.losses), len(ours.losses))
        report["same_batches_steps"] = k
        report["same_batches_max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(ours.losses[:k], same.losses[:k]))
        # identical batches: the ratio of the summed step times (our last timed step excluded, see run_ours)
        j = min(k, len(ours.step_seconds), len(same.step_seconds))
        if j:
            report["same_batches_speedup_wall"] = sum(same.step_seconds[:j]) / sum(ours.step_seconds[:j])
    if "ours-plain" in runs:
        plain = runs["ours-plain"]
        report["fused_kernels_speedup_wall"] = plain.seconds / ours.seconds
        report["fused_kernels_speedup_cpu"] = plain.cpu_seconds / ours.cpu_seconds
        report["loop_vs_hf_without_fused_kernels_cpu"] = hf.cpu_seconds / plain.cpu_seconds
    return report
