"""Helpers for the fine-tuning tests: a learnable TERRa-format data folder and teacher-forced val loss."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

SUBJECTS = ["Мальчик", "Девочка", "Учитель", "Врач", "Журналист", "Бабушка", "Дедушка", "Президент", "Команда",
            "Учёный", "Поезд", "Компания"]
VERBS = ["пришёл домой", "открыл окно", "написал книгу", "выиграл матч", "испёк пирог", "опоздал на концерт",
         "купил зонт", "прочитал статью", "позвонил другу", "посадил дерево"]


def learnable_terra(folder: Path, n_train: int = 48, n_val: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    """TERRa-format files whose label follows a surface cue: a hypothesis that ends in "да." entails, one that
    ends in "нет." does not. A model that reads the input learns it in a few epochs; one that ignores it
    stays at chance on the balanced val split."""
    rng = random.Random(seed)

    def rec(idx: int, with_label: bool) -> dict:
        yes = idx % 2 == 0
        premise = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}, а потом {rng.choice(VERBS)}."
        hyp = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}, {'да' if yes else 'нет'}."
        r = {"premise": premise, "hypothesis": hyp, "idx": idx}
        if with_label:
            r["label"] = "entailment" if yes else "not_entailment"
        return r

    d = folder / "TERRa"
    d.mkdir(parents=True, exist_ok=True)
    for split, n, lab in (("train", n_train, True), ("val", n_val, True), ("test", n_test, False)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(rec(i, lab), ensure_ascii=False) + "\n"
                                                  for i in range(n)), encoding="utf-8")
    return folder


def mean_nll(model, tokenizer, pairs) -> float:
    """Teacher-forced mean token NLL of `pairs` (eval mode, no grad): a deterministic val signal."""
    import torch
    import torch.nn.functional as F

    from rsg_eval.training.finetune.data import collate

    model.eval()
    with torch.no_grad():
        b = collate(pairs, tokenizer.pad_token_id)
        dec = model.prepare_decoder_input_ids_from_labels(labels=b["labels"])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=dec).logits
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b["labels"].reshape(-1), ignore_index=-100)
    model.train()
    return float(nll)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in the fine-tuning tests (2 shared cores); the previous setting is restored afterwards.

    Autouse in every test module that imports it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
