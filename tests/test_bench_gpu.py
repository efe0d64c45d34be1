"""`rsg bench gpu --tiny` (every section at tiny size on the CPU), its skip rules, the synchronised timers of the
benchmarks, and the fine-tuning preset at --steps 1 and -b 8."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from rsg_eval.cli import app  # noqa: E402
from rsg_eval.core.errors import RSGError  # noqa: E402

from tests._finetune_utils import one_thread  # noqa: E402,F401 (one_thread: autouse fixture)


def test_bench_gpu_tiny_runs_every_section(tmp_path):
    out = tmp_path / "bg"
    res = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    secs = report["sections"]
    assert list(secs) == ["finetune", "hierarchical", "zeroshot", "early_exit"]
    assert all(s["status"] == "ok" for s in secs.values()), secs
    assert secs["finetune"]["step_seconds"] > 0 and secs["finetune"]["model_tflop_per_step"] > 0
    assert secs["finetune"]["hardware_tflop_per_step"] > secs["finetune"]["model_tflop_per_step"]  # recompute
    assert secs["hierarchical"]["step_seconds"] > 0 and secs["hierarchical"]["model_tflop_per_step"] > 0
    assert secs["zeroshot"]["same_predictions"] and secs["early_exit"]["same_predictions"]
    assert secs["finetune"]["mfu"] is None and report["peak"] is None  # a CPU: no peak, no MFU
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| ") == 5 and "MFU omitted: a CPU run" in md  # header + 4 sections
    assert "MFU omitted: a CPU run" in res.output


def test_bench_gpu_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = CliRunner().invoke(app, ["bench", "gpu"])
    assert isinstance(res.exception, RSGError) and "--tiny" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--section", "nope"])
    assert isinstance(res.exception, RSGError) and "early_exit" in str(res.exception)


def test_bench_gpu_skips_what_the_gpu_cannot_hold_or_the_budget_cannot_fit():
    from rsg_eval.bench.gpu import NEEDS_GIB, skip_reason

    assert skip_reason("finetune", tiny=False, total_gib=24.0, used_s=0, budget_s=600) == \
        f"needs about {NEEDS_GIB['finetune']} GiB of GPU memory; this GPU has 24 GiB"
    assert skip_reason("early_exit", tiny=False, total_gib=24.0, used_s=0, budget_s=600) is None
    assert skip_reason("finetune", tiny=False, total_gib=80.0, used_s=0, budget_s=600) is None
    assert "time budget of 600 s" in skip_reason("zeroshot", tiny=False, total_gib=80.0, used_s=601, budget_s=600)
    assert skip_reason("finetune", tiny=True, total_gib=None, used_s=0, budget_s=600) is None


def test_hierarchical_step_flops_by_parts():
    from rsg_eval.bench.flops import T5Dims, forward_flops
    from rsg_eval.bench.gpu import hierarchical_step_flops

    d = T5Dims(d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=4, num_decoder_layers=4, vocab_size=50)
    one = {"mc": 3 * forward_flops(d, 10, 0, encoder_layers=1, decoder=False),
           "nli": 3 * forward_flops(d, 10, 0, decoder=False), "qa": 3 * forward_flops(d, 10, 5)}
    assert hierarchical_step_flops(d, 1, 2, 10, 5, ["mc", "ner", "nli", "qa", "title"]) == \
        2 * (2 * one["mc"] + one["nli"] + 2 * one["qa"])
    assert one["mc"] < one["nli"] < one["qa"]


def test_every_benchmark_timer_waits_for_the_device(monkeypatch):
    """The hmtl and fine-tuning benches read their clocks only after a device sync at both ends of each timing
    (a no-op on CPU, so counted here by replacing it)."""
    from rsg_eval.bench import timing
    from rsg_eval.bench.hmtl import run_bench
    from rsg_eval.bench import finetune as bench

    calls: list = []
    monkeypatch.setattr(timing, "sync", lambda device=None: calls.append(device))
    run_bench(d_model=32, d_ff=64, layers=4, split=1, batch=2, seq_len=8, repeats=2)
    assert len(calls) == 2 * (2 + 2)  # 2 ways x 2 repeats, each timed between two syncs
    calls.clear()
    monkeypatch.setattr(bench, "sync", lambda device=None: calls.append(device))
    model, vocab = bench.build_model("tiny", torch.device("cpu"))
    bench.run_config(model, bench.synthetic_pairs(4, vocab, 16, 4, seed=0), 2, False, torch.device("cpu"),
                     name="tiny")
    assert len(calls) == 2


def test_preset_keeps_the_batch_asked_for_and_runs_one_step():
    """`--preset` used to turn `-b 8` into 12 and to fail at `--steps 1` (its warm-up read two batches)."""
    res = CliRunner().invoke(app, ["bench", "finetune", "--preset", "tiny", "-b", "8", "--steps", "1",
                                   "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "batch 8," in res.output and "(1 timed steps after 2 warm-up steps)" in res.output
    res = CliRunner().invoke(app, ["bench", "finetune", "--preset", "tiny", "--steps", "1", "--threads", "1"])
    assert res.exit_code == 0 and "batch 12," in res.output
    if not torch.cuda.is_available():
        res = CliRunner().invoke(app, ["bench", "finetune", "--preset", "fredt5-1.7b", "--steps", "1"])
        assert isinstance(res.exception, RSGError) and "--preset tiny" in str(res.exception)


def test_preset_result_counts_flops_of_the_steps_it_timed():
    from rsg_eval.bench.flops import T5Dims, hardware_flops, model_flops
    from rsg_eval.bench.finetune import preset_step
    from rsg_eval.bench.finetune import build_model

    r = preset_step("tiny", torch.device("cpu"), batch=3, steps=2, src_len=16, tgt_len=4, warmup=1)
    assert r["steps"] == 2 and r["examples"] == 6 and r["mfu"] is None
    cfg = build_model("tiny", torch.device("cpu"))[0].config
    d = T5Dims.from_config(cfg)
    assert r["model_tflop_per_step"] * 1e12 == pytest.approx(model_flops(d, [16] * 3, [4] * 3))
    assert r["hardware_tflop_per_step"] * 1e12 == pytest.approx(hardware_flops(d, [(3, 16, 4)], checkpointing=True))
