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
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForQuestionAnswering, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    text = [line for p in sorted(FIXTURES.rglob("*")) if p.suffix in (".jsonl", ".csv", ".txt")
            for line in p.read_text(encoding="utf-8-sig").splitlines()]
    # The vocabulary is built here, not by tokenizers' WordPieceTrainer: the trainer breaks ties in a random
    # order per process, so the tiny teacher (and every annotation) would differ from run to run.
    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts: dict[str, int] = {}
    for line in text:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for w in counts for c in w})
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(w) > 1][:400]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + chars + ["##" + c for c in chars] + words))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
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
