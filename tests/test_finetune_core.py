"""The fine-tuning core on the tiny T5: targets, batch plan, schedule, config, exact resume, NaN, full disk."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from rsg_eval.core.errors import RSGError  # noqa: E402
from rsg_eval.engine import checkpoint as ck  # noqa: E402
from rsg_eval.training.finetune.config import FinetuneConfig, load_config_set  # noqa: E402
from rsg_eval.training.finetune.data import Pair, build_pairs, encode_target, epoch_plan, gold_targets, rank_slice  # noqa: E402
from rsg_eval.training.finetune.loop import Hooks, lr_factor, plan_sizes, train  # noqa: E402

from tests._finetune_utils import mean_nll, one_thread  # noqa: E402,F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def tiny():
    from rsg_eval.models.tiny import build_tiny

    return build_tiny


@pytest.fixture(scope="module")
def terra_pairs(tiny):
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.data import load_items

    _, tok = tiny()
    tpl = load_template("TERRa")
    items = load_items(resolve_data("sample"), "TERRa", "train")
    return tok, build_pairs(items, lambda it: tpl.render(it, tokenizer=tok, max_tokens=96), tok, 96, 8)


# ------------------------------------------------------------------------------------------------- targets

def test_target_ends_in_exactly_one_eos(tiny):
    _, tok = tiny()
    eos = tok.eos_token_id
    ids = encode_target(tok, "Да", 16)
    assert ids[-1] == eos and ids.count(eos) == 1
    assert tok.decode(ids[:-1]) == "Да"
    # a text that already ends in </s> does not get a second one; truncation keeps the </s>
    assert encode_target(tok, "Да</s>", 16).count(eos) == 1
    assert len(encode_target(tok, "очень длинный ответ " * 20, 5)) == 5
    assert encode_target(tok, "очень длинный ответ " * 20, 5)[-1] == eos


def test_pairs_per_task_rules(tiny):
    """MuSeRC: every answer trains (yes and no); RuCoS: one pair per distinct gold entity; no gold: none."""
    from rsg_eval.core.data import resolve_data
    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.data import load_items

    _, tok = tiny()
    ds = resolve_data("sample")
    for task in ("MuSeRC", "RuCoS", "PARus"):
        items = load_items(ds, task, "train")
        tpl = load_template(task)
        pairs = build_pairs(items, lambda it: tpl.render(it), tok, 512, 512)
        assert not any(p.cut for p in pairs)
        expected = sum(len(gold_targets(it)) for it in items)
        assert len(pairs) == expected
        if task == "MuSeRC":
            assert expected == len(items)  # every answer, label 0 or 1
            assert {it.gold for it in items} == {0, 1}
        if task == "RuCoS":
            assert expected >= len(items)
            # each target decodes to that item's gold entity text (+ </s>)
            by_key = {it.key: it for it in items}
            for p in pairs:
                it = by_key[p.key]
                text = tpl.render(it).choices
                assert tok.decode(p.tgt[:-1]) in {text[it.labels.index(g)] for g in gold_targets(it)}
    # RuCoS' default choice is the whole query with the entity filled in: a short max_target_len cuts it
    items = load_items(ds, "RuCoS", "train")
    cut = build_pairs(items, lambda it: load_template("RuCoS").render(it), tok, 512, 8)
    assert any(p.cut for p in cut) and all(len(p.tgt) <= 8 and p.tgt[-1] == tok.eos_token_id for p in cut)
    unlabeled = load_items(ds, "TERRa", "test")
    assert build_pairs(unlabeled, lambda it: load_template("TERRa").render(it), tok, 64, 8) == []


# ------------------------------------------------------------------------------------------------- plan

def test_epoch_plan_covers_every_example_once_and_groups_lengths():
    lengths = [(i * 37) % 101 for i in range(203)]
    for group in (True, False):
        plan = epoch_plan(lengths, 8, seed=3, epoch=1, group_by_length=group)
        flat = [i for b in plan for i in b]
        assert sorted(flat) == list(range(203))
        assert plan == epoch_plan(lengths, 8, seed=3, epoch=1, group_by_length=group)  # deterministic
        assert plan != epoch_plan(lengths, 8, seed=3, epoch=2, group_by_length=group)  # reshuffled per epoch
    grouped = epoch_plan(lengths, 8, 3, 1, group_by_length=True)
    plain = epoch_plan(lengths, 8, 3, 1, group_by_length=False)

    def padding(plan):  # padded positions a batch wastes
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in plan)

    assert padding(grouped) < padding(plain) / 3


def test_rank_slices_partition_a_global_batch():
    batch = [5, 1, 7, 3, 9]
    parts = [rank_slice(batch, r, 2) for r in range(2)]
    assert sorted(parts[0][0] + parts[1][0]) == sorted(batch) and parts[0][1] == parts[1][1] == 1.0
    # a batch with fewer examples than ranks: the empty rank gets a zero-weight stand-in
    assert rank_slice([4], 1, 2) == ([4], 0.0)


# ------------------------------------------------------------------------------------------------- schedule

def test_lr_schedule_by_hand():
    # 10 updates, 4 warm-up: 1/4, 2/4, 3/4, 4/4, then linear 1 - (s-4)/6
    assert [lr_factor(s, 10, 4, "linear") for s in range(10)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_factor(9, 10, 0, "constant") == 1.0
    cfg = FinetuneConfig(batch_size=4, grad_accum=3, epochs=5)
    # 22 pairs, 2 ranks -> global micro-batch 8 -> 3 micro-batches -> 1 step per epoch
    assert plan_sizes(22, cfg, 2) == (3, 1, 5)
    assert plan_sizes(22, FinetuneConfig(batch_size=4, grad_accum=2, epochs=5, max_steps=7), 1) == (6, 3, 7)


# ------------------------------------------------------------------------------------------------- config

def test_config_precedence_and_errors(tmp_path):
    p = tmp_path / "ft.yaml"
    p.write_text("defaults:\n  lr: 3.0e-4\n  epochs: 5\ntasks:\n  rcb:\n    lr: 1.0e-4\n    batch_size: 4\n",
                 encoding="utf-8")
    cs = load_config_set(p, {"epochs": 7})
    assert cs.for_task("TERRa").lr == 3e-4 and cs.for_task("RCB").lr == 1e-4
    assert cs.for_task("RCB").batch_size == 4 and cs.for_task("TERRa").batch_size == FinetuneConfig().batch_size
    assert cs.for_task("RCB").epochs == cs.for_task("TERRa").epochs == 7  # a typed flag wins everywhere
    assert load_config_set(p, {"lr": 1e-5}).for_task("RCB").lr == 1e-5
    p.write_text("defaults:\n  learning_rate: 1\n", encoding="utf-8")
    with pytest.raises(RSGError, match="unknown setting 'learning_rate'"):
        load_config_set(p)
    p.write_text("tasks:\n  NoSuchTask: {lr: 1}\n", encoding="utf-8")
    with pytest.raises(RSGError):
        load_config_set(p)
    with pytest.raises(RSGError, match="schedule"):
        load_config_set(None, {"schedule": "exponential"})


def test_shipped_configs_parse():
    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.glob("finetune*.yaml"))
    assert files, "configs/finetune*.yaml missing"
    for f in files:
        cs = load_config_set(f)
        assert cs.for_task("RuCoS").epochs >= 1


# ------------------------------------------------------------------------------------------------- loop

def _cfg(**kw) -> FinetuneConfig:
    base = dict(epochs=2, batch_size=4, grad_accum=2, lr=2e-3, warmup_ratio=0.2, dropout=0.1, save_every=1,
                max_source_length=96, max_target_length=8)
    base.update(kw)
    return FinetuneConfig(**base)


def _run(tiny, pairs, tok, cfg, ckpt, hooks=None, dtype=None):
    model, _ = tiny()
    if dtype is not None:
        model.to(dtype)
    model.train()
    res = train(model, tok, pairs, cfg, evaluate=lambda m: {"loss": mean_nll(m, tok, pairs[:6]),
                                                           "score": -mean_nll(m, tok, pairs[:6])},
                ckpt_dir=ckpt, fingerprint={"model": "tiny"}, device=torch.device("cpu"), hooks=hooks)
    return model, res


class Killed(Exception):
    pass


def test_resume_after_a_kill_reaches_the_same_weights(tiny, terra_pairs, tmp_path):
    """12 pairs, batch 4, accumulation 2 -> 2 optimizer steps per epoch, 3 epochs = 6 steps. Kill the run
    after step 3 (mid-epoch 2, after a checkpoint), rerun: same final weights, losses and val history as an
    uninterrupted run. Dropout is on, so the restored RNG states matter."""
    tok, pairs = terra_pairs
    cfg = _cfg(epochs=3)
    full, res_full = _run(tiny, pairs, tok, cfg, tmp_path / "a")
    assert res_full.state.step == 6 and res_full.resumed_from is None

    def kill(state, loss):
        if state.step == 3:
            raise Killed

    with pytest.raises(Killed):
        _run(tiny, pairs, tok, cfg, tmp_path / "b", Hooks(on_step=kill))
    assert ck.read_meta(ck.find(tmp_path / "b", "last"))["state"]["step"] == 3
    resumed, res = _run(tiny, pairs, tok, cfg, tmp_path / "b")
    assert res.resumed_from == 3 and res.state.step == 6
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n
    assert res.state.history == res_full.state.history
    # a finished task is not trained again
    again, res2 = _run(tiny, pairs, tok, cfg, tmp_path / "b", Hooks(on_step=kill))
    assert res2.state.done and res2.resumed_from == 6
    # the best checkpoint holds the state of the best val score
    best = ck.read_meta(ck.find(tmp_path / "a", "best"))
    scores = [r["score"] for r in res_full.state.history]
    assert best["metrics"]["score"] == max(scores) and best["step"] == res_full.state.best_step
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["best", "last"]  # only best and last


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny, terra_pairs, tmp_path):
    tok, pairs = terra_pairs
    with pytest.raises(Killed):
        _run(tiny, pairs, tok, _cfg(), tmp_path, Hooks(on_step=lambda s, l: (_ for _ in ()).throw(Killed)))
    with pytest.raises(RSGError, match="batch_size"):
        _run(tiny, pairs, tok, _cfg(batch_size=2), tmp_path)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_state(tiny, terra_pairs, tmp_path):
    """After step 2 the LM head starts to emit NaN (as an overflowing activation would): the run stops at
    step 3 with a message naming the step, and `last` holds the clean state after step 2."""
    tok, pairs = terra_pairs
    cfg = _cfg(epochs=3, grad_accum=1, warmup_ratio=0.0, dropout=None)
    model, _ = tiny()
    model.train()
    poisoned = {"on": False}
    model.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan") if poisoned["on"] else None)

    def poison(state, loss):
        poisoned["on"] = state.step == 2

    with pytest.raises(RSGError, match=r"loss became nan at epoch 1, optimizer step 3") as exc:
        train(model, tok, pairs, cfg, evaluate=lambda m: {"score": 0.0}, ckpt_dir=tmp_path,
              fingerprint={}, device=torch.device("cpu"), hooks=Hooks(on_step=poison))
    assert "last good state (after step 2)" in str(exc.value)
    last = ck.find(tmp_path, "last")
    assert ck.read_meta(last)["state"]["step"] == 2
    from safetensors.torch import load_file

    saved = load_file(str(last / ck.WEIGHTS))
    current = model.state_dict()
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.equal(t, current[n]) for n, t in saved.items())  # the NaN step changed nothing


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tiny, terra_pairs, tmp_path, monkeypatch):
    tok, pairs = terra_pairs
    real = ck.save_weights
    calls = {"n": 0}

    def flaky(model, path):
        calls["n"] += 1
        if calls["n"] >= 5:  # last@1, last@2, best@3, last@3 succeed; the disk is full at step 4
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, path)

    monkeypatch.setattr(ck, "save_weights", flaky)
    with pytest.raises(ck.SaveError, match="the disk is full") as exc:
        _run(tiny, pairs, tok, _cfg(grad_accum=1, save_every=1), tmp_path)
    assert "'last' and 'best' checkpoints" in str(exc.value) and "intact" in str(exc.value)
    assert "rerun" in str(exc.value)
    assert isinstance(exc.value, RSGError)
    assert not any(p.name.endswith((".new", ".old")) for p in tmp_path.iterdir())
    last = ck.find(tmp_path, "last")
    assert ck.read_meta(last)["state"]["step"] == 3  # the save at step 4 failed
    # disk freed: the same call resumes from step 3 and finishes like an undisturbed run
    monkeypatch.setattr(ck, "save_weights", real)
    resumed, res = _run(tiny, pairs, tok, _cfg(grad_accum=1, save_every=1), tmp_path)
    assert res.resumed_from == 3 and res.state.done
    clean, _ = _run(tiny, pairs, tok, _cfg(grad_accum=1, save_every=1), tmp_path / "clean")
    assert all(torch.equal(a, b) for a, b in zip(clean.state_dict().values(), resumed.state_dict().values()))


def test_interrupted_swap_falls_back_to_old(tmp_path, tiny):
    model, _ = tiny()
    ck.write_checkpoint(tmp_path, "last", model, {"state": {"step": 1}})
    # simulate a crash between the two renames: only last.old exists
    (tmp_path / "last").rename(tmp_path / "last.old")
    assert ck.find(tmp_path, "last") == tmp_path / "last.old"
    ck.write_checkpoint(tmp_path, "last", model, {"state": {"step": 2}})
    assert json.loads((tmp_path / "last" / "meta.json").read_text())["state"]["step"] == 2
    assert not (tmp_path / "last.old").exists()


def test_tiny_or_empty_train_split(tiny, terra_pairs, tmp_path):
    tok, pairs = terra_pairs
    from rsg_eval.training.finetune.loop import NoTrainingData

    with pytest.raises(NoTrainingData, match="no training examples"):
        _run(tiny, [], tok, _cfg(), tmp_path / "empty")
    _, res = _run(tiny, pairs[:1], tok, _cfg(epochs=2, grad_accum=4), tmp_path / "one")
    assert res.state.step == 2 and len(res.state.history) == 2  # one step per epoch, one eval per epoch


def test_bench_counts_the_same_examples_with_and_without_grouping(tiny):
    """The benchmark's two configurations run one epoch over the same examples: equal example and real-token
    counts, less padding when grouped."""
    from rsg_eval.bench import finetune as bench

    model, tok = tiny()
    model.train()
    pairs = bench.synthetic_pairs(16, len(tok), 96, 8, seed=1)
    rows = [bench.run_config(model, pairs, 4, g, torch.device("cpu"), name="tiny") for g in (False, True)]
    assert rows[0].examples == rows[1].examples == 16
    assert rows[0].tokens == rows[1].tokens == sum(p.length for p in pairs)
    assert rows[1].padded_tokens < rows[0].padded_tokens
    assert all(r.seconds > 0 and r.peak_mb >= 0 for r in rows)


def test_accumulation_and_checkpointing_do_not_change_the_update(tiny, terra_pairs, tmp_path):
    """The loss is the mean token NLL over the whole optimizer step, so batch 8 = batch 4 x accumulation 2 =
    batch 2 x accumulation 4 (same plan, same update up to rounding); gradient checkpointing recomputes
    activations and must not change anything either (dropout off).

    What "up to rounding" means: the micro-batches pad to different lengths and sum in a different order, so
    the gradients differ in their last bits; Adam divides each gradient element by its own magnitude, so an
    element whose gradient is near zero can move by up to lr per step on noise alone (float32 on an AMD EPYC:
    1.5e-5 in one weight, against updates of 3e-3). An element-wise tolerance is thus either CPU-dependent or
    meaningless. The models run in float64 (rounding ~1e-16 instead of ~1e-7) and each weight tensor's
    distance is measured against the size of its own update: float64 rounding gives ~3e-6 of the update
    (T5's layer norm still squares in float32), while averaging the loss per micro-batch instead of per
    step (the bug this guards against) gives ~0.3."""
    tok, pairs = terra_pairs
    common = dict(epochs=1, dropout=0.0, save_every=0, group_by_length=False, max_grad_norm=1.0)
    init = {k: v.double() for k, v in tiny()[0].state_dict().items()}
    runs = {}
    for name, kw in {"b8": dict(batch_size=8, grad_accum=1), "b4x2": dict(batch_size=4, grad_accum=2),
                     "b2x4": dict(batch_size=2, grad_accum=4),
                     "b8gc": dict(batch_size=8, grad_accum=1, gradient_checkpointing=True)}.items():
        model, res = _run(tiny, pairs, tok, _cfg(**common, **kw), tmp_path / name, dtype=torch.float64)
        runs[name] = (model.state_dict(), res.state.history[0])
    ref_w, ref_h = runs["b8"]
    # b4x2 and b2x4 see the same examples per step only if the plan's global batches line up: batch 8 with
    # 12 pairs = [8, 4]; batch 4 x 2 = [4+4, 4]; batch 2 x 4 = [2+2+2+2, 2+2] -> the same two steps
    for name in ("b4x2", "b2x4", "b8gc"):
        w, h = runs[name]
        assert h["train_loss"] == pytest.approx(ref_h["train_loss"], rel=1e-6), name  # float32 layer norm: ~4e-9
        for k in ref_w:
            update = (ref_w[k] - init[k]).norm()
            if update == 0:  # untouched (e.g. no gradient reaches it): must stay exactly as it was
                assert torch.equal(w[k], ref_w[k]), (name, k)
            else:
                assert (w[k] - ref_w[k]).norm() <= 1e-4 * update, (name, k)


def test_an_ignored_sigint_stays_ignored(tiny, terra_pairs, tmp_path):
    """Under nohup or as a background job SIGINT is ignored: training must not start honouring it (nor leave a
    handler behind); SIGTERM, which a scheduler sends, is still caught."""
    import signal

    from rsg_eval.engine.stop import StopRequest as _StopRequest

    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with _StopRequest() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is term
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_saves_at_the_next_step_boundary_and_resumes_exactly(tiny, terra_pairs, tmp_path):
    """SIGINT (Ctrl-C; SIGTERM from a scheduler likewise) during step 2 of 6, with no periodic saving: the loop
    saves `last` at that step boundary and stops; the rerun ends exactly where an undisturbed run does."""
    import signal

    tok, pairs = terra_pairs
    cfg = _cfg(epochs=3, save_every=0)
    full, _ = _run(tiny, pairs, tok, cfg, tmp_path / "a")

    def interrupt(state, loss):
        if state.step == 1:  # the signal arrives while step 2 would be next; honoured at a boundary
            signal.raise_signal(signal.SIGINT)

    # Ctrl-C as in a terminal, whatever this test process inherited (a background job starts with SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="stopped at step 1"):
            _run(tiny, pairs, tok, cfg, tmp_path / "b", Hooks(on_step=interrupt))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert ck.read_meta(ck.find(tmp_path / "b", "last"))["state"]["step"] == 1
    resumed, res = _run(tiny, pairs, tok, cfg, tmp_path / "b")
    assert res.resumed_from == 1
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


def test_config_fields_are_named_as_the_options_and_old_keys_still_read(tmp_path):
    """max_source_length / max_target_length (as --max-source-length ...); a config file with the old keys reads the
    same, and the recorded settings keep the old names, so a run folder written before resumes."""
    old = tmp_path / "old.yaml"
    old.write_text("defaults: {max_source_len: 77}\ntasks:\n  RCB: {max_target_len: 9}\n", encoding="utf-8")
    cs = load_config_set(old)
    assert cs.for_task("RCB").max_source_length == 77 and cs.for_task("RCB").max_target_length == 9
    assert load_config_set(None, {"max_target_length": 5}).for_task("TERRa").max_target_length == 5
    rec = cs.for_task("RCB").record()
    assert rec["max_source_len"] == 77 and rec["max_target_len"] == 9 and "max_source_length" not in rec
