"""Cleaning rules (each counted), MinHash deduplication, degenerate-output filters, and the leakage guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsg_eval.corpus.annotate import cut, degenerate, sentences
from rsg_eval.corpus.cleaning import CleanConfig, Cleaner, Deduper, cyrillic_share, find, strip
from rsg_eval.corpus.config import load_config
from rsg_eval.corpus.leakage import LeakageGuard, NgramIndex, build_rsg_index
from rsg_eval.core.errors import RSGError

LONG = ("Учёные Новосибирского университета опубликовали статью о климате Арктики. По их данным, площадь льда "
        "летом сокращается быстрее, чем предсказывали модели десять лет назад.")


def _rec(text: str, task: str = "text") -> dict:
    return {"task": task, "text": text, "_src": "s", "id": "x"}


def test_rules_find_and_strip() -> None:
    assert find("emoji", "привет 🔥") and not find("emoji", "привет — «мир» №5, 20°C")
    assert find("control", "а\u200bб") and find("control", "а\u0007б") and not find("control", "а\tб\nв\r\n")
    assert strip("control", "кол\u200bлекция\u0007") == "коллекция"
    assert find("markup", "<b>жирный</b>") and find("markup", "a&nbsp;b") and find("markup", "[[ссылка]]")
    assert not find("markup", "3 < 5 и 7 > 2")
    assert strip("markup", "<p>Текст <b>мэрии</b>&nbsp;города</p>") == "Текст мэрии города"  # tag -> space, &nbsp; -> U+00A0, runs collapsed
    assert find("special", "рамка ╔══╗") and find("special", "\ue000") and find("special", "\ufffd")
    assert not find("special", "№ 5, 20°, © 2024, 100 ₽")  # the allowed symbols
    assert strip("special", "рамка ╔══╗ вокруг") == "рамка вокруг"


def test_cyrillic_share_by_hand() -> None:
    assert cyrillic_share("абв") == 1.0
    assert cyrillic_share("аб cd") == 0.5
    assert cyrillic_share("123 !") == 1.0  # no letters: the length rule decides


def test_cleaner_counts_per_rule() -> None:
    c = Cleaner(CleanConfig.from_dict({"length": {"text": [50, 1000]}}))
    kept = [c.clean(_rec(t)) for t in (
        LONG,                                   # kept
        LONG + " 🔥",                            # emoji: drop
        LONG.replace("статью", "ста\u200bтью"),  # control: stripped, kept
        "<i>" + LONG + "</i>",                  # markup: stripped, kept
        LONG + " ╔╗",                           # special: drop
        "Коротко.",                             # length
        "English text only, " * 5 + "и чуть-чуть.",  # cyrillic share
    )]
    assert [k is not None for k in kept] == [True, False, True, True, False, False, False]
    assert kept[2]["text"] == LONG and kept[3]["text"] == LONG
    assert dict(c.counts["text"]) == {"emoji": 1, "control:stripped": 1, "markup:stripped": 1, "special": 1,
                                      "length": 1, "cyrillic": 1}


def test_cleaner_strip_on_ner_drops_instead_of_moving_offsets() -> None:
    c = Cleaner(CleanConfig.from_dict({"length": {"ner": [1, 1000]}}))
    rec = {"task": "ner", "text": "<b>Москва</b>", "entities": [{"start": 3, "end": 9, "type": "CITY"}]}
    assert c.clean(rec) is None and c.counts["ner"]["markup"] == 1
    c2 = Cleaner(CleanConfig.from_dict({"emoji": "off", "length": {"text": [1, 1000]}}))
    assert c2.clean(_rec("Привет 🔥")) is not None


def test_clean_config_errors() -> None:
    with pytest.raises(RSGError, match="unknown action 'zap'"):
        CleanConfig.from_dict({"emoji": "zap"})
    with pytest.raises(RSGError, match="unknown cleaning keys"):
        CleanConfig.from_dict({"emojis": "drop"})
    with pytest.raises(RSGError, match="bad length bounds"):
        CleanConfig.from_dict({"length": {"text": [1]}})


def test_dedup_exact_and_near_per_task() -> None:
    d = Deduper(CleanConfig())
    text = LONG + " Авторы связывают это с тёплыми течениями и просят продолжить наблюдения ещё на пять лет."
    near = text.replace("пять лет.", "пять месяцев.")   # the last shingle differs: Jaccard 31/33 = 0.94
    other = "Городские власти Екатеринбурга объявили о ремонте трамвайных путей на центральных улицах в мае."
    keep = [d.keep(_rec(t)) for t in (text, "  " + text.upper(), near, other)]
    assert keep == [True, False, False, True]
    assert dict(d.counts["text"]) == {"exact duplicate": 1, "near duplicate": 1}
    # the same text under another task is not a duplicate (dedup is per task)
    assert d.keep({"task": "mc", "text": LONG, "label": "наука"})
    # qa records about one context differ by question
    q1 = {"task": "qa", "context": LONG, "question": "Что опубликовали учёные университета?", "answer": "статью"}
    q2 = dict(q1, question="Какая площадь сокращается летом по их данным?", answer="площадь льда")
    assert d.keep(q1) and d.keep(q2) and not d.keep(dict(q1))


def test_degenerate_outputs() -> None:
    assert degenerate("") == "empty" and degenerate(" ... ") == "empty"
    assert degenerate("да да да нет") == "repeated"
    assert degenerate("ааааааааааа") == "repeated" and degenerate("абабабабабаб") == "repeated"
    assert degenerate("и в и в и в и в") == "repeated"  # 2 distinct of 8
    assert degenerate("Учёные  опубликовали статью.", "учёные опубликовали статью") == "copy"
    assert degenerate("Учёные написали статью о льде.", LONG) is None


def test_sentences_and_cut() -> None:
    s = sentences("Первое предложение. Второе! «Третье» тут? 4 марта — дата. конец")
    assert s == ["Первое предложение.", "Второе!", "«Третье» тут?", "4 марта — дата. конец"]
    assert cut("Раз два. Три четыре. Пять.", 20) == "Раз два. Три четыре."
    assert cut("Оченьдлинноеслово", 5) == "Очень"


def test_ngram_index_matches_only_long_shared_runs() -> None:
    idx = NgramIndex(n=5)
    idx.add(["Один два три четыре пять шесть семь.", "Один два три четыре пять шесть семь."], "ref/val")
    idx.freeze()
    assert len(idx) == 3  # the duplicate reference text is indexed once: 7 words -> 3 five-grams
    assert idx.match("ноль ОДИН, два — три четыре пять!") == "ref/val"  # case and punctuation ignored
    assert idx.match("один два три четыре шесть семь") is None
    assert idx.match("два три") is None


def test_leakage_guard_drops_copy_of_a_sample_passage() -> None:
    from rsg_eval.core.data import load_items

    index, seen = build_rsg_index("sample", n=13)
    assert seen["DaNetQA/val"] >= 1 and "DaNetQA/train" not in seen
    passage = load_items("sample", "DaNetQA", "val")[0].fields["passage"]
    words = passage.split()
    leak = "Вступление от редакции. " + " ".join(words[:14]) + " И ещё немного своего текста."
    short = "Вступление. " + " ".join(words[:12]) + " Своё."  # only 12 shared words: kept
    guard = LeakageGuard(index)
    assert not guard.keep(_rec(leak))
    assert guard.keep(_rec(short))
    assert guard.keep(_rec(LONG))
    qa = {"task": "qa", "context": LONG, "question": "Что это?", "answer": " ".join(words[:14])}
    assert not guard.keep(qa)  # every text field is checked
    assert guard.to_json()["dropped_per_task"] == {"text": 1, "qa": 1}
    assert guard.to_json()["matched_rsg"]["text"] == {"DaNetQA/val": 1}


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    def cfg(text: str) -> Path:
        p = tmp_path / "c.yaml"
        p.write_text(text, encoding="utf-8")
        return p

    with pytest.raises(RSGError, match=r"c\.yaml: field 'sources\[0\]\.kind': unknown source kind 'html'"):
        load_config(cfg("sources:\n  - {kind: html, path: x}\n"))
    with pytest.raises(RSGError, match=r"unknown keys \['colour'\] for a text source"):
        load_config(cfg("sources:\n  - {kind: text, path: x, colour: red}\n"))
    with pytest.raises(RSGError, match="unknown top-level keys"):
        load_config(cfg("sourcez: []\n"))
    with pytest.raises(RSGError, match=r"c\.yaml:2: not valid YAML"):
        load_config(cfg("seed: 1\nsources: a: b\n"))
    with pytest.raises(RSGError, match="pairs need a generation task"):
        load_config(cfg("sources:\n  - {kind: pairs, task: ner, path: x, fields: {}}\n"))
    with pytest.raises(RSGError, match="unknown teacher options"):
        load_config(cfg("sources:\n  - {kind: text, path: x}\nteachers:\n  qa: {model: m, temperature: 1}\n")
                    ).teacher_specs()


def test_example_config_parses() -> None:
    cfg = load_config(Path(__file__).parents[1] / "configs" / "corpus_example.yaml")
    assert len(cfg.mc_classes or ()) == 17 and cfg.shares["qa"] == 0.4
    assert cfg.teacher_specs()["qa"].model == "timpal0l/mdeberta-v3-base-squad2"
    lenta = next(s for s in cfg.sources if s.name == "lenta")
    mapped = {v for v in lenta.opts["label_map"].values() if v is not None}
    assert mapped <= set(cfg.mc_classes or ())  # every mapped topic is one of the 17 classes


# ---------------------------------------------------------------- the streaming parts


def test_batched_dedup_decides_as_one_by_one(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    words = LONG.split()
    texts = []
    for i in range(60):
        if texts and rng.random() < 0.3:
            texts.append(rng.choice(texts))                      # an exact copy
        elif texts and rng.random() < 0.3:
            w = rng.choice(texts).split()
            w[-1] = "иначе."                                      # a near copy (the last word)
            texts.append(" ".join(w))
        else:
            texts.append(" ".join(rng.sample(words, len(words))) + f" номер {i}.")
    recs = [_rec(t) for t in texts]
    one = Deduper(CleanConfig(), tmp_path / "one.sqlite")
    keep_one = [one.keep(r) for r in recs]
    batched = Deduper(CleanConfig(), tmp_path / "b.sqlite", batch=7)
    kept = list(batched.filter(recs))
    assert kept == [r for r, k in zip(recs, keep_one) if k]
    assert batched.counts == one.counts and one.counts["text"]["exact duplicate"] > 0
    assert one.counts["text"]["near duplicate"] > 0
    # the index lives on disk: a key per band per kept record plus one for the exact check
    assert one.store.size == sum(keep_one) * (one.bands + 1)
    one.close()
    batched.close()


def test_lsh_parameters_match_datasketch() -> None:
    from rsg_eval.corpus.cleaning import lsh_params

    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, perms in ((0.85, 128), (0.7, 128), (0.9, 64), (0.5, 256)):
        assert lsh_params(threshold, perms) == lsh._optimal_param(threshold, perms, 0.5, 0.5)
    assert lsh_params(0.85, 128) == (8, 16)


def test_minhash_estimates_jaccard() -> None:
    from rsg_eval.corpus.cleaning import MinHasher

    m = MinHasher(num_perm=256, shingle=1)
    a = " ".join(f"слово{i}" for i in range(120))
    b = " ".join(f"слово{i}" for i in range(40, 160))   # 80 shared of 160: Jaccard 0.5
    est = float((m(a) == m(b)).mean())
    assert abs(est - 0.5) < 0.1 and (m(a) == m(a)).all()
    assert m("одно слово").shape == (256,)                 # fewer words than the shingle size: one shingle


def test_hash_sorter_and_smallest_keys(tmp_path: Path) -> None:
    import random
    from collections import Counter

    from rsg_eval.corpus.stage import HashSorter, SmallestKeys

    rng = random.Random(1)
    keys = [rng.getrandbits(64) for _ in range(3000)] + [7, 7, 7]
    hs = HashSorter(tmp_path / "s", max_bytes=4000)   # tiny buckets: every bucket is split again on reading
    for i, k in enumerate(keys):
        hs.add(k, {"i": i, "k": k})
    out = list(hs)
    assert [r["k"] for r in out] == sorted(keys)
    assert [r["i"] for r in out if r["k"] == 7] == [3000, 3001, 3002]   # ties keep their order
    vals = [rng.randrange(500) for _ in range(5000)]
    sk = SmallestKeys(20, chunk=64)
    for v in vals:
        sk.add(v)
    got, counts = sk.result()
    c = Counter(vals)
    assert got.tolist() == sorted(c)[:20] and counts.tolist() == [c[v] for v in sorted(c)[:20]]


@pytest.mark.slow
def test_memory_bench_runs_both_ways(tmp_path: Path) -> None:
    import numpy as np

    from rsg_eval.bench.corpus import measure

    ballast = np.ones(300 << 17)   # 300 MB in this (parent) process: a child must not report it as its own
    ballast[::4096] = 2.0          # touch every page
    stream, naive = measure(400, workdir=tmp_path), measure(400, naive=True, workdir=tmp_path)
    assert stream["peak_mb"] < 200 and naive["peak_mb"] < 300
    assert sum(stream["made"].values()) == 400 and stream["made"]["exact copy"] > 0
    # both ways remove the emoji texts and the exact copies; near copies may differ by a few (two MinHash schemes)
    assert abs(stream["built"] - naive["built"]) <= 3 and stream["built"] < 400 - stream["made"]["emoji"]
    assert 0 < stream["peak_mb"] < naive["peak_mb"] and stream["dedup_index_mb"] >= 0
