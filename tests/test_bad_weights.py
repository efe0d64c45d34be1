"""Damaged or refused weights files (issue 10, item 4): a truncated or corrupt safetensors or .bin file, a
pickle that would run code, a damaged fine-tuning checkpoint. Each is one RSGError naming the file and what to
do, never a library traceback, and a refused pickle is never executed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.core.errors import RSGError  # noqa: E402
from rsg_eval.models.loading import load_model  # noqa: E402
from rsg_eval.models.weight_files import bin_problem, safetensors_problem  # noqa: E402

from tests.test_bad_input import cli  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model saved twice: with safetensors and as a pickled pytorch_model.bin."""
    from rsg_eval.models.tiny import build_tiny

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    model, tok = build_tiny()
    model.save_pretrained(root / "st")
    tok.save_pretrained(root / "st")
    model.save_pretrained(root / "bin", safe_serialization=False)
    tok.save_pretrained(root / "bin")
    return root


def _variant(saved: Path, tmp_path: Path, kind: str, damage) -> Path:
    d = tmp_path / f"{kind}-damaged"
    shutil.copytree(saved / kind, d)
    damage(d / ("model.safetensors" if kind == "st" else "pytorch_model.bin"))
    return d


def _truncate(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _garbage(f: Path) -> None:
    f.write_bytes(b"\x00garbage" * 100)


def _empty(f: Path) -> None:
    f.write_bytes(b"")


class _Payload:
    """Unpickling this would create the file named `marker`: proof of code run at load time."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("kind,damage,words", [
    ("st", _truncate, "truncated: its tensors need"),
    ("st", _garbage, "its header length does not fit the file"),
    ("st", _empty, "0 bytes, shorter than a safetensors header"),
    ("bin", _truncate, "not a torch checkpoint"),
    ("bin", _garbage, "not a torch checkpoint"),
])
def test_damaged_weights_file_is_named(saved, tmp_path, kind, damage, words):
    d = _variant(saved, tmp_path, kind, damage)
    with pytest.raises(RSGError) as exc:
        load_model(d)
    f = d / ("model.safetensors" if kind == "st" else "pytorch_model.bin")
    assert exc.value.file == str(f) and words in str(exc.value) and "not a loadable weights file" in str(exc.value)
    assert "download or save the model again" in str(exc.value)


def test_intact_files_pass_the_checks(saved):
    assert safetensors_problem(saved / "st" / "model.safetensors") is None
    assert bin_problem(saved / "bin" / "pytorch_model.bin") is None
    assert load_model(saved / "bin").info["source"] == "local"  # a pickled checkpoint of tensors still loads


def test_malicious_pickle_is_refused_and_never_run(saved, tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(saved / "bin", d)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, d / "pytorch_model.bin")
    with pytest.raises(RSGError) as exc:
        load_model(d)
    msg = str(exc.value)
    assert exc.value.file == str(d / "pytorch_model.bin") and "not a loadable weights file" in msg
    assert "safetensors" in msg and "TF 2.0" not in msg and "from_tf" not in msg
    assert not marker.exists()


def test_damaged_model_through_the_cli_is_one_line_and_writes_nothing(saved, tmp_path, monkeypatch, capsys):
    d = _variant(saved, tmp_path, "st", _truncate)
    code, out, err = cli(monkeypatch, capsys, "zeroshot", "--model", d, "--data", "sample", "--tasks", "TERRa",
                         "--root", tmp_path / "runs", "--run", "r")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1
    assert str(d / "model.safetensors") in lines[0] and "truncated" in lines[0]
    assert not (tmp_path / "runs" / "r").exists()


def test_damaged_hierarchical_heads_file(tmp_path):
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.models.tiny import build_tiny

    base, tok = build_tiny()
    HierarchicalT5.from_base(base, split=1, **head_labels()).save_pretrained(tmp_path / "h", tokenizer=tok)
    _truncate(tmp_path / "h" / "hmtl_heads.safetensors")
    with pytest.raises(RSGError) as exc:
        load_model(tmp_path / "h")
    assert exc.value.file == str(tmp_path / "h" / "hmtl_heads.safetensors") and "truncated" in str(exc.value)


def test_damaged_finetune_checkpoint_says_what_to_delete(tmp_path):
    from rsg_eval.models.tiny import build_tiny
    from rsg_eval.engine import checkpoint as ck

    model, _ = build_tiny()
    folder = ck.write_checkpoint(tmp_path, "last", model, {"state": {"step": 1}}, extra={"x": torch.zeros(2)})
    _truncate(folder / ck.WEIGHTS)
    with pytest.raises(RSGError) as exc:
        ck.load_weights(model, folder / ck.WEIGHTS)
    assert exc.value.file == str(folder / ck.WEIGHTS) and f"delete the folder {folder}" in str(exc.value)
    _truncate(folder / "training.pt")
    with pytest.raises(RSGError) as exc:
        ck.load_training(folder)
    assert exc.value.file == str(folder / "training.pt") and "not a loadable training state" in str(exc.value)


def test_damaged_hmtl_resume_point(tmp_path):
    from rsg_eval.training.hmtl import train as hmtl_train

    (tmp_path / hmtl_train.STATE_NAME).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(RSGError) as exc:
        hmtl_train._load_resume_point(tmp_path)
    assert exc.value.file == str(tmp_path / hmtl_train.STATE_NAME) and f"delete {tmp_path}" in str(exc.value)
