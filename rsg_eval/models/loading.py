"""`load_model`: one entry point for every model the toolkit evaluates.

Accepted names:
- `tiny`: the built-in random small T5 with a local tokenizer (rsg_eval.models.tiny), for offline smoke runs;
- `tiny-causal`: the built-in random small Llama-shaped decoder-only model, same tokenizer;
- a local directory holding a model saved with `save_pretrained` (safetensors preferred);
- a local hierarchical checkpoint directory (it has `hmtl_config.json`), loaded by rsg_eval.models.hierarchical;
- a LoRA adapter folder (it has `adapter_config.json`): its base model, then the adapter merged in (models/lora.py);
- a hub id such as `ai-forever/FRED-T5-1.7B` (transformers auto classes, remote code off unless asked for).

Seq2seq or decoder-only is read from the config (`is_encoder_decoder`): AutoModelForSeq2SeqLM or
AutoModelForCausalLM, the same path for a hub id and a local folder. Decoder-only models load only for callers that
say they can use them (`causal_ok=True`: rank classification in `rsg zeroshot`); fine-tuning, the hierarchical
model and `--nli-head` are seq2seq-only and get a clear error naming the model instead.

Device: cuda when available, else cpu; or `device_map="auto"` (accelerate's big-model loading: the layers spread
over the visible GPUs, then CPU memory, in one process). Dtype: bf16 on a GPU that computes it natively, else fp32;
fp16 is refused for T5 models (they overflow in fp16: FREDT5_NOTES.md 0.6) unless `allow_fp16=True`.
Every failure a user can cause (missing path, unreachable hub, bad dtype) is one RSGError, not a library traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rsg_eval.core.errors import RSGError
from rsg_eval.models.untied import head_is_tied, keep_head_untied, normalize_config

log = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_CAUSAL_NAME = "tiny-causal"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named strategies
SEQ2SEQ_ONLY = "the hierarchical model (rsg train-hmtl) and --nli-head"
HIERARCHICAL_MARKER = "hmtl_config.json"
DEFAULT_MAX_INPUT_TOKENS = 512  # FRED-T5's tokenizer config has no model_max_length; 512 is its training length
T5_FAMILY = ("t5", "mt5", "umt5", "longt5")

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


@dataclass
class Loaded:
    """A model ready for scoring: `model` (eval mode, on `info["device"]`), its tokenizer, and facts about it."""

    model: Any
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- device / dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None`/"auto" -> cuda if available else cpu; anything else is checked for existence."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RSGError(f"unknown device {device!r}", field="device", expected="auto, cpu, cuda, cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RSGError("CUDA device requested but torch sees no GPU", field="device", expected="cpu or auto")
    return dev


def cuda_bf16_native() -> bool:
    """True when the current GPU computes bf16 natively (compute capability 8.0 on: A100, H100, RTX 30xx on).

    `torch.cuda.is_bf16_supported()` also says True on V100 and T4, where bf16 is emulated and slower than fp32;
    `including_emulation=False` (torch 2.3 on) leaves those out, and older torch gets the capability check.
    Every "auto" bf16 decision in the toolkit goes through this function.
    """
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation argument
        return bool(torch.cuda.is_bf16_supported()) and torch.cuda.get_device_capability()[0] >= 8


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, *, model_type: str | None = None, allow_fp16: bool = False
) -> torch.dtype:
    """Pick the dtype: auto = bf16 on a GPU that supports it, fp32 otherwise; never fp16 for T5 unless allowed."""
    if dtype is None or str(dtype) == "auto":
        if device.type == "cuda" and cuda_bf16_native():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        key = str(dtype).lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise RSGError(f"unknown dtype {dtype!r}", field="dtype", expected="auto, fp32, bf16, fp16")
        resolved = _DTYPES[key]
    if resolved == torch.float16 and (model_type or "t5") in T5_FAMILY and not allow_fp16:
        raise RSGError(
            f"fp16 is refused for {model_type or 't5'} models: T5 activations overflow in fp16 and give NaN scores; "
            "use bf16 (a GPU from Ampere on) or fp32, or pass allow_fp16=True to force it",
            field="dtype",
            expected="auto, bf16, fp32",
        )
    return resolved


# ----------------------------------------------------------------------------------------------- entry point


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_fp16: bool = False,
    causal_ok: bool = False,
    device_map: str | None = None,
) -> Loaded:
    """Load `tiny`, `tiny-causal`, a local model directory, a hierarchical checkpoint directory or a hub id (see
    the module doc). `causal_ok`: the caller can use decoder-only models (otherwise they are a clear error).
    `device_map`: "auto" (or another of accelerate's strategies) spreads a model too big for one GPU over several;
    it replaces `device`."""
    name = str(name_or_path)
    dev = _resolve_placement(device, device_map)
    if name in (TINY_NAME, TINY_CAUSAL_NAME):
        if name == TINY_CAUSAL_NAME and not causal_ok:
            _refuse_causal(name, "llama")
        return _load_tiny(dev, dtype, causal=name == TINY_CAUSAL_NAME, device_map=device_map)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():  # a LoRA adapter: its base, then the adapter
        return load_adapter_model(path, device=device, dtype=dtype, revision=revision,
                                  trust_remote_code=trust_remote_code, allow_fp16=allow_fp16, causal_ok=causal_ok,
                                  device_map=device_map)
    if path.is_dir():
        _check_local_weights(path)
        if (path / HIERARCHICAL_MARKER).is_file():
            return _load_hierarchical(path, dev, dtype, allow_fp16)
        if not (path / "config.json").is_file():
            # Without this check transformers guesses a model type from the folder name ("empty" -> "mpt").
            raise RSGError("not a model directory: no config.json (save models with save_pretrained)", file=path)
        return _load_transformers(str(path), dev, dtype, revision, trust_remote_code, allow_fp16, local=True,
                                  causal_ok=causal_ok, device_map=device_map)
    if path.exists():
        raise RSGError("a model must be a directory (saved with save_pretrained), not a file", file=path)
    if _looks_like_path(name):
        raise RSGError("model directory does not exist", file=name,
                       expected=f"'{TINY_NAME}', an existing model directory, or a hub id such as owner/name")
    _refuse_near_builtin(name)
    cache_only = hub_cache_only(name, revision)
    return _load_transformers(name, dev, dtype, revision, trust_remote_code, allow_fp16, local=False,
                              local_files_only=cache_only, causal_ok=causal_ok, device_map=device_map)


def load_adapter_model(folder: str | Path, *, merge: bool = True, **load_kwargs: Any) -> Loaded:
    """A LoRA adapter folder: the base model its adapter_config.json names (loaded with the same options), the
    adapter applied and, by default, merged (rsg_eval.models.lora). The fingerprint covers base and adapter, so
    run folders tell adapters of one base apart."""
    from rsg_eval.models.lora import adapter_tokenizer, apply_adapter, read_base

    folder = Path(folder).expanduser()
    base_name = read_base(folder)
    if Path(base_name).expanduser().resolve() == folder.resolve():
        raise RSGError("the adapter names itself as its base model", file=folder / "adapter_config.json")
    base = load_model(base_name, **load_kwargs)
    if base.info.get("source") in ("hierarchical", "lora"):
        raise RSGError(f"LoRA adapters on a {base.info['source']} model are not supported", file=folder)
    model = apply_adapter(base.model, folder, merge=merge)
    tokenizer = adapter_tokenizer(folder) or base.tokenizer
    info = dict(base.info)
    info.update(model=str(folder), source="lora", base_model=base_name, merged=merge,
                fingerprint=f"lora-{_dir_fingerprint(folder)}-{base.info['fingerprint']}",
                parameters=sum(p.numel() for p in model.parameters()))
    return Loaded(model, tokenizer, info)


def _refuse_near_builtin(name: str) -> None:
    """A bare name (no owner/) one typo away from a built-in model is that typo: say so before any hub call, which
    would only end in a "not found" (or a wait for an unreachable hub)."""
    import difflib

    if "/" in name:
        return
    near = difflib.get_close_matches(name.lower(), (TINY_NAME, TINY_CAUSAL_NAME), n=1, cutoff=0.75)
    if near:
        raise RSGError(f"unknown model {name!r}: did you mean {near[0]}?", field="--model",
                       expected=f"{TINY_NAME}, {TINY_CAUSAL_NAME}, a local model folder, or a hub id such as "
                                "ai-forever/FRED-T5-1.7B")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything with more slashes, a leading . / ~ or a backslash is a path."""
    return (
        name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/") or not name
    )


# ----------------------------------------------------------------------------------------------- hub reachability

HUB_PROBE_TIMEOUT_S = 4.0


def hub_cache_only(repo_id: str, revision: str | None = None, *, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Decide, in a few seconds, how a hub id can be loaded: False = normally (the hub answers, or HF_HUB_OFFLINE
    is set and transformers reads the cache itself), True = from the local hub cache only (the hub does not
    answer but the model is cached). Raises one RSGError when the hub does not answer and the model is not cached.

    Why: with the hub unreachable, huggingface_hub retries every request with back-off (about 40 s) and prints a
    traceback per retry before transformers gives up; a single short probe of the endpoint avoids all of that."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT.rstrip("/")
    if _endpoint_answers(endpoint, timeout):
        return False
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        log.warning("the model hub (%s) does not answer; loading %s from the local cache", endpoint, repo_id)
        return True
    raise RSGError(
        f"cannot reach the model hub ({endpoint}) and {repo_id!r} is not in the local cache "
        f"({constants.HF_HUB_CACHE}): pass a local model folder as --model (download it where there is network, "
        "e.g. `hf download " + repo_id + " --local-dir DIR`), or copy a hub cache holding it here and set "
        "HF_HUB_OFFLINE=1",
        field="model")


def _endpoint_answers(endpoint: str, timeout: float) -> bool:
    """True when an HTTP request to the hub endpoint gets any answer (an HTTP error status counts: the server is
    there) within `timeout` seconds. Name resolution has no timeout of its own, so the request runs in a daemon
    thread and is abandoned when it takes too long. urllib honours the usual *_proxy variables."""
    import threading
    import urllib.error
    import urllib.request

    answered = threading.Event()

    def probe() -> None:
        try:
            req = urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout):
                pass
            answered.set()
        except urllib.error.HTTPError:
            answered.set()
        except Exception:  # noqa: BLE001 - any other failure (refused, no DNS, timeout, TLS) means no answer
            pass

    th = threading.Thread(target=probe, name="rsg-hub-probe", daemon=True)
    th.start()
    th.join(timeout)
    return answered.is_set()


# ----------------------------------------------------------------------------------------------- loaders


def _load_tiny(dev: torch.device, dtype: str | torch.dtype | None, *, causal: bool = False,
               device_map: str | None = None) -> Loaded:
    from rsg_eval.models import tiny

    model, tokenizer = tiny.build_tiny_causal() if causal else tiny.build_tiny()
    dt = resolve_dtype(dtype, dev, model_type=model.config.model_type)
    if device_map is not None:
        model.to(dtype=dt)
        model = _dispatch(model, device_map)
    else:
        model.to(device=dev, dtype=dt)
    name = TINY_CAUSAL_NAME if causal else TINY_NAME
    info = _info(model, tokenizer, model_id=name, source="tiny", revision=None, commit_hash=None,
                 fingerprint=_tiny_fingerprint(model, tokenizer, prefix=name))
    return Loaded(model, tokenizer, info)


def _load_hierarchical(path: Path, dev: torch.device, dtype: str | torch.dtype | None, allow_fp16: bool) -> Loaded:
    from rsg_eval.models.hierarchical import load_hierarchical  # owned by the hierarchical part

    dt = resolve_dtype(dtype, dev, model_type="t5", allow_fp16=allow_fp16)
    try:
        hier, tokenizer = load_hierarchical(path, device=dev, dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        raise RSGError(f"could not load the hierarchical checkpoint: {_short(exc)}", file=path) from exc
    if tokenizer is None:
        raise RSGError("hierarchical checkpoint without tokenizer files (save it with its tokenizer)", file=path)
    model = hier.seq2seq
    model.eval()
    info = _info(model, tokenizer, model_id=str(path), source="hierarchical", revision=None, commit_hash=None,
                 fingerprint=_dir_fingerprint(path))
    info["hierarchical"] = hier
    return Loaded(model, tokenizer, info)


def _load_transformers(
    name: str, dev: torch.device, dtype: str | torch.dtype | None, revision: str | None,
    trust_remote_code: bool, allow_fp16: bool, *, local: bool, local_files_only: bool = False,
    causal_ok: bool = False, device_map: str | None = None,
) -> Loaded:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    where = "local directory" if local else "hub id"
    common = dict(revision=revision, trust_remote_code=trust_remote_code)
    src = name
    if local_files_only:  # the hub does not answer (hub_cache_only): read the hub cache, never retry the network
        common["local_files_only"] = True
        # Load from the cached snapshot folder itself: with peft installed, from_pretrained also looks for an
        # adapter_config.json on the hub, a lookup that local_files_only does not reach (five retries with
        # back-off). The folder's path still names the commit, so the run records it as before.
        from huggingface_hub import snapshot_download

        src = snapshot_download(name, revision=revision, local_files_only=True)
    try:
        config = AutoConfig.from_pretrained(src, **common)
    except (OSError, ValueError, KeyError) as exc:
        hint = "" if local else " (the hub may be unreachable: download it first, or pass a local directory)"
        raise RSGError(f"could not load the model config from {where} {name!r}: {_short(exc)}{hint}") from exc
    causal = not getattr(config, "is_encoder_decoder", False)
    if causal and not causal_ok:
        _refuse_causal(name, config.model_type)
    dt = resolve_dtype(dtype, dev, model_type=config.model_type, allow_fp16=allow_fp16)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **common)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RSGError(f"could not load the tokenizer from {where} {name!r}: {_short(exc)}") from exc
    auto_cls = AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM
    placement = {"device_map": device_map} if device_map is not None else {}
    model = _from_pretrained(auto_cls, src, normalize_config(config), dt, {**common, **placement}, where)
    keep_head_untied(model)  # transformers 5 would tie FRED-T5's separate head on a later tie_weights()
    if device_map is None:
        model.to(dev)
    elif not getattr(model, "hf_device_map", None):  # transformers 5 records no plan when one device holds it all
        model.hf_device_map = {"": str(next(model.parameters()).device)}
    model.eval()
    commit = getattr(config, "_commit_hash", None) or getattr(model.config, "_commit_hash", None)
    fingerprint = _dir_fingerprint(Path(name)) if local else (commit or revision or "unknown")
    info = _info(model, tokenizer, model_id=name, source="local" if local else "hub", revision=revision,
                 commit_hash=commit, fingerprint=fingerprint)
    return Loaded(model, tokenizer, info)


def _from_pretrained(auto_cls: Any, name: str, config: Any, dt: torch.dtype, common: dict, where: str) -> Any:
    """Prefer safetensors; fall back to a pickled checkpoint (with a warning) only when there is none."""
    import transformers

    # transformers renamed torch_dtype to dtype in 4.56; keep both ends of our pinned range quiet.
    dkw = {"dtype": dt} if _version_tuple(transformers.__version__) >= (4, 56) else {"torch_dtype": dt}
    try:
        return auto_cls.from_pretrained(name, config=config, use_safetensors=True, **dkw, **common)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        # the weights' shapes are not the config's: one line naming the first tensor, not torch's whole list
        detail = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
        raise RSGError(f"the weights do not match config.json: {detail[:300]}", file=Path(name) / "config.json",
                       expected="the config.json saved with these weights (save_pretrained)") from None
    except (OSError, ValueError, *_weight_errors()) as exc:
        first = exc
    log.warning("no safetensors weights for %s; loading the pickled checkpoint", name)
    try:
        return auto_cls.from_pretrained(name, config=config, use_safetensors=False, **dkw, **common)
    except (OSError, ValueError, KeyError, *_weight_errors()) as exc:
        raise _weights_load_error(exc, first, name, where) from None


# ----------------------------------------------------------------------------------------------- info


def max_input_tokens(tokenizer: Any, config: Any = None) -> int:
    """The longest input we feed: the tokenizer's model_max_length when it is real, capped by the config's
    context length (n_positions, max_position_embeddings, n_ctx; never for T5, whose relative positions have no
    limit); else 512. For a seq2seq model this bounds the encoder input; for a decoder-only model, prompt + choice.

    FRED-T5's tokenizer has no model_max_length (transformers then reports ~1e30), so it gets 512.
    """
    n = getattr(tokenizer, "model_max_length", None)
    from_tokenizer = n if isinstance(n, int) and 0 < n < 100_000 else None
    if config is not None and getattr(config, "model_type", "") not in T5_FAMILY:
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            n_pos = getattr(config, key, None)
            if isinstance(n_pos, int) and 0 < n_pos < 1_000_000:  # positions past it do not exist
                return min(n_pos, from_tokenizer or n_pos)
    return from_tokenizer or DEFAULT_MAX_INPUT_TOKENS


def _info(model: Any, tokenizer: Any, *, model_id: str, source: str, revision: str | None,
          commit_hash: str | None, fingerprint: str) -> dict[str, Any]:
    cfg = model.config
    first = next(model.parameters())
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    return {
        "model": model_id,
        "kind": "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal",
        "source": source,
        "revision": revision,
        "commit_hash": commit_hash,
        "fingerprint": fingerprint,
        "model_type": cfg.model_type,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "device_map": _device_map_summary(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_input_tokens": max_input_tokens(tokenizer, cfg),
        "eos_token_id": eos,
        "decoder_start_token_id": getattr(cfg, "decoder_start_token_id", None),  # 5.x: seq2seq configs only
        "tie_word_embeddings": _head_tied(model),
        "tokenizer_appends_eos": _appends_eos(tokenizer),
    }


def _head_tied(model: Any) -> bool:
    """Whether the LM head really shares the input embeddings' tensor (transformers 5's T5 config always says
    `tie_word_embeddings: true`, so the flag alone does not tell)."""
    try:
        return head_is_tied(model)
    except (AttributeError, NotImplementedError):
        return bool(getattr(model.config, "tie_word_embeddings", True))


def _appends_eos(tokenizer: Any) -> bool:
    ids = tokenizer("a").input_ids
    return bool(ids) and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id


def _tiny_fingerprint(model: Any, tokenizer: Any, prefix: str = TINY_NAME) -> str:
    """Hash of the tiny model's config and tokenizer: changes when tiny.py changes what it builds."""
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return prefix + "-" + h.hexdigest()[:16]


def _dir_fingerprint(path: Path) -> str:
    """Cheap content fingerprint of a model directory: config files in full, weight files by size + head + tail."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= 2 << 20:
                h.update(fh.read())
            else:  # weights: first and last MiB are enough to tell checkpoints apart
                h.update(fh.read(1 << 20))
                fh.seek(-(1 << 20), 2)
                h.update(fh.read(1 << 20))
    return "dir-" + h.hexdigest()[:16]


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _short(exc: BaseException) -> str:
    """The first line of a library error, without its traceback."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------- damaged weights


def _check_local_weights(path: Path) -> None:
    """Refuse a model folder whose weights files are truncated or not weights at all, naming the file, before
    a loader meets them (rsg_eval.models.weight_files reads only their headers)."""
    from rsg_eval.models.weight_files import check_model_config, check_weight_files

    check_weight_files(path)
    if (path / "config.json").exists():
        check_model_config(path)


def _weight_errors() -> tuple[type[BaseException], ...]:
    """Exception types a weights loader raises on a damaged file besides OSError/ValueError."""
    import pickle

    out: list[type[BaseException]] = [pickle.UnpicklingError, EOFError]
    try:
        from safetensors import SafetensorError

        out.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        pass
    return tuple(out)


def _weights_load_error(exc: BaseException, first: BaseException, name: str, where: str) -> RSGError:
    """One line for weights that would not load: a refused pickle says so (not transformers' hint about
    TensorFlow checkpoints), anything else gives both attempts' first lines."""
    from rsg_eval.models.weight_files import describe_load_error

    refused = describe_load_error(exc, Path(name).expanduser())
    if refused is not None:
        return refused
    text = _short(exc).split(" If you tried to load a PyTorch model from a TF")[0]
    return RSGError(f"could not load the model weights from {where} {name!r}: {text} (safetensors: {_short(first)})",
                    expected="a folder with model.safetensors (or an intact pytorch_model.bin)")

# ----------------------------------------------------------------------------------------------- decoder-only models
# and placement (kept in their own functions: other parts of this module are edited by other work)


def model_kind(name_or_path: str | Path) -> str | None:
    """"seq2seq" or "causal" for a built-in name or a local folder, read without loading weights; None for a hub
    id (that would need the network). Commands use it to refuse seq2seq-only options before doing any work."""
    name = str(name_or_path)
    if name == TINY_NAME:
        return "seq2seq"
    if name == TINY_CAUSAL_NAME:
        return "causal"
    path = Path(name).expanduser()
    if (path / HIERARCHICAL_MARKER).is_file():
        return "seq2seq"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    from rsg_eval.models.weight_files import check_model_config

    check_model_config(path)  # a crafted config.json is one line here too, not AutoConfig's traceback
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError):
        return None
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def require_seq2seq(name_or_path: str | Path, what: str) -> None:
    """Refuse a decoder-only model for a seq2seq-only command (`what`, e.g. "rsg finetune") before it does any
    work, when that can be told without the network (built-in names, local folders); load_model refuses the
    rest (a hub id) when it reads the config."""
    if model_kind(name_or_path) == "causal":
        raise RSGError(f"{str(name_or_path)!r} is a decoder-only model; {what} works with seq2seq models only "
                       "(decoder-only models are scored by rsg zeroshot and fine-tuned by rsg finetune)",
                       field="model", expected="a seq2seq model such as FRED-T5, or 'tiny'")


def _refuse_causal(name: str, model_type: str | None) -> None:
    raise RSGError(f"{name!r} is a decoder-only model (model_type {model_type!r}); {SEQ2SEQ_ONLY} work with "
                   "seq2seq models only (decoder-only models are scored by rsg zeroshot and fine-tuned by rsg finetune)",
                   field="model", expected="a seq2seq model such as FRED-T5, or 'tiny'")


def _resolve_placement(device: str | torch.device | None, device_map: str | None) -> torch.device:
    """The device for inputs and dtype decisions; with a device_map, `device` must be left unset."""
    if device_map is None:
        return resolve_device(device)
    if device_map not in DEVICE_MAPS:
        raise RSGError(f"unknown device map {device_map!r}", field="device_map", expected=DEVICE_MAPS)
    if device is not None and str(device) != "auto":
        raise RSGError(f"--device {device} and --device-map {device_map} both place the model: give one",
                       field="device_map", expected="--device-map alone, or --device alone")
    return resolve_device(None)


def _dispatch(model: Any, device_map: str) -> Any:
    """Place a model built in memory (the tiny ones) the way from_pretrained(device_map=...) places a loaded one:
    accelerate's layer-to-device plan, then its hooks that move activations between devices."""
    from accelerate import dispatch_model, infer_auto_device_map

    plan = infer_auto_device_map(model, no_split_module_classes=getattr(model, "_no_split_modules", None) or [])
    model = dispatch_model(model, plan)
    model.hf_device_map = plan
    return model


def _device_map_summary(model: Any) -> dict[str, str] | None:
    """Which device each part of a model loaded with a device_map sits on (None otherwise), for config.json."""
    plan = getattr(model, "hf_device_map", None)
    return {str(k): str(v) for k, v in plan.items()} if plan else None
