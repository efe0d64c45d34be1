"""`rsg zeroshot` on several processes (torchrun, two CPU processes over gloo): the shards and their sharing-out,
byte-identical run folders against one process, per-shard resume across process counts, and failures on one
process that stop the others instead of leaving them waiting."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from _warm_rsg import warm_torchrun  # noqa: E402

from rsg_eval.eval import zeroshot  # noqa: E402
from rsg_eval.runs import RunFolder  # noqa: E402
from rsg_eval.eval.shards import assign, plan_shards  # noqa: E402
from rsg_eval.eval.zeroshot import ZeroShotOptions, plan_jobs, run_zeroshot  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
IDENT = {"model": "tiny", "revision": None, "dtype": "float32"}
TASKS = "TERRa,MuSeRC,RuCoS,LiDiRus"


def _opts(root, run, **kw):
    kw = {"tasks": TASKS.split(","), "split": "all", "num_fewshot": 1, "shard_size": 2, **kw}
    return ZeroShotOptions(model="tiny", data="sample", root=root, run=run, **kw)


def test_shards_are_the_same_for_any_number_of_processes(tmp_path):
    opts = _opts(tmp_path, "x")
    _, jobs = plan_jobs(opts, ident=IDENT)
    shards, jobs_of = plan_shards(jobs, opts)
    # LiDiRus val and test read one file: one set of shards serves both
    lid = [k for k, js in jobs_of.items() if js[0].task == "LiDiRus"]
    assert len(lid) == 1 and [j.split for j in jobs_of[lid[0]]] == ["val", "test"]
    n_items = {k: len(js[0].items) for k, js in jobs_of.items()}
    for key, n in n_items.items():  # consecutive runs of 2 items covering the input exactly once
        mine = [sh for sh in shards if sh.key == key]
        assert [(sh.start, sh.end) for sh in mine] == [(s, min(s + 2, n)) for s in range(0, n, 2)]
        assert [sh.index for sh in mine] == list(range(len(mine)))
    assert len({sh.file_name for sh in shards}) == len(shards)
    for world in (1, 2, 3, 8):
        parts = assign(shards, world)
        assert len(parts) == world
        flat = [sh.id for p in parts for sh in p]
        assert sorted(flat) == sorted(sh.id for sh in shards)  # each shard to exactly one process
        loads = [sum(sh.cost for sh in p) for p in parts]
        assert max(loads) - min(loads) <= max(sh.cost for sh in shards)  # greedy: within one shard of even
    # another shard size cuts differently, so its shard files carry other keys and are never mixed with these
    other = plan_shards(jobs, _opts(tmp_path, "x", shard_size=5))[0]
    assert {sh.key for sh in other}.isdisjoint({sh.key for sh in shards})


def _torchrun(cwd: Path, args: list[str], n: int = 2, module: str | None = "rsg_eval.cli") -> subprocess.CompletedProcess:
    """The real launcher (torch.distributed.run); the other calls use the warm one (tests/_warm_rsg.py), which sets
    the same environment for each rank without paying the torch import in three fresh processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # `--` keeps torchrun's own parser away from our flags (it would read --run as its --run-path)
    target = ["-m", module, "--"] if module else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *target, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _files(folder: Path) -> dict[str, bytes]:
    """What must be identical: predictions, logs and metrics (config and state carry times and durations)."""
    out = {str(p.relative_to(folder)): p.read_bytes() for sub in ("predictions", "logs")
           for p in sorted((folder / sub).rglob("*")) if p.is_file()}
    out["metrics.json"] = (folder / "metrics.json").read_bytes()
    return out


@pytest.fixture(scope="module")
def tiny():
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny", device="cpu")


@pytest.mark.slow
def test_two_processes_write_what_one_writes_and_resume_per_shard(tmp_path, tiny, monkeypatch, warm_rsg):
    one = run_zeroshot(_opts(tmp_path, "one"), show_progress=False, loaded=tiny)
    assert not one.interrupted and len(one.outcomes) == 8
    args = ["zeroshot", "--model", "tiny", "--data", "sample", "--tasks", TASKS, "--split", "all", "--num-fewshot",
            "1", "--shard-size", "2", "--root", str(tmp_path), "-q"]
    proc = _torchrun(tmp_path, [*args, "--run", "two"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # one voice: only the main process reports
    ref = _files(one.run.path)
    assert len(ref) == 17 and _files(tmp_path / "two") == ref
    assert not (tmp_path / "two" / "state" / "shards").exists()  # consumed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]

    # A one-process run interrupted in its 5th shard (TERRa/val written, one TERRa/test shard saved), resumed
    # by two processes: the saved shard is reused, and the result is again the one-process run's, byte for byte.
    real, calls = zeroshot._score_job, []

    def interrupt_on_fifth(job, *a, **k):
        calls.append((job.task, job.split, [it.key for it in job.items]))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(job, *a, **k)

    monkeypatch.setattr(zeroshot, "_score_job", interrupt_on_fifth)
    cut = run_zeroshot(_opts(tmp_path, "resumed"), show_progress=False, loaded=tiny)
    monkeypatch.setattr(zeroshot, "_score_job", real)
    assert cut.interrupted and cut.run.finished("val") == ["TERRa"] and cut.run.finished("test") == []
    saved = sorted(p.name for p in (cut.run.path / "state" / "shards").iterdir())
    assert len(saved) == 1 and saved[0].startswith("TERRa-")
    proc = warm_torchrun(warm_rsg, [*args, "--run", "resumed"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert re.search(r"\b1 of \d+ shards already scored by an earlier run, reused", out)
    assert "TERRa/val: already finished" in out and "7 task splits evaluated, 1 skipped" in out
    assert _files(tmp_path / "resumed") == ref


FAILING = textwrap.dedent("""\
    import json, os, sys
    from rsg_eval.eval import zeroshot
    from rsg_eval.eval.zeroshot import ZeroShotOptions, run_zeroshot

    root, rank, out = sys.argv[1], int(os.environ["RANK"]), {}
    # 1. the main process fails before any model loads (the run path is a file): both stop with its message
    try:
        run_zeroshot(ZeroShotOptions(model="tiny", data="sample", tasks=["TERRa"], split="val", root=root,
                                     run=root + "/a-file"), show_progress=False)
        out["setup"] = "ok"
    except Exception as exc:
        out["setup"] = f"{type(exc).__name__}: {exc}"
    # 2. process 1 fails in its shard: process 0 finishes its own shards, then both stop (nobody waits forever)
    real = zeroshot._score_job
    def boom(job, *a, **k):
        if rank == 1:
            raise RuntimeError("boom")
        return real(job, *a, **k)
    zeroshot._score_job = boom
    try:
        run_zeroshot(ZeroShotOptions(model="tiny", data="sample", tasks=["TERRa"], split="val", root=root, run="r",
                                     shard_size=2), show_progress=False)
        out["scoring"] = "ok"
    except Exception as exc:
        out["scoring"] = f"{type(exc).__name__}: {exc}"
    open(f"{root}/rank{rank}.json", "w").write(json.dumps(out))
    zeroshot.shutdown_distributed()  # as `rsg zeroshot` does at its end
    """)


@pytest.mark.slow
def test_a_failure_on_one_process_stops_all_and_keeps_finished_shards(tmp_path, tiny, warm_rsg):
    (tmp_path / "a-file").write_text("not a folder")
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    proc = warm_torchrun(warm_rsg, [str(tmp_path)], script=str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["setup"].startswith("RSGError") and "exists and is not a folder" in r0["setup"]
    assert r1["setup"] == r0["setup"]
    assert r0["scoring"] == "RSGError: process 1 of 2 failed: RuntimeError: boom"
    assert r1["scoring"] == "RuntimeError: boom"
    # process 0's shards are saved (process 1 failed in its first); a rerun on one process scores only the others
    opts = ZeroShotOptions(model="tiny", data="sample", tasks=["TERRa"], split="val", shard_size=2)
    shards = plan_shards(plan_jobs(opts, ident=IDENT)[1], opts)[0]
    n0 = len(assign(shards, 2)[0])
    assert len(shards) == 3 and 0 < n0 < 3
    run = RunFolder(tmp_path / "r")
    assert run.finished("val") == [] and len(list((run.path / "state" / "shards").iterdir())) == n0
    real, calls = zeroshot._score_job, []

    def counting(job, *a, **k):
        calls.append([it.key for it in job.items])
        return real(job, *a, **k)

    zeroshot._score_job = counting
    try:
        res = run_zeroshot(ZeroShotOptions(model="tiny", data="sample", tasks=["TERRa"], split="val", root=tmp_path,
                                           run="r", shard_size=2), show_progress=False, loaded=tiny)
    finally:
        zeroshot._score_job = real
    assert len(calls) == 3 - n0 and res.run.finished("val") == ["TERRa"]
    whole = run_zeroshot(ZeroShotOptions(model="tiny", data="sample", tasks=["TERRa"], split="val", root=tmp_path,
                                         run="whole", shard_size=2), show_progress=False, loaded=tiny)
    assert _files(res.run.path) == _files(whole.run.path)


def test_one_process_resumes_inside_a_task_and_ignores_damaged_or_stale_shards(tmp_path, tiny, monkeypatch):
    opts = dict(model="tiny", data="sample", tasks=["TERRa"], split="val", shard_size=2, root=tmp_path)
    real, calls = zeroshot._score_job, []

    def interrupt_on_third(job, *a, **k):
        calls.append([it.key for it in job.items])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job, *a, **k)

    monkeypatch.setattr(zeroshot, "_score_job", interrupt_on_third)
    cut = run_zeroshot(ZeroShotOptions(run="r", **opts), show_progress=False, loaded=tiny)
    assert cut.interrupted and cut.run.finished("val") == []
    folder = cut.run.path / "state" / "shards"
    first, second = sorted(folder.iterdir())
    second.write_text('{"key": "', encoding="utf-8")              # damaged (as a full disk could leave it)
    stale = folder / "TERRa-0123456789abcdef-00000.json"         # from other settings
    stale.write_text("{}", encoding="utf-8")
    other = folder / "RCB-0123456789abcdef-00000.json"           # another task's: not ours to judge
    other.write_text("{}", encoding="utf-8")
    calls.clear()
    monkeypatch.setattr(zeroshot, "_score_job", lambda job, *a, **k: calls.append([it.key for it in job.items])
                        or real(job, *a, **k))
    res = run_zeroshot(ZeroShotOptions(run="r", **opts), show_progress=False, loaded=tiny)
    assert len(calls) == 2 and res.run.finished("val") == ["TERRa"]  # the first shard was reused
    assert sorted(p.name for p in folder.iterdir()) == [other.name]
    whole = run_zeroshot(ZeroShotOptions(run="whole", **opts), show_progress=False, loaded=tiny)
    assert _files(res.run.path) == _files(whole.run.path)


@pytest.mark.slow
def test_two_processes_write_what_one_writes_with_several_templates(tmp_path, tiny, monkeypatch, warm_rsg):
    """--templates on two processes: the shards hold every template of their items; every template's files,
    the promoted ones and the spread are byte for byte those of one process, also when two processes resume a
    one-process run interrupted in its third shard."""
    kw = dict(templates="verdict,verdict_yesno,yesno,cloze", tasks=["TERRa", "MuSeRC", "LiDiRus"], num_fewshot=1)
    one = run_zeroshot(_opts(tmp_path, "one", **kw), show_progress=False, loaded=tiny)
    assert not one.interrupted
    args = ["zeroshot", "--model", "tiny", "--data", "sample", "--tasks", "TERRa,MuSeRC,LiDiRus", "--split", "all",
            "--num-fewshot", "1", "--shard-size", "2", "--templates", "verdict,verdict_yesno,yesno,cloze",
            "--root", str(tmp_path), "-q"]

    def files(folder: Path) -> dict[str, bytes]:
        out = _files(folder)
        out.update({str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "templates").rglob("*"))
                    if p.is_file() and "state" not in p.parts})
        out["spread.json"] = (folder / "spread.json").read_bytes()
        return out

    ref = files(one.run.path)
    assert len([k for k in ref if k.startswith("templates/TERRa/")]) == 4 * 2 * 2  # 4 templates, 2 splits, 2 files
    proc = warm_torchrun(warm_rsg, [*args, "--run", "two"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert files(tmp_path / "two") == ref

    real, calls = zeroshot._score_job, []

    def interrupt_on_third(job, *a, **k):
        calls.append(job.task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job, *a, **k)

    monkeypatch.setattr(zeroshot, "_score_job", interrupt_on_third)
    cut = run_zeroshot(_opts(tmp_path, "resumed", **kw), show_progress=False, loaded=tiny)
    monkeypatch.setattr(zeroshot, "_score_job", real)
    assert cut.interrupted and any((cut.run.path / "state" / "shards").iterdir())
    proc = warm_torchrun(warm_rsg, [*args, "--run", "resumed"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shards already scored by an earlier run, reused" in " ".join(proc.stdout.split())
    assert files(tmp_path / "resumed") == ref
