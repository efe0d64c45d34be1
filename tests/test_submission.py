"""Submission writer, reader and validator: exact spellings, round trips, and every kind of bad input."""

import json
import zipfile

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.core.metrics import score_items
from rsg_eval.core.submission import check_zip, read_predictions, to_lines, write_task_file, write_zip
from rsg_eval.core.tasks import TASK_NAMES
from rsg_eval.core.data import load_items


def _first_label_preds(items):
    return {it.key: it.labels[(it.key * 7) % len(it.labels)] for it in items}


def test_exact_label_spellings():
    get = lambda t: to_lines(t, load_items("sample", t, "test"), _first_label_preds(load_items("sample", t, "test")))
    assert {r["label"] for r in get("RUSSE")} <= {"true", "false"}
    assert {r["label"] for r in get("DaNetQA")} <= {"true", "false"}
    assert {r["label"] for r in get("RWSD")} <= {"True", "False"}
    assert all(type(r["label"]) is int for r in get("PARus"))
    assert {r["label"] for r in get("RCB")} <= {"entailment", "contradiction", "neutral"}
    assert {r["label"] for r in get("LiDiRus")} <= {"entailment", "not_entailment"}
    assert all(isinstance(r["label"], str) and isinstance(r["idx"], int) for r in get("RuCoS"))
    mus = get("MuSeRC")
    items = load_items("sample", "MuSeRC", "test")
    assert [r["idx"] for r in mus] == sorted({it.doc for it in items})
    ans = [(q["idx"], a["idx"]) for r in mus for q in r["passage"]["questions"] for a in q["answers"]]
    assert ans == [(it.group, it.key) for it in items]  # the test file's global ids, in order
    assert all(set(r) == {"idx", "label"} for t in TASK_NAMES if t != "MuSeRC" for r in get(t))


def test_val_round_trip_through_zip_rescores_identically(tmp_path):
    """Val predictions written as a submission, zipped, re-read and re-scored equal the in-memory scores."""
    folder = tmp_path / "pred"
    in_memory = {}
    for task in TASK_NAMES:
        items = load_items("sample", task, "val")
        preds = _first_label_preds(items)
        in_memory[task] = score_items(task, items, preds)
        write_task_file(folder, task, items, preds)
    zpath = write_zip(folder, tmp_path / "val.zip")
    with zipfile.ZipFile(zpath) as zf:
        assert sorted(zf.namelist()) == sorted(f"submission/{t}.jsonl" for t in TASK_NAMES)
    for task in TASK_NAMES:
        items = load_items("sample", task, "val")
        again = score_items(task, items, read_predictions(zpath, task, strict=True))
        assert again == in_memory[task]


def test_written_test_zip_passes_the_validator(tmp_path):
    folder = tmp_path / "pred"
    for task in TASK_NAMES:
        items = load_items("sample", task, "test")
        write_task_file(folder, task, items, _first_label_preds(items))
    zpath = write_zip(folder, tmp_path / "sub.zip")
    assert check_zip(zpath, "sample") == []


def test_missing_predictions_refused():
    items = load_items("sample", "TERRa", "test")
    with pytest.raises(RSGError, match="no prediction"):
        to_lines("TERRa", items, {})


def _zip_with(tmp_path, task, lines, name=None):
    folder = tmp_path / "sub"
    folder.mkdir(exist_ok=True)
    for t in TASK_NAMES:
        items = load_items("sample", t, "test")
        write_task_file(folder, t, items, _first_label_preds(items))
    (folder / f"{task}.jsonl").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return write_zip(folder, tmp_path / (name or "bad.zip"))


def test_validator_names_every_problem(tmp_path):
    lines = [json.dumps({"idx": 0, "label": "true"}),       # RWSD wants "True"
             json.dumps({"idx": 1, "label": "False"}),
             json.dumps({"idx": 1, "label": "False"}),      # duplicate
             '{"idx": 2, "label": "Fal',                    # truncated
             json.dumps({"idx": 99, "label": "False"})]     # not in test
    problems = check_zip(_zip_with(tmp_path, "RWSD", lines), "sample")
    text = "\n".join(map(str, problems))
    assert all("RWSD.jsonl" in p.file for p in problems)
    assert ":1: field 'label': invalid label 'true' (expected: \"False\", \"True\")" in text
    assert ":3: duplicate idx 1" in text
    assert ":4: " in text
    assert "idx 99 is not in the test file" in text
    assert "have no prediction" in text


def test_validator_checks_muserc_structure(tmp_path):
    items = load_items("sample", "MuSeRC", "test")
    rows = to_lines("MuSeRC", items, {it.key: 0 for it in items})
    rows[0]["passage"]["questions"][0]["answers"].pop()       # drop one answer
    rows[0]["passage"]["questions"][0]["answers"][0]["label"] = True   # bool instead of int
    problems = check_zip(_zip_with(tmp_path, "MuSeRC", [json.dumps(r) for r in rows]), "sample")
    text = "\n".join(map(str, problems))
    assert "answer ids differ" in text and "invalid label True" in text


def test_zip_slip_member_reported(tmp_path):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../../etc/TERRa.jsonl", "{}\n")
    problems = check_zip(zpath, "sample", ["TERRa"])
    assert any("outside" in p.message for p in problems)


def test_lenient_reader_accepts_other_official_forms(tmp_path):
    f = tmp_path / "RWSD.jsonl"
    f.write_text('{"idx": "0", "label": false}\n{"idx": 1, "label": "true"}\n')
    assert read_predictions(f) == {0: False, 1: True}
    with pytest.raises(RSGError) as exc:
        read_predictions(f, strict=True)
    assert exc.value.line == 1


def test_official_sample_submission_accepted(shared_rsg):
    sample = shared_rsg / "reference" / "sample_submission.zip"
    assert check_zip(sample, shared_rsg, ["TERRa", "RCB"]) == []  # tasks whose full test file is here
    preds = read_predictions(sample, "MuSeRC", strict=True)
    assert len(preds) == 7614  # the full test structure: every answer id
    # on the 5-record files, the first five records of every task are covered with the exact structure
    problems = check_zip(sample, shared_rsg)
    assert problems and all(p.line is None or p.line > 5 for p in problems)
    assert not any("missing" in p.message and p.line is None and "no prediction" in p.message for p in problems)
