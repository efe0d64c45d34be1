"""`rsg bench memory`: the meta-device figures agree with a real model and with hand-computed sizes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.bench import memory  # noqa: E402

SMALL = dict(d_model=32, d_ff=64, num_heads=4, d_kv=8, num_layers=3, num_decoder_layers=2, vocab_size=100)


def test_meta_counts_match_a_real_model_and_block_inputs_are_hand_computed():
    from transformers import T5ForConditionalGeneration

    cfg = memory.fred_config(**SMALL)
    shape = memory.measure(cfg, batch=3, src_len=10, tgt_len=4)
    real = T5ForConditionalGeneration(cfg)
    assert shape.params == sum(p.numel() for p in real.parameters())
    # every block's input, bf16 (2 bytes): 3 encoder blocks of (3, 10, 32), 2 decoder blocks of (3, 4, 32)
    assert shape.block_inputs == 2 * (3 * 3 * 10 * 32 + 2 * 3 * 4 * 32)
    # the root unit: shared embedding + LM head (untied) + 2 final norms
    assert shape.root_params == 2 * 100 * 32 + 2 * 32
    # checkpointing keeps less than the whole forward's saved tensors
    assert shape.outside + shape.block_inputs + shape.block_peak < shape.all_saved


def test_rows_divide_the_states_over_fsdp_processes_and_offload_moves_them_to_the_cpu():
    shape = memory.Shape(params=1_000_000_000, root_params=0, block_params=0, outside=0, block_inputs=0,
                         block_peak=0, all_saved=0)
    by = {r.setup: r for r in memory.rows(shape)}
    one = by["1 x 80 GB"]
    assert (one.weights, one.grads, one.optimizer) == pytest.approx((4e9 / 2**30, 4e9 / 2**30, 8e9 / 2**30))
    assert by["2 x 48 GB, ddp"].weights == one.weights                       # ddp: a whole copy per GPU
    assert by["4 x 24 GB, fsdp"].optimizer == pytest.approx(one.optimizer / 4)
    off = by["2 x 24 GB, fsdp + offload"]
    assert off.weights == off.grads == off.optimizer == 0
    assert off.cpu == pytest.approx(16e9 / 2 / 2**30)
