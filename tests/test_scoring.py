"""Rank classification on the tiny model: the fast path against the naive per-choice pass and against the loss
transformers itself computes; batch-size invariance; normalisations and calibration worked out from the sums;
bad input; out-of-memory back-off (a real forward hook that raises, on the real model)."""

from __future__ import annotations

import pytest
import torch

from rsg_eval.errors import RSGError
from rsg_eval.models.tiny import build_tiny
from rsg_eval.scoring import _score, predict, score_choices, score_choices_naive

PROMPTS = [
    "<LM>Мальчик уронил стакан на каменный пол кухни. Что произошло в результате?",
    "Текст: Иван Петрович работал учителем в сельской школе. Вопрос: он учитель?\nОтвет:",
    "<LM>Поезд опоздал на сорок минут из-за снегопада, поэтому",
    "Да?",
    "<LM>Учёные из университета опубликовали статью о климате Арктики и таянии льдов, а журналисты задали "
    "вопросы министру о поддержке науки в России.",
]
CHOICES = [
    ["Стакан разбился.", "Стакан остался целым."],
    ["да", "нет", "не знаю"],
    ["мы пропустили начало концерта", "мы пришли вовремя", "поезд", "мёд"],
    ["нет"],
    ["Правительство России приняло решение.", "Команда выиграла матч.", "Бабушка испекла пирог."],
]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny()


def _close(a, b, tol=1e-4):
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            assert abs(x - y) <= tol * max(1.0, abs(y)), (x, y)


def _reference_ll(model, tok, prompt: str, choice: str) -> float:
    """Log-likelihood from transformers' own loss: mean CE over the labels times their number."""
    ids = tok(prompt, return_tensors="pt").input_ids
    labels = torch.tensor([tok(choice, add_special_tokens=False).input_ids + [tok.eos_token_id]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return -loss.item() * labels.shape[1]


def test_fast_equals_naive_and_transformers_loss(tiny):
    model, tok = tiny
    fast = score_choices(model, tok, PROMPTS, CHOICES)
    naive = score_choices_naive(model, tok, PROMPTS, CHOICES)
    _close(fast, naive)
    for mode in ("encoder_once", "kv_once"):
        other = _score(model, tok, PROMPTS, CHOICES, batch_size=16, normalize="sum", calibrate=False,
                       calibration_prompts=None, max_input_tokens=None, progress=None, mode=mode)
        _close(other, naive)
    assert predict(fast) == predict(naive)
    assert [len(r) for r in fast] == [len(c) for c in CHOICES]
    for i, j in [(0, 0), (1, 2), (2, 3), (4, 1)]:
        assert fast[i][j] == pytest.approx(_reference_ll(model, tok, PROMPTS[i], CHOICES[i][j]), abs=1e-3)
    assert all(s < 0 for row in fast for s in row)


def test_scoring_uses_eval_mode_and_restores_the_callers_mode():
    model, tok = build_tiny(dropout_rate=0.5)
    want = score_choices(model, tok, PROMPTS, CHOICES)
    model.train()
    got = score_choices(model, tok, PROMPTS, CHOICES)  # dropout 0.5 would change every score if left on
    assert model.training
    _close(got, want, tol=1e-6)


def test_batch_size_does_not_change_scores(tiny):
    model, tok = tiny
    a = score_choices(model, tok, PROMPTS, CHOICES, batch_size=1)
    b = score_choices(model, tok, PROMPTS, CHOICES, batch_size=16)
    c = score_choices(model, tok, PROMPTS, CHOICES, batch_size=3)
    assert predict(a) == predict(b) == predict(c)
    _close(a, b)
    _close(c, b)


def test_normalisations_from_the_sums(tiny):
    model, tok = tiny
    total = score_choices(model, tok, PROMPTS, CHOICES, normalize="sum")
    per_tok = score_choices(model, tok, PROMPTS, CHOICES, normalize="token")
    per_byte = score_choices(model, tok, PROMPTS, CHOICES, normalize="byte")
    for i, row in enumerate(CHOICES):
        for j, text in enumerate(row):
            n_tok = len(tok(text, add_special_tokens=False).input_ids) + 1  # + </s>
            assert per_tok[i][j] == pytest.approx(total[i][j] / n_tok, rel=1e-6)
            assert per_byte[i][j] == pytest.approx(total[i][j] / len(text.encode("utf-8")), rel=1e-6)
    # "да" is 4 UTF-8 bytes, 2 characters: per-byte is not per-character.
    assert per_byte[1][0] == pytest.approx(total[1][0] / 4, rel=1e-6)


def test_calibration_subtracts_content_free_scores(tiny):
    model, tok = tiny
    raw = score_choices(model, tok, PROMPTS, CHOICES, normalize="token")
    na = score_choices(model, tok, ["N/A"] * len(PROMPTS), CHOICES, normalize="token")
    cal = score_choices(model, tok, PROMPTS, CHOICES, normalize="token", calibrate=True)
    _close(cal, [[r - n for r, n in zip(rr, nr)] for rr, nr in zip(raw, na)])
    own = ["<LM>Пусто."] * len(PROMPTS)
    base = score_choices(model, tok, own, CHOICES)
    cal2 = score_choices(model, tok, PROMPTS, CHOICES, calibrate=True, calibration_prompts=own)
    total = score_choices(model, tok, PROMPTS, CHOICES)
    _close(cal2, [[r - n for r, n in zip(rr, nr)] for rr, nr in zip(total, base)])
    with pytest.raises(RSGError, match="calibration prompts"):
        score_choices(model, tok, PROMPTS, CHOICES, calibrate=True, calibration_prompts=["a"])


def test_bad_input_gives_clear_errors(tiny):
    model, tok = tiny
    with pytest.raises(RSGError, match="tokenises to nothing"):
        score_choices(model, tok, ["Вопрос?"], [["да", ""]])
    with pytest.raises(RSGError, match="2 prompts but 1 choice"):
        score_choices(model, tok, ["a", "b"], [["x"]])
    with pytest.raises(RSGError, match="no answer choices"):
        score_choices(model, tok, ["a"], [[]])
    with pytest.raises(RSGError, match="normalisation"):
        score_choices(model, tok, ["a"], [["x"]], normalize="char")
    with pytest.raises(RSGError, match="batch size"):
        score_choices(model, tok, ["a"], [["x"]], batch_size=0)
    assert score_choices(model, tok, [], []) == []


def test_too_long_input_is_truncated_from_the_left_with_a_warning(tiny):
    model, tok = tiny
    long_prompt = "<LM>" + " ".join(["Бабушка испекла пирог."] * 20) + " Вопрос: что сделала бабушка?"
    ids = tok(long_prompt).input_ids
    assert len(ids) > 20
    with pytest.warns(UserWarning, match="longer than the model's 12 input tokens"):
        got = score_choices(model, tok, [long_prompt], [["пирог", "ничего"]], max_input_tokens=12)
    # Same as feeding the kept tokens by hand: the <LM> prefix plus the last 11 tokens.
    kept = tok.decode([ids[0]] + ids[-11:])
    assert tok(kept).input_ids == [ids[0]] + ids[-11:]
    want = score_choices(model, tok, [kept], [["пирог", "ничего"]], max_input_tokens=12)
    _close(got, want, tol=1e-6)


class _OOMAbove:
    """A forward pre-hook on the real encoder that raises CUDA's OOM error for batches above `limit` rows,
    as a GPU would (or the CPU allocator's error with `cpu=True`); counts the rows of the batches that ran."""

    def __init__(self, limit: int, after_calls: int = 0, cpu: bool = False):
        self.limit, self.after_calls, self.cpu = limit, after_calls, cpu
        self.calls = 0
        self.raised = 0
        self.rows_done = 0

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        if ids.shape[0] > self.limit and self.calls > self.after_calls:
            self.raised += 1
            if self.cpu:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.rows_done += ids.shape[0]


def test_oom_backoff_recovers_without_redoing_finished_work(tiny):
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES, batch_size=16)
    # Fails on every batch above 2 prompts, except the very first call (so one batch of 4 finishes first).
    hook = _OOMAbove(limit=2, after_calls=1)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    done: list[int] = []
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size=4, progress=done.append)
    finally:
        handle.remove()
    _close(got, want)
    assert hook.rows_done == len(PROMPTS)  # every prompt encoded exactly once: nothing finished was redone
    assert sum(done) == len(PROMPTS) and done[0] == 4 and max(done[1:]) <= 2


def test_auto_batch_size_backs_off_per_call(tiny):
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES, batch_size=16)
    hook = _OOMAbove(limit=1)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
        assert hook.rows_done == len(PROMPTS)
        assert hook.raised == 4  # CPU starts at 16: 16 -> 8 -> 4 -> 2 -> 1
        # Next call: detected again from the start, and settles on a larger size than the last call's 1.
        hook.limit, hook.rows_done, hook.raised = 3, 0, 0
        got2 = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
        assert hook.rows_done == len(PROMPTS)
        assert hook.raised == 3  # 16 -> 8 -> 4 -> 2: re-detected, not remembered from the previous call
        hook.limit = 0  # nothing fits: a clear error, not a CUDA traceback
        with pytest.raises(RSGError, match="out of memory even at batch size 1"):
            score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
    finally:
        handle.remove()
    _close(got, want)
    _close(got2, want)


def test_hierarchical_seq2seq_fast_equals_naive(tiny):
    from rsg_eval.models.hierarchical import HierarchicalT5

    base, tok = build_tiny(seed=3)
    hier = HierarchicalT5.from_base(base, split=1)
    with torch.no_grad():
        for p in hier.lm_adapter.parameters():
            p.add_(0.05)
    hier.eval()
    fast = score_choices(hier.seq2seq, tok, PROMPTS, CHOICES)
    naive = score_choices_naive(hier.seq2seq, tok, PROMPTS, CHOICES)
    _close(fast, naive)


def test_shared_prefix_path_matches_naive(tiny):
    """RuCoS-style choices (one query, different entities) take the shared-prefix path; edge cases included:
    duplicate choices, a choice that is a prefix of another, one-token choices, several prefix lengths."""
    from rsg_eval.scoring import _encode, _prefix_worth_it, _shared_prefix_len

    model, tok = tiny
    query = "Журналисты задали вопросы министру {} о поддержке науки в России."
    prompts = [PROMPTS[4], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    choices = [
        [query.format(e) for e in ("Иванову", "Петрову", "Сидорову", "Иванову")],  # a duplicate
        ["Стакан разбился на мелкие осколки", "Стакан разбился на мелкие осколки и звенел", "Стакан разбился"],
        ["Учёные из университета опубликовали статью", "Учёные из университета опубликовали книгу"],
        ["да", "нет"],  # nothing shared: still scored through the same call
    ]
    enc = _encode(tok, prompts, choices, 512, 2)
    shared = [_shared_prefix_len(r) for r in enc.choices]
    assert shared[0] > 5 and shared[3] == 0 and len(set(shared)) >= 3
    assert _prefix_worth_it(shared, enc.choices)
    naive = score_choices_naive(model, tok, prompts, choices)
    for bs in (1, 3, 16):
        _close(score_choices(model, tok, prompts, choices, batch_size=bs), naive)
    fast = score_choices(model, tok, prompts, choices)
    assert fast[0][0] == pytest.approx(fast[0][3], abs=1e-5)  # duplicates score the same


def test_cpu_allocator_failure_also_backs_off_and_other_errors_propagate(tiny):
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES)
    hook = _OOMAbove(limit=2, cpu=True)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size=8)
    finally:
        handle.remove()
    assert hook.raised == 2 and hook.rows_done == len(PROMPTS)  # 8 -> 4 -> 2
    _close(got, want)

    def broken(module, args, kwargs):
        raise RuntimeError("shape mismatch")  # not a memory problem: must not be swallowed by the back-off

    handle = model.get_encoder().register_forward_pre_hook(broken, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            score_choices(model, tok, PROMPTS, CHOICES)
    finally:
        handle.remove()
