"""The zero-shot benchmark at a toy size: it runs all three ways of scoring and reports identical predictions.
Speed is not asserted here (it is measured by `rsg bench zeroshot` and recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rsg_eval.bench.zeroshot import parus_like, rucos_like, run_bench

TOY = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, num_decoder_layers=1)


def test_inputs_have_the_promised_shape():
    case = rucos_like(3, passage_words=60, candidates=15)
    assert len(case.prompts) == 3 and all(len(c) == 15 for c in case.choices)
    for prompt, choices in zip(case.prompts, case.choices):
        assert len(set(choices)) == 15  # distinct entities filled into one query
        assert all("@placeholder" not in c for c in choices)
    assert rucos_like(3, passage_words=60).prompts == case.prompts  # seeded
    par = parus_like(4)
    assert all(len(c) == 2 for c in par.choices)


def test_bench_reports_identical_predictions():
    report = run_bench(docs=2, parus_docs=3, passage_words=60, model_overrides=TOY, threads=1)
    assert report["model"]["d_model"] == 32 and report["device"] == "cpu"
    names = [c["name"] for c in report["cases"]]
    assert names == ["RuCoS-like", "PARus-like"]
    for c in report["cases"]:
        assert c["same_predictions"] is True
        assert c["max_abs_diff"] < 1e-3
        assert set(c["seconds"]) == {"naive", "encoder_once", "kv_once", "fast"}
        assert c["ratio_vs_naive"]["naive"] == 1.0
        assert all(v > 0 for v in c["docs_per_s"].values())
    assert report["cases"][0]["choices_per_doc"] == 15


def test_cli_writes_json(tmp_path):
    from rsg_eval.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "zeroshot", "--docs", "1", "--parus-docs", "2", "--d-model", "16",
                                   "--layers", "1", "--threads", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [c["same_predictions"] for c in data["cases"]] == [True, True]
    assert "RuCoS-like" in res.output
