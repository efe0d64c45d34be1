"""Atomic writes: all or nothing, and the usual file mode."""

import os
import stat

import pytest

from rsg_eval.core.io import atomic_write_json, atomic_write_text, read_jsonl
from rsg_eval.core.errors import RSGError


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    f = tmp_path / "a" / "x.json"
    atomic_write_json(f, {"a": 1})
    atomic_write_text(f, "new\n")
    assert f.read_text() == "new\n"
    assert [p.name for p in f.parent.iterdir()] == ["x.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "x.txt"
    atomic_write_text(f, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(RSGError, match="the disk is full") as exc:  # one line naming the file, not an OSError
        atomic_write_text(f, "new")
    assert exc.value.file == str(f) and "run the same command again" in str(exc.value)
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_read_jsonl_bom_crlf_and_errors(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert read_jsonl(f) == [(1, {"a": 1}), (3, {"a": 2})]
    f.write_bytes(b'{"a": 1}\n{"a": \n')
    with pytest.raises(RSGError) as exc:
        read_jsonl(f)
    assert exc.value.line == 2
    f.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(RSGError, match="not UTF-8"):
        read_jsonl(f)
