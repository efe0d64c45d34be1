"""Experiment tracking behind one small interface: `--report-to none|tensorboard|wandb|mlflow` (a comma list).

A tracker has three calls: `log_config(dict)` once at the start, `log_scalars(step, {name: value})` per optimizer
step or evaluation, `close()` at the end (also on an error: use it as a context manager). Only rank 0 logs; every
other rank gets the null tracker, so callers never test the rank themselves. The run's name is the tracker's run
name and the run folder's fingerprint is its tag, so a tracker's run points back at exactly one run folder.

Backends, each an optional extra (`pip install -e ".[tensorboard]"`, `[wandb]`, `[mlflow]`); a missing package is
one line naming its extra, raised before any training starts:
- tensorboard: event files in RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`); the config and the
  fingerprint as text summaries;
- wandb: `wandb.init(name=run name, tags=[fingerprint], config=...)` under RUN/wandb; the project is
  $WANDB_PROJECT or "rsg-eval"; WANDB_MODE=offline works without a network;
- mlflow: a run named after the run with the tag `fingerprint`; the tracking URI is $MLFLOW_TRACKING_URI or a
  SQLite store RUN/mlflow.db (MLflow 3 refuses new file stores), experiment $MLFLOW_EXPERIMENT_NAME or
  "rsg-eval"; the config as params (flattened, values cut to 500 characters as MLflow requires).
The CSV logs and the PNG curves the commands write are unchanged; trackers come on top.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from rsg_eval.core.errors import RSGError

BACKENDS = ("none", "tensorboard", "wandb", "mlflow")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
MLFLOW_PARAM_CHARS = 500


def parse_report_to(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """"tensorboard,wandb" -> ("tensorboard", "wandb"); "none" or empty -> (). Unknown names are one error."""
    if spec is None:
        return ()
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [p.strip().lower() for p in parts if p and p.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise RSGError(f"unknown --report-to backend {bad[0]!r}", field="report-to", expected=", ".join(BACKENDS))
    if "none" in names and len(names) > 1:
        raise RSGError("--report-to none cannot be combined with a backend", field="report-to",
                       expected="none, or a comma list of tensorboard, wandb, mlflow")
    out: list[str] = []
    for n in names:
        if n != "none" and n not in out:
            out.append(n)
    return tuple(out)


def require_backends(names: Iterable[str]) -> None:
    """Check every backend's package is importable, before a run starts: one line naming the extra."""
    import importlib.util

    for n in names:
        if importlib.util.find_spec(_MODULES[n]) is None:
            raise RSGError(f"--report-to {n} needs the {n} package: pip install -e \".[{n}]\" (or pip install {n})",
                           field="report-to")


class Tracker:
    """The null tracker (`--report-to none`, and every rank but 0); the base of the real ones."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    """Plain floats (tensors are read with float()); None is left out; NaN/inf are kept (a tracker shows them)."""
    out = {}
    for k, v in scalars.items():
        if v is None:
            continue
        out[str(k)] = float(v)
    return out


class TensorBoardTracker(Tracker):
    def __init__(self, log_dir: Path, run_name: str, fingerprint: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("run", f"{run_name} (fingerprint {fingerprint})", 0)

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str, ensure_ascii=False)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for k, v in _floats(scalars).items():
            self.writer.add_scalar(k, v, int(step))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: Path, run_name: str, fingerprint: str) -> None:
        import wandb

        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rsg-eval"), name=run_name,
                              tags=[fingerprint], dir=str(run_dir), reinit=True)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(json.loads(json.dumps(config, default=str)), allow_val_change=True)

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self.run.log(_floats(scalars), step=int(step))

    def close(self) -> None:
        self.run.finish()


class MlflowTracker(Tracker):
    def __init__(self, run_dir: Path, run_name: str, fingerprint: str) -> None:
        import mlflow

        self.mlflow = mlflow
        experiment = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a local SQLite store in the run folder (MLflow 3 refuses new file stores); artifacts beside it
            run_dir.mkdir(parents=True, exist_ok=True)
            mlflow.set_tracking_uri(local_mlflow_uri(run_dir))
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "rsg-eval")
            found = mlflow.get_experiment_by_name(name)
            experiment = found.experiment_id if found else mlflow.create_experiment(
                name, artifact_location=(run_dir / "mlartifacts").resolve().as_uri())
        self.run = mlflow.start_run(run_name=run_name, tags={"fingerprint": fingerprint}, experiment_id=experiment)

    def log_config(self, config: Mapping[str, Any]) -> None:
        flat = _flatten(json.loads(json.dumps(config, default=str)))
        self.mlflow.log_params({k: str(v)[:MLFLOW_PARAM_CHARS] for k, v in flat.items()})

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        # MLflow metric names allow / . - _ and alphanumerics; our names use those only
        self.mlflow.log_metrics({k: v for k, v in _floats(scalars).items() if not math.isnan(v)}, step=int(step))

    def close(self) -> None:
        self.mlflow.end_run()


def local_mlflow_uri(run_dir: Path) -> str:
    return "sqlite:///" + str((run_dir / "mlflow.db").resolve())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


class MultiTracker(Tracker):
    """Fans each call out to several backends; closes every one even when one fails."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_config(self, config: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_scalars(step, scalars)

    def close(self) -> None:
        errors = []
        for t in self.trackers:
            try:
                t.close()
            except Exception as exc:  # noqa: BLE001 - close the others first, then report
                errors.append(exc)
        if errors:
            raise errors[0]


def make_tracker(report_to: str | Iterable[str] | None, *, run_dir: str | Path, run_name: str, fingerprint: str,
                 rank: int = 0) -> Tracker:
    """The tracker for `--report-to` on this rank: the null tracker for "none" and on every rank but 0."""
    names = parse_report_to(report_to)
    if not names:
        return Tracker()
    require_backends(names)  # on every rank: a missing extra stops all ranks alike, before training
    if rank != 0:
        return Tracker()
    run_dir = Path(run_dir)
    made: list[Tracker] = []
    try:
        for n in names:
            if n == "tensorboard":
                made.append(TensorBoardTracker(run_dir / "tensorboard", run_name, fingerprint))
            elif n == "wandb":
                made.append(WandbTracker(run_dir, run_name, fingerprint))
            else:
                made.append(MlflowTracker(run_dir, run_name, fingerprint))
    except BaseException:
        MultiTracker(made).close()
        raise
    return made[0] if len(made) == 1 else MultiTracker(made)


# ----------------------------------------------------------------------------------------------- what recipes log


class Throughput:
    """Tokens per second between optimizer steps, on the host clock. The step's one host read (engine.step) has
    already waited for the device, so the interval covers the device's work without a sync of its own."""

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self._last = self._clock()

    def tick(self, tokens: int) -> float:
        now = self._clock()
        dt, self._last = now - self._last, now
        return tokens / dt if dt > 0 else float("nan")


def step_scalars(*, loss: float, lr: float, grad_norm: float, tokens_per_s: float,
                 task_losses: Mapping[str, float] | None = None) -> dict[str, float]:
    """One optimizer step's scalars under stable names: train/loss (the mean for train-hmtl), train/lr,
    train/grad_norm (before clipping), train/tokens_per_s, and train/loss/<task> per task (train-hmtl)."""
    out = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens_per_s": tokens_per_s}
    for task, value in (task_losses or {}).items():
        out[f"train/loss/{task}"] = value
    return out


def eval_scalars(metrics: Mapping[str, Mapping[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """Every numeric metric of every task: {"terra": {"accuracy": 0.6}} -> {"eval/terra/accuracy": 0.6}."""
    out: dict[str, float] = {}
    for task, values in metrics.items():
        for name, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}/{task}/{name}"] = float(v)
    return out
