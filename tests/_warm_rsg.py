"""A warm `rsg` for tests: one server process imports torch, transformers and every rsg_eval module once, then
forks a child per command. The child takes the caller's stdin/stdout/stderr (passed as file descriptors over a
Unix socket), working directory, environment and arguments, and runs the real entry point `rsg_eval.cli.main`.

Why: a command of the docs test or of a CLI test spends most of its CPU time importing torch and transformers
(3-6 s each on the 2-core CI machine) and well under a second doing its work. Forking a process that has already
imported them keeps each command a separate process (its own exit status, cwd, env, signals, no state shared with
the test process) while paying the imports once per test session.

What a fork does NOT reproduce, so such tests keep a real `rsg` process: anything decided at import time (which
modules a command imports, `HF_*` variables that huggingface_hub reads when imported), and signal timing during
start-up. The server is started with the hub offline (HF_HUB_OFFLINE=1) and one thread per process.

Client side: `client_script(dir)` writes an executable `rsg` into `dir` that forwards its argv, cwd, environment
and standard file descriptors to the server, relays SIGINT/SIGTERM to the child and exits with the child's status.
If the server cannot be reached it runs the real `rsg` instead, so a stale PATH entry never breaks a test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

_INT = struct.Struct("!i")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _warm_imports() -> None:
    """Import every rsg_eval module (and so torch, transformers), as a command body would."""
    import importlib
    import pkgutil

    import rsg_eval

    for mod in pkgutil.walk_packages(rsg_eval.__path__, "rsg_eval."):
        if mod.name.endswith("__main__"):   # importing it would run the CLI
            continue
        try:
            importlib.import_module(mod.name)
        except Exception:  # an optional extra that is not installed: the child imports (and reports) it itself
            pass


def _fresh_consoles() -> None:
    """The CLI's module-level rich consoles measured the server's stdout and COLUMNS when imported; give the child
    consoles that measure its own, as a fresh process's import would."""
    common = sys.modules.get("rsg_eval.commands._common")
    if common is None:
        return
    new = {id(common.console): common.make_console(), id(common.err_console): common.make_console(stderr=True)}
    for name, mod in list(sys.modules.items()):
        if name.startswith("rsg_eval") and mod is not None:
            for attr in ("console", "err_console"):
                obj = getattr(mod, attr, None)
                if obj is not None and id(obj) in new:
                    setattr(mod, attr, new[id(obj)])


def _child(conn: socket.socket, fds: list[int], request: dict) -> None:
    """Runs in the forked child: become the caller's process and run the CLI; never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # the server ignores it; subprocess needs it back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        conn.sendall(_INT.pack(os.getpid()))
        _fresh_consoles()
        try:
            if request.get("call"):   # fn(index, *args) of an importable module (what mp.spawn runs)
                import importlib

                mod, _, name = request["call"].partition(":")
                fn = getattr(importlib.import_module(mod), name)
                fn(*json.loads(request["args"]))
            elif request.get("script"):   # `python SCRIPT ARGS...` (a torchrun script target)
                import runpy

                sys.argv = [request["script"], *request["argv"]]
                sys.path.insert(0, os.path.dirname(os.path.abspath(request["script"])))
                runpy.run_path(request["script"], run_name="__main__")
            else:
                from rsg_eval import cli

                sys.argv = ["rsg", *request["argv"]]
                cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
    except BaseException:  # what a real process would print before dying
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        try:
            conn.sendall(_INT.pack(code))
        except OSError:
            pass
        os._exit(code)


def serve(path: str) -> None:
    """The server's main loop (runs in its own process)."""
    _warm_imports()
    sys.stdout.flush()
    sys.stderr.flush()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + ".tmp")
    os.replace(path + ".tmp", path)   # the socket appears only when the server is ready
    srv.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children are reaped by the kernel; status goes over the socket
    while True:
        conn, _ = srv.accept()
        try:
            head, fds, _, _ = socket.recv_fds(conn, _INT.size, 3)
            (n,) = _INT.unpack(head + _recv_exact(conn, _INT.size - len(head)))
            request = json.loads(_recv_exact(conn, n))
        except (OSError, EOFError, ValueError):
            conn.close()
            continue
        if request.get("stop"):
            conn.close()
            break
        if os.fork() == 0:
            srv.close()
            _child(conn, fds, request)
        for fd in fds:
            os.close(fd)
        conn.close()


CLIENT = r'''#!{python} -S
# Written by tests/_warm_rsg.py: forwards this `rsg` command to the warm test server (see that file).
import json, os, signal, socket, struct, sys
INT = struct.Struct("!i")
def real():
    os.execv({real!r}, [{real!r}] + sys.argv[1:])
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({sock!r})
except OSError:
    real()
script = os.environ.pop("WARM_RSG_SCRIPT", "")   # set by warm_torchrun for a script target
call = os.environ.pop("WARM_RSG_CALL", "")       # set by warm_spawn: module:function
args = os.environ.pop("WARM_RSG_ARGS", "[]")
payload = json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), env=dict(os.environ), script=script, call=call,
                          args=args)).encode()
socket.send_fds(s, [INT.pack(len(payload))], [0, 1, 2])
s.sendall(payload)
def recv_int():
    buf = b""
    while len(buf) < INT.size:
        chunk = s.recv(INT.size - len(buf))
        if not chunk:
            sys.exit(1)
        buf += chunk
    return INT.unpack(buf)[0]
pid = recv_int()
def relay(sig, frame):
    try:
        os.kill(pid, sig)
    except OSError:
        pass
signal.signal(signal.SIGINT, relay)
signal.signal(signal.SIGTERM, relay)
sys.exit(recv_int())
'''


class WarmRsg:
    """A running server plus the folder holding its `rsg` client (put it first on PATH)."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.sock = str(workdir / "rsg.sock")
        self.bin = workdir / "bin"
        self.bin.mkdir(exist_ok=True)
        real = str(Path(sys.executable).parent / "rsg")
        client = self.bin / "rsg"
        client.write_text(CLIENT.format(python=sys.executable, real=real, sock=self.sock), encoding="utf-8")
        client.chmod(0o755)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"import _warm_rsg; _warm_rsg.serve({self.sock!r})"],
            env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the warm rsg server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_torchrun(bin_dir: Path, args: list[str], *, n: int = 2, cwd: Path, env: dict[str, str] | None = None,
                  script: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """What `torchrun --standalone --nproc_per_node n -m rsg_eval.cli -- ARGS` (or `... SCRIPT ARGS`) does for our
    code: n processes with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set (gloo's
    env:// rendezvous), each forked from the warm server. Their outputs are concatenated rank by rank; the status
    is the first non-zero one. On timeout every rank is killed (a hang shows as a failure, as with torchrun)."""
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(n),
                LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", OMP_NUM_THREADS="1")
    if script:
        base["WARM_RSG_SCRIPT"] = str(script)
    procs = []
    for rank in range(n):
        e = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([str(bin_dir / "rsg"), *args], cwd=cwd, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    code = next((c for c in codes if c), 0)
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in outs), "".join(e for _, e in outs))


def warm_spawn(bin_dir: Path, fn, *args, nprocs: int = 2, timeout: float = 900) -> None:
    """`torch.multiprocessing.start_processes(fn, args, nprocs, start_method="spawn")` on the warm server: process i
    runs fn(i, *args) (fn a module-level function, args JSON-able). Raises when any process fails, with its
    output."""
    procs = []
    env = dict(os.environ, WARM_RSG_CALL=f"{fn.__module__}:{fn.__qualname__}")
    for i in range(nprocs):
        procs.append(subprocess.Popen([str(bin_dir / "rsg")], env=dict(env, WARM_RSG_ARGS=json.dumps([i, *args])),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = [(i, p.returncode, out) for i, (p, out) in enumerate(zip(procs, outs)) if p.returncode]
    if bad:
        raise RuntimeError("\n".join(f"process {i} exited {rc}:\n{out[-4000:]}" for i, rc, out in bad))
