"""Bad input a user can cause (issue 10): strings with line separators, empty task files, what the validator
accepts, and exit codes. Each case goes through the real entry point: one red line, exit status 2."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from rsg_eval.core.data import SAMPLE_DIR
from rsg_eval.core.errors import RSGError
from rsg_eval.core.submission import check_zip, parse_lines, to_lines, write_task_file, write_zip
from rsg_eval.core.tasks import TASK_NAMES
from rsg_eval.core.data import load_items

# Every character str.splitlines() breaks at besides "\n" and "\r". JSON allows the last three raw in a string
# (json.dumps(ensure_ascii=False) writes them so); the others it escapes, but a reader must cope either way.
SEPARATORS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `rsg ARGS` in this process through the real entry point; (exit status, stdout, stderr)."""
    from rsg_eval.cli import main
    from rsg_eval.commands._common import console

    monkeypatch.setattr(console, "width", 400)  # table cells unwrapped, so messages can be searched
    monkeypatch.setattr(sys, "argv", ["rsg", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def _copy_sample(dst: Path, tasks=TASK_NAMES) -> Path:
    for t in tasks:
        shutil.copytree(SAMPLE_DIR / t, dst / t)
    return dst


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _separator_data(root: Path) -> Path:
    """TERRa and RuCoS in the official schema, each record holding one separator: inside the TERRa premise,
    and inside the only entity of a RuCoS passage (so the model's answer must be that entity, separator and
    all)."""
    (root / "TERRa").mkdir(parents=True)
    (root / "RuCoS").mkdir()
    for split in ("train", "val", "test"):
        terra, rucos = [], []
        for i, ch in enumerate(SEPARATORS):
            rec = {"premise": f"Поезд пришёл{ch} вовремя.", "hypothesis": "Поезд не опоздал.", "idx": i}
            if split != "test":
                rec["label"] = "entailment"
            terra.append(rec)
            entity = f"Ново{ch}сибирск"
            text = f"В городе {entity} открыли мост.\n@highlight\nМост открыт"
            start = text.index(entity)
            qa = {"query": "Мост открыли в городе @placeholder.", "idx": i}
            if split != "test":
                qa["answers"] = [{"start": start, "end": start + len(entity), "text": entity}]
            rucos.append({"idx": i, "passage": {"text": text, "entities": [{"start": start,
                                                                             "end": start + len(entity)}]},
                          "qas": [qa]})
        _jsonl(root / "TERRa" / f"{split}.jsonl", terra)
        _jsonl(root / "RuCoS" / f"{split}.jsonl", rucos)
    return root


# ------------------------------------------------------------------------------------------- item 3

def test_readers_split_lines_on_newline_only():
    """JSON escapes the control characters but writes U+0085, U+2028 and U+2029 raw: all read back whole, with
    a BOM and CRLF line ends around them."""
    from rsg_eval.core.io import iter_jsonl_text

    text = "\ufeff" + "".join(json.dumps({"idx": i, "label": f"a{ch}b"}, ensure_ascii=False) + "\r\n"
                              for i, ch in enumerate(SEPARATORS))
    assert "\u2028" in text and "\x85" in text
    got = list(iter_jsonl_text(text, "x.jsonl"))
    assert [ln for ln, _ in got] == list(range(1, len(SEPARATORS) + 1))
    assert [r["label"] for _, r in got] == [f"a{ch}b" for ch in SEPARATORS]
    preds = parse_lines("RuCoS", "".join(json.dumps({"idx": i, "label": f"x{ch}y"}, ensure_ascii=False) + "\n"
                                         for i, ch in enumerate(SEPARATORS)), "RuCoS.jsonl")
    assert preds == {i: f"x{ch}y" for i, ch in enumerate(SEPARATORS)}


@pytest.mark.slow
def test_zeroshot_zip_with_separators_scores_and_checks(tmp_path, monkeypatch, capsys):
    """`rsg zeroshot` writes predictions whose RuCoS labels hold U+2028 & co.; `rsg score` and `rsg submit
    check` read them back whole (str.splitlines() cut them in two)."""
    torch = pytest.importorskip("torch")
    import rsg_eval.models.loading as loading

    torch.set_num_threads(1)
    tiny = loading.load_model("tiny", device="cpu")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)
    data = _separator_data(tmp_path / "data")
    code, out, err = cli(monkeypatch, capsys, "zeroshot", "--model", "tiny", "--data", data, "--tasks",
                         "TERRa,RuCoS", "--root", tmp_path, "--run", "r", "-q")
    assert code == 0, out + err
    run = tmp_path / "r"
    zips = sorted(run.glob("submission*.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as zf:
        rucos = zf.read("submission/RuCoS.jsonl").decode("utf-8")
    assert "\u2028" in rucos and "\x85" in rucos  # written raw, as json.dumps(ensure_ascii=False) does
    code, out, err = cli(monkeypatch, capsys, "score", run / "predictions" / "val", "--data", data, "--json",
                         tmp_path / "m.json")
    assert code == 0, out + err
    m = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert m["tasks"]["RuCoS"]["em"] == 1.0  # one candidate per passage: every answer is the gold entity
    code, out, err = cli(monkeypatch, capsys, "submit", "check", zips[0], "--data", data, "--tasks", "TERRa,RuCoS")
    assert code == 0 and "valid for TERRa, RuCoS" in out, out + err
    assert "!" not in out  # no warning either: every label is its passage's entity


# ------------------------------------------------------------------------------------------- item 7

def test_empty_val_file_is_an_error_naming_it(tmp_path, monkeypatch, capsys):
    data = _copy_sample(tmp_path / "data", ["TERRa", "RCB"])
    (data / "TERRa" / "val.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(RSGError, match="holds no records") as exc:
        load_items(data, "TERRa", "val")
    assert exc.value.file == str(data / "TERRa" / "val.jsonl")
    code, out, err = cli(monkeypatch, capsys, "data", "check", "--data", data, "--tasks", "TERRa,RCB")
    assert code == 2 and "holds no records" in out and "1 problem(s)" in out
    code, out, err = cli(monkeypatch, capsys, "data", "check", "--data", data, "--tasks", "RCB")
    assert code == 0, out + err
    # zero-shot: refused while planning, before any model is loaded and before a run folder exists
    code, out, err = cli(monkeypatch, capsys, "zeroshot", "--model", "no/such-model", "--data", data, "--tasks",
                         "TERRa", "--split", "val", "--root", tmp_path, "--run", "r")
    assert code == 2 and "TERRa/val.jsonl" in err and "holds no records" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_muserc_file_without_any_answer_is_an_error(tmp_path):
    (tmp_path / "MuSeRC").mkdir()
    _jsonl(tmp_path / "MuSeRC" / "val.jsonl", [{"idx": 0, "passage": {"text": "Текст.", "questions": []}}])
    with pytest.raises(RSGError, match="1 record.*nothing to predict"):
        load_items(tmp_path, "MuSeRC", "val")


# ------------------------------------------------------------------------------------------- item 9

def _sample_submission(folder: Path, task: str, label_of=None) -> list[dict]:
    items = load_items("sample", task, "test")
    preds = {it.key: (label_of(it) if label_of else it.labels[0]) for it in items}
    write_task_file(folder, task, items, preds)
    return to_lines(task, items, preds)


def test_json_booleans_are_accepted_with_a_warning(tmp_path, monkeypatch, capsys):
    """The official TF-IDF baseline wrote RUSSE and RWSD labels as JSON true/false and the leaderboard scored
    that submission (0.434): a warning, not a rejection. Other spellings stay errors."""
    folder = tmp_path / "sub"
    for t in TASK_NAMES:
        _sample_submission(folder, t)
    for t in ("RUSSE", "RWSD"):
        rows = [{"idx": r["idx"], "label": r["label"].lower() == "true"} for r in
                map(json.loads, (folder / f"{t}.jsonl").read_text().splitlines())]
        _jsonl(folder / f"{t}.jsonl", rows)
    z = write_zip(folder, tmp_path / "s.zip")
    problems = check_zip(z, "sample")
    assert [p.level for p in problems] == ["warning", "warning"]
    assert {Path(p.file.split("!")[1]).name for p in problems} == {"RUSSE.jsonl", "RWSD.jsonl"}
    assert all(p.line == 1 and "JSON booleans" in p.message for p in problems)
    assert '"False", "True"' in next(p.message for p in problems if "RWSD" in p.file)
    code, out, err = cli(monkeypatch, capsys, "submit", "check", z, "--data", "sample")
    assert code == 0 and "valid for" in out and "2 warning(s)" in out, out + err
    # a string in the wrong case is still refused: only the baseline's JSON booleans are known to be graded
    _jsonl(folder / "RWSD.jsonl", [{"idx": r["idx"], "label": str(r["label"]).lower()}
                                   for r in map(json.loads, (folder / "RWSD.jsonl").read_text().splitlines())])
    z = write_zip(folder, tmp_path / "s2.zip")
    code, out, err = cli(monkeypatch, capsys, "submit", "check", z, "--data", "sample")
    assert code == 2 and "RWSD.jsonl:1: field 'label': invalid label 'false'" in out


def test_tfidf_style_submission_of_the_official_sample(shared_rsg, tmp_path):
    """Conformance: the official sample submission re-spelled the way the official TF-IDF baseline writes
    yes/no labels (JSON booleans) passes the check on the official test files, with a warning per task."""
    sample = shared_rsg / "reference" / "sample_submission.zip"
    out = tmp_path / "tfidf.zip"
    with zipfile.ZipFile(sample) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith(("RUSSE.jsonl", "RWSD.jsonl")) and "__MACOSX" not in info.filename:
                rows = [json.loads(x) for x in data.decode("utf-8").split("\n") if x.strip()]
                data = "".join(json.dumps({"idx": r["idx"], "label": r["label"].lower() == "true"}) + "\n"
                               for r in rows).encode("utf-8")
            dst.writestr(info, data)
    before = {(p.file.rsplit("!", 1)[-1], p.line, p.message) for p in check_zip(sample, shared_rsg)}
    after = check_zip(out, shared_rsg)
    errors = {(p.file.rsplit("!", 1)[-1], p.line, p.message) for p in after if p.level == "error"}
    assert errors == {e for e in before if "RUSSE" not in e[0] and "RWSD" not in e[0]} | \
        {e for e in before if ("RUSSE" in e[0] or "RWSD" in e[0]) and "invalid label" not in e[2]}
    warned = sorted(p.file.rsplit("/", 1)[-1] for p in after if p.level == "warning" and "JSON booleans" in p.message)
    assert warned == ["RUSSE.jsonl", "RWSD.jsonl"]


def test_rucos_label_that_is_no_entity_is_warned(tmp_path):
    folder = tmp_path / "sub"
    for t in TASK_NAMES:
        _sample_submission(folder, t)
    items = load_items("sample", "RuCoS", "test")
    # punctuation and case do not count (the metric normalises them away); a made-up answer does
    labels = {items[0].key: items[0].labels[0].upper() + ".", items[1].key: "Атлантида",
              items[2].key: "Ещё одна выдумка"}
    _jsonl(folder / "RuCoS.jsonl", [{"idx": k, "label": v} for k, v in sorted(labels.items())])
    problems = check_zip(write_zip(folder, tmp_path / "s.zip"), "sample")
    assert len(problems) == 1 and problems[0].level == "warning"
    p = problems[0]
    assert p.file.endswith("RuCoS.jsonl") and p.line == 2
    assert p.message.startswith("2 label(s) match none of their passage's entities") and "Атлантида" in p.message


def test_duplicate_idx_in_score_names_the_idx_field(tmp_path, monkeypatch, capsys):
    (tmp_path / "TERRa.jsonl").write_text('{"idx": 0, "label": "entailment"}\n{"idx": 0, "label": "entailment"}\n')
    code, out, err = cli(monkeypatch, capsys, "score", tmp_path, "--data", "sample")
    assert code == 2 and "TERRa.jsonl:2: field 'idx': duplicate idx 0" in err
    items = load_items("sample", "MuSeRC", "val")
    rows = to_lines("MuSeRC", items, {it.key: 0 for it in items})
    dup = rows[0]["passage"]["questions"][0]["answers"]
    dup.append(dict(dup[0]))
    with pytest.raises(RSGError) as exc:
        parse_lines("MuSeRC", "".join(json.dumps(r) + "\n" for r in rows), "MuSeRC.jsonl")
    assert exc.value.field == f"passage.questions[0].answers[{len(dup) - 1}].idx"
