"""The paper's recipe as written, in `rsg train-hmtl`: the two readings of "a batch of 12 sequences" and the epoch,
the NER loss (softmax cross-entropy against one-hot labels, outside = class 0, innermost entity per token), the
shared MC+NER adapter, every default pinned to the paper's value or the documented choice, and the fine-tuning
regime's flags. Tiny random models, real gradients."""

from __future__ import annotations

import copy
import json
import math

import pytest

from rsg_eval.core.errors import RSGError
from rsg_eval.training.hmtl.dataset import BatchPlan, ner_bits_for, ner_tags_for
from rsg_eval.corpus.labels import NEREL_TYPES, head_labels

ORG, CITY = NEREL_TYPES.index("ORGANIZATION"), NEREL_TYPES.index("CITY")


# ------------------------------------------------------------------ batch readings and the epoch
def test_total_reading_rotates_twelve_over_eight_tasks():
    sizes = tuple((t, 100) for t in "abcdefgh")
    plan = BatchPlan(sizes, batch_size=12, grad_accum=2, reading="total")
    m0 = {t: c for t, _, c in plan.micro(0, 0, 0)}
    m1 = {t: c for t, _, c in plan.micro(0, 1, 0)}
    # micro-step 1: slots 0..11 -> tasks a..h, then a..d again; micro-step 2 gives e..h their second turn
    assert m0 == {"a": 2, "b": 2, "c": 2, "d": 2, "e": 1, "f": 1, "g": 1, "h": 1}
    assert m1 == {"a": 1, "b": 1, "c": 1, "d": 1, "e": 2, "f": 2, "g": 2, "h": 2}
    assert sum(m0.values()) == sum(m1.values()) == 12
    assert plan.per_step == 24 and plan.per_task_per_step == 3
    for step in range(5):
        assert plan.step_counts(step) == {t: 3 for t in "abcdefgh"}
    # each task's stream is read contiguously, without gaps or overlaps, micro-step after micro-step
    seen = {t: [] for t in "abcdefgh"}
    for step in range(4):
        for micro in range(2):
            for t, start, count in plan.micro(step, micro, 0):
                seen[t] += list(range(start, start + count))
    assert all(v == list(range(12)) for v in seen.values())


def test_total_reading_uneven_and_data_parallel():
    # 10 slots per step over 4 tasks: shares differ by at most one and even out over steps
    plan = BatchPlan(tuple((t, 50) for t in "abcd"), batch_size=5, grad_accum=2, reading="total")
    counts = [plan.step_counts(s) for s in range(4)]
    assert all(sum(c.values()) == 10 and max(c.values()) - min(c.values()) <= 1 for c in counts)
    assert {t: sum(c[t] for c in counts) for t in "abcd"} == {t: 10 for t in "abcd"}
    # two processes with 6 each read exactly what one process with 12 reads, split between them
    one = BatchPlan(tuple((t, 50) for t in "abcdefgh"), batch_size=12, grad_accum=1, reading="total")
    two = BatchPlan(tuple((t, 50) for t in "abcdefgh"), batch_size=6, grad_accum=1, world=2, reading="total")
    for step in range(3):
        want = {t: set(range(s, s + c)) for t, s, c in one.micro(step, 0, 0)}
        got: dict[str, set] = {}
        for rank in (0, 1):
            for t, s, c in two.micro(step, 0, rank):
                assert not got.get(t, set()) & set(range(s, s + c))
                got.setdefault(t, set()).update(range(s, s + c))
        assert got == want
        assert two.step_counts(step) == one.step_counts(step)


def test_epoch_is_every_example_seen_once():
    # hand-worked: a has 10 examples, b 3; 4 sequences per step in all -> 2 of each per step
    plan = BatchPlan((("a", 10), ("b", 3)), batch_size=4, grad_accum=1, reading="total")
    assert plan.steps_per_epoch == 5                       # 10 / 2: the largest task sets the length
    assert plan.repeats() == {"a": 1.0, "b": pytest.approx(10 / 3)}
    assert plan.taken(0, 4) == 8 < 10 <= plan.taken(0, 5)
    # per task: 4 of each per step
    per = BatchPlan((("a", 10), ("b", 3)), batch_size=4, grad_accum=1, reading="per-task")
    assert per.steps_per_epoch == 3 and per.per_step == 8 and per.repeats() == {"a": 1.2, "b": 4.0}
    # the rotation's last slot: with 3 tasks of 4, 6 slots per step, task c's 4th example is slot 11 (step 2)
    odd = BatchPlan((("a", 4), ("b", 4), ("c", 4)), batch_size=6, grad_accum=1, reading="total")
    assert odd.steps_per_epoch == 2 and all(odd.taken(i, 2) >= 4 for i in range(3))
    text = "\n".join(plan.describe())
    assert "4 sequences per micro-step in all" in text and "5 optimizer steps" in text and "b 3.33x of 3" in text
    with pytest.raises(RSGError, match="batch reading"):
        BatchPlan((("a", 1),), batch_size=1, reading="both")


# ------------------------------------------------------------------ the NER loss
def test_ner_tags_innermost_entity_labels_the_token():
    # tokens: "Москов"(0,6) "ский"(6,10) " уни"(10,14) "верс"(14,18) special (0,0); CITY inside ORGANIZATION
    offsets = [(0, 6), (6, 10), (10, 14), (14, 18), (0, 0)]
    spans = [(0, 18, ORG), (0, 10, CITY)]
    assert ner_tags_for(offsets, spans) == [CITY + 1, CITY + 1, ORG + 1, ORG + 1, 0]
    # the multi-label encoding keeps both types on the nested tokens
    assert ner_bits_for(offsets, spans)[0] == (1 << ORG) | (1 << CITY)
    # same span twice (two types): the lower type index wins; a token touching only the end stays outside
    assert ner_tags_for([(0, 4)], [(0, 4, 7), (0, 4, 3)]) == [4]
    assert ner_tags_for([(4, 8)], [(0, 4, 3)]) == [0]


@pytest.fixture(scope="module")
def tiny_hier():
    import torch

    from rsg_eval.models.hierarchical import HierarchicalT5
    from rsg_eval.models.tiny import build_tiny

    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    base, tok = build_tiny(num_layers=2, num_decoder_layers=1)
    yield base, tok
    torch.set_num_threads(before)


def test_ner_softmax_loss_worked_by_hand(tiny_hier):
    import torch

    from rsg_eval.training.hmtl.dataset import Batch
    from rsg_eval.training.hmtl.train import task_loss
    from rsg_eval.models.hierarchical import HierarchicalT5

    base, tok = tiny_hier
    m = HierarchicalT5.from_base(copy.deepcopy(base), split=1, **head_labels())
    m.eval()
    enc = tok(["Анна Петрова работает врачом в Новосибирске.", "Да."], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any()
    clf = m.heads["ner"].classifier
    with torch.no_grad():   # logits: 0 for every type except CITY, which gets b
        clf.weight.zero_()
        clf.bias.zero_()
        b = 1.5
        clf.bias[CITY] = b
    target = torch.zeros_like(ids)                 # outside ...
    target[0, 1:4] = CITY + 1                      # ... three CITY tokens
    target[0, 4] = ORG + 1                         # ... one ORGANIZATION token
    target[mask == 0] = -100                       # padding is ignored
    with torch.no_grad():
        loss = task_loss(m, Batch("ner", ids, mask, target), "softmax")
    n_real = int(mask.sum())
    # softmax over [outside 0, 28 zeros, b]: -log p(class) = log(29 + e^b) - logit(class)
    want = math.log(29 + math.exp(b)) - b * 3 / n_real
    assert float(loss) == pytest.approx(want, rel=1e-6)
    # the multi-label option is still there: BCE per (token, type), outside = all zeros
    bits = torch.zeros(ids.shape + (29,))
    with torch.no_grad():
        ml = task_loss(m, Batch("ner", ids, mask, bits), "multilabel")
    per_token = (28 * math.log(2) + math.log(1 + math.exp(b))) / 29
    assert float(ml) == pytest.approx(per_token, rel=1e-6)


def test_softmax_entities_come_out_flat(tiny_hier, tmp_path):
    import torch

    from rsg_eval.training.hmtl.infer import predict_entities
    from rsg_eval.models.hierarchical import HierarchicalT5, load_hierarchical

    base, tok = tiny_hier
    m = HierarchicalT5.from_base(copy.deepcopy(base), split=1, **head_labels())
    assert m.config.ner_representation == "softmax-innermost"
    with torch.no_grad():
        m.heads["ner"].classifier.weight.zero_()
        m.heads["ner"].classifier.bias.fill_(-5.0)
        m.heads["ner"].classifier.bias[CITY] = 2.0   # every real token: CITY beats outside (0) and the rest
    text = "Москва"
    [ents] = predict_entities(m, tok, [text])
    assert [(e["type"], e["text"]) for e in ents] == [("CITY", "Москва")]
    # the same head read as multi-label: sigmoid(2) > 0.5 for CITY only -> the same entity
    m.config.ner_representation = "multilabel-sigmoid"
    assert [(e["type"], e["text"]) for e in predict_entities(m, tok, [text])[0]] == [("CITY", "Москва")]
    m.config.ner_representation = "softmax-innermost"
    m.save_pretrained(tmp_path / "c", tokenizer=tok)
    assert json.loads((tmp_path / "c" / "hmtl_config.json").read_text())["ner_representation"] == "softmax-innermost"
    m2, _ = load_hierarchical(tmp_path / "c")
    assert m2.config.ner_representation == "softmax-innermost"


# ------------------------------------------------------------------ adapters
def _bottlenecks(m):
    from rsg_eval.models.adapters import Bottleneck

    return [mod for mod in m.modules() if isinstance(mod, Bottleneck)]


def test_shared_mc_ner_adapter(tiny_hier, tmp_path):
    import torch

    from rsg_eval.models.hierarchical import HierarchicalT5, load_hierarchical

    base, tok = tiny_hier
    per = HierarchicalT5.from_base(copy.deepcopy(base), split=1, **head_labels())
    sh = HierarchicalT5.from_base(copy.deepcopy(base), split=1, adapter_layout="shared-mc-ner", **head_labels())
    assert len(_bottlenecks(per)) == 4 and len(_bottlenecks(sh)) == 3   # paper: MC+NER, NLI, LM
    enc = tok(["Мальчик уронил стакан.", "Да."], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    sh.eval()
    # the shared branch (norm + adapter) is what both heads read: both losses reach it, NLI does not
    for fn, reaches in (("mc_logits", True), ("ner_logits", True), ("nli_logits", False)):
        sh.zero_grad(set_to_none=True)
        with torch.no_grad():     # a non-zero up-projection so gradients flow into the down-projection too
            sh.block1_shared[1].up.weight.normal_(0, 0.02)
        getattr(sh, fn)(ids, mask).float().pow(2).mean().backward()
        got = [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in sh.block1_shared.parameters()]
        assert all(got) if reaches else not any(got), fn
    with torch.no_grad():
        for p in sh.heads.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sh.save_pretrained(tmp_path / "s", tokenizer=tok)
    cfg = json.loads((tmp_path / "s" / "hmtl_config.json").read_text())
    assert cfg["adapter_layout"] == "shared-mc-ner" and cfg["format_version"] == 2
    back, _ = load_hierarchical(tmp_path / "s")
    with torch.no_grad():
        for fn in ("mc_logits", "ner_logits", "nli_logits"):
            assert torch.equal(getattr(sh, fn)(ids, mask), getattr(back, fn)(ids, mask))
    per.save_pretrained(tmp_path / "p", tokenizer=tok)      # per-head checkpoints keep format 1
    assert json.loads((tmp_path / "p" / "hmtl_config.json").read_text())["format_version"] == 1
    with pytest.raises(RSGError, match="adapter layout"):
        HierarchicalT5.from_base(copy.deepcopy(base), split=1, adapter_layout="inside", **head_labels())


# ------------------------------------------------------------------ defaults and --help
# Each default of `rsg train-hmtl`, and where it comes from: the paper's value, or the documented choice.
DEFAULTS = {
    "epochs": 4,                 # paper: 4 epochs
    "optimizer": "adamw",        # paper: AdamW (Adafactor is an option, issue 20)
    "report_to": "none",         # no experiment tracker unless asked
    "batch_size": 12,            # paper: "a batch of 12 sequences"
    "grad_accum": 2,             # paper: accumulation 2, effective batch 24
    "batch_reading": "total",    # choice: the reading closest to the text (12 in all, effective 24)
    "max_source_length": 512,        # paper: sequences up to 512 tokens
    "max_target_length": 512,    # paper: sequences up to 512 tokens
    "schedule": "paper",         # paper: CyclicLR exp_range (a reproduction runs what the paper ran)
    "lr_min": 1e-6,              # paper: 1e-6
    "lr": 1e-4,                  # paper: 1e-4
    "gamma": 0.9,                # paper: gamma 0.9
    "step_size_up": None,        # paper: not stated -> torch's default 2000
    "warmup_steps": None,        # cosine only: 6 % of the steps
    "weight_decay": 0.01,        # paper: AdamW, decay not stated -> torch's AdamW default
    "clip_norm": 1.0,            # paper: clipping at norm 1.0
    "task_weights": None,        # choice: the plain sum of the task losses, all 1 (the paper does not say)
    "split": "0.25",             # paper: Block 1 = 6 of 24 encoder layers
    "adapter_dim": None,         # paper: "compact", size not stated -> d_model / 16
    "adapter_layout": "per-head",  # choice: one adapter per head (the paper's single MC+NER adapter is an option)
    "adapter_activation": "relu",  # choice: ReLU bottleneck (the paper's "linear adapter" literally is an option)
    "ner_loss": "softmax",       # paper: cross-entropy against one-hot labels (Eq. 1)
    "bf16": "auto",              # paper: bf16 (on a GPU that supports it)
    "gradient_checkpointing": True,  # paper: gradient checkpointing
    "seed": 0,                   # paper: not stated
    "max_steps_per_epoch": None,
    "save_every": 0,
    "quiet": False,
    "dist_timeout": 7200.0,      # several processes: seconds a collective may wait (torch's NCCL default: 600)
    "early_stopping": 0,         # paper: no early stopping
    "sharding": None,            # several processes: ddp (fsdp on request)
    "fsdp_cpu_offload": False,
    "restart": False,            # run folder: resume unless asked to start over
    "threads": None,             # CPU threads: chosen from the model's size (rsg_eval.models.threads)
}


def _cli_defaults() -> dict:
    import typer.main

    from rsg_eval.cli import app

    cmd = typer.main.get_command(app).commands["train-hmtl"]
    return {p.name: p.default for p in cmd.params if not p.required}


def test_every_train_hmtl_default_is_pinned():
    from rsg_eval.training.hmtl.train import TrainConfig
    from rsg_eval.corpus.labels import TASKS

    got = _cli_defaults()
    assert got == DEFAULTS
    cfg = TrainConfig(model="m", corpus="c", out="o")
    for name, want in DEFAULTS.items():
        if name in ("task_weights", "quiet", "restart", "threads"):  # arguments of the command, not config
            continue
        assert getattr(cfg, name) == want, name
    assert cfg.task_weights == {t: 1.0 for t in TASKS}
    # not an option of the command, documented in docs/hmtl.md's recipe table
    assert cfg.head_dropout == 0.1
    from rsg_eval.training.hmtl import schedules
    assert schedules.TORCH_DEFAULT_STEP_SIZE_UP == 2000


def test_help_states_each_reading():
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    res = CliRunner().invoke(app, ["train-hmtl", "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert res.exit_code == 0
    text = " ".join(res.output.replace("│", " ").split())
    for want in ("12 sequences per micro-step in all", "12 of every task per micro-step",
                 "every train example has been seen at least once", "effective batch 24",
                 "the default so that a reproduction runs what the paper ran", "cycle-gamma", "cosine",
                 "innermost entity's type", "multilabel", "shared-mc-ner", "one adapter for the MC and NER heads",
                 "paper: 4", "paper: 2", "paper: 1e-6", "paper: 1e-4", "paper: 0.9", "paper: 1.0", "paper: 512"):
        assert want in text, want


def test_bad_choices_are_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from rsg_eval.cli import app

    for opt, val, field in (("--batch-reading", "both", "batch-reading"), ("--ner-loss", "bio", "ner-loss"),
                            ("--adapter-layout", "inside", "adapter-layout")):
        res = CliRunner().invoke(app, ["train-hmtl", "--model", "tiny", "--corpus", "sample", "--out",
                                       str(tmp_path / "o"), opt, val])
        # an RSGError (the CLI's main() prints it as one red line, exit 2) naming the option and the choices
        assert isinstance(res.exception, RSGError), res.output
        assert res.exception.field == field and val in str(res.exception) and "expected" in str(res.exception)
    assert not (tmp_path / "o").exists()      # refused before anything was written


# ------------------------------------------------------------------ fine-tuning: "20 epochs"
def test_rucos_config_departs_from_literal_epochs_and_flags_restore_them():
    from pathlib import Path

    from rsg_eval.training.finetune.config import load_config_set

    cfg = Path(__file__).resolve().parents[1] / "configs" / "finetune_fredt5_1.7b.yaml"
    configs = load_config_set(str(cfg), {})
    rucos, terra = configs.for_task("RuCoS"), configs.for_task("TERRa")
    assert (terra.epochs, terra.eval_every, terra.early_stopping) == (20, 0, 0)       # 20 epochs, every epoch
    assert (rucos.epochs, rucos.eval_every, rucos.early_stopping) == (20, 2000, 5)    # the documented departure
    literal = load_config_set(str(cfg), {"eval_every": 0, "early_stopping": 0}).for_task("RuCoS")
    assert (literal.epochs, literal.eval_every, literal.early_stopping) == (20, 0, 0)


def test_config_fields_are_named_as_the_options_and_the_fingerprint_keeps_the_old_names():
    """--max-source-length, --lr, --save-every set max_source_length, lr, save_every; run.json and settings.json
    keep recording max_length and lr_max, so an --out written before the rename resumes."""
    from rsg_eval.training.hmtl.config import TrainConfig, from_dict

    cfg = TrainConfig(model="m", corpus="c", out="o", max_source_length=64, lr=3e-3, save_every=5)
    fp = cfg.fingerprint_dict()
    assert fp["max_length"] == 64 and fp["lr_max"] == 3e-3 and "lr" not in fp and "save_steps" not in fp
    assert "early_stopping" not in fp and "sharding" not in fp     # off / not a setting of the outputs
    assert from_dict({"model": "m", "corpus": "c", "out": "o", "max_length": 64, "lr_max": 3e-3}) == \
        TrainConfig(model="m", corpus="c", out="o", max_source_length=64, lr=3e-3)
