"""The zero-shot runner behind `rsg zeroshot`: prompt templates + rank classification, into a run folder.

For every task and split: load the items (`--limit` keeps whole groups), render each with the task's template
(shortening only the passage to the model's input length), score every answer choice by its log-likelihood
(`rsg_eval.scoring.score_choices`: encoder once per prompt), take the argmax into `Item.labels`, and write the
task's predictions, per-item logs and state atomically (`rsg_eval.runs`). A task whose state holds the same
fingerprint (model id + revision or local-dir hash, dtype, template sha256, prefix, code version, normalisation,
calibration, limit, data file sha256, and with --num-fewshot K > 0: K, its seed, the train file's sha256) is
skipped, and the model is loaded only when some task is still to do, so rerunning an interrupted command resumes
it and rerunning a finished one costs seconds. At the end: metrics.json (val) and the leaderboard zip (test).

Few-shot (`num_fewshot` K): each item's prompt starts with K solved train examples (`rsg_eval.core.fewshot`: drawn per
task and item key, so the same whatever the batch size, --limit, task order or process count), dropped from the
last one when the input is too long, before the item's passage is shortened (`prompts.render_fewshot`).

Work is done in shards of `shard_size` items, cut from the items alone; each finished shard is saved under
state/shards/ at once, so an interrupted task resumes from its last shard. Under `accelerate launch` or `torchrun`
the shards are shared out among the processes and gathered on the main process, which alone writes the run
folder: the files are byte for byte those of one process (same shards, same batches, same floats).

One configuration per run folder (`rsg_eval.runs.RunFolder.claim`): before anything is loaded, every template is
rendered on one item of each split (a broken template creates nothing), then the folder is locked and its
recorded settings compared with this command's (`run_settings`): a difference is refused (exit 2) unless
`restart`. A finished task split whose files no longer match its state is redone, with a line saying why.

Several templates per task (`templates`, or `calibrate="both"`): a job carries its variants and the hooks in
`_score_job`, `_job_problem`, `write_ready` and the final `promote`/`finish_metrics` hand them to
`rsg_eval.eval.multiprompt` (one pass over all templates; per-template results under templates/<Task>/<name>/;
the template `select` picks is promoted to the folder's own files); shards, resume and processes are unchanged.

API::

    ZeroShotOptions(model, data=None, tasks=None, split="val", template=None, batch_size=16, limit=None,
                    run=None, root="submissions", normalize="sum", calibrate=False, device=None, dtype=None,
                    revision=None, prefix=None, seed=0, num_fewshot=0, fewshot_seed=None, shard_size=256,
                    restart=False, templates=None, select="default")     calibrate: False | True | "both"
    plan_jobs(opts, ident=None, *, draw=True) -> (DataSource, list[Job])   validates everything without a model
    attach_shots(opts, src, jobs)                       draws the few-shot examples of jobs planned with draw=False
    run_zeroshot(opts, *, console=None, show_progress=True, loaded=None) -> ZeroShotResult
    parse_batch_size("16" | "auto") -> int | "auto"
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rsg_eval import __version__
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import sha256_file
from rsg_eval.runs import RunFolder, ZipResult, fingerprint, log_row, run_path
from rsg_eval.runs.provenance import data_identity, git_commit, versions as _versions  # noqa: F401 (re-exported)

# Bump the suffix when rendering or scoring changes in a way that changes results: old task states then no longer
# match and a resumed run redoes them.
CODE_VERSION = f"{__version__}+zs1"
SPLIT_CHOICES = ("val", "test", "all")
NORMALIZE_CHOICES = ("sum", "token", "byte")
KIND = "zeroshot"


@dataclass
class ZeroShotOptions:
    """Everything `rsg zeroshot` takes (see the CLI help for each)."""

    model: str
    data: str | None = None
    tasks: Sequence[str] | None = None
    split: str = "val"
    template: str | None = None
    batch_size: int | str = 16
    limit: int | None = None
    run: str | None = None
    root: str | Path = "submissions"
    normalize: str = "sum"
    calibrate: bool = False
    device: str | None = None
    dtype: str | None = None
    revision: str | None = None
    prefix: str | None = None
    seed: int = 0
    num_fewshot: int = 0              # solved train examples before each item (rsg_eval.core.fewshot)
    fewshot_seed: int | None = None   # default: seed
    shard_size: int = 256             # items per shard: the unit shared out among processes and saved for resume
    device_map: str | None = None     # "auto": spread a model too big for one GPU over several (accelerate)
    restart: bool = False             # clear the run folder's results and start over
    templates: str | None = None      # several templates per task: "all" | "a,b" | "tag:VALUE" (eval.multiprompt)
    select: str = "default"           # which template's results go to metrics.json and the zip: default | best-val


@dataclass
class Job:
    """One (task, split) to evaluate, with everything its fingerprint depends on."""

    task: str
    split: str
    template: Any                     # rsg_eval.core.prompts.Template
    items: list                       # rsg_eval.core.tasks.Item, already limited
    parts: dict
    fingerprint: str
    shots: dict | None = None         # item.key -> [train Item] (few-shot examples; None when K = 0 or not drawn)
    shot_texts: dict = field(default_factory=dict, repr=False)   # shot key -> rendered text (cache)
    variants: list | None = None      # multi-template runs: eval.multiprompt.Variant per template scored


@dataclass
class TaskOutcome:
    task: str
    split: str
    status: str                       # "done" | "skipped"
    n_items: int
    seconds: float = 0.0
    n_truncated: int = 0


@dataclass
class ZeroShotResult:
    run: RunFolder
    outcomes: list[TaskOutcome] = field(default_factory=list)
    metrics: dict | None = None
    zip: ZipResult | None = None
    interrupted: bool = False
    terminated: bool = False          # the interruption was SIGTERM (exit 143), not Ctrl-C (130)
    main: bool = True                 # False on the other processes of a multi-process run (they write nothing)


# --------------------------------------------------------------------------------------------------- planning

def parse_batch_size(value: Any) -> int | str:
    """"auto" or a positive int (from the CLI's text)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise RSGError(f"bad batch size {value!r}", field="--batch-size", expected="a positive integer or 'auto'")


def splits_of(split: str) -> list[str]:
    if split not in SPLIT_CHOICES:
        raise RSGError(f"unknown split {split!r}", field="--split", expected=SPLIT_CHOICES)
    return ["val", "test"] if split == "all" else [split]


def _check_options(opts: ZeroShotOptions) -> None:
    splits_of(opts.split)
    if opts.normalize not in NORMALIZE_CHOICES:
        raise RSGError(f"unknown normalisation {opts.normalize!r}", field="--normalize", expected=NORMALIZE_CHOICES)
    opts.batch_size = parse_batch_size(opts.batch_size)
    if opts.limit is not None and opts.limit < 1:
        raise RSGError(f"--limit must be at least 1, got {opts.limit}", field="--limit")
    if opts.num_fewshot is None or opts.num_fewshot < 0:
        raise RSGError(f"--num-fewshot must be 0 or more, got {opts.num_fewshot}", field="--num-fewshot")
    if opts.shard_size < 1:
        raise RSGError(f"--shard-size must be at least 1, got {opts.shard_size}", field="--shard-size")
    from rsg_eval.eval.multiprompt import check_options

    check_options(opts)


def model_identity(opts: ZeroShotOptions) -> dict:
    """What identifies the model's weights before loading it: the name and revision, or a local dir's hash."""
    from rsg_eval.models.loading import TINY_NAME, _dir_fingerprint, resolve_device, resolve_dtype

    dev = resolve_device(opts.device)
    ident: dict[str, Any] = {"model": opts.model, "revision": opts.revision,
                             "dtype": str(resolve_dtype(opts.dtype, dev)).removeprefix("torch.")}
    path = Path(opts.model).expanduser()
    if opts.model != TINY_NAME and path.is_dir():
        ident["model_dir"] = _dir_fingerprint(path)
    return ident


def fewshot_seed(opts: ZeroShotOptions) -> int:
    return opts.seed if opts.fewshot_seed is None else opts.fewshot_seed


def plan_jobs(opts: ZeroShotOptions, ident: dict | None = None, *, draw: bool = True) -> tuple[Any, list[Job]]:
    """Validate the options, data and templates and build the job list; loads no model.

    Every user error (unknown task or split, missing data file, broken template, bad item) surfaces here,
    before minutes go into loading a model. `draw=False` leaves the few-shot draw to `attach_shots` (the runner
    draws only for the task splits still to do).
    """
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.fewshot import pool_path
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.tasks import limit_groups, resolve_tasks
    from rsg_eval.core.data import load_items

    _check_options(opts)
    tasks = resolve_tasks(list(opts.tasks) if opts.tasks else None)
    src = resolve_data(opts.data)
    ident = ident if ident is not None else model_identity(opts)
    from rsg_eval.eval import multiprompt

    multi = multiprompt.multi_mode(opts)
    loaded_templates: dict = {}  # {task: its selected templates}, parsed once for both splits
    if multi:
        multiprompt.check_names(opts.templates, tasks)
    jobs: list[Job] = []
    for task in tasks:
        tpl = load_template(task, opts.template)
        # Few-shot settings join the fingerprint only when used, so zero-shot run folders keep resuming.
        fewshot = {} if not opts.num_fewshot else {
            "num_fewshot": opts.num_fewshot, "fewshot_seed": fewshot_seed(opts),
            "fewshot_data_sha256": sha256_file(pool_path(src, task))}
        for split in splits_of(opts.split):
            path = src.path(task, split)
            items = limit_groups(load_items(src, task, split), opts.limit)
            parts = {
                **ident, "task": task, "split": split, "template": tpl.name, "template_sha256": tpl.sha256,
                "prefix": opts.prefix, "code_version": CODE_VERSION, "normalize": opts.normalize,
                "calibrate": opts.calibrate, "limit": opts.limit, "data_sha256": sha256_file(path), **fewshot,
            }
            if multi:  # one job per task split, scoring every selected template (rsg_eval.eval.multiprompt)
                base = {k: v for k, v in parts.items() if k not in ("template", "template_sha256", "calibrate")}
                variants = multiprompt.plan_variants(opts, task, split, base, loaded_templates)
                parts = multiprompt.job_parts(base, variants, opts.select)
                jobs.append(Job(task, split, variants[0].template, items, parts, fingerprint(parts),
                                variants=variants))
            else:
                jobs.append(Job(task, split, tpl, items, parts, fingerprint(parts)))
            check_renders(jobs[-1], opts)
    if draw:
        attach_shots(opts, src, jobs)
    return src, jobs


def attach_shots(opts: ZeroShotOptions, src: Any, jobs: Sequence[Job]) -> None:
    """Draw each item's few-shot examples (rsg_eval.core.fewshot: seeded per task and item key, so the draw is the
    same whatever the batch size, process count, --limit or task order). No-op for K = 0."""
    if not opts.num_fewshot:
        return
    from rsg_eval.core.fewshot import draw_shots, load_pool

    pools: dict[str, Any] = {}
    for job in jobs:
        if job.shots is not None:
            continue
        if job.task not in pools:
            pools[job.task] = load_pool(src, job.task)
        pool, seed = pools[job.task], fewshot_seed(opts)
        job.shots = {it.key: draw_shots(pool, it, opts.num_fewshot, seed) for it in job.items}


def check_renders(job: Job, opts: ZeroShotOptions) -> None:
    """Render the job's template (and its content-free input under --calibrate) on the split's first item with
    answer choices, so a template that fails (sandbox, undefined variable, empty choice) fails before the model
    loads and before any file is written."""
    first = next((it for it in job.items if it.labels), None)
    if first is None:
        return
    for tpl, cal in ([(v.template, v.calibrate) for v in job.variants] if job.variants is not None
                     else [(job.template, opts.calibrate)]):
        tpl.render(first, prefix=opts.prefix)
        if cal:
            tpl.render_content_free(first, prefix=opts.prefix)


def run_settings(opts: ZeroShotOptions, src: Any, jobs: list[Job]) -> tuple[dict, dict]:
    """(run-level settings, {(task, split): per-task settings}) for `RunFolder.claim`: everything the results
    depend on (model identity, dtype, template, prefix, normalisation, calibration, limit, code version, data);
    not the task list, split, batch size or device."""
    keep = ("model", "revision", "dtype", "model_dir", "prefix", "code_version", "normalize", "calibrate", "limit")
    first = jobs[0].parts if jobs else {}
    settings = {k: first.get(k) for k in keep}
    settings.update(template=opts.template or "default", data=data_identity(src))
    if opts.num_fewshot:  # only then: zero-shot folders keep their recorded settings
        settings.update(num_fewshot=opts.num_fewshot, fewshot_seed=fewshot_seed(opts))
    per_task = {(j.task, j.split): {"template": j.template.name, "template_sha256": j.template.sha256,
                                     "data_sha256": j.parts["data_sha256"],
                                     **({"fewshot_data_sha256": j.parts["fewshot_data_sha256"]}
                                        if "fewshot_data_sha256" in j.parts else {})} for j in jobs}
    if any(j.variants is not None for j in jobs):  # the template set and the selection rule are settings too
        settings.update(templates=opts.templates or "default", select=opts.select)
        for j in jobs:
            entry = per_task[(j.task, j.split)]
            del entry["template"], entry["template_sha256"]
            entry["templates"] = {v.name: v.template.sha256 for v in j.variants}
    return settings, per_task


def _run_folder(opts: ZeroShotOptions) -> RunFolder:
    """The run folder object (not created yet: nothing is written before the model has loaded)."""
    tags = []
    if opts.template:
        tags.append(Path(opts.template).stem)
    if opts.templates is not None:
        spec = opts.templates.strip()
        tags.append("all-templates" if spec == "all" else f"{spec[4:]}-templates" if spec.startswith("tag:")
                    else f"{len([w for w in spec.split(',') if w.strip()])}-templates")
    if opts.select != "default":
        tags.append(opts.select)
    if opts.normalize != "sum":
        tags.append(opts.normalize)
    if opts.calibrate:
        tags.append("cal-both" if opts.calibrate == "both" else "cal")
    if opts.limit:
        tags.append(f"limit{opts.limit}")
    if opts.num_fewshot:
        tags.append(f"{opts.num_fewshot}shot")
    return RunFolder(run_path(opts.run, model=opts.model, kind=KIND, tags=tags, root=opts.root))


# --------------------------------------------------------------------------------------------------- config

def _write_config(run: RunFolder, opts: ZeroShotOptions, src: Any, jobs: list[Job], info: dict | None) -> dict:
    """Merge this invocation into config.json (a resumed run adds tasks; earlier ones stay recorded)."""
    from rsg_eval.core.tasks import TASK_NAMES

    old = run.read_config() or {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tasks = set(old.get("tasks", [])) | {j.task for j in jobs}
    splits = set(old.get("splits", [])) | {j.split for j in jobs}
    model_info = dict(old.get("model_info") or {})
    if info:
        model_info = {k: info.get(k) for k in ("source", "kind", "model_type", "dtype", "device", "device_map",
                                                 "parameters", "max_input_tokens", "fingerprint", "commit_hash",
                                                 "tie_word_embeddings", "tokenizer_appends_eos")}
    cfg = {
        **old,
        "kind": KIND, "model": opts.model, "revision": opts.revision,
        "commit_hash": model_info.get("commit_hash"),
        "template": (opts.template or "default") if not any(j.variants is not None for j in jobs) else
        f"templates {opts.templates or 'default'} (select {opts.select})",
        "templates": {**old.get("templates", {}), **{j.task: j.template.name for j in jobs}},
        "template_sha256": {**old.get("template_sha256", {}), **{j.task: j.template.sha256 for j in jobs}},
        **({"template_set": opts.templates or "default", "select": opts.select,
            "variants": {**old.get("variants", {}), **{j.task: [v.name for v in j.variants] for j in jobs}},
            "variant_sha256": {**old.get("variant_sha256", {}),
                               **{j.task: {v.name: v.template.sha256 for v in j.variants} for j in jobs}}}
           if any(j.variants is not None for j in jobs) else {}),
        "prefix": opts.prefix, "normalize": opts.normalize, "calibrate": opts.calibrate, "limit": opts.limit,
        "num_fewshot": opts.num_fewshot, "fewshot_seed": fewshot_seed(opts),
        "batch_size": opts.batch_size, "device": opts.device or "auto", "dtype": opts.dtype or "auto",
        "seed": opts.seed, "split": "all" if splits >= {"val", "test"} else sorted(splits)[0],
        "splits": sorted(splits), "tasks": [t for t in TASK_NAMES if t in tasks], "data": str(src),
        "versions": _versions(), "code_version": CODE_VERSION, "git_commit": git_commit(),
        "model_info": model_info, "created": old.get("created", now), "updated": now,
    }
    run.write_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------- running

# How long a process that has finished its shards waits for the others at the final gather (torch's default, 30
# minutes for gloo and 10 for NCCL, is shorter than one slow shard of a 13B model can take).
DIST_TIMEOUT_S = 12 * 3600
LEAVE_TIMEOUT_S = 600  # the final wait for the main process to finish writing (gloo; NCCL waits DIST_TIMEOUT_S)
SHARD_DIR = Path("state") / "shards"


def _score_job(job: Job, loaded: Any, opts: ZeroShotOptions, advance: Any) -> tuple[dict, list[dict], int]:
    """Render, score and pick `job.items` (a whole task split or one shard of it): (preds by key, log rows,
    number of prompts whose passage was shortened). With few-shot examples each row also lists the keys of the
    train examples its prompt kept (`shots`)."""
    if job.variants is not None:  # several templates in one pass (rsg_eval.eval.multiprompt)
        from rsg_eval.eval.multiprompt import score_variants

        return score_variants(job, loaded, opts, advance)
    from rsg_eval.core.fewshot import gold_label, shot_id
    from rsg_eval.core.prompts import render_fewshot, render_fewshot_content_free, render_shot
    from rsg_eval.scoring import predict, score_choices

    tok, max_tokens = loaded.tokenizer, loaded.info.get("max_input_tokens")
    tpl = job.template
    scored = [it for it in job.items if it.labels]  # a RuCoS passage without entities has nothing to rank
    # The templates' prefix (FRED-T5's "<LM>") means nothing to a decoder-only model: none unless asked for.
    prefix = "" if opts.prefix is None and loaded.info.get("kind") == "causal" else opts.prefix
    rendered, kept, cal = [], {}, ([] if opts.calibrate else None)
    for it in scored:
        drawn = (job.shots or {}).get(it.key, [])
        texts = []
        for shot in drawn:  # one train example serves many items: render it once
            if shot.key not in job.shot_texts:
                job.shot_texts[shot.key] = render_shot(tpl, shot, gold_label(shot))
            texts.append(job.shot_texts[shot.key])
        r, n = render_fewshot(tpl, it, texts, tokenizer=tok, max_tokens=max_tokens, prefix=prefix)
        rendered.append(r)
        kept[it.key] = [shot_id(s) for s in drawn[:n]]
        if cal is not None:
            cal.append(render_fewshot_content_free(tpl, it, texts[:n], prefix=prefix))
    scores = score_choices(loaded.model, tok, [r.prompt for r in rendered], [r.choices for r in rendered],
                           batch_size=opts.batch_size, normalize=opts.normalize, calibrate=opts.calibrate,
                           calibration_prompts=cal, max_input_tokens=max_tokens, progress=advance)
    best = predict(scores)
    preds: dict = {}
    rows: list[dict] = []
    by_key = {it.key: (r, s, b) for it, r, s, b in zip(scored, rendered, scores, best)}
    for it in job.items:
        if it.key in by_key:
            r, s, b = by_key[it.key]
            preds[it.key] = it.labels[b]
            rows.append(log_row(it, preds[it.key], prompt=r.prompt, choices=r.choices, scores=s))
        else:
            preds[it.key] = ""
            rows.append(log_row(it, "", prompt=None, choices=[], scores=[]))
        if job.shots is not None:
            rows[-1]["shots"] = kept.get(it.key, [])
    return preds, rows, sum(r.truncated for r in rendered)


# -- shards: the unit of work. A pending task split is cut into runs of `shard_size` items; the cut depends on
# nothing but the items and the size, so the same shards (and the same batches inside them, hence the same
# floats) come out of 1 process or 8, and a shard scored by an interrupted run of any width is reused by the next.

@dataclass
class _Shard:
    key: str           # the input's fingerprint: job parts without the split, plus the shard size
    task: str
    index: int
    start: int
    end: int
    job: Job           # the first pending job with this input (LiDiRus val and test share one input)
    cost: float        # rough work estimate for sharing shards out among processes

    @property
    def id(self) -> tuple[str, int]:
        return self.key, self.index

    @property
    def file_name(self) -> str:
        return f"{self.task}-{self.key[:16]}-{self.index:05d}.json"

    def keys(self) -> list:
        return [it.key for it in self.job.items[self.start:self.end]]


def _input_key(job: Job, opts: ZeroShotOptions) -> str:
    return fingerprint({**{k: v for k, v in job.parts.items() if k != "split"}, "shard_size": opts.shard_size})


def _item_cost(item: Any) -> float:
    """Characters the encoder reads plus a share per answer choice the decoder scores."""
    chars = sum(len(v) for v in item.fields.values() if isinstance(v, str))
    return chars + 64 * len(item.labels)


def _plan_shards(pending: Sequence[Job], opts: ZeroShotOptions) -> tuple[list[_Shard], dict[str, list[Job]]]:
    """Shards of the pending jobs (one set per distinct input), in job order, and the jobs of each input."""
    shards: list[_Shard] = []
    jobs_of: dict[str, list[Job]] = {}
    for job in pending:
        key = _input_key(job, opts)
        if key in jobs_of:
            jobs_of[key].append(job)
            continue
        jobs_of[key] = [job]
        for i, start in enumerate(range(0, len(job.items), opts.shard_size)):
            end = min(start + opts.shard_size, len(job.items))
            shards.append(_Shard(key, job.task, i, start, end, job,
                                 sum(_item_cost(it) for it in job.items[start:end])))
    return shards, jobs_of


def _assign(shards: Sequence[_Shard], world: int) -> list[list[_Shard]]:
    """Share shards out among `world` processes: each next shard to the least loaded one (ties: lowest rank).
    Who scores a shard never changes what it holds, so this only balances time."""
    loads = [0.0] * world
    out: list[list[_Shard]] = [[] for _ in range(world)]
    for sh in shards:
        r = min(range(world), key=lambda i: (loads[i], i))
        loads[r] += sh.cost
        out[r].append(sh)
    return out


def _shard_path(run: RunFolder, sh: _Shard) -> Path:
    return run.path / SHARD_DIR / sh.file_name


def _read_shard(run: RunFolder, sh: _Shard) -> dict | None:
    """A finished shard's result from disk, or None when absent or not exactly this shard (then it is redone)."""
    from rsg_eval.core.io import read_json

    path = _shard_path(run, sh)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except RSGError:  # damaged or crafted (not JSON, too deep, ...): redone
        return None
    keys = sh.keys()
    rows = data.get("rows") if isinstance(data, dict) else None
    if (not isinstance(rows, list) or data.get("key") != sh.key or data.get("index") != sh.index
            or data.get("keys") != keys or [r.get("key") if isinstance(r, dict) else None for r in rows] != keys):
        return None
    return data


def _write_shard(run: RunFolder, sh: _Shard, result: dict) -> None:
    from rsg_eval.core.io import atomic_write_json

    path = _shard_path(run, sh)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result, indent=None)


def _remove_stale_shards(run: RunFolder, shards: Sequence[_Shard], tasks: set[str]) -> None:
    """Shard files of these tasks that no pending shard will read (other settings, or left by a run killed
    between writing a task and removing its shards) can never be used again: remove them."""
    folder = run.path / SHARD_DIR
    if not folder.is_dir():
        return
    live = {sh.file_name for sh in shards}
    for f in folder.glob("*.json"):
        if f.name.split("-", 1)[0] in tasks and f.name not in live:
            f.unlink(missing_ok=True)


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, RSGError) else f"{type(exc).__name__}: {exc}"


def _on_main(dist: Any, fn: Any) -> Any:
    """Run `fn` on the main process only and hand its result to every process; when it fails there, every
    process raises (none is left waiting for a message that never comes)."""
    from rsg_eval.engine.collective import main_acts

    return main_acts(dist, fn)


def _agree(dist: Any, exc: BaseException | None) -> None:
    """Every process reports whether its step worked; if one failed, all stop."""
    if dist.active:
        msgs = dist.gather(None if exc is None else _describe(exc))
        if exc is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                raise RSGError(f"process {bad[0][0]} of {dist.world} failed: {bad[0][1]}")
    if exc is not None:
        raise exc


def _gather_to_main(dist: Any, obj: Any) -> list[Any] | None:
    """Every process's object on the main process (in rank order); None elsewhere."""
    from rsg_eval.engine.collective import gather_to_main

    return gather_to_main(obj, dist)


def _setup_main(opts: ZeroShotOptions, src: Any, jobs: Sequence[Job], held: dict) -> tuple:
    """Main process only, before any model loads: claim the run folder (lock + one-configuration check; kept in
    `held` until run_zeroshot releases it), find the task splits still to do and the shards of them that an
    earlier (possibly wider or narrower) run already finished. -> (path, pending job indices, found shard ids,
    lines to print)."""
    run = _run_folder(opts)
    settings, per_task = run_settings(opts, src, jobs)
    held["claim"] = run.claim(KIND, settings, per_task=per_task, restart=opts.restart, main=True)
    held["run"] = run
    notes = [f"[yellow]--restart: cleared the results in {run.path}[/]"] if held["claim"].restarted else []
    pending = []
    for i, j in enumerate(jobs):
        why = _job_problem(run, j)
        if why is None:
            continue
        if why != "not finished":
            notes.append(f"[yellow]{j.task}/{j.split}: {why}; redoing it[/]")
        pending.append(i)
    shards, _ = _plan_shards([jobs[i] for i in pending], opts)
    if run.path.is_dir():
        _remove_stale_shards(run, shards, {j.task for j in jobs})
    found = [sh.id for sh in shards if _read_shard(run, sh) is not None]
    return str(run.path), pending, found, notes


def _job_problem(run: RunFolder, job: Job) -> str | None:
    """Why the job's results cannot be reused (None: finished, current, intact): the run folder's own task split,
    or in a multi-template run every template's under templates/ (rsg_eval.eval.multiprompt)."""
    if job.variants is not None:
        from rsg_eval.eval.multiprompt import job_problem

        return job_problem(run, job)
    return run.task_problem(job.task, job.split, job.fingerprint)


def _device_for(opts: ZeroShotOptions, dist: Any) -> str | None:
    """Under a launcher each process scores on its own GPU (cuda:LOCAL_RANK); an explicit --device cuda:N would put
    every process on GPU N and is refused (rsg_eval.engine.runtime.resolve_device, as in fine-tuning)."""
    if not dist.active:
        return opts.device
    if opts.device_map is not None:  # one model over several GPUs in one process: no room for a process per GPU
        raise RSGError(f"--device-map {opts.device_map} spreads one model over the GPUs of one process; under "
                       "torchrun/accelerate each process holds a whole model: run it in one process", field="--device-map",
                       expected="--device-map in a single process, or several processes without it")
    from rsg_eval.engine.runtime import resolve_device

    return str(resolve_device(opts.device, dist))


def run_zeroshot(opts: ZeroShotOptions, *, console: Any = None, show_progress: bool = True,
                 loaded: Any = None) -> ZeroShotResult:
    """Evaluate, resume-aware; see the module docstring. `loaded` (a models.loading.Loaded) skips loading.

    Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) every process plans the same jobs and shards, scores
    its share of the shards and saves each under state/shards/; the main process alone claims the run folder
    (lock + one-configuration check), writes config, task results, metrics and zip, and gathers the others'
    shards: it writes exactly what one process writes.
    """
    from rich.console import Console

    from rsg_eval.engine.runtime import init_from_env

    dist = init_from_env(timeout_s=DIST_TIMEOUT_S)
    _device_for(opts, dist)  # a device no process may take is refused by all of them alike, before any work
    console = console or Console(stderr=True)
    if not dist.main:  # one voice: the other processes only score
        console, show_progress = Console(stderr=True, quiet=True), False
    src, jobs = plan_jobs(opts, draw=False)  # the same on every process (deterministic)
    held: dict = {}  # main process: the claimed RunFolder and its claim
    interrupted = False
    try:
        path, pending_idx, found_ids, notes = _on_main(dist, lambda: _setup_main(opts, src, jobs, held))
        for note in notes:
            console.print(note, soft_wrap=True)
        run = held["run"] if dist.main else RunFolder(path)
        result = _run_claimed(opts, run, src, jobs, pending_idx, found_ids, dist, console, show_progress, loaded)
        interrupted = result.interrupted
        return result
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if "claim" in held:
            held["claim"].release()
        if not interrupted:  # (Ctrl-C reaches every process; none would come to the barrier in time)
            _leave_together(dist)


def _leave_together(dist: Any) -> None:
    """Every process waits here until the main one is done writing: under torchrun a process that exits with an
    error first gets the others killed, perhaps while the main one still writes the finished tasks' results."""
    from rsg_eval.engine.collective import leave_together

    leave_together(dist, LEAVE_TIMEOUT_S)  # bounded under gloo: a process that is gone is not waited for


def shutdown_distributed() -> None:
    """End of a `rsg zeroshot` process: leave the process group cleanly (a process that exits with it still up
    can abort in gloo's teardown while another is still running). A no-op in a single process."""
    from rsg_eval.engine.collective import leave

    leave()


def _run_claimed(opts: ZeroShotOptions, run: RunFolder, src: Any, jobs: list[Job], pending_idx: list[int],
                 found_ids: list, dist: Any, console: Any, show_progress: bool, loaded: Any) -> ZeroShotResult:
    """run_zeroshot's work once the main process has claimed the run folder (locked, settings checked)."""
    import dataclasses

    import torch
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from rsg_eval.scoring import CutPrompts, count_cut_prompts, cut_prompts_note

    result = ZeroShotResult(run, main=dist.main)
    pending = [jobs[i] for i in pending_idx]
    pending_set = set(pending_idx)
    for i, j in enumerate(jobs):
        if i not in pending_set:
            result.outcomes.append(TaskOutcome(j.task, j.split, "skipped", len(j.items)))
            console.print(f"[dim]{j.task}/{j.split}: already finished with the same settings, skipped[/]")
    shards, jobs_of = _plan_shards(pending, opts)
    found = set(map(tuple, found_ids))
    todo = [sh for sh in shards if sh.id not in found]
    if found:
        console.print(f"[dim]{len(found)} of {len(shards)} shards already scored by an earlier run, reused[/]")
    attach_shots(opts, src, [sh.job for sh in todo])  # a bad train file fails here, before the model loads
    if todo and loaded is None:
        # Load before writing anything: a model that does not load leaves no half-made run folder behind.
        from rsg_eval.models.loading import load_model

        console.print(f"loading model [bold]{opts.model}[/] ...")
        err = None
        try:
            loaded = load_model(opts.model, device=_device_for(opts, dist), dtype=opts.dtype,
                                revision=opts.revision, causal_ok=True,
                                device_map=opts.device_map)
        except Exception as exc:  # every process must hear of it, or the others wait for this one forever
            err = exc
        _agree(dist, err)
    info = loaded.info if loaded is not None else {}
    mine = _assign(todo, dist.world)[dist.rank]
    done: dict[tuple[str, int], dict] = {}     # shard id -> result (main: every shard it knows of)
    fresh: dict[tuple[str, int], dict] = {}    # shards this process scored in this call
    written: set[int] = set()                  # ids of pending jobs whose task results are written

    noted: set = set()

    def _note_cut(key: str, group: list, results: list[dict]) -> None:
        """Once per input (a task split; LiDiRus val and test share one): how many prompts lost their start."""
        cuts = [r["cut"] for r in results if r.get("cut") and r["cut"]["n"]]
        if key in noted or not cuts:
            return
        noted.add(key)
        cut = CutPrompts(sum(c["n"] for c in cuts), sum(c["total"] for c in cuts), cuts[0]["limit"])
        where = f"{group[0].task}/{'+'.join(j.split for j in group)}"
        advice = "use a template that shortens the passage to fit (its `truncate:` field, docs/zeroshot.md)" + (
            " or fewer --num-fewshot examples" if opts.num_fewshot else "")
        console.print(f"[yellow]note:[/] {cut_prompts_note(where, cut, advice)}", highlight=False, soft_wrap=True)

    def write_ready(bars: dict) -> None:
        """Main process: write every task split whose shards are all known (scored here or found on disk)."""
        for key, group in jobs_of.items():
            mine_of_key = [sh for sh in shards if sh.key == key]
            for sh in mine_of_key:
                if sh.id not in done:
                    got = _read_shard(run, sh)
                    if got is not None:
                        done[sh.id] = got
            if not all(sh.id in done for sh in mine_of_key):
                continue
            for job in group:
                if id(job) in written:
                    continue
                results = [done[sh.id] for sh in mine_of_key]
                rows = [row for r in results for row in r["rows"]]
                n_trunc = sum(r["n_truncated"] for r in results)
                secs = round(sum(r["seconds"] for r in results), 3)
                model = (results[0].get("model") if results else None) or {}  # what scored it (maybe earlier)
                extra = {"template": job.template.name, "n_truncated": n_trunc, "seconds": secs,
                         "model_fingerprint": model.get("fingerprint"), "dtype": model.get("dtype"),
                         "device": model.get("device")}
                if job.shots is not None or opts.num_fewshot:
                    extra["n_shots_dropped"] = sum(r.get("n_shots_dropped", 0) for r in results)
                if job.variants is not None:  # every template's results under templates/<Task>/<template>/
                    from rsg_eval.eval.multiprompt import write_variants

                    write_variants(run, job, rows, {k: v for k, v in extra.items() if k != "n_shots_dropped"})
                else:
                    preds = {it.key: row["pred"] for it, row in zip(job.items, rows)}
                    run.write_task(job.task, job.split, job.items, preds, rows, job.fingerprint, parts=job.parts,
                                   extra=extra)
                written.add(id(job))
                if id(job) in bars:
                    bars["progress"].update(bars[id(job)], completed=len(job.items))
                result.outcomes.append(TaskOutcome(job.task, job.split, "done", len(job.items), secs, n_trunc))
            _note_cut(key, group, [done[sh.id] for sh in mine_of_key])
            if all(id(j) in written for j in group):  # consumed: the task results hold it all now
                for sh in mine_of_key:
                    _shard_path(run, sh).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # only when empty: other tasks' shards may still be there
                    (run.path / SHARD_DIR).rmdir()

    try:
        torch.manual_seed(opts.seed)
        # elapsed, then the time left (rich's estimate from the recent rate: "-:--:--" until it has one)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
            bars: dict = {"progress": progress}
            for job in pending:
                bars[id(job)] = progress.add_task(f"{job.task}/{job.split}", total=len(job.items))
            error: BaseException | None = None
            try:
                if dist.main and (pending or run.read_config() is None):  # a rerun that only skips keeps it
                    _write_config(run, opts, src, jobs, loaded.info if loaded is not None else None)
                if dist.main:
                    write_ready(bars)  # task splits whose shards were all scored before
                for sh in mine:
                    t0 = time.perf_counter()

                    def advance(n: int, sh: _Shard = sh) -> None:
                        for job in jobs_of[sh.key]:
                            progress.advance(bars[id(job)], n)

                    part = dataclasses.replace(sh.job, items=sh.job.items[sh.start:sh.end])
                    with count_cut_prompts() as cut:  # one note per task split below, not a warning per shard
                        _, rows, n_trunc = _score_job(part, loaded, opts, advance)
                    res = {"key": sh.key, "task": sh.task, "index": sh.index, "start": sh.start, "end": sh.end,
                           "keys": sh.keys(), "rows": rows, "n_truncated": n_trunc,
                           "cut": {"n": cut.n, "total": cut.total, "limit": cut.limit},
                           "seconds": round(time.perf_counter() - t0, 3),
                           "model": {k: info.get(k) for k in ("fingerprint", "dtype", "device")}}
                    if part.shots is not None and part.variants is None:
                        res["n_shots_dropped"] = sum(len(part.shots.get(r["key"], [])) - len(r["shots"])
                                                     for r in rows if r["prompt"] is not None)
                    _write_shard(run, sh, res)  # saved for resume before anything else happens
                    done[sh.id] = fresh[sh.id] = res
                    if dist.main:
                        write_ready(bars)
            except Exception as exc:
                if not dist.active:
                    raise
                error = exc  # still join the gather below, so that no process waits for this one forever
            if dist.active:
                # The shards travel over the process group too: the run folder need not be on a shared disk.
                got = _gather_to_main(dist, (None if error is None else _describe(error),
                                             {} if dist.main else fresh))
                if dist.main:
                    for msg, results in got:
                        done.update(results)
                    bad = [(r, m) for r, (m, _) in enumerate(got) if m is not None]
                    if error is None and bad:
                        error = RSGError(f"process {bad[0][0]} of {dist.world} failed: {bad[0][1]}")
                    try:
                        write_ready(bars)
                    except Exception as exc:
                        error = error or exc
            if error is not None:
                raise error
    except KeyboardInterrupt as exc:
        result.interrupted = True
        result.terminated = type(exc).__name__ == "Terminated"  # errors.Terminated: SIGTERM
        console.print("[yellow]interrupted: finished tasks and shards are saved; rerun the same command to "
                      "resume[/]")
    finally:
        # Whatever happened, the metrics and zip reflect every task finished so far.
        multi = [j for j in jobs if j.variants is not None]
        if multi and dist.main and run.path.is_dir():  # the selected template's results to the folder's own
            from rsg_eval.eval.multiprompt import promote

            for note in promote(run, multi, opts):
                console.print(note, soft_wrap=True)
        if dist.main and run.path.is_dir() and run.finished("val"):
            result.metrics = run.write_metrics("val")
        if multi and dist.main and run.path.is_dir():
            from rsg_eval.eval.multiprompt import finish_metrics

            result.metrics = finish_metrics(run, jobs, opts, result.metrics)
        if dist.main and run.path.is_dir() and run.finished("test"):
            result.zip = run.build_zip()
        for split in ("val", "test"):
            for task, why in (run.ignored(split).items() if dist.main and run.path.is_dir() else ()):
                console.print(f"[yellow]{task}/{split}: {why}: left out of metrics.json and the zip[/]",
                              soft_wrap=True)
    return result
