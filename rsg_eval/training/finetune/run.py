"""`rsg finetune`: per-task text-to-text fine-tuning through the zero-shot prompt templates.

For each training task: render every train item with the task's template (input = prompt, target = the gold
choice's text + </s>), train with `loop.train`, evaluate val after every epoch by rank classification over the
item's labels with the task's official metric, keep the best state, and predict val and test with it. LiDiRus
has no train split: the TERRa model predicts it (as the leaderboard expects), with the TERRa template.

Only rank 0 writes the run folder; every rank trains and scores its shard of val/test.

One configuration per run folder (`rsg_eval.runs.RunFolder.claim`, on rank 0): templates are rendered on one item
of every split first (nothing is created when one fails), then the folder is locked and this command's settings
(`run_settings`: model identity, code version, data; per task split its template, data files and
hyper-parameters) are compared with the folder's; a difference is refused unless `restart`, which clears the run
folder's results and the tasks' checkpoints.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
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

CODE_VERSION = "finetune-1"   # bump when training or decoding changes what a finished task would contain
SPLITS = ("val", "test")


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


def training_units(tasks: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(train task, [tasks it predicts])] in leaderboard order of the trained task: LiDiRus rides on TERRa."""
    from rsg_eval.core.tasks import TASK_NAMES, get_task

    units: dict[str, list[str]] = {}
    for t in tasks:
        src = get_task(t).train_from
        units.setdefault(src, [])
        if t not in units[src]:
            units[src].append(t)
    order = {n: i for i, n in enumerate(TASK_NAMES)}
    ordered = sorted(units.items(), key=lambda kv: order[kv[0]])
    return [(k, sorted(v, key=lambda n: (n != k, order[n]))) for k, v in ordered]


def _versions() -> dict[str, str]:
    import transformers

    from rsg_eval import __version__

    return {"rsg_eval": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _bf16(cfg: FinetuneConfig, device: torch.device) -> bool:
    """bf16 autocast only on a CUDA GPU that supports it; never fp16, never on CPU (runtime.use_bf16)."""
    return use_bf16(cfg.bf16, device)


@dataclass
class _Prepared:
    items: list[Any]
    prompts: list[str]
    choices: list[list[str]]


def _prepare(items: list[Any], template: Any, tokenizer: Any, max_len: int) -> _Prepared:
    rendered = [template.render(it, tokenizer=tokenizer, max_tokens=max_len) for it in items]
    return _Prepared(items, [r.prompt for r in rendered], [list(r.choices) for r in rendered])


def score_prepared(model: Any, tokenizer: Any, prep: _Prepared, cfg: FinetuneConfig, dist: Dist,
                   max_len: int) -> list[list[float]]:
    """Rank-classification scores of every item's choices; ranks score whole groups round-robin and gather."""
    from rsg_eval.scoring import score_choices

    groups: dict[Any, list[int]] = {}
    for i, it in enumerate(prep.items):
        groups.setdefault(it.group, []).append(i)
    mine = [i for g, idx in enumerate(groups.values()) if g % dist.world == dist.rank for i in idx]
    scores = score_choices(model, tokenizer, [prep.prompts[i] for i in mine], [prep.choices[i] for i in mine],
                           batch_size=cfg.eval_batch_size, normalize=cfg.normalize,
                           max_input_tokens=max_len) if mine else []
    out: list[list[float] | None] = [None] * len(prep.items)
    for part in dist.gather(list(zip(mine, [list(map(float, s)) for s in scores]))):
        for i, s in part:
            out[i] = s
    return out  # type: ignore[return-value]


def decide(items: Sequence[Any], scores: Sequence[Sequence[float]]) -> dict[Any, Any]:
    """{key: the label whose choice scored highest}; the first label wins ties (deterministic)."""
    preds = {}
    for it, s in zip(items, scores):
        best = max(range(len(s)), key=lambda j: (s[j], -j))
        preds[it.key] = it.labels[best]
    return preds


def val_metrics(task: str, prep: _Prepared, scores: Sequence[Sequence[float]]) -> dict[str, float]:
    from rsg_eval.core import metrics

    m = metrics.score_items(task, prep.items, decide(prep.items, scores))
    return {k: float(v) for k, v in m.items()}


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
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.data import load_items
    from rsg_eval.core.tasks import resolve_tasks

    from rsg_eval.engine.tracking import parse_report_to, require_backends

    reporter = reporter or Reporter()
    trackers = parse_report_to(report_to)
    require_backends(trackers)  # a missing extra: one line, before any work
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

    shas = data_shas(source, units)
    settings, per_task = run_settings(model, revision, units, templates, configs, source, dist, shas)
    claim = _claim(folder, settings, per_task, restart, dist)  # rank 0 locks; a refusal reaches every rank
    out = FinetuneOutcome(folder)
    from rsg_eval.engine.tracking import make_tracker

    # the run folder's name and fingerprint name the tracker's run; only rank 0 gets a real tracker
    tracker = make_tracker(trackers, run_dir=folder.path, run_name=folder.path.name,
                           fingerprint=runs.fingerprint(settings), rank=dist.rank)
    epochs_rows: list[dict] = []  # rows of tasks finished by earlier calls

    current: tuple[str, Path] | None = None  # the task being trained, for its partial history on failure
    try:
        if dist.main:
            if restart:  # the results are cleared: so are every task's checkpoints (finished ones too)
                from rsg_eval.core.tasks import TASK_NAMES

                for t in TASK_NAMES:
                    _discard_unfinished(ckpt_root / t)
                reporter.note(f"--restart: cleared the results in {folder.path} and the checkpoints in {ckpt_root}")
            run_cfg = _merged_config(folder, _run_config(model, revision, names, units, templates, configs, source,
                                                         dist, ckpt_root, mode))
            folder.write_config(run_cfg)
            tracker.log_config(run_cfg)
            epochs_rows = folder.read_epochs()
        dist.barrier()
        for train_task, predicts in units:
            cfg = configs.for_task(train_task)
            tpl = templates[train_task]
            fp_parts = {"model": model, "revision": revision, "template": tpl.name, "template_sha256": tpl.sha256,
                        "code": CODE_VERSION, "train_task": train_task, "config": result_config(cfg, dist),
                        "data": str(source), "data_sha256": {k: v for k, v in shas.items()
                                                              if k.split("/")[0] in (train_task, *predicts)}}
            fp = runs.fingerprint(fp_parts)
            problems = {f"{t}/{s}": folder.task_problem(t, s, fp) for t in predicts for s in SPLITS}
            if not any(problems.values()):
                out.skipped.append(train_task)
                reporter.skipped(train_task, "finished earlier with the same model, template and settings")
                continue
            for key, why in problems.items():
                if why not in (None, "not finished") and dist.main:
                    reporter.note(f"{key}: {why}; redoing it")
            if not source.has(train_task, "train"):
                msg = f"{train_task}: no train split in {source}; it cannot be fine-tuned (skipped)"
                out.failed[train_task] = msg
                reporter.skipped(train_task, msg)
                continue
            task_ckpt = ckpt_root / train_task
            dist.barrier()
            current = (train_task, task_ckpt)
            try:
                result, task_rows = _train_and_predict(
                    model, revision, train_task, predicts, cfg, tpl, source, folder, task_ckpt, fp, fp_parts, dev,
                    dist, reporter, hooks(train_task) if hooks else None, load, load_items,
                    (mode, fsdp_cpu_offload), tracker)
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
    dist.barrier()
    return out


def check_templates(units: list[tuple[str, list[str]]], templates: dict[str, Any], source: Any) -> None:
    """Render each unit's template on the first item of every split it reads (train targets included), so a
    template that fails does so before a model loads or a file is written. Reads only the first records of
    each file (a RuCoS train file is large)."""
    import itertools

    from rsg_eval.core.io import iter_jsonl
    from rsg_eval.core.tasks import parse_records

    for train_task, predicts in units:
        tpl = templates[train_task]
        for t, split in [(train_task, "train"), *((p, s) for p in predicts for s in SPLITS)]:
            if not source.has(t, split):
                continue
            path = source.path(t, split)
            head = list(itertools.islice(iter_jsonl(path), 4))
            if not head and split == "train":
                continue  # an empty train file: reported later as a task with nothing to train on (others go on)
            first = next((it for it in parse_records(t, split, head, str(path)) if it.labels), None)
            if first is not None:
                tpl.render(first)


def data_shas(source: Any, units: list[tuple[str, list[str]]]) -> dict[str, str | None]:
    """{"Task/split": sha256 of the data file} for every file the units read (None: not in the data)."""
    from rsg_eval.core.data import sha256_file

    out: dict[str, str | None] = {}
    for train_task, predicts in units:
        for t, split in [(train_task, "train"), (train_task, "val"), *((p, s) for p in predicts for s in SPLITS)]:
            out[f"{t}/{split}"] = sha256_file(source.path(t, split)) if source.has(t, split) else None
    return out


# Hyper-parameters the results do not depend on (or only through the global batch, recorded instead).
NOT_SETTINGS = ("eval_batch_size", "save_every", "gradient_checkpointing", "batch_size", "grad_accum")


def result_config(cfg: FinetuneConfig, dist: Dist) -> dict[str, Any]:
    """The hyper-parameters a task's results depend on: all but NOT_SETTINGS, plus the global batch."""
    hp = {k: v for k, v in cfg.record().items() if k not in NOT_SETTINGS}
    hp["global_batch"] = cfg.batch_size * cfg.grad_accum * dist.world
    return hp


def run_settings(model: str, revision: str | None, units: list[tuple[str, list[str]]], templates: dict[str, Any],
                 configs: ConfigSet, source: Any, dist: Dist, shas: dict[str, str | None]) -> tuple[dict, dict]:
    """(run-level settings, {(task, split): per-task settings}) for `RunFolder.claim`. Per task split: the
    template, the data files (its own, and the train/val files its model was trained and selected on) and the
    hyper-parameters of the task that trains it, with the global batch instead of per-device batch x
    accumulation (so 2 processes x batch 4 resume 1 x 8)."""
    from rsg_eval.runs.provenance import data_identity

    settings: dict[str, Any] = {"model": model, "revision": revision, "code_version": CODE_VERSION,
                                "data": data_identity(source)}
    from rsg_eval.models.loading import TINY_NAME, _dir_fingerprint

    local = Path(model).expanduser()
    if model != TINY_NAME and local.is_dir():
        settings["model_dir"] = _dir_fingerprint(local)
    per_task: dict[tuple[str, str], dict] = {}
    for train_task, predicts in units:
        hp = result_config(configs.for_task(train_task), dist)
        tpl = templates[train_task]
        for t in predicts:
            for split in SPLITS:
                per_task[(t, split)] = {
                    "trained_on": train_task, "template": tpl.name, "template_sha256": tpl.sha256,
                    "hyperparameters": hp, "data_sha256": shas.get(f"{t}/{split}"),
                    "train_data_sha256": shas.get(f"{train_task}/train"),
                    "selection_data_sha256": shas.get(f"{train_task}/val")}
    return settings, per_task


def _claim(folder: runs.RunFolder, settings: dict, per_task: dict, restart: bool, dist: Dist) -> runs.Claim:
    """Rank 0 claims the run folder (lock + settings check); a refusal is raised on every rank, so no process
    waits for a partner that has stopped."""
    claim = collective.main_acts(
        dist, lambda: folder.claim("finetune", settings, per_task=per_task, restart=restart, main=True), share=False)
    return claim if claim is not None else folder.claim("finetune", settings, per_task=per_task, main=False)


def _merged_config(folder: runs.RunFolder, cfg: dict[str, Any]) -> dict[str, Any]:
    """This call's config merged with what earlier calls on the folder recorded (their tasks stay listed)."""
    from rsg_eval.core.tasks import TASK_NAMES

    try:
        old = folder.read_config() or {}
    except RSGError:
        old = {}
    for key in ("template", "template_sha256", "trained_on", "hyperparameters"):
        if isinstance(old.get(key), dict):
            cfg[key] = {**old[key], **cfg[key]}
    cfg["tasks"] = [t for t in TASK_NAMES if t in set(old.get("tasks") or []) | set(cfg["tasks"])]
    return cfg


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


def _train_and_predict(model_name, revision, task, predicts, cfg, tpl, source, folder, task_ckpt, fp, fp_parts,
                       dev, dist, reporter, hooks, load, load_items, shard=("none", False), tracker=None
                       ) -> tuple[TrainResult, list[dict]]:
    from rsg_eval.engine import checkpoint as ck
    from rsg_eval.engine.tracking import Tracker, eval_scalars
    from rsg_eval.scoring import count_cut_prompts, cut_prompts_note

    tracker = tracker or Tracker()
    loaded = load(model_name, device=dev, dtype="fp32", revision=revision, causal_ok=True)
    net, tok = loaded.model, loaded.tokenizer
    causal = not getattr(net.config, "is_encoder_decoder", False)
    net, lora_rank = _maybe_lora(net, cfg, causal, shard[0], reporter, task)
    max_src = min(cfg.max_source_length, int(loaded.info.get("max_input_tokens") or cfg.max_source_length))
    try:
        train_items = load_items(source, task, "train")
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
        reporter.note(f"{task}: {n_cut} of {len(pairs)} targets are longer than max_target_length "
                      f"{cfg.max_target_length} and were cut (raise --max-target-length)")
    val = _prepare(load_items(source, task, "val"), tpl, tok, max_src) if source.has(task, "val") else None
    bf16 = _bf16(cfg, dev)
    mode, offload = shard
    # under fsdp every process runs the same forward passes (each gathers the blocks' shards): each scores all of
    # val instead of its share
    eval_dist = Dist() if mode == "fsdp" else dist

    noted: set[str] = set()

    def scored(m: torch.nn.Module, prep: _Prepared, where: str, d: Dist) -> list[list[float]]:
        """score_prepared, with one note per task split (not a warning per evaluation) when prompts were cut."""
        with count_cut_prompts() as cut:
            out = score_prepared(m, tok, prep, cfg, d, max_src)
        if d.world > 1:  # each process scored its share of the groups: the note counts them all
            counts = d.gather((cut.n, cut.total))
            cut.n, cut.total, cut.limit = sum(c[0] for c in counts), sum(c[1] for c in counts), max_src
        if cut.n and where not in noted:
            noted.add(where)
            advice = ("raise --max-source-length or use a template that truncates the passage (its `truncate:` "
                      "field)" if max_src < int(loaded.info.get("max_input_tokens") or max_src + 1)
                      else "use a template that truncates the passage (its `truncate:` field)")
            reporter.note(cut_prompts_note(where, cut, advice))
        return out

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        if val is None or not val.items:
            raise RSGError(f"{task}: no val split in {source}; the best state cannot be chosen", field="val")
        return val_metrics(task, val, scored(m, val, f"{task}/val", eval_dist))

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

    user = hooks or Hooks()

    def on_start(state, total, per_epoch):
        reporter.task_start(task, predicts, len(pairs), total, state.step or None)
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

    net.train()
    result = train(net, tok, pairs, cfg, evaluate=evaluate, ckpt_dir=task_ckpt,
                   fingerprint={"model": model_name, "model_fingerprint": loaded.info.get("fingerprint"),
                                "template_sha256": tpl.sha256, "task": task, "code": CODE_VERSION},
                   device=dev, dist=dist, bf16=bf16, hooks=Hooks(on_step, on_eval, on_start, on_metrics), task=task,
                   sharding_mode=mode, cpu_offload=offload, files=model_files)
    best = result.best_dir or ck.find(task_ckpt, "best")
    if best is None:
        raise RSGError(f"{task}: training finished without a best checkpoint in {task_ckpt}", file=task_ckpt)
    if sharding.is_fsdp(net):
        # the trained model is sharded: predict with a whole copy per process, from the best checkpoint's full
        # weights (prediction then splits the items over the processes, as under ddp)
        del net, loaded
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        loaded = load(model_name, device=dev, dtype="fp32", revision=revision)
        net = loaded.model
    ck.load_weights(net, best / ck.WEIGHTS)
    if lora_rank:  # the adapter merged into the weights: prediction runs at the base model's speed
        net = net.merge_and_unload()
    net.eval()
    best_meta = ck.read_meta(best)
    for t in predicts:
        for split in SPLITS:
            items = load_items(source, t, split) if source.has(t, split) else []
            if not items:
                continue
            prep = _prepare(items, tpl, tok, max_src)  # LiDiRus: the TERRa template, as the model was trained
            with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else _null()):
                scores = scored(net, prep, f"{t}/{split}", dist)
            preds = decide(items, scores)
            if dist.main:
                rows = [runs.log_row(it, preds[it.key], prompt=p, choices=c, scores=s)
                        for it, p, c, s in zip(items, prep.prompts, prep.choices, scores)]
                folder.write_task(t, split, items, preds, rows, fp, parts=fp_parts,
                                  extra={"trained_on": task, "best_step": best_meta.get("step"),
                                         "best_epoch": best_meta.get("epoch"),
                                         "best_val": best_meta.get("metrics"), "checkpoint": str(best)})
    dist.barrier()
    reporter.task_done(task, {"best_step": result.state.best_step, "best_epoch": result.state.best_epoch,
                              "best_metrics": result.state.best_metrics, "stopped": result.state.stopped})
    del net, loaded  # the next task loads fresh base weights; free this model's memory first
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result, list(result.state.history)


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


def _run_config(model, revision, names, units, templates, configs: ConfigSet, source, dist: Dist,
                ckpt_root: Path, mode: str = "none") -> dict[str, Any]:
    return {
        "kind": "finetune",
        "model": model,
        "revision": revision,
        "template": {t: templates[tt].name for tt, ps in units for t in ps},
        "template_sha256": {t: templates[tt].sha256 for tt, ps in units for t in ps},
        "versions": _versions(),
        "seed": configs.for_task(units[0][0]).seed if units else 0,
        "split": "all",
        "tasks": list(names),
        "data": str(source),
        "trained_on": {t: tt for tt, ps in units for t in ps},
        "hyperparameters": {tt: configs.for_task(tt).to_dict() for tt, _ in units},
        "world_size": dist.world,
        "sharding": mode,
        "checkpoint_dir": str(ckpt_root),
        "code_version": CODE_VERSION,
        "command": " ".join(sys.argv),
    }
