"""FRED-T5's separate LM head under transformers 4.x and 5.x.

FRED-T5 (like every T5 v1.1 model) has an `lm_head` that is NOT tied to the input embeddings and no d_model**-0.5
scaling of the decoder output (../shared/docs/FREDT5_NOTES.md 0.7, 1.1). transformers 4.x reads that from
`tie_word_embeddings: false`. transformers 5 rewrote the T5 config: `T5Config.__post_init__` always sets
`tie_word_embeddings=True` and moves the old flag into `scale_decoder_outputs` (False for FRED). Then:

- `from_pretrained` skips the tie (with a warning) only when both tensors are in the checkpoint and differ;
- a model built from a config (`T5ForConditionalGeneration(config)`: the tiny test models, the benches) gets its
  head tied to `shared`, and a later `model.tie_weights()` (resize_token_embeddings, some peft paths) re-ties it;
- `save_pretrained` writes `tie_word_embeddings: true, scale_decoder_outputs: false`, which transformers 4.x reads
  as a tied, scaled head: the wrong model.

The functions here keep the head untied under both: `declared_untied` reads the intent from either config layout,
`keep_head_untied` gives the head its own parameter and drops it from the instance's tie map (transformers 5 only;
on 4.x nothing is tied to begin with), `build_t5` builds from a config with the head initialised as 4.x does, and
`save_pretrained` writes a config both versions read as untied. Only the LM head is touched: the encoder and
decoder embeddings stay tied to `shared` (T5 always shares them).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from rsg_eval.core.io import atomic_write_text

log = logging.getLogger(__name__)

T5_FAMILY = ("t5", "mt5", "umt5", "longt5")
HEAD_KEY = "lm_head.weight"


def is_t5(config: Any) -> bool:
    return getattr(config, "model_type", "") in T5_FAMILY


def declared_untied(config: Any) -> bool:
    """True when the config declares a separate LM head: transformers 4.x's `tie_word_embeddings: false`, or
    transformers 5's `scale_decoder_outputs: false` on a T5 config (its tie flag is always True there)."""
    if is_t5(config):
        scale = getattr(config, "scale_decoder_outputs", None)
        if scale is not None:
            return not scale
    return not getattr(config, "tie_word_embeddings", True)


def scales_decoder_output(config: Any) -> bool:
    """True when a T5 model multiplies the decoder output by d_model**-0.5 before the head (original T5 with a
    tied head); False for T5 v1.1 / FRED-T5 and every non-T5 model."""
    return is_t5(config) and not declared_untied(config)


def normalize_config(config: Any) -> Any:
    """Make a loaded T5 config mean the same under the installed transformers: a config saved by transformers 5
    for an untied model (`tie_word_embeddings: true, scale_decoder_outputs: false`) read by 4.x would tie and
    scale the head; 4.x gets `tie_word_embeddings=False` instead. Under transformers 5 the flag must stay True (it
    also ties the encoder and decoder embeddings to `shared`), so its configs are left as they are."""
    if is_t5(config) and declared_untied(config) and not transformers5():
        config.tie_word_embeddings = False
    return config


def transformers5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def head_is_tied(model: Any) -> bool:
    """True when the output projection shares its weight with the input embeddings (one tensor, two names)."""
    out = model.get_output_embeddings()
    w_out = getattr(out, "weight", None)  # AdaptedLMHead exposes its projection's weight here
    w_in = model.get_input_embeddings().weight
    return w_out is not None and (w_out is w_in or w_out.data_ptr() == w_in.data_ptr())


def keep_head_untied(model: Any, *, fresh_init: bool = False) -> Any:
    """Untie a T5 model's LM head when its config declares it separate (no-op otherwise, and on transformers 4.x
    where nothing was tied). A tied head gets its own parameter: a copy of the tied values after loading a
    checkpoint that lacked the head, or (`fresh_init`, for models built from a config) normal(0, factor) as
    transformers 4.x initialises an untied T5 head. The instance's tie map loses `lm_head.weight`, so a later
    `tie_weights()` or `save_pretrained` treats the head as its own tensor."""
    cfg = model.config
    if not (is_t5(cfg) and declared_untied(cfg)):
        return model
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head_is_tied(model):
        weight = head.weight.detach().clone()
        if fresh_init:
            weight.normal_(mean=0.0, std=float(getattr(cfg, "initializer_factor", 1.0)))
        else:
            log.warning("the checkpoint declares a separate LM head but holds none; it starts as a copy of the "
                        "input embeddings")
        head.weight = nn.Parameter(weight, requires_grad=model.get_input_embeddings().weight.requires_grad)
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict) and HEAD_KEY in keys:  # transformers 5: {target: source}; 4.x has a list
        model._tied_weights_keys = {k: v for k, v in keys.items() if k != HEAD_KEY}
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop(HEAD_KEY, None)
    return model


def build_t5(config: Any) -> Any:
    """`T5ForConditionalGeneration(config)` with the head untied when the config says so, under both versions.
    Call it under the caller's seeded RNG: the fresh head draws from it."""
    from transformers import T5ForConditionalGeneration

    return keep_head_untied(T5ForConditionalGeneration(config), fresh_init=True)


def save_pretrained(model: Any, path: str | Path, **kwargs: Any) -> None:
    """`model.save_pretrained(path)`, then a config.json that transformers 4.x and 5 both read as untied: 5 writes
    `tie_word_embeddings: true` (with `scale_decoder_outputs: false`), which 4.x would tie and scale."""
    model.save_pretrained(str(path), **kwargs)
    if not (is_t5(model.config) and declared_untied(model.config)):
        return
    cfg_file = Path(path) / "config.json"
    data = json.loads(cfg_file.read_text(encoding="utf-8"))
    if data.get("tie_word_embeddings") is not False:
        data["tie_word_embeddings"] = False
        data["scale_decoder_outputs"] = False
        atomic_write_text(cfg_file, json.dumps(data, indent=2, sort_keys=True) + "\n")

