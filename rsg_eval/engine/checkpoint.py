"""Checkpoints: `best/` (weights + meta) and `last/` (weights, optimizer, scheduler, trainer state, RNG states).
Weights are safetensors, always full and unsharded whichever way the model was trained (under FSDP the caller
gathers them with sharding.full_model_state first); with the model's config and tokenizer beside them (`files`),
the folder is a model `--model` loads. Trainer state is a torch file of tensors and plain values only, read with
`torch.load(weights_only=True)`: no pickle is ever executed. A checkpoint folder is written as `<name>.new/` and swapped in with
renames, so a crash or a full disk leaves the previous one whole:

    write <name>.new/ -> rename <name> to <name>.old -> rename <name>.new to <name> -> delete <name>.old

`find` falls back to `<name>.old` when a crash hit between the two renames.

A model with frozen weights (LoRA: a frozen base plus small adapters) is saved trainable-only (`trainable_only=True`):
the file holds what training changes, marked `rsg_weights: trainable` in its safetensors metadata, and loading it
fills only those tensors, the frozen rest coming from the model the run was built from. A LoRA checkpoint of
FRED-T5-1.7B is then megabytes, not the base's 3.4 GB again at every save.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.core.io import WriteError, atomic_write_json, write_failure

WEIGHTS = "model.safetensors"


class SaveError(RSGError):
    """Saving failed (full disk, permissions); the previous checkpoint is intact."""


def find(root: Path, name: str) -> Path | None:
    """The complete checkpoint folder `name` under root (or its `.old` twin after an interrupted swap)."""
    for cand in (root / name, root / f"{name}.old"):
        if (cand / "meta.json").is_file():
            return cand
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


PARTIAL_KEY, PARTIAL_VALUE = "rsg_weights", "trainable"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable parameters by name when some parameters are frozen (LoRA), else None (save everything)."""
    params = list(model.named_parameters(remove_duplicate=False))
    if all(p.requires_grad for _, p in params):
        return None
    return {n: p for n, p in params if p.requires_grad}


def save_weights(model: torch.nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None, *,
                 partial: bool = False) -> None:
    """Model weights as safetensors, each tied tensor once (T5's shared embeddings).

    state: the full weights when they are not the model's own tensors (gathered from FSDP shards); `model` then
    only tells which names are tied."""
    from safetensors.torch import save_file, save_model

    if state is None:
        # metadata format "pt": transformers' from_pretrained refuses a safetensors file without it
        save_model(model, str(path), metadata={"format": "pt"})
        return
    keep: dict[str, torch.Tensor] = {}
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():  # a tied parameter: stored once, under its first name the state holds
        name = next((n for n in names if n in state), None)
        if name is not None:
            keep[name] = state[name]
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keep.update({k: v for k, v in state.items() if k not in params})  # buffers
    meta = {"format": "pt", **({PARTIAL_KEY: PARTIAL_VALUE} if partial else {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in keep.items()}, str(path), metadata=meta)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    from rsg_eval.models.weight_files import check_weight_file

    from safetensors import safe_open

    check_weight_file(path, hint=_CORRUPT_HINT.format(folder=path.parent))
    with safe_open(str(path), framework="pt") as fh:
        partial = (fh.metadata() or {}).get(PARTIAL_KEY) == PARTIAL_VALUE
    missing, unexpected = load_model(model, str(path), strict=False)
    # tied weights are stored once; only a name the model lacks, or a real missing tensor, is a problem
    if unexpected:
        raise RSGError(f"checkpoint has tensors this model lacks: {sorted(unexpected)[:5]}", file=path)
    if missing:
        params = dict(model.named_parameters(remove_duplicate=False))
        # a trainable-only file lacks the frozen weights by design (they stay as the model has them)
        really = [m for m in missing if m not in params
                  or not (_is_tied(model, m) or (partial and not params[m].requires_grad))]
        if really:
            raise RSGError(f"checkpoint lacks tensors of this model: {sorted(really)[:5]}", file=path)


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """True when parameter `name` shares storage with another parameter (stored once in the file)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(name)
    return p is not None and any(q is p for n, q in params.items() if n != name)


def write_checkpoint(root: Path, name: str, model: torch.nn.Module, meta: dict,
                     extra: dict[str, Any] | None = None, *, state: dict[str, torch.Tensor] | None = None,
                     files: Any = None, trainable_only: bool = False) -> Path:
    """Write checkpoint `root/name` atomically (see module doc). `extra` objects go to `training.pt`; `state`:
    the full weights when gathered from shards (see save_weights); `files(folder)` adds files (config.json and
    the tokenizer, so `--model` loads the folder).

    Raises SaveError (an RSGError) on any OSError or storage failure (a full disk surfaces from safetensors as
    SafetensorError and from torch.save as RuntimeError), after removing the half-written folder; any other
    error or an interrupt also removes it before propagating."""
    root.mkdir(parents=True, exist_ok=True)
    final, new, old = root / name, root / f"{name}.new", root / f"{name}.old"
    try:
        if new.exists():
            shutil.rmtree(new)
        new.mkdir()
        partial = trainable_state(model) if trainable_only and state is None else None
        if partial is not None:
            save_weights(model, new / WEIGHTS, partial, partial=True)
        elif state is None:
            save_weights(model, new / WEIGHTS)
        else:
            save_weights(model, new / WEIGHTS, state)
        if files is not None:
            files(new)
        if extra is not None:
            tmp = new / "training.pt"
            with open(tmp, "wb") as fh:
                torch.save(extra, fh)
                fh.flush()
                os.fsync(fh.fileno())
        atomic_write_json(new / "meta.json", meta)  # written last: its presence marks a complete folder
        _fsync_dir(new)
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(new, final)
        _fsync_dir(root)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(new, ignore_errors=True)  # never leave a half-written (or empty) <name>.new behind
        storage = write_failure(exc, new)
        if not isinstance(exc, (OSError, WriteError)) and storage is None:
            raise
        prev = [n for n in ("last", "best") if find(root, n) is not None]
        why = storage or ("the disk is full" if getattr(exc, "errno", None) == errno.ENOSPC else
                          getattr(exc, "strerror", None) or getattr(exc, "message", None) or str(exc))
        kept = (f"the earlier {' and '.join(repr(n) for n in prev)} checkpoint{'s' if len(prev) > 1 else ''} in "
                f"{root} {'are' if len(prev) > 1 else 'is'} intact") if prev else "no earlier checkpoint existed"
        todo = ("Free some space and rerun the same command to resume" if why != "the file system is read-only"
                else "Write elsewhere or remount the file system writable, then rerun to resume")
        raise SaveError(f"could not save the '{name}' checkpoint: {why}; {kept}, and finished tasks in the run "
                        f"folder are kept. {todo}",
                        file=final) from None
    return final


def read_meta(folder: Path) -> dict:
    from rsg_eval.core.io import read_json

    return read_json(folder / "meta.json")


_CORRUPT_HINT = ("a checkpoint file of this run is damaged (a disk error, or it was changed); delete the folder "
                 "{folder} and rerun the same command: the task then starts again from its beginning")


def load_training(folder: Path) -> dict[str, Any]:
    """Optimizer and scheduler state dicts written with the checkpoint (tensors and plain values only)."""
    import pickle
    import zipfile

    path = folder / "training.pt"
    try:
        with open(path, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise RSGError(f"not a loadable training state ({type(exc).__name__}): "
                       + _CORRUPT_HINT.format(folder=folder), file=path) from None
