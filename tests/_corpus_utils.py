"""Tiny teacher models for the corpus tests, built locally and saved to a folder (no hub, random weights).

- a tiny T5 (text2text teachers: qg, summarization, title, paraphrase): rsg_eval.models.tiny.build_tiny;
- a tiny extractive QA model: BertForQuestionAnswering with a WordPiece tokenizer trained here on fixture text.
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"
CONFIG = FIXTURES / "corpus_fixtures.yaml"


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    import torch

    from rsg_eval.models.tiny import build_tiny

    torch.manual_seed(seed)
    model, tok = build_tiny(seed=seed)
    model.generation_config.max_length = 32  # the default of 20 would warn next to max_new_tokens
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_qa(folder: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForQuestionAnswering, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    text = [line for p in sorted(FIXTURES.rglob("*")) if p.suffix in (".jsonl", ".csv", ".txt")
            for line in p.read_text(encoding="utf-8-sig").splitlines()]
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    fast.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertForQuestionAnswering(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
