"""Run names, fingerprints and per-item log rows (docs/design.md "Run folders"). Light: no torch."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rsg_eval.core.errors import RSGError, clip

DEFAULT_ROOT = Path("submissions")
SPLITS = ("val", "test")
ZIP_NAME = "submission.zip"
PARTIAL_ZIP_NAME = "submission-partial.zip"
LOCK_NAME = "rsg.lock"
# Written into every folder the tool claims: only a folder holding it (or an empty one, or one from before the
# marker whose record file is the tool's) is written into, and so cleared by --restart.
RUN_MARKER = ".rsg-run"
# What `--restart` clears in a run folder (known names only: never the folder itself, which may be any path).
RESULT_NAMES = ("state", "predictions", "logs", "metrics.json", ZIP_NAME, PARTIAL_ZIP_NAME, "epochs.csv",
                "config.json", "templates", "spread.json")  # templates/, spread.json: multi-template runs


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
    """One per-item log line (logs/<split>/<Task>.jsonl) for an `rsg_eval.core.tasks.Item` and its prediction."""
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
    is_path = "/" in text or "\\" in text or Path(text).is_absolute()
    if not is_path and text in (".", ".."):
        raise RSGError(f"{text!r} is not a run name (it would be --root itself or the folder above it)",
                       field="--run", expected="a name such as my-run, or a path such as runs/my-run")
    path = Path(text) if is_path else Path(root) / text
    check_run_path(path, root=root)
    return path


def check_run_path(path: str | Path, *, root: str | Path | None = None, option: str = "--run") -> None:
    """RSGError (one line) for a run folder path the tool must not write into or clear: a name component over
    255 bytes (ENAMETOOLONG), a symlink to nothing (dangling or looping), a file, a path under /proc, /sys or
    /dev, the working directory or a folder above it, `root` itself or a folder above it (so `--restart` can
    never delete the files of a folder that holds the user's work)."""
    path = Path(path)
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise RSGError(f"a name of {len(part.encode('utf-8', 'surrogateescape')):,} bytes in the path "
                           f"{clip(str(path), 80)!r}: file systems allow 255", field=option,
                           expected="names of at most 255 bytes")
    if os.path.islink(path) and not path.is_dir():
        raise RSGError("is a symbolic link to nothing (dangling, or pointing at itself)", file=path, field=option,
                       expected="a folder, or a name that does not exist yet")
    if os.path.lexists(path) and not path.is_dir():
        raise RSGError("exists and is not a folder", file=path, field=option)
    try:
        real = path.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop in a parent folder
        raise RSGError(f"cannot be resolved ({exc})", file=path, field=option) from None
    if real.parts[1:2] and real.parts[1] in ("proc", "sys", "dev") and real.anchor == "/":
        raise RSGError(f"is under /{real.parts[1]}, a kernel file system, not a place for results", file=path,
                       field=option, expected="a folder on a disk")
    if real == cwd or real in cwd.parents:
        raise RSGError("is the working directory or a folder above it; a run folder of its own is needed "
                       "(--restart would clear results there)", file=path, field=option,
                       expected="a new or empty folder, or a run folder this tool made")
    if root is not None:
        root_real = Path(root).resolve()
        if real == root_real or real in root_real.parents:
            raise RSGError("is --root itself or a folder above it", file=path, field=option,
                           expected="a run name under --root")




def _task_name(task: str) -> str:
    from rsg_eval.core.tasks import get_task

    return get_task(task).name


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
