"""`rsg build-corpus` end to end on the fixtures: counts worked out by hand, the trainer's reader accepts the
output, seeded grouped split, leakage guard, --limit, CLI errors; with tiny teachers (slow): annotation, resume
after an interrupt (nothing redone, same output), a failing teacher batch skipped or stopping the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _corpus_utils import CONFIG, FIXTURES, save_tiny_qa, save_tiny_t5
from rsg_eval.corpus.annotate import assign_jobs
from rsg_eval.corpus.build import BuildOptions, build_corpus, percentiles, split_task
from rsg_eval.corpus.config import load_config, parse_config
from rsg_eval.core.errors import RSGError

QUIET = dict(progress=False, echo=lambda m: None)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _hmtl_counts(out: Path) -> dict[str, dict[str, int]]:
    """Load the corpus with the trainer's own reader (validates every record)."""
    from rsg_eval.corpus.load import load_examples, open_corpus

    corpus = open_corpus(out, require_val=True)
    assert len(corpus.labels.mc) == 17
    for split in ("train", "val"):
        load_examples(corpus, split)
    return corpus.counts


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("plain")
    return out, build_corpus(load_config(CONFIG), out, BuildOptions(**QUIET))


def test_counts_by_hand(plain: tuple[Path, dict]) -> None:
    out, s = plain
    # texts.jsonl: 16 lines, 2 bad (no text field, broken JSON) -> 14 read; emoji, special, short, English dropped;
    # control and markup stripped and kept; an upper-cased copy (exact) and a reworded one (near) removed -> 8.
    assert s["sources"]["news"] == {"read": 14, "kept": 8}
    assert s["cleaning"]["text"] == {"emoji": 1, "control:stripped": 1, "markup:stripped": 1, "special": 1,
                                     "length": 1, "cyrillic": 1}
    assert s["dedup"]["text"] == {"exact duplicate": 1, "near duplicate": 1}
    assert s["problems"]["skipped_per_source"] == {"news": 2, "xnli": 1}
    assert s["labels_dropped_by_map"] == {"label mapped to null": 1}
    n = {t: d["train"] + d["val"] for t, d in s["tasks"].items()}
    assert n == {"ner": 3, "mc": 7, "nli": 4, "paraphrase": 5, "title": 3}  # no teachers: no annotation
    assert s["tasks"]["ner"]["chars"]["max"] == len((FIXTURES / "brat" / "doc1.txt").read_text(encoding="utf-8"))
    assert s["leakage"]["applied"] and s["leakage"]["dropped_per_task"] == {}
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == s
    assert (out / "problems.txt").read_text(encoding="utf-8").splitlines() == s["problems"]["first_messages"]


def test_output_loads_with_the_trainers_reader(plain: tuple[Path, dict]) -> None:
    out, s = plain
    counts = _hmtl_counts(out)
    assert {t: counts["train"].get(t, 0) + counts["val"].get(t, 0) for t in s["tasks"]} == \
        {t: d["train"] + d["val"] for t, d in s["tasks"].items()}
    labels = json.loads((out / "labels.json").read_text(encoding="utf-8"))
    assert labels["ner"][0] == "AGE" and len(labels["ner"]) == 29 and labels["mc"][2] == "спорт"
    recs = _lines(out / "train.jsonl") + _lines(out / "val.jsonl")
    para = [r for r in recs if r["task"] == "paraphrase"]
    assert all(r["origin"] == "rusimplesenteval" and r["source"] != "rusimplesenteval" for r in para)
    assert all(r["source"] == "nerel" for r in recs if r["task"] == "ner")
    assert not any(k.startswith("_") for r in recs for k in r)


def test_split_is_seeded_grouped_and_disjoint(plain: tuple[Path, dict], tmp_path: Path) -> None:
    out, s = plain
    train, val = _lines(out / "train.jsonl"), _lines(out / "val.jsonl")
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    side = {}
    for name, recs in (("train", train), ("val", val)):
        for r in recs:
            if r["task"] == "paraphrase":
                side.setdefault(r["source"], set()).add(name)
    assert all(len(v) == 1 for v in side.values())  # two references of one sentence never straddle the split
    again = tmp_path / "again"
    build_corpus(load_config(CONFIG), again, BuildOptions(**QUIET))
    for f in ("train.jsonl", "val.jsonl", "labels.json"):
        assert (again / f).read_bytes() == (out / f).read_bytes()


def test_split_task_invariants() -> None:
    recs = [{"id": str(i), "_group": str(i // 2), "task": "mc"} for i in range(40)]
    tr, va = split_task(recs, seed=1, task="mc", val_fraction=0.25, val_max=None)
    assert len(tr) + len(va) == 40 and len(va) == 10
    assert {r["_group"] for r in tr}.isdisjoint({r["_group"] for r in va})
    tr2, va2 = split_task(recs, seed=2, task="mc", val_fraction=0.25, val_max=None)
    assert [r["id"] for r in va2] != [r["id"] for r in va]
    _, va3 = split_task(recs, seed=1, task="mc", val_fraction=0.25, val_max=4)
    assert len(va3) == 4
    assert split_task(recs[:2], seed=1, task="mc", val_fraction=0.5, val_max=None)[1] == []  # one group: train


def test_percentiles_and_assignment_by_hand() -> None:
    assert percentiles([5, 1, 3, 2, 4]) == {"p5": 1, "p50": 3, "p95": 5, "max": 5}
    texts = [{"id": str(i)} for i in range(10)]
    a = assign_jobs(texts, {"qa": 2, "title": 1, "paraphrase": 1, "summarization": 0})
    assert {j: len(v) for j, v in a.items()} == {"qa": 5, "title": 3, "paraphrase": 2}
    prefix = assign_jobs(texts[:4], {"qa": 2, "title": 1, "paraphrase": 1})
    assert all(a[j][:len(v)] == v for j, v in prefix.items())  # a --limit trial is a prefix of the full run


def test_leakage_guard_and_limit(tmp_path: Path) -> None:
    from rsg_eval.core.data import load_items

    words = load_items("sample", "DaNetQA", "val")[0].fields["passage"].split()
    leak = {"body": "Из нашего архива. " + " ".join(words[:20]) + " Конец заметки о реке и городах.",
            "headline": "Волга и её города"}
    (tmp_path / "leak.jsonl").write_text(json.dumps(leak, ensure_ascii=False) + "\n", encoding="utf-8")
    raw = {"labels": {"mc": ["спорт", "экономика", "наука", "политика", "культура", "технологии"]},
           "sources": [{"name": "leaky", "kind": "pairs", "task": "title", "path": str(tmp_path / "leak.jsonl"),
                        "fields": {"text": "body", "title": "headline"}},
                       {"name": "headlines", "kind": "pairs", "task": "title", "path": "titles.jsonl",
                        "fields": {"text": "body", "title": "headline"}},
                       {"name": "topics", "kind": "topic", "path": "topics.csv", "label_field": "topic",
                        "label_map": "topic_map.yaml"}],
           "cleaning": {"length": {"title": [10, 5000]}}}
    s = build_corpus(parse_config(raw, FIXTURES), tmp_path / "out", BuildOptions(rsg_data="sample", **QUIET))
    assert s["leakage"]["dropped_per_task"] == {"title": 1}
    assert s["leakage"]["matched_rsg"] == {"title": {"DaNetQA/val": 1}}
    assert s["tasks"]["title"]["sources"] == {"headlines": 3}
    s = build_corpus(parse_config(raw, FIXTURES), tmp_path / "lim", BuildOptions(limit=2, **QUIET))
    assert {k: v["read"] for k, v in s["sources"].items()} == {"leaky": 1, "headlines": 2, "topics": 2}


def test_cli_errors_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rsg_eval", "build-corpus", "--config", str(CONFIG), "--out", str(tmp_path / "o"),
           "--strict", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "texts.jsonl:15: field 'text': no field 'text'" in r.stderr and "Traceback" not in r.stderr
    from rsg_eval.commands.corpus import _teachers

    assert _teachers(["qa=org/model", " qg = ./local "]) == {"qa": "org/model", "qg": "./local"}
    with pytest.raises(RSGError, match="bad --teacher 'qa'"):
        _teachers(["qa"])


# ---------------------------------------------------------------- with tiny teachers


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    torch.set_num_threads(1)
    from rsg_eval.corpus.annotate import load_teachers

    root = tmp_path_factory.mktemp("teachers")
    t5, qa = save_tiny_t5(root / "t5"), save_tiny_qa(root / "qa")
    models = {"qa": str(qa), **{t: str(t5) for t in ("qg", "summarization", "title", "paraphrase")}}
    specs = load_config(CONFIG).teacher_specs(models)
    return {"models": models, "objects": load_teachers(specs, "cpu"), "specs": specs}


def _opts(teachers: dict, **kw) -> BuildOptions:
    return BuildOptions(teachers=teachers["models"], teacher_objects=kw.pop("objects", teachers["objects"]),
                        **QUIET, **kw)


@pytest.fixture(scope="module")
def annotated(teachers: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("annotated")
    return out, build_corpus(load_config(CONFIG), out, _opts(teachers))


@pytest.mark.slow
def test_annotation_counts_and_shards(annotated: tuple[Path, dict]) -> None:
    out, s = annotated
    ann = s["annotation"]
    # 8 clean texts over 4 jobs with equal shares -> 2 each; paraphrase takes 1 sentence per text; shard_size 2
    assert ann["shards"] == {j: {"done": 1, "reused": 0} for j in ("qa", "summarization", "title", "paraphrase")}
    for job, stats in ann["stats"].items():
        filtered = sum(v for k, v in stats.items() if k not in ("kept records",))
        per_unit = 2 if job == "qa" else 1  # a kept qa unit gives a qa and a qg record
        assert stats.get("kept records", 0) // per_unit + filtered == 2, (job, stats)
    shard = _lines(out / "work" / "annotate" / "qa" / "shard-00000.jsonl")
    assert shard[0]["_shard"]["units"] == 2 and len(shard) - 1 == ann["stats"]["qa"].get("kept records", 0)
    _hmtl_counts(out)


@pytest.mark.slow
def test_unfiltered_teachers_give_well_formed_records(teachers: dict, tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    for t in raw["teachers"]:
        raw["teachers"][t]["filter"] = False
    raw["annotation"]["shares"] = {"qa": 1}
    cfg = parse_config(raw, FIXTURES)
    from rsg_eval.corpus.annotate import load_teachers

    objs = load_teachers({t: cfg.teacher_specs(teachers["models"])[t] for t in ("qa", "qg")}, "cpu")
    s = build_corpus(cfg, tmp_path, _opts(teachers, objects=objs))
    recs = [r for r in _lines(tmp_path / "train.jsonl") + _lines(tmp_path / "val.jsonl") if r["task"] in ("qa", "qg")]
    qa = [r for r in recs if r["task"] == "qa"]
    assert len(qa) == s["annotation"]["stats"]["qa"]["kept records"] // 2 > 0
    for r in qa:
        assert r["answer"] in r["context"] and r["question"] and r["teacher_score"] >= 0
        twin = next(x for x in recs if x["id"] == r["id"][:-3] + "#qg")
        assert (twin["context"], twin["answer"], twin["question"]) == (r["context"], r["answer"], r["question"])


@pytest.mark.slow
def test_interrupt_then_resume_redoes_nothing(teachers: dict, annotated: tuple[Path, dict], tmp_path: Path) -> None:
    ref, _ = annotated
    raw = load_config(CONFIG)
    raw.shard_size = 1  # 2 shards per job
    full = tmp_path / "full"
    build_corpus(raw, full, _opts(teachers))
    out = tmp_path / "resumed"
    events: list = []

    def stop_after_first(ev) -> None:
        events.append((ev.job, ev.index, ev.reused))
        if len(events) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_corpus(raw, out, _opts(teachers, on_shard=stop_after_first))
    assert not (out / "train.jsonl").exists()
    first = events[0]
    events.clear()
    build_corpus(raw, out, _opts(teachers, on_shard=events.append))
    done = {(e.job, e.index): e.reused for e in events}
    assert done[first[:2]] is True  # the finished shard was reused
    assert sum(not r for r in done.values()) == len(done) - 1  # every other shard computed once
    for f in ("train.jsonl", "val.jsonl", "labels.json"):
        assert (out / f).read_bytes() == (full / f).read_bytes()
    events.clear()

    def no_loading(*a, **k):
        raise AssertionError("a teacher was loaded although every shard was finished")

    import rsg_eval.corpus.teachers as teachers_mod

    real_load, teachers_mod.load_teacher = teachers_mod.load_teacher, no_loading
    try:
        build_corpus(raw, out, _opts(teachers, objects={}, on_shard=events.append))
    finally:
        teachers_mod.load_teacher = real_load
    assert all(e.reused for e in events) and len(events) == len(done)
    assert (out / "train.jsonl").read_bytes() == (full / "train.jsonl").read_bytes()
    # a smaller batch (after an out-of-memory error) keeps every finished shard
    raw.teachers["title"]["batch_size"] = 1
    events.clear()
    build_corpus(raw, out, _opts(teachers, objects={}, on_shard=events.append))
    assert all(e.reused for e in events) and len(events) == len(done)
    # other teacher settings make other annotations: that job's shards are recomputed, the rest reused
    raw.teachers["title"]["max_new_tokens"] = 5
    events.clear()
    build_corpus(raw, out, _opts(teachers, objects=None, on_shard=events.append))
    assert {(e.job, e.reused) for e in events} == {("title", False), ("qa", True), ("summarization", True),
                                                   ("paraphrase", True)}


class _FailOnCall:
    """Wraps a real teacher and raises on its n-th call (1-based): an injected fault, the model itself runs."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.calls, self.spec = inner, n, 0, inner.spec

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("CUDA out of memory (injected)")
        return self.inner(*args)


@pytest.mark.slow
def test_failing_batch_skipped_counted_or_stops(teachers: dict, tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    cfg.shard_size = 1
    objs = dict(teachers["objects"], title=_FailOnCall(teachers["objects"]["title"], 2))
    msgs: list[str] = []
    opts = _opts(teachers, objects=objs)
    opts.echo = msgs.append
    s = build_corpus(cfg, tmp_path / "skip", opts)
    st = s["annotation"]["stats"]["title"]
    assert st["failed batches"] == 1 and st["failed texts"] == 1
    assert any("teacher title failed on shard 1 batch 0" in m and "CUDA out of memory" in m for m in msgs)
    assert s["annotation"]["shards"]["title"] == {"done": 2, "reused": 0}
    # strict: the run stops naming the batch; the shard finished before it stays on disk and is reused later
    objs["title"] = _FailOnCall(teachers["objects"]["title"], 2)
    cfg.on_error = "stop"
    with pytest.raises(RSGError, match="teacher title failed on shard 1 batch 0"):
        build_corpus(cfg, tmp_path / "stop", _opts(teachers, objects=objs))
    cfg.on_error = "skip"
    assert (tmp_path / "stop" / "work" / "annotate" / "title" / "shard-00000.jsonl").is_file()
    events: list = []
    build_corpus(cfg, tmp_path / "stop", _opts(teachers, on_shard=events.append))
    assert [(e.index, e.reused) for e in events if e.job == "title"] == [(0, True), (1, False)]
    # --retry-failed recomputes the shard with the failed batch, and only it
    events.clear()
    build_corpus(cfg, tmp_path / "skip", _opts(teachers, on_shard=events.append, retry_failed=True))
    assert [(e.index, e.reused) for e in events if e.job == "title"] == [(0, True), (1, False)]


@pytest.mark.slow
def test_built_corpus_trains_with_train_hmtl(annotated: tuple[Path, dict], tmp_path: Path) -> None:
    import math

    from rsg_eval.training.hmtl.train import TrainConfig, train

    out, s = annotated
    res = train(TrainConfig(model="tiny", corpus=str(out), out=str(tmp_path / "hmtl"), epochs=1, batch_size=2,
                            grad_accum=1, max_steps_per_epoch=1, max_source_length=64, max_target_length=16,
                            gradient_checkpointing=False), progress=False)
    assert res.finished and res.steps == 1 and res.final is not None and res.final.is_dir()
    val = [row for row in res.history if row["split"] == "val"][-1]
    present = [t for t in s["tasks"] if s["tasks"][t]["val"] > 0]
    assert {"ner", "mc", "nli", "paraphrase"} <= set(present)
    assert all(math.isfinite(val[t]) for t in present if t in val) and sum(t in val for t in present) >= 4


@pytest.mark.slow
def test_wrong_teacher_is_one_clear_error(teachers: dict, tmp_path: Path) -> None:
    cfg = load_config(CONFIG)
    models = dict(teachers["models"], title=teachers["models"]["qa"])  # an extractive QA model as a title teacher
    with pytest.raises(RSGError, match=r"cannot load teacher title=.* as a seq2seq \(text2text\) model"):
        build_corpus(cfg, tmp_path, BuildOptions(teachers=models, teacher_objects=None, **QUIET))
    with pytest.raises(RSGError, match=r"cannot load teacher qa=.*missing-model"):
        build_corpus(cfg, tmp_path / "b", BuildOptions(teachers=dict(models, qa=str(tmp_path / "missing-model")),
                                                       **QUIET))


@pytest.mark.slow
def test_teacher_outputs_do_not_depend_on_batch_size(teachers: dict) -> None:
    """Why batch_size may stay out of a shard's fingerprint: batching (with padding) changes no output."""
    rows = (FIXTURES / "simple.csv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [r.split('"')[1] + " Текст." * i for i, r in enumerate(rows)]  # different lengths -> padding
    gen, qa = teachers["objects"]["summarization"], teachers["objects"]["qa"]
    one = [gen([t])[0] for t in texts]
    batched = gen(texts)
    assert [t for t, _ in batched] == [t for t, _ in one] and len({t for t, _ in one}) > 1
    assert [s for _, s in batched] == pytest.approx([s for _, s in one], rel=1e-4)
    questions = ["Что случилось?"] * len(texts)
    single = [qa([t], [q])[0] for t, q in zip(texts, questions)]
    batched = qa(texts, questions)
    assert [(a, s) for a, _, s in batched] == [(a, s) for a, _, s in single]  # same answers at the same offsets
    assert [b[1] for b in batched] == pytest.approx([x[1] for x in single], rel=1e-4)


def test_cli_success_prints_removals_and_table(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    res = CliRunner().invoke(app, ["build-corpus", "-c", str(CONFIG), "-o", str(tmp_path), "--data", "sample",
                                   "--limit", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    out = res.output
    # --limit counts accepted records: the bad news lines (15, 16) are never reached, the bad NLI line 5 is
    assert "leakage guard (13-grams" in out and "bad records skipped: {'xnli': 1}" in out
    assert "│ ner " in out.replace("┃", "│") and "total" in out
    s = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert s["limit"] == 5 and all(v["read"] <= 5 for v in s["sources"].values())
