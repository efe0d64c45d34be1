"""FLOPs of a T5 (encoder-decoder) step and model FLOPs utilisation (MFU) against a device's bf16 peak.

Counting (matmuls only, as is usual: norms, softmax and activations are a few % at these shapes). For one example
with S source and T target tokens, one forward pass costs

    2 x N_enc x S                        encoder projections (q, k, v, o, feed-forward) on source tokens
  + 2 x N_dec x T                        decoder projections on target tokens (self-attention, cross-attention
                                         q and o, feed-forward)
  + 2 x N_xkv x S                        the decoder's cross-attention k and v projections, which run on the
                                         encoder's output, i.e. on source tokens
  + 2 x d_model x V x T                  the LM head
  + L_enc x 4 S^2 h + L_dec x (4 T^2 h + 4 T S h)   attention scores and weighted values (h = heads x d_kv);
                                         the decoder's causal scores are computed in full (eager T5 attention)

and a training step three times that (forward, then backward for the inputs and for the weights). The popular
shortcut 6 x N x (S + T) multiplies every parameter by every token; in an encoder-decoder each half sees only its
own tokens, so the shortcut overstates a T5's cost about 2x (FRED-T5-1.7B at 512 + 512: 2.1x).

Model FLOPs count real tokens (padding excluded) and no recomputation: the work the step had to do. Hardware FLOPs
count what the device ran: padded shapes, and with gradient checkpointing one more forward pass of every block
(transformers checkpoints each T5 block; embeddings, final norm and LM head are not recomputed, nor is each
block's last matmul: see `recompute_flops`). MFU = model
FLOPs / (seconds x peak); HFU likewise with hardware FLOPs. tests/test_bench_gpu.py checks these counts against
torch's own FLOP counter on a real model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class T5Dims:
    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int
    gated: bool = True

    @classmethod
    def from_config(cls, cfg: Any) -> "T5Dims":
        gated = bool(getattr(cfg, "is_gated_act", str(getattr(cfg, "feed_forward_proj", "")).startswith("gated")))
        return cls(cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers,
                   getattr(cfg, "num_decoder_layers", None) or cfg.num_layers, cfg.vocab_size, gated)

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def ff_params(self) -> int:
        return (3 if self.gated else 2) * self.d_model * self.d_ff

    @property
    def enc_layer_params(self) -> int:
        """Projection weights of one encoder layer: q, k, v, o and the feed-forward."""
        return 4 * self.d_model * self.inner + self.ff_params

    @property
    def dec_layer_target_params(self) -> int:
        """Projection weights of one decoder layer that run on target tokens."""
        return 4 * self.d_model * self.inner + 2 * self.d_model * self.inner + self.ff_params

    @property
    def dec_layer_source_params(self) -> int:
        """The cross-attention k and v projections: they run on the encoder's output (source tokens)."""
        return 2 * self.d_model * self.inner


def forward_flops(d: T5Dims, s: int, t: int, *, encoder_layers: int | None = None, head: bool = True,
                  decoder: bool = True) -> int:
    """Matmul FLOPs of one forward pass over one example (s source tokens, t target tokens).

    encoder_layers: only the first k encoder layers (the hierarchical model's Block 1); decoder=False: encoder
    only; head=False: without the LM head (what gradient checkpointing recomputes)."""
    le = d.num_layers if encoder_layers is None else encoder_layers
    f = le * (2 * d.enc_layer_params * s + 4 * s * s * d.inner)
    if decoder:
        ld = d.num_decoder_layers
        f += ld * (2 * d.dec_layer_target_params * t + 2 * d.dec_layer_source_params * s
                   + 4 * t * t * d.inner + 4 * t * s * d.inner)
        if head:
            f += 2 * d.d_model * d.vocab_size * t
    return f


def model_flops(d: T5Dims, src_lens: Iterable[int], tgt_lens: Iterable[int]) -> int:
    """Training-step model FLOPs over examples of these real lengths: 3 x forward (no padding, no recompute)."""
    return sum(3 * forward_flops(d, s, t) for s, t in zip(src_lens, tgt_lens))


def hardware_flops(d: T5Dims, shapes: Iterable[Sequence[int]], *, checkpointing: bool = False) -> int:
    """Training-step FLOPs the device runs for padded batches `shapes` = [(B, S_padded, T_padded), ...]; with
    gradient checkpointing every block's forward runs twice (the LM head once)."""
    total = 0
    for b, s, t in shapes:
        per = 3 * forward_flops(d, s, t)
        if checkpointing:
            per += recompute_flops(d, s, t)
        total += b * per
    return total


def recompute_flops(d: T5Dims, s: int, t: int) -> int:
    """What gradient checkpointing reruns in the backward pass for one example: every block's forward, except its
    last matmul (the feed-forward's output projection `wo`): torch's non-reentrant checkpoint stops recomputing
    once it has every tensor the backward needs, and no backward needs `wo`'s output."""
    wo = 2 * d.d_ff * d.d_model * (d.num_layers * s + d.num_decoder_layers * t)
    return forward_flops(d, s, t, head=False) - wo


def shortcut_flops(n_params: int, src_tokens: int, tgt_tokens: int) -> int:
    """The decoder-only rule of thumb 6 x N x tokens applied to a seq2seq model (for comparison only)."""
    return 6 * n_params * (src_tokens + tgt_tokens)


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets. Checked in order: the first
# pattern that matches torch.cuda.get_device_name() wins, so specific names come before general ones.
BF16_PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H100|H800", "H100 SXM", 989.0),
    (r"H200.*NVL", "H200 NVL", 835.0),
    (r"H200|GH200", "H200 SXM", 989.0),
    (r"B200", "B200", 2250.0),
    (r"A100|A800", "A100", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"L40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
    (r"RTX A6000|\bA6000", "RTX A6000", 155.0),
)


def device_peak(name: str) -> tuple[str, float] | None:
    """(table name, dense bf16 TFLOP/s) for a device name, or None when the device is not in the table (V100
    and T4 have no bf16 tensor cores: None too)."""
    for pattern, label, peak in BF16_PEAK_TFLOPS:
        if re.search(pattern, name):
            return label, peak
    return None


def utilisation(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """FLOPs / (seconds x peak), or None without a peak."""
    if not peak_tflops or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def peak_line(device_name: str, peak: tuple[str, float] | None) -> str:
    """The line a report prints about the peak it used (or why MFU is omitted)."""
    if peak is None and device_name == "CPU":
        return "MFU omitted: a CPU run (the peak table is of GPUs' bf16 tensor cores)"
    if peak is None:
        return (f"MFU omitted: no bf16 peak known for {device_name!r} (known: "
                f"{', '.join(lbl for _, lbl, _ in BF16_PEAK_TFLOPS)}; --peak-tflops sets one)")
    return f"MFU against {peak[0]}'s dense bf16 peak, {peak[1]:.0f} TFLOP/s"
