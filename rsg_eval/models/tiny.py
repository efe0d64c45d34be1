"""The built-in models `tiny` (a randomly initialised small T5 v1.1) and `tiny-causal` (a randomly initialised
small Llama-shaped decoder-only model), with one tokenizer made locally for both.

It exists for the offline smoke path (`rsg zeroshot --model tiny --data sample`), tests and benchmarks. Its scores
are meaningless. It mirrors the FRED-T5 facts that matter to our code (../shared/docs/FREDT5_NOTES.md 1.1, 1.3):

- gated-GELU feed-forward, LM head NOT tied to the input embeddings, decoder_start_token_id 0 (`<pad>`);
- a byte-level BPE tokenizer (GPT-2 style) with `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4, then the BPE
  vocabulary, then `<extra_id_0..99>`, `<LM>`, `<SC1>`..`<SC6>` appended as added tokens;
- encoding appends NO `</s>` (so scoring must append the eos id itself, as it must for FRED).

`tiny-causal` is the decoder-only counterpart for the offline tour and the tests of causal scoring: Llama-shaped
(RMSNorm, rotary positions, SwiGLU, grouped-query attention with 4 query and 2 key/value heads, untied head), the
same tokenizer (which adds no BOS, like ruGPT-3's GPT-2 BPE), context 512 tokens.

Everything is deterministic: the BPE is trained on the text below (bundled here, so it does not depend on any data
file), and the weights come from a fixed seed under a forked RNG (the caller's global RNG is left untouched).
Building both takes well under a second, so nothing is cached on disk.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config,
                          T5ForConditionalGeneration)

from rsg_eval.models.untied import build_t5

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
EXTRA_IDS = 100
PREFIX_TOKENS = ("<LM>", "<SC1>", "<SC2>", "<SC3>", "<SC4>", "<SC5>", "<SC6>")
BPE_VOCAB_SIZE = 1024  # special tokens + 256 byte symbols + merges
MAX_INPUT_TOKENS = 512  # like FRED (its tokenizer config has no model_max_length; 512 is its training length)
DEFAULT_SEED = 0

# The tiny model's shape: d_model 64, 2 encoder + 2 decoder layers (about 0.2 M parameters + embeddings).
DEFAULT_CONFIG: dict[str, Any] = dict(
    d_model=64,
    d_ff=128,
    d_kv=16,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=2,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=0,
)

# The tiny decoder-only model: hidden 64, 2 layers, 4 query heads sharing 2 key/value heads (about 0.1 M parameters
# + embeddings). Same special-token ids as the T5 above.
CAUSAL_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_INPUT_TOKENS,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Training text for the BPE. Our own sentences, in the register of the RSG tasks (news, fiction, questions).
TINY_CORPUS = """\
Мальчик уронил стакан, и стакан разбился. Что было причиной? Что произошло в результате?
Девочка открыла окно, потому что в комнате было душно. Утром пошёл дождь, и улицы стали мокрыми.
Президент компании объявил о новом проекте в Москве. Правительство России приняло решение о поддержке науки.
В Санкт-Петербурге открылась выставка современного искусства. Журналисты задали вопросы министру.
Вопрос: верно ли, что Волга впадает в Каспийское море? Ответ: да. Ответ: нет. Да или нет?
Текст: Иван Петрович работал учителем в сельской школе, а по вечерам писал книгу о своём детстве.
Гипотеза следует из ситуации. Гипотеза противоречит ситуации. Гипотеза независима от ситуации.
Следует ли из первого предложения второе? Используется ли слово в одном и том же значении?
Местоимение «он» относится к слову «учитель»? Кто такой «она» в этом тексте?
Команда выиграла матч со счётом два — один, и болельщики радовались до поздней ночи.
Учёные из университета опубликовали статью о климате Арктики и таянии льдов.
Врач посоветовал больному больше отдыхать и пить тёплый чай с мёдом.
Поезд опоздал на сорок минут из-за снегопада, поэтому мы пропустили начало концерта.
Компания «Газпром» сообщила о росте прибыли в третьем квартале 2021 года на 15 процентов.
Бабушка испекла пирог, а дедушка принёс из леса корзину грибов и ягод.
Он взял зонт, потому что небо затянули тучи. Она улыбнулась, когда увидела старого друга.
Суд признал обвиняемого виновным и назначил наказание в виде штрафа.
Какой ответ правильный? Выберите один из вариантов: 1, 2 или 3. Ответ одним словом.
The quick brown fox jumps over the lazy dog. Question: is it true? Answer: yes or no.
"""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE with FRED-like special tokens; encoding appends no `</s>`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a symbol: nothing maps to <unk>
        show_progress=False,
    )
    # Repeating the lines gives the trainer stable pair counts; the corpus is fixed, so the merges are too.
    tok.train_from_iterator([line for line in TINY_CORPUS.splitlines() if line] * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=MAX_INPUT_TOKENS,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],  # T5 takes no token_type_ids
    )
    extra = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    fast.add_special_tokens({"additional_special_tokens": extra + list(PREFIX_TOKENS)})
    return fast


def tiny_config(vocab_size: int, **overrides: Any) -> T5Config:
    """The tiny T5 config; keyword overrides change any field (e.g. d_model=256, num_layers=4)."""
    fields = dict(DEFAULT_CONFIG)
    fields.update(overrides)
    if "num_decoder_layers" not in overrides and "num_layers" in overrides:
        fields["num_decoder_layers"] = overrides["num_layers"]
    return T5Config(vocab_size=vocab_size, **fields)


def build_tiny(
    seed: int = DEFAULT_SEED, **config_overrides: Any
) -> tuple[T5ForConditionalGeneration, PreTrainedTokenizerFast]:
    """Build the tiny model and its tokenizer: `(model in eval mode on CPU, fp32; tokenizer)`.

    Same seed and overrides -> bit-identical weights. `config_overrides` go to T5Config (the benchmark uses
    d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=4).
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(len(tokenizer), **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_t5(config)  # head untied under transformers 4.x and 5 (rsg_eval.models.untied)
    model.eval()
    return model, tokenizer


def tiny_causal_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """The tiny-causal Llama config; keyword overrides change any field (e.g. hidden_size=256)."""
    fields = dict(CAUSAL_CONFIG)
    fields.update(overrides)
    return LlamaConfig(vocab_size=vocab_size, **fields)


def build_tiny_causal(seed: int = DEFAULT_SEED, **config_overrides: Any) -> tuple[LlamaForCausalLM,
                                                                                 PreTrainedTokenizerFast]:
    """Build `tiny-causal` and the shared tokenizer: `(model in eval mode on CPU, fp32; tokenizer)`.

    Same seed and overrides -> bit-identical weights; the caller's global RNG is left untouched.
    """
    tokenizer = build_tiny_tokenizer()
    config = tiny_causal_config(len(tokenizer), **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
