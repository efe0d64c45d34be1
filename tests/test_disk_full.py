"""A full disk wherever a command writes (issue 10, item 4): one red line naming the file, exit status 2, no
traceback, no temporary or partial file left, and the same command resumes once there is space again.

The disk fills up by monkeypatching the lowest write call each path uses (os.fsync, safetensors' save,
torch.save) to fail the way a real full disk makes it fail: the exception types and texts below are what a
200 KB tmpfs produced on the development machine (OSError 28; SafetensorError "... (os error 28)"; torch.save's
RuntimeError "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import WriteError, atomic_write_text, write_failure

from tests.test_bad_input import cli

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _fail_at(n: int, exc: BaseException, real):
    """A stand-in for `real` that raises `exc` on its n-th call (1-based) and works otherwise."""
    calls = []

    def fake(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*a, **k)

    fake.calls = calls  # type: ignore[attr-defined]
    return fake


def _leftovers(folder: Path) -> list[str]:
    """Temporary or half-written things a writer could leave behind."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith((".tmp", ".new", ".old")) or ".tmp" in p.name or p.name.startswith(".last"))


def _one_red_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    return lines[-1]


def test_write_failure_knows_what_a_full_disk_looks_like(tmp_path, monkeypatch):
    safetensors = pytest.importorskip("safetensors")
    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")) == "the disk quota is exceeded"
    assert write_failure(safetensors.SafetensorError(SAFETENSORS_FULL)) == "the disk is full"
    try:  # a library error whose cause is the full disk
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert write_failure(outer) == "the disk is full"
    # torch's zip writer says nothing of the cause: the free space decides
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    assert write_failure(RuntimeError(TORCH_FULL), tmp_path) == "the disk is full (1 MiB free)"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    assert "may be full" in write_failure(RuntimeError(TORCH_FULL), tmp_path)
    # not storage conditions: left alone (they stay tracebacks, they are bugs)
    reader = "PytorchStreamReader failed reading zip archive: failed finding central directory"  # damaged, not full
    for exc in (OSError(errno.ENOENT, "No such file"), ValueError("x"), RuntimeError("CUDA out of memory"),
                RuntimeError(reader),
                safetensors.SafetensorError("Error while deserializing header: header too small")):
        assert write_failure(exc) is None


# ------------------------------------------------------------------------------------------- zero-shot

@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    from rsg_eval.models.loading import load_model

    torch.set_num_threads(1)
    return load_model("tiny", device="cpu")


@pytest.mark.slow
def test_zeroshot_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys, tiny):
    import rsg_eval.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)
    args = ["zeroshot", "--model", "tiny", "--data", "sample", "--tasks", "TERRa,RCB,PARus", "--split", "val",
            "--root", tmp_path, "-q"]
    real_fsync = os.fsync
    counting = _fail_at(0, OSError(), real_fsync)  # never fails: counts the writes of a whole run
    monkeypatch.setattr(os, "fsync", counting)
    code, out, err = cli(monkeypatch, capsys, *args, "--run", "clean")
    assert code == 0, out + err
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    middle = len(counting.calls) // 2 + 1  # the disk fills half-way through the same run

    monkeypatch.setattr(os, "fsync", _fail_at(middle, OSError(errno.ENOSPC, "No space left on device"), real_fsync))
    code, out, err = cli(monkeypatch, capsys, *args, "--run", "r")
    line = _one_red_line(err)
    assert code == 2 and "could not write this file: the disk is full" in line and str(tmp_path / "r") in line
    assert "run the same command again" in line
    assert _leftovers(tmp_path / "r") == []
    finished = sorted(p.name for p in (tmp_path / "r" / "state").glob("*.json"))
    assert finished and len(finished) < 3  # the failure hit mid-run: some tasks done, some not

    monkeypatch.setattr(os, "fsync", real_fsync)  # space again
    code, out, err = cli(monkeypatch, capsys, *args, "--run", "r")
    assert code == 0, out + err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["tasks"] == clean["tasks"]


# ------------------------------------------------------------------------------------------- fine-tuning

@pytest.mark.slow
def test_finetune_safetensors_full_disk_leaves_no_new_folder_and_resumes(tmp_path, monkeypatch, capsys, tiny):
    """The case of the issue: safetensors raises SafetensorError (not OSError) on a full disk, which used to
    escape as a traceback and leave an empty `last.new/`."""
    from safetensors import SafetensorError
    import safetensors.torch as st

    import rsg_eval.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: tiny)
    args = ["finetune", "--model", "tiny", "--data", "sample", "--tasks", "TERRa", "--epochs", "2", "-q"]
    code, out, err = cli(monkeypatch, capsys, *args, "--run", tmp_path / "clean", "--checkpoint-dir",
                         tmp_path / "ck-clean")
    assert code == 0, out + err
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())

    real, calls = st.save_model, []

    def full_at_third_save(model, filename, *a, **k):  # best, last, then the second last fails
        calls.append(filename)
        if len(calls) == 3:  # what a full disk leaves: a short file, then the error
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError(SAFETENSORS_FULL)
        return real(model, filename, *a, **k)

    monkeypatch.setattr(st, "save_model", full_at_third_save)
    code, out, err = cli(monkeypatch, capsys, *args, "--run", tmp_path / "r", "--checkpoint-dir", tmp_path / "ck")
    line = _one_red_line(err)
    assert code == 2 and "the disk is full" in line and str(tmp_path / "ck" / "TERRa") in line
    assert "intact" in line and "rerun" in line
    assert _leftovers(tmp_path / "ck") == [] and (tmp_path / "ck" / "TERRa" / "last").is_dir()

    monkeypatch.setattr(st, "save_model", real)
    code, out, err = cli(monkeypatch, capsys, *args, "--run", tmp_path / "r", "--checkpoint-dir", tmp_path / "ck")
    assert code == 0, out + err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["tasks"] == clean["tasks"]


def test_torch_save_full_disk_in_a_checkpoint(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from rsg_eval.models.tiny import build_tiny
    from rsg_eval.engine import checkpoint as ck

    model, _ = build_tiny()
    ck.write_checkpoint(tmp_path, "last", model, {"state": {"step": 1}}, extra={"x": torch.zeros(3)})

    def full(obj, fh, *a, **k):
        fh.write(b"PK\x03\x04 half a zip")
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ck.SaveError) as exc:
        ck.write_checkpoint(tmp_path, "last", model, {"state": {"step": 2}}, extra={"x": torch.zeros(3)})
    assert "the disk is full (1 MiB free)" in str(exc.value) and "'last' checkpoint in" in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ck.read_meta(tmp_path / "last")["state"]["step"] == 1
    # an interrupt mid-save removes the half-written folder too, and is not turned into an error
    monkeypatch.setattr(ck.torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ck.write_checkpoint(tmp_path, "last", model, {"state": {"step": 3}}, extra={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


# ------------------------------------------------------------------------------------------- other writers

def test_hierarchical_checkpoint_full_disk(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from safetensors import SafetensorError
    import safetensors.torch as st

    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.models.tiny import build_tiny

    base, tok = build_tiny()
    hier = HierarchicalT5.from_base(base, split=1, **head_labels())
    monkeypatch.setattr(st, "save_file", _fail_at(1, SafetensorError(SAFETENSORS_FULL), st.save_file))
    with pytest.raises(WriteError, match="the disk is full") as exc:
        hier.save_pretrained(tmp_path / "last", tokenizer=tok)
    assert exc.value.file == str(tmp_path / "last") and list(tmp_path.iterdir()) == []


def test_corpus_writer_full_disk(tmp_path, monkeypatch):
    from rsg_eval.corpus.build import write_jsonl_atomic

    monkeypatch.setattr(os, "fsync", _fail_at(1, OSError(errno.ENOSPC, "No space left on device"), os.fsync))
    with pytest.raises(WriteError) as exc:
        write_jsonl_atomic(tmp_path / "train.jsonl", ({"i": i} for i in range(10)))
    assert exc.value.file == str(tmp_path / "train.jsonl") and list(tmp_path.iterdir()) == []


def test_build_corpus_full_disk_in_the_dedup_index(tmp_path, monkeypatch, capsys):
    """SQLite's own full-disk error (SQLITE_FULL, "database or disk is full") from the near-duplicate index,
    made real by capping the index file at a few pages: one line naming the scratch folder, exit 2, no corpus
    file written; the same command then builds once there is room."""
    import sqlite3
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _corpus_utils import CONFIG
    from rsg_eval.corpus import cleaning

    real_init, real_connect = cleaning.KeyStore.__init__, sqlite3.connect

    def small_pages(*a, **k):
        con = real_connect(*a, **k)
        con.execute("PRAGMA page_size=512")   # before the table exists: a page then holds a few dozen keys
        return con

    def small_disk(self, *a, **k):
        monkeypatch.setattr(sqlite3, "connect", small_pages)
        real_init(self, *a, **k)
        monkeypatch.setattr(sqlite3, "connect", real_connect)
        pages = self.con.execute("PRAGMA page_count").fetchone()[0]
        self.con.execute(f"PRAGMA max_page_count={pages}")   # not one page more than the empty index

    out = tmp_path / "corpus"
    args = ("build-corpus", "-c", CONFIG, "-o", out, "--data", "sample", "-q")
    monkeypatch.setattr(cleaning.KeyStore, "__init__", small_disk)
    code, _, err = cli(monkeypatch, capsys, *args)
    line = _one_red_line(err)
    assert code == 2 and "the disk is full" in line and str(out / "work") in line, err
    # no corpus file, and the scratch files (stage, index) removed to give their space back
    assert not list(out.rglob("*.jsonl")) and not (out / "summary.json").exists()
    assert not (out / "work" / "stage").exists() and not (out / "work" / "dedup.sqlite").exists()
    monkeypatch.setattr(cleaning.KeyStore, "__init__", real_init)
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and (out / "summary.json").exists(), err


def test_report_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    from tests._report_utils import make_rows, write_run

    a = write_run(tmp_path, "a", {"TERRa": make_rows("TERRa", 20, 0.6)})
    monkeypatch.setattr(os, "fsync", _fail_at(2, OSError(errno.ENOSPC, "No space left on device"), os.fsync))
    code, out, err = cli(monkeypatch, capsys, "report", a, "--out", tmp_path / "o", "--bootstrap", "20",
                         "--format", "md,csv", "-q")
    line = _one_red_line(err)
    assert code == 2 and "the disk is full" in line and str(tmp_path / "o") in line
    assert not [p for p in (tmp_path / "o").rglob("*") if p.name.endswith(".tmp")]


def test_any_other_full_disk_is_still_one_line(tmp_path, monkeypatch, capsys):
    """The CLI's last net: a full disk that no writer turned into an RSGError (here inside `rsg score`)."""
    import rsg_eval.commands.score as score

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "somewhere"))

    monkeypatch.setattr(score, "score_predictions", boom)
    code, out, err = cli(monkeypatch, capsys, "score", tmp_path, "--data", "sample")
    line = _one_red_line(err)
    assert code == 2 and "the disk is full" in line and str(tmp_path / "somewhere") in line


def test_plain_write_of_a_full_disk_names_the_file(tmp_path, monkeypatch):
    f = tmp_path / "x.json"
    monkeypatch.setattr(os, "fsync", _fail_at(1, OSError(errno.EDQUOT, "Disk quota exceeded"), os.fsync))
    with pytest.raises(RSGError, match="disk quota is exceeded") as exc:
        atomic_write_text(f, "{}")
    assert exc.value.file == str(f) and list(tmp_path.iterdir()) == []
