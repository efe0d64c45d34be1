"""Where the RSG files are: the bundled sample, a local folder or zip, or the download cache.

Torch-free. A data folder is laid out like the official per-task downloads (`<Task>/{train,val,test}.jsonl`,
`LiDiRus/LiDiRus.jsonl`), optionally one level down in `combined/` (the all-tasks zip). Zips are extracted
only inside their target folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import sha256_file, zip_member_problem  # noqa: F401  (sha256_file: also imported from here)
from rsg_eval.core.io import read_jsonl
from rsg_eval.core.tasks import OFFICIAL_RECORDS, TASK_NAMES, Item, check_split, get_task, parse_records

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "samples" / "sample"
DOWNLOAD_URL = "https://russiansuperglue.com/tasks/download/{task}"

# sha256 and size of the official per-task zips (RSG_SPEC.md section 0, from the HF dataset_infos.json).
CHECKSUMS: dict[str, tuple[int, str]] = {
    "LiDiRus": (47118, "e1bc2c55cadbc98b0e77a43e1560af8e2fe336ab4bc372f545f69cb48a479cdc"),
    "RCB": (136700, "9ecc0bd0cc04e04922349212452166404b5a75b67be9e6aa996c80c64beb6ddb"),
    "PARus": (57585, "7093c859a6ab07eab54c86cdd686b7b14afffee46abcd3e2d43876b1fdb8fa59"),
    "MuSeRC": (1196720, "679d69df99113d8ca6416eda5583a81ab324f5438097216a416d09e745d2f668"),
    "TERRa": (907346, "fc7320210b5b6f7087615f13558868de55f46d5e0e365d9d82968c66e6e0dba7"),
    "RUSSE": (3806009, "60ecf42ea0f3893e857e0a9522ab92a2ae2ec713d1ab361f2f6f594d0f5324a5"),
    "RWSD": (40508, "65894cf114f022a0469bbd535f045d50880e03aa822cd1f3693a54b3665fa962"),
    "DaNetQA": (1293761, "b5b4bcfe17e1eb16aa13a7aab4ca088871e27b0851468e9a07b9b528bb42fb96"),
    "RuCoS": (56208297, "e2f42700122e79cfcce792b54df792630f033eb21e14863cede5852f3aa0d078"),
}


def default_data_dir() -> Path:
    """$RSG_DATA_DIR, else the user cache folder (e.g. ~/.cache/rsg-eval/rsg)."""
    env = os.environ.get("RSG_DATA_DIR")
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("rsg-eval")) / "rsg"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".cache" / "rsg-eval" / "rsg"


@dataclass(frozen=True)
class DataSource:
    """A resolved data root; `origin` is what the user asked for (for messages and run configs)."""

    root: Path
    origin: str

    def task_dir(self, task: str) -> Path | None:
        name = get_task(task).name
        for base in (self.root, self.root / "combined"):
            if not base.is_dir():
                continue
            for child in base.iterdir():  # task folders may differ in case between mirrors
                if child.is_dir() and child.name.lower() == name.lower():
                    return child
        return None

    def path(self, task: str, split: str) -> Path:
        """The file of one split; RSGError naming what is missing when it is not there."""
        name = get_task(task).name
        check_split(name, split)
        d = self.task_dir(name)
        if d is None:
            raise RSGError(f"no {name}/ folder in the data ({self.origin})", file=self.root,
                           expected=f"{name}/ with train.jsonl, val.jsonl, test.jsonl (run `rsg data download`)")
        if name == "LiDiRus":
            for cand in ("LiDiRus.jsonl", "test.jsonl"):
                for f in d.iterdir():
                    if f.name.lower() == cand.lower():
                        return _regular(f)
            raise RSGError("missing LiDiRus.jsonl", file=d, expected="LiDiRus/LiDiRus.jsonl")
        f = d / f"{split}.jsonl"
        if not os.path.lexists(f):
            raise RSGError(f"missing {split}.jsonl for {name}", file=d, expected=f"{name}/{split}.jsonl")
        return _regular(f)

    def has(self, task: str, split: str) -> bool:
        try:
            self.path(task, split)
            return True
        except RSGError:
            return False

    def __str__(self) -> str:
        return self.origin


def _regular(f: Path) -> Path:
    """`f` when it is a regular file (or a link to one); an RSGError naming what it is instead: a FIFO would
    block the reader forever, a folder would be a traceback, a dangling link reads as missing."""
    try:
        mode = os.stat(f).st_mode
    except OSError as exc:
        raise RSGError(f"cannot be read ({exc.strerror or exc}: a dangling link?)", file=f,
                       expected="a JSON Lines file") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device or socket")
        raise RSGError(f"{kind}, not a file", file=f, expected="a JSON Lines file")
    return f


def resolve_data(spec: str | Path | DataSource | None) -> DataSource:
    """Turn a --data value into a DataSource.

    "sample" selects the bundled sample; a folder or a zip is read as the official layout; None means the
    download cache (default_data_dir()).
    """
    if isinstance(spec, DataSource):
        return spec
    if spec is None or str(spec) == "":
        root = default_data_dir()
        if not root.is_dir() or not any(root.iterdir()):
            raise RSGError(f"no RSG data in {root}", field="--data",
                           expected="run `rsg data download`, or pass --data DIR|ZIP|sample")
        return DataSource(root, str(root))
    if str(spec) == "sample":
        return DataSource(SAMPLE_DIR, "sample")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".zip":
        return DataSource(_extract_cached(p), str(p))
    if not p.exists():
        raise RSGError("data folder does not exist", file=p, field="--data",
                       expected="a folder laid out like the official download, a zip of it, or 'sample'")
    if not p.is_dir():
        raise RSGError("not a folder or a .zip", file=p, field="--data")
    src = DataSource(p, str(p))
    if not any(src.task_dir(t) for t in TASK_NAMES):
        inner = _tasks_subfolder(p)
        if inner is not None:  # --data ../shared when the tasks are in ../shared/rsg: say so, not 25 missing files
            raise RSGError("no RSG task folders here; they are in a subfolder", file=p, field="--data",
                           expected=f"--data {inner}")
    return src


def _tasks_subfolder(root: Path) -> Path | None:
    """The first subfolder of `root` (one or two levels down) that holds RSG task folders, or None."""
    def holds_tasks(d: Path) -> bool:
        src = DataSource(d, str(d))
        return any(src.task_dir(t) for t in TASK_NAMES)

    try:
        level1 = sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith("."))
        for cand in level1:
            if holds_tasks(cand):
                return cand
        for cand in level1:
            for sub in sorted(c for c in cand.iterdir() if c.is_dir() and not c.name.startswith(".")):
                if holds_tasks(sub):
                    return sub
    except OSError:  # an unreadable folder: no suggestion, the usual errors follow
        return None
    return None


def _extract_cached(zip_path: Path) -> Path:
    """Extract a data zip once into the cache, keyed by its sha256, and return the folder."""
    digest = sha256_file(zip_path)[:16]
    target = default_data_dir().parent / "extracted" / digest
    if target.is_dir():
        return target
    safe_extract(zip_path, target)
    return target


def safe_member_name(name: str) -> PurePosixPath | None:
    """The member's relative path, or None if it would land outside the target (zip slip) or is junk."""
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        return None
    return p


_SPLIT_FILES = ("train.jsonl", "val.jsonl", "test.jsonl")


def task_member(rel: PurePosixPath) -> tuple[str, str] | None:
    """(task, file name in lower case) when a zip member is a task file a DataSource reads
    (`<Task>/<split>.jsonl`, `LiDiRus/LiDiRus.jsonl`, optionally under `combined/`), else None."""
    parts = rel.parts[1:] if rel.parts and rel.parts[0].lower() == "combined" else rel.parts
    if len(parts) != 2:
        return None
    task = next((t for t in TASK_NAMES if t.lower() == parts[0].lower()), None)
    name = parts[1].lower()
    if task is None or not (name in _SPLIT_FILES or (task == "LiDiRus" and name == "lidirus.jsonl")):
        return None
    return task, name


def _temp_tag() -> str:
    """host-pid, put into temporary names so that a later run can tell a dead process's leftovers."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def remove_stale_temps(folder: Path, prefix: str) -> list[Path]:
    """Remove `folder/<prefix><host>-<pid>-...` entries left by a process of this host that is gone (killed
    during an extraction or a download); entries of live processes (a parallel run) are left alone."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host = socket.gethostname().replace("-", "_")
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix):
            continue
        fields = entry.name[len(prefix):].split("-")
        if len(fields) < 3 or fields[0] != host or not fields[1].isdigit() or _alive(int(fields[1])):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def safe_extract(zip_path: Path, target: Path) -> list[Path]:
    """Extract the task files of a data zip inside `target` only; return the paths written.

    Refused before anything is written: a member path outside the target (zip slip), two members with one
    name (the second would silently replace the first), a zip without task files, task files larger together
    than RSG_MAX_ZIP_BYTES, or one compressed more than RSG_MAX_ZIP_RATIO to 1 (a zip bomb). Other members
    (notes, macOS `__MACOSX/` junk, anything else) are not extracted at all. Extraction goes to a temporary
    folder renamed at the end; a failure removes it, and one left by a killed process is removed by the
    next extraction.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise RSGError(f"not a valid zip file ({exc})", file=zip_path) from None
    with zf:
        members = _task_members(zf, zip_path)
        return _extract_members(zf, zip_path, members, target)


def _task_members(zf: zipfile.ZipFile, zip_path: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The zip's task files (info, relative path), every refusal of `safe_extract` checked first."""
    from rsg_eval.core.limits import ZIP_BYTES, ZIP_RATIO

    members: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    seen: dict[str, str] = {}
    for info in zf.infolist():
        rel = safe_member_name(info.filename)
        if rel is None:
            raise RSGError(f"zip member {info.filename!r} would be written outside the target folder",
                           file=zip_path, expected="relative paths without '..'")
        if info.is_dir():
            continue
        problem = zip_member_problem(info) if task_member(rel) is not None else None
        if problem is not None:
            raise RSGError(f"zip member {info.filename!r} {problem}", file=zip_path,
                           expected="a zip of the task files, unencrypted, deflate or stored")
        key = str(rel).lower()  # task folders are matched case-insensitively: TERRa/ and terra/ collide
        if key in seen:
            both = f"{info.filename!r} twice" if seen[key] == info.filename else \
                f"{seen[key]!r} and {info.filename!r} (task folders match in any case)"
            raise RSGError(f"the zip holds {both}; extracting both would silently keep only the last",
                           file=zip_path, expected="each file once")
        seen[key] = info.filename
        if task_member(rel) is not None:
            members.append((info, rel))
    if not members:
        raise RSGError("no RSG task files in the zip", file=zip_path,
                       expected="<Task>/train.jsonl, val.jsonl, test.jsonl (LiDiRus/LiDiRus.jsonl), "
                                "optionally under combined/")
    total = sum(info.file_size for info, _ in members)
    if total > ZIP_BYTES.value():
        raise ZIP_BYTES.error(f"its task files hold {total:,} bytes uncompressed", file=zip_path)
    for info, _ in members:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > (1 << 20) and ratio > ZIP_RATIO.value():
            raise ZIP_RATIO.error(f"member {info.filename!r} is compressed {ratio:,.0f} to 1 "
                                  f"({info.file_size:,} bytes uncompressed): a zip bomb?", file=zip_path)
    return members


def _extract_members(zf: zipfile.ZipFile, zip_path: Path, members: list[tuple[zipfile.ZipInfo, PurePosixPath]],
                     target: Path) -> list[Path]:
    """Write the checked members into a temporary folder beside `target`, then rename it (or merge it into an
    existing `target`); a failure removes the temporary folder."""
    import zlib

    from rsg_eval.core.io import guarded_write

    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.extract-"
    remove_stale_temps(target.parent, prefix)
    written: list[Path] = []
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{_temp_tag()}-", dir=target.parent))
    try:
        with guarded_write(tmp):
            for info, rel in members:
                out = tmp.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(out, "wb") as dst:
                        # zipfile stops at the declared size and checks the CRC: a lying header fails here
                        shutil.copyfileobj(src, dst)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
                    raise RSGError(f"damaged zip member {info.filename!r} ({exc})", file=zip_path,
                                   expected="download the zip again") from None
                written.append(target.joinpath(*rel.parts))
            if target.exists():
                # Merge into an existing folder (several task zips share one data dir).
                for f in tmp.rglob("*"):
                    if f.is_file():
                        dest = target / f.relative_to(tmp)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(f, dest)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def verify_checksum(task: str, path: Path) -> None:
    """Raise RSGError if a downloaded zip's sha256 is not the recorded one."""
    size, expected = CHECKSUMS[get_task(task).name]
    got = sha256_file(path)
    if got != expected:
        raise RSGError(f"checksum mismatch for the {task} zip: sha256 {got}", file=path,
                       expected=f"sha256 {expected} ({size} bytes)")


def download(tasks: Iterable[str], data_dir: Path | None = None, *, force: bool = False,
             fetch: Callable[[str, Path, Callable[[int, int | None], None]], None] | None = None,
             on_progress: Callable[[str, int, int | None], None] | None = None,
             verify: bool = True) -> Path:
    """Download and extract official per-task zips into `data_dir`; skip tasks already there.

    `fetch(url, dest, progress)` downloads one URL (urllib by default; tests pass their own). Each zip is
    checked against its recorded sha256 before anything is extracted; a bad one is deleted.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    fetch = fetch or _urllib_fetch
    src = DataSource(data_dir, str(data_dir))
    for task in tasks:
        name = get_task(task).name
        split = "test" if name == "LiDiRus" else "val"
        if not force and src.has(name, split) and src.has(name, "test"):
            continue
        url = DOWNLOAD_URL.format(task=name)
        remove_stale_temps(data_dir, f".{name}.download-")  # a zip left by a download that was killed
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.download-{_temp_tag()}-", suffix=".zip", dir=data_dir)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            fetch(url, tmp, lambda done, tot, _n=name: on_progress and on_progress(_n, done, tot))
            if verify:
                verify_checksum(name, tmp)
            safe_extract(tmp, data_dir)
        finally:
            tmp.unlink(missing_ok=True)
    return data_dir


def _urllib_fetch(url: str, dest: Path, progress: Callable[[int, int | None], None]) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "rsg-eval"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            done = 0
            while True:
                block = resp.read(1 << 16)
                if not block:
                    break
                out.write(block)
                done += len(block)
                progress(done, total)
    except (urllib.error.URLError, OSError) as exc:
        raise RSGError(f"download failed: {exc}", file=url,
                       expected="network access to russiansuperglue.com (or pass --data with a local copy)") \
            from None


def check_folder(spec: str | Path | DataSource, tasks: Iterable[str] | None = None) -> list[dict]:
    """Parse every split of every task; return rows {task, split, file, records, official, items, labelled, status,
    error}. `official` is the record count of the official file (tasks.OFFICIAL_RECORDS); `status` is "ok" (that
    many records), "partial" (fewer), "other size" (more) or "error"."""
    src = resolve_data(spec)
    rows: list[dict] = []
    for name in (tasks or TASK_NAMES):
        name = get_task(name).name
        for split in (("test",) if name == "LiDiRus" else ("train", "val", "test")):
            official = OFFICIAL_RECORDS[name][split]
            row: dict = {"task": name, "split": split, "file": None, "records": 0, "official": official,
                         "items": 0, "labelled": 0, "status": "error", "error": None}
            try:
                path = src.path(name, split)
                row["file"] = str(path)
                recs = read_jsonl(path)
                items = parse_records(name, split, recs, str(path))
                row.update(records=len(recs), items=len(items),
                           labelled=sum(1 for it in items if it.gold is not None),
                           status="ok" if len(recs) == official else
                           "partial" if len(recs) < official else "other size")
            except RSGError as exc:
                row["error"] = str(exc)
            rows.append(row)
    return rows


def load_items(data: Any, task: str, split: str) -> list[Item]:
    """Items of one task split from a DataSource, a data folder spec, or a path to a .jsonl file."""
    task = get_task(task).name
    check_split(task, split)
    if isinstance(data, (str, Path)) and str(data).endswith(".jsonl"):
        path = Path(data)
    else:
        src = data if hasattr(data, "path") else resolve_data(data)
        path = src.path(task, split)
    return parse_records(task, split, read_jsonl(path), str(path))
