"""`rsg finetune`: per-task text-to-text fine-tuning through the zero-shot prompt templates.

For each training task: render every train item with the task's template (input = prompt, target = the gold
choice's text + </s>), train with `loop.train`, evaluate val after every epoch by rank classification over the
item's labels with the task's official metric, keep the best state, and predict val and test with it. LiDiRus
has no train split: the TERRa model predicts it (as the leaderboard expects), with the TERRa template.

Only rank 0 writes the run folder; every rank trains and scores its shard of val/test.

One configuration per run folder (`rsg_eval.runs.RunFolder.claim`, on rank 0): templates are rendered on one item
of every split first (nothing is created when one fails), then the folder is locked and this command's settings
(`settings.run_settings`: model identity, code version, data; per task split its template, data files and
hyper-parameters) are compared with the folder's; a difference is refused unless `restart`, which clears the run
folder's results and the tasks' checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rsg_eval import runs
from rsg_eval.core.errors import RSGError
from rsg_eval.core.tasks import EmptyTaskFile, limit_groups
from rsg_eval.engine import collective, sharding
from rsg_eval.engine.runtime import Dist, init_from_env, resolve_device, use_bf16
from rsg_eval.training.finetune.config import ConfigSet, FinetuneConfig
from rsg_eval.training.finetune.causal import build_causal_pairs
from rsg_eval.training.finetune.data import build_pairs
from rsg_eval.training.finetune.loop import Hooks, NoTrainingData, TrainResult, train
from rsg_eval.training.finetune.predict import Scorer, decide, prepare, val_metrics
from rsg_eval.training.finetune.settings import (CODE_VERSION, SPLITS, check_templates, data_shas, merged_config,
                                                 result_config, run_config, run_settings, training_units)


@dataclass
class Reporter:
    """What the command shows: override the methods (the CLI uses rich); the default prints nothing."""

    def task_start(self, task: str, predicts: list[str], n_pairs: int, total_steps: int,
                   resumed: int | None) -> None: ...
    def step(self, task: str, state: Any, loss: float) -> None: ...
    def evaluated(self, task: str, row: dict[str, Any]) -> None: ...
    def task_done(self, task: str, result: dict[str, Any]) -> None: ...
    def skipped(self, task: str, why: str) -> None: ...
    def note(self, text: str) -> None: ...


@dataclass
class FinetuneOutcome:
    run: runs.RunFolder
    trained: list[str] = field(default_factory=list)      # training tasks trained (or resumed) in this call
    skipped: list[str] = field(default_factory=list)      # finished before: skipped
    failed: dict[str, str] = field(default_factory=dict)  # task -> message (no train split, NaN, ...)
    results: dict[str, TrainResult] = field(default_factory=dict)
    zip: Any = None
    metrics: dict[str, Any] | None = None


def _bf16(cfg: FinetuneConfig, device: torch.device) -> bool:
    """bf16 autocast only on a CUDA GPU that supports it; never fp16, never on CPU (runtime.use_bf16)."""
    return use_bf16(cfg.bf16, device)


@dataclass
class _Call:
    """One `run_finetune` call's inputs, resolved and checked before any work."""
    model: str
    revision: str | None
    configs: ConfigSet
    names: list[str]
    source: Any
    units: list[tuple[str, list[str]]]     # training_units
    templates: dict[str, Any]              # train task -> its template
    folder: runs.RunFolder
    ckpt_root: Path
    dist: Dist
    dev: torch.device
    mode: str                              # none | ddp | fsdp
    fsdp_cpu_offload: bool
    reporter: Reporter
    hooks: Callable[[str], Hooks] | None
    load: Callable[..., Any]
    shas: dict[str, str | None]            # data_shas


def run_finetune(
    model: str,
    *,
    configs: ConfigSet,
    tasks: Sequence[str] | None = None,
    data: Any = None,
    run: str | None = None,
    root: str | Path = "submissions",
    checkpoint_dir: str | Path | None = None,
    device: str | None = None,
    revision: str | None = None,
    restart: bool = False,
    reporter: Reporter | None = None,
    hooks: Callable[[str], Hooks] | None = None,
    load: Callable[..., Any] | None = None,
    dist_timeout: float | None = None,
    sharding_mode: str | None = None,
    fsdp_cpu_offload: bool = False,
    report_to: str | Sequence[str] | None = None,
) -> FinetuneOutcome:
    """Fine-tune `model` on each task and write the run folder. See the module docstring.

    `hooks(task)` gives per-task loop hooks (tests use it to stop a run mid-task); `load` replaces
    `rsg_eval.models.loading.load_model` (same signature). `dist_timeout`: seconds a collective may wait under
    a launcher (rsg_eval.engine.runtime.DEFAULT_TIMEOUT_S). `sharding_mode`: none | ddp | fsdp (None: ddp under a
    launcher), `fsdp_cpu_offload` for fsdp (rsg_eval.engine.sharding). `report_to`: experiment trackers
    (rsg_eval.engine.tracking: none, tensorboard, wandb, mlflow; rank 0 logs)."""
    from rsg_eval.engine.tracking import make_tracker, parse_report_to, require_backends

    reporter = reporter or Reporter()
    trackers = parse_report_to(report_to)
    require_backends(trackers)  # a missing extra: one line, before any work
    c = _resolve(model, configs, tasks, data, run, root, checkpoint_dir, device, revision, reporter, hooks, load,
                 dist_timeout, sharding_mode, fsdp_cpu_offload)
    dist, folder = c.dist, c.folder
    settings, per_task = run_settings(model, revision, c.units, c.templates, configs, c.source, dist, c.shas)
    claim = _claim(folder, settings, per_task, restart, dist)  # rank 0 locks; a refusal reaches every rank
    out = FinetuneOutcome(folder)
    # the run folder's name and fingerprint name the tracker's run; only rank 0 gets a real tracker
    tracker = make_tracker(trackers, run_dir=folder.path, run_name=folder.path.name,
                           fingerprint=runs.fingerprint(settings), rank=dist.rank)
    epochs_rows: list[dict] = []  # rows of tasks finished by earlier calls

    current: tuple[str, Path] | None = None  # the task being trained, for its partial history on failure
    try:
        if dist.main:
            epochs_rows = _record_config(c, restart, tracker)
        dist.barrier()
        for train_task, predicts in c.units:
            cfg = configs.for_task(train_task)
            fps = _unit_fingerprint(c, out, train_task, predicts, cfg)
            if fps is None:   # finished earlier, or nothing to train on
                continue
            task_ckpt = c.ckpt_root / train_task
            dist.barrier()
            current = (train_task, task_ckpt)
            try:
                result, task_rows = _train_and_predict(c, train_task, predicts, cfg, task_ckpt, *fps,
                                                       hooks(train_task) if hooks else None, tracker)
            except RSGError as exc:
                if isinstance(exc, NoTrainingData):
                    out.failed[train_task] = str(exc)
                    reporter.skipped(train_task, str(exc))
                    continue
                raise
            current = None
            out.trained.append(train_task)
            out.results[train_task] = result
            if dist.main:
                epochs_rows = [r for r in epochs_rows if r.get("task") != train_task] + task_rows
                folder.write_epochs(_order_rows(epochs_rows))
    finally:
        # also after an error or Ctrl-C: metrics.json and the zip reflect every task finished so far
        if dist.main:
            _close(folder, out, epochs_rows, current, claim, tracker)
    dist.barrier()
    return out


def _resolve(model: str, configs: ConfigSet, tasks: Sequence[str] | None, data: Any, run: str | None,
             root: str | Path, checkpoint_dir: str | Path | None, device: str | None, revision: str | None,
             reporter: Reporter, hooks: Callable[[str], Hooks] | None, load: Callable[..., Any] | None,
             dist_timeout: float | None, sharding_mode: str | None, fsdp_cpu_offload: bool) -> _Call:
    """The processes, device, sharding, tasks, data and templates (each rendered once: a failing one stops here,
    before anything is written), the run folder and checkpoint root, the data files' hashes."""
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.tasks import resolve_tasks

    dist = init_from_env(dist_timeout)
    dev = resolve_device(device, dist)  # before any work: a wrong --device under a launcher fails at once
    mode = sharding.resolve_mode(sharding_mode, dist)
    if fsdp_cpu_offload and mode != "fsdp":
        raise RSGError("--fsdp-cpu-offload needs --sharding fsdp under a launcher (torchrun or accelerate launch "
                       "with several processes)", field="--fsdp-cpu-offload", expected="--sharding fsdp")
    if load is None:
        from rsg_eval.models.loading import load_model as load
    names = resolve_tasks(list(tasks) if tasks else None)
    source = resolve_data(data)
    units = training_units(names)
    # Templates are loaded and rendered on one item of every split before anything is written.
    templates = {t: load_template(t, configs.for_task(t).template) for t, _ in units}
    check_templates(units, templates, source)

    folder = runs.RunFolder(runs.run_path(run or runs.default_run_name(model, "finetune"), root=root))
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir else Path("checkpoints") / folder.path.name
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return _Call(model=model, revision=revision, configs=configs, names=names, source=source, units=units,
                 templates=templates, folder=folder, ckpt_root=ckpt_root, dist=dist, dev=dev, mode=mode,
                 fsdp_cpu_offload=fsdp_cpu_offload, reporter=reporter, hooks=hooks, load=load,
                 shas=data_shas(source, units))


def _record_config(c: _Call, restart: bool, tracker: Any) -> list[dict]:
    """Rank 0, once the folder is claimed: --restart clears every task's checkpoints; config.json (merged with
    earlier calls') is written and logged; returns the epochs rows earlier calls wrote."""
    if restart:  # the results are cleared: so are every task's checkpoints (finished ones too)
        from rsg_eval.core.tasks import TASK_NAMES

        for t in TASK_NAMES:
            _discard_unfinished(c.ckpt_root / t)
        c.reporter.note(f"--restart: cleared the results in {c.folder.path} and the checkpoints in {c.ckpt_root}")
    run_cfg = merged_config(c.folder, run_config(c.model, c.revision, c.names, c.units, c.templates, c.configs,
                                                   c.source, c.dist, c.ckpt_root, c.mode))
    c.folder.write_config(run_cfg)
    tracker.log_config(run_cfg)
    return c.folder.read_epochs()


def _unit_fingerprint(c: _Call, out: FinetuneOutcome, train_task: str, predicts: list[str], cfg: FinetuneConfig
                      ) -> tuple[str, dict[str, Any]] | None:
    """(fingerprint, its parts) of the results `train_task` makes; None, with the outcome and the reporter told,
    when every one of them is finished already or the task has no train split."""
    tpl = c.templates[train_task]
    fp_parts = {"model": c.model, "revision": c.revision, "template": tpl.name, "template_sha256": tpl.sha256,
                "code": CODE_VERSION, "train_task": train_task, "config": result_config(cfg, c.dist),
                "data": str(c.source), "data_sha256": {k: v for k, v in c.shas.items()
                                                       if k.split("/")[0] in (train_task, *predicts)}}
    fp = runs.fingerprint(fp_parts)
    problems = {f"{t}/{s}": c.folder.task_problem(t, s, fp) for t in predicts for s in SPLITS}
    if not any(problems.values()):
        out.skipped.append(train_task)
        c.reporter.skipped(train_task, "finished earlier with the same model, template and settings")
        return None
    for key, why in problems.items():
        if why not in (None, "not finished") and c.dist.main:
            c.reporter.note(f"{key}: {why}; redoing it")
    if not c.source.has(train_task, "train"):
        msg = f"{train_task}: no train split in {c.source}; it cannot be fine-tuned (skipped)"
        out.failed[train_task] = msg
        c.reporter.skipped(train_task, msg)
        return None
    return fp, fp_parts


def _close(folder: runs.RunFolder, out: FinetuneOutcome, epochs_rows: list[dict], current: tuple[str, Path] | None,
           claim: runs.Claim, tracker: Any) -> None:
    """Rank 0, however the call ends: the stopped task's curve so far, metrics.json and the zip, then the lock
    and the tracker are released."""
    try:
        if current is not None:  # stopped mid-task (NaN, full disk, Ctrl-C): keep its curve so far
            rows = _saved_history(current[1])
            if rows:
                epochs_rows = [r for r in epochs_rows if r.get("task") != current[0]] + rows
                folder.write_epochs(_order_rows(epochs_rows))
        out.metrics = folder.write_metrics("val")
        out.zip = folder.build_zip()
    except (OSError, RSGError):
        pass  # a full disk here must not hide the error that stopped the run
    finally:
        claim.release()
        tracker.close()


def _claim(folder: runs.RunFolder, settings: dict, per_task: dict, restart: bool, dist: Dist) -> runs.Claim:
    """Rank 0 claims the run folder (lock + settings check); a refusal is raised on every rank, so no process
    waits for a partner that has stopped."""
    claim = collective.main_acts(
        dist, lambda: folder.claim("finetune", settings, per_task=per_task, restart=restart, main=True), share=False)
    return claim if claim is not None else folder.claim("finetune", settings, per_task=per_task, main=False)


def _order_rows(rows: list[dict]) -> list[dict]:
    from rsg_eval.core.tasks import TASK_NAMES

    order = {n: i for i, n in enumerate(TASK_NAMES)}
    cols = ["task", "epoch", "step", "train_loss", "acc", "f1", "f1a", "em", "mcc", "score"]
    out = []
    for r in sorted(rows, key=lambda r: (order.get(r["task"], 99), float(r["step"]))):
        out.append({c: r.get(c) for c in cols})
    return out


def _saved_history(task_ckpt: Path) -> list[dict]:
    """The val history stored in a task's `last` checkpoint ([] when there is none)."""
    from rsg_eval.engine import checkpoint as ck

    last = ck.find(task_ckpt, "last")
    if last is None:
        return []
    try:
        return list(ck.read_meta(last).get("state", {}).get("history", []))
    except (OSError, ValueError):
        return []


def _discard_unfinished(task_ckpt: Path) -> None:
    import shutil

    for name in ("last", "last.old", "last.new", "best", "best.old", "best.new"):
        shutil.rmtree(task_ckpt / name, ignore_errors=True)


def _train_and_predict(c: _Call, task: str, predicts: list[str], cfg: FinetuneConfig, task_ckpt: Path, fp: str,
                       fp_parts: dict[str, Any], hooks: Hooks | None, tracker: Any = None
                       ) -> tuple[TrainResult, list[dict]]:
    """Train `task` from fresh base weights (or resume it), then predict val and test of every task it predicts
    with its best state. Returns (the training result, its epochs rows)."""
    from rsg_eval.core.data import load_items
    from rsg_eval.engine import checkpoint as ck
    from rsg_eval.engine.tracking import Tracker

    tracker = tracker or Tracker()
    tpl, dev = c.templates[task], c.dev
    loaded = c.load(c.model, device=dev, dtype="fp32", revision=c.revision, causal_ok=True)
    net, tok = loaded.model, loaded.tokenizer
    causal = not getattr(net.config, "is_encoder_decoder", False)
    net, lora_rank = _maybe_lora(net, cfg, causal, c.mode, c.reporter, task)
    max_src = min(cfg.max_source_length, int(loaded.info.get("max_input_tokens") or cfg.max_source_length))
    pairs = _train_pairs(c, task, cfg, net, tok, causal, max_src)
    val = prepare(load_items(c.source, task, "val"), tpl, tok, max_src) if c.source.has(task, "val") else None
    bf16 = _bf16(cfg, dev)
    # under fsdp every process runs the same forward passes (each gathers the blocks' shards): each scores all of
    # val instead of its share
    eval_dist = Dist() if c.mode == "fsdp" else c.dist
    scored = Scorer(tok, cfg, max_src, loaded.info.get("max_input_tokens"), c.reporter.note)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        if val is None or not val.items:
            raise RSGError(f"{task}: no val split in {c.source}; the best state cannot be chosen", field="val")
        return val_metrics(task, val, scored(m, val, f"{task}/val", eval_dist))

    net.train()
    result = train(net, tok, pairs, cfg, evaluate=evaluate, ckpt_dir=task_ckpt,
                   fingerprint={"model": c.model, "model_fingerprint": loaded.info.get("fingerprint"),
                                "template_sha256": tpl.sha256, "task": task, "code": CODE_VERSION},
                   device=dev, dist=c.dist, bf16=bf16,
                   hooks=_task_hooks(c.reporter, tracker, task, predicts, len(pairs), hooks or Hooks()), task=task,
                   sharding_mode=c.mode, cpu_offload=c.fsdp_cpu_offload,
                   files=_model_files(net, lora_rank, c.model, tok))
    best = result.best_dir or ck.find(task_ckpt, "best")
    if best is None:
        raise RSGError(f"{task}: training finished without a best checkpoint in {task_ckpt}", file=task_ckpt)
    if sharding.is_fsdp(net):
        # the trained model is sharded: predict with a whole copy per process, from the best checkpoint's full
        # weights (prediction then splits the items over the processes, as under ddp)
        del net, loaded
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        loaded = c.load(c.model, device=dev, dtype="fp32", revision=c.revision)
        net = loaded.model
    ck.load_weights(net, best / ck.WEIGHTS)
    if lora_rank:  # the adapter merged into the weights: prediction runs at the base model's speed
        net = net.merge_and_unload()
    net.eval()
    _predict(c, task, predicts, net, tok, max_src, scored, bf16, best, fp, fp_parts)
    c.dist.barrier()
    c.reporter.task_done(task, {"best_step": result.state.best_step, "best_epoch": result.state.best_epoch,
                                "best_metrics": result.state.best_metrics, "stopped": result.state.stopped})
    del net, loaded  # the next task loads fresh base weights; free this model's memory first
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result, list(result.state.history)


def _train_pairs(c: _Call, task: str, cfg: FinetuneConfig, net: Any, tok: Any, causal: bool, max_src: int
                 ) -> list[Any]:
    """The task's train items rendered with its template into (source, target) pairs; a note when targets were
    cut."""
    from rsg_eval.core.data import load_items

    tpl = c.templates[task]
    try:
        train_items = load_items(c.source, task, "train")
    except EmptyTaskFile as exc:  # reported like any task with nothing to train on; the other tasks go on
        raise NoTrainingData(f"{task}: no training examples ({exc})") from None
    if cfg.max_train_examples:  # counted in questions for MuSeRC (an item there is one answer option)
        train_items = limit_groups(train_items, cfg.max_train_examples)
    render = lambda it: tpl.render(it, tokenizer=tok, max_tokens=max_src)  # noqa: E731
    if causal:  # prompt + the gold answer's continuation, as rank classification scores it (finetune/causal.py)
        pairs = build_causal_pairs(train_items, render, net, tok, max_src)
    else:
        pairs = build_pairs(train_items, render, tok, max_src, cfg.max_target_length)
    n_cut = sum(p.cut for p in pairs)
    if n_cut:
        c.reporter.note(f"{task}: {n_cut} of {len(pairs)} targets are longer than max_target_length "
                        f"{cfg.max_target_length} and were cut (raise --max-target-length)")
    return pairs


def _model_files(net: Any, lora_rank: int, model_name: str, tok: Any) -> Callable[[Path], None]:
    """What `best/` holds beside the weights, so that `--model <checkpoint>/best` loads it."""
    def model_files(folder: Path) -> None:
        if lora_rank:  # an adapter folder naming its base: `--model <checkpoint>/best` loads base + adapter
            from rsg_eval.models.lora import save_adapter

            save_adapter(net, folder, model_name, tok)
            return
        # config and tokenizer beside the weights: `--model <checkpoint>/best` loads the fine-tuned model
        net.config.save_pretrained(str(folder))
        if getattr(net, "generation_config", None) is not None:
            net.generation_config.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
    return model_files


def _task_hooks(reporter: Reporter, tracker: Any, task: str, predicts: list[str], n_pairs: int, user: Hooks
                ) -> Hooks:
    """The loop's hooks for one task: the reporter, the tracker, then the caller's own hooks."""
    from rsg_eval.engine.tracking import eval_scalars

    def on_start(state, total, per_epoch):
        reporter.task_start(task, predicts, n_pairs, total, state.step or None)
        if user.on_start:
            user.on_start(state, total, per_epoch)

    def on_step(state, loss):
        reporter.step(task, state, loss)
        if user.on_step:
            user.on_step(state, loss)

    def on_metrics(step, scalars):
        tracker.log_scalars(step, {f"{task}/{k}": v for k, v in scalars.items()})

    def on_eval(state, row):
        # every val metric of the task, under <task>/eval/<metric>, at the optimizer step it was measured
        tracker.log_scalars(state.step, eval_scalars(
            {"eval": {k: v for k, v in row.items() if k not in ("task", "epoch", "step")}}, prefix=task))
        reporter.evaluated(task, row)
        if user.on_eval:
            user.on_eval(state, row)

    return Hooks(on_step, on_eval, on_start, on_metrics)


def _predict(c: _Call, task: str, predicts: list[str], net: Any, tok: Any, max_src: int, scored: Scorer,
             bf16: bool, best: Path, fp: str, fp_parts: dict[str, Any]) -> None:
    """Val and test of every task `task` predicts, scored by the best state; rank 0 writes them."""
    from rsg_eval.core.data import load_items
    from rsg_eval.engine import checkpoint as ck

    tpl, dist = c.templates[task], c.dist
    best_meta = ck.read_meta(best)
    for t in predicts:
        for split in SPLITS:
            items = load_items(c.source, t, split) if c.source.has(t, split) else []
            if not items:
                continue
            prep = prepare(items, tpl, tok, max_src)  # LiDiRus: the TERRa template, as the model was trained
            with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else _null()):
                scores = scored(net, prep, f"{t}/{split}", dist)
            preds = decide(items, scores)
            if dist.main:
                rows = [runs.log_row(it, preds[it.key], prompt=p, choices=c_, scores=s)
                        for it, p, c_, s in zip(items, prep.prompts, prep.choices, scores)]
                c.folder.write_task(t, split, items, preds, rows, fp, parts=fp_parts,
                                    extra={"trained_on": task, "best_step": best_meta.get("step"),
                                           "best_epoch": best_meta.get("epoch"),
                                           "best_val": best_meta.get("metrics"), "checkpoint": str(best)})


def _maybe_lora(net: Any, cfg: FinetuneConfig, causal: bool, mode: str, reporter: Reporter,
                task: str) -> tuple[Any, int]:
    """(the model to train, its LoRA rank or 0). `lora` None = auto: decoder-only models over 1e9 parameters train
    a rank-LORA_AUTO_RANK adapter (full fine-tuning with AdamW needs 16 bytes a parameter), others fully."""
    from rsg_eval.training.finetune.causal import lora_by_default
    from rsg_eval.training.finetune.config import LORA_AUTO_RANK

    rank = cfg.lora
    if rank is None:
        rank = LORA_AUTO_RANK if causal and lora_by_default(sum(p.numel() for p in net.parameters())) else 0
        if rank:
            reporter.note(f"{task}: a decoder-only model over 1e9 parameters: LoRA rank {rank} (--lora 0 trains "
                          "every weight)")
    if not rank:
        return net, 0
    if mode == "fsdp":
        raise RSGError("--lora trains under one process or ddp; FSDP shards full fine-tuning (a LoRA model's "
                       "frozen weights need no optimizer state)", field="--lora", expected="--sharding ddp")
    from rsg_eval.models.lora import LoraSettings, wrap

    targets = tuple(t for t in (cfg.lora_targets or "").split(",") if t) or None
    settings = LoraSettings(rank=int(rank), alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets)
    # the adapters' A matrices are drawn at random: from --seed, so a run is repeatable (and every process of a
    # launch starts from the same adapter), whatever ran before in this process
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return wrap(net, settings), int(rank)


def _null():
    import contextlib

    return contextlib.nullcontext()
