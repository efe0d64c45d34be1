"""The hierarchical FRED-T5 on a tiny random T5: exact split, identity at init, gradient paths, early exit,
checkpoint round trip. Real models and real gradients, no mocks."""

from __future__ import annotations

import json

import pytest
import torch

from _hmtl_utils import one_thread  # noqa: F401  (autouse fixture)

from rsg_eval.core.errors import RSGError
from rsg_eval.corpus.labels import head_labels
from rsg_eval.models.hierarchical import HierarchicalT5, load_hierarchical, resolve_split
from rsg_eval.models.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny4():
    torch.manual_seed(0)
    base, tok = build_tiny(num_layers=4, num_decoder_layers=2)
    return base, tok


def _batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["Мальчик уронил стакан, и стакан разбился.",
         "Поезд опоздал на сорок минут из-за снегопада, поэтому мы пропустили начало концерта.",
         "Да."]


def _fresh(tiny4, split=2, **kw):
    base, tok = tiny4
    import copy
    m = HierarchicalT5.from_base(copy.deepcopy(base), split=split, **{**head_labels(), **kw})
    m.eval()
    return m, tok


def test_resolve_split():
    assert resolve_split(None, 24) == 6          # the paper: 6 of 24
    assert resolve_split(0.25, 24) == 6
    assert resolve_split(6, 24) == 6
    assert resolve_split("6", 24) == 6
    assert resolve_split("0.25", 4) == 1
    assert resolve_split(0.25, 2) == 1           # clamped so Block 1 is never empty
    with pytest.raises(RSGError):
        resolve_split(25, 24)
    with pytest.raises(RSGError):
        resolve_split(1.5, 24)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_split_encoder_equals_unsplit_with_padding(tiny4, split):
    m, tok = _fresh(tiny4, split=split)
    ids, mask = _batch(tok, TEXTS)
    assert (mask == 0).any()                     # the batch really has padding
    with torch.no_grad():
        ref = m.seq2seq.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h1, h2 = m.encode(ids, mask)
    torch.testing.assert_close(h1, ref.hidden_states[split], rtol=0, atol=0)
    torch.testing.assert_close(h2, ref.last_hidden_state, rtol=1e-6, atol=1e-6)
    # Dropping the forwarded position bias (what a naive split does) changes the output: the test can fail.
    with torch.no_grad():
        _, _, ext = m.encode_block1(ids, mask)
        wrong = m.encode_block2(h1, None, ext)
    assert not torch.allclose(wrong, ref.last_hidden_state, atol=1e-4)


def test_identity_at_init(tiny4):
    base, tok = tiny4
    m, _ = _fresh(tiny4)
    ids, mask = _batch(tok, TEXTS)
    labels = tok(["Ответ: да.", "нет", "Вопрос"], padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        a = base(input_ids=ids, attention_mask=mask, labels=labels)
        b = m.seq2seq(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    with torch.no_grad():
        g1 = base.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        g2 = m.seq2seq.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(g1, g2)


def _grad_groups(m):
    k = m.config.split_layer
    shared = {id(m.seq2seq.shared.weight)}
    groups = {
        "block1": [p for layer in m.seq2seq.encoder.block[:k] for p in layer.parameters()],
        "block2": [p for layer in m.seq2seq.encoder.block[k:] for p in layer.parameters()]
                  + list(m.seq2seq.encoder.final_layer_norm.parameters()),
        "decoder": [p for p in m.seq2seq.decoder.parameters() if id(p) not in shared],
        "lm_proj": list(m.seq2seq.lm_head.proj.parameters()),
        "lm_adapter": list(m.lm_adapter.parameters()),
    }
    for name in ("mc", "ner", "nli"):
        groups[name] = list(m.heads[name].parameters())
    return groups


def _reached(params):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("task, expect", [
    ("mc", {"block1", "mc"}),
    ("ner", {"block1", "ner"}),
    ("nli", {"block1", "block2", "nli"}),
    ("gen", {"block1", "block2", "decoder", "lm_proj", "lm_adapter"}),
])
def test_gradient_paths(tiny4, task, expect):
    m, tok = _fresh(tiny4)
    m.train()
    ids, mask = _batch(tok, TEXTS)
    if task == "mc":
        loss = torch.nn.functional.cross_entropy(m.mc_logits(ids, mask), torch.tensor([0, 5, 16]))
    elif task == "ner":
        target = torch.zeros(ids.shape + (29,))
        target[0, 1, 3] = 1.0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m.ner_logits(ids, mask), target)
    elif task == "nli":
        loss = torch.nn.functional.cross_entropy(m.nli_logits(ids, mask), torch.tensor([0, 1, 2]))
    else:
        labels = tok(["да", "нет", "может быть"], padding=True, return_tensors="pt")["input_ids"]
        labels[labels == tok.pad_token_id] = -100
        loss = m.lm_loss(ids, mask, labels)
    loss.backward()
    groups = _grad_groups(m)
    reached = {g for g, ps in groups.items() if _reached(ps)}
    assert reached == expect
    # The shared embedding is the entrance to Block 1: every loss reaches it.
    assert m.seq2seq.shared.weight.grad is not None


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_early_exit(tiny4):
    m, tok = _fresh(tiny4, split=1)
    ids, mask = _batch(tok, TEXTS)
    b2_calls, h1 = _count_calls(m.seq2seq.encoder.block[1])
    dec_calls, h2 = _count_calls(m.seq2seq.decoder)
    with torch.no_grad():
        assert m.mc_logits(ids, mask).shape == (3, 17)
        assert m.ner_logits(ids, mask).shape == (3, ids.shape[1], 29)
        assert not b2_calls and not dec_calls          # topic and NER never touch Block 2 or the decoder
        assert m.nli_logits(ids, mask).shape == (3, 3)
        assert b2_calls and not dec_calls              # NLI runs Block 2 but no decoder
    h1.remove(); h2.remove()


def test_batch_size_invariance(tiny4):
    m, tok = _fresh(tiny4)
    ids, mask = _batch(tok, TEXTS)
    with torch.no_grad():
        full = m.nli_logits(ids, mask)
        for i in range(len(TEXTS)):
            one_ids, one_mask = _batch(tok, [TEXTS[i]])
            torch.testing.assert_close(m.nli_logits(one_ids, one_mask)[0], full[i], rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tiny4, tmp_path):
    m, tok = _fresh(tiny4, mc_labels=[f"тема{i}" for i in range(5)])
    # Make the adapters and heads non-trivial so the round trip checks real values.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(m.heads.parameters()) + list(m.lm_adapter.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    out = tmp_path / "ckpt"
    m.save_pretrained(out, tokenizer=tok)
    m.save_pretrained(out, tokenizer=tok)        # overwriting an existing checkpoint works too
    cfg = json.loads((out / "hmtl_config.json").read_text())
    assert cfg["split_layer"] == 2 and cfg["mc_labels"][0] == "тема0" and len(cfg["ner_labels"]) == 29
    assert (out / "model.safetensors").is_file() and (out / "hmtl_heads.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp dirs left behind
    m2, tok2 = load_hierarchical(out)
    ids, mask = _batch(tok, TEXTS)
    with torch.no_grad():
        for fn in ("mc_logits", "ner_logits", "nli_logits"):
            assert torch.equal(getattr(m, fn)(ids, mask), getattr(m2, fn)(ids, mask))
        assert torch.equal(m.seq2seq(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits,
                           m2.seq2seq(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits)
    assert tok2(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    # Loading in bf16 puts the heads and adapters in bf16 too; results stay close to fp32.
    m3, _ = load_hierarchical(out, dtype=torch.bfloat16)
    assert m3.heads["mc"].classifier.weight.dtype == torch.bfloat16
    assert m3.lm_adapter.up.weight.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(m3.nli_logits(ids, mask).float(), m.nli_logits(ids, mask), atol=0.1, rtol=0.05)
    # The base weights stay a plain transformers checkpoint (no adapter inside).
    from transformers import T5ForConditionalGeneration
    plain = T5ForConditionalGeneration.from_pretrained(out)
    assert isinstance(plain.lm_head, torch.nn.Linear)


def test_bad_checkpoint_errors(tmp_path):
    (tmp_path / "hmtl_config.json").write_text("{\"split_layer\": 1}")
    with pytest.raises(RSGError, match="missing keys"):
        load_hierarchical(tmp_path)


def test_bench_ways_agree():
    # The benchmark's two ways (full encoder + hidden_states[k] vs Block 1 only) give identical logits.
    from rsg_eval.bench.hmtl import run_bench

    r = run_bench(d_model=32, d_ff=64, layers=4, split=1, batch=3, seq_len=12, repeats=1)
    assert r["same_predictions"] and r["max_abs_logit_diff"] == 0.0
    assert r["tokens"] < 3 * 12                      # the batch really has padding


def test_linear_adapter_is_exactly_linear_and_its_activation_round_trips(tiny4, tmp_path):
    """Issue 23 item 11: --adapter-activation linear builds h + up(down(h)), an affine map (checked against the
    matrix it must equal, and the ReLU one is not); the activation is saved in the checkpoint's config and reloads
    the same way; a config written before the key existed loads as relu."""
    from rsg_eval.models.adapters import Bottleneck

    torch.manual_seed(3)
    lin, relu = Bottleneck(8, 3, activation="linear"), Bottleneck(8, 3, activation="relu")
    relu.load_state_dict(lin.state_dict())
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn_like(p))
        relu.load_state_dict(lin.state_dict())
    h = torch.randn(5, 8, dtype=torch.float64)
    lin, relu = lin.double(), relu.double()
    want = h @ (torch.eye(8, dtype=torch.float64) + lin.up.weight @ lin.down.weight).T \
        + lin.up.weight @ lin.down.bias + lin.up.bias
    with torch.no_grad():
        torch.testing.assert_close(lin(h), want, rtol=0, atol=1e-12)
        assert not torch.allclose(relu(h), want)

    m, tok = _fresh(tiny4, adapter_activation="linear")
    assert isinstance(m.lm_adapter.act, torch.nn.Identity)
    out = tmp_path / "ckpt"
    m.save_pretrained(out, tokenizer=tok)
    assert json.loads((out / "hmtl_config.json").read_text())["adapter_activation"] == "linear"
    m2, _ = load_hierarchical(out)
    assert m2.config.adapter_activation == "linear" and isinstance(m2.lm_adapter.act, torch.nn.Identity)
    cfg = json.loads((out / "hmtl_config.json").read_text())
    del cfg["adapter_activation"]  # an older checkpoint
    (out / "hmtl_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    m3, _ = load_hierarchical(out)
    assert m3.config.adapter_activation == "relu" and isinstance(m3.lm_adapter.act, torch.nn.ReLU)
    cfg["adapter_activation"] = "cubic"
    (out / "hmtl_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(RSGError, match="adapter activation"):
        load_hierarchical(out)
