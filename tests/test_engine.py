"""The engine's parts in one process: finishing a step (one read, the non-finite guard), the stop request's exit
codes, RNG capture, early stopping, the optimizer's groups, and trainer states read without pickle."""

from __future__ import annotations

import signal

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.engine import rng  # noqa: E402
from rsg_eval.engine.early_stop import EarlyStopping  # noqa: E402
from rsg_eval.engine.optim import make_optimizer, param_groups, state_bytes  # noqa: E402
from rsg_eval.engine.runtime import Dist, use_bf16  # noqa: E402
from rsg_eval.engine.step import StepGuard, finish_step  # noqa: E402
from rsg_eval.engine.stop import StopRequest, Stopped  # noqa: E402
from rsg_eval.core.errors import RSGError  # noqa: E402


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))


def test_finish_step_clips_reads_once_and_steps():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    (net(torch.ones(2, 3)).sum() * 100).backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
    before = [p.detach().clone() for p in net.parameters()]
    out = finish_step(net.parameters(), opt, sched, torch.tensor([1.5, 2.5]), Dist(), max_norm=1.0)
    assert out.applied and out.losses == [1.5, 2.5] and out.grad_norm == pytest.approx(float(want))
    # clipped to norm 1: the SGD update's norm is lr x 1
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(), before)))
    assert float(moved) == pytest.approx(0.1, rel=1e-5)
    assert all(p.grad is None for p in net.parameters()) and opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_non_finite_step_is_skipped_and_counted():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.ones(2, 3)).sum().backward()
    guard = StepGuard(tolerance=0)
    out = finish_step(net.parameters(), opt, None, torch.tensor(float("nan")), Dist(), guard=guard)
    assert not out.applied and guard.skipped == 1 and guard.exceeded
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))   # the parameters are untouched
    assert all(p.grad is None for p in net.parameters())
    net(torch.ones(2, 3)).sum().backward()
    assert finish_step(net.parameters(), opt, None, torch.tensor(1.0), Dist(), guard=guard).applied
    assert guard.skipped == 1 and not guard.exceeded


def test_sigterm_stops_with_143_and_sigint_with_130():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.agreed(Dist())
        exc = stop.stopped("saved")
    assert isinstance(exc, Stopped) and isinstance(exc, KeyboardInterrupt) and exc.exit_code == 143
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.stopped("x").exit_code == 130
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_rng_json_round_trip_restores_every_generator():
    import json
    import random

    import numpy as np

    state = json.loads(json.dumps(rng.state()))
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    rng.restore(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a
    # a train-hmtl state from before the engine: the torch generator as a tensor, nothing else
    old = {"torch": torch.get_rng_state()}
    b = float(torch.rand(1))
    rng.restore(old)
    assert float(torch.rand(1)) == b
    assert rng.pick([{"r": 0}, {"r": 1}], 1) == {"r": 1} and rng.pick([{"r": 0}], 3) == {"r": 0}


def test_early_stopping_counts_evaluations_without_improvement():
    es = EarlyStopping(patience=2, higher_is_better=False)
    assert es.update(1.0) and not es.stop
    assert not es.update(1.0) and not es.stop     # equal is no improvement
    assert es.update(0.5) and es.since_best == 0
    es.update(0.7)
    es.update(0.6)
    assert es.stop and es.best == 0.5
    back = EarlyStopping.from_json(es.to_json(), 2, False)
    assert (back.best, back.since_best, back.stop) == (0.5, 2, True)
    assert not EarlyStopping(0).stop


def test_param_groups_exempt_norms_and_biases():
    net = _net()
    groups = param_groups(net, 0.01)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(net[0].weight), id(net[2].weight)}
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 4
    opt = make_optimizer(groups, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.01
    assert state_bytes([(3, 4), (4,)]) == 8 * 16
    with pytest.raises(RSGError, match="unknown optimizer"):
        make_optimizer(net.parameters(), name="lion", lr=1e-3)


def test_bf16_rule():
    cpu = torch.device("cpu")
    assert not any(use_bf16(s, cpu) for s in ("auto", "on", "off", None, True))


def test_old_trainer_states_load_without_pickle_and_objects_are_refused(tmp_path):
    """train-hmtl wrote trainer_state.pt with torch.save and read it with weights_only=False; those states hold
    only state dicts, numbers, lists and tensors, so they load with weights_only=True. Anything else is one line."""
    from rsg_eval.training.hmtl import train as hmtl_train

    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-6, max_lr=1e-4, mode="exp_range", gamma=0.9,
                                              cycle_momentum=False)
    blob = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 1, "step": 0, "global_step": 4,
            "sums": {"mc": [1.5, 3]}, "history": [{"epoch": 1, "split": "train", "mean": 0.5}],
            "rng": [{"torch": torch.get_rng_state()}]}
    torch.save(blob, tmp_path / hmtl_train.STATE_NAME)
    st = hmtl_train._load_resume_point(tmp_path)
    assert st["global_step"] == 4 and st["sums"] == {"mc": [1.5, 3]}
    assert torch.equal(st["rng"][0]["torch"], blob["rng"][0]["torch"])
    torch.save({"x": _Payload()}, tmp_path / hmtl_train.STATE_NAME)
    with pytest.raises(RSGError, match="no pickle is executed"):
        hmtl_train._load_resume_point(tmp_path)


class _Payload:
    pass


def test_a_model_with_frozen_weights_saves_and_resumes_what_trains_only(tmp_path):
    """LoRA's shape: frozen weights plus trainable ones. The checkpoint holds the trainable tensors only (marked in
    the safetensors metadata); loading fills them and leaves the frozen ones; an unmarked file that lacks a tensor
    is still refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from rsg_eval.engine import checkpoint as ck

    def make(seed):
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        m[0].requires_grad_(False)   # the frozen "base"
        return m

    a = make(0)
    ck.write_checkpoint(tmp_path, "last", a, {"step": 1}, trainable_only=True)
    with safe_open(str(tmp_path / "last" / ck.WEIGHTS), framework="pt") as fh:
        assert sorted(fh.keys()) == ["1.bias", "1.weight"] and fh.metadata()["rsg_weights"] == "trainable"
    b = make(1)
    frozen_before = b[0].weight.clone()
    ck.load_weights(b, tmp_path / "last" / ck.WEIGHTS)
    assert torch.equal(b[1].weight, a[1].weight) and torch.equal(b[0].weight, frozen_before)
    # every parameter trainable: the whole model is saved, as before
    full = torch.nn.Linear(3, 3)
    ck.write_checkpoint(tmp_path, "full", full, {}, trainable_only=True)
    with safe_open(str(tmp_path / "full" / ck.WEIGHTS), framework="pt") as fh:
        assert sorted(fh.keys()) == ["bias", "weight"] and "rsg_weights" not in fh.metadata()
    # an unmarked file lacking the frozen tensors is a damaged checkpoint, not a partial one
    save_file({"1.weight": a[1].weight.detach().clone(), "1.bias": a[1].bias.detach().clone()},
              str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RSGError, match="lacks tensors"):
        ck.load_weights(make(2), tmp_path / "plain.safetensors")
