"""Readers of `rsg build-corpus`: brat (nested, discontinuous, BOM), raw texts (JSONL, Parquet, .txt folder, .gz),
topic and NLI tables with label maps, generation pairs; bad input is named by file and line, skipped and counted,
or stops the run in strict mode."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rsg_eval.corpus.brat import chunk_doc, iter_brat, parse_ann_line
from rsg_eval.corpus.readers import iter_nli, iter_pairs, iter_texts, iter_topics
from rsg_eval.corpus.records import NEREL_TYPES, Problems
from rsg_eval.core.errors import RSGError

FX = Path(__file__).parent / "fixtures" / "corpus"


def _brat(folder: Path, **kw) -> tuple[list[dict], Problems]:
    problems = Problems(strict=kw.pop("strict", False))
    recs = list(iter_brat(folder, types=NEREL_TYPES, problems=problems, source="nerel", **kw))
    return recs, problems


def _surface(rec: dict, ent: dict) -> str:
    return rec["text"][ent["start"]:ent["end"]]


def test_brat_nested_and_discontinuous_offsets_kept() -> None:
    recs, problems = _brat(FX / "brat")
    assert problems.total == 0
    by_id = {r["id"]: r for r in recs}
    assert set(by_id) == {"nerel:doc1", "nerel:doc2_bom", "nerel:sub/doc3_bomcount"}
    doc = by_id["nerel:doc1"]
    got = [(_surface(doc, e), e["type"]) for e in doc["entities"]]
    # sorted by start, longer first; the nested CITY sits inside the ORGANIZATION inside the PROFESSION
    assert got[:4] == [("Ректор Московского государственного университета", "PROFESSION"),
                       ("Московского государственного университета", "ORGANIZATION"),
                       ("Московского", "CITY"), ("Виктор Садовничий", "PERSON")]
    disc = [e for e in doc["entities"] if "fragments" in e]
    assert len(disc) == 1
    assert [doc["text"][s:e] for s, e in disc[0]["fragments"]] == ["физического", "факультетов"]
    assert _surface(doc, disc[0]) == "физического и химического факультетов"  # the covering span
    assert len(doc["entities"]) == 7  # relation, normalisation and note lines are ignored


def test_brat_discontinuous_modes() -> None:
    frag, _ = _brat(FX / "brat", discontinuous="fragments")
    doc = next(r for r in frag if r["id"] == "nerel:doc1")
    orgs = [_surface(doc, e) for e in doc["entities"] if e["type"] == "ORGANIZATION"]
    assert sorted(orgs) == ["Московского государственного университета", "факультетов",
                            "физического"]
    drop, _ = _brat(FX / "brat", discontinuous="drop")
    doc = next(r for r in drop if r["id"] == "nerel:doc1")
    assert len(doc["entities"]) == 6
    with pytest.raises(RSGError, match="discontinuous"):
        _brat(FX / "brat", discontinuous="merge")


def test_brat_bom_files_with_and_without_bom_in_offsets() -> None:
    recs, _ = _brat(FX / "brat")
    by_id = {r["id"]: r for r in recs}
    d2 = by_id["nerel:doc2_bom"]  # offsets ignore the BOM
    assert not d2["text"].startswith("\ufeff")
    assert [_surface(d2, e) for e in d2["entities"]] == ["Газпром", "третьем квартале"]
    d3 = by_id["nerel:sub/doc3_bomcount"]  # offsets count the BOM as character 0: shifted back by one
    assert [(_surface(d3, e), e["start"]) for e in d3["entities"]] == [("Казани", 6), ("штраф", 22)]


def test_brat_bad_lines_named_skipped_counted_or_strict() -> None:
    recs, problems = _brat(FX / "brat_bad")
    assert [r["id"] for r in recs] == ["nerel:good"]
    assert problems.counts["nerel"] == 3
    msgs = "\n".join(problems.messages)
    assert "malformed.ann:2: bad offsets 'seven 12'" in msgs
    assert "outside.ann:2: offsets ((30, 400),) outside the text" in msgs
    assert "unknowntype.ann:1: field 'type': entity type 'SPACESHIP'" in msgs
    with pytest.raises(RSGError, match=r"malformed\.ann:2"):
        _brat(FX / "brat_bad", strict=True)
    # a type map can rename a foreign type into the 29 classes
    recs, problems = _brat(FX / "brat_bad", type_map={"SPACESHIP": "PRODUCT"})
    assert "nerel:unknowntype" in [r["id"] for r in recs] and problems.total == 2


def test_parse_ann_line_kinds() -> None:
    p = Path("x.ann")
    assert parse_ann_line("R1\tREL Arg1:T1 Arg2:T2", p, 1) is None
    assert parse_ann_line("", p, 1) is None
    e = parse_ann_line("T3\tAGE 1 3;5 9\tab cd", p, 1)
    assert e is not None and e.spans == ((1, 3), (5, 9)) and e.type == "AGE"
    for bad in ("T1\tAGE 5 5\tx", "T1 AGE 1 2 x", "T1\tAGE\tx", "X1\tfoo"):
        with pytest.raises(RSGError, match="x.ann:7"):
            parse_ann_line(bad, p, 7)


def test_chunk_doc_never_cuts_an_entity() -> None:
    text = "Первая строка про Москву.\nВторая строка.\nТретья строка про\nСанкт-Петербург."
    s = text.index("про\nСанкт") + 4
    ents = [{"start": text.index("Москву"), "end": text.index("Москву") + 6, "type": "CITY"},
            {"start": text.index("Третья"), "end": len(text) - 1, "type": "EVENT"},  # spans a line break
            {"start": s, "end": s + len("Санкт-Петербург"), "type": "CITY"}]
    pieces = chunk_doc(text, ents, max_chars=30)
    assert "".join(p for _, p, _ in pieces) == text
    kept = [(off + e["start"], off + e["end"], e["type"]) for off, _, es in pieces for e in es]
    assert sorted(kept) == sorted((e["start"], e["end"], e["type"]) for e in ents)
    for off, piece, es in pieces:
        for e in es:
            assert piece[e["start"]:e["end"]] == text[off + e["start"]:off + e["end"]]


def test_texts_jsonl_txt_folder_gz_and_parquet(tmp_path: Path) -> None:
    problems = Problems()
    recs = list(iter_texts(FX / "texts.jsonl", id_field="id", problems=problems, source="news"))
    assert len(recs) == 14 and recs[0]["id"] == "news:t0"
    assert problems.counts["news"] == 2
    assert any("texts.jsonl:15: field 'text': no field 'text'" in m for m in problems.messages)
    assert any("texts.jsonl:16: not valid JSON" in m for m in problems.messages)

    folder = list(iter_texts(FX / "texts_dir", problems=problems, source="dir"))
    assert [r["id"] for r in folder] == ["dir:a.txt", "dir:b.txt"]  # empty.txt skipped and counted
    assert not folder[0]["text"].startswith("\ufeff")
    assert problems.counts["dir"] == 1

    gz = tmp_path / "t.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"content": {"body": "Текст номер один."}}, ensure_ascii=False) + "\n")
    got = list(iter_texts(gz, text_field="content.body", problems=problems, source="gz"))
    assert got[0]["text"] == "Текст номер один." and got[0]["id"] == "gz:t.jsonl.gz:1"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Первый текст.", "", "Третий текст."], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    problems = Problems()
    got = list(iter_texts(tmp_path / "p.parquet", problems=problems, source="pq"))
    assert [r["text"] for r in got] == ["Первый текст.", "Третий текст."]
    assert problems.messages[0].endswith("p.parquet:2: field 'text': empty or not text: '' (expected: a string)")


def test_topics_with_label_map_and_unknown_labels() -> None:
    import yaml

    lmap = {str(k): v for k, v in yaml.safe_load((FX / "topic_map.yaml").read_text(encoding="utf-8")).items()}
    problems, dropped = Problems(), {}
    recs = list(iter_topics(FX / "topics.csv", label_field="topic", label_map=lmap, classes=None,
                            problems=problems, source="t", dropped=dropped))
    assert [r["label"] for r in recs] == ["спорт", "экономика", "наука", "политика", "культура", "технологии",
                                          "спорт"]
    assert dropped == {"label mapped to null": 1} and problems.total == 0
    recs = list(iter_topics(FX / "topics.jsonl", label_map=lmap, classes=None, problems=problems, source="j",
                            dropped=dropped))
    assert len(recs) == 1
    assert problems.messages == ["%s:2: field 'label': label 'weather' is not in the label map (expected: %s)"
                                 % (FX / "topics.jsonl", ", ".join(lmap))]
    # a mapped class that is not one of the head's classes is an error too
    with pytest.raises(RSGError, match="not a class of this head"):
        list(iter_topics(FX / "topics.csv", label_field="topic", label_map=lmap, classes=("спорт",),
                         problems=Problems(strict=True), source="t", dropped={}))


def test_nli_label_names() -> None:
    problems = Problems()
    recs = list(iter_nli(FX / "nli.jsonl", label_map={"0": "entailment", "1": "neutral", "2": "contradiction"},
                         problems=problems, source="x", dropped={}))
    assert [r["label"] for r in recs] == ["entailment", "contradiction", "neutral", "entailment"]
    assert problems.counts["x"] == 1 and "nli.jsonl:5: field 'label': label 5 is not in the label map" \
        in problems.messages[0]
    # without a map the labels must already be the three names
    with pytest.raises(RSGError, match="label '0' is not a class"):
        list(iter_nli(FX / "nli.jsonl", label_map=None, problems=Problems(strict=True), source="x", dropped={}))


def test_pairs_rusimplesenteval_layout_groups_references() -> None:
    problems = Problems()
    recs = list(iter_pairs(FX / "simple.csv", task="paraphrase",
                           fields={"source": "INPUT:source", "target": "OUTPUT:output"}, problems=problems,
                           source="rsse"))
    assert len(recs) == 5 and problems.total == 0
    assert recs[0]["source"].startswith("Вследствие") and recs[0]["target"].startswith("Из-за")
    assert recs[0]["_group"] == recs[1]["_group"] != recs[2]["_group"]  # two references of one sentence
    assert recs[0]["id"] == "rsse:simple.csv:2"  # CSV line (header = line 1)
    with pytest.raises(RSGError, match="no column given for"):
        list(iter_pairs(FX / "simple.csv", task="qa", fields={"context": "INPUT:source"}, problems=problems,
                        source="rsse"))


def test_brat_crlf_text_with_offsets_counted_on_lf(tmp_path: Path) -> None:
    text = "Первая строка.\r\nВ Москве снег.\r\n"
    i = text.replace("\r\n", "\n").index("Москве")  # a tool that read the file with universal newlines
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "a.ann").write_bytes(f"T1\tCITY {i} {i + 6}\tМоскве\r\n".encode("utf-8"))
    recs, problems = _brat(tmp_path)
    assert problems.total == 0
    assert recs[0]["text"] == "Первая строка.\nВ Москве снег.\n" and _surface(recs[0], recs[0]["entities"][0]) == "Москве"
    # offsets counted on the CRLF text keep the CRLF text
    j = text.index("Москве")
    (tmp_path / "a.ann").write_text(f"T1\tCITY {j} {j + 6}\tМоскве\n", encoding="utf-8")
    recs, _ = _brat(tmp_path)
    assert recs[0]["text"] == text and recs[0]["entities"][0]["start"] == j
