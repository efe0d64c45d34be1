"""The `rsg build-corpus` config file (YAML), checked strictly: unknown keys and bad values name the field.

See configs/corpus_example.yaml for a documented example and docs/corpus.md for the format.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rsg_eval.corpus.annotate import JOBS, TEACHER_TASKS, TeacherSpec
from rsg_eval.corpus.cleaning import CleanConfig
from rsg_eval.corpus.records import NEREL_TYPES, TASKS
from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import read_yaml

KINDS: dict[str, tuple[str, ...]] = {
    # kind: allowed keys besides name, kind, path, limit, clean, dedup
    "text": ("text_field", "id_field", "sample"),
    "brat": ("discontinuous", "max_chars", "type_map"),
    "topic": ("text_field", "label_field", "label_map", "id_field"),
    "nli": ("premise_field", "hypothesis_field", "label_field", "label_map", "id_field"),
    "pairs": ("task", "fields", "group_field", "id_field"),
}
_COMMON = ("name", "kind", "path", "limit", "clean", "dedup")
TOP_KEYS = ("seed", "val_fraction", "val_max", "labels", "sizes", "subset", "sources", "cleaning", "teachers",
            "annotation", "leakage")


@dataclass
class SourceConfig:
    name: str
    kind: str
    path: Path
    limit: int | None = None
    clean: bool = True
    dedup: bool = True
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubsetSpec:
    """`subset:` / `--subset`: cut `train` examples (and `val`, default: train / 10, as the paper's 10k corpus had
    10,000 train and 1,000 validation examples)."""

    train: int
    val: int | None = None
    seed: int | None = None     # None: the config's seed


@dataclass
class CorpusConfig:
    sources: list[SourceConfig]
    seed: int = 0
    val_fraction: float = 0.05
    val_max: int | None = None
    mc_classes: tuple[str, ...] | None = None
    ner_types: tuple[str, ...] = NEREL_TYPES
    cleaning: CleanConfig = field(default_factory=CleanConfig)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)   # task -> options incl. model
    shares: dict[str, float] = field(default_factory=dict)              # job -> weight
    shard_size: int = 256
    on_error: str = "skip"
    device: str = "auto"
    rsg_data: str | None = None
    ngram: int = 13
    leakage_splits: tuple[str, ...] = ("val", "test")
    leakage: bool = True
    targets: dict[str, int] | None = None        # sizes: examples per task (train + val); None = keep all built
    total: int | None = None                     # sizes.total, for the summary
    subset: SubsetSpec | None = None
    base: Path = Path(".")
    raw: dict[str, Any] = field(default_factory=dict)   # the config as read (for the build fingerprint)

    def teacher_specs(self, overrides: dict[str, str] | None = None) -> dict[str, TeacherSpec]:
        """TeacherSpecs of every teacher with a model (config, then `--teacher task=MODEL` overrides)."""
        merged = {t: dict(o) for t, o in self.teachers.items()}
        for t, model in (overrides or {}).items():
            merged.setdefault(t, {})["model"] = model
        out = {}
        for t, opts in merged.items():
            if opts.get("model"):
                m = str(opts["model"])
                if (self.base / m).exists() and not Path(m).is_absolute():
                    opts = {**opts, "model": str(self.base / m)}
                out[t] = TeacherSpec.make(t, opts)
        return out


def _load_map(value: Any, base: Path, where: str) -> dict[str, Any] | None:
    """A label map given inline ({raw: name}) or as a path to a JSON/YAML file of one."""
    if value is None:
        return None
    if isinstance(value, str):
        p = (base / value).expanduser()
        if not p.is_file():
            raise RSGError("label map file not found", file=p, field=where)
        value = read_yaml(p)
    if not isinstance(value, dict):
        raise RSGError("a label map must be a mapping {source label: class}", field=where)
    return {str(k).lower() if isinstance(k, bool) else str(k): (None if v is None else str(v))
            for k, v in value.items()}


def _source(i: int, d: Any, base: Path) -> SourceConfig:
    where = f"sources[{i}]"
    if not isinstance(d, dict):
        raise RSGError("a source must be a mapping", field=where)
    kind = d.get("kind")
    if kind not in KINDS:
        raise RSGError(f"unknown source kind {kind!r}", field=f"{where}.kind", expected=tuple(KINDS))
    bad = sorted(set(d) - set(_COMMON) - set(KINDS[kind]))
    if bad:
        raise RSGError(f"unknown keys {bad} for a {kind} source", field=where,
                       expected=", ".join((*_COMMON, *KINDS[kind])))
    if not d.get("path"):
        raise RSGError("no path", field=f"{where}.path")
    name = str(d.get("name") or f"{kind}{i}")
    opts = {k: d[k] for k in KINDS[kind] if k in d}
    if "label_map" in opts:
        opts["label_map"] = _load_map(opts["label_map"], base, f"{where}.label_map")
    if kind == "pairs":
        if opts.get("task") not in TASKS or opts.get("task") in ("ner", "mc", "nli"):
            raise RSGError(f"pairs need a generation task, got {opts.get('task')!r}", field=f"{where}.task",
                           expected=("paraphrase", "qa", "qg", "summarization", "title"))
        if not isinstance(opts.get("fields"), dict):
            raise RSGError("pairs need `fields`: {task field: column}", field=f"{where}.fields")
    if "sample" in opts and (isinstance(opts["sample"], bool) or not isinstance(opts["sample"], int)
                             or opts["sample"] <= 0):
        raise RSGError(f"bad sample {opts['sample']!r}", field=f"{where}.sample",
                       expected="the number of cleaned texts to draw (seeded), e.g. 870000")
    limit = d.get("limit")
    return SourceConfig(name=name, kind=kind, path=(base / str(d["path"])).expanduser(),
                        limit=int(limit) if limit is not None else None, clean=bool(d.get("clean", True)),
                        dedup=bool(d.get("dedup", True)), opts=opts)


def parse_config(raw: dict[str, Any], base: Path) -> CorpusConfig:
    bad = sorted(set(raw) - set(TOP_KEYS))
    if bad:
        raise RSGError(f"unknown top-level keys {bad}", expected=", ".join(TOP_KEYS))
    srcs = raw.get("sources") or []
    if not isinstance(srcs, list) or not srcs:
        raise RSGError("no sources", field="sources", expected="a list of sources")
    sources = [_source(i, d, base) for i, d in enumerate(srcs)]
    names = [s.name for s in sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RSGError(f"duplicate source names {sorted(dup)}", field="sources[].name")
    labels = raw.get("labels") or {}
    cfg = CorpusConfig(sources=sources, base=base)
    cfg.seed = int(raw.get("seed", 0))
    cfg.val_fraction = float(raw.get("val_fraction", 0.05))
    if not 0 <= cfg.val_fraction < 1:
        raise RSGError(f"val_fraction {cfg.val_fraction} out of range", field="val_fraction", expected="0 <= x < 1")
    cfg.val_max = int(raw["val_max"]) if raw.get("val_max") is not None else None
    if labels.get("mc"):
        cfg.mc_classes = tuple(str(x) for x in labels["mc"])
    if labels.get("ner"):
        cfg.ner_types = tuple(str(x) for x in labels["ner"])
    cfg.cleaning = CleanConfig.from_dict(raw.get("cleaning"))
    teachers = raw.get("teachers") or {}
    for t, o in teachers.items():
        if t not in TEACHER_TASKS:
            raise RSGError(f"no teacher task {t!r}", field="teachers", expected=TEACHER_TASKS)
        cfg.teachers[t] = dict(o) if isinstance(o, dict) else {"model": o}
    ann = dict(raw.get("annotation") or {})
    shares = ann.pop("shares", None)
    if shares is not None and raw.get("sizes"):
        raise RSGError("annotation.shares and sizes both decide how the raw texts are divided; keep one",
                       field="annotation.shares", expected="sizes.targets (per task) or annotation.shares (per job)")
    cfg.shares = {j: 1.0 for j in JOBS} if shares is None else {str(k): float(v) for k, v in shares.items()}
    for j in cfg.shares:
        if j not in JOBS:
            raise RSGError(f"no annotation job {j!r}", field="annotation.shares", expected=tuple(JOBS))
    cfg.shard_size = int(ann.pop("shard_size", 256))
    cfg.on_error = str(ann.pop("on_error", "skip"))
    if cfg.on_error not in ("skip", "stop"):
        raise RSGError(f"unknown on_error {cfg.on_error!r}", field="annotation.on_error", expected=("skip", "stop"))
    cfg.device = str(ann.pop("device", "auto"))
    if ann:
        raise RSGError(f"unknown annotation keys {sorted(ann)}", field="annotation",
                       expected="shares, shard_size, on_error, device")
    cfg.targets, cfg.total = parse_sizes(raw.get("sizes"))
    if raw.get("subset") is not None:
        cfg.subset = parse_subset(raw["subset"], "subset")
    cfg.raw = raw
    leak = raw.get("leakage") or {}
    if leak is False:
        cfg.leakage = False
    else:
        bad = sorted(set(leak) - {"rsg_data", "ngram", "splits", "enabled"})
        if bad:
            raise RSGError(f"unknown leakage keys {bad}", field="leakage", expected="rsg_data, ngram, splits, enabled")
        cfg.leakage = bool(leak.get("enabled", True))
        rd = leak.get("rsg_data")
        if rd is not None:
            rd = str(rd)
            cfg.rsg_data = rd if rd == "sample" or Path(rd).is_absolute() else str(base / rd)
        cfg.ngram = int(leak.get("ngram", 13))
        cfg.leakage_splits = tuple(leak.get("splits", ("val", "test")))
    return cfg


def _count(value: Any, where: str, total: int | None) -> int:
    """A target: an integer count, a share of `total` (a float in (0, 1]), or a percentage string ("12.5%")."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise RSGError(f"not a percentage: {value!r}", field=where) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise RSGError(f"bad size {value!r}", field=where,
                       expected="a number of examples (integer), or a share of sizes.total (0-1 or 'N%')")
    if isinstance(value, int):
        return value
    if value > 1:
        raise RSGError(f"a share above 1: {value}", field=where, expected="an integer count, or a share in 0-1")
    if total is None:
        raise RSGError("a share needs sizes.total", field=where, expected="sizes.total: examples over all tasks")
    return round(value * total)


def val_records(n: int, val_fraction: float, val_max: int | None) -> int:
    """How many of a task's `n` built records the build puts in val (at least one, at most val_max; none at 0)."""
    if val_fraction <= 0:
        return 0
    vt = max(1, round(val_fraction * n))
    return vt if val_max is None else min(vt, val_max)


def planned_train_sizes(cfg: "CorpusConfig", tasks: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """(task, train records) a full build of `cfg` yields when every size target is reached, in `tasks`' order
    (the trainer's): the recipe's plan, e.g. for docs/hmtl.md's epoch table. Needs `sizes:` targets."""
    if not cfg.targets:
        raise RSGError("the config sets no size targets", field="sizes", expected="{total: N, targets: ...}")
    return tuple((t, cfg.targets[t] - val_records(cfg.targets[t], cfg.val_fraction, cfg.val_max))
                 for t in tasks if cfg.targets.get(t))


def parse_sizes(d: Any) -> tuple[dict[str, int] | None, int | None]:
    """`sizes: {total: N, targets: {task: count or share}}` -> (targets per task, total). Without targets every
    task gets an equal share of total; tasks left out of targets get no target (everything built is kept)."""
    if not d:
        return None, None
    if not isinstance(d, dict):
        raise RSGError("sizes must be a mapping", field="sizes", expected="{total: N, targets: {task: N or share}}")
    bad = sorted(set(d) - {"total", "targets"})
    if bad:
        raise RSGError(f"unknown sizes keys {bad}", field="sizes", expected="total, targets")
    total = d.get("total")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total <= 0):
        raise RSGError(f"bad total {total!r}", field="sizes.total", expected="a positive integer")
    targets = d.get("targets")
    if targets is None:
        if total is None:
            raise RSGError("sizes needs total or targets", field="sizes")
        share = total // len(TASKS)
        return {t: share + (1 if i < total % len(TASKS) else 0) for i, t in enumerate(TASKS)}, total
    if not isinstance(targets, dict):
        raise RSGError("targets must be a mapping {task: count or share}", field="sizes.targets")
    out = {}
    for t, v in targets.items():
        if t not in TASKS:
            raise RSGError(f"no task {t!r}", field="sizes.targets", expected=TASKS)
        out[str(t)] = _count(v, f"sizes.targets.{t}", total)
    shares = [v for v in targets.values() if isinstance(v, float) or isinstance(v, str)]
    if total is not None and sum(out.values()) > total * 1.0001 and shares:
        raise RSGError(f"the targets add up to {sum(out.values())}, more than sizes.total {total}",
                       field="sizes.targets")
    return out, total if total is not None else sum(out.values())


def parse_subset(d: Any, where: str) -> SubsetSpec:
    if isinstance(d, bool):
        raise RSGError("subset must be a number of train examples", field=where)
    if isinstance(d, int):
        d = {"train": d}
    if not isinstance(d, dict) or not isinstance(d.get("train"), int) or d["train"] <= 0:
        raise RSGError(f"bad subset {d!r}", field=where, expected="N (train examples) or {train: N, val: M, seed: S}")
    bad = sorted(set(d) - {"train", "val", "seed"})
    if bad:
        raise RSGError(f"unknown subset keys {bad}", field=where, expected="train, val, seed")
    val = d.get("val")
    if val is not None and (not isinstance(val, int) or val < 0):
        raise RSGError(f"bad subset val {val!r}", field=f"{where}.val", expected="a number of val examples")
    return SubsetSpec(train=int(d["train"]), val=val, seed=d.get("seed"))


def load_config(path: str | Path) -> CorpusConfig:
    path = Path(path)
    if not path.is_file():
        raise RSGError("config file not found", file=path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RSGError("the config must be a YAML mapping", file=path)
    try:
        return parse_config(raw, path.parent.resolve())
    except RSGError as err:
        if err.file is None:
            err.file = str(path)
            err.args = (str(err),)
        raise
