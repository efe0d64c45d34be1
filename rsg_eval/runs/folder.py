"""The run folder reader/writer: the files a zero-shot or fine-tuning run leaves behind, and the only thing reports read.

Light module (no torch). Layout (docs/design.md, "Run folders")::

    submissions/<run>/
      config.json                       what produced the run (model, revision, templates, versions, ...) and
                                        its one configuration: "kind", "settings" (run level), "settings_sha256",
                                        "task_settings" {"Task/split": {...}} (template, data file, hyper-params)
      metrics.json                      {"split", "tasks": {Task: {metric: v, "score": v}}, "total",
                                         "lidirus_diagnostics", "counts": {Task: n items},
                                         "data_sha256": {Task: sha}, "settings_sha256", "ignored": {Task: why}}
      predictions/<split>/<Task>.jsonl  leaderboard line format
      logs/<split>/<Task>.jsonl         one line per item (see `log_row`)
      epochs.csv                        fine-tuning only
      state/<Task>.<split>.json         marks a finished task: its fingerprint, n_items, "files" {predictions,
                                        logs: {bytes, sha256}}, "settings_sha256", "task_settings", "data_sha256"
      submission.zip                    from predictions/test once all nine test tasks are there
      submission-partial.zip            the same with fewer tasks (not uploadable; says which are missing)
      rsg.lock                          while a process works on the folder: {pid, host, proc_start, started,
                                        command, token}

One configuration per folder. A command claims the folder before it writes anything (`RunFolder.claim`): the
claim locks it (a second process gets an RSGError naming the PID that holds it; a lock whose process is dead is
taken over) and compares the command's settings with the ones config.json records. Settings are what results
depend on: model identity (id, revision, local folder hash), dtype, template name and sha256, prefix,
normalisation, calibration, limit, hyper-parameters, data (origin and each file's sha256) and code version; never
the task list, split, batch size, device or progress flags. A difference is refused (exit 2) with each setting
named old -> new and the way out (`--restart`, which clears the results, or another `--run`); a task split not yet
finished may take new per-task settings. Every state written under the claim carries the settings' stamp, and
only task splits whose stamp is the folder's and whose files still hash to what the state recorded count
(`finished`), in metrics.json, the zip and reports; the others are named (`ignored`), never mixed in.

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
    run.claim(kind, settings, *, per_task=None, restart=False, main=None) -> Claim
        lock + one-configuration check (above); per_task: {(task, split): {...}} ("data_sha256" there becomes
        the state's data_sha256). Until claim.release() (try/finally), write_config adds the settings to
        config.json and write_task stamps states. Under torchrun/accelerate only rank 0 (RANK=0) locks and
        checks (`main=None` reads RANK; pass main=False on other ranks).
    run.clear_results()                             what --restart removes (RESULT_NAMES)
    run.write_config(config) / run.read_config() -> dict | None
    run.task_problem(task, split, fingerprint=None) -> str | None
        why a task split's results cannot be used ("not finished", "made with other settings", "... (stale)",
        "logs/val/RCB.jsonl does not match its state (...): truncated or edited", ...); None when usable.
    run.is_done(task, split, fingerprint) -> bool   task_problem(...) is None
    run.write_task(task, split, items, preds, rows, fingerprint, *, parts=None, extra=None, data_sha256=None)
        preds: {item.key: label}; rows: log rows aligned with items. Writes predictions, then logs, then the
        state file last (each atomically; the old state is removed first), so an interruption at any point
        leaves the task either finished or redone on resume, never half counted.
    run.finished(split) -> list[str]                usable tasks (current stamp, intact files), leaderboard order
    run.ignored(split) -> {task: why}               tasks with a state but unusable results (stale, damaged)
    run.data_fingerprints(split) -> {task: sha256 | None}
    run.read_state(task, split) / run.read_logs(task, split) / run.read_predictions(task, split)
    run.compute_metrics(split="val") -> dict        from the logs of usable tasks (metrics.score / total)
    run.write_metrics(split="val") -> dict          the same, written to metrics.json
    run.read_metrics() -> dict | None
    run.build_zip() -> ZipResult(path, tasks, missing, ignored)
    run.write_epochs(rows) / run.read_epochs()      epochs.csv (fine-tuning)

    claim_folder(folder, kind, settings, *, per_task=None, restart=False, record="config.json", has_results,
                 task_has_results=..., clear, unrecorded="compare"|"refuse", option="--run", main=None) -> Claim
        the same rule for any output folder (`rsg train-hmtl --out` uses record="settings.json").
    Claim: .settings_sha256, .restarted, .main, .write_record(extra=None), .release(); a context manager.
    FolderLock(folder).acquire() / .release() / .holder(); a context manager.   is_main_process() -> bool
    settings_diff(old, new) -> ["name: old -> new", ...]      files_fingerprint(paths) -> str
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import (atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, sha256_file,
                              storage_error)
from rsg_eval.runs.claim import Claim, _read_json, _task_key, claim_folder
from rsg_eval.runs.names import DEFAULT_ROOT, PARTIAL_ZIP_NAME, RESULT_NAMES, ZIP_NAME, _jsonable, _task_name, run_path


@dataclass(frozen=True)
class ZipResult:
    """What `RunFolder.build_zip` did: the zip written (None when no test task is finished), tasks in it,
    tasks missing from it (a zip with missing tasks is written as submission-partial.zip)."""
    path: Path | None
    tasks: tuple[str, ...]
    missing: tuple[str, ...]
    ignored: Mapping[str, str] = field(default_factory=dict)  # task -> why its (stale/damaged) results were left out

    @property
    def complete(self) -> bool:
        return self.path is not None and not self.missing


# --------------------------------------------------------------------------------------------------- folder

class RunFolder:
    """A run folder on disk. Cheap to construct; every method reads or writes files directly."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.claimed: Claim | None = None  # set by claim(): the settings every result written now carries

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- create / open
    @classmethod
    def create(cls, name: str | None = None, *, model: str | None = None, kind: str = "zeroshot",
               tags: Iterable[str] = (), root: str | Path = DEFAULT_ROOT) -> "RunFolder":
        """Create (or reuse) a run folder at `run_path(...)`."""
        path = run_path(name, model=model, kind=kind, tags=tags, root=root)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            err = storage_error(exc, path)
            raise err if err is not None else RSGError(f"cannot create this folder ({exc.strerror or exc})",
                                                       file=path, field="--run") from None
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

    # -- one configuration per folder
    def claim(self, kind: str, settings: Mapping[str, Any], *,
              per_task: Mapping[tuple[str, str] | str, Mapping[str, Any]] | None = None, restart: bool = False,
              main: bool | None = None) -> Claim:
        """Lock the folder and make sure it holds results of these settings only; see `claim_folder`.

        `settings`: run-level settings (model identity, dtype, prefix, normalisation, code version, data, ...:
        whatever results depend on, never the task list, split, batch size or device). `per_task`: {(task, split):
        settings of that task split} (template sha256, data file sha256, per-task hyper-parameters; a
        "data_sha256" entry also becomes the state's `data_sha256`, which reports compare). A difference from
        the folder's recorded settings raises RSGError (exit 2) naming each one old -> new, unless `restart`,
        which clears the folder's results (RESULT_NAMES) first. From now on `write_config` records the settings
        and `write_task` stamps each state with them. Release with `claim.release()` (try/finally).
        """
        keyed = {(k if isinstance(k, str) else _task_key(*k)): v for k, v in (per_task or {}).items()}
        claim = claim_folder(self.path, kind, settings, per_task=keyed, restart=restart, record="config.json",
                             has_results=lambda: any(self.path.glob("state/*.json")) or any(
                                 self.path.glob("templates/*/*/state/*.json")),
                             task_has_results=lambda key: self.state_path(*key.split("/")).is_file() or any(
                                 self.path.glob("templates/{0}/*/state/{0}.{1}.json".format(*key.split("/")))),
                             clear=self.clear_results, option="--run", main=main)
        self.claimed = claim
        return claim

    def clear_results(self) -> None:
        """Remove every result (RESULT_NAMES: state, predictions, logs, metrics, zips, epochs.csv, config.json)."""
        for name in RESULT_NAMES:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def _record(self) -> dict | None:
        """The settings results must carry: the active claim's, else config.json's (None: not recorded)."""
        if self.claimed is not None and self.claimed.active:
            return self.claimed.fields(self.read_config() if self.claimed.written else None)
        cfg = self.read_config()
        return cfg if cfg and cfg.get("settings_sha256") else None

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
        """Write config.json; under a claim, with the claim's kind, settings, settings_sha256, task_settings."""
        cfg = _jsonable(dict(config))
        if self.claimed is not None and self.claimed.active:
            try:
                old = self.read_config()
            except RSGError:
                old = None
            cfg.update(self.claimed.fields(old))
            self.claimed.written = True
        return atomic_write_json(self.config_path, cfg)

    def read_config(self) -> dict | None:
        return _read_json(self.config_path)

    # -- per-task results
    def read_state(self, task: str, split: str) -> dict | None:
        return _read_json(self.state_path(task, split))

    def task_problem(self, task: str, split: str, fingerprint: str | None = None) -> str | None:
        """Why the results of `task`/`split` cannot be used; None when they can.

        Usable = a state file (the commit mark) made with this `fingerprint` (when given) and with the folder's
        settings (`settings_sha256` and the task split's `task_settings`, when the folder records them), and
        predictions and logs whose size and sha256 are those the state recorded (a truncated or edited file is
        caught). States written before hashes were recorded: the logs must hold `n_items` lines."""
        name = _task_name(task)
        try:
            state = self.read_state(name, split)
        except RSGError:
            return f"state/{name}.{split}.json is damaged (not valid JSON)"
        if not state:
            return "not finished"
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            return "made with other settings"
        record = self._record()
        if record is not None:
            if state.get("settings_sha256") != record.get("settings_sha256"):
                return "made with other settings than the folder's config.json (stale)"
            want = (record.get("task_settings") or {}).get(_task_key(name, split))
            if want is not None and _jsonable(state.get("task_settings")) != _jsonable(want):
                return "made with other task settings than the folder's config.json (stale)"
        files = state.get("files") or {}
        for what, path in (("predictions", self.predictions_path(name, split)), ("logs", self.logs_path(name, split))):
            rel = path.relative_to(self.path).as_posix()
            if not path.is_file():
                return f"{rel} is missing"
            expect = files.get(what)
            if expect:
                size = path.stat().st_size
                if size != expect.get("bytes") or sha256_file(path) != expect.get("sha256"):
                    return (f"{rel} does not match its state ({size} bytes, recorded {expect.get('bytes')}; "
                            f"sha256 differs): truncated or edited")
            elif what == "logs" and state.get("n_items") is not None:
                n = _count_lines(path)
                if n != state["n_items"]:
                    return f"{rel} holds {n} items, its state {state['n_items']}: truncated or edited"
        return None

    def is_done(self, task: str, split: str, fingerprint: str) -> bool:
        """True when `task`/`split` finished with exactly this fingerprint, with the folder's settings, and its
        files are intact (`task_problem` is None)."""
        return self.task_problem(task, split, fingerprint) is None

    def write_task(self, task: str, split: str, items: Sequence[Any], preds: Mapping[Any, Any],
                   rows: Sequence[Mapping[str, Any]], fingerprint: str, *,
                   parts: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                   data_sha256: str | None = None) -> None:
        """Record one finished task: predictions, per-item logs, then the state file (the commit mark).

        `preds` maps item.key -> canonical label for every item; `rows` are `log_row`s aligned with `items`.
        The state records the item count and each file's size and sha256 (`task_problem` checks them), the
        claim's `settings_sha256` and this task split's `task_settings`, and `data_sha256` (the data file's
        sha256: given, else the task settings' "data_sha256", else the parts'), which reports compare.
        """
        from rsg_eval.core import submission

        name = _task_name(task)
        if len(rows) != len(items):
            raise ValueError(f"{name}/{split}: {len(rows)} log rows for {len(items)} items")
        missing = [it.key for it in items if it.key not in preds]
        if missing:
            raise ValueError(f"{name}/{split}: no prediction for keys {missing[:5]}")
        claim = self.claimed if self.claimed is not None and self.claimed.active else None
        if claim is not None and not claim.written:  # the record goes first: stamped states need their config
            try:
                old = self.read_config() or {}
            except RSGError:
                old = {}
            self.write_config(old)
        # Remove the old commit mark first: if we die below, the task reads as unfinished and is redone.
        self.state_path(name, split).unlink(missing_ok=True)
        pred_dir = self.predictions_path(name, split).parent
        pred_dir.mkdir(parents=True, exist_ok=True)
        submission.write_task_file(pred_dir, name, items, preds)
        atomic_write_jsonl(self.logs_path(name, split), [_jsonable(dict(r)) for r in rows])
        task_settings = claim.per_task.get(_task_key(name, split)) if claim is not None else None
        if data_sha256 is None:
            data_sha256 = (task_settings or {}).get("data_sha256") or (parts or {}).get("data_sha256")
        state = {
            "task": name, "split": split, "fingerprint": fingerprint, "parts": _jsonable(dict(parts or {})),
            "n_items": len(items), "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        state.update(_jsonable(dict(extra or {})))
        state.update({
            "data_sha256": data_sha256,
            "settings_sha256": claim.settings_sha256 if claim is not None else None,
            "task_settings": _jsonable(task_settings) if task_settings is not None else None,
            "files": {what: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                      for what, path in (("predictions", self.predictions_path(name, split)),
                                         ("logs", self.logs_path(name, split)))},
        })
        atomic_write_json(self.state_path(name, split), state)

    def finished(self, split: str) -> list[str]:
        """Tasks of `split` with usable results (`task_problem` is None: finished, current, intact), in
        leaderboard order. Only these go into metrics.json, the zip and reports."""
        from rsg_eval.core.tasks import TASK_NAMES

        return [t for t in TASK_NAMES if self.task_problem(t, split) is None]

    def ignored(self, split: str) -> dict[str, str]:
        """{task: why} for tasks of `split` that have a state file but unusable results (stale or damaged):
        named wherever results are combined, never mixed in."""
        from rsg_eval.core.tasks import TASK_NAMES

        out = {}
        for t in TASK_NAMES:
            if self.state_path(t, split).is_file():
                why = self.task_problem(t, split)
                if why is not None:
                    out[t] = why
        return out

    def data_fingerprints(self, split: str) -> dict[str, str | None]:
        """{task: sha256 of the data file its results came from} for the usable tasks of `split` (None where a
        state does not record it)."""
        out = {}
        for t in self.finished(split):
            try:
                out[t] = (self.read_state(t, split) or {}).get("data_sha256")
            except RSGError:
                out[t] = None
        return out

    def read_logs(self, task: str, split: str) -> list[dict]:
        return [rec for _, rec in read_jsonl(self.logs_path(task, split))]

    def read_predictions(self, task: str, split: str) -> dict:
        """The leaderboard file of `task`/`split` back to {key: canonical label}."""
        from rsg_eval.core import submission

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
        from rsg_eval.core import metrics

        tasks: dict[str, dict] = {}
        counts: dict[str, int] = {}
        diagnostics: dict[str, dict] = {}
        data: dict[str, str | None] = {}
        usable = self.finished(split)
        for name in usable:
            rows = [r for r in self.read_logs(name, split) if r.get("gold") is not None]
            if not rows:
                continue
            golds = [r["gold"] for r in rows]
            preds = [r["pred"] for r in rows]
            groups = [r["group"] for r in rows]
            tasks[name] = {k: float(v) for k, v in metrics.score(name, golds, preds, groups=groups).items()}
            counts[name] = len(rows)
            try:
                data[name] = (self.read_state(name, split) or {}).get("data_sha256")
            except RSGError:
                data[name] = None
            if name == "LiDiRus":
                items = [item_from_row(name, split, r) for r in rows]
                diagnostics = metrics.lidirus_diagnostics(items, {r["key"]: r["pred"] for r in rows})
        total = metrics.total({t: m["score"] for t, m in tasks.items()})
        record = self._record() or {}
        return {"split": split, "tasks": tasks, "total": total, "lidirus_diagnostics": diagnostics,
                "counts": counts, "data_sha256": data, "settings_sha256": record.get("settings_sha256"),
                "ignored": self.ignored(split)}

    def write_metrics(self, split: str = "val") -> dict:
        result = self.compute_metrics(split)
        atomic_write_json(self.metrics_path, result)
        return result

    def read_metrics(self) -> dict | None:
        return _read_json(self.metrics_path)

    # -- submission zip
    def build_zip(self) -> ZipResult:
        """Zip predictions/test: submission.zip with all nine tasks, else submission-partial.zip."""
        from rsg_eval.core import submission
        from rsg_eval.core.tasks import TASK_NAMES

        done = self.finished("test")
        missing = tuple(t for t in TASK_NAMES if t not in done)
        ignored = self.ignored("test")
        if not done:
            for name in (ZIP_NAME, PARTIAL_ZIP_NAME):  # a zip of results that no longer count must not stay
                (self.path / name).unlink(missing_ok=True)
            return ZipResult(None, (), missing, ignored)
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
        return ZipResult(out, tuple(done), missing, ignored)

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

def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())



def _number(text: str | None) -> Any:
    if text is None or text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def item_from_row(task: str, split: str, row: Mapping[str, Any]) -> Any:
    """An `Item` rebuilt from a log row (enough for metrics and diagnostics; no template fields)."""
    from rsg_eval.core.tasks import Item

    gold = row.get("gold")
    return Item(task=task, split=split, key=row["key"], group=row["group"], doc=row.get("doc", row["group"]),
                fields={}, labels=tuple(row.get("labels") or ()),
                gold=tuple(gold) if isinstance(gold, list) else gold, meta=dict(row.get("meta") or {}))
