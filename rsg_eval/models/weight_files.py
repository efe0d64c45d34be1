"""Is a weights file loadable? Cheap checks before a loader meets it, and load failures in words.

A truncated download, a disk error or a tampered file otherwise surfaces as a library traceback (safetensors:
"incomplete metadata, file not fully covered"; transformers: "If you tried to load a PyTorch model from a TF 2.0
checkpoint, please set from_tf=True"). These checks read only headers (a few KB), so they run before every load.
Stdlib only; torch is imported lazily by `describe_load_error`.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError

_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB itself


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when its header and size agree.

    Layout: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then
    the data; the last tensor's end offset must be exactly the data's size (safetensors checks the same)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = struct.unpack("<Q", head)[0]
            if n > _MAX_HEADER or 8 + n > size:
                return "its header length does not fit the file (truncated, or not a safetensors file)"
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable header ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    data = size - 8 - n
    if ends and max(ends) != data:
        return (f"truncated: its tensors need {max(ends):,} bytes of data, the file has {data:,}"
                if max(ends) > data else f"{data - max(ends):,} bytes of unexpected data after the tensors")
    return None


def bin_problem(path: Path) -> str | None:
    """Why a torch .bin/.pt file cannot be a complete checkpoint, or None when it may be one.

    torch >= 1.6 writes a zip; a truncated zip loses its central directory at the end. The pre-1.6 format is a
    bare pickle stream (protocol 2 starts with 0x80 0x02): left to the loader."""
    try:
        if zipfile.is_zipfile(path):
            return None
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:1] == b"\x80":
        return None
    return "not a torch checkpoint (truncated, or another kind of file)"


def check_weight_file(path: Path, *, hint: str) -> None:
    """RSGError naming `path` when it is not a loadable weights file; `hint` says what to do."""
    path = Path(path)
    why = safetensors_problem(path) if path.suffix == ".safetensors" else bin_problem(path)
    if why is not None:
        raise RSGError(f"not a loadable weights file: {why}; {hint}", file=path)


LOCAL_HINT = "download or save the model again (save_pretrained writes model.safetensors)"


def check_weight_files(folder: Path, *, hint: str = LOCAL_HINT) -> None:
    """Check every weights file a loader would read in a model folder: all *.safetensors, and the .bin files
    when there is no safetensors file (transformers then falls back to them)."""
    folder = Path(folder)
    st = sorted(folder.glob("*.safetensors"))
    for f in st:
        check_weight_file(f, hint=hint)
    if not st:
        for f in sorted(folder.glob("*.bin")):
            check_weight_file(f, hint=hint)


def describe_load_error(exc: BaseException, folder: Path) -> RSGError | None:
    """An RSGError for a weights load that failed in a way the user can fix, else None.

    torch's safe loader (weights_only=True, used by transformers for .bin files) refuses a pickle holding
    anything but tensors and plain values: such a file may run code when loaded, so it is not loadable here."""
    import pickle

    seen: set[int] = set()
    e: Any = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
            bins = sorted(Path(folder).glob("*.bin")) if Path(folder).is_dir() else []
            where = bins[0] if len(bins) == 1 else folder
            return RSGError("not a loadable weights file: it holds Python objects besides tensors (a pickle that "
                            "may run code when loaded), so torch's safe loader refused it; use a safetensors "
                            "copy of the model (model.safetensors)", file=where)
        e = e.__cause__ or e.__context__
    return None
