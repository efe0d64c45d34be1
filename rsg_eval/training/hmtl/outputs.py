"""train-hmtl's output folder: the log, losses.csv / losses.png rows, the folder's claim (settings.json, the
run.json of older runs) and the hard-linked final/ checkpoint. The loop that fills it is training/hmtl/train.py."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import atomic_write_bytes, atomic_write_text, read_json
from rsg_eval.corpus.labels import TASKS
from rsg_eval.engine import collective
from rsg_eval.engine.runtime import Dist
from rsg_eval.training.hmtl.config import TrainConfig

CODE_VERSION = "hmtl-1"   # bump when training changes what a checkpoint would contain: old outputs then refuse


class Log:
    """train.log and the console, written by the main process only."""

    def __init__(self, path: Path | None, console: Any, main: bool) -> None:
        self.path, self.console, self.main = path, console, main

    def __call__(self, msg: str, level: str = "INFO") -> None:
        if not self.main:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {msg}"
        if self.console is not None:
            style = {"WARN": "bold yellow", "ERROR": "bold red"}.get(level, "")
            self.console.print(f"[{style}]{level}[/] {msg}" if style else msg, highlight=False, soft_wrap=True)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(line + "\n")



def link_or_copy_dir(src: Path, dst: Path) -> None:
    """dst = a copy of src made of hard links where the filesystem allows (no extra disk for big weights)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def write_losses(out: Path, history: list[dict[str, Any]], tasks: list[str]) -> None:
    """losses.csv (epoch, split, mean over the tasks, one column per task) and losses.png (train and val panels)."""
    cols = ["epoch", "split", "mean"] + tasks
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(out / "losses.csv", buf.getvalue())
    plot_losses(history, tasks, out / "losses.png")


def plot_losses(history: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, split in zip(axes, ("train", "val")):
        rows = [r for r in history if r["split"] == split]
        if rows:
            ep = [r["epoch"] for r in rows]
            for t in tasks:
                ys = [r.get(t) for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(ep, [y if y is not None else math.nan for y in ys], marker="o", label=t)
            ax.plot(ep, [r["mean"] for r in rows], marker="s", color="black", linewidth=2.5,
                    label="mean over tasks")
        ax.set_title(f"{split} loss: mean over tasks (the paper's Figures 2-3) and per task")
        ax.set_yscale("log")     # generation losses are an order of magnitude above the head losses
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def out_settings(cfg: TrainConfig, corpus: Any) -> dict[str, Any]:
    """What the outputs depend on: the recipe (TrainConfig.fingerprint_dict), the corpus's content instead of
    its path, the base model's content when it is a local folder, and the code version."""
    from rsg_eval.models.loading import TINY_NAME, _dir_fingerprint
    from rsg_eval.runs import files_fingerprint

    settings = {k: v for k, v in cfg.fingerprint_dict().items() if k != "corpus"}
    files = [f for fs in corpus.files.values() for f in fs]
    labels = Path(corpus.root) / "labels.json"
    settings["corpus_sha256"] = files_fingerprint(files + ([labels] if labels.is_file() else []))
    model = Path(cfg.model).expanduser()
    if cfg.model != TINY_NAME and model.is_dir():
        settings["model_dir"] = _dir_fingerprint(model)
    settings["code_version"] = CODE_VERSION
    return json.loads(json.dumps(settings))


OUTPUTS = ("last", "final", "run.json", "losses.csv", "losses.png", "train.log", "settings.json")


def claim_out(cfg: TrainConfig, corpus: Any, d: Dist, restart: bool) -> Any:
    """The main process locks --out and checks its settings; a refusal is raised on every process."""
    from rsg_eval.runs import claim_folder

    out = Path(cfg.out)

    def has_results() -> bool:
        return any((out / n).exists() for n in ("last", "final", "run.json")) or any(out.glob("epoch-*"))

    def clear() -> None:
        for p in [*(out / n for n in OUTPUTS), *out.glob("epoch-*"), *out.glob(".*.tmp")]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def claim_it() -> Any:
        legacy = (out / "run.json").is_file() and not (out / "settings.json").is_file()
        claim = claim_folder(out, "train-hmtl", out_settings(cfg, corpus), restart=restart,
                             record="settings.json", has_results=has_results, clear=clear, option="--out",
                             unrecorded="compare" if legacy else "refuse", main=True,
                             legacy_names=(*OUTPUTS, *(p.name for p in out.glob("epoch-*"))))
        try:
            if legacy and not restart:  # an --out from before settings.json: its run.json holds the recipe
                check_run_json(out / "run.json", cfg.fingerprint_dict())
            claim.write_record()
        except BaseException:
            claim.release()
            raise
        return claim

    claim = collective.main_acts(d, claim_it, share=False)   # a refusal is raised on every process
    return claim if claim is not None else contextlib.nullcontext()


def check_run_json(run_file: Path, fp: dict[str, Any]) -> None:
    """Refuse when run.json's recorded config differs from `fp`, naming each setting old -> new."""
    prior = read_json(run_file) if run_file.is_file() else None
    if prior is not None and prior.get("config") != json.loads(json.dumps(fp)):
        from rsg_eval.runs import settings_diff

        changed = settings_diff(prior.get("config") or {}, json.loads(json.dumps(fp)))
        raise RSGError(f"the output folder holds a run with different settings ({'; '.join(changed)}); pass "
                       f"--restart to clear it and start over, or pick another --out", file=run_file, field="--out")



def loss_row(epoch: int, split: str, losses: dict[str, float]) -> dict[str, Any]:
    """One losses.csv row: each task's mean loss and their unweighted mean over the tasks (the paper's "average
    loss" of Figures 2-3). Task weights scale the gradient, not this curve, so runs with different weights compare."""
    row: dict[str, Any] = {"epoch": epoch, "split": split}
    row.update(losses)
    row["mean"] = sum(losses.values()) / len(losses) if losses else math.nan
    return row


def describe(rows: list[dict[str, Any]]) -> str:
    parts = []
    for r in rows:
        per = " ".join(f"{t}={r[t]:.3f}" for t in TASKS if t in r)
        parts.append(f"epoch {r['epoch']} {r['split']}: mean over tasks {r['mean']:.4f} ({per})")
    return "; ".join(parts)
