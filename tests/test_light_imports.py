"""Light modules and light commands must not import torch (they start fast and work without it)."""

import subprocess
import sys

LIGHT = ["rsg_eval.core.tasks", "rsg_eval.core.metrics", "rsg_eval.core.data", "rsg_eval.core.submission", "rsg_eval.core.io",
         "rsg_eval.core.limits", "rsg_eval.models.weight_files", "rsg_eval.cli", "rsg_eval.core.fewshot"]


def _no_torch(code: str) -> None:
    full = code + "\nimport sys\nbad = [m for m in ('torch', 'transformers') if m in sys.modules]\n" \
                  "assert not bad, bad\n"
    res = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_light_modules_do_not_import_torch():
    optional = ["rsg_eval.core.prompts", "rsg_eval.runs", "rsg_eval.report"]
    import importlib.util

    mods = LIGHT + [m for m in optional if importlib.util.find_spec(m) is not None]
    _no_torch("\n".join(f"import {m}" for m in mods))


def test_light_commands_do_not_import_torch(tmp_path):
    _no_torch(
        "import sys\nfrom rsg_eval.cli import app\n"
        "for argv in (['--help'], ['score', '--help'], ['submit', 'check', '--help']):\n"
        "    try:\n        app(argv, standalone_mode=False)\n    except SystemExit:\n        pass\n"
    )
