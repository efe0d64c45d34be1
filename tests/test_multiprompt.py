"""Many templates in one `rsg zeroshot` run (issue 21): the spread arithmetic against hand-computed values, the
run folder (per-template results, the selected one promoted, resume, one configuration), the sharing of identical
prompts, and equality with one-template runs, on the tiny seq2seq and decoder-only models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rsg_eval.eval import multiprompt
from rsg_eval.core.errors import RSGError
from rsg_eval.report.spread import (compare_templates, select_variant, sign_test, spread_table, summarize,
                                    total_range)
from rsg_eval.core.tasks import TASK_NAMES
from rsg_eval.eval.zeroshot import ZeroShotOptions, run_zeroshot

# ------------------------------------------------------------------------------------------------ arithmetic


def test_summarize_by_hand():
    s = summarize({"a": 0.5, "b": 0.7, "c": 0.6})
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["min"] == 0.5 and s["max"] == 0.7
    # deviations -0.1, 0.1, 0: sum of squares 0.02, / (3 - 1) = 0.01 -> sd 0.1
    assert s["sd"] == pytest.approx(0.1) and s["range"] == pytest.approx(0.2)
    assert s["best"] == "b" and s["worst"] == "a"
    one = summarize({"x": 0.3})
    assert one["sd"] is None and one["best"] == one["worst"] == "x" and one["range"] == 0
    assert summarize({"a": 0.4, "b": 0.4})["best"] == "a"  # ties: the first
    assert summarize({})["n"] == 0


def test_total_range_by_hand():
    per = {t: {"x": 0.1 * (i + 1), "y": 0.1 * (i + 1) + (0.09 if i == 0 else 0.0)} for i, t in enumerate(TASK_NAMES)}
    got = total_range(per)
    low = sum(0.1 * (i + 1) for i in range(9)) / 9  # 4.5 / 9 = 0.5
    assert got["min"] == pytest.approx(0.5) and low == pytest.approx(0.5)
    assert got["max"] == pytest.approx(0.5 + 0.01) and got["range"] == pytest.approx(0.01)
    assert got["mean"] == pytest.approx(0.5 + 0.005)
    del per["RuCoS"]
    assert total_range(per) is None  # the total needs all nine tasks


def test_sign_test_by_hand():
    t = sign_test([0.1, 0.2, -0.05, 0.0, 0.3])
    # 3 up, 1 down, 1 tie dropped: p = 2 * (C(4,0) + C(4,1)) / 2^4 = 10/16
    assert (t["n_pos"], t["n_neg"], t["n_zero"]) == (3, 1, 1) and t["p"] == pytest.approx(0.625)
    assert sign_test([0.01] * 6)["p"] == pytest.approx(2 / 64)
    assert sign_test([0.01] * 7)["p"] == pytest.approx(2 / 128)
    assert sign_test([])["p"] == 1.0 and sign_test([0, 0])["p"] == 1.0


def test_select_rules():
    assert select_variant("default", ["yesno", "cloze"], None, "yesno")[0] == "yesno"
    assert select_variant("default", ["cloze", "dialogue"], None, "yesno")[0] == "cloze"
    assert select_variant("default", ["yesno", "yesno+cal"], None, "yesno")[0] == "yesno"
    assert select_variant("best-val", ["a", "b", "c"], {"a": 0.5, "b": 0.7, "c": 0.7}, "a")[0] == "b"
    assert select_variant("best-val", ["a", "b"], {"a": 0.5}, "a")[0] is None  # b's val score is missing
    with pytest.raises(RSGError):
        select_variant("worst", ["a"], None, "a")


def _rows(golds, preds, groups=None):
    return [{"gold": g, "pred": p, "group": (groups[i] if groups else i)} for i, (g, p) in enumerate(zip(golds, preds))]


def test_spread_table_scores_intervals_and_columns():
    g = ["entailment", "not_entailment"] * 5
    right = _rows(g, g)
    half = _rows(g, ["entailment"] * 10)
    table = spread_table({"TERRa": {"a": right, "b": half, "a+cal": half}}, n_boot=200, seed=1)
    unc = table["tasks"]["TERRa"]["columns"]["uncalibrated"]
    cal = table["tasks"]["TERRa"]["columns"]["calibrated"]
    assert unc["templates"]["a"]["score"] == 1.0 and unc["templates"]["b"]["score"] == 0.5
    assert unc["templates"]["a"]["ci"] == [1.0, 1.0]  # every replicate of an all-right run scores 1
    lo, hi = unc["templates"]["b"]["ci"]
    assert 0 <= lo < 0.5 < hi <= 1
    assert unc["summary"]["best"] == "a" and unc["summary"]["range"] == 0.5
    assert list(cal["templates"]) == ["a"] and cal["templates"]["a"]["score"] == 0.5
    assert table["totals"]["uncalibrated"] is None  # one task of nine


def test_muserc_interval_resamples_whole_questions():
    # two questions of 3 answers each: a replicate holds 0, 1 or 2 copies of each question, never a part of one
    rows = _rows([1, 0, 1, 1, 0, 0], [1, 0, 1, 0, 0, 0], groups=[7, 7, 7, 8, 8, 8])
    table = spread_table({"MuSeRC": {"t": rows}}, n_boot=300, seed=0)
    e = table["tasks"]["MuSeRC"]["columns"]["uncalibrated"]["templates"]["t"]
    assert e["n_groups"] == 2 and e["n_items"] == 6
    # f1a: tp 2, fn 1 -> 0.8; em: question 7 right, 8 wrong -> 0.5; score = mean 0.65
    assert e["metrics"]["f1a"] == pytest.approx(0.8) and e["metrics"]["em"] == 0.5 and e["score"] == pytest.approx(0.65)
    # the possible replicates: {7,7} -> (1 + 1) / 2 = 1, {8,8} -> f1a 0 em 0 -> 0, {7,8} -> 0.65
    lo, hi = e["ci"]
    assert lo == 0.0 and hi == 1.0


def test_compare_templates_paired():
    def table(scores):
        return {"tasks": {"TERRa": {"columns": {"uncalibrated": {"templates": {
            n: {"score": s} for n, s in scores.items()}}}}}}

    a = table({"x": 0.5, "y": 0.6, "z": 0.7})
    b = table({"x": 0.6, "y": 0.65, "z": 0.69, "w": 0.9})
    got = compare_templates(a, b)["tasks"]["TERRa"]
    assert got["templates"] == ["x", "y", "z"] and got["mean_gain"] == pytest.approx((0.1 + 0.05 - 0.01) / 3)
    assert not got["every_template"] and got["sign_test"]["n_pos"] == 2 and got["sign_test"]["n_neg"] == 1
    # 2 up, 1 down: p = 2 * (1 + 3) / 8 = 1
    assert got["sign_test"]["p"] == 1.0
    assert compare_templates(a, table({"x": 0.6, "y": 0.7, "z": 0.8}))["tasks"]["TERRa"]["every_template"]


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def tiny():
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny", device="cpu")


@pytest.fixture(scope="module")
def tiny_causal():
    from rsg_eval.models.loading import load_model

    return load_model("tiny-causal", device="cpu", causal_ok=True)


TASKS = ["TERRa", "PARus", "RuCoS"]


def _opts(tmp_path, run, **kw):
    return ZeroShotOptions(model=kw.pop("model", "tiny"), data="sample", tasks=kw.pop("tasks", TASKS),
                           split=kw.pop("split", "all"), root=tmp_path, run=run, **kw)


def _logs(folder, task, split="val"):
    return [json.loads(line) for line in (folder / "logs" / split / f"{task}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["tiny", "tiny_causal"])
def test_each_template_as_its_own_run_and_the_default_promoted(tmp_path, model, request):
    loaded = request.getfixturevalue(model)
    name = "tiny" if model == "tiny" else "tiny-causal"
    multi = run_zeroshot(_opts(tmp_path, "multi", model=name, templates="all"), show_progress=False, loaded=loaded)
    root = multi.run.path
    for task in TASKS:
        assert sorted(p.name for p in (root / "templates" / task).iterdir()) == sorted(
            t.name for t in multiprompt.select_templates(task, "all"))
    for task, tpl in (("TERRa", "cloze"), ("RuCoS", "dialogue"), ("PARus", "question")):
        one = run_zeroshot(_opts(tmp_path, f"one-{task}", model=name, tasks=[task], template=tpl),
                           show_progress=False, loaded=loaded)
        sub = root / "templates" / task / tpl
        for split in ("val", "test"):
            a, b = _logs(sub, task, split), _logs(one.run.path, task, split)
            assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
            assert [r["choices"] for r in a] == [r["choices"] for r in b]
            assert [r["pred"] for r in a] == [r["pred"] for r in b]
            assert np.allclose([s for r in a for s in r["scores"]], [s for r in b for s in r["scores"]], atol=1e-3)
            # the same fingerprint as the one-template run: the results mean the same thing
            sa = json.loads((sub / "state" / f"{task}.{split}.json").read_text())
            sb = json.loads((one.run.path / "state" / f"{task}.{split}.json").read_text())
            assert sa["fingerprint"] == sb["fingerprint"]
    # the run folder's own files are the default template's (sub-result copied byte for byte)
    for task in TASKS:
        default = multiprompt.select_templates(task, None)[0].name
        for what in ("logs", "predictions"):
            assert (root / what / "val" / f"{task}.jsonl").read_bytes() == \
                (root / "templates" / task / default / what / "val" / f"{task}.jsonl").read_bytes()
    m = json.loads((root / "metrics.json").read_text())
    assert m["select"] == "default" and m["selected"] == {t: multiprompt.select_templates(t, None)[0].name
                                                           for t in TASKS}
    assert set(m["templates"]["TERRa"]) == {t.name for t in multiprompt.select_templates("TERRa", "all")}
    spread = json.loads((root / "spread.json").read_text())
    scores = {n: e["score"] for n, e in spread["tasks"]["PARus"]["columns"]["uncalibrated"]["templates"].items()}
    assert scores == {n: v["score"] for n, v in m["templates"]["PARus"].items()}
    assert spread["tasks"]["PARus"]["columns"]["uncalibrated"]["summary"]["max"] == max(scores.values())
    assert (root / "submission-partial.zip").is_file()


def test_resume_one_configuration_and_select_best_val(tmp_path, tiny, monkeypatch):
    from rsg_eval.eval import zeroshot

    opts = dict(templates="verdict,verdict_yesno,yesno,question,connective", tasks=["TERRa", "PARus"],
                calibrate="both", select="best-val")
    first = run_zeroshot(_opts(tmp_path, "r", **opts), show_progress=False, loaded=tiny)
    root = first.run.path
    assert sorted(p.name for p in (root / "templates" / "TERRa").iterdir()) == [
        "verdict", "verdict+cal", "verdict_yesno", "verdict_yesno+cal", "yesno", "yesno+cal"]
    m = json.loads((root / "metrics.json").read_text())
    spread = json.loads((root / "spread.json").read_text())
    for task in ("TERRa", "PARus"):
        scores = {v: x["score"] for v, x in m["templates"][task].items()}
        best = max(scores, key=lambda v: (scores[v], -list(scores).index(v)))
        assert m["selected"][task] == best and spread["selected"][task] == best
        state = json.loads((root / "state" / f"{task}.test.json").read_text())
        assert state["variant"] == best and state["selected_by"] == "best-val"
        assert set(spread["tasks"][task]["columns"]) == {"uncalibrated", "calibrated"}
    assert "optimistic" in spread["select_note"]
    # a rerun scores nothing
    monkeypatch.setattr(zeroshot, "_score_job", lambda *a, **k: pytest.fail("rescored"))
    again = run_zeroshot(_opts(tmp_path, "r", **opts), show_progress=False, loaded=tiny)
    assert {o.status for o in again.outcomes} == {"skipped"}
    # another template set is another configuration
    with pytest.raises(RSGError, match="templates"):
        run_zeroshot(_opts(tmp_path, "r", **{**opts, "templates": "all"}), show_progress=False, loaded=tiny)
    # a damaged per-template log is redone (that task split only)
    monkeypatch.undo()
    log = root / "templates" / "PARus" / "connective+cal" / "logs" / "val" / "PARus.jsonl"
    log.write_text(log.read_text()[:-10])
    redo = run_zeroshot(_opts(tmp_path, "r", **opts), show_progress=False, loaded=tiny)
    assert [(o.task, o.split) for o in redo.outcomes if o.status == "done"] == [("PARus", "val")]
    assert json.loads((root / "metrics.json").read_text())["templates"] == m["templates"]


def test_bad_template_sets_are_refused_before_loading(tmp_path):
    for kw, field in ((dict(templates="nope"), "--templates"), (dict(templates="tag:sonnet"), "--templates"),
                      (dict(templates="all", template="yesno"), "--templates"), (dict(select="best-val"), "--select"),
                      (dict(templates="all", select="worst"), "--select")):
        with pytest.raises(RSGError) as exc:
            run_zeroshot(_opts(tmp_path, "bad", **kw), show_progress=False)
        assert exc.value.field == field, kw
    assert not (tmp_path / "bad").exists()


def test_identical_prompts_scored_once(tiny, monkeypatch):
    """verdict and verdict_yesno render the same TERRa input: one scored prompt with four choices, whose scores
    are those of the two templates scored apart."""
    import rsg_eval.scoring as scoring
    from rsg_eval.eval.multiprompt import CachedTokenizer, _merged_scores
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.data import load_items

    items = [it for it in load_items("sample", "TERRa", "val")]
    a = [load_template("TERRa", "verdict").render(it) for it in items]
    b = [load_template("TERRa", "verdict_yesno").render(it) for it in items]
    seen = []
    real = scoring.score_choices

    def counting(model, tok, prompts, choices, **kw):
        seen.append((len(prompts), [len(c) for c in choices]))
        return real(model, tok, prompts, choices, **kw)

    monkeypatch.setattr(scoring, "score_choices", counting)
    opts = ZeroShotOptions(model="tiny", batch_size=4)
    tok = CachedTokenizer(tiny.tokenizer)
    got = _merged_scores(tiny, tok, [[r.prompt for r in a], [r.prompt for r in b]],
                         [[r.choices for r in a], [r.choices for r in b]], opts, 512)
    assert seen == [(len(items), [4] * len(items))]
    monkeypatch.setattr(scoring, "score_choices", real)
    for rs, mine in ((a, got[0]), (b, got[1])):
        apart = real(tiny.model, tiny.tokenizer, [r.prompt for r in rs], [r.choices for r in rs], batch_size=4)
        assert np.allclose(mine, apart, atol=1e-4)


def test_cached_tokenizer_gives_the_tokenizers_ids(tiny):
    tok = multiprompt.CachedTokenizer(tiny.tokenizer, max_entries=3)
    texts = ["Да", "Нет", "<LM>Текст: длинный текст.", "Да"]
    for special in (True, False):
        want = tiny.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]
        assert tok(texts, add_special_tokens=special, verbose=False)["input_ids"] == [list(x) for x in want]
        assert tok(texts[0], add_special_tokens=special)["input_ids"] == list(want[0])
    assert tok.hits > 0 and len(tok._cache) <= 3
    assert tok.eos_token_id == tiny.tokenizer.eos_token_id
    assert not math.isnan(tok.misses)


def test_cli_refuses_bad_calibration_and_template_set_in_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from rsg_eval.cli import main

    for args, want in ((["--calibration", "maybe"], "--calibration"), (["--templates", "nope"], "--templates"),
                       (["--calibrate", "--calibration", "off"], "--calibration")):
        monkeypatch.setattr(sys, "argv", ["rsg", "zeroshot", "--model", "tiny", "--data", "sample", "--tasks",
                                          "TERRa", "--root", str(tmp_path), *args])
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err
        assert exc.value.code == 2 and want in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_fewshot_per_template_matches_one_template_runs(tmp_path, tiny):
    """--num-fewshot K with several templates: every template gets the same drawn shots, rendered in its own
    wording, exactly as its one-template run renders them."""
    kw = dict(tasks=["TERRa"], split="val", num_fewshot=2)
    multi = run_zeroshot(_opts(tmp_path, "m", templates="yesno,cloze", **kw), show_progress=False, loaded=tiny)
    for tpl in ("yesno", "cloze"):
        one = run_zeroshot(_opts(tmp_path, f"o-{tpl}", template=tpl, **kw), show_progress=False, loaded=tiny)
        a = _logs(multi.run.path / "templates" / "TERRa" / tpl, "TERRa")
        b = _logs(one.run.path, "TERRa")
        assert [r["shots"] for r in a] == [r["shots"] for r in b] and all(len(r["shots"]) == 2 for r in a)
        assert [r["prompt"] for r in a] == [r["prompt"] for r in b]
    cfg = json.loads((multi.run.path / "config.json").read_text())
    assert cfg["template"] == "templates yesno,cloze (select default)" and cfg["variants"] == {"TERRa": ["yesno",
                                                                                                         "cloze"]}


def test_best_val_without_val_results_leaves_test_out_and_says_so(tmp_path, tiny):
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    res = run_zeroshot(_opts(tmp_path, "t", tasks=["TERRa"], split="test", templates="yesno,cloze",
                             select="best-val"), show_progress=False, loaded=tiny,
                       console=Console(file=out, width=200))
    text = " ".join(out.getvalue().split())
    assert "TERRa/test: --select best-val needs every template's val score" in text
    assert not (res.run.path / "state" / "TERRa.test.json").exists()  # left out of the zip
    assert (res.run.path / "templates" / "TERRa" / "cloze" / "state" / "TERRa.test.json").is_file()
    assert res.zip is None or "TERRa" in res.zip.missing
