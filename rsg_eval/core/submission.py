"""Leaderboard submission files: writer, reader and validator (../shared/docs/RSG_SPEC.md section 2).

Torch-free. The writer copies the exact label spelling of the official sample submission: DaNetQA and RUSSE
"true"/"false", RWSD "True"/"False", PARus int, MuSeRC nested with the test file's global ids, RuCoS the entity
string keyed by passage idx, TERRa/LiDiRus entailment/not_entailment, RCB the three labels. The zip holds
`submission/<Task>.jsonl`, as the official sample does.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import (atomic_write_bytes, atomic_write_text, dumps_jsonl, iter_jsonl_text, iter_lines,
                              open_regular, zip_member_problem)
from rsg_eval.core.limits import SUBMISSION_BYTES
from rsg_eval.core.metrics import normalize_answer
from rsg_eval.core.tasks import BOOL, NLI2, NLI3, TASK_NAMES, Item, get_task

ZIP_FOLDER = "submission"

# Exact spellings graded by the leaderboard (canonical value -> JSON value).
_BOOL_LOWER = {False: "false", True: "true"}
_BOOL_TITLE = {False: "False", True: "True"}


def spell(task: str, label: Any) -> Any:
    """Canonical label -> its JSON value in the submission file."""
    if task in ("RUSSE", "DaNetQA"):
        return _BOOL_LOWER[bool(label)]
    if task == "RWSD":
        return _BOOL_TITLE[bool(label)]
    if task in ("PARus", "MuSeRC"):
        return int(label)
    return label


def unspell(task: str, value: Any, *, strict: bool, json_bools: bool = False) -> Any:
    """JSON value from a submission line -> canonical label; raise ValueError with the valid choices.

    Strict mode accepts only the official sample's spelling (and, with `json_bools`, JSON true/false for the
    yes/no tasks: the official TF-IDF baseline wrote those and the leaderboard scored them); lenient mode also
    accepts the forms other official tools wrote (JSON booleans, either case), so `rsg score` can read them.
    """
    if task in ("RUSSE", "DaNetQA", "RWSD"):
        exact = _BOOL_TITLE if task == "RWSD" else _BOOL_LOWER
        for canon, s in exact.items():
            if value == s:
                return canon
        if isinstance(value, bool) and (json_bools or not strict):
            return value
        if not strict:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        raise ValueError(f"invalid label {value!r}", tuple(exact.values()))
    if task in ("PARus", "MuSeRC"):
        if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
            return value
        if not strict and isinstance(value, str) and value in ("0", "1"):
            return int(value)
        raise ValueError(f"invalid label {value!r}", (0, 1))
    if task == "RuCoS":
        if isinstance(value, str):
            return value
        raise ValueError(f"invalid label {value!r}: the chosen entity must be a string", "an entity string")
    labels = NLI3 if task == "RCB" else NLI2
    if value in labels:
        return value
    raise ValueError(f"invalid label {value!r}", labels)


# ----------------------------------------------------------------------------------------------- writing


def to_lines(task: str, items: Sequence[Item], preds: Mapping[int, Any]) -> list[dict]:
    """Leaderboard lines for `items` (one split of one task), idx sorted ascending.

    Every item needs a prediction: a submission with holes would be rejected or scored as wrong.
    """
    name = get_task(task).name
    missing = [it.key for it in items if it.key not in preds]
    if missing:
        raise RSGError(f"{name}: {len(missing)} items have no prediction (first keys: {missing[:5]})",
                       field="predictions", expected="one prediction per test item")
    if name == "MuSeRC":
        passages: dict[int, OrderedDict[int, list[dict]]] = {}
        for it in items:
            qs = passages.setdefault(it.doc, OrderedDict())
            qs.setdefault(it.group, []).append({"idx": it.key, "label": spell(name, preds[it.key])})
        return [{"idx": p, "passage": {"questions": [{"idx": q, "answers": ans} for q, ans in qs.items()]}}
                for p, qs in sorted(passages.items())]
    rows = [{"idx": it.key, "label": spell(name, preds[it.key])} for it in items]
    return sorted(rows, key=lambda r: r["idx"])


def write_task_file(folder: str | Path, task: str, items: Sequence[Item], preds: Mapping[int, Any]) -> Path:
    """Write `<folder>/<Task>.jsonl` atomically."""
    name = get_task(task).name
    return atomic_write_text(Path(folder) / f"{name}.jsonl", dumps_jsonl(to_lines(name, items, preds)))


def write_zip(folder: str | Path, zip_path: str | Path, tasks: Iterable[str] | None = None) -> Path:
    """Zip the `<Task>.jsonl` files of `folder` as `submission/<Task>.jsonl` (the official sample's layout)."""
    folder = Path(folder)
    buf = io.BytesIO()
    names = [get_task(t).name for t in tasks] if tasks else list(TASK_NAMES)
    n = 0
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            f = folder / f"{name}.jsonl"
            if f.is_file():
                zf.writestr(f"{ZIP_FOLDER}/{name}.jsonl", f.read_bytes())
                n += 1
    if n == 0:
        raise RSGError("no <Task>.jsonl files to zip", file=folder, expected=", ".join(f"{t}.jsonl" for t in names))
    return atomic_write_bytes(zip_path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- reading


def _task_of_member(name: str) -> str | None:
    p = PurePosixPath(name.replace("\\", "/"))
    if not p.parts or p.parts[0] == "__MACOSX" or p.name.startswith("."):
        return None
    stem = p.name[:-6] if p.name.lower().endswith(".jsonl") else None
    if stem is None:
        return None
    for t in TASK_NAMES:
        if stem.lower() == t.lower():
            return t
    return None


def read_submission_texts(path: str | Path) -> dict[str, tuple[str, str]]:
    """{task: (source name, text)} from a zip or a folder of <Task>.jsonl files (or one such file)."""
    path = Path(path)
    out: dict[str, tuple[str, str]] = {}
    if path.is_file() and path.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise RSGError("not a valid zip file", file=path) from None
        with zf:
            for info in zf.infolist():
                task = _task_of_member(info.filename)
                if task is None or info.is_dir():
                    continue
                if task in out:
                    raise RSGError(f"two files for {task} in the zip ({out[task][0]} and {info.filename})",
                                   file=path, expected="one <Task>.jsonl per task")
                source = f"{path}!{info.filename}"
                out[task] = (source, _decode(_read_member(zf, info, source), source))
        if not out:  # like an empty folder: nothing was scored, so not exit status 0 with an empty table
            raise RSGError("no <Task>.jsonl prediction files in the zip", file=path,
                           expected=", ".join(f"{t}.jsonl" for t in TASK_NAMES))
        return out
    if path.is_file():
        task = _task_of_member(path.name)
        if task is None:
            raise RSGError("cannot tell the task from the file name", file=path,
                           expected=", ".join(f"{t}.jsonl" for t in TASK_NAMES) + " (or pass --task)")
        return {task: (str(path), _decode(read_prediction_bytes(path), str(path)))}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            task = _task_of_member(f.name)
            if task:  # a FIFO or folder named TERRa.jsonl is named by read_prediction_bytes, never skipped
                out[task] = (str(f), _decode(read_prediction_bytes(f), str(f)))
        if not out:
            raise RSGError("no <Task>.jsonl prediction files here", file=path,
                           expected=", ".join(f"{t}.jsonl" for t in TASK_NAMES))
        return out
    raise RSGError("no such file or folder", file=path)


def read_prediction_bytes(path: Path) -> bytes:
    """A prediction file's bytes, refused beyond RSG_MAX_SUBMISSION_BYTES before it is read."""
    cap = SUBMISSION_BYTES.value()
    with open_regular(path) as fh:  # a FIFO or folder named TERRa.jsonl: one line, never a hang
        size = os.fstat(fh.fileno()).st_size
        if size > cap:
            raise SUBMISSION_BYTES.error(f"a prediction file of {size:,} bytes", file=path)
        data = fh.read(cap + 1)  # the file may grow between stat and read
    if len(data) > cap:
        raise SUBMISSION_BYTES.error("a prediction file over the size limit", file=path)
    return data


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str) -> bytes:
    """One zip member's bytes, refused beyond RSG_MAX_SUBMISSION_BYTES before (declared size) and while (real
    size: a header may lie) it is decompressed. A damaged member is an RSGError, not a zlib traceback."""
    import zlib

    cap = SUBMISSION_BYTES.value()
    problem = zip_member_problem(info)
    if problem is not None:
        raise RSGError(f"the zip member {problem}", file=source,
                       expected="a zip written by `rsg submit zip` or any zip tool")
    if info.file_size > cap:
        raise SUBMISSION_BYTES.error(f"a prediction file of {info.file_size:,} bytes uncompressed", file=source)
    try:
        with zf.open(info) as fh:
            data = fh.read(cap + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise RSGError(f"damaged zip member ({exc})", file=source,
                       expected="a zip written by `rsg submit zip` or any zip tool") from None
    if len(data) > cap:
        raise SUBMISSION_BYTES.error("a prediction file over the size limit", file=source)
    return data


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RSGError("not UTF-8 text", file=source, line=data[: exc.start].count(b"\n") + 1) from None


def _int_idx(value: Any, strict: bool) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not strict and isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        return int(value)  # MOROCCO's LiDiRus predictions keep the file's string idx
    raise ValueError(f"idx {value!r:.40} is not an integer", "an integer idx from the test file")


def parse_lines(task: str, text: str, source: str, *, strict: bool = False) -> dict[int, Any]:
    """Leaderboard lines -> {key: canonical label}; RSGError naming the file and line on the first problem."""
    name = get_task(task).name
    preds: dict[int, Any] = {}
    for lineno, rec in iter_jsonl_text(text, source):
        for key, label, field in _line_preds(name, rec, strict):
            if isinstance(label, ValueError):
                msg, expected = label.args if len(label.args) == 2 else (label.args[0], None)
                raise RSGError(msg, file=source, line=lineno, field=field, expected=expected)
            if key in preds:
                raise RSGError(f"duplicate idx {key}", file=source, line=lineno, field=_idx_field(field),
                               expected="each idx exactly once")
            preds[key] = label
    return preds


def _idx_field(label_field: str) -> str:
    """The idx field next to a label field: "label" -> "idx", "passage...answers[2].label" -> "...answers[2].idx"."""
    return label_field[: -len("label")] + "idx" if label_field.endswith("label") else "idx"


def _line_preds(task: str, rec: dict, strict: bool, json_bools: bool = False) -> list[tuple[int | None, Any, str]]:
    """(key, label or ValueError, field path) for each prediction in one line."""
    try:
        if "idx" not in rec:
            raise ValueError("missing field", "idx")
        if task == "MuSeRC":
            _int_idx(rec["idx"], strict)
            passage = rec.get("passage")
            if not isinstance(passage, dict) or not isinstance(passage.get("questions"), list):
                return [(None, ValueError("missing or malformed passage.questions",
                                          '{"questions": [{"idx", "answers": [{"idx", "label"}]}]}'),
                         "passage.questions")]
            out = []
            for qi, q in enumerate(passage["questions"]):
                if not isinstance(q, dict) or not isinstance(q.get("answers"), list) or "idx" not in q:
                    out.append((None, ValueError("malformed question", '{"idx", "answers": [...]}'),
                                f"passage.questions[{qi}]"))
                    continue
                _int_idx(q["idx"], strict)
                for ai, a in enumerate(q["answers"]):
                    fld = f"passage.questions[{qi}].answers[{ai}]"
                    if not isinstance(a, dict) or "idx" not in a or "label" not in a:
                        out.append((None, ValueError("malformed answer", '{"idx": int, "label": 0|1}'), fld))
                        continue
                    try:
                        out.append((_int_idx(a["idx"], strict), unspell(task, a["label"], strict=strict),
                                    fld + ".label"))
                    except ValueError as exc:
                        out.append((None, exc, fld))
            return out
        key = _int_idx(rec["idx"], strict)
        if "label" not in rec:
            raise ValueError("missing field", "label")
        try:
            return [(key, unspell(task, rec["label"], strict=strict, json_bools=json_bools), "label")]
        except ValueError as exc:
            return [(key, exc, "label")]
    except ValueError as exc:
        return [(None, exc, "idx")]


def read_predictions(path: str | Path, task: str | None = None, *, strict: bool = False) -> dict[int, Any]:
    """One task's predictions from a <Task>.jsonl file, a folder or a zip (lenient about label spelling)."""
    path = Path(path)
    if task is not None and path.is_file() and path.suffix.lower() == ".jsonl":
        name = get_task(task).name  # a single file named anything, its task given explicitly
        return parse_lines(name, _decode(read_prediction_bytes(path), str(path)), str(path), strict=strict)
    texts = read_submission_texts(path)
    if task is None:
        if len(texts) != 1:
            raise RSGError("several tasks here; name one", file=path, field="task", expected=sorted(texts))
        task = next(iter(texts))
    name = get_task(task).name
    if name not in texts:
        raise RSGError(f"no {name}.jsonl here", file=path, expected=f"{name}.jsonl")
    source, text = texts[name]
    return parse_lines(name, text, source, strict=strict)


# ---------------------------------------------------------------------------------------------- validating


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    message: str
    level: str = "error"   # "error": the leaderboard would reject or misgrade it; "warning": accepted, but look

    def __str__(self) -> str:
        return f"{self.file}{':' + str(self.line) if self.line else ''}: {self.message}"


def check_zip(zip_path: str | Path, data: Any, tasks: Iterable[str] | None = None) -> list[Problem]:
    """Validate a submission zip (or folder) against the test files; return every problem found.

    Checks: a file for each task, valid JSON lines, every test idx exactly once and no others, labels of the
    right type and exact spelling, MuSeRC passage/question/answer ids as in test.jsonl, a zip without paths
    that escape its folder. Tasks whose test file the data lacks are skipped (reported as a note by the CLI).
    Warnings (level "warning") flag what the leaderboard accepts but may not mean what the user thinks: JSON
    true/false for RUSSE, RWSD and DaNetQA (the official TF-IDF baseline's spelling), a RuCoS label that is
    none of its passage's entities.
    """
    from rsg_eval.core.data import resolve_data, safe_member_name
    from rsg_eval.core.data import load_items

    zip_path = Path(zip_path)
    problems: list[Problem] = []
    if zip_path.is_file() and zip_path.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for n in zf.namelist():
                    if safe_member_name(n) is None:
                        problems.append(Problem(str(zip_path), None,
                                                f"member {n!r} has a path outside the zip's folder"))
        except zipfile.BadZipFile:
            return [Problem(str(zip_path), None, "not a valid zip file")]
    try:
        texts = read_submission_texts(zip_path)
    except RSGError as exc:
        return problems + [Problem(exc.file or str(zip_path), exc.line, exc.message)]
    src = resolve_data(data)
    for name in ([get_task(t).name for t in tasks] if tasks else list(TASK_NAMES)):
        if not src.has(name, "test"):
            continue
        items = load_items(src, name, "test")
        if name not in texts:
            problems.append(Problem(str(zip_path), None, f"missing {name}.jsonl ({len(items)} test items expected)"))
            continue
        source, text = texts[name]
        problems.extend(_check_task(name, items, source, text))
    return problems


def _check_task(task: str, items: Sequence[Item], source: str, text: str) -> list[Problem]:
    problems: list[Problem] = []
    expected_keys = {it.key for it in items}
    seen: dict[int, int] = {}
    lines_idx: list[int] = []
    structure: dict[int, dict[int, list[int]]] = {}
    if task == "MuSeRC":
        for it in items:
            structure.setdefault(it.doc, {}).setdefault(it.group, []).append(it.key)
    records = _read_records(text, source, problems)
    bool_lines: list[int] = []
    off_entity: list[tuple[int, Any, str]] = []
    # RuCoS is scored after ReCoRD normalisation ("Косово." == "косово"): compare in that form.
    candidates = {it.key: {normalize_answer(c) for c in it.labels} for it in items} if task == "RuCoS" else {}
    for lineno, rec in records:
        if not rec:
            continue
        top = rec.get("idx")
        if isinstance(top, int) and not isinstance(top, bool):
            lines_idx.append(top)
        if task in ("RUSSE", "RWSD", "DaNetQA") and isinstance(rec.get("label"), bool):
            bool_lines.append(lineno)
        for key, label, fld in _line_preds(task, rec, strict=True, json_bools=True):
            if isinstance(label, ValueError):
                msg, exp = label.args if len(label.args) == 2 else (label.args[0], None)
                problems.append(Problem(source, lineno, f"field '{fld}': {msg}" + (f" (expected: {_fmt(exp)})"
                                                                                  if exp is not None else "")))
                if key is not None:  # the id is there, only its label is wrong: don't also call it missing
                    seen.setdefault(key, lineno)
                continue
            if key is None:
                continue
            if key in seen:
                problems.append(Problem(source, lineno, f"duplicate idx {key} (also on line {seen[key]})"))
            elif key not in expected_keys:
                what = "answer idx" if task == "MuSeRC" else "idx"
                problems.append(Problem(source, lineno, f"{what} {key} is not in the test file"))
            elif task == "RuCoS" and normalize_answer(label) not in candidates[key]:
                off_entity.append((lineno, key, label))
            seen.setdefault(key, lineno)
        if task == "MuSeRC" and isinstance(top, int):
            problems.extend(_muserc_structure(rec, top, structure, source, lineno))
    missing = sorted(expected_keys - set(seen))
    if missing:
        problems.append(Problem(source, None, f"{len(missing)} test items have no prediction "
                                              f"(first: {missing[:10]})"))
    if lines_idx != sorted(lines_idx):
        problems.append(Problem(source, None, "lines are not sorted by idx"))
    return problems + _spelling_warnings(task, source, bool_lines, off_entity)


def _read_records(text: str, source: str, problems: list[Problem]) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line; a line that is not a JSON object is a problem and an empty
    record, so the problems on the lines after it are still found."""
    records: list[tuple[int, dict]] = []
    try:
        for lineno, raw in iter_lines(text.lstrip("\ufeff"), source):
            if not raw.strip():
                continue
            try:  # one line at a time, so a broken line does not hide the problems after it
                records.extend((lineno, rec) for _, rec in iter_jsonl_text(raw, source))
            except RSGError as exc:
                problems.append(Problem(source, lineno, exc.message))
                records.append((lineno, {}))
    except RSGError as exc:  # a line over the length limit: the lines after it are not read
        problems.append(Problem(source, exc.line, exc.message))
    return records


def _muserc_structure(rec: dict, top: int, structure: dict[int, dict[int, list[int]]], source: str,
                      lineno: int) -> list[Problem]:
    """A MuSeRC line's passage against the test file's: the same question ids, each with the same answer ids."""
    if top not in structure:
        return [Problem(source, lineno, f"passage idx {top} is not in the test file")]
    problems = []
    got = {q.get("idx"): [a.get("idx") for a in q.get("answers", []) if isinstance(a, dict)]
           for q in rec.get("passage", {}).get("questions", []) if isinstance(q, dict)}
    want = structure[top]
    if set(got) != set(want):
        problems.append(Problem(source, lineno, f"passage {top}: question ids {sorted(k for k in got if isinstance(k, int))} "
                                                f"differ from the test file's {sorted(want)}"))
    for q, ans in want.items():
        if q in got and sorted(a for a in got[q] if isinstance(a, int)) != sorted(ans):
            problems.append(Problem(source, lineno, f"question {q}: answer ids differ from the test file's {ans}"))
    return problems


def _spelling_warnings(task: str, source: str, bool_lines: list[int],
                       off_entity: list[tuple[int, Any, str]]) -> list[Problem]:
    """Warnings, not errors: JSON-boolean labels, and RuCoS answers that match none of their passage's entities."""
    problems = []
    if bool_lines:
        spelled = ", ".join(json.dumps(spell(task, v)) for v in (False, True))
        problems.append(Problem(
            source, bool_lines[0],
            f"{len(bool_lines)} label(s) are JSON booleans (first on this line); the leaderboard scored this "
            f"spelling (the official TF-IDF baseline's), but its own sample writes the strings {spelled}: "
            f"`rsg submit zip` does", level="warning"))
    if off_entity:
        line, key, label = off_entity[0]
        problems.append(Problem(
            source, line,
            f"{len(off_entity)} label(s) match none of their passage's entities, even ignoring case and "
            f"punctuation (first on this line: idx {key}, {json.dumps(label, ensure_ascii=False)}); they are "
            f"scored by word overlap with the gold answer, so they can at best be partly right", level="warning"))
    return problems


def _fmt(exp: Any) -> str:
    if isinstance(exp, (tuple, list)):
        return ", ".join(json.dumps(e, ensure_ascii=False) for e in exp)
    return str(exp)
