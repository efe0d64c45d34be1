"""Shared test fixtures. The official files in ../shared/rsg are optional: tests that need them skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))   # test helpers (_warm_rsg) import as top-level modules

# Under pytest-xdist (`-n 2` on the 2-core machine) each worker gets one torch thread: two workers with two threads
# each would only wait on each other, and the tiny models run fastest on one thread anyway (rsg bench threads).
# Set before torch loads (its OpenMP pool reads it once); subprocesses inherit it. A test of the thread choice
# sets or removes it itself.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def shared_rsg_dir() -> Path | None:
    env = os.environ.get("RSG_SHARED_DIR")
    cand = Path(env) if env else REPO.parent / "shared" / "rsg"
    return cand if (cand / "TERRa" / "val.jsonl").is_file() else None


@pytest.fixture
def shared_rsg() -> Path:
    d = shared_rsg_dir()
    if d is None:
        pytest.skip("official RSG files (../shared/rsg) not present")
    return d


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's download/extract cache out of the user's home."""
    cache = tmp_path_factory.getbasetemp() / "rsg-cache"
    monkeypatch.setenv("RSG_DATA_DIR", str(cache / "rsg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))


@pytest.fixture(scope="session")
def warm_rsg(tmp_path_factory):
    """A forking `rsg` server for tests that run many CLI commands as processes (tests/_warm_rsg.py): the folder
    to put first on PATH. Hub offline, one thread, its own HF_HOME."""
    from _warm_rsg import WarmRsg

    base = tmp_path_factory.mktemp("warm-rsg")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(base / "hf"), OMP_NUM_THREADS="1",
               RSG_DATA_DIR=str(base / "rsg-data"), XDG_CACHE_HOME=str(base / "cache"))
    server = WarmRsg(base, env)
    yield server.bin
    server.close()
