"""The hierarchical multi-task FRED-T5 (ERNIE-3 style split encoder).

    input ─ embed ─ Block 1 (encoder layers 0..k-1) ─┬─ MC head  (topic, masked mean pool)      early exit
                                                     ├─ NER head (29 entity types per token)     early exit
                                                     └─ Block 2 (layers k..L-1, final norm) ─┬─ NLI head (3 classes)
                                                                                             └─ decoder ─ LM head

Adapters are zero-initialised bottlenecks, so a freshly built model computes exactly what the base model computes.
Two layouts (`HMTLConfig.adapter_layout`): "per-head" (default: MC, NER, NLI and LM each have their own adapter,
4 in all) and "shared-mc-ner" (the paper's wording, "a compact linear adapter attached to these heads": one norm
and adapter on Block 1's output read by both the MC and the NER head, one for NLI, one for LM, 3 in all).

The split is exact: layer 0's relative position bias (which already carries the additive attention mask) is
forwarded to Block 2, and the encoder's final layer norm runs only after the last layer; the Block-1 heads get their
own RMSNorm instead (FREDT5_NOTES.md sections 0 and 3.1).

`HierarchicalT5.seq2seq` is a plain `T5ForConditionalGeneration` whose `lm_head` is an `AdaptedLMHead`, so rank
scoring, generation and fine-tuning use it as a drop-in model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5LayerNorm

from rsg_eval.core.errors import RSGError
from rsg_eval.models.adapters import ACTIVATIONS, AdaptedLMHead, Bottleneck
from rsg_eval.models.untied import keep_head_untied, normalize_config, save_pretrained

CONFIG_NAME = "hmtl_config.json"
HEADS_NAME = "hmtl_heads.safetensors"
FORMAT_VERSION = 2          # 2: adapter_layout "shared-mc-ner" (per-head checkpoints are still written as 1)
ADAPTER_LAYOUTS = ("per-head", "shared-mc-ner")
# `rsg train-hmtl --ner-loss` value -> the NER representation a checkpoint records (HMTLConfig.ner_representation)
NER_LOSSES = {"softmax": "softmax-innermost", "multilabel": "multilabel-sigmoid"}


@dataclass
class HMTLConfig:
    """Our part of a hierarchical checkpoint (`hmtl_config.json`); the base T5 config is `config.json`."""

    split_layer: int                      # Block 1 = encoder layers [0, split_layer); 6 for FRED-T5-1.7B (24 layers)
    num_layers: int                       # encoder layers of the base model
    d_model: int
    adapter_dim: int                      # bottleneck size; d_model // 16 by default (96 for 1.7B)
    adapter_activation: str = "relu"      # "linear" = no activation (the paper's "linear adapter", read literally)
    head_dropout: float = 0.1
    # The heads' label names come from the caller (the corpus owns them: rsg_eval.corpus.labels.head_labels());
    # a head has one output per name. Every checkpoint records all three lists.
    mc_labels: list[str] = field(default_factory=list)
    ner_labels: list[str] = field(default_factory=list)
    nli_labels: list[str] = field(default_factory=list)
    # softmax-innermost: per token a softmax over [outside (logit fixed at 0), 29 types], the innermost entity's type
    # is the target; multilabel-sigmoid: one sigmoid per type, outside = all zeros (nested types at once).
    # Checkpoints written before the softmax loss existed carry multilabel-sigmoid.
    ner_representation: str = "multilabel-sigmoid"
    adapter_layout: str = "per-head"
    base_model: str | None = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, file: str | None = None) -> "HMTLConfig":
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("split_layer", "num_layers", "d_model", "adapter_dim") if k not in d]
        if missing:
            raise RSGError(f"missing keys {missing}", file=file, field=missing[0])
        if d.get("format_version", 1) > FORMAT_VERSION:
            raise RSGError(f"written by a newer rsg-eval (format {d['format_version']})", file=file,
                           field="format_version", expected=f"<= {FORMAT_VERSION}")
        if d.get("adapter_layout", "per-head") not in ADAPTER_LAYOUTS:
            raise RSGError(f"unknown adapter layout {d['adapter_layout']!r}", file=file, field="adapter_layout",
                           expected=list(ADAPTER_LAYOUTS))
        # Checkpoints written before --adapter-activation existed have no key: their adapters are ReLU (the default).
        if d.get("adapter_activation", "relu") not in ACTIVATIONS:
            raise RSGError(f"unknown adapter activation {d['adapter_activation']!r}", file=file,
                           field="adapter_activation", expected=sorted(ACTIVATIONS))
        if d.get("ner_representation", "multilabel-sigmoid") not in NER_LOSSES.values():
            raise RSGError(f"unknown NER representation {d['ner_representation']!r}", file=file,
                           field="ner_representation", expected=list(NER_LOSSES.values()))
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_split(spec: int | float | str | None, num_layers: int) -> int:
    """Number of Block-1 layers from a count (`6`) or a fraction of the encoder (`0.25`, the paper's 6/24).

    None means 0.25. The result is clamped to [1, num_layers - 1] for a fraction, and checked for a count.
    """
    if spec is None:
        spec = 0.25
    if isinstance(spec, str):
        try:
            spec = float(spec) if any(c in spec for c in ".eE") else int(spec)
        except ValueError:
            raise RSGError(f"not a number: {spec!r}", field="--encoder-split",
                           expected="a layer count or a fraction") from None
    if isinstance(spec, float) and 0 < spec < 1:
        return min(max(1, round(spec * num_layers)), max(1, num_layers - 1))
    if isinstance(spec, float) and not spec.is_integer():
        raise RSGError(f"encoder split {spec} is neither a fraction in (0, 1) nor a layer count",
                       field="--encoder-split",
                       expected="a layer count or a fraction")
    k = int(spec)
    if not 1 <= k <= num_layers:
        raise RSGError(f"encoder split {k} outside the encoder's {num_layers} layers", field="--encoder-split",
                       expected=f"1..{num_layers}")
    return k


def ner_softmax_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., n_types) NER head logits -> (..., 1 + n_types) class logits, "outside" = class 0 with its logit fixed
    at 0. The head keeps the paper's 29 outputs; softmax is shift-invariant, so a fixed outside logit loses nothing
    against a free 30th one (a linear head with bias can subtract any 30th row from the other 29)."""
    return torch.cat([logits.new_zeros(logits.shape[:-1] + (1,)), logits], dim=-1)


class ClassificationHead(nn.Module):
    """Norm -> adapter -> (masked mean pool) -> dropout -> linear. `pool=False` keeps one vector per token (NER).
    Under the shared MC+NER layout norm and adapter are identities here: the shared branch ran before."""

    def __init__(self, d_model: int, n_labels: int, adapter: nn.Module, *, norm: nn.Module | None,
                 pool: bool, dropout: float) -> None:
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()
        self.adapter = adapter
        self.pool = pool
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_labels)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # h: (B, T, d) raw Block-1 stream or normed Block-2 output; attention_mask: (B, T) 1 = token
        h = self.adapter(self.norm(h))
        if self.pool:
            m = attention_mask.unsqueeze(-1).to(h.dtype)                 # (B, T, 1)
            h = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)         # (B, d)
        return self.classifier(self.drop(h))                             # (B, n) or (B, T, n)


class HierarchicalT5(nn.Module):
    """Split-encoder multi-task T5: MC and NER heads on Block 1, NLI head and decoder on Block 2."""

    def __init__(self, seq2seq: T5ForConditionalGeneration, config: HMTLConfig) -> None:
        super().__init__()
        c = seq2seq.config
        if config.num_layers != c.num_layers or config.d_model != c.d_model:
            raise RSGError(f"hmtl config (layers {config.num_layers}, d_model {config.d_model}) does not match the "
                           f"base model (layers {c.num_layers}, d_model {c.d_model})", field="num_layers")
        self.config = config
        d, r, act = config.d_model, config.adapter_dim, config.adapter_activation
        if not isinstance(seq2seq.lm_head, AdaptedLMHead):
            seq2seq.lm_head = AdaptedLMHead(seq2seq.lm_head, Bottleneck(d, r, act))
        self.seq2seq = seq2seq
        eps = c.layer_norm_epsilon

        def block1_norm() -> T5LayerNorm:
            # Block 1 emits the raw pre-norm residual stream; each Block-1 head gets its own RMSNorm, started as a
            # copy of the encoder's final norm (FREDT5_NOTES.md 3.1). Never fed back into layer k.
            n = T5LayerNorm(d, eps=eps)
            with torch.no_grad():
                n.weight.copy_(seq2seq.encoder.final_layer_norm.weight.float())
            return n

        if config.adapter_layout not in ADAPTER_LAYOUTS:
            raise RSGError(f"unknown adapter layout {config.adapter_layout!r}", field="adapter_layout",
                           expected=list(ADAPTER_LAYOUTS))
        empty = [h for h in ("mc", "ner", "nli") if not getattr(config, f"{h}_labels")]
        if empty:  # a head has one output per label name; the caller names them (corpus.labels.head_labels)
            raise RSGError(f"no label names for the {', '.join(empty)} head", field=f"{empty[0]}_labels")
        shared = config.adapter_layout == "shared-mc-ner"
        # shared-mc-ner: one RMSNorm + one adapter on Block 1's output, read by both Block-1 heads (B, T, d)
        self.block1_shared: nn.Module | None = nn.Sequential(block1_norm(), Bottleneck(d, r, act)) if shared else None

        def block1_parts() -> tuple[nn.Module, nn.Module | None]:
            return (nn.Identity(), None) if shared else (Bottleneck(d, r, act), block1_norm())

        mc_adapter, mc_norm = block1_parts()
        ner_adapter, ner_norm = block1_parts()
        self.heads = nn.ModuleDict({
            "mc": ClassificationHead(d, len(config.mc_labels), mc_adapter, norm=mc_norm,
                                     pool=True, dropout=config.head_dropout),
            "ner": ClassificationHead(d, len(config.ner_labels), ner_adapter, norm=ner_norm,
                                      pool=False, dropout=config.head_dropout),
            # Block 2 ends with the encoder's own final_layer_norm, so the NLI head needs no extra norm.
            "nli": ClassificationHead(d, len(config.nli_labels), Bottleneck(d, r, act), norm=None,
                                      pool=True, dropout=config.head_dropout),
        })
        # New modules follow the base model's device and dtype (e.g. bf16 weights loaded with dtype=...).
        dt = seq2seq.shared.weight.dtype
        self.heads.to(device=seq2seq.device, dtype=dt)
        if self.block1_shared is not None:
            self.block1_shared.to(device=seq2seq.device, dtype=dt)
        self.seq2seq.lm_head.adapter.to(device=seq2seq.device, dtype=dt)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, seq2seq: T5ForConditionalGeneration, *, split: int | float | str | None = None,
                  adapter_dim: int | None = None, adapter_activation: str = "relu", head_dropout: float = 0.1,
                  mc_labels: Sequence[str], ner_labels: Sequence[str], nli_labels: Sequence[str],
                  base_model: str | None = None, adapter_layout: str = "per-head",
                  ner_loss: str = "softmax") -> "HierarchicalT5":
        """Wrap a plain T5 model. Heads and adapters are new; the base weights are used as they are."""
        c = seq2seq.config
        if ner_loss not in NER_LOSSES:
            raise RSGError(f"unknown NER loss {ner_loss!r}", field="ner-loss", expected=list(NER_LOSSES))
        cfg = HMTLConfig(
            split_layer=resolve_split(split, c.num_layers), num_layers=c.num_layers, d_model=c.d_model,
            adapter_dim=adapter_dim or max(1, c.d_model // 16), adapter_activation=adapter_activation,
            head_dropout=head_dropout, base_model=base_model, adapter_layout=adapter_layout,
            ner_representation=NER_LOSSES[ner_loss], mc_labels=list(mc_labels), ner_labels=list(ner_labels),
            nli_labels=list(nli_labels),
        )
        return cls(seq2seq, cfg)

    @property
    def encoder(self) -> nn.Module:
        return self.seq2seq.encoder

    @property
    def lm_adapter(self) -> Bottleneck:
        return self.seq2seq.lm_head.adapter

    def block1_layers(self) -> nn.ModuleList:
        return self.encoder.block[: self.config.split_layer]

    def block2_layers(self) -> nn.ModuleList:
        return self.encoder.block[self.config.split_layer:]

    # ------------------------------------------------------------------ the split encoder
    def encode_block1(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Embeddings + layers [0, k). Returns (raw stream (B, T, d), position bias (B|1, H, T, T), additive mask).

        The position bias returned by layer 0 already includes the additive mask; Block 2 must reuse it.
        """
        enc = self.encoder
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = enc.embed_tokens(input_ids)                                          # (B, T, d)
        # Same additive mask as T5Stack: 0 for tokens, finfo.min for padding; (B, 1, 1, T)
        ext = (1.0 - attention_mask[:, None, None, :].to(embeds.dtype)) * torch.finfo(embeds.dtype).min
        h = enc.dropout(embeds)
        bias = None
        for layer in self.block1_layers():
            h, bias = self._run_layer(layer, h, ext, bias)
        return h, bias, ext

    def encode_block2(self, h: torch.Tensor, position_bias: torch.Tensor | None, ext_mask: torch.Tensor
                      ) -> torch.Tensor:
        """Layers [k, L) on Block 1's raw stream, then the final layer norm and dropout, as in T5Stack."""
        enc = self.encoder
        for layer in self.block2_layers():
            h, position_bias = self._run_layer(layer, h, ext_mask, position_bias)
        return enc.dropout(enc.final_layer_norm(h))                                   # (B, T, d)

    @staticmethod
    def _run_layer(layer: nn.Module, h: torch.Tensor, ext: torch.Tensor, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        # Positional arguments like T5Stack does: the gradient-checkpointing wrapper passes only *args through
        # torch.utils.checkpoint. Encoder layers: no cross-attention, no cache.
        # cache_position = arange(T) as T5Stack builds it; layer 0 needs it to size the relative bias.
        pos = torch.arange(h.shape[1], device=h.device)
        out = layer(h, ext, bias, None, None, None, use_cache=False, output_attentions=False,
                    return_dict=True, cache_position=pos)
        return out[0], out[1]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both blocks: (Block-1 raw stream, final encoder output), each (B, T, d)."""
        h1, bias, ext = self.encode_block1(input_ids, attention_mask)
        return h1, self.encode_block2(h1, bias, ext)

    # ------------------------------------------------------------------ heads (early exit)
    def _block1_out(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the Block-1 heads read (B, T, d): the raw stream, or the shared norm + adapter's output."""
        h1, _, _ = self.encode_block1(input_ids, attention_mask)
        return h1 if self.block1_shared is None else self.block1_shared(h1)

    def mc_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Topic logits (B, n_mc) from Block 1 only."""
        return self.heads["mc"](self._block1_out(input_ids, attention_mask), attention_mask)

    def ner_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token entity-type logits (B, T, n_ner) from Block 1 only. softmax-innermost: the token's class is
        the argmax over [outside = 0, these logits]; multilabel-sigmoid: sigmoid > 0.5 = the token has that type."""
        return self.heads["ner"](self._block1_out(input_ids, attention_mask), attention_mask)

    def nli_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Entailment / contradiction / neutral logits (B, 3) from Blocks 1 and 2; the decoder does not run."""
        _, h2 = self.encode(input_ids, attention_mask)
        return self.heads["nli"](h2, attention_mask)

    def lm_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-level cross-entropy of `labels` (B, T'), -100 = ignored, through the whole model."""
        return self.seq2seq(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                            use_cache=False).loss

    # ------------------------------------------------------------------ training
    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                target: torch.Tensor, ner_loss: str | None = None) -> torch.Tensor:
        """One task's training loss on one batch (a 0-d fp32 tensor): the entry point DDP and FSDP wrap, so their
        hooks see every call. task: "mc", "ner", "nli" (the heads) or a generation task (the LM loss).

        input_ids, attention_mask: (B, T). target: mc/nli (B,) class indices; ner (B, T) the innermost entity's
        class per token (-100 = padding) for the softmax loss, or (B, T, n) 0/1 floats for the multi-label loss;
        generation (B, T') label ids (-100 = ignored). The loss is a mean over the batch's examples (heads) or its
        real tokens (NER, generation), computed in fp32 even under bf16 autocast. MC, NLI and NER (softmax) use the
        paper's cross-entropy against one-hot targets, its Eq. 1. ner_loss: "softmax" | "multilabel"; default from
        the config's ner_representation."""
        import torch.nn.functional as F

        if task == "mc":
            return F.cross_entropy(self.mc_logits(input_ids, attention_mask).float(), target)
        if task == "nli":
            return F.cross_entropy(self.nli_logits(input_ids, attention_mask).float(), target)
        if task == "ner":
            if ner_loss is None:
                ner_loss = "softmax" if self.config.ner_representation == NER_LOSSES["softmax"] else "multilabel"
            logits = self.ner_logits(input_ids, attention_mask).float()                  # (B, T, n)
            if ner_loss == "softmax":
                # per token, softmax over outside + n types against the innermost entity's type; padding ignored
                full = ner_softmax_logits(logits)                                        # (B, T, 1 + n)
                return F.cross_entropy(full.flatten(0, 1), target.flatten(), ignore_index=-100)
            # multi-label: one binary cross-entropy per (token, type), averaged over real tokens and types
            per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            m = attention_mask.unsqueeze(-1).to(per.dtype)
            return (per * m).sum() / (m.sum() * per.shape[-1]).clamp(min=1.0)
        return self.lm_loss(input_ids, attention_mask, target)

    # ------------------------------------------------------------------ checkpoints
    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not in the base T5 checkpoint: the three heads, the shared Block-1 branch (if any)
        and the LM adapter."""
        sd = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        if self.block1_shared is not None:
            sd.update({f"block1_shared.{k}": v for k, v in self.block1_shared.state_dict().items()})
        sd.update({f"lm_adapter.{k}": v for k, v in self.lm_adapter.state_dict().items()})
        return sd

    def save_pretrained(self, path: str | Path, tokenizer: Any = None,
                        extra: Callable[[Path], None] | None = None,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write one checkpoint directory atomically: temp dir next to it, then rename over the old one.

        Contents: config.json + model.safetensors (the base T5 with its plain lm_head, loadable by transformers on
        its own), hmtl_heads.safetensors (heads + LM adapter), hmtl_config.json, and the tokenizer files.
        `extra(tmp_dir)` may add files (the trainer's resume state) before the directory is renamed into place.
        `state`: this model's full state dict when its own parameters are shards (FSDP: gathered by the caller).
        """
        from rsg_eval.core.io import guarded_write

        path = Path(path)
        with guarded_write(path):  # a full disk: one line naming the checkpoint (the temp dir is removed below)
            self._save_to(path, tokenizer, extra, state)
        return path

    def _save_to(self, path: Path, tokenizer: Any, extra: Callable[[Path], None] | None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            wrapped = self.seq2seq.lm_head
            self.seq2seq.lm_head = wrapped.proj          # save the base exactly as transformers expects it
            try:
                # save_pretrained (models/untied.py): a config transformers 4 and 5 both read as untied
                if state is None:
                    save_pretrained(self.seq2seq, tmp, safe_serialization=True)
                else:   # the base's tensors from the full state: seq2seq.X, its LM head seq2seq.lm_head.proj.X
                    base = {k[len("seq2seq."):].replace("lm_head.proj.", "lm_head."): v for k, v in state.items()
                            if k.startswith("seq2seq.") and not k.startswith("seq2seq.lm_head.adapter.")}
                    save_pretrained(self.seq2seq, tmp, safe_serialization=True, state_dict=base)
            finally:
                self.seq2seq.lm_head = wrapped
            own = self.heads_state_dict() if state is None else _heads_from_state(state)
            heads = {k: v.detach().contiguous().cpu() for k, v in own.items()}
            save_file(heads, str(tmp / HEADS_NAME), metadata={"format": "pt"})
            # a per-head checkpoint stays readable by releases before the shared layout (format 1)
            cfg = {**asdict(self.config), "format_version": 2 if self.config.adapter_layout != "per-head" else 1}
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if extra is not None:
                extra(tmp)
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _heads_from_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`heads_state_dict`'s names and tensors taken from the whole model's state dict."""
    out = {k: v for k, v in state.items() if k.startswith(("heads.", "block1_shared."))}
    pre = "seq2seq.lm_head.adapter."
    out.update({"lm_adapter." + k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})
    return out


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`; an existing `path` is moved aside first and removed only after the rename."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_hierarchical_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_hmtl_config(path: str | Path) -> HMTLConfig:
    f = Path(path) / CONFIG_NAME
    from rsg_eval.core.io import read_json

    if not f.exists():
        raise RSGError("not a hierarchical checkpoint (no hmtl_config.json)", file=f)
    data = read_json(f)
    return HMTLConfig.from_dict(data, file=str(f))


def load_hierarchical(path: str | Path, *, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None) -> tuple[HierarchicalT5, Any]:
    """Load a checkpoint written by `HierarchicalT5.save_pretrained`: (model in eval mode, tokenizer or None)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    cfg = read_hmtl_config(path)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        import transformers
        new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
        kwargs["dtype" if new else "torch_dtype"] = dtype     # `torch_dtype` is deprecated from 4.56 on
    config = normalize_config(T5Config.from_pretrained(str(path)))
    seq2seq = keep_head_untied(T5ForConditionalGeneration.from_pretrained(str(path), config=config, **kwargs))
    model = HierarchicalT5(seq2seq, cfg)
    heads_file = path / HEADS_NAME
    if not heads_file.is_file():
        raise RSGError("hierarchical checkpoint without its heads file", file=heads_file)
    state = load_file(str(heads_file))
    own = model.heads_state_dict()
    if set(state) != set(own):
        raise RSGError(f"heads file keys do not match the config: missing {sorted(set(own) - set(state))[:3]}, "
                       f"unexpected {sorted(set(state) - set(own))[:3]}", file=heads_file)
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = None
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
