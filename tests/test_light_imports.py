"""Light modules and light commands must not import torch (they start fast and work without it)."""

import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rsg_eval"
# The light folders (docs/design.md, "Layers"): every module in them, found on disk so a new one is covered.
LIGHT_FOLDERS = ("core", "published", "runs", "report")
LIGHT = sorted(
    "rsg_eval." + ".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
    for folder in LIGHT_FOLDERS for p in (PKG / folder).rglob("*.py")
) + ["rsg_eval.models.weight_files", "rsg_eval.corpus.labels", "rsg_eval.corpus.records", "rsg_eval.corpus.load",
     "rsg_eval.cli"]


def _no_torch(code: str) -> None:
    full = code + "\nimport sys\nbad = [m for m in ('torch', 'transformers') if m in sys.modules]\n" \
                  "assert not bad, bad\n"
    res = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_light_modules_do_not_import_torch():
    assert "rsg_eval.core.tasks" in LIGHT and "rsg_eval.runs.folder" in LIGHT
    _no_torch("\n".join(f"import {m}" for m in LIGHT))


def test_light_commands_do_not_import_torch(tmp_path):
    _no_torch(
        "import sys\nfrom rsg_eval.cli import app\n"
        "for argv in (['--help'], ['score', '--help'], ['submit', 'check', '--help']):\n"
        "    try:\n        app(argv, standalone_mode=False)\n    except SystemExit:\n        pass\n"
    )
