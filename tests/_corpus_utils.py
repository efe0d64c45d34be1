"""Tiny teacher models for the corpus tests, built locally and saved to a folder (no hub, random weights).

- a tiny T5 (seq2seq teachers: qg, summarization, title, paraphrase): rsg_eval.models.tiny.build_tiny;
- tiny BERTs sharing one WordPiece tokenizer built here from the fixture text: extractive QA (qa), token
  classification (ner), sequence classification (mc topics; nli with entailment / contradiction / neutral).
"""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "corpus"
CONFIG = FIXTURES / "corpus_fixtures.yaml"

# The tiny NER teacher's label set (BIO over five types): PER and LOC map to NEREL types by the default map,
# CITY is a NEREL type already, MISC has no NEREL counterpart (dropped and counted), NORP is mapped by the
# fixture config's type_map.
NER_TYPES = ("PER", "LOC", "CITY", "MISC", "NORP")
NER_LABELS = ("O", *(f"{p}-{t}" for t in NER_TYPES for p in ("B", "I")))
TOPIC_LABELS = ("sport", "economy", "science", "weather")   # weather is mapped to null in the fixture config
NLI_LABELS = ("entailment", "contradiction", "neutral")


def save_tiny_t5(folder: Path, seed: int = 0) -> Path:
    import torch

    from rsg_eval.models.tiny import build_tiny

    torch.manual_seed(seed)
    model, tok = build_tiny(seed=seed)
    model.generation_config.max_length = 32  # the default of 20 would warn next to max_new_tokens
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_wordpiece():
    """A fast WordPiece tokenizer over the fixture text, with a vocabulary built deterministically."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

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
    return fast


def _bert_config(tok, labels: tuple[str, ...] | None = None, init: float = 0.02):
    from transformers import BertConfig

    extra = {}
    if labels is not None:
        extra = {"id2label": dict(enumerate(labels)), "label2id": {lab: i for i, lab in enumerate(labels)}}
    return BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, initializer_range=init, **extra)


def _save(model_cls, folder: Path, seed: int, labels: tuple[str, ...] | None = None, init: float = 0.02) -> Path:
    import torch

    tok = tiny_wordpiece()
    torch.manual_seed(seed)
    model_cls(_bert_config(tok, labels, init)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_qa(folder: Path, seed: int = 0) -> Path:
    from transformers import BertForQuestionAnswering

    return _save(BertForQuestionAnswering, folder, seed)


def save_tiny_ner(folder: Path, seed: int = 0, labels: tuple[str, ...] = NER_LABELS) -> Path:
    from transformers import BertForTokenClassification

    # wide initial weights: a random classifier with the default init predicts one label for every input
    return _save(BertForTokenClassification, folder, seed, labels, init=1.0)


def save_tiny_classifier(folder: Path, labels: tuple[str, ...], seed: int = 0) -> Path:
    """A sequence classifier: topics (mc) or, with entailment / contradiction / neutral, an NLI model (which the
    zero-shot topic teacher also uses)."""
    from transformers import BertForSequenceClassification

    return _save(BertForSequenceClassification, folder, seed, labels, init=1.0)
