"""Is a weights file loadable? Cheap checks before a loader meets it, and load failures in words.

A truncated download, a disk error or a tampered file otherwise surfaces as a library traceback (safetensors:
"incomplete metadata, file not fully covered"; transformers: "If you tried to load a PyTorch model from a TF 2.0
checkpoint, please set from_tf=True"). These checks read only headers (a few KB), so they run before every load.
Stdlib only; torch is imported lazily by `describe_load_error`.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

from rsg_eval.core.errors import RSGError

_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB itself


# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1,
                "F6_E3M2": 1, "C64": 8}


def _nat(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors_header(path: Path) -> tuple[dict, int] | str:
    """(header, data bytes) of a safetensors file, or why it has none (a string). Reads the header only."""
    from rsg_eval.core.errors import RSGError as _E
    from rsg_eval.core.io import loads_json, open_regular

    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = struct.unpack("<Q", head)[0]
            if n > _MAX_HEADER or 8 + n > size:
                return "its header length does not fit the file (truncated, or not a safetensors file)"
            raw = fh.read(n)
    except (OSError, _E) as exc:
        return f"unreadable ({getattr(exc, 'message', None) or type(exc).__name__})"
    try:
        header = loads_json(raw)
    except _E as exc:  # not JSON, nested 5,000 deep, a 5,000-digit offset, ...
        return f"unreadable header ({exc.message})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    return header, size - 8 - n


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when its header and size agree.

    Layout: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then
    the data. Every tensor entry is checked as safetensors itself would (its dtype known, shape and offsets
    lists of non-negative integers, shape x dtype size = end - begin), so a crafted header is named here rather
    than failing inside a loader (an overflowing shape made transformers say "no file named
    model.safetensors"); the last end offset must be exactly the data's size."""
    got = read_safetensors_header(path)
    if isinstance(got, str):
        return got
    header, data = got
    ends = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {str(name)[:60]!r}"
        if not isinstance(v, dict):
            return f"{where}: its entry is not an object"
        offs, shape, dtype = v.get("data_offsets"), v.get("shape"), v.get("dtype")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_nat(x) for x in offs) and offs[0] <= offs[1]):
            return f"{where}: data_offsets {offs!r:.40} is not [begin, end] with 0 <= begin <= end"
        if not (isinstance(shape, list) and all(_nat(x) for x in shape)):
            return f"{where}: shape {shape!r:.40} is not a list of sizes"
        if dtype not in _DTYPE_BYTES:
            return f"{where}: unknown dtype {dtype!r:.20}"
        count = 1
        for x in shape:
            count *= x
        if count * _DTYPE_BYTES[dtype] != offs[1] - offs[0]:
            return (f"{where}: shape {shape} of {dtype} needs {count * _DTYPE_BYTES[dtype]:,} bytes, its "
                    f"data_offsets hold {offs[1] - offs[0]:,}")
        ends.append(offs[1])
    if ends and max(ends) != data:
        return (f"truncated: its tensors need {max(ends):,} bytes of data, the file has {data:,}"
                if max(ends) > data else f"{data - max(ends):,} bytes of unexpected data after the tensors")
    return None


def weight_elements(folder: Path) -> int | None:
    """How many numbers the weights files of a model folder hold: from safetensors headers, else the .bin
    files' bytes (an upper bound: no dtype is under one byte); None without weights files."""
    st = sorted(Path(folder).glob("*.safetensors"))
    if st:
        total = 0
        for f in st:
            got = read_safetensors_header(f)
            if isinstance(got, str):
                return None
            for k, v in got[0].items():
                if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("shape"), list):
                    n = 1
                    for x in v["shape"]:
                        n *= x if _nat(x) else 0
                    total += n
        return total
    bins = sorted(Path(folder).glob("*.bin"))
    return sum(f.stat().st_size for f in bins) if bins else None


# config.json keys that size a model's tensors: each must be a positive integer of at most _MAX_SIZE
_SIZE_KEYS = ("vocab_size", "d_model", "hidden_size", "n_embd", "d_ff", "intermediate_size", "d_kv", "num_layers",
              "num_decoder_layers", "num_hidden_layers", "n_layer", "num_heads", "num_attention_heads", "n_head",
              "num_key_value_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
              "max_position_embeddings", "n_positions", "head_dim")
_MAX_SIZE = 1 << 24


def check_model_config(folder: Path) -> dict:
    """A model folder's config.json, checked before transformers builds a model from it: an object whose size
    fields are positive integers (`vocab_size: "many"`, `-1`), not absurd (at most 16,777,216 each), and whose
    embedding (vocab_size x d_model) the weights files can hold (2e9 x 1e5 would allocate 800 TB). RSGError
    naming config.json and the field."""
    from rsg_eval.core.errors import RSGError as _E
    from rsg_eval.core.io import read_json

    f = Path(folder) / "config.json"
    cfg = read_json(f, max_bytes=16 << 20)
    if not isinstance(cfg, dict):
        raise _E(f"a JSON {type(cfg).__name__} instead of an object", file=f, expected="a model's config {...}")
    for key in _SIZE_KEYS:
        if key in cfg and cfg[key] is not None:
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_SIZE:
                raise _E(f"{v!r:.40} is not a model size", file=f, field=key,
                         expected=f"a positive integer of at most {_MAX_SIZE:,}")
    vocab = cfg.get("vocab_size")
    width = next((cfg[k] for k in ("d_model", "hidden_size", "n_embd") if isinstance(cfg.get(k), int)), None)
    have = weight_elements(Path(folder))
    if isinstance(vocab, int) and width and have is not None and vocab * width > 2 * have + (1 << 20):
        raise _E(f"vocab_size x width = {vocab:,} x {width:,} = {vocab * width:,} numbers for the embedding alone, "
                 f"but the weights files hold {have:,}: this config does not describe these weights", file=f,
                 field="vocab_size", expected="the config.json saved with the weights (save_pretrained)")
    return cfg


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
