"""The zero-shot runner end to end on the tiny model: run folder, metrics, zip, resume, --limit, bad input."""

from __future__ import annotations

import io
import json
import re
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.core import metrics, submission  # noqa: E402
from rsg_eval.eval import zeroshot
from rsg_eval.core.errors import RSGError  # noqa: E402
from rsg_eval.runs import RunFolder  # noqa: E402
from rsg_eval.core.tasks import TASK_NAMES  # noqa: E402
from rsg_eval.core.data import load_items
from rsg_eval.eval.zeroshot import ZeroShotOptions, run_zeroshot  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny", device="cpu")


def _run(tmp_path, loaded, **kw):
    opts = ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run=kw.pop("run", "r"), **kw)
    return run_zeroshot(opts, show_progress=False, loaded=loaded)


def _no_model_load(monkeypatch):
    import rsg_eval.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded when every task is finished")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.slow
def test_all_nine_tasks_end_to_end_then_skip(tmp_path, tiny, monkeypatch):
    res = _run(tmp_path, tiny, split="all")
    run = res.run
    assert [o.status for o in res.outcomes] == ["done"] * 18
    cfg = run.read_config()
    assert cfg["model"] == "tiny" and cfg["kind"] == "zeroshot" and cfg["seed"] == 0 and cfg["split"] == "all"
    assert set(cfg["template_sha256"]) == set(TASK_NAMES) and cfg["versions"]["torch"] == torch.__version__
    assert cfg["model_info"]["fingerprint"].startswith("tiny-")
    m = json.loads(run.metrics_path.read_text())
    assert set(m["tasks"]) == set(TASK_NAMES) and isinstance(m["total"], float)
    assert m["total"] == pytest.approx(sum(v["score"] for v in m["tasks"].values()) / 9)
    # Metrics recomputed independently from the prediction files and the data agree with metrics.json.
    for t in TASK_NAMES:
        items = load_items("sample", t, "val")
        preds = run.read_predictions(t, "val")
        assert preds.keys() == {it.key for it in items}
        assert metrics.score_items(t, items, preds)["score"] == pytest.approx(m["tasks"][t]["score"])
        logs = run.read_logs(t, "val")
        assert len(logs) == len(items)
        for row in logs:  # the prediction is the argmax of the logged scores, mapped into the labels
            best = max(range(len(row["scores"])), key=lambda j: (row["scores"][j], -j))
            assert row["pred"] == row["labels"][best] and len(row["choices"]) == len(row["labels"])
    assert res.zip.complete and submission.check_zip(res.zip.path, "sample") == []
    # LiDiRus val and test are the same labelled file: scored once, the same predictions in both.
    assert run.read_predictions("LiDiRus", "val") == run.read_predictions("LiDiRus", "test")
    assert run.read_logs("LiDiRus", "val") == run.read_logs("LiDiRus", "test")
    # Same command again: everything skipped, the model never loaded, results untouched.
    before = {p: p.read_bytes() for p in (run.path / "predictions").rglob("*.jsonl")}
    before[run.config_path] = run.config_path.read_bytes()
    _no_model_load(monkeypatch)
    again = run_zeroshot(ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run="r", split="all"),
                         show_progress=False)
    assert [o.status for o in again.outcomes] == ["skipped"] * 18
    assert before == {p: p.read_bytes() for p in [*(run.path / "predictions").rglob("*.jsonl"), run.config_path]}
    assert again.metrics == m and again.zip.complete


def test_subset_then_all_resumes(tmp_path, tiny):
    first = _run(tmp_path, tiny, tasks=["TERRa", "rcb"])
    assert [(o.task, o.status) for o in first.outcomes] == [("TERRa", "done"), ("RCB", "done")]
    assert first.metrics["total"] is None and set(first.metrics["tasks"]) == {"RCB", "TERRa"}
    state = first.run.read_state("TERRa", "val")
    second = _run(tmp_path, tiny, tasks=["TERRa", "RCB", "PARus"])
    assert {o.task: o.status for o in second.outcomes} == {"RCB": "skipped", "TERRa": "skipped", "PARus": "done"}
    assert second.run.read_state("TERRa", "val") == state  # not rewritten
    assert set(second.metrics["tasks"]) == {"RCB", "TERRa", "PARus"}
    assert second.run.read_config()["tasks"] == ["RCB", "PARus", "TERRa"]
    # A setting that changes results (normalisation) is refused in the same folder; --restart starts it over.
    with pytest.raises(RSGError, match="normalize: 'sum' -> 'token'"):
        _run(tmp_path, tiny, tasks=["TERRa"], normalize="token")
    assert second.run.read_state("TERRa", "val") == state
    third = _run(tmp_path, tiny, tasks=["TERRa"], normalize="token", restart=True)
    assert [o.status for o in third.outcomes] == ["done"]
    assert third.run.read_state("TERRa", "val")["parts"]["normalize"] == "token"
    assert third.run.finished("val") == ["TERRa"] and set(third.metrics["tasks"]) == {"TERRa"}


def test_interrupt_keeps_finished_tasks(tmp_path, tiny, monkeypatch):
    real = zeroshot._score_job
    seen = []

    def interrupt_on_third(job, *a, **k):
        seen.append(job.task)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(job, *a, **k)

    monkeypatch.setattr(zeroshot, "_score_job", interrupt_on_third)
    res = _run(tmp_path, tiny, tasks=["TERRa", "RCB", "PARus", "RWSD"])
    assert seen == ["TERRa", "RCB", "PARus"]  # the user's task order
    assert res.interrupted and res.run.finished("val") == ["RCB", "TERRa"]
    assert not (res.run.path / "rsg.lock").exists()  # Ctrl-C released the run folder's lock
    assert set(json.loads(res.run.metrics_path.read_text())["tasks"]) == {"RCB", "TERRa"}
    monkeypatch.setattr(zeroshot, "_score_job", real)
    again = _run(tmp_path, tiny, tasks=["TERRa", "RCB", "PARus", "RWSD"])
    assert {o.task: o.status for o in again.outcomes} == {"RCB": "skipped", "TERRa": "skipped", "PARus": "done",
                                                          "RWSD": "done"}


def test_limit_keeps_whole_groups_and_batch_size_does_not_matter(tmp_path, tiny):
    a = _run(tmp_path, tiny, tasks=["MuSeRC", "RuCoS", "TERRa"], limit=1, batch_size=1, run="a")
    b = _run(tmp_path, tiny, tasks=["MuSeRC", "RuCoS", "TERRa"], limit=1, batch_size="auto", run="b")
    for t in ("MuSeRC", "RuCoS", "TERRa"):
        assert a.run.read_predictions(t, "val") == b.run.read_predictions(t, "val")
        for ra, rb in zip(a.run.read_logs(t, "val"), b.run.read_logs(t, "val")):
            # float32 rounding differs between batch shapes, in proportion to the score: sums of log-probabilities
            # reach -1400 on the sample (a float32 ulp there is 1e-4), and batch 1 vs auto differed by 1.5e-4 =
            # 3e-7 relative over all val items of six tasks. A padding leak moves scores by 0.1 or more.
            assert ra["scores"] == pytest.approx(rb["scores"], rel=1e-5, abs=1e-6)
    muserc = load_items("sample", "MuSeRC", "val")
    first_q = [it.key for it in muserc if it.group == muserc[0].group]
    assert [r["key"] for r in a.run.read_logs("MuSeRC", "val")] == first_q and len(first_q) > 1
    assert len(a.run.read_logs("RuCoS", "val")) == 1 and len(a.run.read_logs("TERRa", "val")) == 1


def test_calibrate_and_template_choice(tmp_path, tiny):
    res = _run(tmp_path, tiny, tasks=["PARus"], template="connective", calibrate=True, normalize="byte")
    cfg = res.run.read_config()
    assert cfg["templates"]["PARus"] == "connective" and cfg["calibrate"] is True
    row = res.run.read_logs("PARus", "val")[0]
    assert row["prompt"].endswith(("потому что", "поэтому")) and row["choices"][0][0].islower()


def test_long_passage_is_shortened_to_the_model_length(tmp_path, tiny):
    from rsg_eval.models.loading import Loaded

    short = Loaded(tiny.model, tiny.tokenizer, {**tiny.info, "max_input_tokens": 64})
    res = _run(tmp_path, short, tasks=["DaNetQA"])
    assert res.outcomes[0].n_truncated > 0
    rows = res.run.read_logs("DaNetQA", "val")
    assert sum("…" in r["prompt"] for r in rows) == res.outcomes[0].n_truncated
    for row, it in zip(rows, load_items("sample", "DaNetQA", "val")):
        assert len(tiny.tokenizer(row["prompt"])["input_ids"]) <= 64
        assert row["prompt"].endswith(f"Вопрос: {it.fields['question']}\nОтвет (да или нет):")  # kept whole


def test_bad_input(tmp_path, tiny):
    with pytest.raises(RSGError) as exc:
        _run(tmp_path, tiny, tasks=["nope"])
    assert all(t in str(exc.value) for t in TASK_NAMES)
    with pytest.raises(RSGError, match="unknown split"):
        _run(tmp_path, tiny, split="train")
    with pytest.raises(RSGError, match="batch size"):
        _run(tmp_path, tiny, batch_size="many")
    with pytest.raises(RSGError, match="no template 'zzz'"):
        _run(tmp_path, tiny, template="zzz")
    broken = tmp_path / "broken.yaml"
    broken.write_text(textwrap.dedent("""\
        task: TERRa
        template: "{{ premise }} {% if %}"
        choices: {entailment: Да, not_entailment: Нет}
        """), encoding="utf-8")
    with pytest.raises(RSGError) as exc:
        _run(tmp_path, tiny, tasks=["TERRa"], template=str(broken))
    assert exc.value.file == str(broken) and exc.value.line == 2
    # A model that does not exist: a clear error, and no run folder left behind.
    with pytest.raises(RSGError, match="does not exist"):
        run_zeroshot(ZeroShotOptions(model=str(tmp_path / "no-model"), data="sample", root=tmp_path, run="x",
                                     tasks=["TERRa"]), show_progress=False)
    assert not (tmp_path / "x").exists()
    # A run folder of another model is not reused.
    _run(tmp_path, tiny, tasks=["TERRa"], run="mine")
    with pytest.raises(RSGError, match="pick another --run"):
        run_zeroshot(ZeroShotOptions(model="other/model", data="sample", root=tmp_path, run="mine",
                                     tasks=["TERRa"]), show_progress=False)


@pytest.mark.slow
def test_hierarchical_checkpoint_prompted_and_nli_head(tmp_path):
    """A hierarchical checkpoint works as --model for prompts (LM adapter head) and with --nli-head."""
    from typer.testing import CliRunner

    from rsg_eval.cli import app
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.models.tiny import build_tiny

    base, tok = build_tiny(num_layers=4)
    ckpt = tmp_path / "ckpt"
    HierarchicalT5.from_base(base, split=1, **head_labels()).save_pretrained(ckpt, tokenizer=tok)
    common = ["--model", str(ckpt), "--data", "sample", "--tasks", "TERRa", "--root", str(tmp_path), "-q"]
    res = CliRunner().invoke(app, ["zeroshot", *common, "--run", "prompted"])
    assert res.exit_code == 0, res.output
    assert len(RunFolder.open(tmp_path / "prompted").read_logs("TERRa", "val")) == 6
    res = CliRunner().invoke(app, ["zeroshot", *common, "--run", "head", "--nli-head"])
    assert res.exit_code == 0, res.output
    head = RunFolder.open(tmp_path / "head")
    assert head.read_config()["kind"] == "nli-head" and head.finished("val") == ["TERRa"]


def test_shared_rsg_terra_rcb_limit(tmp_path, tiny, shared_rsg):
    res = run_zeroshot(ZeroShotOptions(model="tiny", data=str(shared_rsg), root=tmp_path, run="s",
                                       tasks=["TERRa", "RCB"], limit=20, split="all"), show_progress=False, loaded=tiny)
    m = res.metrics
    assert m["counts"] == {"RCB": 20, "TERRa": 20} and m["total"] is None
    assert len(res.run.read_predictions("TERRa", "test")) == 20
    assert not res.zip.complete and res.zip.tasks == ("RCB", "TERRa")


def test_cli_smoke_and_usage_error(tmp_path, tiny, monkeypatch, capsys):
    from typer.testing import CliRunner

    import rsg_eval.models.loading as loading
    from rsg_eval.cli import app, main

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)  # reuse the module's tiny model
    res = CliRunner().invoke(app, ["zeroshot", "--model", "tiny", "--data", "sample", "--tasks", "TERRa", "PARus",
                                   "--root", str(tmp_path), "--run", "cli", "-q"])
    assert res.exit_code == 0, res.output
    assert "TERRa" in res.output and "PARus" in res.output and "needs all nine tasks" in res.output
    assert (tmp_path / "cli" / "metrics.json").is_file()
    # Through the real entry point: one red line on stderr, exit status 2, no traceback.
    monkeypatch.setattr(sys, "argv", ["rsg", "zeroshot", "--model", "tiny", "--data", "sample", "--split", "train",
                                      "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown split 'train'" in err and "Traceback" not in err


# --------------------------------------------------------------------------- one configuration per run folder

def test_a_run_folder_refuses_other_settings_and_restart_starts_over(tmp_path, tiny):
    """The issue's case: --normalize token, then the defaults on the same --run. Refused (the folder keeps its
    token results and config); --restart clears it; every state carries the config's settings stamp."""
    first = _run(tmp_path, tiny, tasks=["TERRa", "RCB", "PARus"], split="all", normalize="token", limit=2)
    run = first.run
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    with pytest.raises(RSGError) as exc:
        _run(tmp_path, tiny, tasks=["TERRa", "RCB"], split="all", limit=3)
    msg = str(exc.value)
    assert "normalize: 'token' -> 'sum'" in msg and "limit: 2 -> 3" in msg
    assert "--restart" in msg and "another --run" in msg
    assert before == {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}  # nothing touched
    assert not (run.path / "rsg.lock").exists()  # the refusal released the lock
    cfg = run.read_config()
    assert cfg["settings"]["normalize"] == "token" and cfg["normalize"] == "token"
    for t in ("TERRa", "RCB", "PARus"):
        for split in ("val", "test"):
            assert run.read_state(t, split)["settings_sha256"] == cfg["settings_sha256"]
    # Another model in the same folder is refused the same way.
    with pytest.raises(RSGError, match="model: 'tiny' -> 'other/model'"):
        run_zeroshot(ZeroShotOptions(model="other/model", data="sample", root=tmp_path, run="r", tasks=["TERRa"],
                                     normalize="token", limit=2), show_progress=False, loaded=tiny)
    again = _run(tmp_path, tiny, tasks=["TERRa", "RCB"], split="all", limit=3, restart=True)
    assert [o.status for o in again.outcomes] == ["done"] * 4
    assert run.finished("val") == ["RCB", "TERRa"] == run.finished("test")  # PARus's token results are gone
    assert not run.predictions_path("PARus", "test").exists()
    assert again.zip.missing == tuple(t for t in TASK_NAMES if t not in ("RCB", "TERRa"))
    assert run.read_config()["settings"]["normalize"] == "sum"
    assert set(again.metrics["tasks"]) == {"RCB", "TERRa"} and again.metrics["counts"]["TERRa"] == 3


def test_a_changed_template_or_data_file_of_a_finished_task_is_refused(tmp_path, tiny):
    import shutil

    from rsg_eval.core.data import SAMPLE_DIR

    data = tmp_path / "data"
    shutil.copytree(SAMPLE_DIR, data)
    opts = dict(model="tiny", data=str(data), root=tmp_path, run="r", tasks=["TERRa"])
    run_zeroshot(ZeroShotOptions(**opts), show_progress=False, loaded=tiny)
    val = data / "TERRa" / "val.jsonl"
    val.write_text("\n".join(val.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    with pytest.raises(RSGError, match=r"TERRa/val data_sha256: [0-9a-f]{12}… -> [0-9a-f]{12}…") as exc:
        run_zeroshot(ZeroShotOptions(**opts), show_progress=False, loaded=tiny)
    assert "out of --tasks" in str(exc.value)
    # A task not finished yet may be added: the folder still holds one configuration.
    res = run_zeroshot(ZeroShotOptions(**{**opts, "tasks": ["RCB"]}), show_progress=False, loaded=tiny)
    assert res.run.finished("val") == ["RCB", "TERRa"]


def test_a_template_that_fails_to_render_creates_nothing(tmp_path, monkeypatch):
    """Issue 10 item 6: a sandbox violation surfaces before the model loads, and no run folder is made."""
    import rsg_eval.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model must not load before the templates are checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    evil = tmp_path / "evil.yaml"
    evil.write_text(textwrap.dedent("""\
        task: TERRa
        template: "{{ premise.__class__.__mro__ }} {{ hypothesis }}"
        choices: {entailment: Да, not_entailment: Нет}
        """), encoding="utf-8")
    with pytest.raises(RSGError, match="sandbox"):
        run_zeroshot(ZeroShotOptions(model="tiny", data="sample", root=tmp_path / "runs", run="x",
                                     tasks=["TERRa"], template=str(evil)), show_progress=False)
    assert not (tmp_path / "runs").exists()
    # An empty answer text under --calibrate: the content-free render is checked too.
    empty = tmp_path / "empty.yaml"
    empty.write_text(textwrap.dedent("""\
        task: TERRa
        template: "{{ premise }} {{ hypothesis }}"
        choices: {entailment: "{{ premise[:0] }}", not_entailment: Нет}
        """), encoding="utf-8")
    with pytest.raises(RSGError, match="renders empty"):
        run_zeroshot(ZeroShotOptions(model="tiny", data="sample", root=tmp_path / "runs", run="x",
                                     tasks=["TERRa"], template=str(empty)), show_progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_truncated_log_is_detected_and_its_task_redone(tmp_path, tiny, capsys):
    """Issue 10 item 7: logs/val/RCB.jsonl cut to 3 of its 6 lines beside an intact state: resume redoes RCB
    (saying why) and metrics come from all 6 items again; until then metrics.json leaves RCB out."""
    from rich.console import Console

    first = _run(tmp_path, tiny, tasks=["TERRa", "RCB"])
    run = first.run
    n = first.metrics["counts"]["RCB"]
    log = run.logs_path("RCB", "val")
    good = log.read_bytes()
    lines = good.decode("utf-8").splitlines(keepends=True)
    log.write_text("".join(lines[: n // 2]), encoding="utf-8")
    assert not run.is_done("RCB", "val", run.read_state("RCB", "val")["fingerprint"])
    assert "truncated or edited" in run.task_problem("RCB", "val")
    m = run.compute_metrics("val")
    assert set(m["tasks"]) == {"TERRa"} and "truncated" in m["ignored"]["RCB"]
    out = io.StringIO()
    again = run_zeroshot(ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run="r", tasks=["TERRa", "RCB"]),
                         show_progress=False, loaded=tiny, console=Console(file=out, width=300))
    assert {o.task: o.status for o in again.outcomes} == {"TERRa": "skipped", "RCB": "done"}
    assert "RCB/val: logs/val/RCB.jsonl does not match its state" in out.getvalue()
    assert "redoing it" in out.getvalue()
    assert again.metrics["counts"]["RCB"] == n and log.read_bytes() == good
    # A predictions file edited by hand is caught the same way (it is what the zip would carry).
    pred = run.predictions_path("RCB", "val")
    first_line, rest = pred.read_text(encoding="utf-8").split("\n", 1)
    rec = json.loads(first_line)
    rec["label"] = "neutral" if rec["label"] != "neutral" else "entailment"
    pred.write_text(json.dumps(rec) + "\n" + rest, encoding="utf-8")
    assert "predictions/val/RCB.jsonl does not match its state" in run.task_problem("RCB", "val")


def test_cut_prompts_are_one_note_per_task_split_and_bars_show_an_eta(tmp_path):
    """Issue 23 items 2 and 7: few-shot prompts too long for the model were a UserWarning with a source path per
    shard; now one note per task split names it and what to do. The progress bars show the time left."""
    import dataclasses
    import warnings

    from rich.console import Console

    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model("tiny", device="cpu")
    loaded = dataclasses.replace(loaded, info=dict(loaded.info, max_input_tokens=12))
    buf = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_zeroshot(ZeroShotOptions(model="tiny", data="sample", root=tmp_path, run="cut", tasks=["TERRa"],
                                     split="all", num_fewshot=2, shard_size=2),
                     console=Console(file=buf, width=300), show_progress=True, loaded=loaded)
    out = buf.getvalue()
    notes = [ln for ln in out.splitlines() if "prompts are longer" in ln]
    n_val = len(load_items("sample", "TERRa", "val"))
    assert len(notes) == 2, out  # TERRa/val and TERRa/test, though each was scored in several shards
    assert notes[0].startswith(f"note: TERRa/val: {n_val} of {n_val} prompts are longer than the model's 12 input")
    assert "fewer --num-fewshot" in notes[0] and ".py" not in out
    # elapsed, then the time left, on the val bar and the test bar
    assert len(re.findall(r"TERRa/(?:val|test) .* \d+/\d+ \d:\d\d:\d\d ETA \d:\d\d:\d\d", out)) == 2, out
