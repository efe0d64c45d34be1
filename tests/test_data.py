"""Data sources: layouts, zips (safely), downloads with checksums."""

import hashlib
import io
import zipfile

import pytest

from rsg_eval.core import data as D
from rsg_eval.core.errors import RSGError
from rsg_eval.core.data import load_items


def _zip_bytes(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


TERRA = '{"premise": "Шёл снег.", "hypothesis": "Было холодно.", "label": "entailment", "idx": 0}\n'


def test_combined_layout_and_zip(tmp_path):
    (tmp_path / "combined" / "TERRa").mkdir(parents=True)
    (tmp_path / "combined" / "TERRa" / "val.jsonl").write_text(TERRA, encoding="utf-8")
    assert len(load_items(tmp_path, "TERRa", "val")) == 1
    z = tmp_path / "rsg.zip"
    z.write_bytes(_zip_bytes({"combined/TERRa/val.jsonl": TERRA, "__MACOSX/._x": "junk"}))
    src = D.resolve_data(z)
    assert load_items(src, "TERRa", "val")[0].gold == "entailment"
    assert not (src.root / "__MACOSX").exists()


def test_missing_things_are_clear(tmp_path):
    with pytest.raises(RSGError, match="does not exist"):
        D.resolve_data(tmp_path / "nope")
    (tmp_path / "TERRa").mkdir()
    with pytest.raises(RSGError) as exc:
        load_items(tmp_path, "TERRa", "val")
    assert "TERRa/val.jsonl" in str(exc.value)
    with pytest.raises(RSGError, match="no RCB/ folder"):
        load_items(tmp_path, "RCB", "val")


def test_safe_extract_refuses_paths_outside(tmp_path):
    z = tmp_path / "evil.zip"
    z.write_bytes(_zip_bytes({"TERRa/val.jsonl": TERRA, "../escape.txt": "x"}))
    with pytest.raises(RSGError, match="outside the target"):
        D.safe_extract(z, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()
    assert D.safe_member_name("/abs/x") is None and D.safe_member_name("C:/x") is None
    assert D.safe_member_name("a/b.jsonl") is not None


def _fake_fetch(payloads):
    def fetch(url, dest, progress):
        body = payloads[url.rsplit("/", 1)[1]]
        dest.write_bytes(body)
        progress(len(body), len(body))
    return fetch


def test_download_checks_sha256_and_extracts(tmp_path, monkeypatch):
    body = _zip_bytes({"TERRa/train.jsonl": TERRA, "TERRa/val.jsonl": TERRA, "TERRa/test.jsonl": TERRA})
    monkeypatch.setitem(D.CHECKSUMS, "TERRa", (len(body), hashlib.sha256(body).hexdigest()))
    seen = []
    out = D.download(["terra"], tmp_path / "d", fetch=_fake_fetch({"TERRa": body}),
                     on_progress=lambda n, done, tot: seen.append((n, done, tot)))
    assert (out / "TERRa" / "val.jsonl").read_text(encoding="utf-8") == TERRA
    assert seen[-1] == ("TERRa", len(body), len(body))
    # a second call finds the files and fetches nothing
    D.download(["TERRa"], tmp_path / "d", fetch=lambda *a: pytest.fail("fetched again"))


def test_download_wrong_checksum_leaves_nothing(tmp_path):
    body = _zip_bytes({"RCB/val.jsonl": "{}\n"})
    with pytest.raises(RSGError) as exc:
        D.download(["RCB"], tmp_path / "d", fetch=_fake_fetch({"RCB": body}))
    assert "checksum mismatch" in str(exc.value) and D.CHECKSUMS["RCB"][1] in str(exc.value)
    assert list((tmp_path / "d").iterdir()) == []


def test_check_folder_reports_problems(tmp_path):
    (tmp_path / "TERRa").mkdir()
    (tmp_path / "TERRa" / "val.jsonl").write_text(TERRA + '{"idx": 1}\n', encoding="utf-8")
    rows = {(r["task"], r["split"]): r for r in D.check_folder(tmp_path, ["TERRa"])}
    assert "val.jsonl:2" in rows[("TERRa", "val")]["error"]
    assert "missing train.jsonl" in rows[("TERRa", "train")]["error"]


def test_check_folder_compares_with_the_official_sizes(tmp_path):
    """One complete split (RCB val has 220 records officially), one partial (5 of 307 TERRa val records)."""
    from rsg_eval.core.tasks import OFFICIAL_RECORDS

    rcb = tmp_path / "RCB"
    rcb.mkdir()
    line = '{"premise": "Он пришёл.", "hypothesis": "Он здесь.", "label": "entailment", "idx": %d}\n'
    (rcb / "val.jsonl").write_text("".join(line % i for i in range(220)), encoding="utf-8")
    (tmp_path / "TERRa").mkdir()
    (tmp_path / "TERRa" / "val.jsonl").write_text(
        "".join(line % i for i in range(5)), encoding="utf-8")
    rows = {(r["task"], r["split"]): r for r in D.check_folder(tmp_path, ["RCB", "TERRa"])}
    assert OFFICIAL_RECORDS["RCB"]["val"] == 220 and OFFICIAL_RECORDS["TERRa"]["val"] == 307
    assert (rows[("RCB", "val")]["records"], rows[("RCB", "val")]["official"], rows[("RCB", "val")]["status"]) \
        == (220, 220, "ok")
    assert (rows[("TERRa", "val")]["records"], rows[("TERRa", "val")]["official"],
            rows[("TERRa", "val")]["status"]) == (5, 307, "partial")
    assert rows[("TERRa", "train")]["status"] == "error"


def test_data_check_says_partial_and_exits_0_on_the_sample():
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    res = CliRunner().invoke(app, ["data", "check", "--data", "sample", "--tasks", "PARus"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    parus_val = next(ln for ln in res.output.splitlines() if "PARus" in ln and "val" in ln)
    cells = [c.strip() for c in parus_val.split("│")[1:-1]]
    assert cells == ["PARus", "val", "6", "100", "6", "6", "partial"]  # the bundled sample: 6 val records
    assert "partial data: 3 of 3 splits" in " ".join(res.output.split())


def test_data_folder_one_level_too_high_names_the_subfolder(tmp_path):
    inner = tmp_path / "rsg"
    (inner / "TERRa").mkdir(parents=True)
    (inner / "TERRa" / "val.jsonl").write_text(TERRA, encoding="utf-8")
    (tmp_path / "docs").mkdir()
    with pytest.raises(RSGError) as e:
        D.resolve_data(tmp_path)
    assert f"--data {inner}" in str(e.value)
    assert D.resolve_data(inner).root == inner  # the right folder resolves as before
