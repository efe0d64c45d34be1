"""Adafactor with the T5 recipe's settings (rsg_eval.engine.optim): the same steps as transformers'
Adafactor called with those settings, the settings' effect checked by hand, and optimizer-state sizes: measured on
CPU for a small model against the shape formula, and computed on the meta device for FRED-T5-1.7B."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.optimization import Adafactor

from rsg_eval.engine.optim import (ADAFACTOR_SETTINGS, make_adafactor, make_optimizer, measured_state_bytes,
                                   param_groups, state_bytes)
from rsg_eval.models.tiny import build_tiny


def _batch(tok):
    ids = tok(["<LM>Девочка открыла окно.", "Вопрос: да или нет?"], padding=True, return_tensors="pt")
    return dict(input_ids=ids.input_ids, attention_mask=ids.attention_mask, labels=torch.tensor([[5, 6, 2], [7, 2, -100]]))


def _steps(model, opt, batch, n=3):
    model.train()
    for _ in range(n):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_steps_match_transformers_adafactor_with_the_recipe_settings():
    model, tok = build_tiny()
    twin = copy.deepcopy(model)
    batch = _batch(tok)
    _steps(model, make_optimizer(model.parameters(), name="adafactor", lr=1e-3, weight_decay=0.01), batch)
    direct = Adafactor(twin.parameters(), lr=1e-3, weight_decay=0.01, scale_parameter=False, relative_step=False,
                       warmup_init=False)
    _steps(twin, direct, batch)
    start, _ = build_tiny()
    moved = 0.0
    for (n, a), b, s in zip(model.named_parameters(), twin.parameters(), start.parameters()):
        assert torch.equal(a, b), n
        moved = max(moved, float((a - s).abs().max()))
    assert moved > 1e-4


def test_settings_fixed_lr_no_parameter_scaling_no_first_moment():
    assert ADAFACTOR_SETTINGS["relative_step"] is False and ADAFACTOR_SETTINGS["scale_parameter"] is False
    assert ADAFACTOR_SETTINGS["warmup_init"] is False and ADAFACTOR_SETTINGS["beta1"] is None
    # Two matrices with the same gradient but weights 100x apart get the same update: lr is not scaled by the
    # tensor's RMS (scale_parameter off) and not replaced by a relative step. The first update of a rank-1
    # gradient G = u v^T is -lr * G / RMS-normalised = -lr * sign-like, with RMS 1 after clipping.
    small = torch.nn.Parameter(torch.full((3, 4), 0.01))
    big = torch.nn.Parameter(torch.full((3, 4), 1.0))
    opt = make_adafactor([small, big], lr=0.1)
    g = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0, 0.5, 2.0]))
    small.grad, big.grad = g.clone(), g.clone()
    opt.step()
    d_small, d_big = small.detach() - 0.01, big.detach() - 1.0
    torch.testing.assert_close(d_small, d_big)
    rms = float(d_small.pow(2).mean().sqrt())
    assert rms == pytest.approx(0.1, rel=1e-3)  # the update's RMS is exactly lr (clip_threshold 1 on RMS)
    assert torch.all(torch.sign(d_small) == -torch.sign(g))
    assert set(opt.state[small]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col", "RMS"}  # no exp_avg


def test_state_size_formula_matches_what_the_optimizers_hold():
    model, tok = build_tiny()
    batch = _batch(tok)
    shapes = [tuple(p.shape) for p in model.parameters()]
    for name in ("adafactor", "adamw"):
        m = copy.deepcopy(model)
        opt = make_optimizer(param_groups(m, 0.01), name=name, lr=1e-3)
        _steps(m, opt, batch, n=1)
        steps = 4 * len(shapes) if name == "adamw" else 0  # AdamW's per-tensor step counters (0-d fp32)
        assert measured_state_bytes(opt) == state_bytes(shapes, name) + steps, name
    ratio = state_bytes(shapes, "adamw") / state_bytes(shapes, "adafactor")
    assert ratio > 20  # the tiny T5 (64-wide, 1.1k vocabulary)


def test_fredt5_1_7b_states_on_the_meta_device():
    from transformers import T5Config

    from rsg_eval.models.untied import build_t5
    from rsg_eval.bench.finetune import FRED_1_7B

    with torch.device("meta"):
        model = build_t5(T5Config(**FRED_1_7B))
    shapes = [tuple(p.shape) for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    assert 1.73e9 < n < 1.75e9  # FREDT5_NOTES.md 1.1: 1,740.4 M with the separate head
    adamw, adafactor = state_bytes(shapes, "adamw"), state_bytes(shapes, "adafactor")
    assert adamw == 8 * n  # ~13.9 GB
    assert adafactor < 0.01 * adamw  # ~8 MB: rows + columns of every matrix
    assert 4 * n + 4 * n + adamw > 27e9  # weights + gradients + AdamW states: the issue's ~27 GB


def test_bench_memory_shows_both_optimizers_measured_as_computed():
    from rsg_eval.bench import memory

    small = memory.measured_small_states()
    for name, (got, want) in small.items():
        assert got == want, name
    assert small["adamw"][0] > 20 * small["adafactor"][0]
