"""FLOPs of a T5 training step (rsg_eval.bench.flops): by hand on a tiny config, against torch's FLOP counter on a
real model (with and without gradient checkpointing), and the device peak table."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.bench.flops import (  # noqa: E402
    T5Dims, device_peak, forward_flops, hardware_flops, model_flops, peak_line, shortcut_flops, utilisation)


def test_forward_flops_by_hand():
    """d_model 4, d_ff 8, 2 heads x d_kv 2 (inner 4), 1 + 1 layers, vocab 10, gated; 3 source and 2 target tokens."""
    d = T5Dims(d_model=4, d_ff=8, d_kv=2, num_heads=2, num_layers=1, num_decoder_layers=1, vocab_size=10)
    enc_params = 4 * 4 * 4 + 3 * 4 * 8            # q, k, v, o (4 x 4 each) + wi_0, wi_1, wo (4 x 8 each) = 160
    enc = 2 * enc_params * 3 + 4 * 3 * 3 * 4      # projections on 3 tokens (960) + QK^T and AV (144)
    dec_tgt_params = 4 * 16 + 2 * 16 + 3 * 32     # self q, k, v, o + cross q, o + feed-forward = 192
    dec = (2 * dec_tgt_params * 2                 # on 2 target tokens (768)
           + 2 * (2 * 16) * 3                     # cross k, v on the 3 encoder outputs (192)
           + 4 * 2 * 2 * 4 + 4 * 2 * 3 * 4)       # self scores/values 2x2 (64), cross 2x3 (96)
    head = 2 * 4 * 10 * 2                         # LM head on 2 target tokens (160)
    assert (enc, dec, head) == (1104, 1120, 160)
    assert forward_flops(d, 3, 2) == 2384
    assert model_flops(d, [3], [2]) == 3 * 2384
    assert forward_flops(d, 3, 2, decoder=False) == 1104
    # two examples of different lengths vs their padded batch: model FLOPs count real tokens only
    assert model_flops(d, [3, 1], [2, 1]) == 3 * (2384 + forward_flops(d, 1, 1))
    assert hardware_flops(d, [(2, 3, 2)]) == 2 * 3 * 2384 > model_flops(d, [3, 1], [2, 1])
    # checkpointing reruns each block's forward except its last matmul (wo: 2 x 8 x 4 per token), not the head
    wo = 2 * 8 * 4 * (3 + 2)
    assert hardware_flops(d, [(1, 3, 2)], checkpointing=True) == 3 * 2384 + (2384 - 160 - wo)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hardware_flops_equal_torchs_flop_counter(checkpointing):
    """Forward + backward of the tiny T5 on a (2, 5) -> (2, 3) batch, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from rsg_eval.models.tiny import build_tiny

    torch.manual_seed(0)
    model, _ = build_tiny()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    ids = torch.randint(5, 100, (2, 5))
    labels = torch.randint(5, 100, (2, 3))
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False)
        out.loss.backward()
    d = T5Dims.from_config(model.config)
    assert counter.get_total_flops() == hardware_flops(d, [(2, 5, 3)], checkpointing=checkpointing)


def test_the_6n_shortcut_overstates_fredt5_about_twice():
    from transformers import T5Config

    from rsg_eval.bench.finetune import FRED_1_7B

    cfg = T5Config(**FRED_1_7B)
    d = T5Dims.from_config(cfg)
    n = 1_740_400_000  # FREDT5_NOTES.md 1.1
    ratio = shortcut_flops(n, 512, 512) / model_flops(d, [512], [512])
    assert 1.9 < ratio < 2.3


def test_device_peaks_and_mfu():
    assert device_peak("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.0)
    assert device_peak("NVIDIA H100 PCIe") == ("H100 PCIe", 756.0)
    assert device_peak("NVIDIA H200") == ("H200 SXM", 989.0)
    assert device_peak("NVIDIA A100-SXM4-80GB") == ("A100", 312.0)
    assert device_peak("NVIDIA L4") == ("L4", 121.0)
    assert device_peak("NVIDIA L40S") == ("L40S", 362.0)
    assert device_peak("NVIDIA A10") == ("A10", 125.0)
    assert device_peak("Tesla V100-SXM2-16GB") is None and device_peak("Tesla T4") is None
    assert "MFU omitted" in peak_line("Tesla T4", None)
    assert utilisation(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert utilisation(1e12, 1.0, None) is None
