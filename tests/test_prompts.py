"""Prompt templates: every template renders every sample item, exact strings, verbalisers, truncation, errors."""

from __future__ import annotations

import sys
import textwrap

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.core.prompts import ELLIPSIS, list_templates, load_template, parse_template
from rsg_eval.core.tasks import TASK_NAMES, Item
from rsg_eval.core.data import load_items


class WordTokenizer:
    """Counts whitespace-separated words as tokens: enough to test the truncation logic exactly."""

    def __call__(self, text: str, **kwargs) -> dict:  # kwargs: transformers' options (verbose=False)
        return {"input_ids": text.split()}


def _item(task: str, fields: dict, labels: tuple, key: int = 0, gold=None) -> Item:
    return Item(task, "val", key, key, key, fields, labels, gold, {})


def _write(tmp_path, body: str, name: str = "t.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def test_at_least_two_templates_per_task_default_first():
    listed = list_templates()
    assert list(listed) == list(TASK_NAMES)
    for task, names in listed.items():
        assert len(names) >= 2, task
        assert load_template(task).name == names[0] and load_template(task).default


@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_template_renders_every_sample_item(task):
    items = load_items("sample", task, "val") + load_items("sample", task, "test")
    for name in list_templates(task)[task]:
        tpl = load_template(task, name)
        for it in items:
            r = tpl.render(it)
            assert r.prompt.startswith(tpl.prefix) and len(r.prompt) > len(tpl.prefix) + 5
            assert len(r.choices) == len(it.labels) and all(c.strip() for c in r.choices)
            assert not r.truncated


def test_terra_yesno_exact_text():
    it = _item("TERRa", {"premise": "Женщину доставили в больницу.", "hypothesis": "Женщину спасают врачи."},
               ("entailment", "not_entailment"))
    r = load_template("TERRa", "yesno").render(it)
    assert r.prompt == ("<LM>Женщину доставили в больницу.\n"
                        "Вопрос: верно ли утверждение «Женщину спасают врачи»? Да или нет?\nОтвет:")
    assert r.choices == ["Да", "Нет"]
    assert load_template("TERRa", "yesno").render(it, prefix="").prompt.startswith("Женщину")


def test_per_item_choices():
    parus = _item("PARus", {"premise": "Моё тело отбрасывает тень.", "choice1": "Солнце взошло.",
                            "choice2": "Трава подстрижена.", "question": "cause",
                            "question_ru": "Что было причиной?"}, (0, 1))
    assert load_template("PARus", "question").render(parus).choices == ["Солнце взошло.", "Трава подстрижена."]
    r = load_template("PARus", "connective").render(parus)
    assert r.prompt == "<LM>Моё тело отбрасывает тень, потому что"
    assert r.choices == ["солнце взошло.", "трава подстрижена."]
    rucos = _item("RuCoS", {"passage": "Текст.", "query": "Вчера @placeholder выиграл.",
                            "entities": ["Спартак", "ЦСКА"]}, ("Спартак", "ЦСКА"))
    assert load_template("RuCoS", "fill").render(rucos).choices == ["Вчера Спартак выиграл.", "Вчера ЦСКА выиграл."]
    assert load_template("RuCoS", "entity").render(rucos).choices == ["Спартак", "ЦСКА"]
    # Boolean and 0/1 labels: the verbaliser follows the label order of the item.
    russe = _item("RUSSE", {"word": "ключ", "sentence1": "a", "sentence2": "b", "form1": "ключ", "form2": "ключ"},
                  (False, True))
    assert load_template("RUSSE", "samesense").render(russe).choices == ["Нет", "Да"]
    muserc = _item("MuSeRC", {"passage": "p", "question": "q", "answer": "a"}, (0, 1))
    assert load_template("MuSeRC", "yesno").render(muserc).choices == ["Нет", "Да"]


def test_truncation_shortens_only_the_passage(tmp_path, monkeypatch):
    # fields are cut at max_tokens x RSG_MAX_CHARS_PER_TOKEN characters before tokenisation (tests/test_limits.py);
    # this test's 490-character passage at max_tokens=10 stays under that cut with 64 characters per token
    monkeypatch.setenv("RSG_MAX_CHARS_PER_TOKEN", "64")
    tpl = load_template("DaNetQA", "yesno")
    passage = " ".join(f"w{i}" for i in range(100))
    it = _item("DaNetQA", {"passage": passage, "question": "Это правда?"}, (False, True))
    tok = WordTokenizer()
    full = tpl.render(it)
    n_full = len(full.prompt.split())
    r = tpl.render(it, tokenizer=tok, max_tokens=40)
    assert r.truncated and len(r.prompt.split()) <= 40
    assert r.prompt.startswith("<LM>w0 w1 ") and ELLIPSIS.strip() in r.prompt
    assert "Вопрос: Это правда?\nОтвет (да или нет):" in r.prompt  # question and instruction intact
    # Maximal: the passage keeps as many words as fit (fixed part = n_full - 100 words, plus the ellipsis).
    kept = r.prompt.split(ELLIPSIS)[0].count("w")
    assert kept == 40 - (n_full - 100) - 1
    # Fits already: untouched.
    assert tpl.render(it, tokenizer=tok, max_tokens=n_full) == full
    # A template without a `truncate` field reports overflow but does not cut.
    rw = _item("RWSD", {"text": passage, "span1_text": "a", "span2_text": "b", "span1_index": 0,
                        "span2_index": 1}, (False, True))
    r2 = load_template("RWSD", "refers").render(rw, tokenizer=tok, max_tokens=10)
    assert r2.truncated and passage in r2.prompt


def test_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, """\
        task: TERRa
        template: |
          {{ premise }}
          Вопрос: {{ hypothesis
        choices: {entailment: Да, not_entailment: Нет}
        """)
    with pytest.raises(RSGError) as exc:
        parse_template(path, "TERRa")
    assert exc.value.file == str(path) and exc.value.field == "template"
    # The unclosed tag is on the template's second line = line 4 of the file.
    assert exc.value.line == 4 and "syntax" in str(exc.value) and f"{path}:4:" in str(exc.value)


def test_unknown_field_is_caught_at_load_time(tmp_path):
    path = _write(tmp_path, """\
        task: TERRa
        template: "{{ premis }} {{ hypothesis }}"
        choices: {entailment: Да, not_entailment: Нет}
        """)
    with pytest.raises(RSGError) as exc:
        parse_template(path, "TERRa")
    assert exc.value.field == "premis" and exc.value.file == str(path)
    assert "premise" in str(exc.value)  # the valid fields are listed


def test_undefined_at_render_time_and_sandbox(tmp_path):
    path = _write(tmp_path, """\
        task: TERRa
        template: "{{ premise.no_such_attr }}"
        choices: {entailment: Да, not_entailment: Нет}
        """)
    it = _item("TERRa", {"premise": "p", "hypothesis": "h"}, ("entailment", "not_entailment"))
    with pytest.raises(RSGError, match="undefined") as exc:
        load_template("TERRa", str(path)).render(it)
    assert exc.value.file == str(path)
    evil = _write(tmp_path, """\
        task: TERRa
        template: "{{ premise.__class__.__mro__[1].__subclasses__() }}"
        choices: {entailment: Да, not_entailment: Нет}
        """, "evil.yaml")
    with pytest.raises(RSGError):
        load_template("TERRa", str(evil)).render(it)


def test_choice_errors(tmp_path):
    missing = _write(tmp_path, """\
        task: RCB
        template: "{{ premise }}"
        choices: {entailment: Да, contradiction: Нет}
        """)
    with pytest.raises(RSGError, match="missing: neutral"):
        parse_template(missing, "RCB")
    empty = _write(tmp_path, """\
        task: PARus
        template: "{{ premise }}"
        choices: {0: "{{ choice1 }}", 1: "{{ choice2 }}"}
        """, "e.yaml")
    it = _item("PARus", {"premise": "p", "choice1": "a", "choice2": " ", "question": "cause",
                         "question_ru": "?"}, (0, 1))
    with pytest.raises(RSGError, match="renders empty"):
        parse_template(empty, "PARus").render(it)
    rucos_map = _write(tmp_path, """\
        task: RuCoS
        template: "{{ passage }}"
        choices: {a: b}
        """, "r.yaml")
    with pytest.raises(RSGError, match="use `choice`"):
        parse_template(rucos_map, "RuCoS")
    wrong_task = _write(tmp_path, "task: RCB\ntemplate: x\nchoice: y\n", "w.yaml")
    with pytest.raises(RSGError, match="not TERRa"):
        parse_template(wrong_task, "TERRa")


def test_unknown_template_lists_names():
    with pytest.raises(RSGError) as exc:
        load_template("terra", "nope")
    assert "yesno" in str(exc.value) and "follows" in str(exc.value)


def test_sha256_changes_with_content(tmp_path):
    a = _write(tmp_path, "task: TERRa\ntemplate: '{{ premise }}'\nchoices: {entailment: Да, not_entailment: Нет}\n")
    sha_a = parse_template(a, "TERRa").sha256
    a.write_text(a.read_text(encoding="utf-8").replace("Да", "Верно"), encoding="utf-8")
    assert parse_template(a, "TERRa").sha256 != sha_a


def test_cli_show_and_errors(monkeypatch, capsys):
    from typer.testing import CliRunner

    from rsg_eval.cli import app, main

    res = CliRunner().invoke(app, ["prompts", "show", "parus", "-n", "2"])
    assert res.exit_code == 0, res.output
    assert "Что было причиной?" in res.output and "<- gold" in res.output and res.output.count("PARus val key") == 2
    res = CliRunner().invoke(app, ["prompts", "list"])
    assert res.exit_code == 0 and "connective" in res.output
    # Through the real entry point: one red line on stderr, exit status 2, no traceback.
    monkeypatch.setattr(sys, "argv", ["rsg", "prompts", "show", "terra", "--template", "zzz"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "has no template 'zzz'" in err and "Traceback" not in err
