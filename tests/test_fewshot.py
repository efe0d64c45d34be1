"""Few-shot prompts (`rsg zeroshot --num-fewshot K`): the draw's invariants, the prompt layout, the input budget,
K = 0 being today's prompts, and the nine tasks end to end into a valid zip."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from rsg_eval.core.data import resolve_data
from rsg_eval.core.errors import RSGError
from rsg_eval.core.fewshot import draw_shots, identity, item_seed, load_pool
from rsg_eval.core.prompts import (load_template, parse_template, render_fewshot, render_fewshot_content_free,
                                   render_shot)
from rsg_eval.core.tasks import TASK_NAMES
from rsg_eval.core.data import load_items
from rsg_eval.eval.zeroshot import ZeroShotOptions, plan_jobs

SAMPLE = Path(__file__).resolve().parents[1] / "rsg_eval" / "samples" / "sample"
IDENT = {"model": "tiny", "revision": None, "dtype": "float32"}  # plan_jobs without touching torch


def _plan(**kw):
    opts = ZeroShotOptions(model="tiny", data=kw.pop("data", "sample"), **kw)
    return plan_jobs(opts, ident=IDENT)[1]


def _shots_by_key(jobs, task, split="val"):
    job = next(j for j in jobs if j.task == task and j.split == split)
    return {k: [(s.task, s.split, s.key) for s in v] for k, v in job.shots.items()}


@pytest.fixture
def leaky(tmp_path):
    """The sample data with train.jsonl replaced by val.jsonl: every val item is also a train example."""
    d = tmp_path / "leaky"
    shutil.copytree(SAMPLE, d)
    for task in ("TERRa", "MuSeRC", "RuCoS", "PARus"):
        shutil.copy(d / task / "val.jsonl", d / task / "train.jsonl")
    return d


# ------------------------------------------------------------------------------------------------ the draw

def test_never_the_item_itself(leaky):
    """With train == val, the 5 other records are the only candidates for a 6-record task: K=5 draws exactly them,
    K=9 still draws only them; MuSeRC and RuCoS never take a shot from the item's own passage."""
    src = resolve_data(str(leaky))
    for task in ("TERRa", "PARus"):
        pool, items = load_pool(src, task), load_items(src, task, "val")
        assert len(pool) == len(items) == 6
        for it in items:
            for k in (5, 9):
                keys = [s.key for s in draw_shots(pool, it, k, seed=0)]
                assert sorted(keys) == sorted(x.key for x in items if x.key != it.key), (task, it.key, k)
    for task in ("MuSeRC", "RuCoS"):
        pool, items = load_pool(src, task), load_items(src, task, "val")
        for it in items:
            shots = draw_shots(pool, it, 10, seed=3)
            assert shots and all(s.fields["passage"] != it.fields["passage"] for s in shots)
            assert all(identity(task, s.fields) != identity(task, it.fields) for s in shots)


def test_whole_groups_one_answer_each_and_gold_labels():
    src = resolve_data("sample")
    pool = load_pool(src, "MuSeRC")
    # the pool's groups are whole questions: every answer option of a question, nothing else
    train = load_items(src, "MuSeRC", "train")
    assert sorted(len(g) for g in pool.groups) == sorted(
        sum(1 for it in train if it.group == q) for q in {it.group for it in train})
    assert all(len({(it.doc, it.group) for it in g}) == 1 for g in pool.groups)
    for it in load_items(src, "MuSeRC", "val"):
        shots = draw_shots(pool, it, 4, seed=0)
        assert len(shots) == 4 and len({(s.doc, s.group) for s in shots}) == 4  # one answer of 4 distinct questions
        assert all(s.gold in (0, 1) and s.split == "train" for s in shots)
    rucos = load_pool(src, "RuCoS")
    for it in load_items(src, "RuCoS", "val"):
        for s in draw_shots(rucos, it, 3, seed=0):
            assert s.gold and any(g in s.labels for g in s.gold)


def test_lidirus_draws_from_terra_train():
    src = resolve_data("sample")
    pool = load_pool(src, "LiDiRus")
    assert pool.source == "TERRa/train" and pool.path.parent.name == "TERRa"
    terra_train = {it.key: it for it in load_items(src, "TERRa", "train")}
    for it in load_items(src, "LiDiRus", "val"):
        for s in draw_shots(pool, it, 2, seed=0):
            assert s.task == "LiDiRus" and s.fields["premise"] == terra_train[s.key].fields["premise"]
            assert s.fields["sentence1"] == s.fields["premise"] and s.gold == terra_train[s.key].gold


def test_draw_is_deterministic_and_independent_of_limit_order_and_split_choice():
    full = _plan(num_fewshot=2, split="all")
    again = _plan(num_fewshot=2, split="all")
    reordered = _plan(num_fewshot=2, tasks=["RuCoS", "MuSeRC", "TERRa", "LiDiRus"], limit=1, split="val")
    for task in ("RuCoS", "MuSeRC", "TERRa", "LiDiRus"):
        a, b, c = (_shots_by_key(x, task) for x in (full, again, reordered))
        assert a == b and c and all(c[k] == a[k] for k in c)
        assert all(len(v) == 2 for v in a.values())
    # another seed draws differently somewhere; the default few-shot seed is the run seed
    other = _plan(num_fewshot=2, fewshot_seed=1)
    assert any(_shots_by_key(other, t) != _shots_by_key(full, t) for t in ("TERRa", "RCB", "PARus"))
    assert _shots_by_key(_plan(num_fewshot=2, seed=1), "TERRa") == _shots_by_key(other, "TERRa")
    assert item_seed(0, "TERRa", 1) != item_seed(0, "TERRa", 2) != item_seed(0, "RCB", 2)
    assert item_seed(0, "terra", 1) == item_seed(0, "TERRa", 1)


def test_fingerprint_has_k_and_seed_and_zero_shot_fingerprints_are_unchanged():
    zero = _plan(tasks=["TERRa"])[0]
    assert zero.shots is None and not {"num_fewshot", "fewshot_seed", "fewshot_data_sha256"} & set(zero.parts)
    two = _plan(tasks=["TERRa"], num_fewshot=2)[0]
    assert two.parts["num_fewshot"] == 2 and two.parts["fewshot_seed"] == 0 and two.parts["fewshot_data_sha256"]
    fps = {zero.fingerprint, two.fingerprint, _plan(tasks=["TERRa"], num_fewshot=2, fewshot_seed=5)[0].fingerprint,
           _plan(tasks=["TERRa"], num_fewshot=3)[0].fingerprint}
    assert len(fps) == 4


def test_bad_input(tmp_path):
    d = tmp_path / "d"
    shutil.copytree(SAMPLE, d)
    (d / "TERRa" / "train.jsonl").unlink()
    with pytest.raises(RSGError) as exc:
        _plan(data=str(d), tasks=["LiDiRus"], num_fewshot=1)
    msg = str(exc.value)
    assert "TERRa's train split" in msg and "--num-fewshot 0" in msg and str(d / "TERRa") in msg
    _plan(data=str(d), tasks=["LiDiRus"])  # zero-shot does not need it
    # a train split without labels has nothing to show
    rows = [json.loads(line) for line in (d / "RCB" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    (d / "RCB" / "train.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "label"},
                                                              ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    with pytest.raises(RSGError, match="missing field"):  # test-style rows in a train file: named with its line
        _plan(data=str(d), tasks=["RCB"], num_fewshot=1)
    with pytest.raises(RSGError, match="--num-fewshot must be 0 or more"):
        _plan(num_fewshot=-1)
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    res = CliRunner().invoke(app, ["zeroshot", "--model", "tiny", "--nli-head", "--num-fewshot", "2"])
    assert res.exit_code != 0 and "--nli-head uses no prompts" in str(res.exception)


# ------------------------------------------------------------------------------------------------ rendering

TPL = textwrap.dedent("""\
    task: TERRa
    prefix: "<P>"
    truncate: premise
    fewshot_separator: "\\n----\\n"
    fewshot_answer_separator: " => "
    template: "{{ premise }} | {{ hypothesis }}"
    choices: {entailment: да, not_entailment: нет}
    """)


def test_prompt_layout_is_prefix_then_shots_then_the_item(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(TPL, encoding="utf-8")
    tpl = parse_template(path, "TERRa")
    src = resolve_data("sample")
    item = load_items(src, "TERRa", "val")[0]
    shots = draw_shots(load_pool(src, "TERRa"), item, 2, seed=0)
    texts = [render_shot(tpl, s, s.gold) for s in shots]
    want = [f"{s.fields['premise']} | {s.fields['hypothesis']} => {'да' if s.gold == 'entailment' else 'нет'}"
            for s in shots]
    assert texts == want
    r, n = render_fewshot(tpl, item, texts)
    assert n == 2 and not r.truncated and r.choices == ["да", "нет"]
    assert r.prompt == "<P>" + want[0] + "\n----\n" + want[1] + "\n----\n" + \
        f"{item.fields['premise']} | {item.fields['hypothesis']}"
    cf = render_fewshot_content_free(tpl, item, texts[:1])
    assert cf == "<P>" + want[0] + "\n----\nN/A | N/A"
    # the defaults: a blank line between examples, a space before the answer
    default = load_template("TERRa")
    r, _ = render_fewshot(default, item, [render_shot(default, shots[0], shots[0].gold)])
    shot_main = default.render(shots[0], prefix="").prompt
    assert r.prompt == default.prefix + shot_main + " " + ("Да" if shots[0].gold == "entailment" else "Нет") + \
        "\n\n" + default.render(item, prefix="").prompt
    # RuCoS: the shot shows the query filled with its gold entity
    rucos = load_template("RuCoS")
    s = next(it for it in load_items(src, "RuCoS", "train") if it.gold)
    assert render_shot(rucos, s, s.gold[0]).endswith(" " + s.fields["query"].replace("@placeholder", s.gold[0]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(TPL.replace('" => "', "3"), encoding="utf-8")
    with pytest.raises(RSGError, match="must be a string") as exc:
        parse_template(bad, "TERRa")
    assert exc.value.field == "fewshot_answer_separator" and exc.value.line == 5


def test_budget_drops_shots_before_the_item_is_cut():
    pytest.importorskip("torch")
    from rsg_eval.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    src = resolve_data("sample")
    tpl = load_template("TERRa")
    item = load_items(src, "TERRa", "val")[0]
    shots = draw_shots(load_pool(src, "TERRa"), item, 3, seed=0)
    texts = [render_shot(tpl, s, s.gold) for s in shots]

    def n_tokens(text):
        return len(tok(text)["input_ids"])

    full = [render_fewshot(tpl, item, texts[:n])[0].prompt for n in range(4)]
    lengths = [n_tokens(p) for p in full]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    for n in range(4):  # a budget that just holds n shots keeps exactly the first n, and the item whole
        r, kept = render_fewshot(tpl, item, texts, tokenizer=tok, max_tokens=lengths[n])
        assert kept == n and r.prompt == full[n] and not r.truncated
        r, kept = render_fewshot(tpl, item, texts, tokenizer=tok, max_tokens=lengths[n] - 1 if n else None)
        assert kept == (n - 1 if n else 3)
    # less room than the item alone: no shots, and only then is the passage shortened (as zero-shot does it)
    r, kept = render_fewshot(tpl, item, texts, tokenizer=tok, max_tokens=lengths[0] - 4)
    assert kept == 0 and r.truncated and "…" in r.prompt
    assert r == tpl.render(item, tokenizer=tok, max_tokens=lengths[0] - 4)
    assert n_tokens(r.prompt) <= lengths[0] - 4


def test_zero_shots_is_template_render_byte_for_byte():
    pytest.importorskip("torch")
    from rsg_eval.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    src = resolve_data("sample")
    for task in TASK_NAMES:
        tpl = load_template(task)
        for it in load_items(src, task, "val"):
            if not it.labels:
                continue
            for max_tokens in (None, 512, 40):
                r, kept = render_fewshot(tpl, it, [], tokenizer=tok, max_tokens=max_tokens)
                assert kept == 0 and r == tpl.render(it, tokenizer=tok, max_tokens=max_tokens)
            assert render_fewshot_content_free(tpl, it, []) == tpl.render_content_free(it)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny", device="cpu")


def test_zero_shot_run_logs_todays_prompts(tmp_path, tiny):
    """K = 0: every logged prompt is Template.render's, and the rows carry no `shots` field."""
    from rsg_eval.eval.zeroshot import run_zeroshot

    res = run_zeroshot(ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run="z", tasks=["TERRa", "RuCoS"]),
                       show_progress=False, loaded=tiny)
    for task in ("TERRa", "RuCoS"):
        tpl = load_template(task)
        for row, it in zip(res.run.read_logs(task, "val"), load_items("sample", task, "val")):
            assert "shots" not in row
            assert row["prompt"] == tpl.render(it, tokenizer=tiny.tokenizer, max_tokens=512).prompt


def test_short_budget_in_a_run_drops_shots_and_records_what_was_kept(tmp_path, tiny):
    from rsg_eval.models.loading import Loaded
    from rsg_eval.eval.zeroshot import run_zeroshot

    short = Loaded(tiny.model, tiny.tokenizer, {**tiny.info, "max_input_tokens": 400})
    opts = ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run="s", tasks=["DaNetQA"], num_fewshot=3)
    res = run_zeroshot(opts, show_progress=False, loaded=short)
    planned = _shots_by_key(_plan(tasks=["DaNetQA"], num_fewshot=3), "DaNetQA")
    rows = res.run.read_logs("DaNetQA", "val")
    kept = [len(r["shots"]) for r in rows]
    assert 0 < sum(kept) < 3 * len(rows)  # some shots dropped, not all
    for r in rows:
        assert [("DaNetQA", "train", k) for k in r["shots"]] == planned[r["key"]][:len(r["shots"])]
        assert len(tiny.tokenizer(r["prompt"])["input_ids"]) <= 400
        assert "…" not in r["prompt"]  # every item fits alone (~200 tokens): dropping shots was enough
    state = res.run.read_state("DaNetQA", "val")
    assert state["n_shots_dropped"] == 3 * len(rows) - sum(kept) and state["n_truncated"] == 0


@pytest.mark.slow
def test_nine_tasks_with_two_shots_into_a_valid_zip(tmp_path, tiny, monkeypatch):
    """`rsg zeroshot --model tiny --data sample --num-fewshot 2`: all nine tasks, a zip `rsg submit check` accepts,
    each row's shots are the first ones of its draw, and a batch size of 1 with --limit and another task order
    gives the same shots and predictions."""
    from typer.testing import CliRunner

    import rsg_eval.models.loading as loading
    from rsg_eval.cli import app
    from rsg_eval.runs import RunFolder

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["zeroshot", "--model", "tiny", "--data", "sample", "--num-fewshot", "2", "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    (folder,) = (tmp_path / "submissions").iterdir()
    assert "-2shot-" in folder.name
    check = runner.invoke(app, ["submit", "check", str(folder / "submission.zip"), "--data", "sample"])
    assert check.exit_code == 0, check.output
    run = RunFolder(folder)
    cfg = run.read_config()
    assert cfg["num_fewshot"] == 2 and cfg["fewshot_seed"] == 0
    planned = _plan(num_fewshot=2, split="all")
    n_with_shots = 0
    for task in TASK_NAMES:
        want = _shots_by_key(planned, task)
        for r in run.read_logs(task, "val"):  # (LiDiRus shots are TERRa train items dressed as LiDiRus ones)
            assert [(task, "train", k) for k in r["shots"]] == want[r["key"]][:len(r["shots"])]
            n_with_shots += bool(r["shots"])
        assert run.read_state(task, "val")["parts"]["num_fewshot"] == 2
    assert n_with_shots > 30
    res = runner.invoke(app, ["zeroshot", "--model", "tiny", "--data", "sample", "--num-fewshot", "2", "-q",
                              "--tasks", "RuCoS,TERRa,MuSeRC", "--limit", "2", "--batch-size", "1", "--run", "small",
                              "--split", "val"])
    assert res.exit_code == 0, res.output
    small = RunFolder(tmp_path / "submissions" / "small")
    for task in ("RuCoS", "TERRa", "MuSeRC"):
        big = {r["key"]: r for r in run.read_logs(task, "val")}
        for r in small.read_logs(task, "val"):
            assert r["shots"] == big[r["key"]]["shots"] and r["prompt"] == big[r["key"]]["prompt"]
            assert r["pred"] == big[r["key"]]["pred"]


def test_a_run_folder_holds_one_few_shot_setting(tmp_path, tiny):
    """The few-shot settings are part of the folder's one configuration: K or the seed changed in the same --run
    is refused with the difference named (zero-shot folders record no few-shot settings at all)."""
    from rsg_eval.eval.zeroshot import run_zeroshot

    def run(**kw):
        opts = ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run="r", tasks=["TERRa"], **kw)
        return run_zeroshot(opts, show_progress=False, loaded=tiny)

    res = run()
    assert "num_fewshot" not in res.run.read_config()["settings"]
    with pytest.raises(RSGError, match=r"num_fewshot: None -> 2"):
        run(num_fewshot=2)
    res = run(num_fewshot=2, restart=True)
    cfg = res.run.read_config()
    assert cfg["settings"]["num_fewshot"] == 2 and cfg["settings"]["fewshot_seed"] == 0
    assert cfg["task_settings"]["TERRa/val"]["fewshot_data_sha256"]
    with pytest.raises(RSGError, match=r"fewshot_seed: 0 -> 7"):
        run(num_fewshot=2, fewshot_seed=7)
    assert [o.status for o in run(num_fewshot=2).outcomes] == ["skipped"]
