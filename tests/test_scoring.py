"""Seq2seq rank classification on the tiny T5: every way of scoring against the naive per-choice pass and against
the loss transformers itself computes; batch-size invariance; normalisations and calibration worked out from the
sums; bad input; the fp32 LM head under bf16; no per-choice copy of the prompt's states (structure and memory);
one host sync per batch; out-of-memory back-off (a real forward hook that raises, on the real model)."""

from __future__ import annotations

import pytest
import torch

from _scoring_utils import SYNC_REASON, TRANSFORMERS5
from _scoring_utils import (CHOICES, PREFIX_CHOICES, PREFIX_PROMPTS, PROMPTS, FP32Head, OOMAbove, close,
                            count_syncs, max_diff)
from rsg_eval.core.errors import RSGError
from rsg_eval.models.tiny import build_tiny
from rsg_eval.scoring import score_in_mode, forget_batch_size, modes_for, predict, score_choices, score_choices_naive


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny()


def _mode(model, tok, prompts, choices, mode, bs=16):
    return score_in_mode(model, tok, prompts, choices, batch_size=bs, normalize="sum", calibrate=False,
                  calibration_prompts=None, max_input_tokens=None, progress=None, mode=mode)


def _reference_ll(model, tok, prompt: str, choice: str) -> float:
    """Log-likelihood from transformers' own loss: mean CE over the labels times their number."""
    ids = tok(prompt, return_tensors="pt").input_ids
    labels = torch.tensor([tok(choice, add_special_tokens=False).input_ids + [tok.eos_token_id]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return -loss.item() * labels.shape[1]


def test_every_way_equals_naive_and_transformers_loss(tiny):
    model, tok = tiny
    assert modes_for(model) == ("naive", "encoder_once", "prompt_once", "fast")
    naive = score_choices_naive(model, tok, PROMPTS, CHOICES)
    fast = score_choices(model, tok, PROMPTS, CHOICES)
    close(fast, naive)
    for mode in ("encoder_once", "prompt_once"):
        close(_mode(model, tok, PROMPTS, CHOICES, mode), naive)
    assert predict(fast) == predict(naive)
    assert [len(r) for r in fast] == [len(c) for c in CHOICES]
    for i, j in [(0, 0), (1, 2), (2, 3), (4, 1)]:
        assert fast[i][j] == pytest.approx(_reference_ll(model, tok, PROMPTS[i], CHOICES[i][j]), abs=1e-3)
        assert naive[i][j] == pytest.approx(_reference_ll(model, tok, PROMPTS[i], CHOICES[i][j]), abs=1e-3)
    assert all(s < 0 for row in fast for s in row)


def test_scoring_uses_eval_mode_and_restores_the_callers_mode():
    model, tok = build_tiny(dropout_rate=0.5)
    want = score_choices(model, tok, PROMPTS, CHOICES)
    model.train()
    got = score_choices(model, tok, PROMPTS, CHOICES)  # dropout 0.5 would change every score if left on
    assert model.training
    close(got, want, tol=1e-6)


def test_batch_size_does_not_change_scores(tiny):
    model, tok = tiny
    a = score_choices(model, tok, PROMPTS, CHOICES, batch_size=1)
    b = score_choices(model, tok, PROMPTS, CHOICES, batch_size=16)
    c = score_choices(model, tok, PROMPTS, CHOICES, batch_size=3)
    assert predict(a) == predict(b) == predict(c)
    close(a, b)
    close(c, b)


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
    close(cal, [[r - n for r, n in zip(rr, nr)] for rr, nr in zip(raw, na)])
    own = ["<LM>Пусто."] * len(PROMPTS)
    base = score_choices(model, tok, own, CHOICES)
    cal2 = score_choices(model, tok, PROMPTS, CHOICES, calibrate=True, calibration_prompts=own)
    total = score_choices(model, tok, PROMPTS, CHOICES)
    close(cal2, [[r - n for r, n in zip(rr, nr)] for rr, nr in zip(total, base)])
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
    with pytest.raises(RSGError, match="no scoring mode 'kv_once'"):
        _mode(model, tok, ["a"], [["x"]], "kv_once")
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
    close(got, want, tol=1e-6)


def test_hierarchical_seq2seq_fast_equals_naive():
    from rsg_eval.corpus.labels import head_labels
    from rsg_eval.models.hierarchical import HierarchicalT5

    base, tok = build_tiny(seed=3)
    hier = HierarchicalT5.from_base(base, split=1, **head_labels())
    with torch.no_grad():
        for p in hier.lm_adapter.parameters():
            p.add_(0.05)
    hier.eval()
    fast = score_choices(hier.seq2seq, tok, PROMPTS, CHOICES)
    naive = score_choices_naive(hier.seq2seq, tok, PROMPTS, CHOICES)
    close(fast, naive)
    # The adapter is in the path: the base head alone scores differently.
    plain, _ = build_tiny(seed=3)
    assert max_diff(score_choices(plain, tok, PROMPTS, CHOICES), fast) > 1e-3


# ----------------------------------------------------------------------------------------------- choices in rows


def test_shared_prefix_and_row_layout_match_naive(tiny):
    """RuCoS-style choices take the shared-prefix layout; duplicates, a choice that is a prefix of another,
    one-token choices and several prefix lengths included."""
    from rsg_eval.scoring import _seq2seq
    from rsg_eval.scoring._common import shared_prefix_len

    model, tok = tiny
    enc = _seq2seq.encode(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES, 512)
    shared = [shared_prefix_len(r) for r in enc.choices]
    assert shared[0] > 5 and shared[3] == 0 and len(set(shared)) >= 3
    naive = score_choices_naive(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES)
    for bs in (1, 3, 16):
        got = score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES, batch_size=bs)
        close(got, naive)
        assert predict(got) == predict(naive)
    fast = score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES)
    # duplicates score the same (to fp32 rounding of a sum near -481: transformers 5 runs T5 through sdpa)
    assert fast[0][0] == pytest.approx(fast[0][3], rel=2e-7, abs=1e-5)


def test_many_choices_continue_in_more_rows_and_still_match_naive(tiny):
    """A prompt whose choices do not fit one decoder row (budget: the encoder length, at least 64 tokens) goes on
    in further rows of the same prompt; scores do not change."""
    from rsg_eval.scoring import _seq2seq

    model, tok = tiny
    names = ["Иван", "Пётр", "Олег", "Анна", "Мария", "Кирилл", "Лев", "Борис", "Глеб", "Вера", "Нина", "Юрий"]
    choices = [[f"В Москве {n} встретил министра и задал ему вопросы о науке" for n in names], ["да", "нет"]]
    prompts = ["<LM>Короткий текст.", "Да?"]
    enc = _seq2seq.encode(model, tok, prompts, choices, 512)
    row_prompt, rows, *_ = _seq2seq._plan_rows(enc.choices, True, 0, budget=64)
    assert row_prompt.count(0) >= 2 and max(len(r) for r in rows) <= 64
    naive = score_choices_naive(model, tok, prompts, choices)
    for mode in ("prompt_once", "fast"):
        for bs in (1, 2):
            close(_mode(model, tok, prompts, choices, mode, bs), naive)


def test_head_in_chunks_gives_the_same_scores(tiny, monkeypatch):
    """The LM head runs over the scored rows in chunks of bounded size; tiny chunks change nothing."""
    from rsg_eval.scoring import _common

    model, tok = tiny
    want = score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES)
    monkeypatch.setattr(_common, "HEAD_CHUNK_BYTES", 3 * 4 * model.config.vocab_size)  # 3 rows per chunk
    close(score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES), want, tol=1e-6)
    close(score_choices_naive(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES), want)


def test_cross_attention_runs_per_prompt_not_per_choice(tiny):
    """The decoder's cross-attention sees one row per prompt: its queries (rows, W, d) and the prompt's encoder
    states (rows, S, d) from which it projects K/V once; never one copy per (prompt, choice) pair."""
    model, tok = tiny
    prompts, choices = PREFIX_PROMPTS[:2], PREFIX_CHOICES[:2]
    pairs = sum(len(c) for c in choices)
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kv = kwargs.get("key_value_states")
        cache = kwargs.get("past_key_values")
        cached = [] if cache is None else [lay.keys.shape[0] for lay in cache.cross_attention_cache.layers
                                           if getattr(lay, "keys", None) is not None]
        seen.append((hidden.shape[0], None if kv is None else kv.shape[0], cached))

    handles = [blk.layer[1].EncDecAttention.register_forward_pre_hook(hook, with_kwargs=True)
               for blk in model.get_decoder().block]
    try:
        got = score_choices(model, tok, prompts, choices, batch_size=16)
    finally:
        for h in handles:
            h.remove()
    assert seen == [(len(prompts), len(prompts), [])] * len(model.get_decoder().block), (seen, pairs)
    close(got, score_choices_naive(model, tok, prompts, choices))


def test_peak_memory_does_not_grow_with_a_copy_per_choice():
    """Peak memory of ours grows by far less per extra choice than one copy of the prompt's cross-attention K/V
    (what the per-pair ways pay: about that much per choice). torch.profiler's memory events on CPU."""
    from rsg_eval.bench.zeroshot import peak_memory, rucos_like

    torch.set_num_threads(1)
    model, tok = build_tiny(d_model=64, d_kv=32, num_heads=8, num_layers=1, num_decoder_layers=4)
    small, big = rucos_like(1, passage_words=100, candidates=2), rucos_like(1, passage_words=100, candidates=24)
    S = len(tok(big.prompts[0]).input_ids)
    cfg = model.config
    kv_pair = cfg.num_decoder_layers * 2 * cfg.num_heads * S * cfg.d_kv * 4  # K and V, every layer, fp32

    def peak(case, mode):
        return peak_memory(lambda: _mode(model, tok, case.prompts, case.choices, mode, bs=64),
                           torch.device("cpu"))[1]

    per_choice = {m: (peak(big, m) - peak(small, m)) / 22 for m in ("encoder_once", "fast")}
    assert per_choice["fast"] < 0.4 * kv_pair, (per_choice, kv_pair)
    if not TRANSFORMERS5:  # 5.x runs the naive way's attention through sdpa, which needs less than a K/V copy
        assert per_choice["encoder_once"] > 0.8 * kv_pair, (per_choice, kv_pair)  # K/V projected per pair


# ----------------------------------------------------------------------------------------------- precision, syncs


def test_bf16_scores_use_an_fp32_head():
    """bf16 model: the head's logits are not rounded to bf16 before the log-softmax. The same model with a head
    that computes in fp32 (not an nn.Linear, so the scorer runs it as it is) gives the same scores to fp32
    tolerance, in every way of scoring; bf16-rounded logits would be far off."""
    model, tok = build_tiny(seed=5)
    model.to(torch.bfloat16)
    prompts, choices = PREFIX_PROMPTS, PREFIX_CHOICES
    ref_model, _ = build_tiny(seed=5)
    ref_model.to(torch.bfloat16)
    ref_model.lm_head = FP32Head(ref_model.lm_head)
    for mode in ("naive", "encoder_once", "fast"):
        got = _mode(model, tok, prompts, choices, mode)
        ref = _mode(ref_model, tok, prompts, choices, mode)
        close(got, ref, tol=1e-5)
    # What the old path computed: the bf16 head's own output, upcast after. Far from the reference.
    with torch.no_grad():
        ids = tok(prompts[:1], return_tensors="pt").input_ids
        dec = torch.tensor([[0] + tok(choices[0][0], add_special_tokens=False).input_ids])
        states = model.get_decoder()(input_ids=dec, encoder_hidden_states=model.get_encoder()(ids)[0])[0]
        rounded = model.lm_head(states).float()
        exact = FP32Head(model.lm_head)(states)
    assert (rounded - exact).abs().max() > 1e-3


@pytest.mark.skipif(TRANSFORMERS5, reason=SYNC_REASON)
def test_one_host_sync_per_batch(tiny):
    """Scores come back with one `.tolist()` per batch of prompts, and nothing else reads a tensor on the host."""
    model, tok = tiny
    for fn in (score_choices, score_choices_naive):
        for bs, batches in ((2, 3), (16, 1)):
            with count_syncs() as counts:
                fn(model, tok, PROMPTS, CHOICES, batch_size=bs)
            assert dict(counts) == {"tolist": batches}, (fn.__name__, bs, dict(counts))
    with count_syncs() as counts:
        score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES, batch_size=2)  # the shared-prefix layout
    assert dict(counts) == {"tolist": 2}


# ----------------------------------------------------------------------------------------------- out of memory


def test_oom_backoff_recovers_without_redoing_finished_work(tiny):
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES, batch_size=16)
    forget_batch_size(model)
    # Fails on every batch above 2 prompts, except the very first call (so one batch of 4 finishes first).
    hook = OOMAbove(limit=2, after_calls=1)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    done: list[int] = []
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size=4, progress=done.append)
    finally:
        handle.remove()
        forget_batch_size(model)
    close(got, want)
    assert hook.rows_done == len(PROMPTS)  # every prompt encoded exactly once: nothing finished was redone
    assert sum(done) == len(PROMPTS) and done[0] == 4 and max(done[1:]) <= 2


def test_auto_batch_size_backs_off_and_is_remembered(tiny):
    """"auto" halves on OOM; the next call (each task, each calibration pass) starts at the size that worked."""
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES, batch_size=16)
    forget_batch_size(model)
    hook = OOMAbove(limit=2)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
        assert hook.raised == 3  # CPU starts at 16: 16 -> 8 -> 4 -> 2
        assert hook.batches == [2, 2, 1] and hook.rows_done == len(PROMPTS)
        hook.raised, hook.batches = 0, []
        got2 = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
        assert hook.raised == 0 and hook.batches == [2, 2, 1]  # starts at the remembered 2
        hook.raised, hook.batches = 0, []
        cal = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto", calibrate=True)
        assert hook.raised == 0 and max(hook.batches) == 2  # the calibration pass too
        hook.limit = 0  # nothing fits: a clear error, not a CUDA traceback
        with pytest.raises(RSGError, match="out of memory even at batch size 1"):
            score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
    finally:
        handle.remove()
        forget_batch_size(model)
    close(got, want)
    close(got2, want)
    assert len(cal) == len(PROMPTS)
    hook.batches = []
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    hook.limit = 100
    try:
        score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")  # forgotten: probes from 16 again
    finally:
        handle.remove()
    assert hook.batches == [5]


def test_memory_is_freed_after_the_handler_lets_go_of_the_failed_batch(tiny, monkeypatch):
    """When the scorer frees memory after an OOM, the failed batch's tensors (held by the traceback's frames
    inside the handler) are already unreferenced; freeing inside the except block would free nothing."""
    import rsg_eval.scoring as scoring

    model, tok = tiny
    forget_batch_size(model)
    alive_at_free: list[bool] = []
    real_free = scoring._free_memory
    hook = OOMAbove(limit=2, keep=True)

    def free_and_check():
        alive_at_free.append(hook.held() is not None)
        real_free()

    monkeypatch.setattr(scoring, "_free_memory", free_and_check)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        score_choices(model, tok, PROMPTS, CHOICES, batch_size=4)
    finally:
        handle.remove()
        forget_batch_size(model)
    assert alive_at_free == [False]


def test_cpu_allocator_failure_also_backs_off_and_other_errors_propagate(tiny):
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES)
    forget_batch_size(model)
    hook = OOMAbove(limit=2, cpu=True)
    handle = model.get_encoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size=8)
    finally:
        handle.remove()
        forget_batch_size(model)
    assert hook.raised == 2 and hook.rows_done == len(PROMPTS)  # 8 -> 4 -> 2
    close(got, want)

    def broken(module, args, kwargs):
        raise RuntimeError("shape mismatch")  # not a memory problem: must not be swallowed by the back-off

    handle = model.get_encoder().register_forward_pre_hook(broken, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            score_choices(model, tok, PROMPTS, CHOICES)
    finally:
        handle.remove()


def test_row_budget_halves_when_a_prompts_choices_just_overflow_its_row(tiny, monkeypatch):
    """Issue 23 item 6: choices without a shared prefix that overflow the encoder-length row by a little made a full
    row and a short leftover, both padded to the full width. The planner now takes half the width when its estimate
    says so; `_row_shape` predicts `_plan_rows` exactly, and the scores do not depend on the budget."""
    import rsg_eval.scoring._seq2seq as S

    model, tok = tiny
    prompt = "Длинный абзац текста. " * 12
    choices = [f"ответ номер {i} без общего начала" for i in range(15)]
    enc_len = len(tok(prompt)["input_ids"])
    ys = [[tok(c, add_special_tokens=False)["input_ids"] + [1] for c in choices]]
    for budget in (enc_len, enc_len // 2, 64):
        _, rows, *_ = S._plan_rows(ys, False, 0, budget)
        assert S._row_shape(ys, False, budget) == (len(rows), max(len(r) for r in rows))
    tails = sum(len(y) - 1 for y in ys[0])
    assert max(S.ROW_MIN, enc_len) < tails + 1 < 2 * max(S.ROW_MIN, enc_len)  # just overflows one row
    chosen = S._row_budget(model, ys, False, enc_len)
    assert chosen == max(S.ROW_MIN, enc_len) // 2, (chosen, enc_len, tails)
    got = score_in_mode(model, tok, [prompt], [choices], batch_size=4, normalize="sum", calibrate=False,
                        calibration_prompts=None, max_input_tokens=None, progress=None, mode="prompt_once")
    monkeypatch.setattr(S, "_row_budget", lambda model, choices, share, enc_len: max(S.ROW_MIN, enc_len))
    before = score_in_mode(model, tok, [prompt], [choices], batch_size=4, normalize="sum", calibrate=False,
                           calibration_prompts=None, max_input_tokens=None, progress=None, mode="prompt_once")
    close(got, before)
