"""The zero-shot runner behind `rsg zeroshot`: prompt templates + rank classification, into a run folder.

For every task and split: load the items (`--limit` keeps whole groups), render each with the task's template
(shortening only the passage to the model's input length), score every answer choice by its log-likelihood
(`rsg_eval.scoring.score_choices`: encoder once per prompt), take the argmax into `Item.labels`, and write the
task's predictions, per-item logs and state atomically (`rsg_eval.runs`). A task whose state holds the same
fingerprint (model id + revision or local-dir hash, dtype, template sha256, prefix, code version, normalisation,
calibration, limit, data file sha256) is skipped, and the model is loaded only when some task is still to do, so
rerunning an interrupted command resumes it and rerunning a finished one costs seconds. At the end: metrics.json
(val) and the leaderboard zip (test).

One configuration per run folder (`rsg_eval.runs.RunFolder.claim`): before anything is loaded, every template is
rendered on one item of each split (a broken template creates nothing), then the folder is locked and its
recorded settings compared with this command's (`run_settings`): a difference is refused (exit 2) unless
`restart`. A finished task split whose files no longer match its state is redone, with a line saying why.

API::

    ZeroShotOptions(model, data=None, tasks=None, split="val", template=None, batch_size=16, limit=None,
                    run=None, root="submissions", normalize="sum", calibrate=False, device=None, dtype=None,
                    revision=None, prefix=None, seed=0, restart=False)
    plan_jobs(opts) -> (DataSource, list[Job])          validates everything without loading a model
    run_zeroshot(opts, *, console=None, show_progress=True, loaded=None) -> ZeroShotResult
    parse_batch_size("16" | "auto") -> int | "auto"
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rsg_eval import __version__
from rsg_eval.errors import RSGError
from rsg_eval.runs import RunFolder, ZipResult, fingerprint, log_row, run_path

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
    restart: bool = False             # clear the run folder's results and start over


@dataclass
class Job:
    """One (task, split) to evaluate, with everything its fingerprint depends on."""

    task: str
    split: str
    template: Any                     # rsg_eval.prompts.Template
    items: list                       # rsg_eval.tasks.Item, already limited
    parts: dict
    fingerprint: str


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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def plan_jobs(opts: ZeroShotOptions, ident: dict | None = None) -> tuple[Any, list[Job]]:
    """Validate the options, data and templates and build the job list; loads no model.

    Every user error (unknown task or split, missing data file, broken template, bad item) surfaces here,
    before minutes go into loading a model.
    """
    from rsg_eval.data import resolve_data
    from rsg_eval.prompts import load_template
    from rsg_eval.tasks import limit_groups, load_items, resolve_tasks

    _check_options(opts)
    tasks = resolve_tasks(list(opts.tasks) if opts.tasks else None)
    src = resolve_data(opts.data)
    ident = ident if ident is not None else model_identity(opts)
    jobs: list[Job] = []
    for task in tasks:
        tpl = load_template(task, opts.template)
        for split in splits_of(opts.split):
            path = src.path(task, split)
            items = limit_groups(load_items(src, task, split), opts.limit)
            parts = {
                **ident, "task": task, "split": split, "template": tpl.name, "template_sha256": tpl.sha256,
                "prefix": opts.prefix, "code_version": CODE_VERSION, "normalize": opts.normalize,
                "calibrate": opts.calibrate, "limit": opts.limit, "data_sha256": _sha256_file(path),
            }
            jobs.append(Job(task, split, tpl, items, parts, fingerprint(parts)))
            check_renders(jobs[-1], opts)
    return src, jobs


def check_renders(job: Job, opts: ZeroShotOptions) -> None:
    """Render the job's template (and its content-free input under --calibrate) on the split's first item with
    answer choices, so a template that fails (sandbox, undefined variable, empty choice) fails before the model
    loads and before any file is written."""
    first = next((it for it in job.items if it.labels), None)
    if first is None:
        return
    job.template.render(first, prefix=opts.prefix)
    if opts.calibrate:
        job.template.render_content_free(first, prefix=opts.prefix)


def data_identity(src: Any) -> str:
    """The data a run reads, as a run-level setting: "sample", else the resolved folder or zip path."""
    origin = str(getattr(src, "origin", src))
    return origin if origin == "sample" else str(Path(origin).expanduser().resolve())


def run_settings(opts: ZeroShotOptions, src: Any, jobs: list[Job]) -> tuple[dict, dict]:
    """(run-level settings, {(task, split): per-task settings}) for `RunFolder.claim`: everything the results
    depend on (model identity, dtype, template, prefix, normalisation, calibration, limit, code version, data);
    not the task list, split, batch size or device."""
    keep = ("model", "revision", "dtype", "model_dir", "prefix", "code_version", "normalize", "calibrate", "limit")
    first = jobs[0].parts if jobs else {}
    settings = {k: first.get(k) for k in keep}
    settings.update(template=opts.template or "default", data=data_identity(src))
    per_task = {(j.task, j.split): {"template": j.template.name, "template_sha256": j.template.sha256,
                                     "data_sha256": j.parts["data_sha256"]} for j in jobs}
    return settings, per_task


def _run_folder(opts: ZeroShotOptions) -> RunFolder:
    """The run folder object (not created yet: nothing is written before the model has loaded)."""
    tags = []
    if opts.template:
        tags.append(Path(opts.template).stem)
    if opts.normalize != "sum":
        tags.append(opts.normalize)
    if opts.calibrate:
        tags.append("cal")
    if opts.limit:
        tags.append(f"limit{opts.limit}")
    return RunFolder(run_path(opts.run, model=opts.model, kind=KIND, tags=tags, root=opts.root))


# --------------------------------------------------------------------------------------------------- config

def _versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "rsg-eval": __version__}
    for pkg in ("torch", "transformers", "tokenizers", "jinja2"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """HEAD of the repository this package lives in, with "-dirty" when tracked files changed; None if no git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _write_config(run: RunFolder, opts: ZeroShotOptions, src: Any, jobs: list[Job], info: dict | None) -> dict:
    """Merge this invocation into config.json (a resumed run adds tasks; earlier ones stay recorded)."""
    from rsg_eval.tasks import TASK_NAMES

    old = run.read_config() or {}
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    tasks = set(old.get("tasks", [])) | {j.task for j in jobs}
    splits = set(old.get("splits", [])) | {j.split for j in jobs}
    model_info = dict(old.get("model_info") or {})
    if info:
        model_info = {k: info.get(k) for k in ("source", "model_type", "dtype", "device", "parameters",
                                                 "max_input_tokens", "fingerprint", "commit_hash",
                                                 "tie_word_embeddings", "tokenizer_appends_eos")}
    cfg = {
        **old,
        "kind": KIND, "model": opts.model, "revision": opts.revision,
        "commit_hash": model_info.get("commit_hash"),
        "template": opts.template or "default",
        "templates": {**old.get("templates", {}), **{j.task: j.template.name for j in jobs}},
        "template_sha256": {**old.get("template_sha256", {}), **{j.task: j.template.sha256 for j in jobs}},
        "prefix": opts.prefix, "normalize": opts.normalize, "calibrate": opts.calibrate, "limit": opts.limit,
        "batch_size": opts.batch_size, "device": opts.device or "auto", "dtype": opts.dtype or "auto",
        "seed": opts.seed, "split": "all" if splits >= {"val", "test"} else sorted(splits)[0],
        "splits": sorted(splits), "tasks": [t for t in TASK_NAMES if t in tasks], "data": str(src),
        "versions": _versions(), "code_version": CODE_VERSION, "git_commit": git_commit(),
        "model_info": model_info, "created": old.get("created", now), "updated": now,
    }
    run.write_config(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------- running

def _score_job(job: Job, loaded: Any, opts: ZeroShotOptions, advance: Any) -> tuple[dict, list[dict], int]:
    """Render, score and pick: (preds by key, log rows, number of truncated prompts)."""
    from rsg_eval.scoring import predict, score_choices

    tok, max_tokens = loaded.tokenizer, loaded.info.get("max_input_tokens")
    scored = [it for it in job.items if it.labels]  # a RuCoS passage without entities has nothing to rank
    rendered = [job.template.render(it, tokenizer=tok, max_tokens=max_tokens, prefix=opts.prefix) for it in scored]
    cal = [job.template.render_content_free(it, prefix=opts.prefix) for it in scored] if opts.calibrate else None
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
    return preds, rows, sum(r.truncated for r in rendered)


def run_zeroshot(opts: ZeroShotOptions, *, console: Any = None, show_progress: bool = True,
                 loaded: Any = None) -> ZeroShotResult:
    """Evaluate, resume-aware; see the module docstring. `loaded` (a models.loading.Loaded) skips loading."""
    from rich.console import Console

    console = console or Console(stderr=True)
    src, jobs = plan_jobs(opts)
    run = _run_folder(opts)
    settings, per_task = run_settings(opts, src, jobs)
    claim = run.claim(KIND, settings, per_task=per_task, restart=opts.restart)  # lock + one-configuration check
    try:
        if claim.restarted:
            console.print(f"[yellow]--restart: cleared the results in {run.path}[/]")
        return _run_claimed(opts, run, src, jobs, console, show_progress, loaded)
    finally:
        claim.release()


def _run_claimed(opts: ZeroShotOptions, run: RunFolder, src: Any, jobs: list[Job], console: Any,
                 show_progress: bool, loaded: Any) -> ZeroShotResult:
    """run_zeroshot's work once the run folder is claimed (locked, settings checked)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    result = ZeroShotResult(run)
    pending = []
    for j in jobs:
        why = run.task_problem(j.task, j.split, j.fingerprint)
        if why is None:
            result.outcomes.append(TaskOutcome(j.task, j.split, "skipped", len(j.items)))
            console.print(f"[dim]{j.task}/{j.split}: already finished with the same settings, skipped[/]")
            continue
        if why != "not finished":
            console.print(f"[yellow]{j.task}/{j.split}: {why}; redoing it[/]", soft_wrap=True)
        pending.append(j)
    if pending and loaded is None:
        # Load before writing anything: a model that does not load leaves no half-made run folder behind.
        from rsg_eval.models.loading import load_model

        console.print(f"loading model [bold]{opts.model}[/] ...")
        loaded = load_model(opts.model, device=opts.device, dtype=opts.dtype, revision=opts.revision)
    if pending or run.read_config() is None:  # a rerun that only skips leaves config.json as it was
        _write_config(run, opts, src, jobs, loaded.info if loaded is not None else None)
    try:
        if pending:
            torch.manual_seed(opts.seed)
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
                same_input: dict[str, tuple] = {}  # LiDiRus val and test read one file: score it once
                for job in pending:
                    bar = progress.add_task(f"{job.task}/{job.split}", total=len(job.items))
                    t0 = time.perf_counter()
                    key = fingerprint({k: v for k, v in job.parts.items() if k != "split"})
                    if key not in same_input:
                        same_input[key] = _score_job(job, loaded, opts, lambda n, bar=bar: progress.advance(bar, n))
                    preds, rows, n_trunc = same_input[key]
                    run.write_task(job.task, job.split, job.items, preds, rows, job.fingerprint, parts=job.parts,
                                   extra={"template": job.template.name, "n_truncated": n_trunc,
                                          "seconds": round(time.perf_counter() - t0, 3),
                                          "model_fingerprint": loaded.info.get("fingerprint"),
                                          "dtype": loaded.info.get("dtype"), "device": loaded.info.get("device")})
                    progress.update(bar, completed=len(job.items))
                    result.outcomes.append(TaskOutcome(job.task, job.split, "done", len(job.items),
                                                       time.perf_counter() - t0, n_trunc))
    except KeyboardInterrupt:
        result.interrupted = True
        console.print("[yellow]interrupted: finished tasks are saved; rerun the same command to resume[/]")
    finally:
        # Whatever happened, the metrics and zip reflect every task finished so far.
        if run.path.is_dir() and run.finished("val"):
            result.metrics = run.write_metrics("val")
        if run.path.is_dir() and run.finished("test"):
            result.zip = run.build_zip()
        for split in ("val", "test"):
            for task, why in (run.ignored(split).items() if run.path.is_dir() else ()):
                console.print(f"[yellow]{task}/{split}: {why}: left out of metrics.json and the zip[/]",
                              soft_wrap=True)
    return result


# --------------------------------------------------------------------------------------------------- nli head

def run_nli_head(**kwargs: Any) -> Any:
    """`--nli-head`: evaluate TERRa/RCB/LiDiRus with a hierarchical checkpoint's NLI head (the hierarchical part's
    `rsg_eval.hmtl.nli_eval.run_nli_head_eval`), when that module is installed."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("rsg_eval.hmtl.nli_eval") is None:
        raise RSGError("--nli-head needs rsg_eval.hmtl.nli_eval (the hierarchical model's NLI-head evaluator), "
                       "which this installation does not have", field="--nli-head")
    mod = importlib.import_module("rsg_eval.hmtl.nli_eval")
    fn = getattr(mod, "run_nli_head_eval", None)
    if fn is None:
        raise RSGError("rsg_eval.hmtl.nli_eval has no run_nli_head_eval()", field="--nli-head")
    return fn(**kwargs)
