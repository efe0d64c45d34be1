"""Provenance of a run: the data it read, package versions and the git commit it was made with. Light (no torch).

Shared by zero-shot, the NLI-head evaluation and fine-tuning, which record these in config.json.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from rsg_eval import __version__


def data_identity(src: Any) -> str:
    """The data a run reads, as a run-level setting: "sample", else the resolved folder or zip path."""
    origin = str(getattr(src, "origin", src))
    return origin if origin == "sample" else str(Path(origin).expanduser().resolve())


def versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "rsg-eval": __version__}
    for pkg in ("torch", "transformers", "tokenizers", "jinja2"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """HEAD of the repository this package lives in, with "-dirty" when tracked files changed; None if no git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
