"""`rsg bench zeroshot --templates K`: one multi-template `rsg zeroshot` process against K one-template processes.

What a user would otherwise do to score K templates per task is run `rsg zeroshot --template NAME` K times; the
multi-template run loads the model once, reads the data once, renders and tokenises with a shared cache, merges
identical prompts and batches every template's prompts together. Both sides are measured as whole processes
(`python -m rsg_eval zeroshot ...`: interpreter start, imports, model load, data, scoring, writing the run folder),
one after the other in the same run, on the same machine.

To give both sides the same work, a temporary prompt folder ($RSG_PROMPTS_DIR) holds, per task, the first K
templates of `rsg prompts list` copied byte for byte as `t0.yaml` (the default) ... `t{K-1}.yaml`; the K separate
processes run `--template t0` ... `--template t{K-1}` over every task, the one process `--templates t0,...`.
After timing, the predictions of every template are compared between the two sides (same val and test
predictions: the check that both did the same work).

Wall time is what a user waits; on a shared machine the processes' CPU time (user + system, from
getrusage(RUSAGE_CHILDREN)) is the steadier figure, and both ratios are reported.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from rsg_eval.core.errors import RSGError


def _prompt_copy(root: Path, tasks: Sequence[str], k: int) -> dict[str, list[str]]:
    """Copy the first k templates of each task as t0..t{k-1}; returns {task: [original names]}."""
    from rsg_eval.core.prompts import list_templates, load_template

    out = {}
    for task in tasks:
        names = list_templates(task)[task][:k]
        if len(names) < k:
            raise RSGError(f"{task} has only {len(names)} templates", field="--templates",
                           expected=f"at most {len(names)}")
        folder = root / task.lower()
        folder.mkdir(parents=True)
        for i, n in enumerate(names):
            text = load_template(task, n).path.read_text(encoding="utf-8")
            if i:  # only t0 is the default
                text = "\n".join(x for x in text.splitlines() if not x.startswith("default:")) + "\n"
            (folder / f"t{i}.yaml").write_text(text, encoding="utf-8")
        out[task] = names
    return out


def _process(args: list[str], cwd: Path, env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rsg_eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RSGError(f"`rsg {' '.join(args)}` failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu}


def _preds(folder: Path, task: str, split: str) -> list:
    import json

    path = folder / "logs" / split / f"{task}.jsonl"
    return [json.loads(line)["pred"] for line in path.read_text(encoding="utf-8").splitlines()]


def run_templates_bench(*, k: int = 6, model: str = "tiny", data: str = "sample", tasks: Sequence[str] | None = None,
                        split: str = "all", limit: int | None = None, batch_size: int = 16, device: str = "cpu",
                        threads: int | None = None, on_step: Any = None) -> dict:
    """Time K one-template processes and one K-template process; compare their predictions."""
    from rsg_eval.core.tasks import resolve_tasks

    if k < 2:
        raise RSGError(f"--templates {k}: nothing to share with fewer than 2", field="--templates",
                       expected="2 or more")
    tasks = resolve_tasks(list(tasks) if tasks else None)
    work = Path(tempfile.mkdtemp(prefix="rsg-bench-templates-"))
    try:
        names = _prompt_copy(work / "prompts", tasks, k)
        env = {**os.environ, "RSG_PROMPTS_DIR": str(work / "prompts")}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        common = ["zeroshot", "--model", model, "--data", data, "--tasks", ",".join(tasks), "--split", split,
                  "--batch-size", str(batch_size), "--device", device, "--root", str(work / "runs"), "-q"]
        if limit:
            common += ["--limit", str(limit)]
        separate = []
        for i in range(k):
            if on_step:
                on_step(f"one-template process {i + 1} of {k}")
            separate.append(_process([*common, "--template", f"t{i}", "--run", f"t{i}"], work, env))
        if on_step:
            on_step(f"one {k}-template process")
        multi = _process([*common, "--templates", ",".join(f"t{i}" for i in range(k)), "--run", "multi"], work, env)
        splits = ["val", "test"] if split == "all" else [split]
        same = all(_preds(work / "runs" / "multi" / "templates" / t / f"t{i}", t, s) ==
                   _preds(work / "runs" / f"t{i}", t, s) for t in tasks for i in range(k) for s in splits)
        sep_wall = sum(p["wall_s"] for p in separate)
        sep_cpu = sum(p["cpu_s"] for p in separate)
        return {"k": k, "model": model, "data": data, "tasks": list(tasks), "split": split, "limit": limit,
                "batch_size": batch_size, "device": device, "threads": threads, "templates": names,
                "separate": separate, "separate_wall_s": sep_wall, "separate_cpu_s": sep_cpu, "multi": multi,
                "ratio_wall": sep_wall / multi["wall_s"], "ratio_cpu": sep_cpu / multi["cpu_s"] if multi["cpu_s"]
                else None, "same_predictions": same, "cpu_count": os.cpu_count(),
                "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}
    finally:
        shutil.rmtree(work, ignore_errors=True)
