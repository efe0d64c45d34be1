"""No noise that alarms: warnings about cases we handle stay silent, and an unreachable hub fails fast in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from rsg_eval.core import metrics

REPO = Path(__file__).resolve().parents[1]
RSG = str(Path(sys.executable).parent / "rsg")
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there, the connection is refused at once


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------- scikit-learn


def test_metrics_are_silent_on_degenerate_inputs() -> None:
    """One label only (a small LiDiRus category, a constant prediction): the metrics define the value, so
    scikit-learn's UserWarning must not reach the user."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert metrics.mcc(["entailment", "entailment"], ["entailment", "entailment"]) == 0.0
        assert metrics.mcc(["a", "b", "a"], ["a", "a", "a"]) == 0.0
        assert metrics.f1_macro(["x", "x"], ["x", "x"], ["x", "y", "z"]) == pytest.approx(1 / 3)
    assert [str(w.message) for w in caught] == []


def test_metrics_leave_other_warnings_alone() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics.mcc(["a", "b"], ["a", "b"])
        warnings.warn("ours", UserWarning)
    assert [str(w.message) for w in caught] == ["ours"]


def test_rsg_score_with_diagnostics_prints_no_warnings(tmp_path: Path) -> None:
    # A constant prediction: every LiDiRus diagnostic category holds one predicted label (scikit-learn warned 9x).
    preds = tmp_path / "LiDiRus.jsonl"
    preds.write_text("".join(json.dumps({"idx": i, "label": "entailment"}) + "\n" for i in range(8)),
                     encoding="utf-8")
    proc = subprocess.run([RSG, "score", str(preds), "--data", "sample", "--split", "test", "--diagnostics"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "logic/Negation" in proc.stdout
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr


# ----------------------------------------------------------------------------------------------- long inputs


LONG_WARNING = "Token indices sequence length is longer than the specified maximum"


def _long_terra_item():
    from rsg_eval.core.tasks import Item

    premise = " ".join(["Весенний паводок затопил несколько дачных посёлков у реки."] * 200)  # ~2400 tokens
    fields = {"premise": premise, "hypothesis": "Жителей посёлков вывезли."}
    return Item("TERRa", "val", 0, 0, 0, fields, ("entailment", "not_entailment"), "entailment", {})


def test_truncating_a_long_prompt_prints_no_length_warning(capfd: pytest.CaptureFixture) -> None:
    """The template shortens the passage by measuring the full prompt first; transformers must not warn about
    that measurement (it warns once per tokenizer, so each check gets a fresh one)."""
    from rsg_eval.models.tiny import MAX_INPUT_TOKENS, build_tiny_tokenizer
    from rsg_eval.core.prompts import load_template

    tok = build_tiny_tokenizer()
    assert tok.model_max_length == MAX_INPUT_TOKENS
    r = load_template("TERRa").render(_long_terra_item(), tokenizer=tok, max_tokens=MAX_INPUT_TOKENS)
    assert r.truncated
    assert len(tok(r.prompt)["input_ids"]) <= MAX_INPUT_TOKENS
    assert LONG_WARNING not in capfd.readouterr().err


def test_finetune_encoding_of_a_long_prompt_prints_no_length_warning(capfd: pytest.CaptureFixture) -> None:
    from rsg_eval.models.tiny import MAX_INPUT_TOKENS, build_tiny_tokenizer
    from rsg_eval.training.finetune.data import encode_source, encode_target

    long_text = " ".join(["Весенний паводок затопил несколько дачных посёлков у реки."] * 200)
    tok = build_tiny_tokenizer()
    ids = encode_source(tok, "<LM>" + long_text, MAX_INPUT_TOKENS)
    assert len(ids) == MAX_INPUT_TOKENS
    tok = build_tiny_tokenizer()
    assert len(encode_target(tok, long_text, 64)) == 64
    assert LONG_WARNING not in capfd.readouterr().err


# ----------------------------------------------------------------------------------------------- unreachable hub


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the probe, huggingface_hub retries with back-off (1+2+4+8+8 s of sleep alone) before failing."""
    from huggingface_hub import constants

    from rsg_eval.core.errors import RSGError
    from rsg_eval.models.loading import load_model

    monkeypatch.setattr(constants, "ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(RSGError) as exc:
        load_model("someone/not-cached-model", device="cpu")
    assert time.monotonic() - start < 10
    msg = str(exc.value)
    assert "\n" not in msg
    assert UNREACHABLE in msg and "'someone/not-cached-model' is not in the local cache" in msg
    assert "--model" in msg and "HF_HUB_OFFLINE=1" in msg


def test_unreachable_hub_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [RSG, "zeroshot", "--model", "someone/not-cached-model", "--data", "sample", "--tasks", "TERRa",
         "--root", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
        env=_env(HF_ENDPOINT=UNREACHABLE, HF_HOME=str(tmp_path / "hf")))
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, proc.stderr
    assert err[0].startswith("error: ") and "HF_HUB_OFFLINE=1" in err[0] and "local model folder" in err[0]
    assert "Retrying" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_unreachable_hub_loads_a_cached_model_from_the_cache(tmp_path: Path) -> None:
    """A model in the hub cache still loads (and scores) when the hub does not answer, without the retries."""
    from rsg_eval.models.tiny import build_tiny

    model, tok = build_tiny()
    snap = tmp_path / "hf" / "hub" / "models--someone--cached-t5" / "snapshots" / ("a" * 40)
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    proc = subprocess.run(
        [RSG, "zeroshot", "--model", "someone/cached-t5", "--data", "sample", "--tasks", "TERRa", "--split", "val",
         "--limit", "2", "--root", str(tmp_path / "runs"), "-q"],
        capture_output=True, text=True, timeout=300,
        env=_env(HF_ENDPOINT=UNREACHABLE, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "from the local cache" in proc.stdout + proc.stderr
    assert "Retrying" not in proc.stdout + proc.stderr
    assert list((tmp_path / "runs").glob("*/metrics.json"))
