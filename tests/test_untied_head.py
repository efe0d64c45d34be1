"""FRED-T5's separate LM head stays separate under transformers 4.x and 5.x (rsg_eval.models.untied).

transformers 5 forces `tie_word_embeddings=True` on every T5 config and ties the head of a model built from a config;
these tests fail on either version if the head of a T5 v1.1 model ends up sharing the embeddings' tensor, if the
decoder output gets T5's d_model**-0.5 scaling, or if a saved folder reads back tied under the other version.
`.ci/run` runs this file under the newest transformers 5 as well as under 4.57."""

from __future__ import annotations

import json

import pytest
import torch

from rsg_eval.models.hierarchical import HierarchicalT5, load_hierarchical
from rsg_eval.models.loading import load_model
from rsg_eval.models.tiny import build_tiny
from rsg_eval.models.untied import declared_untied, head_is_tied, save_pretrained, scales_decoder_output
from rsg_eval.scoring._common import head_logits_fp32

TEXTS = ["<LM>Девочка открыла окно.", "Вопрос: да или нет?"]


def _logits(model, tok) -> torch.Tensor:
    ids = tok(TEXTS, padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        return model(**ids, decoder_input_ids=dec).logits


def _assert_untied(model) -> None:
    assert declared_untied(model.config) and not scales_decoder_output(model.config)
    assert not head_is_tied(model)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    # the encoder and decoder embeddings stay one tensor with `shared` (T5 always shares those)
    assert model.encoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()
    assert model.decoder.embed_tokens.weight.data_ptr() == model.shared.weight.data_ptr()


def test_built_from_config_is_untied_and_stays_so_after_tie_weights():
    model, tok = build_tiny()
    _assert_untied(model)
    before = model.lm_head.weight.detach().clone()
    model.tie_weights()  # resize_token_embeddings and peft call this; transformers 5 would tie here
    _assert_untied(model)
    assert torch.equal(model.lm_head.weight, before)


def test_untied_head_draws_from_the_seed():
    a, _ = build_tiny(seed=3)
    b, _ = build_tiny(seed=3)
    c, _ = build_tiny(seed=4)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_logits_are_the_plain_head_without_t5_scaling():
    """Untied T5 v1.1: logits = lm_head(decoder output), no d_model**-0.5; the fp32 scoring head agrees."""
    model, tok = build_tiny()
    ids = tok(TEXTS, padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
    with torch.no_grad():
        out = model(**ids, decoder_input_ids=dec, output_hidden_states=True)
        states = out.decoder_hidden_states[-1]  # (2, 4, d) after the final norm
        torch.testing.assert_close(out.logits, model.lm_head(states), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head_logits_fp32(model, states.reshape(-1, states.shape[-1])),
                                   out.logits.reshape(-1, out.logits.shape[-1]), rtol=1e-5, atol=1e-5)


def test_saved_folder_reads_back_untied_under_both_versions(tmp_path):
    model, tok = build_tiny(seed=7)
    save_pretrained(model, tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # what transformers 4.x needs to read it untied
    loaded = load_model(str(tmp_path), device="cpu")
    _assert_untied(loaded.model)
    assert loaded.info["tie_word_embeddings"] is False
    assert torch.equal(loaded.model.lm_head.weight, model.lm_head.weight)
    assert torch.equal(_logits(loaded.model, tok), _logits(model, tok))


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_either_config_layout_loads_untied(tmp_path, layout):
    """A folder saved by transformers 5 (`tie_word_embeddings: true, scale_decoder_outputs: false`) or by 4.x
    (`tie_word_embeddings: false`) loads untied and unscaled under the installed version."""
    model, tok = build_tiny(seed=5)
    save_pretrained(model, tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if layout == "transformers5":
        cfg.update(tie_word_embeddings=True, scale_decoder_outputs=False)
    else:
        cfg.pop("scale_decoder_outputs", None)
        cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(str(tmp_path), device="cpu")
    _assert_untied(loaded.model)
    assert torch.equal(_logits(loaded.model, tok), _logits(model, tok))


def test_hierarchical_model_keeps_the_head_untied(tmp_path):
    base, tok = build_tiny(num_layers=2)
    hier = HierarchicalT5.from_base(base, split=1, mc_labels=["a", "b"], ner_labels=["PER"], nli_labels=["x", "y"])
    proj = hier.seq2seq.lm_head.proj
    assert proj.weight.data_ptr() != hier.seq2seq.shared.weight.data_ptr()
    hier.save_pretrained(tmp_path / "ck", tokenizer=tok)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["tie_word_embeddings"] is False
    again, _ = load_hierarchical(tmp_path / "ck")
    assert again.seq2seq.lm_head.proj.weight.data_ptr() != again.seq2seq.shared.weight.data_ptr()
    assert torch.equal(again.seq2seq.lm_head.proj.weight, proj.weight)
    assert not torch.equal(again.seq2seq.lm_head.proj.weight, again.seq2seq.shared.weight)
