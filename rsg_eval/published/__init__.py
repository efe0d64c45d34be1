"""The shipped reference numbers (package data): `paper.yaml` (the hierarchical FRED-T5 paper, Tables 1-3) and
`leaderboard.yaml` (Russian SuperGLUE leaderboard rows). Torch-free.

The `runs:` of both files are score files (read by rsg_eval.report.load). `paper.yaml` also carries what only a
paper has: which row each row's gain is stated against (`baselines`), Table 2's and Table 3's gains as printed,
Table 3's headers, and the paper's own inconsistencies (`notes`). `extras(source)` returns those for a
published run's source, validated.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError

HERE = Path(__file__).resolve().parent
FILES = {"paper": "paper.yaml", "leaderboard": "leaderboard.yaml"}

_GAIN = re.compile(r"^\s*([+-]?\d+(?:\.\d+)?)\s*%\s*$")


def parse_printed_gain(text: str) -> list[float]:
    """'+59.95 %' -> [59.95]; '-2.62 % / -2.91 %' -> [-2.62, -2.91]; '0 %' -> [0.0]."""
    out = []
    for part in str(text).split("/"):
        m = _GAIN.match(part)
        if not m:
            raise ValueError(f"not a printed gain: {text!r}")
        out.append(float(m.group(1)))
    return out


def printed_decimals(text: str) -> int:
    """Decimals the paper printed a gain with ('+59.95 %' -> 2, '+17 %' -> 0, '0 %' -> 0)."""
    parts = [p.strip().rstrip("%").strip() for p in str(text).split("/")]
    return max(len(p.split(".")[1]) if "." in p else 0 for p in parts)


@lru_cache(maxsize=4)
def _read(name: str) -> dict[str, Any]:
    from rsg_eval.core.io import read_yaml

    data = read_yaml(HERE / FILES[name])
    return data if isinstance(data, dict) else {}


def extras(source: str | Path) -> dict[str, Any]:
    """The non-run keys of the published file a run came from (`rsg_eval/published/paper.yaml`), else {}.

    Returned keys: baselines {run: baseline run}, table2_gains {run: printed}, table3 {baseline, run, headers,
    gains {task: printed}}, notes [str]. A malformed entry is a packaging bug: RSGError naming the file."""
    name = next((n for n, f in FILES.items() if str(source).replace("\\", "/").endswith("published/" + f)), None)
    if name is None:
        return {}
    data = _read(name)
    path = HERE / FILES[name]
    out: dict[str, Any] = {"baselines": {}, "table2_gains": {}, "table3": None, "notes": []}
    names = {str(r.get("name")) for r in data.get("runs") or [] if isinstance(r, dict)}
    base = data.get("baselines") or {}
    if not isinstance(base, dict) or any(str(k) not in names or str(v) not in names for k, v in base.items()):
        raise RSGError("baselines must map run names to run names of this file", file=path, field="baselines")
    out["baselines"] = {str(k): str(v) for k, v in base.items()}
    gains2 = data.get("table2_gains") or {}
    for k, v in gains2.items():
        if str(k) not in out["baselines"]:
            raise RSGError(f"{k}: a printed gain needs a baseline", file=path, field="table2_gains")
        parse_printed_gain(v)
    out["table2_gains"] = {str(k): str(v) for k, v in gains2.items()}
    t3 = data.get("table3")
    if t3 is not None:
        if not isinstance(t3, dict) or str(t3.get("baseline")) not in names or str(t3.get("run")) not in names:
            raise RSGError("table3 needs a baseline and a run of this file", file=path, field="table3")
        headers = [str(h) for h in t3.get("headers") or []]
        if len(headers) != 5:
            raise RSGError("table3.headers: five column headers", file=path, field="table3.headers")
        gains = {str(k): str(v) for k, v in (t3.get("gains") or {}).items()}
        for v in gains.values():
            parse_printed_gain(v)
        out["table3"] = {"baseline": str(t3["baseline"]), "run": str(t3["run"]), "headers": headers,
                         "gains": gains}
    notes = data.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise RSGError("notes must be a list of strings", file=path, field="notes")
    out["notes"] = [" ".join(n.split()) for n in notes]
    return out
