"""Claiming a folder: the lock plus the one-configuration check of its recorded settings. Light."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import atomic_write_json, is_regular_file, read_json, storage_error
from rsg_eval.core.limits import LINE_BYTES
from rsg_eval.runs.lock import FolderLock, is_main_process
from rsg_eval.runs.names import LOCK_NAME, RUN_MARKER, _jsonable, _task_name, check_run_path, fingerprint


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
                if d == self.folder and [p.name for p in d.iterdir()] == [RUN_MARKER]:
                    (d / RUN_MARKER).unlink()  # nothing but our marker: the folder goes as if never made
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
                 main: bool | None = None, legacy_names: Iterable[str] = ()) -> Claim:
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
    check_run_path(folder, option=option)
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err = storage_error(exc, folder)
        raise err if err is not None else RSGError(f"cannot create this folder ({exc.strerror or exc})",
                                                   file=folder, field=option) from None
    claim.created = list(reversed(missing))
    _check_ours(folder, claim.record, option, legacy_names)
    claim.lock = FolderLock(folder).acquire()
    try:
        marker = folder / RUN_MARKER
        if not marker.is_file():
            atomic_write_json(marker, {"written_by": "rsg-eval", "kind": kind,
                                       "note": "marks a folder rsg made; rsg --restart clears only its own files"})

        _check_claim(claim, restart=restart, has_results=has_results, task_has_results=task_has_results,
                     clear=clear, unrecorded=unrecorded, option=option)
    except BaseException:
        claim.release()
        raise
    return claim


def _check_ours(folder: Path, record: Path | None, option: str, legacy_names: Iterable[str] = ()) -> None:
    """Refuse a folder the tool did not make: one holding files but no RUN_MARKER, unless its record file
    (config.json) is a record the tool wrote before markers existed. `--run ..` (the current directory, a home
    folder, a project) is thereby never written into nor cleared."""
    if (folder / RUN_MARKER).is_file():
        return
    try:
        names = sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, LOCK_NAME + ".takeover"))
    except OSError as exc:
        raise RSGError(f"cannot list this folder ({exc.strerror or exc})", file=folder, field=option) from None
    known = set(legacy_names)
    if not names or (known and all(n in known or n.startswith(".") for n in names)):
        return
    if record is not None and is_regular_file(record):
        try:
            old = read_json(record, max_bytes=LINE_BYTES.value())
        except RSGError:
            old = None
        if isinstance(old, dict) and ("settings_sha256" in old or old.get("kind") in _RUN_KINDS):
            return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise RSGError(f"holds files this tool did not write ({shown}) and no {RUN_MARKER} marker, so it is not a run "
                   f"folder; --restart would delete files there. Pick a new or empty folder for {option}",
                   file=folder, field=option, expected="a new or empty folder, or a run folder this tool made")


_RUN_KINDS = ("zeroshot", "finetune", "nli-head", "train-hmtl")


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



def _read_json(path: Path) -> dict | None:
    """A run folder's JSON object file (config.json, metrics.json, a state); None when absent. Read with
    io.read_json (depth, huge integers, surrogates, a FIFO or folder in its place: one RSGError); a value that
    is not an object is an RSGError too (a list is no config)."""
    if not os.path.lexists(path):
        return None
    value = read_json(path, max_bytes=LINE_BYTES.value())
    if not isinstance(value, dict):
        raise RSGError(f"not valid JSON (a JSON {type(value).__name__} instead of an object)", file=path,
                       expected="a JSON object {...}")
    return value
