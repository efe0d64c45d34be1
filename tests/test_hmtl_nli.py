"""`--nli-head` evaluation: TERRa / LiDiRus / RCB through the NLI head into a normal run folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _hmtl_utils import one_thread  # noqa: F401  (autouse fixture)

from rsg_eval.core.errors import RSGError
from rsg_eval.eval.nli_head import decide, nli_probabilities, run_nli_head_eval

HEAD = ("entailment", "contradiction", "neutral")


def test_decide_by_hand():
    p = torch.tensor([0.4, 0.35, 0.25])
    # two classes: 0.4 < 0.6 = contradiction + neutral -> not_entailment
    label, scores = decide("TERRa", p, HEAD, ("entailment", "not_entailment"))
    assert label == "not_entailment" and scores == pytest.approx([math.log(0.4), math.log(0.6)])
    assert decide("LiDiRus", torch.tensor([0.6, 0.3, 0.1]), HEAD, ("entailment", "not_entailment"))[0] == "entailment"
    # three classes: argmax, in the item's label order even when the head's order differs
    label, scores = decide("RCB", p, HEAD, ("neutral", "entailment", "contradiction"))
    assert label == "entailment" and scores == pytest.approx([math.log(0.25), math.log(0.4), math.log(0.35)])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.models.tiny import build_tiny

    base, tok = build_tiny(num_layers=4)
    torch.manual_seed(3)
    hier = HierarchicalT5.from_base(base, split=1, **head_labels())
    with torch.no_grad():      # a head that is not uniform, so predictions differ between items
        hier.heads["nli"].classifier.weight.normal_(0, 2.0)
    out = tmp_path_factory.mktemp("nli") / "ckpt"
    hier.save_pretrained(out, tokenizer=tok)
    return out


def test_run_folder_and_predictions(ckpt, tmp_path):
    from rsg_eval.models.loading import load_model
    from rsg_eval.runs import RunFolder
    from rsg_eval.core.data import load_items

    run_dir = tmp_path / "run"
    res = run_nli_head_eval(ckpt, data="sample", tasks=None, split="all", run_dir=run_dir, batch_size=4)
    assert sorted(res.done) == sorted((t, s) for t in ("LiDiRus", "RCB", "TERRa") for s in ("val", "test"))
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert cfg["kind"] == "nli-head" and cfg["tasks"] == ["LiDiRus", "RCB", "TERRa"]
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["tasks"]) == {"LiDiRus", "RCB", "TERRa"}
    # Every logged prediction equals the head's answer for that item alone (batch 4 vs batch 1).
    loaded = load_model(str(ckpt))
    hier = loaded.info["hierarchical"]
    folder = RunFolder.open(run_dir)
    for task in ("RCB", "TERRa"):
        items = load_items("sample", task, "val")[:4]
        logs = folder.read_logs(task, "val")
        assert len(logs) == len(load_items("sample", task, "val"))
        for it, row in zip(items, logs):
            p = nli_probabilities(hier, loaded.tokenizer, [(it.fields["premise"], it.fields["hypothesis"])],
                                  batch_size=1)[0]
            assert row["pred"] == decide(task, p, HEAD, it.labels)[0]
            # batch 4 vs batch 1: float32 rounding relative to the log-probability (measured 2e-6 absolute)
            assert row["scores"] == pytest.approx(decide(task, p, HEAD, it.labels)[1], rel=1e-5, abs=1e-6)
    # A rerun skips finished tasks; only entailment tasks are accepted.
    again = run_nli_head_eval(ckpt, data="sample", split="val", run_dir=run_dir)
    assert not again.done and len(again.skipped) == 3
    with pytest.raises(RSGError, match="only entailment tasks"):
        run_nli_head_eval(ckpt, data="sample", tasks=["PARus"], run_dir=tmp_path / "x")


def test_plain_model_is_refused(tmp_path):
    with pytest.raises(RSGError, match="hierarchical checkpoint"):
        run_nli_head_eval("tiny", data="sample", run_dir=tmp_path / "r")


def test_zeroshot_cli_dispatches_to_the_nli_head(ckpt, tmp_path):
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    run_dir = tmp_path / "cli-run"
    r = CliRunner().invoke(app, ["zeroshot", "--model", str(ckpt), "--data", "sample", "--nli-head", "--tasks",
                                 "RCB", "--limit", "2", "--run", str(run_dir), "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert cfg["kind"] == "nli-head" and cfg["tasks"] == ["RCB"] and cfg["limit"] == 2
    assert len((run_dir / "logs" / "val" / "RCB.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def test_nli_head_cli_prints_the_zeroshot_summary_and_its_partial_zip(ckpt, tmp_path):
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    run_dir = tmp_path / "cli-all"
    r = CliRunner().invoke(app, ["zeroshot", "--model", str(ckpt), "--data", "sample", "--nli-head", "--tasks",
                                 "RCB", "TERRa", "--limit", "2", "--run", str(run_dir), "-q"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["tasks"]
    out = r.output
    # the prompted zero-shot's table: a row per task with its metrics and score, then the total
    assert "val metrics" in out
    for task in ("RCB", "TERRa"):
        row = next(ln for ln in out.splitlines() if ln.startswith(f"│ {task} "))
        assert f"{metrics[task]['score']:.4f}" in row and "acc" in row
    assert "needs all nine tasks" in out
    assert f"run folder: {run_dir} (4 task splits evaluated, 0 skipped" in out
    # the zip: where it is, that it is partial, and why it cannot be complete
    zip_path = run_dir / "submission-partial.zip"
    assert zip_path.is_file() and not (run_dir / "submission.zip").exists()
    assert f"partial zip {zip_path}: 2 of 9 tasks; missing LiDiRus, PARus" in out
    assert "the NLI head answers only LiDiRus, RCB and TERRa" in out
    # a rerun says it skipped them and prints the same table
    again = CliRunner().invoke(app, ["zeroshot", "--model", str(ckpt), "--data", "sample", "--nli-head", "--tasks",
                                     "RCB,TERRa", "--limit", "2", "--run", str(run_dir), "-q"])
    assert again.exit_code == 0, again.output
    assert "(0 task splits evaluated, 4 skipped as already finished" in again.output
    assert "val metrics" in again.output and f"partial zip {zip_path}" in again.output


def test_block1_predictions_batch_invariant(ckpt):
    from rsg_eval.training.hmtl.infer import predict_entities, predict_topics
    from rsg_eval.models.hierarchical import load_hierarchical

    hier, tok = load_hierarchical(ckpt)
    with torch.no_grad():
        hier.heads["ner"].classifier.bias.fill_(0.3)      # some tokens cross the 0.5 threshold
    texts = ["Анна Петрова работает врачом в Новосибирске.", "Да.", "Поезд опоздал на сорок минут."]
    topics = predict_topics(hier, tok, texts)
    ents = predict_entities(hier, tok, texts)
    assert all(t in hier.config.mc_labels for t in topics)
    assert [predict_topics(hier, tok, [t])[0] for t in texts] == topics
    assert [predict_entities(hier, tok, [t])[0] for t in texts] == ents
    assert any(ents) and all(e["text"] == texts[i][e["start"]:e["end"]] for i, es in enumerate(ents) for e in es)
