"""The 10k-style subset: allocation by hand, a seeded per-task stratified sample copied byte for byte, the CLI path
that cuts a subset from an already built corpus without rebuilding it; size targets in the config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _corpus_utils import CONFIG, FIXTURES
from rsg_eval.corpus.build import BuildOptions, build_corpus
from rsg_eval.corpus.config import load_config, parse_config, parse_sizes
from rsg_eval.corpus.subset import allocate, cut_subset
from rsg_eval.core.errors import RSGError

QUIET = dict(progress=False, echo=lambda m: None)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build_corpus(load_config(CONFIG), out, BuildOptions(**QUIET))
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_allocate_by_hand() -> None:
    assert allocate({"a": 50, "b": 30, "c": 20}, 10) == {"a": 5, "b": 3, "c": 2}
    # quotas 9.7 / 0.2 / 0.1: each task keeps one example, the largest gives one back
    assert allocate({"a": 97, "b": 2, "c": 1}, 10) == {"a": 8, "b": 1, "c": 1}
    assert allocate({"a": 5, "b": 5}, 3) == {"a": 2, "b": 1}     # equal remainders: by name
    assert allocate({"a": 1, "b": 9}, 10) == {"a": 1, "b": 9}    # all of it
    assert allocate({"a": 3, "b": 1, "c": 0}, 2) == {"a": 1, "b": 1}


def test_subset_is_a_seeded_stratified_sample_of_the_corpus(corpus: Path, tmp_path: Path) -> None:
    train, val = _lines(corpus / "train.jsonl"), _lines(corpus / "val.jsonl")
    counts: dict[str, int] = {}
    for line in train:
        t = json.loads(line)["task"]
        counts[t] = counts.get(t, 0) + 1
    s = cut_subset(corpus, tmp_path / "a", train=8, seed=3)
    sub = _lines(tmp_path / "a" / "train.jsonl")
    got: dict[str, int] = {}
    for line in sub:
        got[json.loads(line)["task"]] = got.get(json.loads(line)["task"], 0) + 1
    assert got == {t: n for t, n in allocate(counts, 8).items() if n} and len(sub) == 8
    assert [x for x in train if x in set(sub)] == sub   # the corpus' records, byte for byte, in its order
    assert s["total"]["val"] == min(round(8 / 10), len(val)) == len(_lines(tmp_path / "a" / "val.jsonl"))
    assert set(_lines(tmp_path / "a" / "val.jsonl")) <= set(val)
    assert (tmp_path / "a" / "labels.json").read_bytes() == (corpus / "labels.json").read_bytes()
    cut_subset(corpus, tmp_path / "b", train=8, seed=3)
    assert (tmp_path / "b" / "train.jsonl").read_bytes() == (tmp_path / "a" / "train.jsonl").read_bytes()
    others = [set(_lines(cut_subset(corpus, tmp_path / f"s{k}", train=8, seed=k) and tmp_path / f"s{k}" /
                         "train.jsonl")) for k in range(4, 8)]
    assert any(o != set(sub) for o in others)   # another seed, another sample
    # the trainer reads it (17 topic classes kept from labels.json)
    from rsg_eval.corpus.load import load_examples, open_corpus

    c = open_corpus(tmp_path / "a", require_val=True)
    assert len(load_examples(c, "train")) == 8 and len(c.labels.mc) == 17


def test_subset_errors(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(RSGError, match="a subset of 1000 train examples from a corpus of"):
        cut_subset(corpus, tmp_path / "x", train=1000)
    with pytest.raises(RSGError, match="overwrite its own corpus"):
        cut_subset(corpus, corpus, train=2)
    with pytest.raises(RSGError, match="build the corpus first"):
        cut_subset(tmp_path, tmp_path / "y", train=2)


def test_cli_subset_reuses_a_finished_build(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    args = ["build-corpus", "-c", str(CONFIG), "-o", str(tmp_path / "c"), "--data", "sample", "--quiet",
            "--subset", "6"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert len(_lines(tmp_path / "c" / "subset-6" / "train.jsonl")) == 6
    stamp = (tmp_path / "c" / "train.jsonl").stat().st_mtime_ns
    res = CliRunner().invoke(app, args[:-1] + ["4", "--subset-out", str(tmp_path / "small")])
    assert res.exit_code == 0, res.output
    assert "already built from this config: cutting the subset only" in res.output
    assert (tmp_path / "c" / "train.jsonl").stat().st_mtime_ns == stamp   # not rebuilt
    assert len(_lines(tmp_path / "small" / "train.jsonl")) == 4
    # another option that changes the corpus (--limit): built again
    res = CliRunner().invoke(app, args + ["--limit", "3"])
    assert res.exit_code == 0 and "cutting the subset only" not in res.output


def test_config_subset_and_sizes(tmp_path: Path) -> None:
    import yaml

    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    raw["subset"] = {"train": 5, "val": 1, "seed": 2}
    cfg = parse_config(raw, FIXTURES)
    assert (cfg.subset.train, cfg.subset.val, cfg.subset.seed) == (5, 1, 2)
    # total alone: an equal share for each of the 8 tasks (remainders to the first ones)
    t, total = parse_sizes({"total": 1_000_000})
    assert total == 1_000_000 and set(t.values()) == {125_000}
    t, _ = parse_sizes({"total": 1000, "targets": {"ner": 0.25, "mc": "10%", "qa": 300}})
    assert t == {"ner": 250, "mc": 100, "qa": 300}
    for bad, msg in (({"targets": {"ner": 0.5}}, "a share needs sizes.total"),
                     ({"total": 10, "targets": {"xx": 1}}, "no task 'xx'"),
                     ({"total": 10, "targets": {"ner": 1.5}}, "a share above 1"),
                     ({"total": 100, "targets": {"ner": 0.8, "mc": 0.8}}, "add up to 160")):
        with pytest.raises(RSGError, match=msg):
            parse_sizes(bad)
    raw["sizes"] = {"total": 100}
    with pytest.raises(RSGError, match="annotation.shares and sizes both"):
        parse_config(raw, FIXTURES)


def test_the_paper_recipe_parses_to_the_papers_sizes() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "corpus_paper.yaml")
    assert sum(cfg.targets.values()) == cfg.total == 1_000_000
    assert round(cfg.total * (1 - cfg.val_fraction)) == 950_000 and round(cfg.total * cfg.val_fraction) == 50_000
    assert cfg.subset.train == 10_000 and len(cfg.mc_classes) == 17
    specs = cfg.teacher_specs()
    assert set(specs) == {"ner", "mc", "nli", "qa", "qg", "summarization", "title", "paraphrase"}
    assert specs["qa"].model == "timpal0l/mdeberta-v3-base-squad2"   # the paper's QA teacher
    rulm = next(s for s in cfg.sources if s.name == "rulm")
    assert rulm.opts["sample"] == 870_000


def test_10k_subset_is_10000_train_and_1000_val_as_the_paper_says(tmp_path: Path) -> None:
    """Issue 23 item 9: a corpus of 19,000 train and 1,000 val records (its own proportion would give 526 val);
    `--subset 10k` cuts 10,000 train and 1,000 val by default, as the paper's Figure 2 caption says."""
    from rsg_eval.corpus.subset import parse_count

    corpus = tmp_path / "c"
    corpus.mkdir()
    for split, n in (("train", 19_000), ("val", 1_000)):
        with open(corpus / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for i in range(n):
                task = "ner" if i % 4 == 0 else "nli"
                fh.write(json.dumps({"id": f"{split}-{i}", "task": task}) + "\n")
    (corpus / "labels.json").write_text("{}", encoding="utf-8")
    assert parse_count("10k") == parse_count("10000") == parse_count("10_000") == 10_000
    with pytest.raises(RSGError):
        parse_count("ten")
    s = cut_subset(corpus, tmp_path / "s", train=parse_count("10k"))
    assert s["total"] == {"train": 10_000, "val": 1_000}
    assert len(_lines(tmp_path / "s" / "val.jsonl")) == 1_000
    assert s["tasks"]["ner"]["val"] == 250 and s["tasks"]["nli"]["val"] == 750  # each task keeps its share
    s = cut_subset(corpus, tmp_path / "t", train=10_000, val=300)  # an explicit val count still wins
    assert s["total"]["val"] == 300
