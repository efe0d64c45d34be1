"""Read what a report compares: run folders, published reference rows, and score files a user copied.

Torch-free. Run folders are read only through their files (docs/design.md, "Run folders"), and only task splits
whose results are usable (`RunFolder.task_problem`: current settings, intact files); the others are named in the
run's notes. Each task's data fingerprint (its state's `data_sha256`) decides whether two runs may be paired
(`different_data`). A run folder whose config.json or metrics.json is damaged is rebuilt from its logs, or raises
`DamagedRun` (exit 2), never skipped. A score file is
YAML or JSON in the format of `rsg_eval/published/*.yaml` (documented in docs/reports.md, "Score files"):

    name: my-model-test           # one run; or `runs: [{name: .., tasks: ..}, ...]` for several
    split: test                   # test = leaderboard numbers (default), val = local numbers
    total: 0.611                  # optional; recomputed from the nine tasks when absent
    tasks:
      LiDiRus: 0.31               # a bare number is the task's score (its only metric for one-metric tasks)
      RCB: "0.417 / 0.484"        # as the site prints two-metric tasks: F1 / Acc
      MuSeRC: {f1a: 0.729, em: 0.333}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError

PUBLISHED = {"paper": "paper.yaml", "leaderboard": "leaderboard.yaml"}
SCORE_FILE_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class Run:
    """One column of a report."""

    name: str
    split: str                                  # "val" (local) or "test" (leaderboard)
    origin: str                                 # "run" (a run folder), "published", "file" (user's scores)
    source: str                                 # folder or file it came from
    config: dict = field(default_factory=dict)
    reported: dict[str, dict[str, float]] = field(default_factory=dict)  # metrics.json / published numbers
    reported_total: float | None = None
    logs: dict[str, list[dict]] = field(default_factory=dict)          # task -> labelled log rows
    epochs: list[dict] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    title: str = ""
    data_sha256: dict[str, str | None] = field(default_factory=dict)  # task -> sha256 of the data file scored

    @property
    def has_examples(self) -> bool:
        return bool(self.logs)

    @property
    def where(self) -> str:
        """Where the numbers come from, for labels: val = scored locally, test = the leaderboard."""
        if self.origin == "published":
            return f"{self.split}, published"
        return "val, local" if self.split == "val" else f"{self.split}, leaderboard"


class DamagedRun(RSGError):
    """A run folder that cannot be read as it is and cannot be rebuilt from its logs: an error, never a skip."""


def different_data(ref: Run, run: Run, task: str) -> str | None:
    """Why `run` and `ref` must not be paired on `task` (None: same data, pair them): their data files' sha256
    differ, or, where either run does not record it, gold labels differ on shared examples."""
    a, b = ref.data_sha256.get(task), run.data_sha256.get(task)
    if a and b:
        return None if a == b else f"were scored on different data (data sha256 {a[:12]}… vs {b[:12]}…)"
    gold = {_key(x["key"]): x.get("gold") for x in ref.logs.get(task, [])}
    shared = [x for x in run.logs.get(task, []) if _key(x["key"]) in gold]
    differ = sum(_key(gold[_key(x["key"])]) != _key(x.get("gold")) for x in shared)
    if differ:
        return (f"disagree on the gold label of {differ} of {len(shared)} shared examples: different data "
                "(no data fingerprint recorded)")
    return None


def _key(x: Any) -> Any:
    return tuple(_key(v) for v in x) if isinstance(x, list) else x


# --------------------------------------------------------------------------------------------------- folders

def _number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check_metrics(metrics: Any, path: Path) -> None:
    """RSGError naming the field when metrics.json does not have the shape the tool writes (numbers where numbers
    go: `"acc": "high"` is damaged, like invalid JSON, and so rebuilt from the logs)."""
    def bad(field: str, what: str) -> RSGError:
        # the field goes into the message: the report's note quotes the message alone
        return RSGError(f"not the metrics this tool writes: field '{field}': {what}", file=path)

    tasks = metrics.get("tasks", {})
    if not isinstance(tasks, dict):
        raise bad("tasks", f"a JSON {type(tasks).__name__} instead of an object {{Task: {{metric: number}}}}")
    for task, values in tasks.items():
        if not isinstance(values, dict):
            raise bad(f"tasks.{task}", f"a JSON {type(values).__name__} instead of an object {{metric: number}}")
        for k, v in values.items():
            if not _number_or_none(v):
                raise bad(f"tasks.{task}.{k}", f"{v!r:.40} is not a number")
    if not _number_or_none(metrics.get("total")):
        raise bad("total", f"{metrics.get('total')!r:.40} is not a number")
    for key in ("lidirus_diagnostics", "data_sha256", "counts", "ignored"):
        if not isinstance(metrics.get(key, {}), dict):
            raise bad(key, f"a JSON {type(metrics[key]).__name__} instead of an object")
    if not isinstance(metrics.get("split", ""), str):
        raise bad("split", "not a split name")


def looks_like_run(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("config.json", "metrics.json", "logs"))


def load_run_folder(path: str | Path, split: str = "val") -> Run:
    """A run folder -> Run. Raises RSGError when the folder is not a run."""
    from rsg_eval.runs import RunFolder
    from rsg_eval.core.tasks import TASK_NAMES

    path = Path(path)
    if not path.exists():
        raise RSGError("no such run folder", file=path)
    if not looks_like_run(path):
        raise RSGError("not a run folder (it has no config.json, metrics.json or logs/)", file=path,
                       expected="a folder written by `rsg zeroshot` or `rsg finetune`")
    folder = RunFolder(path)
    try:
        config = folder.read_config() or {}
    except RSGError as exc:
        raise DamagedRun(f"{exc.message}: the run's settings are unknown, so its results cannot be trusted; "
                         "rerun it with --restart", file=exc.file, line=exc.line) from None
    try:
        metrics = folder.read_metrics() or {}
        _check_metrics(metrics, folder.metrics_path)
        damaged = None
    except RSGError as exc:
        metrics, damaged = {}, exc
    run = Run(name=path.name, split=split, origin="run", source=str(path), config=config)
    if not folder.config_path.exists():
        run.notes.append("no config.json: model and template unknown")
    elif not config:
        run.notes.append("config.json records nothing ({}): model and template unknown")
    stale_metrics = bool(config.get("settings_sha256") and metrics.get("settings_sha256") not in
                         (None, config["settings_sha256"]))
    if metrics.get("split") == split and not stale_metrics:
        run.reported = {t: dict(m) for t, m in (metrics.get("tasks") or {}).items()}
        run.reported_total = metrics.get("total")
        run.diagnostics = dict(metrics.get("lidirus_diagnostics") or {})
        run.data_sha256 = dict(metrics.get("data_sha256") or {})
    elif stale_metrics:
        run.notes.append("metrics.json was written under other settings than config.json: recomputed from the logs")
    has_state = (path / "state").is_dir()
    for task in TASK_NAMES:
        log = folder.logs_path(task, split)
        if not log.is_file() and not folder.state_path(task, split).is_file():
            continue
        if has_state:
            why = folder.task_problem(task, split)
            if why == "not finished":
                run.notes.append(f"{task}: logs/{split} present but the task is unfinished (no state file): skipped")
            elif why is not None:
                run.notes.append(f"{task}/{split}: {why}: its results are left out")
            if why is not None:
                run.reported.pop(task, None)  # never a number from results that no longer count
                run.data_sha256.pop(task, None)
                continue
            run.data_sha256[task] = (folder.read_state(task, split) or {}).get("data_sha256")
        rows = [r for r in folder.read_logs(task, split) if r.get("gold") is not None]
        if rows:
            run.logs[task] = rows
        else:
            run.notes.append(f"{task}: logs/{split} carry no gold labels: nothing to score")
    if damaged is not None:
        if not run.logs and not any(folder.logs_path(t, s).is_file() for t in TASK_NAMES for s in ("val", "test")):
            raise DamagedRun(f"{damaged.message}, and the run has no logs to rebuild it from; rerun the run's "
                             "command to rewrite it", file=damaged.file, line=damaged.line)
        run.notes.append(f"metrics.json is damaged ({damaged.message}): rebuilt from the logs")
    if not run.logs and not run.reported:
        other = [p.name for p in (path / "logs").glob("*") if p.is_dir()] if (path / "logs").is_dir() else []
        hint = f" (it has logs for: {', '.join(sorted(other))})" if other else ""
        run.notes.append(f"no scored {split} results{hint}")
    try:
        run.epochs = folder.read_epochs()
    except (OSError, ValueError) as exc:
        run.notes.append(f"epochs.csv unreadable: {exc}")
    return run


# --------------------------------------------------------------------------------------------------- score files

def _read_structured(path: Path) -> Any:
    from rsg_eval.core.io import load_yaml, loads_json, read_text

    text = read_text(path)
    if path.suffix.lower() == ".json":
        return loads_json(text, file=path)
    return load_yaml(text, file=path)


def _number(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RSGError(f"not a number: {value!r}", file=path, field=where, expected="a number such as 0.626")
    if not -1.0 <= float(value) <= 1.0:
        raise RSGError(f"{value} is outside [-1, 1]", file=path, field=where,
                       expected="a fraction as the leaderboard prints it (0.626, not 62.6)")
    return float(value)


def _task_metrics(task: str, value: Any, path: Path) -> dict[str, float]:
    """One task entry of a score file -> {metric: v, "score": mean}."""
    from rsg_eval.core.tasks import get_task

    spec = get_task(task)
    names = spec.metrics
    where = f"tasks.{spec.name}"
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(",", "/").split("/") if p.strip()]
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise RSGError(f"cannot read {value!r}", file=path, field=where,
                           expected=" / ".join(names) + " as numbers") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = {"score": _number(value, where, path)}
        if len(names) == 1:
            out[names[0]] = out["score"]
        return out
    if isinstance(value, list):
        if len(value) != len(names):
            raise RSGError(f"{len(value)} numbers for {spec.name}", file=path, field=where,
                           expected=" / ".join(names))
        out = {m: _number(v, f"{where}.{m}", path) for m, v in zip(names, value)}
    elif isinstance(value, dict):
        unknown = [k for k in value if k not in names and k != "score"]
        if unknown:
            raise RSGError(f"unknown metric {unknown[0]!r} for {spec.name}", file=path, field=where,
                           expected=list(names) + ["score"])
        out = {m: _number(v, f"{where}.{m}", path) for m, v in value.items()}
    else:
        raise RSGError(f"cannot read {value!r}", file=path, field=where,
                       expected="a number, 'a / b', a list or a mapping of metrics")
    if "score" not in out:
        if not all(m in out for m in names):
            raise RSGError(f"give all of {', '.join(names)} or a score", file=path, field=where)
        out["score"] = sum(out[m] for m in names) / len(names)
    return out


def _run_from_entry(entry: Any, defaults: dict, path: Path, origin: str, index: int) -> Run:
    if not isinstance(entry, dict):
        raise RSGError("a run entry must be a mapping", file=path, field=f"runs[{index}]",
                       expected="name, split, total, tasks")
    known = {"name", "title", "split", "total", "tasks", "source", "note", "model", "template"}
    unknown = [k for k in entry if k not in known]
    if unknown:
        raise RSGError(f"unknown key {unknown[0]!r}", file=path, field=f"runs[{index}]", expected=sorted(known))
    name = str(entry.get("name") or (path.stem if index == 0 else f"{path.stem}-{index}"))
    split = str(entry.get("split", defaults.get("split", "test")))
    if split not in ("val", "test"):
        raise RSGError(f"split {split!r}", file=path, field=f"{name}.split", expected=["val", "test"])
    tasks_in = entry.get("tasks") or {}
    if not isinstance(tasks_in, dict):
        raise RSGError("tasks must map task names to scores", file=path, field=f"{name}.tasks")
    from rsg_eval.core.tasks import get_task

    reported: dict[str, dict[str, float]] = {}
    for task, value in tasks_in.items():
        try:
            canon = get_task(task).name
        except RSGError as exc:
            raise RSGError(exc.message, file=path, field=f"{name}.tasks", expected=exc.expected) from None
        reported[canon] = _task_metrics(canon, value, path)
    total = entry.get("total")
    run = Run(name=name, split=split, origin=origin, source=str(path), reported=reported,
              reported_total=None if total is None else _number(total, f"{name}.total", path),
              title=str(entry.get("title", "")))
    run.config = {k: entry[k] for k in ("model", "template") if k in entry}
    src = entry.get("source", defaults.get("source"))
    if src:
        run.config["source"] = src
    note = entry.get("note", defaults.get("note"))
    if note:
        run.notes.append(str(note))
    return run


def load_score_file(path: str | Path, origin: str = "file") -> list[Run]:
    """A YAML/JSON score file (one run, or `runs: [...]`) -> runs without examples."""
    path = Path(path)
    data = _read_structured(path)
    if not isinstance(data, dict):
        raise RSGError("a score file must be a mapping", file=path, expected="name, split, total, tasks")
    if "runs" in data:
        entries = data["runs"]
        if not isinstance(entries, list) or not entries:
            raise RSGError("runs must be a non-empty list", file=path, field="runs")
        defaults = {k: v for k, v in data.items() if k != "runs"}
        return [_run_from_entry(e, defaults, path, origin, i) for i, e in enumerate(entries)]
    return [_run_from_entry(data, {}, path, origin, 0)]


def published_path(name: str) -> Path:
    if name not in PUBLISHED:
        raise RSGError(f"unknown reference set {name!r}", field="--against", expected=sorted(PUBLISHED))
    # rsg_eval/published/ is package data (pyproject: "published/**/*"), next to this package
    return Path(__file__).resolve().parent.parent / "published" / PUBLISHED[name]


def load_published(name: str) -> list[Run]:
    """The shipped reference rows: "paper" (the hierarchical FRED-T5 paper) or "leaderboard"."""
    runs = load_score_file(published_path(name), origin="published")
    for run in runs:  # a machine-independent source, so reports do not depend on where the package lives
        run.source = f"rsg_eval/published/{PUBLISHED[name]}"
    return runs


def load_any(spec: str | Path, split: str = "val", *, against: bool = False) -> list[Run]:
    """A run folder, a score file, or a published set name ("paper", "leaderboard")."""
    text = str(spec)
    if text in PUBLISHED and not Path(text).exists():
        return load_published(text)
    path = Path(text)
    if against and not path.exists():
        raise RSGError(f"unknown reference {text!r}: neither a published set nor a file", field="--against",
                       expected=list(PUBLISHED) + ["a score file (.yaml/.json)", "a run folder"])
    if path.suffix.lower() in SCORE_FILE_SUFFIXES and not path.is_dir():
        return load_score_file(path)
    return [load_run_folder(path, split)]
