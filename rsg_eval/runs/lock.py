"""The run-folder lock (rsg.lock): one process works on a folder; a dead holder's lock is taken over. Light."""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import os
import secrets
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import loads_json
from rsg_eval.runs.names import LOCK_NAME


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


# Linux's pid_max is at most 2**22; PIDs elsewhere fit 32 bits. A larger one is no process (and os.kill would
# raise OverflowError on it).
_PID_LIMIT = 1 << 31


def _pid_alive(pid: int, start: str | None) -> bool:
    if not 0 < pid < _PID_LIMIT:
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
        """The lock file's record; {} when it exists but cannot be read; None when there is no lock.

        Never follows a symlink and never opens anything but a regular file (a FIFO would block): such a lock
        is `_foreign`, refused by `acquire`. At most 64 KiB are read (a lock is one short line)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            data = os.read(fd, 1 << 16)
        except OSError:
            return {}
        finally:
            os.close(fd)
        try:
            rec = loads_json(data, file=self.path)
        except RSGError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def _foreign(self) -> RSGError | None:
        """An RSGError when the lock path is something this tool never writes (a symlink, dangling or not, a
        folder, a FIFO, a file it cannot read): taking it over could delete or follow something else, and
        waiting for it would wait forever. None for a regular file (or none at all)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return RSGError(f"the lock file cannot be checked ({exc.strerror or exc})", file=self.path)
        what = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                else None if stat.S_ISREG(st.st_mode) else "a special file (FIFO, socket or device)")
        if what is None:
            if os.access(self.path, os.R_OK):
                return None
            what = "a file this user cannot read"
        return RSGError(f"the lock file is {what}, not a lock this tool wrote; check what it is, remove it and "
                        "run the same command again", file=self.path, expected="a regular file rsg.lock, or none")

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
        pid = rec.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < _PID_LIMIT:
            return True  # no process can have it (10**20, "x"): a damaged lock, taken over
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
                foreign = self._foreign()
                if foreign is not None:
                    raise foreign from None
                rec = self.holder()
                if rec is None:
                    if time.monotonic() > deadline:  # never spin: another process keeps recreating it
                        raise RSGError("could not take the lock (it keeps appearing and disappearing)",
                                       file=self.path) from None
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
