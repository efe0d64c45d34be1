"""Hostile input, round 3 (issue 22): each item of the issue, and a seeded fuzz over every JSON and YAML reader.

Each test feeds the crafted input the issue names and checks the one line (RSGError, exit status 2) or the safe
behaviour the docs promise (docs/bad-input.md). In-process CLI calls (tests.test_bad_input.cli) where a command is
checked; real processes only for signals."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from rsg_eval import runs
from rsg_eval.core import io as rio
from rsg_eval.core.data import SAMPLE_DIR, check_folder, load_items, resolve_data, safe_extract
from rsg_eval.core.errors import RSGError
from rsg_eval.core.tasks import parse_records
from rsg_eval.runs import FolderLock, RunFolder, run_path
from tests.test_bad_input import cli

REPO = Path(__file__).resolve().parents[1]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi"))


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail (instead of hanging the suite) when the block runs past `seconds`: the old code spun or blocked."""
    def boom(*_):
        raise AssertionError(f"took over {seconds} s: hangs")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(err: str) -> str:
    """The error line of a CLI run's stderr; asserts there is exactly one and no traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ 1, 11: run folders

def test_run_dotdot_is_refused_and_restart_deletes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "mine.txt").write_text("my notes")
    (tmp_path / "config.json").write_text('{"project": "mine"}')
    (tmp_path / "submissions").mkdir()
    for run in ("..", ".", "./", str(tmp_path)):
        code, _, err = cli(monkeypatch, capsys, "zeroshot", "--model", "tiny", "--data", "sample", "--tasks",
                           "TERRa", "--split", "val", "--run", run, "--restart", "-q")
        assert code == 2, (run, err)
        assert "field '--run'" in one_line(err)
    assert (tmp_path / "logs" / "mine.txt").read_text() == "my notes"
    assert json.loads((tmp_path / "config.json").read_text()) == {"project": "mine"}
    # a folder holding other files (no marker): never written into, never cleared
    other = tmp_path / "submissions" / "other"
    other.mkdir()
    (other / "state").mkdir()
    (other / "state" / "keep.json").write_text("{}")
    code, _, err = cli(monkeypatch, capsys, "zeroshot", "--model", "tiny", "--data", "sample", "--tasks", "TERRa",
                       "--split", "val", "--run", "other", "--restart", "-q")
    assert code == 2 and "no .rsg-run marker" in one_line(err)
    assert (other / "state" / "keep.json").is_file()


def test_a_run_folder_carries_the_marker_and_old_run_folders_are_still_accepted(tmp_path):
    folder = RunFolder(tmp_path / "r")
    with folder.claim("zeroshot", {"model": "m"}):
        folder.write_config({"model": "m"})
    assert (tmp_path / "r" / runs.RUN_MARKER).is_file()
    (tmp_path / "r" / runs.RUN_MARKER).unlink()  # a folder from before the marker: its config.json is ours
    with RunFolder(tmp_path / "r").claim("zeroshot", {"model": "m"}):
        pass
    assert (tmp_path / "r" / runs.RUN_MARKER).is_file()
    # a claim that creates a folder and writes nothing leaves nothing behind (marker included)
    with RunFolder(tmp_path / "new").claim("zeroshot", {"model": "m"}):
        pass
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("make", ["long", "dangling", "self", "proc", "root"])
def test_bad_run_names_are_one_line(tmp_path, monkeypatch, make):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "submissions"
    root.mkdir()
    name = {"long": "x" * 300, "dangling": "d", "self": "s", "proc": "/proc/x", "root": str(root)}[make]
    if make == "dangling":
        (root / "d").symlink_to(tmp_path / "nowhere")
    if make == "self":
        (root / "s").symlink_to(root / "s")
    with pytest.raises(RSGError) as exc:
        run_path(name, root=root)
    assert exc.value.field == "--run"
    assert {"long": "255", "dangling": "symbolic link to nothing", "self": "symbolic link to nothing",
            "proc": "kernel file system", "root": "--root itself"}[make] in str(exc.value)


# ------------------------------------------------------------------------------ 2, 12: the lock

@pytest.mark.parametrize("kind", ["dangling symlink", "symlink to a file", "folder", "fifo"])
def test_a_lock_that_is_not_a_lock_file_is_one_line_and_never_spins(tmp_path, kind):
    lock = tmp_path / runs.LOCK_NAME
    if kind == "dangling symlink":
        lock.symlink_to(tmp_path / "gone")
    elif kind == "symlink to a file":
        (tmp_path / "precious").write_text("keep me")
        lock.symlink_to(tmp_path / "precious")
    elif kind == "folder":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    with deadline(10), pytest.raises(RSGError, match="the lock file is .*not a lock this tool wrote"):
        FolderLock(tmp_path).acquire()
    assert os.path.lexists(lock)
    if kind == "symlink to a file":
        assert (tmp_path / "precious").read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_lock_is_one_line(tmp_path):
    lock = tmp_path / runs.LOCK_NAME
    lock.write_text("{}")
    lock.chmod(0)
    with deadline(10), pytest.raises(RSGError, match="cannot read"):
        FolderLock(tmp_path).acquire()


@pytest.mark.parametrize("pid", [10 ** 20, -5, "12", True])
def test_a_lock_with_an_impossible_pid_is_taken_over(tmp_path, pid):
    (tmp_path / runs.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with deadline(10):
        lock = FolderLock(tmp_path).acquire()
    assert lock.held and FolderLock(tmp_path).holder()["pid"] == os.getpid()
    lock.release()


# ------------------------------------------------------------------------------ 3: few-shot K

def test_fewshot_k_beyond_the_pool_draws_each_group_once():
    from rsg_eval.core.fewshot import draw_shots, load_pool

    pool = load_pool(resolve_data("sample"), "TERRa")
    item = load_items("sample", "TERRa", "val")[0]
    with deadline(10):
        shots = draw_shots(pool, item, 10 ** 6, seed=0)
    keys = [s.key for s in shots]
    assert len(keys) == len(set(keys)) == len(pool) - len(pool.by_identity.get(
        __import__("rsg_eval.core.fewshot", fromlist=["identity"]).identity("TERRa", item.fields), ()))
    assert draw_shots(pool, item, 10 ** 6, seed=0) == shots  # deterministic
    assert draw_shots(pool, item, 2, seed=0) == draw_shots(pool, item, 2, seed=0)


class CountingTokenizer:
    """A real tokenizer that counts its calls and the characters it was given."""

    _tok = None

    def __init__(self) -> None:
        from rsg_eval.models.tiny import build_tiny_tokenizer

        if CountingTokenizer._tok is None:
            CountingTokenizer._tok = build_tiny_tokenizer()
        self.tok, self.calls, self.chars = CountingTokenizer._tok, 0, 0

    def __call__(self, text: str, **kw):
        self.calls += 1
        self.chars += len(text)
        return self.tok(text, **kw)


def test_fewshot_fit_is_found_by_bisection_with_bounded_text():
    from rsg_eval.core.prompts import _n_tokens, load_template, render_fewshot

    tpl = load_template("TERRa")
    item = load_items("sample", "TERRa", "val")[0]
    shots = [f"Пример номер {i}: снег шёл весь день. Да" for i in range(1000)]
    for n_shots, max_tokens in ((1000, 256), (5, 256), (1000, 64), (3, 10_000)):
        tok = CountingTokenizer()
        r, kept = render_fewshot(tpl, item, shots[:n_shots], tokenizer=tok, max_tokens=max_tokens)
        # the count the old one-by-one loop found: the most shots that fit (kept fit, one more does not)
        main = tpl._render_main(dict(item.fields))

        def fits(n: int) -> bool:
            return _n_tokens(tok.tok, tpl.prefix + tpl.fewshot_separator.join([*shots[:n], main])) <= max_tokens

        assert (kept == 0 or fits(kept)) and (kept == n_shots or not fits(kept + 1)), (n_shots, max_tokens, kept)
        assert kept == 0 or r.prompt.endswith(main)
        assert tok.calls <= 12, tok.calls  # was one tokenisation per dropped shot (996 here)
        assert tok.chars <= 12 * (max_tokens * 32 + 500)


# ------------------------------------------------------------------------------ 4: templates

@pytest.mark.parametrize("body,words", [
    ("{{ (premise.encode() * 10**8)|length }}", "multiplied a sequence of"),
    ("{{ premise.encode() + premise.encode() * 10000 }}", "multiplied a sequence of"),
    ("{{ [].pop() }}", "the template failed: IndexError"),
    ("{{ {}.popitem() }}", "the template failed: KeyError"),
    ("{{ premise|xmlattr }}", "the template failed: AttributeError"),
    ("{{ ('x' * 99999).replace('', 'y' * 99999) }}", "with replace"),
    ("{{ ('x' * 99999).join(['a', 'b', 'c']) }}", "with join"),
])
def test_template_bytes_are_bounded_and_every_failure_is_one_line(tmp_path, body, words):
    from rsg_eval.core.prompts import load_template
    from tests.test_limits import _template, _terra_item

    tpl = load_template("TERRa", str(_template(tmp_path, body)))
    with deadline(10), pytest.raises(RSGError) as exc:
        tpl.render(_terra_item())
    assert exc.value.field == "template" and words in str(exc.value)


# ------------------------------------------------------------------------------ 5: YAML alias bombs

def _yaml_readers(tmp_path: Path):
    """Every YAML the tool reads: (name, callable(path))."""
    from rsg_eval.corpus.config import load_config
    from rsg_eval.core.prompts import load_template
    from rsg_eval.report.load import load_any
    from rsg_eval.training.finetune.config import load_config_set

    return [
        ("template", lambda p: load_template("TERRa", str(p))),
        ("fine-tuning config", lambda p: load_config_set(p, {})),
        ("corpus config", lambda p: load_config(p)),
        ("report score file", lambda p: load_any(str(p), "val")),
        ("io.read_yaml (published files)", lambda p: rio.read_yaml(p)),
    ]


def test_yaml_alias_bombs_are_refused_by_every_yaml_reader(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    for name, read in _yaml_readers(tmp_path):
        t = time.perf_counter()
        with pytest.raises(RSGError, match="RSG_MAX_YAML_NODES") as exc:
            read(bomb)
        assert time.perf_counter() - t < 5, name
        assert "bomb.yaml" in str(exc.value), name
    # ordinary aliases still work
    ok = tmp_path / "ok.yaml"
    ok.write_text("a: &a {x: 1}\nb: *a\n")
    assert rio.read_yaml(ok) == {"a": {"x": 1}, "b": {"x": 1}}


# ------------------------------------------------------------------------------ 6, 7, 9: JSON readers, fuzzed

def _payloads(rng: random.Random) -> list[tuple[str, str]]:
    """(what, JSON text) crafted values: deep nesting, huge integers, wrong types, lone surrogates."""
    depth = rng.randint(150, 6000)
    out = [("deep list", "[" * depth + "]" * depth),
           ("deep object", '{"a":' * depth + "1" + "}" * depth),
           ("huge integer", "9" * rng.randint(4301, 9000)),
           ("lone surrogate", '"a\\ud800b"'),
           ("lone low surrogate", '"\\udfff"')]
    return out


def _json_entry_points(tmp_path: Path):
    """Every JSON the tool reads: (name, file name, wrap(value_text) -> file text, read(path))."""
    from rsg_eval.corpus.readers import iter_rows
    from rsg_eval.corpus.records import Problems
    from rsg_eval.corpus.load import read_labels
    from rsg_eval.models.hierarchical import read_hmtl_config
    from rsg_eval.models.weight_files import check_model_config, check_weight_file
    from rsg_eval.report.load import load_any
    from rsg_eval.core.submission import read_predictions

    def data(p):
        load_items(p, "TERRa", "val")

    def corpus(p):
        problems = Problems(strict=True)
        list(iter_rows(p, problems, "src"))

    def safetensors(p):
        check_weight_file(p, hint="h")

    def lock(p):
        rec = FolderLock(p.parent).holder()
        if rec == {}:  # unreadable lock: taken for one being written; never an exception
            raise RSGError("unreadable")

    return [
        ("data line", "val.jsonl", lambda v: '{"idx": 0, "premise": %s, "hypothesis": "h", "label": "entailment"}\n' % v,
         data),
        ("data idx", "val.jsonl", lambda v: '{"idx": %s, "premise": "p", "hypothesis": "h", "label": "entailment"}\n' % v,
         data),
        ("predictions", "TERRa.jsonl", lambda v: '{"idx": %s, "label": "entailment"}\n' % v,
         lambda p: read_predictions(p, "TERRa")),
        ("run config.json", "config.json", lambda v: '{"model": %s}' % v, lambda p: RunFolder(p.parent).read_config()),
        ("run config.json as a value", "config.json", lambda v: v, lambda p: RunFolder(p.parent).read_config()),
        ("metrics.json", "metrics.json", lambda v: '{"split": "val", "tasks": {"TERRa": {"acc": %s}}}' % v,
         lambda p: load_any(str(p.parent), "val")),
        ("state", "TERRa.val.json", lambda v: '{"files": %s}' % v,
         lambda p: RunFolder(p.parent.parent).read_state("TERRa", "val")),
        ("model config.json", "config.json", lambda v: '{"vocab_size": %s}' % v, lambda p: check_model_config(p.parent)),
        ("safetensors header", "model.safetensors", None, safetensors),
        ("corpus source", "rows.jsonl", lambda v: '{"text": %s}\n' % v, corpus),
        ("hmtl labels.json", "labels.json", lambda v: '{"mc": %s}' % v, lambda p: read_labels(p.parent)),
        ("hmtl_config.json", "hmtl_config.json", lambda v: '{"heads": %s}' % v, lambda p: read_hmtl_config(p.parent)),
        ("rsg.lock", runs.LOCK_NAME, lambda v: '{"pid": %s}' % v, lock),
        ("report score file", "scores.json", lambda v: '{"name": "x", "tasks": {"TERRa": %s}}' % v,
         lambda p: load_any(str(p), "val")),
    ]


def _write_entry(path: Path, name: str, wrap, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if name == "model.safetensors":
        header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": %s}' % value).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        return
    path.write_text(wrap(value), encoding="utf-8")


def test_every_json_reader_gives_one_line_for_crafted_values(tmp_path, monkeypatch):
    """Seeded fuzz: each JSON entry point x each crafted value -> RSGError (one line), never another exception."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(22)
    t0 = time.perf_counter()
    cases = 0
    for i, (name, fname, wrap, read) in enumerate(_json_entry_points(tmp_path)):
        for what, value in _payloads(rng):
            folder = tmp_path / f"{i}-{what.replace(' ', '-')}"
            path = folder / ("state" if fname.endswith(".val.json") else "") / fname
            if name in ("metrics.json",):
                (folder / "logs").mkdir(parents=True, exist_ok=True)
            _write_entry(path, fname, wrap, value)
            cases += 1
            try:
                with deadline(20):
                    got = read(path)
            except RSGError as exc:
                text = str(exc)
                assert "\n" not in text and len(text) < 2000, (name, what, text[:300])
                continue
            except Exception as exc:  # noqa: BLE001 - the point of the test
                raise AssertionError(f"{name} / {what}: {type(exc).__name__}: {str(exc)[:200]}") from None
            if name == "safetensors header":  # a readable header with a crafted __metadata__: loadable or named
                continue
            if name == "report score file":  # a run without a number for TERRa is a valid report input
                continue
            raise AssertionError(f"{name} / {what}: accepted ({str(got)[:100]})")
    assert cases >= 60 and time.perf_counter() - t0 < 30


def test_wrong_json_types_are_named_with_their_field(tmp_path):
    rng = random.Random(7)
    values = [5, "x", [], {}, None, True, 1.5]
    for _ in range(30):
        rec = {"idx": 0, "passage": {"text": "Иван @highlight Пётр", "entities": [{"start": 0, "end": 4}]},
               "qas": [{"query": "@placeholder ушёл", "answers": [{"text": "Иван"}], "idx": 0}]}
        where = rng.choice(["qas", "qas[0]", "answers", "answers[0]", "entities", "entities[0]", "passage"])
        v = rng.choice(values)
        if where == "qas":
            rec["qas"] = v
        elif where == "qas[0]":
            rec["qas"] = [v]
        elif where == "answers":
            rec["qas"][0]["answers"] = v
        elif where == "answers[0]":
            rec["qas"][0]["answers"] = [v]
        elif where == "entities":
            rec["passage"]["entities"] = v
        elif where == "entities[0]":
            rec["passage"]["entities"] = [v]
        else:
            rec["passage"] = v
        try:
            parse_records("RuCoS", "val", [(3, rec)], "RuCoS.jsonl")
        except RSGError as exc:
            assert str(exc).startswith("RuCoS.jsonl:3: field '"), str(exc)


def test_a_string_idx_of_5000_digits_is_named(tmp_path):
    from rsg_eval.core.submission import read_predictions

    f = tmp_path / "TERRa.jsonl"
    f.write_text('{"idx": "%s", "label": "entailment"}\n' % ("1" * 5000))
    with pytest.raises(RSGError) as exc:
        read_predictions(f, "TERRa")
    assert exc.value.field == "idx" and "is not an integer" in str(exc.value) and len(str(exc.value)) < 300


# ------------------------------------------------------------------------------ 8: RuCoS element types

@pytest.mark.parametrize("mutate,field", [
    (lambda r: r.update(qas=[5]), "qas[0]"),
    (lambda r: r.update(qas=["a query"]), "qas[0]"),
    (lambda r: r["qas"][0].update(answers=["Иван"]), "qas[0].answers[0]"),
    (lambda r: r["qas"][0].update(answers=[7]), "qas[0].answers[0]"),
    (lambda r: r["passage"].update(entities=[3]), "passage.entities[0]"),
])
def test_rucos_list_elements_of_the_wrong_type_are_named(mutate, field):
    rec = {"idx": 0, "passage": {"text": "Иван @highlight Пётр", "entities": [{"start": 0, "end": 4}]},
           "qas": [{"query": "@placeholder ушёл", "answers": [{"text": "Иван"}], "idx": 0}]}
    mutate(rec)
    with pytest.raises(RSGError) as exc:
        parse_records("RuCoS", "val", [(1, rec)], "RuCoS.jsonl")
    assert exc.value.field == field and exc.value.line == 1


# ------------------------------------------------------------------------------ 9: surrogates at read time

def test_a_lone_surrogate_is_named_by_rsg_data_check(tmp_path, monkeypatch, capsys):
    shutil.copytree(SAMPLE_DIR / "TERRa", tmp_path / "d" / "TERRa")
    f = tmp_path / "d" / "TERRa" / "val.jsonl"
    lines = f.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace('"premise": "', '"premise": "a\\ud800b', 1)
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = {(r["task"], r["split"]): r for r in check_folder(tmp_path / "d", ["TERRa"])}
    assert "val.jsonl:2: field 'premise': a lone surrogate" in rows[("TERRa", "val")]["error"]
    code, out, err = cli(monkeypatch, capsys, "zeroshot", "--model", "tiny", "--data", str(tmp_path / "d"),
                         "--tasks", "TERRa", "--split", "val", "--run", str(tmp_path / "r"), "-q")
    assert code == 2 and "lone surrogate" in one_line(err)
    assert "loading model" not in out + err  # named before the model loads


# ------------------------------------------------------------------------------ 10: signals in zero-shot

def _python(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_while_rsg_starts_is_one_line_and_no_traceback(sig, code):
    # as the `rsg` program: the handler is in place before the command modules (and torch) import
    proc = _python(f"""
        import os, signal, sys
        sys.argv = ["rsg", "zeroshot", "--model", "tiny"]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import rsg_eval.cli
        os.kill(os.getpid(), signal.{sig})
        import time; time.sleep(30)
    """)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip() == "rsg: interrupted while starting; nothing was written", proc.stderr[-2000:]
    # the zero-shot command's own heavy imports (torch) run under the same kind of handler
    proc = _python(f"""
        import os, signal
        from rsg_eval.commands._common import startup_signals
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with startup_signals("rsg zeroshot"):
            os.kill(os.getpid(), signal.{sig})
            import time; time.sleep(30)
    """)
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == "rsg zeroshot: interrupted while starting; nothing was written"


@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny", device="cpu")


def test_sigterm_during_zeroshot_keeps_finished_work_releases_the_lock_and_exits_143(tmp_path, monkeypatch, capsys,
                                                                                    tiny):
    from rsg_eval.eval import zeroshot

    monkeypatch.setattr(zeroshot, "load_model", lambda *a, **k: tiny, raising=False)
    real, calls = zeroshot._score_job, []

    def score_then_term(job, *a, **k):
        calls.append(job.task)
        if len(calls) == 2:  # a real SIGTERM, delivered to this process while the second task split is scored
            os.kill(os.getpid(), signal.SIGTERM)
        return real(job, *a, **k)

    def unhandled(*_):  # what SIGTERM did before: here an error instead of killing the test run
        raise AssertionError("SIGTERM reached the default handler")

    monkeypatch.setattr(zeroshot, "_score_job", score_then_term)
    old = signal.signal(signal.SIGTERM, unhandled)
    monkeypatch.setattr(signal, "_rsg_test_restore", old, raising=False)
    monkeypatch.setattr("rsg_eval.models.loading.load_model", lambda *a, **k: tiny)
    code, out, err = cli(monkeypatch, capsys, "zeroshot", "--model", "tiny", "--data", "sample", "--tasks",
                         "TERRa,RCB,PARus", "--split", "val", "--run", str(tmp_path / "r"), "-q")
    assert code == 143, out + err
    assert "Traceback" not in err and "rerun the same command to resume" in out + err
    assert not (tmp_path / "r" / runs.LOCK_NAME).exists()  # released (the folder, empty, is removed with it)
    assert RunFolder(tmp_path / "r").finished("val") == ["TERRa"]
    assert signal.getsignal(signal.SIGTERM) is unhandled  # handed back
    signal.signal(signal.SIGTERM, old)


# ------------------------------------------------------------------------------ 13: model folders

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("model") / "ok"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("change,words", [
    ({"vocab_size": "many"}, "field 'vocab_size': 'many' is not a model size"),
    ({"vocab_size": -1}, "field 'vocab_size': -1 is not a model size"),
    ({"vocab_size": 2_000_000_000, "d_model": 100_000}, "field 'vocab_size': 2000000000 is not a model size"),
    ({"vocab_size": 16_000_000, "d_model": 100_000}, "does not describe these weights"),
    ({"num_heads": True}, "field 'num_heads'"),
    ({"d_model": 32}, "the weights do not match config.json: size mismatch"),
])
def test_a_model_config_with_absurd_or_mistyped_sizes_is_one_line(tmp_path, tiny_folder, change, words):
    from rsg_eval.models.loading import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with deadline(60), pytest.raises(RSGError) as exc:
        load_model(folder, device="cpu")
    assert words in str(exc.value) and "config.json" in str(exc.value)


@pytest.mark.parametrize("entry,words", [
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, "data_offsets [0, '4']"),
    ({"dtype": "F32", "shape": [1], "data_offsets": 4}, "data_offsets 4 "),
    ({"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 4]}, "needs"),
    ({"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}, "shape ['1']"),
    ({"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
])
def test_a_crafted_safetensors_header_is_named_not_a_typeerror(tmp_path, tiny_folder, entry, words):
    from rsg_eval.models.loading import load_model

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    header = json.dumps({"w": entry}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(RSGError) as exc:
        load_model(folder, device="cpu")
    assert "model.safetensors: not a loadable weights file: tensor 'w'" in str(exc.value) and words in str(exc.value)


# ------------------------------------------------------------------------------ 14: data zips

def _zip_with(path: Path, *, flag: int = 0, method: int | None = None, name: str = "TERRa/val.jsonl") -> Path:
    body = (SAMPLE_DIR / "TERRa" / "val.jsonl").read_bytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(name, body)
    raw = bytearray(path.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        i = raw.index(sig)
        struct.pack_into("<H", raw, i + flag_at, struct.unpack_from("<H", raw, i + flag_at)[0] | flag)
        if method is not None:
            struct.pack_into("<H", raw, i + method_at, method)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("kind,words", [("encrypted", "is encrypted"), ("aes", "compression method 99"),
                                        ("deflate64", "compression method 9")])
def test_a_data_zip_with_encrypted_or_unreadable_members_is_one_line(tmp_path, monkeypatch, capsys, kind, words):
    z = _zip_with(tmp_path / "x.zip", flag=1 if kind == "encrypted" else 0,
                  method={"encrypted": None, "aes": 99, "deflate64": 9}[kind])
    with pytest.raises(RSGError, match=words):
        safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    code, _, err = cli(monkeypatch, capsys, "data", "check", "--data", str(z))
    assert code == 2 and "x.zip: zip member 'TERRa/val.jsonl' " in one_line(err) and words in one_line(err)
    # the prediction-zip reader says the same
    from rsg_eval.core.submission import read_submission_texts

    sub = _zip_with(tmp_path / "s.zip", flag=1 if kind == "encrypted" else 0,
                    method={"encrypted": None, "aes": 99, "deflate64": 9}[kind], name="submission/TERRa.jsonl")
    with pytest.raises(RSGError, match=words):
        read_submission_texts(sub)


# ------------------------------------------------------------------------------ 15: FIFOs and folders as task files

@pytest.mark.parametrize("task,rel", [("LiDiRus", "LiDiRus/LiDiRus.jsonl"), ("TERRa", "TERRa/val.jsonl")])
@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_task_file_that_is_a_fifo_or_a_folder_is_one_line(tmp_path, monkeypatch, capsys, task, rel, kind):
    shutil.copytree(SAMPLE_DIR / task, tmp_path / "d" / task)
    f = tmp_path / "d" / rel
    f.unlink()
    os.mkfifo(f) if kind == "fifo" else f.mkdir()
    what = "a FIFO (named pipe), not a file" if kind == "fifo" else "a folder, not a file"
    split = "test" if task == "LiDiRus" else "val"
    with deadline(20):
        with pytest.raises(RSGError, match=what.replace("(", r"\(").replace(")", r"\)")):
            load_items(tmp_path / "d", task, split)
        code, _, err = cli(monkeypatch, capsys, "zeroshot", "--model", "tiny", "--data", str(tmp_path / "d"),
                           "--tasks", task, "--split", split, "--run", str(tmp_path / "r"), "-q")
    assert code == 2 and what in one_line(err) and rel in one_line(err)
    with deadline(20):  # every reader: prediction files too
        from rsg_eval.core.submission import read_submission_texts

        (tmp_path / "p").mkdir()
        p = tmp_path / "p" / f"{task}.jsonl"
        os.mkfifo(p) if kind == "fifo" else p.mkdir()
        with pytest.raises(RSGError, match="not a file"):
            read_submission_texts(tmp_path / "p")


# ------------------------------------------------------------------------------ 16: limits out of range

@pytest.mark.parametrize("value", ["1" + "0" * 26, "9" * 5000, "-3", "many"])
def test_a_limit_out_of_range_is_one_line_naming_the_variable(monkeypatch, capsys, value):
    monkeypatch.setenv("RSG_MAX_LINE_BYTES", value)
    code, _, err = cli(monkeypatch, capsys, "data", "check", "--data", "sample", "--tasks", "TERRa")
    line = one_line(err)
    assert code == 2 and "RSG_MAX_LINE_BYTES=" in line and "is not a positive integer of at most 1,000,000,000,000,000" \
        in line and len(line) < 400


# ------------------------------------------------------------------------------ 17: score on an empty zip

def test_score_on_a_zip_without_task_files_exits_2(tmp_path, monkeypatch, capsys):
    z = tmp_path / "s.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("notes.txt", "nothing here")
    code, out, err = cli(monkeypatch, capsys, "score", str(z), "--data", "sample", "--split", "val")
    assert code == 2 and "s.zip: no <Task>.jsonl prediction files in the zip" in one_line(err)


# ------------------------------------------------------------------------------ 18, 20: reports

@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny):
    from rsg_eval.eval.zeroshot import ZeroShotOptions, run_zeroshot

    root = tmp_path_factory.mktemp("runs")
    run_zeroshot(ZeroShotOptions(model="tiny", data="sample", split="val", root=root, run="r"),  # all nine: a total
                 show_progress=False, loaded=tiny)
    return root / "r"


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_report_on_a_list_config_or_a_word_for_a_metric(tmp_path, monkeypatch, capsys, small_run):
    run = _copy_run(small_run, tmp_path / "a")
    (run / "config.json").write_text("[1, 2]")
    code, _, err = cli(monkeypatch, capsys, "report", str(run), "--out", str(tmp_path / "o"))
    assert code == 2 and "a/config.json: not valid JSON (a JSON list instead of an object)" in one_line(err)
    run = _copy_run(small_run, tmp_path / "b")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["tasks"]["TERRa"]["acc"] = "high"
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = cli(monkeypatch, capsys, "report", str(run), "--out", str(tmp_path / "o"))
    assert code == 0 and "Traceback" not in err
    assert "not the metrics this tool writes: field 'tasks.TERRa.acc': 'high' is not a number" in out + err
    assert "rebuilt from the logs" in out + err


def test_report_messages_config_of_braces_expected_once_and_edited_metrics(tmp_path, monkeypatch, capsys, small_run):
    run = _copy_run(small_run, tmp_path / "a")
    (run / "config.json").write_text("{}")
    code, out, err = cli(monkeypatch, capsys, "report", str(run), "--out", str(tmp_path / "o"))
    assert code == 0 and "config.json records nothing ({})" in out + err and "no config.json" not in out + err
    # a hand-edited metrics.json is said, with the numbers, task and total alike
    run = _copy_run(small_run, tmp_path / "b")
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["tasks"]["TERRa"]["acc"] = 0.99
    metrics["total"] = 0.5
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = cli(monkeypatch, capsys, "report", str(run), "--out", str(tmp_path / "o"))
    assert code == 0
    assert "b TERRa: metrics.json disagrees with the logs (acc 0.99 (logs:" in out + err
    assert "b: metrics.json's total 0.5000 disagrees with the logs (" in out + err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(monkeypatch, capsys, "report", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert code == 2 and one_line(err).count("(expected:") == 1


# ------------------------------------------------------------------------------ 19: build-corpus sources

def test_corpus_sources_skip_bad_utf8_and_long_lines_and_clip_warnings(tmp_path, monkeypatch):
    from rsg_eval.corpus.brat import read_brat_doc
    from rsg_eval.corpus.readers import iter_rows
    from rsg_eval.corpus.records import Problems

    src = tmp_path / "rows.jsonl"
    src.write_bytes(b'{"text": "one"}\n{"text": "bad \xff byte"}\n{"text": "' + b"x" * 5000 + b'"}\n{"text": "four"}\n')
    monkeypatch.setenv("RSG_MAX_LINE_BYTES", "1000")
    problems = Problems()
    rows = [(line, row["text"]) for _, line, row in iter_rows(src, problems, "s")]
    assert rows == [(1, "one"), (4, "four")]
    assert problems.counts["s"] == 2
    assert "rows.jsonl:2: not UTF-8 text" in problems.messages[0]
    assert "rows.jsonl:3: line too long (limit 1,000 bytes" in problems.messages[1]
    for name in ("rows.csv", "rows.tsv"):  # tables too
        (tmp_path / name).write_bytes(b"text\none\nbad \xff\nfour\n")
        problems = Problems()
        assert [r["text"] for _, _, r in iter_rows(tmp_path / name, problems, "s")] == ["one", "four"]
        assert problems.counts["s"] == 1
    # an entity of 100,000 fragments: its warning is one bounded line
    (tmp_path / "d.txt").write_text("слово " * 10)
    frags = ";".join(f"{i} {i + 1}" for i in range(0, 200_000, 2))
    (tmp_path / "d.ann").write_text(f"T1\tPER {frags}\tслово\n")
    problems = Problems()
    assert read_brat_doc(tmp_path / "d.txt", tmp_path / "d.ann", types=None, type_map=None, discontinuous="span",
                         problems=problems, source="s") is None
    assert len(problems.messages) == 1 and len(problems.messages[0]) < 1000 and "characters) ..." in \
        problems.messages[0]
    # a brat offset of 5,000 digits: named, not int()'s ValueError
    (tmp_path / "d.ann").write_text(f"T1\tPER 0 {'9' * 5000}\tслово\n")
    problems = Problems()
    read_brat_doc(tmp_path / "d.txt", tmp_path / "d.ann", types=None, type_map=None, discontinuous="span",
                  problems=problems, source="s")
    assert "bad offsets" in problems.messages[0]


# ------------------------------------------------------------------------------ 20: read-only file system

def test_a_read_only_file_system_says_so_not_free_some_space(tmp_path):
    err = rio.storage_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "metrics.json")
    assert err is not None and "the file system is read-only" in str(err)
    assert "Free some space" not in str(err) and "Write elsewhere" in str(err)
    full = rio.storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "m.json")
    assert "Free some space" in str(full)


@pytest.mark.slow
def test_under_torchrun_a_killed_process_is_named_and_the_lock_released(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, time
        from pathlib import Path
        from rsg_eval.commands._common import stop_signals
        from rsg_eval.core.errors import Terminated
        from rsg_eval.runs import RunFolder
        from rsg_eval.engine.runtime import gone_peers, init_from_env

        d = init_from_env(timeout_s=60)
        out = Path({str(tmp_path)!r})
        if d.rank == 1:
            time.sleep(1)
            os.kill(os.getpid(), signal.SIGKILL)   # as the OOM killer would
        run = RunFolder(out / "r")
        try:
            with stop_signals(), run.claim("zeroshot", {{"model": "m"}}):
                time.sleep(60)                      # torchrun sends SIGTERM when rank 1 dies
        except Terminated:
            (out / "said.txt").write_text(gone_peers() or "nobody named")
            sys.exit(143)
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert (tmp_path / "said.txt").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    said = (tmp_path / "said.txt").read_text()
    assert said.startswith("process 1 of 2 (PID ") and "is gone (killed, or out of memory)" in said, said
    assert not (tmp_path / "r" / runs.LOCK_NAME).exists()  # released (the folder, empty, is removed with it)
