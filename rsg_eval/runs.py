"""Run folders: the files a zero-shot or fine-tuning run leaves behind, and the only thing reports read.

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

import atexit
import csv
import datetime as _dt
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from rsg_eval.errors import RSGError
from rsg_eval.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, sha256_file

DEFAULT_ROOT = Path("submissions")
SPLITS = ("val", "test")
ZIP_NAME = "submission.zip"
PARTIAL_ZIP_NAME = "submission-partial.zip"
LOCK_NAME = "rsg.lock"
# What `--restart` clears in a run folder (known names only: never the folder itself, which may be any path).
RESULT_NAMES = ("state", "predictions", "logs", "metrics.json", ZIP_NAME, PARTIAL_ZIP_NAME, "epochs.csv",
                "config.json")


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
    ignored: Mapping[str, str] = field(default_factory=dict)  # task -> why its (stale/damaged) results were left out

    @property
    def complete(self) -> bool:
        return self.path is not None and not self.missing


# --------------------------------------------------------------------------------------------------- lock

def is_main_process() -> bool:
    """False on every process but rank 0 under torchrun / `accelerate launch` (both set RANK); True alone.

    Read from the environment (as rsg_eval.engine.runtime does), so this light module needs no torch."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot, /proc/PID/stat field 22); None without /proc.

    Recorded in the lock so that a PID reused by an unrelated process is not mistaken for the holder."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name (field 2) may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    except OSError:
        return False
    now = _proc_start(pid)
    return start is None or now is None or now == start


_HELD: dict[str, "FolderLock"] = {}  # locks this process holds, released at exit if a caller forgot


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()


class FolderLock:
    """An exclusive lock on a folder: `<folder>/rsg.lock`, created with O_CREAT|O_EXCL, holding the PID, host,
    process start time and command of its holder.

    A second process gets an RSGError naming the holder. A lock whose holder is gone (its PID is not alive on
    this host, or now belongs to a process started at another time) is taken over. Released by `release()`
    (callers use try/finally, so Ctrl-C and errors release it too) and, as a safety net, at interpreter exit.
    """

    #: a lock file younger than this that cannot be read yet is being written by its creator: held
    FRESH_SECONDS = 10.0

    def __init__(self, folder: str | Path, name: str = LOCK_NAME) -> None:
        self.path = Path(folder) / name
        self.token: str | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def holder(self) -> dict | None:
        """The lock file's record; {} when it exists but cannot be read; None when there is no lock."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _gone(self, rec: dict) -> bool:
        """True when the holder recorded in `rec` is certainly not running any more."""
        if not rec:  # unreadable: its creator may be writing it right now
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return True
            return age > self.FRESH_SECONDS
        if rec.get("host") != socket.gethostname():
            return False  # another machine (a shared disk): its PIDs cannot be checked from here
        try:
            pid = int(rec.get("pid"))
        except (TypeError, ValueError):
            return True
        if pid == os.getpid() and rec.get("token") not in {lk.token for lk in _HELD.values()}:
            return rec.get("proc_start") != _proc_start(pid)  # our PID, another (dead) process's lock
        return not _pid_alive(pid, rec.get("proc_start"))

    def _take_over(self, seen: dict) -> None:
        """Remove a dead holder's lock file, unless it changed since we looked (another process took it).

        A guard file (itself O_EXCL) makes the re-check and the removal one step, so two processes taking over
        the same stale lock cannot remove each other's fresh one."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > self.FRESH_SECONDS:
                    guard.unlink(missing_ok=True)  # left by a process killed during a take-over
            except OSError:
                pass
            time.sleep(0.05)
            return
        try:
            if self.holder() == seen:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def acquire(self) -> "FolderLock":
        if self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self.holder()
                if rec is None:
                    continue  # released between our open and our read: try again
                if not self._gone(rec):
                    raise self._busy(rec) from None
                if time.monotonic() > deadline:
                    raise RSGError("could not take over a stale lock (another process keeps recreating it)",
                                   file=self.path) from None
                self._take_over(rec)
                continue
            token = secrets.token_hex(8)
            rec = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
                   "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   "command": " ".join(sys.argv)[:500], "token": token}
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
            except BaseException:
                self.path.unlink(missing_ok=True)
                raise
            self.token = token
            _HELD[str(self.path.resolve())] = self
            return self

    def _busy(self, rec: dict) -> RSGError:
        if not rec:
            return RSGError("the folder is being locked by another process right now; try again", file=self.path)
        who = f"PID {rec.get('pid')} on {rec.get('host')}, started {rec.get('started')}"
        cmd = f" ({rec['command']})" if rec.get("command") else ""
        if rec.get("host") != socket.gethostname():
            hint = f"wait for it to finish; if that process is gone, delete {self.path}"
        else:
            hint = "wait for it to finish or stop it, or use another folder"
        return RSGError(f"in use by another rsg process: {who}{cmd}; {hint}", file=self.path.parent)

    def release(self) -> None:
        """Remove the lock file if it is still ours; idempotent."""
        if not self.held:
            return
        try:
            rec = self.holder()
            if rec and rec.get("token") == self.token:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        _HELD.pop(str(self.path.resolve()), None)
        self.token = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------- claim

def _show(value: Any) -> str:
    """A setting's value for a message: hashes shortened, everything else as repr."""
    if isinstance(value, str) and re.fullmatch(r"(dir-)?[0-9a-f]{16,}", value):
        return value[:12] + "…"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Each setting whose value differs, as "name: old -> new" (nested mappings compared key by key)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif _jsonable(a) != _jsonable(b):
            out.append(f"{prefix}{key}: {_show(a)} -> {_show(b)}")
    return out


# A config.json written before settings were recorded: the keys it has at its top level that mean the same
LEGACY_KEYS = ("kind", "model", "revision", "normalize", "calibrate", "limit", "prefix")


def _task_key(task: str, split: str) -> str:
    return f"{_task_name(task)}/{split}"


@dataclass
class Claim:
    """A folder claimed for one configuration: held lock + the settings its results must carry.

    `settings`: the run-level settings (one value for the whole folder); `per_task`: {"Task/split": settings of
    that task split} (templates, data files, per-task hyper-parameters). `settings_sha256` stamps every result.
    On a process other than rank 0, `main` is False: no lock, no checks, no writes (rank 0 does them)."""

    folder: Path
    kind: str
    settings: dict
    per_task: dict = field(default_factory=dict)
    record: Path | None = None
    restarted: bool = False
    main: bool = True
    lock: FolderLock | None = None
    written: bool = False
    created: list = field(default_factory=list)  # folders the claim made, removed on release when left empty
    released: bool = False

    @property
    def active(self) -> bool:
        """Held by this (main) process: results written now carry its settings."""
        return self.main and not self.released

    @property
    def settings_sha256(self) -> str:
        return fingerprint({"kind": self.kind, "settings": _jsonable(self.settings)})

    def fields(self, old: Mapping[str, Any] | None = None) -> dict:
        """The record keys: kind, settings, settings_sha256, task_settings (merged with `old`'s)."""
        tasks = dict((old or {}).get("task_settings") or {}) if (old or {}).get("settings_sha256") == \
            self.settings_sha256 else {}
        tasks.update(_jsonable(self.per_task))
        return {"kind": self.kind, "settings": _jsonable(self.settings), "settings_sha256": self.settings_sha256,
                "task_settings": tasks}

    def write_record(self, extra: Mapping[str, Any] | None = None) -> None:
        """Write the record file (the run folder's config.json): its old content, `extra`, then `fields()`."""
        if not self.main or self.record is None:
            return
        old = _read_json(self.record) or {}
        atomic_write_json(self.record, {**old, **_jsonable(dict(extra or {})), **self.fields(old)})
        self.written = True

    def release(self) -> None:
        """Release the lock; a folder this claim created and nothing was written to is removed again."""
        self.released = True
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        for d in reversed(self.created):
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        self.created = []

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_folder(folder: str | Path, kind: str, settings: Mapping[str, Any], *,
                 per_task: Mapping[str, Mapping[str, Any]] | None = None, restart: bool = False,
                 record: str = "config.json", has_results: Callable[[], bool],
                 task_has_results: Callable[[str], bool] = lambda key: False,
                 clear: Callable[[], None], unrecorded: str = "compare", option: str = "--run",
                 main: bool | None = None) -> Claim:
    """Lock `folder` and check that it holds results of these settings only (the one-configuration rule).

    The generic mechanism behind `RunFolder.claim` (and `rsg train-hmtl --out`): takes the lock, reads the
    record file, and when the folder holds results (`has_results()`) made with other settings (or a task split
    in `per_task` whose results (`task_has_results(key)`) were made with other per-task settings) raises an
    RSGError naming each difference old -> new and the way out, unless `restart`, which calls `clear()` first.
    Settings that differ while nothing was finished just replace the old ones (`clear()` removes the leftovers).
    A record without settings (written before this rule): `unrecorded="compare"` compares the keys it has at
    its top level, "refuse" refuses when there are results. The caller must `release()` the claim (try/finally).
    """
    folder = Path(folder)
    main = is_main_process() if main is None else main
    claim = Claim(folder, kind, dict(settings), {k: dict(v) for k, v in (per_task or {}).items()},
                  record=folder / record, main=main)
    if not main:
        return claim
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    claim.created = list(reversed(missing))
    claim.lock = FolderLock(folder).acquire()
    try:
        _check_claim(claim, restart=restart, has_results=has_results, task_has_results=task_has_results,
                     clear=clear, unrecorded=unrecorded, option=option)
    except BaseException:
        claim.release()
        raise
    return claim


def _check_claim(claim: Claim, *, restart: bool, has_results: Callable[[], bool],
                 task_has_results: Callable[[str], bool], clear: Callable[[], None], unrecorded: str,
                 option: str) -> None:
    way_out = f"pass --restart to clear its results and start over, or pick another {option}"
    if restart:
        clear()
        claim.restarted = True
        return
    try:
        old = _read_json(claim.record) if claim.record is not None else None
    except RSGError as exc:
        if not has_results():
            clear()
            return
        raise RSGError(f"{exc.message}, so the settings of its results are unknown; {way_out}", file=exc.file,
                       line=exc.line) from None
    if not has_results():
        if old is not None and old.get("settings_sha256") not in (None, claim.settings_sha256):
            clear()  # nothing finished under the old settings: leftovers only
        return
    new = {"kind": claim.kind, **claim.settings}
    if old is None or "settings_sha256" not in old:
        if unrecorded == "refuse":
            raise RSGError(f"holds results but no record of the settings that made them; {way_out}",
                           file=claim.folder, field=option)
        old = old or {}
        keys = [k for k in LEGACY_KEYS if k in new and k in old]
        diffs = settings_diff({k: old[k] for k in keys}, {k: new[k] for k in keys})
        per_task = False
    else:
        diffs = settings_diff({"kind": old.get("kind"), **(old.get("settings") or {})}, _jsonable(new))
        per_task = not diffs
        if per_task:
            done = old.get("task_settings") or {}
            for key in sorted(claim.per_task):
                if key in done and task_has_results(key):
                    diffs += settings_diff(done[key], _jsonable(claim.per_task[key]), f"{key} ")
    if diffs:
        more = " (or leave those finished task splits out of --tasks)" if per_task else ""
        raise RSGError(f"holds results made with other settings: {'; '.join(diffs)}. One folder holds one "
                       f"configuration: {way_out}{more}", file=claim.folder, field=option)


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
                             has_results=lambda: any(self.path.glob("state/*.json")),
                             task_has_results=lambda key: self.state_path(*key.split("/")).is_file(),
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
        from rsg_eval import submission

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
        from rsg_eval.tasks import TASK_NAMES

        return [t for t in TASK_NAMES if self.task_problem(t, split) is None]

    def ignored(self, split: str) -> dict[str, str]:
        """{task: why} for tasks of `split` that have a state file but unusable results (stale or damaged):
        named wherever results are combined, never mixed in."""
        from rsg_eval.tasks import TASK_NAMES

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
                items = [_item_from_row(name, split, r) for r in rows]
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
        from rsg_eval import submission
        from rsg_eval.tasks import TASK_NAMES

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

def _task_name(task: str) -> str:
    from rsg_eval.tasks import get_task

    return get_task(task).name


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """A cheap content fingerprint of files (a corpus, a model folder's files): name, size, and the sha256 of
    files up to 8 MiB, of the first and last MiB of larger ones."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as fh:
            if size <= 8 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return h.hexdigest()


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
