"""Multi-task corpus validation, the sample corpus, NER bitmasks, the tokenised cache, and the LR schedules.
Light and fast: no model."""

from __future__ import annotations

import json
import math

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.training.hmtl import schedules
from rsg_eval.corpus.load import load_examples, open_corpus
from rsg_eval.corpus.labels import NEREL_TYPES, TASKS

GOOD = [
    {"task": "ner", "text": "Анна живёт в Казани.", "entities": [{"start": 0, "end": 4, "type": "PERSON"},
                                                              {"start": 13, "end": 19, "type": "CITY"}]},
    {"task": "mc", "text": "Команда выиграла кубок.", "label": "спорт"},
    {"task": "nli", "premise": "Шёл дождь.", "hypothesis": "Было сухо.", "label": "contradiction"},
    {"task": "paraphrase", "source": "Он ушёл.", "target": "Он покинул комнату."},
    {"task": "qg", "context": "Волга впадает в Каспий.", "answer": "в Каспий", "question": "Куда впадает Волга?"},
    {"task": "qa", "context": "Волга впадает в Каспий.", "question": "Куда впадает Волга?", "answer": "в Каспий"},
    {"task": "summarization", "text": "Длинный текст. Ещё текст.", "summary": "Текст."},
    {"task": "title", "text": "Команда выиграла кубок.", "title": "Победа"},
]


def _write(tmp_path, records, labels=None):
    lines = [json.dumps(r, ensure_ascii=False) if not isinstance(r, str) else r for r in records]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "val.jsonl").write_text(json.dumps(GOOD[1], ensure_ascii=False) + "\n", encoding="utf-8")
    if labels is not None:
        (tmp_path / "labels.json").write_text(json.dumps(labels, ensure_ascii=False), encoding="utf-8")
    return tmp_path


def test_good_corpus_normalises(tmp_path):
    c = open_corpus(_write(tmp_path, GOOD))
    ex = load_examples(c, "train")
    assert [e.task for e in ex] == list(TASKS)
    assert c.labels.mc == ("спорт",)                      # collected from train without labels.json
    ner = ex[0]
    assert [(ner.input[s:e], NEREL_TYPES[t]) for s, e, t in ner.entities] == [("Анна", "PERSON"),
                                                                               ("Казани", "CITY")]
    assert ex[2].label == 1                               # entailment, contradiction, neutral
    assert ex[2].input == "Шёл дождь.\nГипотеза: Было сухо."
    assert ex[4].target == "Куда впадает Волга?" and "в Каспий" in ex[4].input
    assert ex[3].input == "Перефразируй: Он ушёл." and ex[3].target == "Он покинул комнату."


@pytest.mark.parametrize("bad, line_field, words", [
    ({"task": "pos", "text": "x"}, "field 'task'", ["unknown task 'pos'", "paraphrase"]),
    ({"task": "mc", "text": "x"}, "field 'label'", ["missing"]),
    ({"task": "mc", "text": "x", "label": "погода"}, "field 'label'", ["unknown topic", "спорт"]),
    ({"task": "nli", "premise": "a", "hypothesis": "b", "label": "yes"}, "field 'label'", ["entailment"]),
    ({"task": "ner", "text": "abc", "entities": [{"start": 1, "end": 9, "type": "CITY"}]}, "field 'entities[0]'",
     ["outside the text"]),
    ({"task": "ner", "text": "abc", "entities": [{"start": 0, "end": 2, "type": "TOWN"}]},
     "field 'entities[0].type'", ["unknown entity type", "CITY"]),
    ({"task": "qa", "context": "c", "question": "q", "answer": 5}, "field 'answer'", ["instead of a string"]),
    ({"task": "title", "text": "  ", "title": "t"}, "field 'text'", ["empty"]),
])
def test_bad_records_name_file_line_field(tmp_path, bad, line_field, words):
    c = open_corpus(_write(tmp_path, GOOD[:2] + [bad], labels={"mc": ["спорт", "политика"]}))
    with pytest.raises(RSGError) as ei:
        load_examples(c, "train")
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path / 'train.jsonl'}:3: {line_field}")
    for w in words:
        assert w in msg


def test_bad_json_and_missing_train(tmp_path):
    with pytest.raises(RSGError, match=r"train.jsonl:2: not valid JSON"):
        load_examples(open_corpus(_write(tmp_path, [GOOD[1], "{not json"])), "train")
    (tmp_path / "train.jsonl").unlink()
    with pytest.raises(RSGError, match="no training data"):
        open_corpus(tmp_path)
    (tmp_path / "labels.json").write_text('{"mc": ["a", "a"]}')
    with pytest.raises(RSGError, match="repeat"):
        open_corpus(_write(tmp_path, GOOD))


def test_shards_are_read(tmp_path):
    (tmp_path / "train-00.jsonl").write_text(json.dumps(GOOD[0], ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "train-01.jsonl").write_text(json.dumps(GOOD[7], ensure_ascii=False) + "\n", encoding="utf-8")
    c = open_corpus(tmp_path)
    assert [e.task for e in load_examples(c, "train")] == ["ner", "title"]
    assert load_examples(c, "val") == []


def test_sample_corpus_has_all_tasks_in_both_splits():
    c = open_corpus("sample", require_val=True)
    assert len(c.labels.mc) == 17 and c.labels.ner == NEREL_TYPES
    for split in ("train", "val"):
        load_examples(c, split)
        assert set(c.counts[split]) == set(TASKS)


def test_ner_bits_nested():
    from rsg_eval.training.hmtl.dataset import ner_bits_for
    # tokens: "Москов"(0,6) "ский"(6,10) " уни"(10,14) "верс"(14,18) special (0,0); CITY=2 inside ORG=19
    offsets = [(0, 6), (6, 10), (10, 14), (14, 18), (0, 0)]
    bits = ner_bits_for(offsets, [(0, 18, 19), (0, 10, 2)])
    assert bits == [(1 << 19) | (1 << 2)] * 2 + [1 << 19] * 2 + [0]
    # A token that only touches the span's end (end exclusive) stays outside.
    assert ner_bits_for([(4, 8)], [(0, 4, 3)]) == [0]


def test_tokenised_cache_is_reused_and_targets_end_with_eos(tmp_path):
    import torch

    from rsg_eval.training.hmtl.dataset import build_split, collate, task_indices
    from rsg_eval.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    c = open_corpus("sample")
    ds, hit = build_split(c, "train", tok, cache_dir=tmp_path, lm_prefix="<LM>")
    assert not hit and len(ds) == sum(c.counts.get("train", {}).values() or [69])
    ds2, hit2 = build_split(c, "train", tok, cache_dir=tmp_path, lm_prefix="<LM>")
    assert hit2 and ds2.cache_files[0]["filename"].startswith(str(tmp_path))
    _, hit3 = build_split(c, "train", tok, cache_dir=tmp_path, lm_prefix="<LM>", max_length=64)
    assert not hit3                                     # a different setting is a different cache
    idx = task_indices(ds)
    title = ds[int(idx["title"][0])]
    assert title["labels"][-1] == tok.eos_token_id
    assert tok.decode(title["input_ids"]).startswith("<LM>")
    b = collate(ds[idx["ner"][:3].tolist()], "ner", pad_id=0, n_ner=29, ner_loss="multilabel")
    assert b.target.shape == b.input_ids.shape + (29,) and b.target.sum() > 0
    assert (b.target.sum(-1)[b.attention_mask == 0] == 0).all()
    # the default (the paper's softmax): one class per token, 0 = outside, 1 + type; -100 on padding
    s = collate(ds[idx["ner"][:3].tolist()], "ner", pad_id=0, n_ner=29)
    assert s.target.shape == s.input_ids.shape and s.target.dtype == torch.long
    assert ((s.target == -100) == (s.attention_mask == 0)).all()
    real = s.target[s.attention_mask == 1]
    assert real.min() >= 0 and real.max() <= 29 and (real > 0).any() and (real == 0).any()
    # where a token has exactly one type, both encodings agree on it
    one = (b.target.sum(-1) == 1) & (s.attention_mask == 1)
    assert one.any() and torch.equal(s.target[one] - 1, b.target.argmax(-1)[one])


def test_stream_positions_cover_each_round_once():
    import numpy as np
    from rsg_eval.training.hmtl.dataset import stream_positions

    a = stream_positions(5, seed=0, epoch=0, task=1, start=0, count=12)
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:10]) == list(range(5))
    # Any window equals the same slice of a longer read: resuming mid-epoch reads the same rows.
    assert np.array_equal(stream_positions(5, seed=0, epoch=0, task=1, start=7, count=5), a[7:12])
    b = stream_positions(50, seed=0, epoch=1, task=1, start=0, count=50)
    assert not np.array_equal(b, stream_positions(50, seed=0, epoch=0, task=1, start=0, count=50))   # reshuffled


# ------------------------------------------------------------------ schedules
@pytest.mark.parametrize("up, peak, step, floor_step", [
    (1, 9.0e-5, 1, 2), (10, 3.55e-5, 10, 20), (100, 4.45e-6, 10, 73), (2000, 1.17e-6, 9, 73),
])
def test_paper_schedule_numbers(up, peak, step, floor_step):
    # FREDT5_NOTES.md 3.4 (base 1e-6, max 1e-4, gamma 0.9)
    s = schedules.summarize_exp_range(1e-6, 1e-4, up, 0.9)
    assert s.peak_lr == pytest.approx(peak, rel=5e-3) and s.peak_step == step and s.floor_step == floor_step
    assert s.lr_at_100 == pytest.approx(1.003e-6 if up == 100 else 1.0e-6, rel=1e-3)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_torch_schedulers_follow_the_formulas(name):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.5)
    sch = schedules.build_scheduler(opt, name, base_lr=1e-6, max_lr=1e-4, total_steps=40, steps_per_epoch=10,
                                    gamma=0.9, step_size_up=5, warmup_steps=4)
    got = []
    for _ in range(40):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    if name == "paper":
        want = [schedules.exp_range_lr(t, 1e-6, 1e-4, 5, 5, 0.9) for t in range(40)]
        assert "betas" in opt.param_groups[0] and opt.param_groups[0]["betas"][0] == 0.9   # no momentum cycling
    elif name == "cycle-gamma":
        want = [schedules.cycle_gamma_lr(t, 1e-6, 1e-4, 5, 5, 0.9) for t in range(40)]
    else:
        want = [schedules.warmup_cosine_lr(t, 1e-6, 1e-4, 4, 40) for t in range(40)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_schedule_values_by_hand():
    # cycle-gamma, up=down=5: step 5 = first peak (1e-4), step 15 = second peak, amplitude x 0.9
    assert schedules.cycle_gamma_lr(5, 1e-6, 1e-4, 5, 5, 0.9) == pytest.approx(1e-4)
    assert schedules.cycle_gamma_lr(15, 1e-6, 1e-4, 5, 5, 0.9) == pytest.approx(1e-6 + 99e-6 * 0.9)
    assert schedules.cycle_gamma_lr(10, 1e-6, 1e-4, 5, 5, 0.9) == pytest.approx(1e-6)
    # exp_range: step 5 of up=5 is the peak of the triangle damped by 0.9**5
    assert schedules.exp_range_lr(5, 1e-6, 1e-4, 5, 5, 0.9) == pytest.approx(1e-6 + 99e-6 * 0.9 ** 5)
    # cosine: warm-up halfway, the peak, halfway down (cos = 0), the floor at the end
    assert schedules.warmup_cosine_lr(2, 0.0, 1.0, 4, 44) == pytest.approx(0.5)
    assert schedules.warmup_cosine_lr(4, 0.0, 1.0, 4, 44) == pytest.approx(1.0)
    assert schedules.warmup_cosine_lr(24, 0.0, 1.0, 4, 44) == pytest.approx(0.5)
    assert schedules.warmup_cosine_lr(44, 0.1, 1.0, 4, 44) == pytest.approx(0.1)
    assert math.isclose(schedules.warmup_cosine_lr(50, 0.1, 1.0, 4, 44), 0.1)
    w = schedules.paper_note(1e-6, 1e-4, 2000, 0.9)
    assert "step 9" in w and "step 73" in w and "cycle-gamma" in w and "cosine" in w
    assert w.startswith("note:") and "reproduction runs what the paper ran" in w


def test_ner_spans_round_trip_through_token_bits():
    # Gold spans -> per-token bitmasks (training) -> spans again (inference): nested entities survive.
    from rsg_eval.training.hmtl.dataset import ner_bits_for
    from rsg_eval.training.hmtl.infer import _strip_space, decode_spans
    from rsg_eval.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    text = "В 2019 году Московский государственный университет открыл новый корпус."
    gold = [("2019 году", "DATE"), ("Московский государственный университет", "ORGANIZATION"),
            ("Московский", "CITY")]
    spans = [(text.index(s), text.index(s) + len(s), NEREL_TYPES.index(t)) for s, t in gold]
    offsets = [tuple(o) for o in tok(text, return_offsets_mapping=True)["offset_mapping"]]
    bits = ner_bits_for(offsets, spans)
    active = [[bool(b >> t & 1) for t in range(29)] for b in bits]
    got = [_strip_space(text, sp) for sp in decode_spans(offsets, active, NEREL_TYPES)]
    assert sorted((g["text"], g["type"]) for g in got) == sorted(gold)


def test_bad_record_surfaces_through_datasets(tmp_path):
    # The datasets builder wraps generator errors; the user still gets our file:line:field message.
    from rsg_eval.training.hmtl.dataset import build_split
    from rsg_eval.models.tiny import build_tiny_tokenizer

    folder = tmp_path / "corpus"
    folder.mkdir()
    corpus = open_corpus(_write(folder, GOOD + [{"task": "nli", "premise": "a", "hypothesis": "b", "label": "maybe"}],
                                labels={"mc": ["спорт"]}))
    with pytest.raises(RSGError, match=r"train.jsonl:9: field 'label': unknown label 'maybe'"):
        build_split(corpus, "train", build_tiny_tokenizer(), cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.arrow"))      # nothing half-built is left to be reused
