"""Decoder-only fine-tuning blocks (rsg_eval.training.finetune.causal): the prompt is masked at hand-checked positions,
the ids are the scorer's, the loss is the answer tokens' only, and a few steps on tiny-causal lower it and make
rank classification pick the trained answers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rsg_eval.models.tiny import build_tiny_causal
from rsg_eval.scoring import encode_causal, predict, score_choices
from rsg_eval.training.finetune.causal import (LORA_DEFAULT_ABOVE, answer_tokens, build_causal_pairs, causal_nll_sum,
                                      collate_causal, lora_by_default)
from rsg_eval.training.finetune.data import Pair

LABELS = ("entailment", "not_entailment")
VERBAL = {"entailment": "да", "not_entailment": "нет"}


def _items(n: int = 8):
    return [SimpleNamespace(key=i, labels=LABELS, gold=LABELS[i % 2],
                            text=f"Вопрос номер {i}: ответ {'да' if i % 2 == 0 else 'нет'}.") for i in range(n)]


def _render(item):
    return SimpleNamespace(prompt=item.text + "\nОтвет:", choices=[VERBAL[lab] for lab in LABELS])


@pytest.fixture(scope="module")
def tiny_causal():
    return build_tiny_causal()


def test_collate_masks_the_prompt_at_hand_checked_positions():
    pairs = [Pair((5, 6, 7), (8, 9)), Pair((5,), (10,)), Pair((11, 12), (13, 14, 15))]
    b = collate_causal(pairs, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 0, 0, 0], [11, 12, 13, 14, 15]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 10, -100, -100, -100],
                                    [-100, -100, 13, 14, 15]]
    assert answer_tokens(b) == 6


def test_pairs_are_the_scorers_ids(tiny_causal):
    model, tok = tiny_causal
    items = _items(4) + [SimpleNamespace(key=99, labels=LABELS, gold=None, text="без ответа")]
    pairs = build_causal_pairs(items, _render, model, tok)
    assert [p.key for p in pairs] == [0, 1, 2, 3]  # unlabelled items do not train
    enc = encode_causal(model, tok, [_render(it).prompt for it in items[:4]],
                        [[VERBAL[it.gold]] for it in items[:4]])
    for p, ids, conts in zip(pairs, enc.prompts, enc.choices):
        assert list(p.src) == ids and list(p.tgt) == conts[0]
    # the answer is " да"/" нет" after "Ответ:" (delimiter space), no eos appended
    assert tok.decode(list(pairs[0].tgt)) == " да" and tok.eos_token_id not in pairs[0].tgt


def test_loss_is_the_answer_tokens_cross_entropy(tiny_causal):
    model, tok = tiny_causal
    pairs = build_causal_pairs(_items(3), _render, model, tok)
    b = collate_causal(pairs, tok.pad_token_id)
    with torch.no_grad():
        out = model(**b)
    logp = F.log_softmax(out.logits.float(), dim=-1)
    terms = []
    for i, p in enumerate(pairs):
        for j, t in enumerate(p.tgt):
            terms.append(-logp[i, len(p.src) + j - 1, t])  # the position before token t predicts it
    torch.testing.assert_close(out.loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        total = causal_nll_sum(model, b)
    torch.testing.assert_close(total, torch.stack(terms).sum(), rtol=1e-5, atol=1e-5)
    assert answer_tokens(b) == len(terms)


def test_a_few_steps_lower_the_loss_and_rank_classification_follows(tiny_causal):
    model, tok = build_tiny_causal()  # its own copy: it trains
    items = _items(8)
    pairs = build_causal_pairs(items, _render, model, tok)
    b = collate_causal(pairs, tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    assert losses[-1] < 0.3 * losses[0], losses[::5]
    prompts = [_render(it).prompt for it in items]
    scores = score_choices(model, tok, prompts, [_render(it).choices for it in items], batch_size=16)
    assert predict(scores) == [LABELS.index(it.gold) for it in items]
    one = score_choices(model, tok, prompts, [_render(it).choices for it in items], batch_size=1)
    assert predict(one) == predict(scores)
    assert max(abs(a - b) for ra, rb in zip(one, scores) for a, b in zip(ra, rb)) < 1e-4


def test_lora_default_threshold():
    assert not lora_by_default(LORA_DEFAULT_ABOVE) and lora_by_default(LORA_DEFAULT_ABOVE + 1)
    assert lora_by_default(1_700_000_000) and not lora_by_default(125_000_000)
