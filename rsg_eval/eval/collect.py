"""From shards to task results, on the main process of a zero-shot run (`rsg_eval.eval.zeroshot`).

`TaskWriter.write_ready` writes every task split whose shards are all known (scored by this call, by another
process, or found on disk from an earlier run), then removes the consumed shard files; once per input it prints
how many prompts lost their start to the model's input length.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from rsg_eval.eval.plan import Job, TaskOutcome, ZeroShotOptions, ZeroShotResult
from rsg_eval.eval.shards import SHARD_DIR, Shard, read_shard, shard_path
from rsg_eval.runs import RunFolder


class TaskWriter:
    """The main process's view of the shards of one call: `done` maps a shard id to its result (every shard it
    knows of), `written` holds the ids of the pending jobs whose task results are written. `bars` (set by the
    runner) maps "progress" to the rich Progress and id(job) to its bar."""

    def __init__(self, run: RunFolder, opts: ZeroShotOptions, shards: Sequence[Shard],
                 jobs_of: dict[str, list[Job]], result: ZeroShotResult, console: Any) -> None:
        self.run, self.opts, self.shards, self.jobs_of = run, opts, shards, jobs_of
        self.result, self.console = result, console
        self.done: dict[tuple[str, int], dict] = {}
        self.written: set[int] = set()
        self.noted: set[str] = set()
        self.bars: dict = {}

    def write_ready(self) -> None:
        """Write every task split whose shards are all known (scored here or found on disk)."""
        for key, group in self.jobs_of.items():
            of_key = [sh for sh in self.shards if sh.key == key]
            for sh in of_key:
                if sh.id not in self.done:
                    got = read_shard(self.run, sh)
                    if got is not None:
                        self.done[sh.id] = got
            if not all(sh.id in self.done for sh in of_key):
                continue
            results = [self.done[sh.id] for sh in of_key]
            for job in group:
                if id(job) not in self.written:
                    self._write_job(job, results)
            self._note_cut(key, group, results)
            if all(id(j) in self.written for j in group):  # consumed: the task results hold it all now
                for sh in of_key:
                    shard_path(self.run, sh).unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # only when empty: other tasks' shards may still be there
                    (self.run.path / SHARD_DIR).rmdir()

    def _write_job(self, job: Job, results: list[dict]) -> None:
        """One task split's files from its shards' results (in shard order)."""
        rows = [row for r in results for row in r["rows"]]
        n_trunc = sum(r["n_truncated"] for r in results)
        secs = round(sum(r["seconds"] for r in results), 3)
        model = (results[0].get("model") if results else None) or {}  # what scored it (maybe an earlier run)
        extra = {"template": job.template.name, "n_truncated": n_trunc, "seconds": secs,
                 "model_fingerprint": model.get("fingerprint"), "dtype": model.get("dtype"),
                 "device": model.get("device")}
        if job.shots is not None or self.opts.num_fewshot:
            extra["n_shots_dropped"] = sum(r.get("n_shots_dropped", 0) for r in results)
        if job.variants is not None:  # every template's results under templates/<Task>/<template>/
            from rsg_eval.eval.multiprompt import write_variants

            write_variants(self.run, job, rows, {k: v for k, v in extra.items() if k != "n_shots_dropped"})
        else:
            preds = {it.key: row["pred"] for it, row in zip(job.items, rows)}
            self.run.write_task(job.task, job.split, job.items, preds, rows, job.fingerprint, parts=job.parts,
                                extra=extra)
        self.written.add(id(job))
        if id(job) in self.bars:
            self.bars["progress"].update(self.bars[id(job)], completed=len(job.items))
        self.result.outcomes.append(TaskOutcome(job.task, job.split, "done", len(job.items), secs, n_trunc))

    def _note_cut(self, key: str, group: list[Job], results: list[dict]) -> None:
        """Once per input (a task split; LiDiRus val and test share one): how many prompts lost their start."""
        cuts = [r["cut"] for r in results if r.get("cut") and r["cut"]["n"]]
        if key in self.noted or not cuts:
            return
        from rsg_eval.scoring import CutPrompts, cut_prompts_note

        self.noted.add(key)
        cut = CutPrompts(sum(c["n"] for c in cuts), sum(c["total"] for c in cuts), cuts[0]["limit"])
        where = f"{group[0].task}/{'+'.join(j.split for j in group)}"
        advice = "use a template that shortens the passage to fit (its `truncate:` field, docs/zeroshot.md)" + (
            " or fewer --num-fewshot examples" if self.opts.num_fewshot else "")
        self.console.print(f"[yellow]note:[/] {cut_prompts_note(where, cut, advice)}", highlight=False,
                           soft_wrap=True)
