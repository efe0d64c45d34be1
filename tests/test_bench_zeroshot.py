"""The zero-shot benchmark at a toy size: every way of scoring, both architectures, identical predictions, peak
memory per way. Speed is not asserted here (it is measured by `rsg bench zeroshot`; docs/benchmarks.md)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rsg_eval.bench.zeroshot import MEMORY_CPU, compare_ways, parus_like, peak_memory, rucos_like, run_bench

TOY = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=1, num_decoder_layers=1)
TOY_CAUSAL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)


def test_inputs_have_the_promised_shape():
    case = rucos_like(3, passage_words=60, candidates=15)
    assert len(case.prompts) == 3 and all(len(c) == 15 for c in case.choices)
    for prompt, choices in zip(case.prompts, case.choices):
        assert len(set(choices)) == 15  # distinct entities filled into one query
        assert all("@placeholder" not in c for c in choices)
    assert rucos_like(3, passage_words=60).prompts == case.prompts  # seeded
    par = parus_like(4)
    assert all(len(c) == 2 for c in par.choices)


def test_bench_reports_identical_predictions_and_memory_per_way():
    report = run_bench(docs=2, parus_docs=3, passage_words=60, model_overrides=TOY, threads=1)
    assert report["arch"] == "seq2seq" and report["model"]["d_model"] == 32 and report["device"] == "cpu"
    assert [c["case"] for c in report["cases"]] == ["RuCoS-like", "PARus-like"]
    for c in report["cases"]:
        assert c["same_predictions"] is True and c["max_abs_diff"] < 1e-3
        assert list(c["ways"]) == ["naive", "encoder_once", "prompt_once", "fast"]
        assert c["ways"]["naive"]["ratio_vs_naive"] == 1.0
        assert all(w["prompts_per_s"] > 0 and w["peak_memory_bytes"] > 0 and w["peak_memory_one_prompt_bytes"] > 0
                   for w in c["ways"].values())
        assert c["memory_measure"] == MEMORY_CPU
    rucos = report["cases"][0]
    assert rucos["choices_per_prompt"] == 15
    # Scoring one prompt with all its choices at once: a full pass per choice holds far more than ours.
    one = {w: rucos["ways"][w]["peak_memory_one_prompt_bytes"] for w in rucos["ways"]}
    assert one["naive"] > 2 * one["fast"], one


def test_causal_bench():
    report = run_bench(arch="causal", docs=2, parus_docs=2, passage_words=60, model_overrides=TOY_CAUSAL, threads=1)
    assert report["model"]["model_type"] == "llama" and report["model"]["hidden_size"] == 32
    for c in report["cases"]:
        assert c["same_predictions"] is True and c["max_abs_diff"] < 1e-3
        assert list(c["ways"]) == ["naive", "prompt_once", "fast"]


def test_compare_ways_on_a_loaded_model():
    """The entry point other benchmarks call: a loaded model, a case, the ways to compare."""
    from rsg_eval.models.tiny import build_tiny

    model, tok = build_tiny(**TOY)
    res = compare_ways(model, tok, rucos_like(2, passage_words=40, candidates=4), ways=["naive", "fast"],
                       repeats=1, memory=False)
    assert set(res["ways"]) == {"naive", "fast"} and res["prompts"] == 2 and res["same_predictions"]
    assert res["ways"]["fast"]["peak_memory_bytes"] is None and res["dtype"] == "float32"
    assert res["ways"]["fast"]["seconds"] > 0 and res["ways"]["fast"]["prompts_per_s"] > 0


def test_peak_memory_on_cpu_counts_what_the_run_allocates():
    def allocate():
        a = torch.ones(1 << 18)  # 1 MiB
        b = torch.ones(1 << 19)  # 2 MiB, both alive: 3 MiB peak
        del a
        c = torch.ones(1 << 18)  # 2 + 1 MiB again
        return float(b.sum() + c.sum())

    out, peak, how = peak_memory(allocate, torch.device("cpu"))
    assert out == float((1 << 19) + (1 << 18)) and how == MEMORY_CPU
    assert 3 << 20 <= peak < (3 << 20) + 4096


def test_cli_writes_json(tmp_path):
    from rsg_eval.cli import app

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "zeroshot", "--docs", "1", "--parus-docs", "2", "--d-model", "16",
                                   "--layers", "1", "--threads", "1", "--no-memory", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text(encoding="utf-8"))
    assert [c["same_predictions"] for c in data["cases"]] == [True, True]
    assert "RuCoS-like" in res.output
    res = CliRunner().invoke(app, ["bench", "zeroshot", "--arch", "causal", "--docs", "1", "--parus-docs", "1",
                                   "--d-model", "16", "--layers", "1", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "peak" in res.output
    res = CliRunner().invoke(app, ["bench", "zeroshot", "--arch", "rnn"])
    assert res.exit_code == 2 or "unknown architecture" in str(res.exception)


@pytest.mark.slow
def test_templates_bench_runs_whole_processes_and_compares_predictions():
    """`rsg bench zeroshot --templates 2` at a toy size: three whole processes (two one-template, one with both),
    the same predictions per template on both sides, ratios of the measured times."""
    from rsg_eval.bench.templates import run_templates_bench

    rep = run_templates_bench(k=2, tasks=["TERRa", "PARus"], split="val", limit=2, threads=1)
    assert rep["same_predictions"] and len(rep["separate"]) == 2
    assert rep["templates"]["TERRa"][0] == "yesno" and rep["templates"]["PARus"][0] == "question"
    assert rep["ratio_wall"] == pytest.approx(rep["separate_wall_s"] / rep["multi"]["wall_s"])
    assert all(p["wall_s"] > 0 and p["cpu_s"] > 0 for p in [*rep["separate"], rep["multi"]])
