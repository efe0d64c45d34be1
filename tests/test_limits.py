"""Crafted input cannot take all memory, disk or time (issue 10, items 4 and 5): templates, data zips,
prediction files and long texts. Limits are set low through their environment variables, so the inputs stay
small; every refusal names the limit and the variable that raises it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from rsg_eval.core import data as D
from rsg_eval.core.errors import RSGError
from rsg_eval.core.prompts import cut_fields, list_templates, load_template
from rsg_eval.core.submission import check_zip, read_predictions
from rsg_eval.core.tasks import TASK_NAMES, Item
from rsg_eval.core.data import load_items

from tests.test_bad_input import cli

TERRA = '{"premise": "Шёл снег.", "hypothesis": "Было холодно.", "label": "entailment", "idx": 0}\n'


def _template(tmp_path: Path, body: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text("task: TERRa\ntemplate: " + json.dumps(body, ensure_ascii=False)
                    + "\nchoices:\n  entailment: Да\n  not_entailment: Нет\n", encoding="utf-8")
    return path


def _terra_item(premise: str = "Шёл снег, и было холодно, и дети катались на санках с горы.") -> Item:
    return Item("TERRa", "val", 0, 0, 0, {"premise": premise, "hypothesis": "Было холодно."},
                ("entailment", "not_entailment"), None, {})


# ------------------------------------------------------------------------------------------- templates

HOSTILE = {
    # what the template does: (Jinja source, words the error must hold)
    "string times a huge number": ("{{ 'a' * 100000000 }}", "multiplied a sequence of 1 by 100,000,000"),
    "range of 10**8": ("{% for i in range(10**8) %}x{% endfor %}", "a range of more than 100,000 numbers"),
    "nested loops, no output": ("{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}",
                                "too many steps"),
    "loops over the passage": ("{% for a in premise %}{% for b in premise %}{% for c in premise %}{% endfor %}"
                               "{% endfor %}{% endfor %}", "too many steps"),
    "a macro that calls itself": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses without end"),
    "a macro doubling its calls": ("{% macro a(n) %}{% if n %}{{ a(n-1) }}{{ a(n-1) }}{% endif %}{% endmacro %}"
                                   "{{ a(40) }}", "too many steps"),
    "a recursive loop over a crafted tree": ("{% for x in [[1] * 5000] * 5000 recursive %}{% if x is number %}"
                                             "{% else %}{{ loop(x) }}{% endif %}{% endfor %}", "too many steps"),
    "~ doubling": ("{% set a = 'x' * 3000 %}{% set b = a ~ a %}{% set c = b ~ b %}{{ c }}", "with ~"),
    "+ doubling": ("{% set a = 'x' * 3000 %}{% set b = a + a %}{% set c = b + b %}{{ c }}", "with +"),
    "% width": ("{{ '%0999999999d' % 1 }}", "field width of 0999999999"),
    "str.format width": ("{{ '{:>999999999}'.format(1) }}", "field width of 999999999"),
    "format filter width": ("{{ '%999999999s'|format(1) }}", "field width of 999999999"),
    "ljust": ("{{ 'x'.ljust(10**9) }}", "passed 1,000,000,000 to ljust"),
    "center filter": ("{{ 'x'|center(10**9) }}", "to the center filter"),
    "batch filter fill": ("{{ [1]|batch(10**9, 0)|list|length }}", "to the batch filter"),
    "a power with a billion bits": ("{{ 2 ** (10 ** 9) }}", "raised 2 to the power"),
    "output of many small pieces": ("{% for i in range(3000) %}{{ premise }}{% endfor %}", "rendered over"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_template_is_one_error_naming_the_file(case, tmp_path, monkeypatch):
    """Each refusal is an RSGError naming the template file (no OverflowError, RecursionError, MemoryError or
    hang), in well under a second, with the limit and its variable named where a limit applies."""
    import time

    monkeypatch.setenv("RSG_MAX_PROMPT_CHARS", "10000")
    source, words = HOSTILE[case]
    path = _template(tmp_path, source)
    tpl = load_template("TERRa", str(path))
    t0 = time.perf_counter()
    with pytest.raises(RSGError) as exc:
        tpl.render(_terra_item())
    assert time.perf_counter() - t0 < 5  # a bound, not a benchmark: unbounded, these take minutes or all memory
    msg = str(exc.value)
    assert exc.value.file == str(path) and exc.value.field == "template" and words in msg, msg
    if "too many steps" in words:
        assert "RSG_MAX_TEMPLATE_STEPS" in msg
    elif words not in ("recurses without end", "a range of more than 100,000 numbers"):
        assert "RSG_MAX_PROMPT_CHARS" in msg


def test_a_recursive_loop_still_renders(tmp_path):
    """Counting the iterations of `loop(children)` leaves what a recursive loop renders unchanged."""
    path = _template(tmp_path, "{% for x in [1, [2, [3, 4]], 5] recursive %}{% if x is number %}{{ x }}"
                               "{% else %}({{ loop(x) }}){% endif %}{% endfor %} {{ premise }}")
    assert load_template("TERRa", str(path)).render(_terra_item("Шёл снег.")).prompt == "1(2(34))5 Шёл снег."


def test_template_limits_are_raised_by_their_variables(tmp_path, monkeypatch):
    path = _template(tmp_path, "{{ premise }}{{ '.' * 5000 }}{% for i in range(300) %}{{ i }}{% endfor %}")
    tpl = load_template("TERRa", str(path))
    monkeypatch.setenv("RSG_MAX_PROMPT_CHARS", "4000")
    with pytest.raises(RSGError, match="RSG_MAX_PROMPT_CHARS"):
        tpl.render(_terra_item())
    monkeypatch.setenv("RSG_MAX_PROMPT_CHARS", "6000")
    monkeypatch.setenv("RSG_MAX_TEMPLATE_STEPS", "200")
    with pytest.raises(RSGError, match="RSG_MAX_TEMPLATE_STEPS"):
        tpl.render(_terra_item())
    monkeypatch.setenv("RSG_MAX_TEMPLATE_STEPS", "1000")
    assert tpl.render(_terra_item("Шёл снег.")).prompt.startswith("Шёл снег.....")
    monkeypatch.setenv("RSG_MAX_TEMPLATE_STEPS", "many")
    with pytest.raises(RSGError, match="RSG_MAX_TEMPLATE_STEPS='many' is not a positive integer"):
        tpl.render(_terra_item())


def test_bundled_templates_stay_far_below_the_limits(monkeypatch):
    """Every bundled template renders every sample item with 1% of the default step budget and 5% of the
    default size cap: the defaults leave real templates a wide margin."""
    monkeypatch.setenv("RSG_MAX_TEMPLATE_STEPS", "100")
    monkeypatch.setenv("RSG_MAX_PROMPT_CHARS", "5000")
    for task in TASK_NAMES:
        items = load_items("sample", task, "val") + load_items("sample", task, "test")
        for name in list_templates(task)[task]:
            tpl = load_template(task, name)
            for it in items:
                tpl.render(it)
                tpl.render_content_free(it)


def test_hostile_template_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    path = _template(tmp_path, "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}")
    code, out, err = cli(monkeypatch, capsys, "prompts", "show", "TERRa", "--template", path, "--data", "sample")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert str(path) in err and "recurses without end" in err


class CountingTokenizer:
    """Records how long each text it is given is (a crafted passage must not reach it whole)."""

    def __init__(self) -> None:
        self.longest = 0

    def __call__(self, text: str, **kw) -> dict:
        self.longest = max(self.longest, len(text))
        return {"input_ids": text.split()}


def test_text_is_cut_by_characters_before_tokenisation(monkeypatch):
    """A passage of 2 million characters reaches the tokenizer as at most max_tokens x 32 characters (plus the
    template's own text); the truncation that follows still keeps its start."""
    it = Item("DaNetQA", "val", 0, 0, 0, {"passage": "слово " * 350_000, "question": "Это правда?"},
              (False, True), None, {})
    tok = CountingTokenizer()
    r = load_template("DaNetQA", "yesno").render(it, tokenizer=tok, max_tokens=64)
    assert r.truncated and r.prompt.startswith("<LM>слово слово")
    assert tok.longest <= 64 * 32 + 200
    assert cut_fields({"a": "x" * 100, "b": 5, "c": ["y" * 100]}, 2) == {"a": "x" * 64, "b": 5, "c": ["y" * 100]}
    monkeypatch.setenv("RSG_MAX_CHARS_PER_TOKEN", "10")
    assert cut_fields({"a": "x" * 100}, 2) == {"a": "x" * 20} and cut_fields({"a": "x" * 100}, None) == {"a": "x" * 100}


def test_finetune_pairs_never_tokenise_a_whole_crafted_passage():
    from rsg_eval.training.finetune.data import build_pairs

    tok = CountingTokenizer()
    tok.eos_token_id = "</s>"
    tpl = load_template("DaNetQA")
    it = Item("DaNetQA", "train", 0, 0, 0, {"passage": "слово " * 350_000, "question": "Это правда?"},
              (False, True), True, {})
    pairs = build_pairs([it], lambda x: tpl.render(x, tokenizer=tok, max_tokens=64), tok, 64, 8)
    assert len(pairs) == 1 and tok.longest <= 64 * 32 + 200


# ------------------------------------------------------------------------------------------- data zips

def _zip(path: Path, members: list[tuple[str, bytes | str]]) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests write on purpose
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, body in members:
                zf.writestr(name, body)
    return path


def test_zip_with_a_duplicate_member_is_refused(tmp_path):
    full = "".join(TERRA.replace('"idx": 0', f'"idx": {i}') for i in range(30))
    z = _zip(tmp_path / "d.zip", [("TERRa/val.jsonl", full), ("TERRa/val.jsonl", TERRA)])
    with pytest.raises(RSGError, match="holds .TERRa/val.jsonl. twice; extracting both") as exc:
        D.resolve_data(z)
    assert exc.value.file == str(z)
    # task folders are matched case-insensitively, so these two collide as well
    z2 = _zip(tmp_path / "d2.zip", [("TERRa/val.jsonl", full), ("terra/val.jsonl", TERRA)])
    with pytest.raises(RSGError, match="task folders match in any case"):
        D.safe_extract(z2, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_only_task_files_are_extracted(tmp_path):
    big = b"\0" * (5 << 20)  # 5 MiB that compress to a few KB: never extracted, never checked
    z = _zip(tmp_path / "d.zip", [("combined/TERRa/val.jsonl", TERRA), ("combined/notes/big.bin", big),
                                  ("combined/TERRa/readme.txt", "x"), ("__MACOSX/._x", "junk")])
    src = D.resolve_data(z)
    files = sorted(p.relative_to(src.root).as_posix() for p in src.root.rglob("*") if p.is_file())
    assert files == ["combined/TERRa/val.jsonl"] and len(load_items(src, "TERRa", "val")) == 1
    with pytest.raises(RSGError, match="no RSG task files in the zip"):
        D.resolve_data(_zip(tmp_path / "none.zip", [("notes.txt", "x")]))


def test_zip_size_and_ratio_limits(tmp_path, monkeypatch):
    body = TERRA * 40  # about 4 KB
    z = _zip(tmp_path / "d.zip", [("TERRa/val.jsonl", body)])
    monkeypatch.setenv("RSG_MAX_ZIP_BYTES", "1000")
    with pytest.raises(RSGError) as exc:
        D.resolve_data(z)
    assert f"{len(body.encode()):,} bytes uncompressed" in str(exc.value) and "RSG_MAX_ZIP_BYTES" in str(exc.value)
    monkeypatch.delenv("RSG_MAX_ZIP_BYTES")
    # a member over 1 MiB that compresses 1000 to 1 is a bomb by the default ratio (JSON Lines text: about 5)
    bomb = _zip(tmp_path / "bomb.zip", [("TERRa/val.jsonl", TERRA + " " * (3 << 20) + "\n")])
    with pytest.raises(RSGError, match="compressed .* to 1.*RSG_MAX_ZIP_RATIO"):
        D.resolve_data(bomb)
    monkeypatch.setenv("RSG_MAX_ZIP_RATIO", "100000")
    assert len(load_items(D.resolve_data(bomb), "TERRa", "val")) == 1


def test_failed_extraction_leaves_nothing_and_a_killed_one_is_cleaned_up(tmp_path, monkeypatch):
    import shutil as sh

    from rsg_eval.core.io import WriteError

    monkeypatch.setenv("RSG_DATA_DIR", str(tmp_path / "cache" / "rsg"))
    z = _zip(tmp_path / "d.zip", [("TERRa/val.jsonl", TERRA), ("TERRa/test.jsonl", TERRA)])
    cache = tmp_path / "cache" / "extracted"
    real, calls = sh.copyfileobj, []

    def full_disk(src, dst, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(D.shutil, "copyfileobj", full_disk)
    with pytest.raises(WriteError, match="the disk is full"):
        D.resolve_data(z)
    assert not cache.exists() or list(cache.iterdir()) == []
    monkeypatch.setattr(D.shutil, "copyfileobj", real)
    # a folder left by a killed extraction (a process of this host that is gone) is removed by the next one;
    # one of a live process (a parallel run) is left alone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    digest = D.sha256_file(z)[:16]
    tag = D._temp_tag().rsplit("-", 1)[0]
    cache.mkdir(parents=True, exist_ok=True)
    stale = cache / f".{digest}.extract-{tag}-{dead}-abc"
    live = cache / f".{digest}.extract-{tag}-{os.getpid()}-def"
    for d in (stale, live):
        (d / "TERRa").mkdir(parents=True)
        (d / "TERRa" / "val.jsonl").write_text("half", encoding="utf-8")
    src = D.resolve_data(z)
    assert not stale.exists() and live.exists()
    assert len(load_items(src, "TERRa", "test")) == 1


def test_damaged_zip_member_is_one_error(tmp_path):
    z = _zip(tmp_path / "d.zip", [("TERRa/val.jsonl", TERRA * 50)])
    raw = bytearray(z.read_bytes())
    i = raw.index(b"TERRa/val.jsonl") + len("TERRa/val.jsonl") + 10  # inside the compressed data
    raw[i:i + 20] = b"\xff" * 20
    z.write_bytes(bytes(raw))
    with pytest.raises(RSGError, match="damaged zip member 'TERRa/val.jsonl'"):
        D.resolve_data(z)


# ------------------------------------------------------------------------------------------- prediction files

def test_prediction_files_have_a_size_cap(tmp_path, monkeypatch):
    """A 1 GB-of-newlines member (here 200 KB under a 100 KB cap) is refused from its header, before it is
    decompressed; a plain file likewise from its size."""
    monkeypatch.setenv("RSG_MAX_SUBMISSION_BYTES", "100000")
    z = _zip(tmp_path / "s.zip", [("submission/TERRa.jsonl", "\n" * 200_000)])
    assert z.stat().st_size < 2000
    problems = check_zip(z, "sample", ["TERRa"])
    assert len(problems) == 1 and "200,000 bytes uncompressed" in problems[0].message
    assert "RSG_MAX_SUBMISSION_BYTES" in problems[0].message and problems[0].file.endswith("TERRa.jsonl")
    f = tmp_path / "TERRa.jsonl"
    f.write_text("\n" * 200_000)
    with pytest.raises(RSGError, match="RSG_MAX_SUBMISSION_BYTES"):
        read_predictions(f)


def test_blank_lines_cost_neither_memory_nor_time(tmp_path):
    """Under the default cap, 30 MB of newlines around one line: read in a moment without a list of lines."""
    import time
    import tracemalloc

    body = "\n" * (30 << 20) + '{"idx": 0, "label": "entailment"}\n'
    f = tmp_path / "TERRa.jsonl"
    f.write_text(body)
    tracemalloc.start()
    t0 = time.perf_counter()
    assert read_predictions(f) == {0: "entailment"}
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * len(body) and took < 10  # the file's bytes and its text, no list of 30 million lines


def test_line_length_cap(tmp_path, monkeypatch):
    from rsg_eval.core.io import read_jsonl

    monkeypatch.setenv("RSG_MAX_LINE_BYTES", "1000")
    long = json.dumps({"idx": 1, "label": "entailment", "pad": "я" * 600}, ensure_ascii=False)  # 1,2xx bytes
    f = tmp_path / "TERRa.jsonl"
    f.write_text('{"idx": 0, "label": "entailment"}\n' + long + "\n", encoding="utf-8")
    with pytest.raises(RSGError) as exc:
        read_predictions(f)
    assert exc.value.line == 2 and "line too long" in str(exc.value) and "RSG_MAX_LINE_BYTES" in str(exc.value)
    with pytest.raises(RSGError) as exc:
        read_jsonl(f)  # the streaming reader of data files and run logs: bounded per line too
    assert exc.value.line == 2 and "RSG_MAX_LINE_BYTES" in str(exc.value)
    monkeypatch.setenv("RSG_MAX_LINE_BYTES", "2000")
    assert len(read_jsonl(f)) == 2
