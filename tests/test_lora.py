"""LoRA through peft (rsg_eval.models.lora) on the tiny models: it trains, only adapter weights change, and a saved
adapter folder loads through load_model (merged) to the same predictions as the unmerged adapter."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from rsg_eval.core.errors import RSGError  # noqa: E402
from rsg_eval.models import lora  # noqa: E402
from rsg_eval.models.loading import load_adapter_model, load_model  # noqa: E402
from rsg_eval.models.tiny import build_tiny, build_tiny_causal  # noqa: E402
from rsg_eval.scoring import predict, score_choices  # noqa: E402
from rsg_eval.training.finetune.data import Pair, collate, encode_source, encode_target  # noqa: E402

# A learnable toy task: the answer is the last word of the input.
TOY = [(f"Вопрос номер {i}: ответ {'да' if i % 2 == 0 else 'нет'}.", "да" if i % 2 == 0 else "нет")
       for i in range(8)]


def _pairs(tok):
    return [Pair(tuple(encode_source(tok, s, 64)), tuple(encode_target(tok, t, 8))) for s, t in TOY]


def _train(model, tok, steps: int = 40, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    batch = collate(_pairs(tok), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def _scores(model, tok):
    return score_choices(model, tok, [s for s, _ in TOY], [["да", "нет"]] * len(TOY), batch_size=4)


@pytest.fixture(scope="module")
def trained():
    model, tok = build_tiny()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = lora.wrap(model, lora.LoraSettings(rank=4, dropout=0.0))
    losses = _train(wrapped, tok)
    return wrapped, tok, base, losses


def test_defaults_and_wrapping_start_from_the_base():
    model, tok = build_tiny()
    assert lora.default_targets(model) == ("q", "k", "v", "o")
    causal, _ = build_tiny_causal()
    assert lora.default_targets(causal) == ("q_proj", "k_proj", "v_proj", "o_proj")
    s = lora.LoraSettings(rank=8)
    assert s.lora_alpha == 16.0 and s.dropout == 0.05
    before = _scores(model, tok)
    wrapped = lora.wrap(model, lora.LoraSettings(rank=4, dropout=0.0))
    assert _scores(wrapped, tok) == before  # B starts at zero: the wrapped model is the base
    trainable, total = lora.count_parameters(wrapped)
    # 2 encoder + 2 decoder layers: self q/k/v/o in 4 blocks, cross q/k/v/o in 2; each r*(64 + 64)
    assert trainable == (4 * 4 + 2 * 4) * 4 * (64 + 64)
    assert all(".lora_" in n for n in lora.adapter_names(wrapped))
    assert trainable < total / 20  # the embeddings and feed-forwards stay frozen


def test_lora_trains_and_only_adapter_weights_change(trained):
    wrapped, tok, base, losses = trained
    assert losses[-1] < 0.5 * losses[0], losses[::8]
    for name, p in wrapped.named_parameters():
        if ".lora_" in name:
            continue
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(p, base[key]), name
    moved = [n for n, p in wrapped.named_parameters() if ".lora_B" in n and p.abs().sum() > 0]
    assert moved  # the adapters did train


def test_saved_adapter_reloads_merged_and_unmerged_to_the_same_predictions(trained, tmp_path):
    wrapped, tok, _, _ = trained
    want = _scores(wrapped, tok)
    folder = lora.save_adapter(wrapped, tmp_path / "adapter", "tiny", tokenizer=tok)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert (folder / "adapter_model.safetensors").is_file()
    merged = load_model(folder, device="cpu")
    assert merged.info["source"] == "lora" and merged.info["base_model"] == "tiny"
    assert not any(".lora_" in n for n, _ in merged.model.named_parameters())  # plain model after the merge
    unmerged = load_adapter_model(folder, merge=False, device="cpu")
    got_m, got_u = _scores(merged.model, merged.tokenizer), _scores(unmerged.model, unmerged.tokenizer)
    assert got_u == want
    assert predict(got_m) == predict(got_u) == predict(want)
    for a, b in zip(got_m, got_u):
        assert a == pytest.approx(b, abs=1e-4)
    assert merged.info["fingerprint"] != load_model("tiny").info["fingerprint"]


def test_adapter_on_a_saved_base_folder_records_its_absolute_path(tmp_path, monkeypatch):
    model, tok = build_tiny_causal()
    from rsg_eval.models.untied import save_pretrained

    save_pretrained(model, tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    wrapped = lora.wrap(model, lora.LoraSettings(rank=2))
    folder = lora.save_adapter(wrapped, tmp_path / "ad", "base")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((tmp_path / "base").resolve())
    loaded = load_model(folder, causal_ok=True)
    assert loaded.info["kind"] == "causal"
    with pytest.raises(RSGError, match="decoder-only"):
        load_model(folder)


def test_bad_settings_and_targets_are_one_line():
    with pytest.raises(RSGError, match="rank"):
        lora.LoraSettings(rank=0)
    with pytest.raises(RSGError, match="dropout"):
        lora.LoraSettings(rank=4, dropout=1.5)
    model, _ = build_tiny()
    with pytest.raises(RSGError, match="not in this model"):
        lora.wrap(model, lora.LoraSettings(rank=4, targets=("q_proj",)))
