"""The `rsg build-corpus` config file (YAML), checked strictly: unknown keys and bad values name the field.

See configs/corpus_example.yaml for a documented example and docs/corpus.md for the format.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsg_eval.corpus.annotate import JOBS, TEACHER_TASKS, TeacherSpec
from rsg_eval.corpus.cleaning import CleanConfig
from rsg_eval.corpus.records import NEREL_TYPES, TASKS
from rsg_eval.errors import RSGError

KINDS: dict[str, tuple[str, ...]] = {
    # kind: allowed keys besides name, kind, path, limit, clean, dedup
    "text": ("text_field", "id_field"),
    "brat": ("discontinuous", "max_chars", "type_map"),
    "topic": ("text_field", "label_field", "label_map", "id_field"),
    "nli": ("premise_field", "hypothesis_field", "label_field", "label_map", "id_field"),
    "pairs": ("task", "fields", "group_field", "id_field"),
}
_COMMON = ("name", "kind", "path", "limit", "clean", "dedup")
TOP_KEYS = ("seed", "val_fraction", "val_max", "labels", "sources", "cleaning", "teachers", "annotation",
            "leakage")


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
    base: Path = Path(".")

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
        value = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
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


def load_config(path: str | Path) -> CorpusConfig:
    path = Path(path)
    if not path.is_file():
        raise RSGError("config file not found", file=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RSGError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=path,
                       line=mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise RSGError("the config must be a YAML mapping", file=path)
    try:
        return parse_config(raw, path.parent.resolve())
    except RSGError as err:
        if err.file is None:
            err.file = str(path)
            err.args = (str(err),)
        raise
