"""Task parsing: the real quirks (RSG_SPEC.md section 5) and clear errors for bad input."""

import json

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.core.data import load_items
from rsg_eval.core.tasks import TASK_NAMES, fix_span_index, get_task, limit_groups, locate_word, resolve_tasks

SPLITS = {t: (("val", "test") if t == "LiDiRus" else ("train", "val", "test")) for t in TASK_NAMES}


@pytest.mark.parametrize("task", TASK_NAMES)
def test_sample_items_are_consistent(task):
    for split in SPLITS[task]:
        items = load_items("sample", task, split)
        assert items, (task, split)
        keys = [it.key for it in items]
        assert len(keys) == len(set(keys))
        for it in items:
            assert it.task == task and it.split == split and isinstance(it.key, int)
            assert it.labels, "every item needs candidate labels"
            if split == "test" and task != "LiDiRus":
                assert it.gold is None
            elif task == "RuCoS":
                assert isinstance(it.gold, tuple) and it.gold
            else:
                assert it.gold in it.labels and type(it.gold) in {type(x) for x in it.labels}


def test_registry_names_and_errors():
    assert get_task("terra").name == "TERRa" and get_task("DANETQA").name == "DaNetQA"
    assert resolve_tasks(None) == list(TASK_NAMES)
    assert resolve_tasks(["rcb,terra", "RCB"]) == ["RCB", "TERRa"]
    with pytest.raises(RSGError) as exc:
        get_task("rte")
    assert "LiDiRus" in str(exc.value) and "RuCoS" in str(exc.value)
    with pytest.raises(RSGError, match="no split 'dev'"):
        load_items("sample", "TERRa", "dev")


def test_lidirus_string_idx_labels_and_tags():
    items = load_items("sample", "LiDiRus", "test")
    assert [it.key for it in items] == list(range(len(items)))
    assert all(it.gold in ("entailment", "not_entailment") for it in items)
    assert any(it.meta for it in items) and any(not it.meta for it in items)
    assert items[0].fields["premise"] == items[0].fields["sentence1"]


def test_rcb_no_negation_key_is_read():
    items = load_items("sample", "RCB", "train")
    assert all(it.fields["negation"] for it in items)


def test_muserc_global_ids_and_groups():
    items = load_items("sample", "MuSeRC", "val")
    qs = [it.group for it in items]
    assert qs == sorted(qs) and len(set(qs)) >= 4
    by_q = {}
    for it in items:
        by_q.setdefault(it.group, set()).add(it.doc)
    assert all(len(docs) == 1 for docs in by_q.values())  # a question belongs to one passage
    assert limit_groups(items, 1) == [it for it in items if it.group == qs[0]]


def test_rucos_candidates_distinct_and_gold_answers():
    for it in load_items("sample", "RuCoS", "val"):
        assert len(set(it.labels)) == len(it.labels)
        assert "@placeholder" in it.fields["query"] and "@highlight" not in it.fields["passage"]
        assert set(it.gold) <= set(it.labels)


def test_russe_word_located_despite_offsets():
    s = "Старый дом стоял у реки, и дома вокруг были новые."
    # train/val convention: the slice takes one more character; test: one less
    assert locate_word(s, "дом", 7, 11) == ("дом", 7, 10)
    assert locate_word(s, "дом", 27, 30) == ("дома", 27, 31)
    # an offset that points at the wrong word: fall back to the best lemma match
    assert locate_word(s, "река", 0, 6)[0] == "реки"
    for it in load_items("sample", "RUSSE", "test"):
        assert it.fields["form1"] in it.fields["sentence1"] and it.fields["form2"] in it.fields["sentence2"]


def test_rwsd_wrong_span_index_corrected():
    text = "Кот прогнал собаку, потому что она лаяла."
    assert fix_span_index(text, "она лаяла.", 5) == (5, False)
    assert fix_span_index(text, "она лаяла", 3) == (5, True)
    fixed = [it for it in load_items("sample", "RWSD", "val") if it.meta["span_index_fixed"]]
    assert len(fixed) == 1
    it = fixed[0]
    toks = it.fields["text"].split()
    assert toks[it.fields["span2_index"]].strip(".,").lower() == it.fields["span2_text"].split()[0].lower()


def test_bom_and_crlf_files_parse():
    from rsg_eval.core.data import resolve_data

    src = resolve_data("sample")
    assert src.path("TERRa", "val").read_bytes().startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in src.path("RCB", "test").read_bytes()
    assert len(load_items("sample", "TERRa", "val")) == 6 and len(load_items("sample", "RCB", "test")) == 5


def _write(tmp_path, task, split, lines):
    d = tmp_path / task
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


GOOD = json.dumps({"premise": "Дождь шёл весь день.", "hypothesis": "Было сухо.", "label": "not_entailment",
                   "idx": 0}, ensure_ascii=False)


@pytest.mark.parametrize("line,msg,field", [
    ('{"premise": "Дождь", "hypothesis": "Сухо", "lab', "not valid JSON", None),
    ('{"premise": "Дождь", "label": "entailment", "idx": 1}', "missing field", "hypothesis"),
    ('{"premise": "Дождь", "hypothesis": "Сухо", "label": "yes", "idx": 1}', "invalid label 'yes'", "label"),
    ('{"premise": "Дождь", "hypothesis": "Сухо", "label": "entailment", "idx": 0}', "duplicate idx 0", "idx"),
    ('[1, 2]', "instead of an object", None),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, msg, field):
    root = _write(tmp_path, "TERRa", "val", [GOOD, line])
    with pytest.raises(RSGError) as exc:
        load_items(root, "TERRa", "val")
    e = exc.value
    assert e.line == 2 and e.file.endswith("val.jsonl") and msg in str(e)
    if field:
        assert e.field == field
    if "invalid label" in msg:
        assert "entailment" in str(e) and "not_entailment" in str(e)


def test_wrong_types_are_errors(tmp_path):
    root = _write(tmp_path, "PARus", "val", [json.dumps({"premise": "a", "choice1": "b", "choice2": "c",
                                                         "question": "cause", "label": True, "idx": 0})])
    with pytest.raises(RSGError, match="invalid label True"):
        load_items(root, "PARus", "val")
    root = _write(tmp_path, "PARus", "val", [json.dumps({"premise": "a", "choice1": "b", "choice2": "c",
                                                         "question": "why", "label": 0, "idx": 0})])
    with pytest.raises(RSGError, match="question") as exc:
        load_items(root, "PARus", "val")
    assert "cause" in str(exc.value)


def test_rucos_entity_outside_text_is_an_error(tmp_path):
    rec = {"idx": 0, "passage": {"text": "Короткий текст.", "entities": [{"start": 0, "end": 99}]},
           "qas": [{"query": "@placeholder", "answers": [], "idx": 0}]}
    root = _write(tmp_path, "RuCoS", "val", [json.dumps(rec, ensure_ascii=False)])
    with pytest.raises(RSGError, match="outside the passage") as exc:
        load_items(root, "RuCoS", "val")
    assert exc.value.field == "passage.entities[0]"


def test_all_official_files_parse(shared_rsg):
    counts = {("TERRa", "val"): 307, ("TERRa", "test"): 3198, ("RCB", "train"): 438, ("RCB", "val"): 220}
    for task in TASK_NAMES:
        for split in SPLITS[task]:
            items = load_items(shared_rsg, task, split)
            assert items
            if (task, split) in counts:
                assert len(items) == counts[(task, split)]
    # the official MuSeRC ids are global: passage 1 of train starts at question 9 and answer 41
    train = load_items(shared_rsg, "MuSeRC", "train")
    first_of_p1 = next(it for it in train if it.doc == 1)
    assert (first_of_p1.group, first_of_p1.key) == (9, 41)
    # RuCoS end offsets are exclusive: candidates carry no trailing characters, and each gold answer is a
    # candidate or part of one (answers may cover a shorter span than the entity, e.g. a surname)
    for it in load_items(shared_rsg, "RuCoS", "val"):
        assert all(c == c.strip() and c[-1].isalnum() for c in it.labels)
        assert all(any(g in c for c in it.labels) for g in it.gold)
