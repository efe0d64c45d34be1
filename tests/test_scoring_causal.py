"""Decoder-only rank classification on `tiny-causal` (Llama-shaped) and tiny GPT-2 / Qwen2 / Mistral configs: the
prompt-cache ways against the naive full forward per (prompt, choice) and against transformers' own loss, at
several batch sizes; the tokenisation convention at the prompt/choice boundary, BOS and eos handling; truncation;
normalisations and calibration; the fp32 head under bf16; no per-choice copy of the prompt cache; host syncs;
out-of-memory back-off."""

from __future__ import annotations

import pytest
import torch

from _scoring_utils import SYNC_REASON, TRANSFORMERS5
from _scoring_utils import (CHOICES, PREFIX_CHOICES, PREFIX_PROMPTS, PROMPTS, FP32Head, OOMAbove, close,
                            count_syncs, max_diff)
from rsg_eval.core.errors import RSGError
from rsg_eval.models.tiny import build_tiny_causal, build_tiny_tokenizer
from rsg_eval.scoring import _causal, score_in_mode, forget_batch_size, modes_for, predict, score_choices, \
    score_choices_naive


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny_causal()


def _mode(model, tok, prompts, choices, mode, bs=16, **kw):
    return score_in_mode(model, tok, prompts, choices, batch_size=bs, normalize=kw.get("normalize", "sum"),
                  calibrate=False, calibration_prompts=None, max_input_tokens=kw.get("limit"), progress=None,
                  mode=mode)


def _hf_loss_ll(model, tok, prompt: str, choice: str) -> float:
    """Log-likelihood of the continuation from transformers' own loss (labels -100 on the prompt)."""
    p = tok(prompt).input_ids
    cont = tok(prompt + _causal.delimiter(prompt) + choice).input_ids[len(p):]
    ids = torch.tensor([p + cont])
    labels = torch.tensor([[-100] * len(p) + cont])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss
    return -loss.item() * len(cont)


def _family(kind: str, attn: str = "sdpa", **extra):
    """A tiny random model of another decoder-only family, with the tiny tokenizer's vocabulary."""
    from transformers import (GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    tok = build_tiny_tokenizer()
    ids = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    llama_like = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, **ids, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **ids, **extra))
        elif kind == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**llama_like))
        else:
            model = MistralForCausalLM(MistralConfig(**llama_like))
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------- agreement


def test_every_way_equals_naive_and_transformers_loss_at_any_batch_size(tiny):
    model, tok = tiny
    assert modes_for(model) == ("naive", "prompt_once", "fast")
    naive = score_choices_naive(model, tok, PROMPTS, CHOICES, batch_size=1)
    for i, j in [(0, 0), (1, 2), (2, 3), (3, 0), (4, 1)]:
        assert naive[i][j] == pytest.approx(_hf_loss_ll(model, tok, PROMPTS[i], CHOICES[i][j]), abs=1e-4)
    for prompts, choices in ((PROMPTS, CHOICES), (PREFIX_PROMPTS, PREFIX_CHOICES)):
        ref = score_choices_naive(model, tok, prompts, choices, batch_size=1)
        for mode in ("naive", "prompt_once", "fast"):
            for bs in (1, 3, 16):
                got = _mode(model, tok, prompts, choices, mode, bs)
                close(got, ref)
                assert predict(got) == predict(ref)
    fast = score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES)
    assert fast[0][0] == pytest.approx(fast[0][3], abs=1e-5)  # duplicate choices score the same


@pytest.mark.parametrize("kind,attn", [("gpt2", "eager"), ("gpt2", "sdpa"), ("qwen2", "sdpa")])
def test_other_decoder_only_families_match_naive(kind, attn):
    model, tok = _family(kind, attn)
    naive = score_choices_naive(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES, batch_size=1)
    for bs in (1, 16):
        got = score_choices(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES, batch_size=bs)
        close(got, naive)
        assert predict(got) == predict(naive)


def test_sliding_window_longer_than_the_input_is_scored_the_exact_way():
    """Our choices mask has no sliding window: a model whose window is shorter than the input takes the naive way
    (exact), one whose window is longer takes ours."""
    short, tok = _family("mistral", sliding_window=8)
    close(score_choices(short, tok, PROMPTS, CHOICES), score_choices_naive(short, tok, PROMPTS, CHOICES))
    long, _ = _family("mistral", sliding_window=4096)
    close(score_choices(long, tok, PROMPTS, CHOICES), score_choices_naive(long, tok, PROMPTS, CHOICES))


def test_many_choices_continue_in_more_rows_and_still_match_naive(tiny):
    model, tok = tiny
    names = ["Иван", "Пётр", "Олег", "Анна", "Мария", "Кирилл", "Лев", "Борис", "Глеб", "Вера", "Нина", "Юрий"]
    prompts = ["Короткий текст.", "Да?"]
    choices = [[f"{n} встретил министра в Москве и задал ему вопросы о науке" for n in names], ["да", "нет"]]
    enc = _causal.encode(model, tok, prompts, choices, 512)
    *_, row_prompt, tails, _, _, _ = _causal._plan(enc.prompts, enc.choices, False, budget=64)[:7]
    assert row_prompt.count(0) >= 2 and max(len(t) for t in tails) <= 64
    naive = score_choices_naive(model, tok, prompts, choices)
    for mode in ("prompt_once", "fast"):
        for bs in (1, 2):
            close(_mode(model, tok, prompts, choices, mode, bs), naive)


# ----------------------------------------------------------------------------------------------- tokenisation


def test_tokenisation_convention_at_the_prompt_choice_boundary(tiny):
    """The continuation is `delimiter + choice`, cut from the encoding of the whole text after the prompt's own
    tokens; the delimiter is a space unless the prompt ends in whitespace; prompt + continuation = the whole."""
    model, tok = tiny
    prompts = ["Вопрос: верно ли это? Ответ:", "Текст.\nОтвет:\n", "Вопрос: он учитель?"]
    choices = [["Да", "Нет"], ["Да", "Нет"], ["да, он учитель", "нет"]]
    assert [_causal.delimiter(p) for p in prompts] == [" ", "", " "]
    enc = _causal.encode(model, tok, prompts, choices, 512)
    for p, row, p_ids, conts in zip(prompts, choices, enc.prompts, enc.choices):
        assert p_ids == tok(p).input_ids
        for c, cont in zip(row, conts):
            whole = tok(p + _causal.delimiter(p) + c).input_ids
            assert p_ids + cont == whole  # nothing merges across the boundary here
            assert cont == tok(_causal.delimiter(p) + c, add_special_tokens=False).input_ids
    # Calibrated scores on the same model line up with the hand-made continuation ids.
    got = score_choices(model, tok, prompts, choices)
    assert got[0][0] == pytest.approx(_hf_loss_ll(model, tok, prompts[0], "Да"), abs=1e-4)


def _bos_tokenizer():
    """The tiny tokenizer made to add `<s>` in front and `</s>` at the end, as some Llama configs do."""
    from tokenizers import processors

    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


def test_bos_is_kept_and_an_appended_eos_dropped(tiny):
    model, plain_tok = tiny
    tok = _bos_tokenizer()
    assert tok("Да").input_ids[0] == 1 and tok("Да").input_ids[-1] == 2
    enc = _causal.encode(model, tok, PROMPTS, CHOICES, 512)
    plain = _causal.encode(model, plain_tok, PROMPTS, CHOICES, 512)
    for a, b in zip(enc.prompts, plain.prompts):
        assert a == [1] + b  # the tokenizer's BOS first, no eos between prompt and choice
    assert enc.choices == plain.choices
    naive = score_choices_naive(model, tok, PROMPTS, CHOICES)
    close(score_choices(model, tok, PROMPTS, CHOICES), naive)
    assert max_diff(naive, score_choices_naive(model, plain_tok, PROMPTS, CHOICES)) > 1e-3  # BOS is in the input


def test_prompt_and_longest_choice_fit_the_context_keeping_the_prompt_end(tiny):
    model, tok = tiny
    long_prompt = "<LM>" + " ".join(["Бабушка испекла пирог."] * 20) + " Вопрос: что сделала бабушка?"
    choices = [["пирог", "ничего не сделала"]]
    ids = tok(long_prompt).input_ids
    need = max(len(c) for c in _causal.encode(model, tok, [long_prompt], choices, 512).choices[0])
    with pytest.warns(UserWarning, match="do not fit the model's 16-token context"):
        enc = _causal.encode(model, tok, [long_prompt], choices, 16)
    assert enc.prompts[0] == [ids[0]] + ids[-(16 - need - 1):]  # the <LM> prefix and the end of the prompt
    assert len(enc.prompts[0]) + need == 16
    with pytest.warns(UserWarning):
        got = score_choices(model, tok, [long_prompt], choices, max_input_tokens=16)
    kept = tok.decode(enc.prompts[0])
    assert tok(kept).input_ids == enc.prompts[0]
    close(got, score_choices(model, tok, [kept], choices), tol=1e-6)
    with pytest.raises(RSGError, match="no room for the prompt"):
        score_choices(model, tok, ["Вопрос?"], [["очень длинный ответ из многих слов"]], max_input_tokens=4)


def test_normalisations_and_calibration(tiny):
    model, tok = tiny
    total = score_choices(model, tok, PROMPTS, CHOICES)
    per_tok = score_choices(model, tok, PROMPTS, CHOICES, normalize="token")
    per_byte = score_choices(model, tok, PROMPTS, CHOICES, normalize="byte")
    for i, (p, row) in enumerate(zip(PROMPTS, CHOICES)):
        for j, text in enumerate(row):
            n_tok = len(tok(p + _causal.delimiter(p) + text).input_ids) - len(tok(p).input_ids)  # no eos
            assert per_tok[i][j] == pytest.approx(total[i][j] / n_tok, rel=1e-6)
            assert per_byte[i][j] == pytest.approx(total[i][j] / len(text.encode("utf-8")), rel=1e-6)
    cal = score_choices(model, tok, PROMPTS, CHOICES, normalize="token", calibrate=True)
    na = score_choices(model, tok, ["N/A"] * len(PROMPTS), CHOICES, normalize="token")
    close(cal, [[r - n for r, n in zip(rr, nr)] for rr, nr in zip(per_tok, na)])
    close(score_choices_naive(model, tok, PROMPTS, CHOICES, normalize="token", calibrate=True), cal)
    with pytest.raises(RSGError, match="tokenises to nothing"):
        score_choices(model, tok, ["Вопрос?"], [["да", ""]])


# ----------------------------------------------------------------------------------------------- structure


def test_the_prompt_cache_is_read_per_prompt_not_copied_per_choice(tiny):
    """Two passes per batch: the contexts (one row per prompt), then the choices with the prompts' cache
    (batch = prompts, not pairs). Choices of one token need only the first pass."""
    model, tok = tiny
    calls = []

    def hook(module, args, kwargs):
        past = kwargs.get("past_key_values")
        keys = past.layers[0].keys.shape[0] if past is not None else None
        calls.append((kwargs["input_ids"].shape[0], keys))

    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        prompts, choices = PREFIX_PROMPTS[:2], PREFIX_CHOICES[:2]  # 7 pairs
        close(score_choices(model, tok, prompts, choices), score_choices_naive(model, tok, prompts, choices))
        assert calls == [(2, None), (2, 2), (7, None)]  # ours: 2 prompt rows twice; naive: the 7 pairs
        calls.clear()
        score_choices(model, tok, ["Верно ли это?", "Текст. Следует ли?"], [["да", "нет"], ["да", "нет"]])
        assert calls == [(2, None)]  # " да" and " нет" are one token each: no choices pass
    finally:
        handle.remove()


@pytest.mark.skipif(TRANSFORMERS5, reason=SYNC_REASON)
def test_one_host_sync_of_ours_per_batch(tiny):
    """Ours reads the scores with one `.tolist()` per batch; the only other host read is transformers' own
    check of a padded prompt batch (`padding_mask.all()` in its SDPA mask), at the start of the batch before
    anything of it is queued on the GPU."""
    model, tok = tiny
    for bs, batches in ((2, 3), (16, 1)):
        with count_syncs() as counts:
            score_choices(model, tok, PROMPTS, CHOICES, batch_size=bs)
        assert counts["tolist"] == batches
        assert sum(counts.values()) - counts["tolist"] <= batches, dict(counts)


def test_bf16_scores_use_an_fp32_head():
    model, tok = build_tiny_causal(seed=5)
    model.to(torch.bfloat16)
    ref, _ = build_tiny_causal(seed=5)
    ref.to(torch.bfloat16)
    ref.lm_head = FP32Head(ref.lm_head)
    for mode in ("naive", "fast"):
        close(_mode(model, tok, PREFIX_PROMPTS, PREFIX_CHOICES, mode),
              _mode(ref, tok, PREFIX_PROMPTS, PREFIX_CHOICES, mode), tol=1e-5)
    with torch.no_grad():
        states = model.base_model(input_ids=tok(PROMPTS[:1], return_tensors="pt").input_ids)[0]
        assert (model.lm_head(states).float() - FP32Head(model.lm_head)(states)).abs().max() > 1e-3


def test_oom_backoff_and_remembered_batch_size(tiny):
    model, tok = tiny
    want = score_choices(model, tok, PROMPTS, CHOICES)
    forget_batch_size(model)
    hook = OOMAbove(limit=2)
    handle = model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
        assert hook.raised == 3  # 16 -> 8 -> 4 -> 2
        hook.raised = 0
        again = score_choices(model, tok, PROMPTS, CHOICES, batch_size="auto")
        assert hook.raised == 0  # the next call starts at the remembered 2
    finally:
        handle.remove()
        forget_batch_size(model)
    close(got, want)
    close(again, want)
