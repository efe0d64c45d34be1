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
`_score_job`, `_job_problem`, `TaskWriter.write_ready` and the final `promote`/`finish_metrics` hand them to
`rsg_eval.eval.multiprompt` (one pass over all templates; per-template results under templates/<Task>/<name>/;
the template `select` picks is promoted to the folder's own files); shards, resume and processes are unchanged.

The runner's parts, each in its module of rsg_eval/eval/: `plan` (options, jobs, run settings, config.json),
`shards` (the shard store under state/shards/), `collect` (shards -> task results on the main process), `group`
(the process group seen from the runner: device, failures, gathers); this module scores and drives the run and
re-exports the public names.

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

import time
from typing import Any, Sequence

from rsg_eval.core.errors import RSGError
# The runner's parts, re-exported here: callers and tests import the public names from this module.
from rsg_eval.eval.collect import TaskWriter
from rsg_eval.eval.group import (DIST_TIMEOUT_S, LEAVE_TIMEOUT_S, agree, describe, device_for,  # noqa: F401
                                 gather_to_main, leave_together_after_writing, on_main, shutdown_distributed)
from rsg_eval.eval.plan import (CODE_VERSION, KIND, NORMALIZE_CHOICES, SPLIT_CHOICES, Job,  # noqa: F401
                                TaskOutcome, ZeroShotOptions, ZeroShotResult, attach_shots, check_renders,
                                fewshot_seed, model_identity, parse_batch_size, plan_jobs, run_folder_of,
                                run_settings, splits_of, validate_options, write_config)
from rsg_eval.eval.shards import (SHARD_DIR, Shard, assign, plan_shards, read_shard,  # noqa: F401
                                  remove_stale_shards, write_shard)
from rsg_eval.runs import RunFolder, log_row
from rsg_eval.runs.provenance import data_identity, git_commit, versions as _versions  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------------------------------- scoring

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




def _setup_main(opts: ZeroShotOptions, src: Any, jobs: Sequence[Job], held: dict) -> tuple:
    """Main process only, before any model loads: claim the run folder (lock + one-configuration check; kept in
    `held` until run_zeroshot releases it), find the task splits still to do and the shards of them that an
    earlier (possibly wider or narrower) run already finished. -> (path, pending job indices, found shard ids,
    lines to print)."""
    run = run_folder_of(opts)
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
    shards, _ = plan_shards([jobs[i] for i in pending], opts)
    if run.path.is_dir():
        remove_stale_shards(run, shards, {j.task for j in jobs})
    found = [sh.id for sh in shards if read_shard(run, sh) is not None]
    return str(run.path), pending, found, notes


def _job_problem(run: RunFolder, job: Job) -> str | None:
    """Why the job's results cannot be reused (None: finished, current, intact): the run folder's own task split,
    or in a multi-template run every template's under templates/ (rsg_eval.eval.multiprompt)."""
    if job.variants is not None:
        from rsg_eval.eval.multiprompt import job_problem

        return job_problem(run, job)
    return run.task_problem(job.task, job.split, job.fingerprint)



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
    device_for(opts, dist)  # a device no process may take is refused by all of them alike, before any work
    console = console or Console(stderr=True)
    if not dist.main:  # one voice: the other processes only score
        console, show_progress = Console(stderr=True, quiet=True), False
    src, jobs = plan_jobs(opts, draw=False)  # the same on every process (deterministic)
    held: dict = {}  # main process: the claimed RunFolder and its claim
    interrupted = False
    try:
        path, pending_idx, found_ids, notes = on_main(dist, lambda: _setup_main(opts, src, jobs, held))
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
            leave_together_after_writing(dist)



# --------------------------------------------------------------------------------------------------- the run

def _run_claimed(opts: ZeroShotOptions, run: RunFolder, src: Any, jobs: list[Job], pending_idx: list[int],
                 found_ids: list, dist: Any, console: Any, show_progress: bool, loaded: Any) -> ZeroShotResult:
    """run_zeroshot's work once the main process has claimed the run folder (locked, settings checked)."""
    import torch
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    result = ZeroShotResult(run, main=dist.main)
    pending_set = set(pending_idx)
    for i, j in enumerate(jobs):
        if i not in pending_set:
            result.outcomes.append(TaskOutcome(j.task, j.split, "skipped", len(j.items)))
            console.print(f"[dim]{j.task}/{j.split}: already finished with the same settings, skipped[/]")
    pending = [jobs[i] for i in pending_idx]
    shards, jobs_of = plan_shards(pending, opts)
    found = set(map(tuple, found_ids))
    todo = [sh for sh in shards if sh.id not in found]
    if found:
        console.print(f"[dim]{len(found)} of {len(shards)} shards already scored by an earlier run, reused[/]")
    attach_shots(opts, src, [sh.job for sh in todo])  # a bad train file fails here, before the model loads
    if todo and loaded is None:
        loaded = _load(opts, dist, console)
    writer = TaskWriter(run, opts, shards, jobs_of, result, console)
    try:
        torch.manual_seed(opts.seed)
        # elapsed, then the time left (rich's estimate from the recent rate: "-:--:--" until it has one)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=not show_progress, transient=False) as progress:
            writer.bars = {"progress": progress}
            for job in pending:
                writer.bars[id(job)] = progress.add_task(f"{job.task}/{job.split}", total=len(job.items))
            error: BaseException | None = None
            fresh: dict[tuple[str, int], dict] = {}  # shards this process scored in this call
            try:
                if dist.main and (pending or run.read_config() is None):  # a rerun that only skips keeps it
                    write_config(run, opts, src, jobs, loaded.info if loaded is not None else None)
                if dist.main:
                    writer.write_ready()  # task splits whose shards were all scored before
                for sh in assign(todo, dist.world)[dist.rank]:
                    res = _score_shard(sh, jobs_of, loaded, opts, writer.bars)
                    write_shard(run, sh, res)  # saved for resume before anything else happens
                    writer.done[sh.id] = fresh[sh.id] = res
                    if dist.main:
                        writer.write_ready()
            except Exception as exc:
                if not dist.active:
                    raise
                error = exc  # still join the gather below, so that no process waits for this one forever
            if dist.active:
                error = _gather_shards(dist, writer, fresh, error)
            if error is not None:
                raise error
    except KeyboardInterrupt as exc:
        result.interrupted = True
        result.terminated = type(exc).__name__ == "Terminated"  # errors.Terminated: SIGTERM
        console.print("[yellow]interrupted: finished tasks and shards are saved; rerun the same command to "
                      "resume[/]")
    finally:
        _finish(run, jobs, opts, dist, result, console)  # whatever happened
    return result


def _load(opts: ZeroShotOptions, dist: Any, console: Any) -> Any:
    """Load the model before writing anything: a model that does not load leaves no half-made run folder behind.
    Every process hears of a failure on any of them, or the others would wait for that one forever."""
    from rsg_eval.models.loading import load_model

    console.print(f"loading model [bold]{opts.model}[/] ...")
    loaded, err = None, None
    try:
        loaded = load_model(opts.model, device=device_for(opts, dist), dtype=opts.dtype, revision=opts.revision,
                            causal_ok=True, device_map=opts.device_map)
    except Exception as exc:
        err = exc
    agree(dist, err)
    return loaded


def _score_shard(sh: Shard, jobs_of: dict[str, list[Job]], loaded: Any, opts: ZeroShotOptions,
                 bars: dict) -> dict:
    """Score one shard (advancing the bars of every job with its input): the result saved under state/shards/."""
    import dataclasses

    from rsg_eval.scoring import count_cut_prompts

    t0 = time.perf_counter()
    info = loaded.info if loaded is not None else {}

    def advance(n: int) -> None:
        for job in jobs_of[sh.key]:
            bars["progress"].advance(bars[id(job)], n)

    part = dataclasses.replace(sh.job, items=sh.job.items[sh.start:sh.end])
    with count_cut_prompts() as cut:  # one note per task split (TaskWriter), not a warning per shard
        _, rows, n_trunc = _score_job(part, loaded, opts, advance)
    res = {"key": sh.key, "task": sh.task, "index": sh.index, "start": sh.start, "end": sh.end,
           "keys": sh.keys(), "rows": rows, "n_truncated": n_trunc,
           "cut": {"n": cut.n, "total": cut.total, "limit": cut.limit},
           "seconds": round(time.perf_counter() - t0, 3),
           "model": {k: info.get(k) for k in ("fingerprint", "dtype", "device")}}
    if part.shots is not None and part.variants is None:
        res["n_shots_dropped"] = sum(len(part.shots.get(r["key"], [])) - len(r["shots"])
                                     for r in rows if r["prompt"] is not None)
    return res


def _gather_shards(dist: Any, writer: TaskWriter, fresh: dict, error: BaseException | None) -> BaseException | None:
    """Multi-process: every process's fresh shards (and whether it failed) to the main one, which writes the
    task splits now complete. The shards travel over the process group: the run folder need not be on a shared
    disk. -> the error to raise (this process's own first)."""
    got = gather_to_main(dist, (None if error is None else describe(error), {} if dist.main else fresh))
    if dist.main:
        for _msg, results in got:
            writer.done.update(results)
        bad = [(r, m) for r, (m, _) in enumerate(got) if m is not None]
        if error is None and bad:
            error = RSGError(f"process {bad[0][0]} of {dist.world} failed: {bad[0][1]}")
        try:
            writer.write_ready()
        except Exception as exc:
            error = error or exc
    return error


def _finish(run: RunFolder, jobs: list[Job], opts: ZeroShotOptions, dist: Any, result: ZeroShotResult,
            console: Any) -> None:
    """Main process: the metrics and zip reflect every task finished so far; left-out tasks are said."""
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
            console.print(f"[yellow]{task}/{split}: {why}: left out of metrics.json and the zip[/]", soft_wrap=True)
