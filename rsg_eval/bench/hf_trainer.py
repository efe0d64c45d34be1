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

The runs share one process and take turns every few optimizer steps (`Turns`): on a machine shared with other
jobs, runs one after the other saw load differ four-fold between them, while turns of a few seconds let the load
fall on all runs alike. Each run's clock runs only while it holds the turn, from the first step's start to the last
step's end, each stretch ending after `torch.cuda.synchronize()` on a GPU (rsg_eval.bench.timing); the CPU time of
the running thread is reported beside it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from rsg_eval.bench.step_profile import profile_steps  # noqa: F401 (re-exported: commands/bench_finetune)
from rsg_eval.bench.timing import sync
from rsg_eval.training.finetune.config import FinetuneConfig
from rsg_eval.training.finetune.data import Pair, build_pairs, epoch_plan


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
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.tasks import get_task
    from rsg_eval.core.data import load_items

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
    max_src = cfg.max_source_length
    return build_pairs(items, lambda it: tpl.render(it, tokenizer=tokenizer, max_tokens=max_src), tokenizer,
                       max_src, cfg.max_target_length)


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


class Turns:
    """Several training runs taking turns every `every` optimizer steps: one runs, the others wait. Load from
    other jobs on a shared machine then falls on every run alike (the same reason the other benchmarks interleave
    their repeats), where runs one after the other saw load differ four-fold.

    The runs are threads of this process, or with `ctx` (a multiprocessing context) separate processes, as users
    run them: each with its own memory and allocator state. A runner calls `enter(name)` before its first step,
    `step(name)` after each optimizer step and `finish(name)` after its last; only the time between them while it
    holds the turn is counted (wall, and the runner thread's CPU time: with one torch thread the ops run on it),
    each end after a device sync. `report(name)` gives the runner's figures (in the runner's process). Runners are
    started one at a time and each waits at `enter` before the next starts, so no setup runs beside a timed
    stretch."""

    def __init__(self, names: Sequence[str], every: int, device: torch.device, ctx: Any = None) -> None:
        import threading

        self.order = list(names)
        self.every = max(1, every)
        self.device = device
        event = ctx.Event if ctx is not None else threading.Event
        self._go = {n: event() for n in self.order}
        self._ready = {n: event() for n in self.order}
        self._all_done = event()
        self._lock = ctx.Lock() if ctx is not None else threading.Lock()
        self._done = ctx.Array("b", len(self.order)) if ctx is not None else [0] * len(self.order)
        self.wall = dict.fromkeys(self.order, 0.0)
        self.cpu = dict.fromkeys(self.order, 0.0)
        self.step_seconds: dict[str, list[float]] = {n: [] for n in self.order}
        self._t: dict[str, float] = {}
        self._c: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def is_done(self, name: str) -> bool:
        return bool(self._done[self.order.index(name)])

    def _mark_done(self, name: str) -> bool:
        """Mark `name` finished; True when it was the last."""
        self._done[self.order.index(name)] = 1
        return all(self._done[i] for i in range(len(self.order)))

    def _start(self, name: str) -> None:
        sync(self.device)
        self._t[name] = self._last[name] = time.perf_counter()
        self._c[name] = time.thread_time()

    def _stop(self, name: str) -> None:
        sync(self.device)
        self.wall[name] += time.perf_counter() - self._t[name]
        self.cpu[name] += time.thread_time() - self._c[name]

    def _pass(self, name: str) -> bool:
        """Give the turn to the next runner that has not finished; False when there is none."""
        i = self.order.index(name)
        for k in range(1, len(self.order)):
            nxt = self.order[(i + k) % len(self.order)]
            if not self.is_done(nxt):
                self._go[nxt].set()
                return True
        return False

    def _wait(self, name: str) -> None:
        self._go[name].wait()
        self._go[name].clear()

    def enter(self, name: str) -> None:
        self._ready[name].set()
        self._wait(name)
        self._start(name)

    def step(self, name: str) -> None:
        if self.is_done(name):
            return
        sync(self.device)
        now = time.perf_counter()
        self.step_seconds[name].append(now - self._last[name])
        self._last[name] = now
        if len(self.step_seconds[name]) % self.every == 0:
            self._stop(name)
            with self._lock:
                passed = self._pass(name)
            if passed:
                self._wait(name)
            self._start(name)

    def finish(self, name: str) -> None:
        if self.is_done(name):
            return
        self._stop(name)
        self._retire(name)
        self._all_done.wait()  # what a runner does after its last step (saving) must not overlap a timed stretch

    def _retire(self, name: str) -> None:
        with self._lock:
            if self._mark_done(name):
                self._all_done.set()
            else:
                self._pass(name)

    def report(self, name: str) -> dict[str, Any]:
        return {"seconds": self.wall[name], "cpu_seconds": self.cpu[name], "step_seconds": self.step_seconds[name]}

    def run(self, targets: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        """Run each target in its own thread, in turns; their return values by name (re-raises a runner's error)."""
        import threading

        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}

        def wrap(name: str, fn: Callable[[], Any]) -> None:
            try:
                results[name] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors[name] = exc
                self._ready[name].set()
                self._retire(name)

        threads = []
        for name in self.order:
            th = threading.Thread(target=wrap, args=(name, targets[name]), name=f"bench-{name}", daemon=True)
            th.start()
            self._ready[name].wait()
            threads.append(th)
        self._go[self.order[0]].set()
        for th in threads:
            th.join()
        if errors:
            raise next(iter(errors.values()))
        return results

    def run_processes(self, target: Callable[..., Any], args: dict[str, tuple], ctx: Any) -> None:
        """Start `target(self, name, *args[name])` in one process per runner (one at a time, each waiting at
        `enter` before the next starts), give the first the turn, wait for all. A process that dies hands its
        turn on; its exit code is raised as an error at the end."""
        procs = []
        for name in self.order:
            p = ctx.Process(target=target, args=(self, name, *args[name]), name=f"bench-{name}")
            p.start()
            while not self._ready[name].wait(1.0):
                if not p.is_alive():
                    self._ready[name].set()
                    self._mark_done(name)
            procs.append(p)
        self._go[self.order[0]].set()
        alive = set(range(len(procs)))
        while alive:
            for i in sorted(alive):
                procs[i].join(0.5)
                if not procs[i].is_alive():
                    alive.discard(i)
                    if procs[i].exitcode and not self.is_done(self.order[i]):
                        self._retire(self.order[i])
        bad = [(self.order[i], p.exitcode) for i, p in enumerate(procs) if p.exitcode]
        if bad:
            raise RuntimeError(f"benchmark run {bad[0][0]!r} failed (exit code {bad[0][1]}); see its output above")


def run_ours(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[Pair], cfg: FinetuneConfig,
             device: torch.device, *, bf16: bool = False, fused_kernels: bool = True,
             name: str = "ours", turns: Turns | None = None, memory: bool = True) -> PeerRun:
    """One epoch of `loop.train` on `pairs`; timed from its first step to the end of its last one (in `turns`
    with other runs when given: then the times are in `turns`)."""
    from rsg_eval.bench.finetune import RssPeak, trim_heap
    from rsg_eval.training.finetune.loop import Hooks, train

    span = _Span(device)
    losses: list[float] = []
    step_ends: list[float] = []

    def on_start(state: Any, total: int, per_epoch: int) -> None:
        if turns is not None:
            turns.enter(name)
        span.start()

    def on_step(state: Any, loss: float) -> None:
        losses.append(loss)
        step_ends.append(time.perf_counter())
        if turns is not None:
            turns.step(name)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        span.stop()  # the last optimizer step is done; evaluation and checkpoints are outside the span
        if turns is not None:
            turns.finish(name)
        return {"score": 0.0}

    trim_heap()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="rsg-bench-") as tmp, (RssPeak() if memory else _NoPeak()) as mem:
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
           max_steps: int = 0, name: str = "hf-grouped", turns: Turns | None = None,
           memory: bool = True) -> PeerRun:
    """transformers' Seq2SeqTrainer on `pairs`: its own length-grouped sampler, or exactly `batches` (a list of
    index lists, e.g. our epoch plan) when given; our optimizer and schedule through `optimizers=`."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from rsg_eval.bench.finetune import RssPeak, trim_heap
    from rsg_eval.engine.optim import make_optimizer, param_groups
    from rsg_eval.training.finetune.loop import lr_factor, plan_sizes

    data = [{"input_ids": list(p.src), "attention_mask": [1] * len(p.src), "labels": list(p.tgt)} for p in pairs]
    _, per_epoch, total = plan_sizes(len(pairs), cfg, 1)
    warm = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    span = _Span(device)
    losses: list[torch.Tensor] = []
    n_steps = min(max_steps, per_epoch) if max_steps else per_epoch

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001
            if turns is not None:
                turns.enter(name)
            span.start()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            span.mark()
            if state.global_step >= n_steps:
                span.stop()
                if turns is not None:
                    turns.finish(name)
            elif turns is not None:
                turns.step(name)

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
        opt = make_optimizer(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.schedule))
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          processing_class=tokenizer, optimizers=(opt, sched), callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training dict would clutter the report
        trim_heap()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with RssPeak() if memory else _NoPeak() as mem:
            trainer.train()
    if not span.t1:
        span.stop()
    steps = [b - a for a, b in zip(span.marks, span.marks[1:])]
    order = batches[:n_steps] if batches is not None else None
    examples = sum(len(b) for b in order) if order is not None else min(len(pairs), n_steps * cfg.batch_size)
    values = torch.stack(losses).tolist() if losses else []
    return PeerRun(name, n_steps, examples, span.seconds, span.cpu, values[:n_steps], steps, _peak(device, mem))


class _NoPeak:
    """Stands in for the RSS sampler in interleaved runs (one process: its RSS is every run's at once)."""

    peak = base = 0

    def __enter__(self) -> "_NoPeak":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _peak(device: torch.device, mem: Any) -> float:
    if isinstance(mem, _NoPeak):
        return 0.0
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (mem.peak - mem.base) / 2**20


# --------------------------------------------------------------------------------------------- the report

def windows(losses: Sequence[float], n: int = 10) -> list[float]:
    """Mean loss over `n` equal stretches of an epoch (the trajectory at a scale where batch order washes out)."""
    parts = np.array_split(np.asarray(losses, dtype=float), min(n, len(losses)) or 1)
    return [float(p.mean()) for p in parts if len(p)]


MODELS = ("tiny", "small")


def bench_model(name: str) -> tuple[torch.nn.Module, Any]:
    """A fresh random model and its tokenizer: tiny, or small (d_model 256, 4+4 layers); same seed every call."""
    from rsg_eval.models.tiny import build_tiny
    from rsg_eval.bench.finetune import SMALL

    if name not in MODELS:
        raise ValueError(name)
    return build_tiny(**({} if name == "tiny" else SMALL))


def _runner(turns: Turns, name: str, spec_path: str, out_path: str) -> None:
    """One run in its own process: untimed warm-up steps, then the run in turns; its figures to `out_path`."""
    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(spec["threads"])
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(spec["device"])
    cfg = FinetuneConfig(**{**spec["cfg"], "adam_betas": tuple(spec["cfg"]["adam_betas"])})
    pairs, bf16 = spec["pairs"], spec["bf16"]
    ours = name in ("ours", "ours-plain")
    fused = name != "ours-plain"
    # one-time costs of the process (thread pools, allocator, first kernels): two untimed steps
    m, tok = bench_model(spec["model"])
    m.to(device).train()
    if ours:
        warm = FinetuneConfig(**{**spec["cfg"], "adam_betas": tuple(spec["cfg"]["adam_betas"]), "max_steps": 2})
        run_ours(m, tok, pairs, warm, device, bf16=bf16, fused_kernels=fused, memory=False)
    else:
        run_hf(m, tok, pairs, cfg, device, bf16=bf16, max_steps=2, memory=False)
    m, tok = bench_model(spec["model"])
    m.to(device).train()
    if ours:
        run = run_ours(m, tok, pairs, cfg, device, bf16=bf16, fused_kernels=fused, name=name, turns=turns)
    elif name == "hf-grouped":
        run = run_hf(m, tok, pairs, cfg, device, bf16=bf16, turns=turns)
    else:
        run = run_hf(m, tok, pairs, cfg, device, bf16=bf16, batches=spec["plan"], max_steps=spec["check_steps"],
                     name=name, turns=turns)
    out = asdict(run)
    out.update(turns.report(name))
    Path(out_path).write_text(json.dumps(out), encoding="utf-8")


def compare(model: str, pairs: Sequence[Pair], cfg: FinetuneConfig, device: torch.device, *,
            check_steps: int = 40, breakdown: bool = False, bf16: bool = False, every: int = 4,
            on_run: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Every run in its own process on a fresh `model` ("tiny" or "small", the same seed every time), the runs
    interleaved in turns of `every` optimizer steps (`Turns`); a JSON-able report with the speed ratios and the
    loss comparisons. Peak memory is each process's own (RSS above its level before the run; on a GPU, allocated)."""
    import multiprocessing

    plan = epoch_plan([p.length for p in pairs], cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length)
    names = ["ours", "hf-grouped"] + (["ours-plain"] if breakdown else []) + (["hf-same"] if check_steps else [])
    # A fresh process per run, forked from a server that has imported torch, transformers and this module once
    # (not spawned: each spawned process paid those imports again). No CUDA context exists before the fork.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "rsg_eval.bench.hf_trainer"])
    turns = Turns(names, every, device, ctx=ctx)
    with tempfile.TemporaryDirectory(prefix="rsg-bench-against-") as tmp:
        spec_path = str(Path(tmp) / "spec.pt")
        torch.save({"pairs": list(pairs), "cfg": cfg.to_dict(), "device": str(device), "bf16": bf16, "model": model,
                    "threads": torch.get_num_threads(), "plan": plan, "check_steps": check_steps}, spec_path)
        if on_run:
            on_run(", ".join(names) + f", one process each, in turns of {turns.every} steps")
        turns.run_processes(_runner, {n: (spec_path, str(Path(tmp) / f"{n}.json")) for n in names}, ctx)
        runs = {n: PeerRun(**{k: v for k, v in json.loads((Path(tmp) / f"{n}.json").read_text()).items()})
                for n in names}
    ours, hf = runs["ours"], runs["hf-grouped"]
    report: dict[str, Any] = {
        "runs": {k: asdict(v) for k, v in runs.items()},
        "turn_steps": turns.every,
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
