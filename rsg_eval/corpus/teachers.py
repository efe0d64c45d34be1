"""Teacher models for automatic annotation: one kind per task, each batched, on the GPU when one is present.

| task(s)                                   | kind            | loaded as                                        | score (`min_score` filters on it) |
|-------------------------------------------|-----------------|--------------------------------------------------|-----------------------------------|
| ner                                       | token classifier | `token-classification` pipeline, word-aggregated | per entity: the model's probability; the record's score is the lowest kept one |
| mc                                        | text classifier | `text-classification` pipeline (or, `zero_shot: true`, an NLI model as a `zero-shot-classification` pipeline over the config's classes) | the top class's probability |
| nli                                       | NLI classifier  | `text-classification` pipeline on (premise, hypothesis) | the top label's probability |
| qa                                        | extractive QA   | `question-answering` pipeline (SQuAD 2.0 style, "no answer" allowed) | the answer span's probability |
| qg, summarization, title, paraphrase     | seq2seq         | AutoModelForSeq2SeqLM + `generate`               | the geometric mean of the generated tokens' probabilities |

Remote code is off; a teacher that cannot be loaded (hub unreachable, a model of another kind) is one RSGError.
Each loaded teacher reports `info` = {model, revision, commit}: the hub commit it resolved to (or, for a local
folder, a sha256 over its config and weight files), so the summary names exactly what made the corpus.
Only this module's functions import torch/transformers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from rsg_eval.core.errors import RSGError

TEACHER_TASKS = ("ner", "mc", "nli", "qa", "qg", "summarization", "title", "paraphrase")
SEQ2SEQ = ("qg", "summarization", "title", "paraphrase")

# The usual CoNLL-style labels of Russian NER models and their NEREL types; a config's `type_map` adds to / overrides
# these (a value of null drops the type). Labels that are NEREL types already map to themselves.
DEFAULT_TYPE_MAP: dict[str, str | None] = {"PER": "PERSON", "PERS": "PERSON", "LOC": "LOCATION",
                                           "ORG": "ORGANIZATION"}

_COMMON = ("model", "revision", "batch_size", "max_input_tokens", "dtype", "min_score", "unit", "max_chars",
           "per_text")
# Options each kind of teacher accepts besides _COMMON (unknown ones are an error that lists these).
_KIND_OPTS: dict[str, tuple[str, ...]] = {
    "ner": ("type_map", "aggregation", "keep_empty"),
    "mc": ("label_map", "zero_shot", "hypothesis"),
    "nli": ("label_map",),
    "qa": ("max_answer_len", "filter"),
    **{t: ("prompt", "max_new_tokens", "num_beams", "filter") for t in SEQ2SEQ},
}
# Defaults per task; a config's `teachers.<task>` mapping overrides them.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ner": {"min_score": 0.5, "max_chars": 1000, "batch_size": 16},
    "mc": {"min_score": 0.5, "max_chars": 2000, "batch_size": 16},
    "nli": {"min_score": 0.7, "unit": "sentence", "max_chars": 300, "batch_size": 32},
    "qa": {"min_score": 0.3, "max_answer_len": 30, "batch_size": 16},
    "qg": {"max_new_tokens": 48, "max_chars": 2000},
    "summarization": {"max_new_tokens": 160, "max_chars": 4000},
    "title": {"max_new_tokens": 32, "max_chars": 4000},
    "paraphrase": {"max_new_tokens": 96, "unit": "sentence", "max_chars": 300},
}


@dataclass
class TeacherSpec:
    task: str
    model: str
    revision: str | None = None
    batch_size: int = 8
    max_input_tokens: int = 512
    dtype: str | None = None         # e.g. bfloat16 on a GPU; None = the model's default (float32)
    min_score: float = 0.0           # the confidence threshold (what is scored: see the module's table)
    unit: str = "text"               # text: the passage (cut to max_chars at a sentence end); sentence: sentences
    max_chars: int = 2000
    per_text: int = 1                # sentences (nli: sentence pairs) per text when unit is sentence
    # seq2seq
    prompt: str = "{text}"           # the model input; "{text}" is replaced by the passage / sentence
    max_new_tokens: int = 64
    num_beams: int = 1
    filter: bool = True              # drop empty / broken / repeated / copied outputs (off: inspect a teacher)
    # qa
    max_answer_len: int = 30         # tokens
    # ner
    type_map: dict[str, str | None] = field(default_factory=dict)   # teacher label -> NEREL type (null: drop)
    aggregation: str = "first"       # how sub-word predictions become words: first | max | average | simple
    keep_empty: bool = False         # keep texts in which the teacher found no entity (all-"outside" examples)
    # mc, nli
    label_map: dict[str, str | None] = field(default_factory=dict)  # teacher label -> class (null: drop)
    zero_shot: bool = False          # mc: score the config's classes with an NLI model
    hypothesis: str = "Этот текст на тему «{label}»."   # mc zero-shot hypothesis; {label} = a class name

    @classmethod
    def make(cls, task: str, opts: dict[str, Any]) -> TeacherSpec:
        if task not in TEACHER_TASKS:
            raise RSGError(f"no teacher task {task!r}", field="--teacher", expected=TEACHER_TASKS)
        merged = {**_DEFAULTS.get(task, {}), **opts}
        known = set(_COMMON) | set(_KIND_OPTS[task])
        bad = sorted(set(merged) - known)
        if bad:
            raise RSGError(f"unknown teacher options {bad} for {task}", field=f"teachers.{task}",
                           expected=", ".join(sorted(known)))
        if not merged.get("model"):
            raise RSGError(f"teacher {task} has no model", field=f"teachers.{task}.model",
                           expected=f"a hub id or a local folder (or --teacher {task}=MODEL)")
        merged["model"] = str(merged["model"])
        if merged.get("unit", "text") not in ("text", "sentence"):
            raise RSGError(f"unknown unit {merged['unit']!r}", field=f"teachers.{task}.unit",
                           expected=("text", "sentence"))
        if merged.get("aggregation", "first") not in ("first", "max", "average", "simple"):
            raise RSGError(f"unknown aggregation {merged['aggregation']!r}", field=f"teachers.{task}.aggregation",
                           expected=("first", "max", "average", "simple"))
        for key in ("type_map", "label_map"):
            if key in merged:
                if not isinstance(merged[key], dict):
                    raise RSGError("must be a mapping {teacher label: class or null}", field=f"teachers.{task}.{key}")
                merged[key] = {str(k): (None if v is None else str(v)) for k, v in merged[key].items()}
        if task == "mc" and merged.get("zero_shot") and "{label}" not in merged.get("hypothesis", "{label}"):
            raise RSGError("the zero-shot hypothesis needs a {label} slot", field="teachers.mc.hypothesis")
        try:
            return cls(task=task, **merged)
        except TypeError as exc:  # pragma: no cover - a wrong value type that the dataclass rejects
            raise RSGError(str(exc), field=f"teachers.{task}") from None

    @property
    def kind(self) -> str:
        return {"ner": "token-classification", "mc": "zero-shot-classification" if self.zero_shot else
                "text-classification", "nli": "text-classification", "qa": "question-answering"}.get(
            self.task, "seq2seq")


# ---------------------------------------------------------------- loading


def pick_device(device: str | None = "auto") -> str:
    import torch

    if device in (None, "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def _dtype(name: str | None) -> Any:
    if not name:
        return None
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise RSGError(f"unknown dtype {name!r}", field="dtype", expected="float32, bfloat16, float16")
    return value


def _load_error(spec: TeacherSpec, kind: str, exc: BaseException) -> RSGError:
    return RSGError(f"cannot load teacher {spec.task}={spec.model} as a {kind} model: "
                    f"{type(exc).__name__}: {exc}".splitlines()[0],
                    field="--teacher", expected="a hub id (reachable) or a local model folder of that kind")


def local_fingerprint(folder: Path) -> str:
    """sha256 over a local model folder's config, tokenizer and weight files (names and contents)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".bin", ".model", ".txt")):
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return "sha256:" + h.hexdigest()


def _info(spec: TeacherSpec, model: Any) -> dict[str, Any]:
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if Path(spec.model).is_dir():
        commit = local_fingerprint(Path(spec.model))
    return {"model": spec.model, "revision": spec.revision, "commit": commit, "kind": spec.kind}


def _load_pipeline(kind: str, spec: TeacherSpec, device: str | None, **extra: Any) -> Any:
    from transformers import pipeline

    kw: dict[str, Any] = {"trust_remote_code": False, **extra}
    if spec.dtype:
        kw["dtype"] = _dtype(spec.dtype)
    try:
        pipe = pipeline(kind, model=spec.model, tokenizer=spec.model, revision=spec.revision,
                        device=pick_device(device), **kw)
    except RSGError:
        raise
    except Exception as exc:  # hub unreachable, a model of the wrong kind, ...: one line, no traceback
        raise _load_error(spec, kind, exc) from None
    # never more tokens than the model has positions for; some tokenizers carry no model_max_length at all
    tok = pipe.tokenizer
    tok.model_max_length = min(int(getattr(tok, "model_max_length", spec.max_input_tokens) or spec.max_input_tokens),
                               spec.max_input_tokens)
    return pipe


def _labels_of(model: Any) -> tuple[str, ...]:
    id2label = getattr(model.config, "id2label", None) or {}
    return tuple(str(id2label[i]) for i in sorted(id2label))


def _map_labels(spec: TeacherSpec, teacher_labels: Sequence[str], classes: Sequence[str], what: str
                ) -> dict[str, str | None]:
    """teacher label -> class (None = drop): the config's map first, then labels that already are a class
    (case-insensitive). A map value that is not a class is an error naming the valid ones."""
    by_lower = {c.lower(): c for c in classes}
    out: dict[str, str | None] = {}
    for lab in teacher_labels:
        if lab in spec.label_map:
            out[lab] = spec.label_map[lab]
        else:
            out[lab] = by_lower.get(lab.lower())
    for lab, cls in spec.label_map.items():
        if cls is not None and cls not in classes:
            raise RSGError(f"label_map sends {lab!r} to {cls!r}, which is not one of the {what}",
                           field=f"teachers.{spec.task}.label_map", expected=", ".join(classes))
    return out


# ---------------------------------------------------------------- the teachers


class Seq2SeqTeacher:
    """qg, summarization, title, paraphrase: greedy (or beam) generation with each output's confidence.

    Own `generate` call rather than a text2text pipeline: the pipeline returns no scores, and the score is the
    confidence the `min_score` threshold and the records' provenance need.
    """

    def __init__(self, spec: TeacherSpec, device: str | None = "auto") -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.spec = spec
        self.device = pick_device(device)
        try:
            self.tok = AutoTokenizer.from_pretrained(spec.model, revision=spec.revision, trust_remote_code=False)
            kw = {"dtype": _dtype(spec.dtype)} if spec.dtype else {}
            self.model = AutoModelForSeq2SeqLM.from_pretrained(spec.model, revision=spec.revision,
                                                               trust_remote_code=False, **kw)
        except Exception as exc:
            raise _load_error(spec, "seq2seq (text2text)", exc) from None
        self.model.to(self.device).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side = "right"   # an encoder-decoder: padding on the right changes nothing
        self.info = _info(spec, self.model)

    def __call__(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        import torch

        prompts = [self.spec.prompt.replace("{text}", t) for t in texts]
        enc = self.tok(prompts, return_tensors="pt", padding=True, truncation=True,
                       max_length=self.spec.max_input_tokens).to(self.device)
        enc.pop("token_type_ids", None)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.spec.max_new_tokens, num_beams=self.spec.num_beams,
                                      do_sample=False, output_scores=True, return_dict_in_generate=True)
        seqs = out.sequences                                   # (B, 1 + T): decoder start token, then T tokens
        if self.spec.num_beams > 1:
            # beam search: the length-normalised log-probability of the chosen beam
            scores = out.sequences_scores.float().exp().tolist()
        else:
            logp = self.model.compute_transition_scores(seqs, out.scores, normalize_logits=True).float()  # (B, T)
            gen = seqs[:, 1:]                                  # (B, T)
            eos = self.model.generation_config.eos_token_id
            eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=gen.device)
            # a token counts up to and including the first end-of-sequence token; later ones are padding
            is_eos = torch.isin(gen, eos_ids)
            mask = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) == 0   # (B, T)
            n = mask.sum(dim=1).clamp(min=1)
            mean_logp = torch.where(mask, logp, torch.zeros_like(logp)).sum(dim=1) / n   # (B,)
            scores = mean_logp.exp().tolist()
        texts_out = self.tok.batch_decode(seqs, skip_special_tokens=True)
        return [(t.strip(), float(s)) for t, s in zip(texts_out, scores)]


class ExtractiveQATeacher:
    """qa: answers a question by a span of the context; returns (answer, score, start) per question."""

    def __init__(self, spec: TeacherSpec, device: str | None = "auto") -> None:
        self.spec = spec
        self.pipe = _load_pipeline("question-answering", spec, device)
        self.max_seq_len = int(self.pipe.tokenizer.model_max_length)
        self.info = _info(spec, self.pipe.model)

    def __call__(self, contexts: Sequence[str], questions: Sequence[str]) -> list[tuple[str, float, int]]:
        outs = self.pipe(question=list(questions), context=list(contexts), batch_size=len(contexts),
                         handle_impossible_answer=True, max_answer_len=self.spec.max_answer_len,
                         max_seq_len=self.max_seq_len)
        if isinstance(outs, dict):
            outs = [outs]
        return [(o["answer"], float(o["score"]), int(o["start"])) for o in outs]


@dataclass
class Span:
    start: int
    end: int
    label: str     # the teacher's label (before the type map)
    score: float


class TokenClassTeacher:
    """ner: entity spans (character offsets into the input) with the teacher's label and probability."""

    def __init__(self, spec: TeacherSpec, device: str | None = "auto", types: Sequence[str] = ()) -> None:
        self.spec = spec
        self.pipe = _load_pipeline("token-classification", spec, device, aggregation_strategy=spec.aggregation)
        self.info = _info(spec, self.pipe.model)
        labels = sorted({lab.split("-", 1)[-1] for lab in _labels_of(self.pipe.model) if lab != "O"})
        for lab, typ in spec.type_map.items():
            if typ is not None and types and typ not in types:
                raise RSGError(f"type_map sends {lab!r} to {typ!r}, which is not one of the NER types",
                               field="teachers.ner.type_map", expected=", ".join(types))
        # teacher label -> NER type or None (dropped, counted): the config's map, the usual CoNLL names, identity
        self.types: dict[str, str | None] = {}
        for lab in labels:
            if lab in spec.type_map:
                self.types[lab] = spec.type_map[lab]
            elif lab in types:
                self.types[lab] = lab
            else:
                self.types[lab] = DEFAULT_TYPE_MAP.get(lab.upper())
        self.info["type_map"] = self.types

    def __call__(self, texts: Sequence[str]) -> list[list[Span]]:
        outs = self.pipe(list(texts), batch_size=len(texts))
        if outs and isinstance(outs[0], dict):
            outs = [outs]
        return [[Span(int(e["start"]), int(e["end"]), str(e["entity_group"]), float(e["score"])) for e in o]
                for o in outs]


class TextClassTeacher:
    """mc (topics) and nli: the top label (mapped onto the config's classes) and its probability per input.

    nli inputs are (premise, hypothesis) pairs. With `zero_shot: true` the mc teacher is an NLI model that scores
    `hypothesis` with each class name filled in, so any class list can be annotated (the paper's 17 topic classes
    are not a public model's label set).
    """

    def __init__(self, spec: TeacherSpec, device: str | None = "auto", classes: Sequence[str] = ()) -> None:
        self.spec = spec
        self.classes = tuple(classes)
        if spec.task == "mc" and not self.classes:
            raise RSGError("a topic teacher needs the head's classes", field="labels.mc",
                           expected="the list of topic classes (17 in the paper)")
        self.pipe = _load_pipeline(spec.kind, spec, device)
        self.info = _info(spec, self.pipe.model)
        if spec.zero_shot:
            self.map = {c: c for c in self.classes}
        else:
            what = "topic classes" if spec.task == "mc" else "NLI labels"
            self.map = _map_labels(spec, _labels_of(self.pipe.model), self.classes, what)
        self.info["label_map"] = self.map

    def __call__(self, inputs: Sequence[Any]) -> list[tuple[str, str | None, float]]:
        """(teacher label, class or None when unmapped, probability) per input."""
        if self.spec.zero_shot:
            template = self.spec.hypothesis.replace("{label}", "{}")
            outs = self.pipe(list(inputs), candidate_labels=list(self.classes), hypothesis_template=template,
                             multi_label=False, batch_size=len(inputs))
            if isinstance(outs, dict):
                outs = [outs]
            return [(o["labels"][0], o["labels"][0], float(o["scores"][0])) for o in outs]
        outs = self.pipe(list(inputs), top_k=1, batch_size=len(inputs), truncation=True)
        res = []
        for o in outs:
            top = o[0] if isinstance(o, list) else o
            res.append((str(top["label"]), self.map.get(str(top["label"])), float(top["score"])))
        return res


def load_teacher(spec: TeacherSpec, device: str | None = "auto", *, ner_types: Sequence[str] = (),
                 mc_classes: Sequence[str] = (), nli_labels: Sequence[str] = ()) -> Any:
    if spec.task in SEQ2SEQ:
        return Seq2SeqTeacher(spec, device)
    if spec.task == "qa":
        return ExtractiveQATeacher(spec, device)
    if spec.task == "ner":
        return TokenClassTeacher(spec, device, ner_types)
    return TextClassTeacher(spec, device, mc_classes if spec.task == "mc" else nli_labels)
