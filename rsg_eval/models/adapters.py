"""Bottleneck adapters and the wrapped LM head of the hierarchical FRED-T5.

An adapter is `h + up(act(down(h)))` (act: ReLU by default, or none: "linear") with `up` initialised to zero, so
a freshly built adapter is the identity and the model it sits in computes exactly what the base model computes
(FREDT5_NOTES.md section 3.2).
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "linear": nn.Identity, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU,
               "tanh": nn.Tanh}
# What `rsg train-hmtl --adapter-activation` offers. "relu" (the default) is the usual bottleneck adapter; "linear"
# is the paper's wording ("a compact linear adapter"), read literally: h + up(down(h)), an affine map that a linear
# head after it could absorb, so it adds no capacity of its own (docs/hmtl.md, "Adapters").
ADAPTER_ACTIVATIONS = ("relu", "linear")


class Bottleneck(nn.Module):
    """Residual bottleneck adapter: d_model -> dim -> d_model, up-projection zero-initialised."""

    def __init__(self, d_model: int, dim: int, activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(d_model, dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(dim, d_model)
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming on the way down, zeros on the way up: exact identity at initialisation ("mam_adapter" init).
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d_model) -> (..., d_model)
        # Run the small projections in the dtype of the adapter weights (fp32 under bf16 autocast is fine too).
        return h + self.drop(self.up(self.act(self.down(h))))


class AdaptedLMHead(nn.Module):
    """`lm_head` replacement: LM adapter on the decoder output, then the original vocabulary projection.

    It stands in for `T5ForConditionalGeneration.lm_head`, so `model(...)`, `model.generate(...)` and rank scoring
    all go through the adapter without any change to transformers' code. `proj` is the original `nn.Linear`.
    """

    def __init__(self, proj: nn.Linear, adapter: Bottleneck) -> None:
        super().__init__()
        self.proj = proj
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:  # code that reads lm_head.weight (dtype/device probes) keeps working
        return self.proj.weight

    @property
    def in_features(self) -> int:
        return self.proj.in_features

    @property
    def out_features(self) -> int:
        return self.proj.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d_model) -> (B, T, vocab)
        return self.proj(self.adapter(h))
