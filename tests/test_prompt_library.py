"""The prompt library (issue 21): six or more described and tagged templates per task that render every record of
the official files and of the sample, cut only the passage when an input is too long, and suit both FRED-T5's
`<LM>` prefix and a decoder-only model (no prefix); tags stay out of the template's sha256."""

from __future__ import annotations

import hashlib

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.core.prompts import ELLIPSIS, STYLES, list_templates, load_template, parse_template
from rsg_eval.core.data import load_items
from rsg_eval.core.tasks import TASK_NAMES
from tests.conftest import shared_rsg_dir


class WordTokenizer:
    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": text.split()}


# sha256 of the 18 templates that existed before the library grew (runs made with them must keep resuming)
OLD = {
    ("TERRa", "yesno"), ("TERRa", "follows"), ("LiDiRus", "yesno"), ("LiDiRus", "follows"), ("RCB", "yesno"),
    ("RCB", "relation"), ("PARus", "question"), ("PARus", "connective"), ("MuSeRC", "yesno"), ("MuSeRC", "check"),
    ("RUSSE", "samesense"), ("RUSSE", "forms"), ("RWSD", "refers"), ("RWSD", "meaning"), ("DaNetQA", "yesno"),
    ("DaNetQA", "instruction"), ("RuCoS", "fill"), ("RuCoS", "entity"),
}
DEFAULTS = {"TERRa": "yesno", "LiDiRus": "yesno", "RCB": "yesno", "PARus": "question", "MuSeRC": "yesno",
            "RUSSE": "samesense", "RWSD": "refers", "DaNetQA": "yesno", "RuCoS": "fill"}


def test_six_described_tagged_templates_per_task_defaults_unchanged():
    for task, names in list_templates().items():
        assert len(names) >= 6, task
        assert names[0] == DEFAULTS[task]
        tpls = [load_template(task, n) for n in names]
        assert sum(t.default for t in tpls) == 1
        for t in tpls:
            assert t.description and t.tags["style"] in STYLES and t.tags["verbaliser"], (task, t.name)
            assert t.tags.get("choices") in ("listed", "hidden"), (task, t.name)
        assert len({t.tags["style"] for t in tpls}) >= 3, task  # varied: not six wordings of one question
        assert len({t.tags["verbaliser"] for t in tpls}) >= 2, task
    assert OLD <= {(t, n) for t, ns in list_templates().items() for n in ns}


def test_tags_stay_out_of_the_sha256(tmp_path):
    body = "task: TERRa\ntemplate: |\n  {{ premise }}\nchoices:\n  entailment: Да\n  not_entailment: Нет\n"
    plain = tmp_path / "a.yaml"
    plain.write_text(body, encoding="utf-8")
    tagged = tmp_path / "b.yaml"
    tagged.write_text(body + 'tags: {style: plain, verbaliser: "да/нет"}\n', encoding="utf-8")
    mid = tmp_path / "c.yaml"
    mid.write_text(body.replace("template:", "tags:\n  style: plain\ntemplate:"), encoding="utf-8")
    sha = hashlib.sha256(body.encode()).hexdigest()
    assert parse_template(plain, "TERRa").sha256 == sha
    assert parse_template(tagged, "TERRa").sha256 == sha and parse_template(tagged, "TERRa").tags["style"] == "plain"
    assert parse_template(mid, "TERRa").sha256 == sha
    # the old templates hash as before their tags were added: their bytes minus the last (tags) line
    for task, name in OLD:
        tpl = load_template(task, name)
        raw = tpl.path.read_bytes()
        assert raw.splitlines()[-1].startswith(b"tags:")
        assert tpl.sha256 == hashlib.sha256(raw[: raw.rindex(b"tags:")]).hexdigest()


@pytest.mark.parametrize("tags, field", [("[a, b]", "tags"), ("{mood: happy}", "tags.mood"),
                                         ("{style: poem}", "tags.style"), ("{choices: some}", "tags.choices"),
                                         ("{style: ''}", "tags.style")])
def test_bad_tags_name_the_field(tmp_path, tags, field):
    path = tmp_path / "t.yaml"
    path.write_text(f"task: TERRa\ntags: {tags}\ntemplate: x\nchoices:\n  entailment: a\n  not_entailment: b\n",
                    encoding="utf-8")
    with pytest.raises(RSGError) as exc:
        parse_template(path, "TERRa")
    assert exc.value.field == field and exc.value.line == 2


def _sources():
    out = [("sample", "sample")]
    if shared_rsg_dir() is not None:
        out.append(("official", str(shared_rsg_dir())))
    return out


@pytest.mark.parametrize("origin, data", _sources())
@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_template_renders_every_record(origin, data, task):
    from rsg_eval.core.data import resolve_data

    src = resolve_data(data)
    splits = ["test"] if task == "LiDiRus" else ["train", "val", "test"]
    items = [it for s in splits for it in load_items(src, task, s)]
    assert items
    for name in list_templates(task)[task]:
        tpl = load_template(task, name)
        for i, it in enumerate(items):
            if not it.labels:  # a RuCoS passage without entities is not scored
                continue
            r = tpl.render(it)
            assert r.prompt.startswith("<LM>") and r.prompt[4:].strip(), (name, it.key)     # FRED-T5
            if i % 25 == 0:  # decoder-only: no prefix, the rest unchanged (a sample of the records: it is cheap
                assert tpl.render(it, prefix="").prompt == r.prompt[4:]  # to be wrong everywhere or nowhere)
            assert len(r.choices) == len(it.labels) and all(c.strip() for c in r.choices), (name, it.key)
            assert len(set(r.choices)) == len(r.choices), (name, it.key)  # the choices can be told apart


@pytest.mark.parametrize("task", ["TERRa", "LiDiRus", "RCB", "MuSeRC", "DaNetQA", "RuCoS"])
def test_a_cut_passage_keeps_instruction_question_and_choices(task):
    """Every template of a long-passage task names its passage in `truncate`: a too-long input loses the end of
    the passage only; what comes before and after it and the answer choices are untouched."""
    field = {"TERRa": "premise", "LiDiRus": "premise", "RCB": "premise"}.get(task, "passage")
    base = next(it for it in load_items("sample", task, "val") if it.labels)
    long_text = " ".join(f"слово{i}" for i in range(3000))
    item = type(base)(**{**base.__dict__, "fields": {**base.fields, field: long_text}})
    tok = WordTokenizer()
    for name in list_templates(task)[task]:
        tpl = load_template(task, name)
        assert tpl.truncate == field, name
        for prefix in (None, ""):
            full = tpl.render(item, prefix=prefix)
            head, tail = full.prompt.split(long_text)
            limit = len(full.prompt.split()) - 2500
            cut = tpl.render(item, tokenizer=tok, max_tokens=limit, prefix=prefix)
            assert cut.truncated and len(cut.prompt.split()) <= limit, name
            assert cut.prompt.startswith(head) and cut.prompt.endswith(tail), name
            assert ELLIPSIS.strip() in cut.prompt and cut.choices == full.choices, name


def test_pairs_that_share_an_input_render_the_same_prompt():
    """Templates that differ only in their verbaliser give the same model input (the multi-template run scores
    such a prompt once)."""
    pairs = {"TERRa": ("verdict", "verdict_yesno"), "RCB": ("verdict", "verdict_truth"),
             "MuSeRC": ("fits", "fits_verdict"), "RUSSE": ("verdict", "verdict_yesno"),
             "RWSD": ("verdict", "verdict_yesno"), "DaNetQA": ("short", "short_full"),
             "RuCoS": ("instruction", "instruction_sentence")}
    for task, (a, b) in pairs.items():
        it = next(x for x in load_items("sample", task, "val") if x.labels)
        ra, rb = load_template(task, a).render(it), load_template(task, b).render(it)
        assert ra.prompt == rb.prompt and ra.choices != rb.choices, task
