"""Invariants of the bundled sample data (rsg_eval/samples/sample), checked on the raw files.

Stdlib only on purpose: these tests pin the file format that the readers in rsg_eval must cope with,
so they must not go through those readers.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "rsg_eval" / "samples" / "sample"
SPLITS = ("train", "val", "test")
SIMPLE = ("RCB", "PARus", "TERRa", "RUSSE", "RWSD", "DaNetQA")
SIMPLE_SIZES = {"train": 12, "val": 6, "test": 5}
MUSERC_SIZES = {"train": 3, "val": 2, "test": 2}
RUCOS_SIZES = {"train": 4, "val": 3, "test": 3}
BOM = b"\xef\xbb\xbf"
WORD = re.compile(r"\w", re.UNICODE)

# Exact key order of each record kind, copied from the real files.
KEYS = {
    ("TERRa", "train"): ["premise", "hypothesis", "label", "idx"],
    ("TERRa", "test"): ["premise", "hypothesis", "idx"],
    ("RCB", "train"): ["premise", "label", "hypothesis", "verb", "negation", "genre", "idx"],
    ("RCB", "test"): ["premise", "hypothesis", "verb", "negation", "genre", "idx"],
    ("PARus", "train"): ["premise", "choice1", "choice2", "question", "label", "idx"],
    ("PARus", "test"): ["premise", "choice1", "choice2", "question", "idx"],
    ("DaNetQA", "train"): ["question", "passage", "label", "idx"],
    ("DaNetQA", "test"): ["question", "passage", "idx"],
    ("RUSSE", "train"): ["idx", "word", "sentence1", "sentence2", "start1", "end1", "start2", "end2",
                         "label", "gold_sense1", "gold_sense2"],
    ("RUSSE", "test"): ["word", "sentence1", "sentence2", "idx", "start2", "end2", "start1", "end1"],
    ("RWSD", "train"): ["idx", "target", "label", "text"],
    ("RWSD", "val"): ["text", "target", "idx", "label"],
    ("RWSD", "test"): ["text", "target", "idx"],
}
LABELS = {
    "TERRa": {"entailment", "not_entailment"},
    "RCB": {"entailment", "contradiction", "neutral"},
    "PARus": {0, 1},
    "DaNetQA": {True, False},
    "RUSSE": {True, False},
    "RWSD": {True, False},
}


def path(task: str, split: str) -> Path:
    if task == "LiDiRus":
        return SAMPLE / "LiDiRus" / "LiDiRus.jsonl"
    return SAMPLE / task / f"{split}.jsonl"


def rows(task: str, split: str = "test") -> list[dict]:
    # utf-8-sig + strip: the tolerant way to read both the BOM file and the CRLF file.
    text = path(task, split).read_text(encoding="utf-8-sig")
    return [json.loads(line.strip()) for line in text.splitlines() if line.strip()]


def keys_for(task: str, split: str) -> list[str] | None:
    return KEYS.get((task, split)) or KEYS.get((task, "train" if split == "val" else split))


def all_strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in all_strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in all_strings(v)]
    return []


# ------------------------------------------------------------------ layout and encoding

def test_every_file_is_present_and_nothing_else():
    want = {f"{t}/{s}.jsonl" for t in SIMPLE + ("MuSeRC", "RuCoS") for s in SPLITS} | {"LiDiRus/LiDiRus.jsonl"}
    have = {p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert have == want


def test_encoding_quirks_bom_and_crlf_only_where_intended():
    for p in sorted(SAMPLE.rglob("*.jsonl")):
        raw = p.read_bytes()
        rel = p.relative_to(SAMPLE).as_posix()
        assert raw.endswith(b"\n"), rel
        assert raw.startswith(BOM) == (rel == "TERRa/val.jsonl"), rel
        if rel == "RCB/test.jsonl":
            lines = raw.split(b"\n")[:-1]
            assert lines and all(line.endswith(b"\r") for line in lines)
        else:
            assert b"\r" not in raw, rel
        raw.decode("utf-8")  # strict UTF-8
        assert b"\\u04" not in raw, f"{rel}: Cyrillic must be written unescaped (ensure_ascii=False)"


def test_bom_file_is_not_plain_json_without_sig():
    # The quirk is real: a naive utf-8 reader sees U+FEFF before the first '{'.
    first = path("TERRa", "val").read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("\ufeff")
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)


# ------------------------------------------------------------------ sizes, idx, labels

@pytest.mark.parametrize("task", SIMPLE)
def test_simple_tasks_sizes_idx_keys_and_labels(task):
    for split in SPLITS:
        rs = rows(task, split)
        assert len(rs) == SIMPLE_SIZES[split], (task, split)
        assert [r["idx"] for r in rs] == list(range(len(rs)))
        assert all(type(r["idx"]) is int for r in rs)
        for r in rs:
            keys = list(r)
            if task == "RCB" and "no_negation" in r:
                keys[keys.index("no_negation")] = "negation"
            assert keys == keys_for(task, split), (task, split, r["idx"])
        if split == "test":
            assert not any("label" in r for r in rs)
            continue
        labels = [r["label"] for r in rs]
        assert set(labels) <= LABELS[task]
        # bool is a subclass of int: insist on the exact JSON type per task.
        want_type = {"TERRa": str, "RCB": str, "PARus": int, "DaNetQA": bool, "RUSSE": bool, "RWSD": bool}[task]
        assert all(type(x) is want_type for x in labels)
        counts = Counter(labels)
        if task == "RCB":
            assert set(counts) == LABELS["RCB"], (split, counts)
        elif task == "RWSD":
            # Skewed toward False like the real data, but both classes present.
            assert 0 < counts[True] < counts[False], (split, counts)
        else:
            assert len(set(counts.values())) == 1 and len(counts) == 2, (task, split, counts)


def test_rcb_quirks_no_negation_key_and_multi_verb():
    train = rows("RCB", "train")
    odd = [r for r in train if "no_negation" in r]
    assert len(odd) == 1 and "negation" not in odd[0]
    assert list(odd[0])[4] == "no_negation"
    for split in ("val", "test"):
        assert all("negation" in r and "no_negation" not in r for r in rows("RCB", split))
    every = [r for s in SPLITS for r in rows("RCB", s)]
    assert any("," in r["verb"] for r in every)
    assert {r.get("negation", r.get("no_negation")) for r in every} == {"no_negation", "negation", "double_negation"}
    assert {r["genre"] for r in every} == {"fiction", "kp", "interfax"}


def test_parus_question_values():
    for split in SPLITS:
        assert {r["question"] for r in rows("PARus", split)} == {"cause", "effect"}


def test_lidirus_string_idx_gold_labels_and_tags():
    rs = rows("LiDiRus")
    assert len(rs) == 8
    assert [r["idx"] for r in rs] == [str(i) for i in range(8)]
    assert {r["label"] for r in rs} == {"entailment", "not_entailment"}
    tag_keys = {"logic", "lexical-semantics", "predicate-argument-structure", "knowledge"}
    for r in rs:
        assert list(r)[:4] == ["idx", "label", "sentence1", "sentence2"]
        assert set(r) - {"idx", "label", "sentence1", "sentence2"} <= tag_keys
    tagged = [r for r in rs if set(r) & tag_keys]
    assert 0 < len(rs) - len(tagged) < len(tagged)
    assert {r["knowledge"] for r in rs if "knowledge" in r} == {"World knowledge", "Common sense"}
    assert any(";" in v for r in rs for k, v in r.items() if k in tag_keys)


# ------------------------------------------------------------------ RUSSE offsets

def _is_word_edge(text: str, i: int) -> bool:
    return i <= 0 or i >= len(text) or not WORD.match(text[i])


def test_russe_offsets_follow_the_official_quirks():
    cut_short = 0
    for split in SPLITS:
        for r in rows("RUSSE", split):
            lemma_head = r["word"][:2].lower()
            for n in ("1", "2"):
                text, start, end = r["sentence" + n], r["start" + n], r["end" + n]
                assert _is_word_edge(text, start - 1) and WORD.match(text[start])
                if split == "test":
                    # end = start + len(form) - 1: exactly one letter of the form is cut off.
                    form = text[start:end + 1]
                    assert WORD.match(text[end]) and _is_word_edge(text, end + 1), (r["idx"], n)
                else:
                    # end = start + len(form) + 1: the slice carries one following char, unless the form ends the text.
                    form = text[start:end - 1]
                    assert _is_word_edge(text, end - 1) and WORD.match(text[end - 2]), (r["idx"], n)
                    if end > len(text):
                        assert end == len(text) + 1
                        cut_short += 1
                    else:
                        assert not WORD.match(text[end - 1])
                assert form.isalpha() and form.lower().startswith(lemma_head), (split, r["idx"], form)
        if split != "test":
            for r in rows("RUSSE", split):
                same = r["gold_sense1"] == r["gold_sense2"]
                assert same == r["label"] and type(r["gold_sense1"]) is int
        else:
            assert not any(k.startswith("gold_sense") for r in rows("RUSSE", split) for k in r)
    assert cut_short >= 2  # at least one train and one val example ends with the target word


def test_russe_train_and_val_keep_the_spaced_colon_formatting():
    for split in ("train", "val"):
        assert path("RUSSE", split).read_text(encoding="utf-8").startswith('{"idx" : 0, ')
    assert '" : ' not in path("RUSSE", "test").read_text(encoding="utf-8")


# ------------------------------------------------------------------ RWSD spans

def _norm(tok: str) -> str:
    return tok.strip(",.!?;:«»\"()")


def _span_at(text: str, span: str, index: int) -> bool:
    toks = [_norm(t) for t in text.split()]
    want = [_norm(t) for t in span.split()]
    return toks[index:index + len(want)] == want


def test_rwsd_span_indices_with_exactly_one_wrong_val_record():
    wrong = []
    for split in SPLITS:
        for r in rows("RWSD", split):
            t = r["target"]
            assert set(t) == {"span1_text", "span1_index", "span2_text", "span2_index"}
            assert _span_at(r["text"], t["span1_text"], t["span1_index"]), (split, r["idx"])
            if not _span_at(r["text"], t["span2_text"], t["span2_index"]):
                wrong.append((split, r["idx"]))
                true_index = next(i for i in range(len(r["text"].split())) if _span_at(r["text"], t["span2_text"], i))
                assert 1 <= abs(t["span2_index"] - true_index) <= 2
    assert wrong == [("val", 3)]


def test_rwsd_target_key_order_varies_like_the_real_files():
    orders = {split: list(rows("RWSD", split)[0]["target"]) for split in SPLITS}
    assert len({tuple(o) for o in orders.values()}) == 3


# ------------------------------------------------------------------ MuSeRC

def test_muserc_structure_and_global_ids():
    for split in SPLITS:
        rs = rows("MuSeRC", split)
        assert len(rs) == MUSERC_SIZES[split]
        assert [r["idx"] for r in rs] == list(range(len(rs)))
        qids, aids = [], []
        for r in rs:
            assert list(r) == ["idx", "passage"] and list(r["passage"]) == ["text", "questions"]
            text = r["passage"]["text"].strip('"')
            assert text.startswith("(1) ") and "(2) " in text
            assert len(r["passage"]["questions"]) == 2
            for q in r["passage"]["questions"]:
                assert list(q) == ["question", "answers", "idx"]
                qids.append(q["idx"])
                assert 3 <= len(q["answers"]) <= 4
                for a in q["answers"]:
                    aids.append(a["idx"])
                    if split == "test":
                        assert list(a) == ["idx", "text"]
                    else:
                        assert list(a) == ["idx", "text", "label"] and a["label"] in (0, 1) and type(a["label"]) is int
        # Ids count on across passages: 0..N-1, strictly increasing, never restarting per passage.
        assert qids == list(range(len(qids))) and aids == list(range(len(aids)))
    val_qs = [q for r in rows("MuSeRC", "val") for q in r["passage"]["questions"]]
    assert any(sum(a["label"] for a in q["answers"]) >= 2 for q in val_qs)
    assert any(r["passage"]["text"].startswith('"') for s in SPLITS for r in rows("MuSeRC", s))


# ------------------------------------------------------------------ RuCoS

def test_rucos_structure_offsets_and_answers():
    repeated = overlapping = doubled = 0
    for split in SPLITS:
        rs = rows("RuCoS", split)
        assert len(rs) == RUCOS_SIZES[split]
        for i, r in enumerate(rs):
            assert r["idx"] == i and list(r) == ["idx", "passage", "qas"]
            text = r["passage"]["text"]
            assert "\n@highlight\n" in text
            ents = [(e["start"], e["end"]) for e in r["passage"]["entities"]]
            assert ents == sorted(ents, key=lambda x: (x[0], -x[1])) and len(set(ents)) == len(ents)
            strings = [text[a:b] for a, b in ents]
            for (a, b), s in zip(ents, strings):
                # Exclusive end: the slice is the entity exactly, with no trailing char.
                assert s and s == s.strip() and WORD.match(s[0]) and WORD.match(s[-1])
                assert _is_word_edge(text, a - 1) and _is_word_edge(text, b)
            repeated += any(c >= 2 for c in Counter(strings).values())
            overlapping += any(a2 < b1 for (a1, b1), (a2, _) in zip(ents, ents[1:]))
            assert len(r["qas"]) == 1
            qa = r["qas"][0]
            assert qa["idx"] == r["idx"] and qa["query"].count("@placeholder") == 1
            if split == "test":
                assert list(qa) == ["query", "idx"]
                continue
            assert list(qa) == ["query", "answers", "idx"] and qa["answers"]
            for ans in qa["answers"]:
                assert text[ans["start"]:ans["end"]] == ans["text"]
                assert (ans["start"], ans["end"]) in ents
            texts = [a["text"] for a in qa["answers"]]
            doubled += len(texts) >= 2 and len(set(texts)) == 1
    assert repeated and overlapping and doubled


# ------------------------------------------------------------------ originality

def test_no_sentence_is_copied_from_the_real_files():
    shared = Path(os.environ.get("RSG_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared" / "rsg"))
    if not shared.is_dir():
        pytest.skip("official RSG files not available")
    for task_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        real = "\n".join(p.read_text(encoding="utf-8-sig") for p in (shared / task_dir.name).glob("*.jsonl"))
        real = json.dumps(real, ensure_ascii=False)  # compare in one escaping
        for f in task_dir.glob("*.jsonl"):
            for r in rows(task_dir.name, f.stem) if task_dir.name != "LiDiRus" else rows("LiDiRus"):
                for s in all_strings(r):
                    for sent in re.split(r"(?<=[.!?])\s+|\n", s):
                        if len(sent) > 25:
                            assert json.dumps(sent, ensure_ascii=False)[1:-1] not in real, (task_dir.name, sent)
