"""What makes the fine-tuning loop fast, and that it still computes the same thing: the fused GELU / RMS-norm swap,
one host sync per optimizer step, and `rsg bench finetune --against hf-trainer` (the Trainer on our exact batches
reaches the same per-step losses)."""

from __future__ import annotations

import collections
import json

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.training.finetune.config import FinetuneConfig  # noqa: E402
from rsg_eval.models.kernels import TanhGELU, fused_t5  # noqa: E402

from tests._finetune_utils import learnable_terra, one_thread  # noqa: E402,F401 (one_thread: autouse fixture)


def _ops(fn):
    """Names of the aten ops `fn` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: collections.Counter = collections.Counter()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_fused_kernels_compute_the_same_function_and_are_restored():
    from transformers.activations import NewGELUActivation
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from rsg_eval.models.tiny import build_tiny

    model, _ = build_tiny(d_model=32, d_ff=64, d_kv=8, num_heads=4)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(5, 300, (3, 4), generator=g)
    keys = list(model.state_dict())

    def step():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_logits, ref_grads = step()
    plain_ops = _ops(step)
    with fused_t5(model) as n:
        assert n == 2 * 2 + (2 * 3 + 1) + (2 * 2 + 1)  # GELUs + norms of 2 + 2 layers (and final norms)
        logits, grads = step()
        fused_ops = _ops(step)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the swap is real: one gelu kernel (and its backward) where transformers runs pow, tanh and a chain of muls
    assert fused_ops["gelu"] == 4 and fused_ops["gelu_backward"] == 4 and "tanh" not in fused_ops
    assert plain_ops["tanh"] >= 4 and sum(fused_ops.values()) < sum(plain_ops.values())
    # and undone: transformers' modules are back, the parameters never changed names
    assert not any(isinstance(m, TanhGELU) for m in model.modules())
    assert sum(isinstance(m, NewGELUActivation) for m in model.modules()) == 4
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, T5LayerNorm))
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(step()[0], ref_logits, rtol=0, atol=0)


def test_one_host_sync_per_optimizer_step(monkeypatch, tmp_path):
    """With 2 micro-batches per step, the loop reads the device once per step (loss and gradient norm together);
    it used to read every micro-batch's loss and the norm separately (3 per step)."""
    from rsg_eval.models.tiny import build_tiny
    from rsg_eval.bench.hf_trainer import terra_shaped_pairs
    from rsg_eval.training.finetune.loop import Hooks, train

    model, tok = build_tiny()
    model.train()
    pairs = terra_shaped_pairs(16, len(tok))
    reads: collections.Counter = collections.Counter()
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            reads[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_step: list[int] = []
    losses: list[float] = []

    def on_step(state, loss):
        per_step.append(sum(reads.values()))
        losses.append(loss)

    cfg = FinetuneConfig(epochs=1, batch_size=4, grad_accum=2, max_source_length=600, eval_every=0)
    train(model, tok, pairs, cfg, evaluate=lambda m: {"score": 0.0}, ckpt_dir=tmp_path, fingerprint={},
          device=torch.device("cpu"), hooks=Hooks(on_step=on_step))
    assert len(per_step) == 2 and per_step == [1, 2]
    assert all(isinstance(x, float) and x > 0 for x in losses)


@pytest.mark.slow
def test_bench_against_the_trainer_matches_its_losses(tmp_path):
    """`rsg bench finetune --against hf-trainer` on the tiny model: both sides run the same number of steps, and the
    Trainer fed our batches (same init, optimizer, schedule) reaches our per-step losses to float rounding."""
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    learnable_terra(tmp_path / "data", n_train=24, n_val=4, n_test=2)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", "finetune", "--against", "hf-trainer", "--model", "tiny", "--data",
                                   str(tmp_path / "data"), "--check-steps", "3", "--rounds", "1", "--threads", "1",
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "ours vs the grouped Trainer" in res.output
    r = json.loads(out.read_text())
    ours, hf, same = r["runs"]["ours"], r["runs"]["hf-grouped"], r["runs"]["hf-same"]
    assert r["pairs"] == 24 and ours["steps"] == hf["steps"] == 3 and same["steps"] == 3
    assert ours["examples"] == hf["examples"] == 24
    assert len(ours["losses"]) == len(same["losses"]) == 3
    assert r["same_batches_max_abs_loss_diff"] < 1e-4 * max(ours["losses"])
    # not trivially equal: the steps really changed the model
    assert len({round(x, 3) for x in ours["losses"]}) == 3
    assert r["speedup_wall"] > 0 and r["speedup_cpu"] > 0


def test_bench_against_refuses_unknown_peers_and_models():
    from typer.testing import CliRunner

    from rsg_eval.cli import app
    from rsg_eval.core.errors import RSGError

    res = CliRunner().invoke(app, ["bench", "finetune", "--against", "deepspeed"])
    assert isinstance(res.exception, RSGError) and "expected: hf-trainer" in str(res.exception)
    res = CliRunner().invoke(app, ["bench", "finetune", "--against", "hf-trainer", "--model", "fredt5-1.7b"])
    assert isinstance(res.exception, RSGError) and "tiny" in str(res.exception)


def test_synthetic_pairs_have_terras_shape():
    from rsg_eval.bench.hf_trainer import terra_shaped_pairs, windows

    pairs = terra_shaped_pairs(400, 1000, seed=1)
    src = sorted(len(p.src) for p in pairs)
    assert 40 <= src[0] and src[-1] <= 512 and 140 < src[200] < 220
    assert all(p.tgt[-1] == 2 and 3 <= len(p.tgt) <= 4 for p in pairs)
    assert windows([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 5) == [1.5, 3.5, 5.5, 7.5, 9.5]


def test_turns_interleave_runs_and_count_only_their_own_time():
    """Two runs in threads take turns every 2 steps; a run's clock stops while the other holds the turn."""
    import time

    from rsg_eval.bench.hf_trainer import Turns

    turns = Turns(["slow", "fast"], every=2, device=torch.device("cpu"))
    order: list[str] = []

    def runner(name: str, steps: int, pause: float):
        def go():
            turns.enter(name)
            for i in range(steps):
                time.sleep(pause)
                order.append(name)
                if i == steps - 1:
                    turns.finish(name)
                else:
                    turns.step(name)
            return name
        return go

    out = turns.run({"slow": runner("slow", 5, 0.02), "fast": runner("fast", 3, 0.0)})
    assert out == {"slow": "slow", "fast": "fast"}
    assert order == ["slow", "slow", "fast", "fast", "slow", "slow", "fast", "slow"]
    assert len(turns.step_seconds["slow"]) == 4 and len(turns.step_seconds["fast"]) == 2
    assert turns.wall["slow"] >= 5 * 0.02 and turns.wall["fast"] < turns.wall["slow"]
