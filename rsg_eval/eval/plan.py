"""Planning a zero-shot run (`rsg_eval.eval.zeroshot`): its options, the jobs (one per task split, with everything
its fingerprint depends on), the settings a run folder records for `RunFolder.claim`, the folder's name and its
config.json. Nothing here loads a model: every user error surfaces before minutes go into loading one.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rsg_eval import __version__
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import sha256_file
from rsg_eval.runs import RunFolder, ZipResult, fingerprint, run_path
from rsg_eval.runs.provenance import data_identity, git_commit, versions as _versions

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


def validate_options(opts: ZeroShotOptions) -> None:
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

    validate_options(opts)
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


def run_folder_of(opts: ZeroShotOptions) -> RunFolder:
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

def write_config(run: RunFolder, opts: ZeroShotOptions, src: Any, jobs: list[Job], info: dict | None) -> dict:
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

