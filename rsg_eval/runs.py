"""Run folders: the files a zero-shot or fine-tuning run leaves behind, and the only thing reports read.

Light module (no torch). Layout (docs/design.md, "Run folders")::

    submissions/<run>/
      config.json                       what produced the run (model, revision, templates, versions, ...)
      metrics.json                      {"split", "tasks": {Task: {metric: v, "score": v}}, "total",
                                         "lidirus_diagnostics", "counts": {Task: n items}}
      predictions/<split>/<Task>.jsonl  leaderboard line format
      logs/<split>/<Task>.jsonl         one line per item (see `log_row`)
      epochs.csv                        fine-tuning only
      state/<Task>.<split>.json         marks a finished task; holds its fingerprint
      submission.zip                    from predictions/test once all nine test tasks are there
      submission-partial.zip            the same with fewer tasks (not uploadable; says which are missing)

API::

    default_run_name(model, kind="zeroshot", tags=(), date=None) -> str
        "<model slug>-<kind>[-<tag>...]-<YYYYMMDD>": deterministic within a day, so rerunning the same
        command resumes the same folder.
    fingerprint(parts: Mapping) -> str
        sha256 of the canonical JSON of `parts` (model id+revision, template sha, code version, ...).
    log_row(item, pred, *, prompt=None, choices=None, scores=None) -> dict
        one per-item log line: key, group, doc, prompt, choices, labels, scores, pred, gold, meta.

    run_path(name=None, *, model=None, kind="zeroshot", tags=(), root="submissions") -> Path
        `name` may be a bare run name (under `root`) or a path (contains a "/" or is absolute).
    RunFolder.create(name=None, *, model=None, kind="zeroshot", tags=(), root="submissions") -> RunFolder
        mkdir of run_path(...); RunFolder(path) alone creates nothing (writes create what they need).
    RunFolder.open(path) -> RunFolder               an existing run folder (needs config.json) else RSGError
    run.write_config(config) / run.read_config() -> dict | None
    run.is_done(task, split, fingerprint) -> bool   finished with this fingerprint, files all present
    run.write_task(task, split, items, preds, rows, fingerprint, *, parts=None, extra=None)
        preds: {item.key: label}; rows: log rows aligned with items. Writes predictions, then logs, then the
        state file last (each atomically; the old state is removed first), so an interruption at any point
        leaves the task either finished or redone on resume, never half counted.
    run.finished(split) -> list[str]                tasks with a state file, in leaderboard order
    run.read_state(task, split) / run.read_logs(task, split) / run.read_predictions(task, split)
    run.compute_metrics(split="val") -> dict        from the logs of finished tasks (metrics.score / total)
    run.write_metrics(split="val") -> dict          the same, written to metrics.json
    run.read_metrics() -> dict | None
    run.build_zip() -> ZipResult(path, tasks, missing)
    run.write_epochs(rows) / run.read_epochs()      epochs.csv (fine-tuning)
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rsg_eval.errors import RSGError
from rsg_eval.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl

DEFAULT_ROOT = Path("submissions")
SPLITS = ("val", "test")
ZIP_NAME = "submission.zip"
PARTIAL_ZIP_NAME = "submission-partial.zip"


# --------------------------------------------------------------------------------------------------- names

def _slug(text: str) -> str:
    """A file-name-safe slug of a model id or path: last path component, lower case, [a-z0-9._-] only."""
    last = str(text).rstrip("/\\").replace("\\", "/").split("/")[-1] or "model"
    slug = re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.")
    return slug or "model"


def default_run_name(model: str, kind: str = "zeroshot", tags: Iterable[str] = (),
                     date: _dt.date | None = None) -> str:
    """Run name from the model and today's date, e.g. "fred-t5-1.7b-zeroshot-20261128".

    `tags` (non-default settings such as a template name) are appended so that different settings on the
    same day land in different folders instead of overwriting each other.
    """
    day = (date or _dt.date.today()).strftime("%Y%m%d")
    parts = [_slug(model), _slug(kind)] + [_slug(t) for t in tags if t] + [day]
    return "-".join(parts)


def fingerprint(parts: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `parts`; equal settings give equal fingerprints."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def log_row(item: Any, pred: Any, *, prompt: str | None = None, choices: Sequence[str] | None = None,
            scores: Sequence[float] | None = None) -> dict:
    """One per-item log line (logs/<split>/<Task>.jsonl) for an `rsg_eval.tasks.Item` and its prediction."""
    return {
        "key": item.key,
        "group": item.group,
        "doc": item.doc,
        "prompt": prompt,
        "choices": list(choices) if choices is not None else None,
        "labels": _jsonable(list(item.labels)),
        "scores": [float(s) for s in scores] if scores is not None else None,
        "pred": _jsonable(pred),
        "gold": _jsonable(item.gold),
        "meta": _jsonable(dict(item.meta or {})),
    }


def run_path(name: str | None = None, *, model: str | None = None, kind: str = "zeroshot",
             tags: Iterable[str] = (), root: str | Path = DEFAULT_ROOT) -> Path:
    """Where a run folder goes, without creating it: `name` under `root` (a name with a "/" or an absolute one
    is a path of its own); without `name`, `default_run_name(model, kind, tags)`."""
    if not name:
        if not model:
            raise RSGError("a run needs a name or a model to name it after", field="run")
        name = default_run_name(model, kind, tags)
    text = str(name)
    path = Path(text) if ("/" in text or "\\" in text or Path(text).is_absolute()) else Path(root) / text
    if path.exists() and not path.is_dir():
        raise RSGError("exists and is not a folder", file=path, field="run")
    return path


@dataclass(frozen=True)
class ZipResult:
    """What `RunFolder.build_zip` did: the zip written (None when no test task is finished), tasks in it,
    tasks missing from it (a zip with missing tasks is written as submission-partial.zip)."""
    path: Path | None
    tasks: tuple[str, ...]
    missing: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return self.path is not None and not self.missing


# --------------------------------------------------------------------------------------------------- folder

class RunFolder:
    """A run folder on disk. Cheap to construct; every method reads or writes files directly."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- create / open
    @classmethod
    def create(cls, name: str | None = None, *, model: str | None = None, kind: str = "zeroshot",
               tags: Iterable[str] = (), root: str | Path = DEFAULT_ROOT) -> "RunFolder":
        """Create (or reuse) a run folder at `run_path(...)`."""
        path = run_path(name, model=model, kind=kind, tags=tags, root=root)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """An existing run folder; RSGError when `path` is not one."""
        path = Path(path)
        if not path.is_dir():
            raise RSGError("run folder not found", file=path)
        if not (path / "config.json").is_file():
            raise RSGError("not a run folder (no config.json)", file=path,
                           expected="a folder written by `rsg zeroshot` or `rsg finetune`")
        return cls(path)

    # -- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    def predictions_path(self, task: str, split: str) -> Path:
        return self.path / "predictions" / split / f"{_task_name(task)}.jsonl"

    def logs_path(self, task: str, split: str) -> Path:
        return self.path / "logs" / split / f"{_task_name(task)}.jsonl"

    def state_path(self, task: str, split: str) -> Path:
        return self.path / "state" / f"{_task_name(task)}.{split}.json"

    # -- config
    def write_config(self, config: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.config_path, _jsonable(dict(config)))

    def read_config(self) -> dict | None:
        return _read_json(self.config_path)

    # -- per-task results
    def read_state(self, task: str, split: str) -> dict | None:
        return _read_json(self.state_path(task, split))

    def is_done(self, task: str, split: str, fingerprint: str) -> bool:
        """True when `task`/`split` finished with exactly this fingerprint and its files are all there."""
        try:
            state = self.read_state(task, split)
        except RSGError:  # a damaged state file means: not done, redo it
            return False
        return bool(
            state and state.get("fingerprint") == fingerprint
            and self.predictions_path(task, split).is_file() and self.logs_path(task, split).is_file()
        )

    def write_task(self, task: str, split: str, items: Sequence[Any], preds: Mapping[Any, Any],
                   rows: Sequence[Mapping[str, Any]], fingerprint: str, *,
                   parts: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> None:
        """Record one finished task: predictions, per-item logs, then the state file (the commit mark).

        `preds` maps item.key -> canonical label for every item; `rows` are `log_row`s aligned with `items`.
        """
        from rsg_eval import submission

        name = _task_name(task)
        if len(rows) != len(items):
            raise ValueError(f"{name}/{split}: {len(rows)} log rows for {len(items)} items")
        missing = [it.key for it in items if it.key not in preds]
        if missing:
            raise ValueError(f"{name}/{split}: no prediction for keys {missing[:5]}")
        # Remove the old commit mark first: if we die below, the task reads as unfinished and is redone.
        self.state_path(name, split).unlink(missing_ok=True)
        pred_dir = self.predictions_path(name, split).parent
        pred_dir.mkdir(parents=True, exist_ok=True)
        submission.write_task_file(pred_dir, name, items, preds)
        atomic_write_jsonl(self.logs_path(name, split), [_jsonable(dict(r)) for r in rows])
        state = {
            "task": name, "split": split, "fingerprint": fingerprint, "parts": _jsonable(dict(parts or {})),
            "n_items": len(items), "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        state.update(_jsonable(dict(extra or {})))
        atomic_write_json(self.state_path(name, split), state)

    def finished(self, split: str) -> list[str]:
        """Tasks finished for `split` (state file present), in leaderboard order."""
        from rsg_eval.tasks import TASK_NAMES

        return [t for t in TASK_NAMES if self.state_path(t, split).is_file() and self.logs_path(t, split).is_file()]

    def read_logs(self, task: str, split: str) -> list[dict]:
        return [rec for _, rec in read_jsonl(self.logs_path(task, split))]

    def read_predictions(self, task: str, split: str) -> dict:
        """The leaderboard file of `task`/`split` back to {key: canonical label}."""
        from rsg_eval import submission

        return submission.read_predictions(self.predictions_path(task, split), _task_name(task))

    # -- metrics
    def compute_metrics(self, split: str = "val") -> dict:
        """Metrics of every finished task of `split` that has gold labels, recomputed from the logs."""
        # scikit-learn warns about subsets holding a single label (small LiDiRus categories, tiny samples);
        # the metrics define those cases (MCC 0), so the warnings are noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self._compute_metrics(split)

    def _compute_metrics(self, split: str) -> dict:
        from rsg_eval import metrics

        tasks: dict[str, dict] = {}
        counts: dict[str, int] = {}
        diagnostics: dict[str, dict] = {}
        for name in self.finished(split):
            rows = [r for r in self.read_logs(name, split) if r.get("gold") is not None]
            if not rows:
                continue
            golds = [r["gold"] for r in rows]
            preds = [r["pred"] for r in rows]
            groups = [r["group"] for r in rows]
            tasks[name] = {k: float(v) for k, v in metrics.score(name, golds, preds, groups=groups).items()}
            counts[name] = len(rows)
            if name == "LiDiRus":
                items = [_item_from_row(name, split, r) for r in rows]
                diagnostics = metrics.lidirus_diagnostics(items, {r["key"]: r["pred"] for r in rows})
        total = metrics.total({t: m["score"] for t, m in tasks.items()})
        return {"split": split, "tasks": tasks, "total": total, "lidirus_diagnostics": diagnostics,
                "counts": counts}

    def write_metrics(self, split: str = "val") -> dict:
        result = self.compute_metrics(split)
        atomic_write_json(self.metrics_path, result)
        return result

    def read_metrics(self) -> dict | None:
        return _read_json(self.metrics_path)

    # -- submission zip
    def build_zip(self) -> ZipResult:
        """Zip predictions/test: submission.zip with all nine tasks, else submission-partial.zip."""
        from rsg_eval import submission
        from rsg_eval.tasks import TASK_NAMES

        done = self.finished("test")
        missing = tuple(t for t in TASK_NAMES if t not in done)
        if not done:
            return ZipResult(None, (), missing)
        src = self.path / "predictions" / "test"
        if missing:
            # Only finished tasks: a predictions file whose state is gone may be half redone.
            out = self.path / PARTIAL_ZIP_NAME
            submission.write_zip(src, out, tasks=done)
            # A complete zip from before is stale now that a task is being redone: never leave it to upload.
            (self.path / ZIP_NAME).unlink(missing_ok=True)
        else:
            out = self.path / ZIP_NAME
            submission.write_zip(src, out, tasks=done)
            (self.path / PARTIAL_ZIP_NAME).unlink(missing_ok=True)
        return ZipResult(out, tuple(done), missing)

    # -- fine-tuning epochs table
    def write_epochs(self, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Rewrite epochs.csv (atomically) from `rows`; columns in first-seen order."""
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(r))
        return atomic_write_text(self.path / "epochs.csv", buf.getvalue())

    def read_epochs(self) -> list[dict]:
        """epochs.csv as dicts, numbers converted back to int/float where they parse; [] when absent."""
        path = self.path / "epochs.csv"
        if not path.is_file():
            return []
        with path.open(encoding="utf-8", newline="") as fh:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


# --------------------------------------------------------------------------------------------------- helpers

def _task_name(task: str) -> str:
    from rsg_eval.tasks import get_task

    return get_task(task).name


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise RSGError(f"not valid JSON ({exc.msg})", file=path, line=exc.lineno) from None


def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _item_from_row(task: str, split: str, row: Mapping[str, Any]) -> Any:
    """An `Item` rebuilt from a log row (enough for metrics and diagnostics; no template fields)."""
    from rsg_eval.tasks import Item

    gold = row.get("gold")
    return Item(task=task, split=split, key=row["key"], group=row["group"], doc=row.get("doc", row["group"]),
                fields={}, labels=tuple(row.get("labels") or ()),
                gold=tuple(gold) if isinstance(gold, list) else gold, meta=dict(row.get("meta") or {}))
