"""Prompt templates: Jinja model inputs with their verbalisers, one YAML file per template.

Light module (jinja2 + yaml, no torch). A template lives in `prompts/<task lower>/<name>.yaml`::

    task: TERRa
    default: true                 # the template used when none is named (one per task)
    description: Да/нет: следует ли гипотеза из текста
    prefix: "<LM>"                # put before the rendered input (FRED-T5's denoiser tag); "" for none
    truncate: premise             # the passage-like field shortened when the input is too long (optional)
    template: |                   # Jinja, rendered from Item.fields
      {{ premise }}
      Вопрос: верно ли, что {{ hypothesis }}? Да или нет?
      Ответ:
    choices:                      # label -> answer text (a Jinja template too: PARus "{{ choice1 }}")
      entailment: Да
      not_entailment: Нет

Two optional keys shape few-shot prompts (`rsg zeroshot --num-fewshot K`): `fewshot_separator` goes between the
solved examples and before the item (default a blank line, "\n\n"), `fewshot_answer_separator` between a solved
example's input and its answer text (default " ").

Tasks whose labels differ per item (RuCoS: the candidate entities) give one Jinja `choice:` instead of
`choices:`, rendered once per label with the variable `label` bound to it
(`{{ query | replace('@placeholder', label) }}`). Boolean labels are written `true`/`false`.

Rendering uses `jinja2.sandbox.SandboxedEnvironment` with `StrictUndefined`: a template cannot reach Python
internals and an unknown field is an error, not an empty string. Errors name the template file, the line
(syntax errors) and the field. The sandbox is also bounded (`rsg_eval.core.sandbox`): no string or list a template
builds, and no rendered prompt or choice, may exceed RSG_MAX_PROMPT_CHARS; loop iterations and calls are
counted against RSG_MAX_TEMPLATE_STEPS per render; deep recursion and numeric overflow are errors naming the
file. With `max_tokens`, text fields are cut to max_tokens x RSG_MAX_CHARS_PER_TOKEN characters before
anything is tokenised (rsg_eval.core.limits).

API::

    PROMPTS_DIR                       the repo's prompts/ folder ($RSG_PROMPTS_DIR overrides)
    list_templates(task=None) -> dict[str, list[str]]    {Task: [names]}, default first
    load_template(task, name=None) -> Template           name: a template name or a path to a .yaml file
    Template.render(item, tokenizer=None, max_tokens=None, prefix=None) -> Rendered(prompt, choices, truncated)
    Template.render_content_free(item, prefix=None) -> str   text fields -> "N/A" (for --calibrate)
    Template.sha256                   of the YAML file's bytes (goes into run fingerprints)
    render_shot(template, item, label) -> str        a solved example: input + separator + the label's answer text
    render_fewshot(template, item, shots, tokenizer=None, max_tokens=None, prefix=None) -> (Rendered, n_shots)
    render_fewshot_content_free(template, item, shots, prefix=None) -> str
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import yaml
from jinja2 import StrictUndefined, meta
from jinja2.sandbox import SandboxedEnvironment

from rsg_eval.core.errors import RSGError, clip
from rsg_eval.core.io import load_yaml, read_bytes, read_yaml
from rsg_eval.core.limits import CHARS_PER_TOKEN, cut_text
from rsg_eval.core.sandbox import BoundedSandbox, OverLimit, bounded_render
from rsg_eval.core.tasks import TASK_NAMES, get_task

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"  # rsg_eval/core/prompts.py -> the repo root

# Template variables each task's items provide (docs/design.md, "Template fields per task").
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "TERRa": ("premise", "hypothesis"),
    "LiDiRus": ("premise", "hypothesis", "sentence1", "sentence2"),
    "RCB": ("premise", "hypothesis", "verb", "negation", "genre"),
    "PARus": ("premise", "choice1", "choice2", "question", "question_ru"),
    "MuSeRC": ("passage", "question", "answer"),
    "RUSSE": ("word", "sentence1", "sentence2", "form1", "form2"),
    "RWSD": ("text", "span1_text", "span2_text", "span1_index", "span2_index"),
    "DaNetQA": ("question", "passage"),
    "RuCoS": ("passage", "query", "entities"),
}
_KEYS = {"task", "default", "description", "tags", "prefix", "truncate", "template", "choices", "choice",
         "fewshot_separator", "fewshot_answer_separator"}
# `tags:` label a template for selection (`rsg zeroshot --templates tag:cloze`) and for reports; they never change
# a prompt. style: how the input is phrased; verbaliser: the answer words; choices: whether the input lists them.
TAG_KEYS = ("style", "verbaliser", "choices")
STYLES = ("question", "instruction", "cloze", "dialogue", "plain")
CHOICES_TAGS = ("listed", "hidden")
FEWSHOT_SEPARATOR = "\n\n"
FEWSHOT_ANSWER_SEPARATOR = " "
ELLIPSIS = " …"
CONTENT_FREE = "N/A"


def prompts_dir() -> Path:
    """$RSG_PROMPTS_DIR, else the repo's prompts/ (a clone or an editable install), else the copy that a
    regular install puts under `<prefix>/share/rsg-eval/prompts` (pyproject's data-files)."""
    env = os.environ.get("RSG_PROMPTS_DIR")
    if env:
        return Path(env)
    if PROMPTS_DIR.is_dir():
        return PROMPTS_DIR
    installed = Path(sys.prefix) / "share" / "rsg-eval" / "prompts"
    return installed if installed.is_dir() else PROMPTS_DIR


@dataclass(frozen=True)
class Rendered:
    """A rendered model input and its answer texts, aligned with `item.labels`."""

    prompt: str
    choices: list[str]
    truncated: bool = False


def _env() -> SandboxedEnvironment:
    return BoundedSandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


def _label_key(label: Any) -> str:
    """Canonical text of a label for matching YAML keys (YAML reads `true:` as a bool, `0:` as an int)."""
    if isinstance(label, bool):
        return "true" if label else "false"
    text = str(label)
    return text.strip().lower() if text.strip().lower() in ("true", "false") else text


@dataclass
class Template:
    """One prompt template with its verbaliser (see the module docstring for the file format)."""

    task: str
    name: str
    path: Path
    source: str
    prefix: str = ""
    truncate: str | None = None
    choices: dict[str, str] | None = None      # _label_key(label) -> Jinja source
    choice: str | None = None                  # per-label Jinja source (variable `label`)
    description: str = ""
    tags: dict[str, str] = field(default_factory=dict)   # TAG_KEYS -> value (selection and reports only)
    default: bool = False
    sha256: str = ""
    fewshot_separator: str = FEWSHOT_SEPARATOR
    fewshot_answer_separator: str = FEWSHOT_ANSWER_SEPARATOR
    lines: dict[str, int] = field(default_factory=dict)   # YAML key -> first line of its value (1-based)
    _compiled: Any = field(default=None, repr=False)
    _compiled_choices: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- rendering
    def render(self, item: Any, tokenizer: Any = None, max_tokens: int | None = None,
               prefix: str | None = None) -> Rendered:
        """Prompt and choices for `item`; with a tokenizer and `max_tokens`, shorten only `truncate`'s field.

        The passage is cut at a word boundary (its start is kept, " …" marks the cut) to the longest length
        at which the whole input fits; the question and the instruction are never touched. When even an
        empty passage does not fit, the input is returned whole with `truncated=True` (the scorer's own
        length limit then applies).
        """
        fields = cut_fields(item.fields, max_tokens)
        pre = self.prefix if prefix is None else prefix
        prompt = pre + self._render_main(fields)
        choices = self.render_choices(item, max_tokens=max_tokens)
        if tokenizer is None or not max_tokens or _n_tokens(tokenizer, prompt) <= max_tokens:
            return Rendered(prompt, choices, False)
        if not self.truncate:
            return Rendered(prompt, choices, True)
        text = str(fields[self.truncate])
        words = text.split(" ")

        def fits(n: int) -> tuple[bool, str]:
            f = dict(fields)
            f[self.truncate] = " ".join(words[:n]).rstrip() + ELLIPSIS if n < len(words) else text
            p = pre + self._render_main(f)
            return _n_tokens(tokenizer, p) <= max_tokens, p

        # Binary search for the most words that fit: O(log n) tokenisations of the full input.
        lo, hi = 0, len(words) - 1
        best = None
        while lo <= hi:
            mid = (lo + hi) // 2
            ok, p = fits(mid)
            if ok:
                best, lo = p, mid + 1
            else:
                hi = mid - 1
        return Rendered(best if best is not None else fits(0)[1], choices, True)

    def render_content_free(self, item: Any, prefix: str | None = None) -> str:
        """The prompt with every text field replaced by "N/A" (for calibration against a content-free input).

        Structural fields keep their values (PARus `question` picks the template branch; indices, lists).
        """
        keep = {"question"} if self.task == "PARus" else set()
        fields = {k: (CONTENT_FREE if isinstance(v, str) and k not in keep else v) for k, v in item.fields.items()}
        pre = self.prefix if prefix is None else prefix
        return pre + self._render_main(fields)

    def render_choices(self, item: Any, max_tokens: int | None = None) -> list[str]:
        """Answer texts aligned with `item.labels`; an empty one is an error naming the label. With
        `max_tokens`, text fields are first cut as in `render` (cut_fields)."""
        fields = cut_fields(item.fields, max_tokens)
        out = []
        for label in item.labels:
            if self.choice is not None:
                text = self._render("choice", self.choice, {**fields, "label": label})
            else:
                key = _label_key(label)
                if key not in (self.choices or {}):
                    raise RSGError(f"no answer text for label {label!r}", file=self.path, field="choices",
                                   expected=list(self.choices or {}))
                text = self._render(f"choices.{key}", self.choices[key], fields)
            if not text.strip():
                raise RSGError(f"the answer text for label {label!r} renders empty for item {item.key}",
                               file=self.path, line=self.lines.get("choices", self.lines.get("choice")),
                               field="choice" if self.choice is not None else f"choices.{_label_key(label)}")
            out.append(text)
        return out

    def _render_main(self, fields: Mapping[str, Any]) -> str:
        return self._render("template", self.source, fields).strip()

    def _render(self, where: str, source: str, fields: Mapping[str, Any]) -> str:
        try:
            if where == "template":
                if self._compiled is None:
                    self._compiled = _compile(self, "template", source)
                tpl = self._compiled
            else:
                tpl = self._compiled_choices.get(where)
                if tpl is None:
                    tpl = self._compiled_choices[where] = _compile(self, where, source)
            return bounded_render(tpl, fields)
        except OverLimit as exc:
            raise exc.limit.error(f"the template {exc.args[0]}", file=self.path, field=where) from None
        except RecursionError:
            raise RSGError("the template recurses without end (a macro that calls itself?)", file=self.path,
                           field=where, expected="macros that stop calling themselves") from None
        except OverflowError as exc:
            if "MAX_RANGE" in str(exc):  # jinja's own cap on range()
                raise RSGError("the template asked for a range of more than 100,000 numbers (the sandbox's "
                               "limit); loop over the item's fields instead", file=self.path, field=where) from None
            raise RSGError(f"the template failed: a number too large ({exc})", file=self.path, field=where) from None
        except (ArithmeticError, ValueError, TypeError) as exc:
            raise RSGError(f"the template failed: {type(exc).__name__}: {exc}", file=self.path,
                           field=where) from None
        except jinja2.UndefinedError as exc:
            raise RSGError(f"undefined variable in the template: {exc.message}", file=self.path,
                           field=_undefined_name(exc) or where,
                           expected=list(TASK_FIELDS.get(self.task, ()))) from None
        except jinja2.exceptions.SecurityError as exc:
            raise RSGError(f"the template tried something the sandbox forbids: {exc}", file=self.path,
                           field=where) from None
        except jinja2.TemplateError as exc:
            raise RSGError(f"template error: {exc}", file=self.path, field=where) from None
        except RSGError:
            raise
        except Exception as exc:  # [].pop(), {}.popitem(), premise|xmlattr, ...: whatever a template raises
            raise RSGError(f"the template failed: {type(exc).__name__}: {clip(str(exc), 200)}", file=self.path,
                           field=where) from None


def _undefined_name(exc: jinja2.UndefinedError) -> str | None:
    msg = exc.message or ""
    if msg.startswith("'") and "' is undefined" in msg:
        return msg[1: msg.index("' is undefined")]
    return None


def _n_tokens(tokenizer: Any, text: str) -> int:
    # verbose=False: measuring a too-long prompt is how we find out it must be shortened, so transformers'
    # "Token indices sequence length is longer than the specified maximum ..." warning would be a false alarm.
    return len(tokenizer(text, verbose=False)["input_ids"])


def _compile(tpl: Template, where: str, source: str) -> Any:
    """Compile Jinja source; a syntax error names the YAML file and the line inside it."""
    env = _env()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        base = tpl.lines.get(where.split(".")[0])
        line = base + (exc.lineno or 1) - 1 if base else exc.lineno
        raise RSGError(f"Jinja syntax error: {exc.message}", file=tpl.path, line=line, field=where) from None


# --------------------------------------------------------------------------------------------------- few-shot

def _choice_text(tpl: Template, item: Any, label: Any) -> str:
    """The answer text of one label of `item` (render_choices renders every label; a shot needs one)."""
    fields = dict(item.fields)
    if tpl.choice is not None:
        return tpl._render("choice", tpl.choice, {**fields, "label": label})
    key = _label_key(label)
    if key not in (tpl.choices or {}):
        raise RSGError(f"no answer text for label {label!r}", file=tpl.path, field="choices",
                       expected=list(tpl.choices or {}))
    return tpl._render(f"choices.{key}", tpl.choices[key], fields)


def render_shot(tpl: Template, item: Any, label: Any) -> str:
    """One solved example: the item's input (no prefix) + `fewshot_answer_separator` + the answer text of `label`
    (the verbaliser's text for the gold label, exactly what the model is asked to score for the real item)."""
    return tpl._render_main(dict(item.fields)) + tpl.fewshot_answer_separator + _choice_text(tpl, item, label)


def _join(tpl: Template, pre: str, shots: Sequence[str], main: str) -> str:
    return pre + tpl.fewshot_separator.join([*shots, main])


def render_fewshot(tpl: Template, item: Any, shots: Sequence[str], tokenizer: Any = None,
                   max_tokens: int | None = None, prefix: str | None = None) -> tuple[Rendered, int]:
    """The item's prompt with solved examples (`render_shot` texts) before it, and how many of them it kept.

    prefix + shot_1 + sep + ... + shot_n + sep + item input. With a tokenizer and `max_tokens`, the most shots
    that fit are kept (the last ones dropped); only when even no shot leaves room is the item's passage
    shortened (`Template.render`). Without shots this is `Template.render` exactly, byte for byte.

    The count is found by bisection, never by dropping shots one at a time: prompts of more than `max_tokens` x
    RSG_MAX_CHARS_PER_TOKEN characters cannot fit (no token spans that many), which bounds the count from the
    shots' lengths alone; then about log2 of that many tokenisations of bounded text decide it. So K = 1,000,000
    costs about what K = 5 does (it took over 600 s, one re-tokenisation per dropped shot).
    """
    if not shots:
        return tpl.render(item, tokenizer=tokenizer, max_tokens=max_tokens, prefix=prefix), 0
    pre = tpl.prefix if prefix is None else prefix
    main = tpl._render_main(dict(item.fields))
    choices = tpl.render_choices(item)
    if tokenizer is None or not max_tokens:
        return Rendered(_join(tpl, pre, shots, main), choices, False), len(shots)
    # hi: the most shots whose characters alone could fit; lo: the most known to fit (0 = none tried yet)
    budget = max_tokens * CHARS_PER_TOKEN.value()
    used, sep, hi = len(pre) + len(main), len(tpl.fewshot_separator), 0
    for text in shots:
        used += len(text) + sep
        if used > budget:
            break
        hi += 1
    lo = 0
    while lo < hi:  # invariant: lo shots fit (or lo = 0), more than hi do not
        mid = (lo + hi + 1) // 2
        if _n_tokens(tokenizer, _join(tpl, pre, shots[:mid], main)) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        return Rendered(_join(tpl, pre, shots[:lo], main), choices, False), lo
    return tpl.render(item, tokenizer=tokenizer, max_tokens=max_tokens, prefix=prefix), 0


def render_fewshot_content_free(tpl: Template, item: Any, shots: Sequence[str], prefix: str | None = None) -> str:
    """The content-free input for --calibrate with the same solved examples in front (the calibration then
    measures the bias the examples induce too)."""
    if not shots:
        return tpl.render_content_free(item, prefix=prefix)
    pre = tpl.prefix if prefix is None else prefix
    return _join(tpl, pre, shots, tpl.render_content_free(item, prefix=""))


# --------------------------------------------------------------------------------------------------- loading

def _task_dir(task: str) -> Path:
    return prompts_dir() / get_task(task).name.lower()


def list_templates(task: str | None = None) -> dict[str, list[str]]:
    """{Task: [template names]} for one task or all nine, the default template first."""
    tasks = [get_task(task).name] if task else list(TASK_NAMES)
    out: dict[str, list[str]] = {}
    for t in tasks:
        folder = _task_dir(t)
        names = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        default = _default_name(t, names)
        out[t] = ([default] if default else []) + [n for n in names if n != default]
    return out


def _default_name(task: str, names: Sequence[str]) -> str | None:
    for n in names:
        try:
            raw = read_yaml(_task_dir(task) / f"{n}.yaml")
        except RSGError:
            continue
        if isinstance(raw, dict) and raw.get("default") is True:
            return n
    return names[0] if names else None


def load_template(task: str, name: str | None = None) -> Template:
    """The template `name` of `task` (its default when None); `name` may also be a path to a .yaml file."""
    spec = get_task(task)
    if name and (name.endswith((".yaml", ".yml")) or "/" in name or os.sep in name):
        path = Path(name)
        if not path.is_file():
            raise RSGError("template file not found", file=path, field="template")
    else:
        available = list_templates(spec.name)[spec.name]
        if not available:
            raise RSGError(f"no templates for {spec.name}", file=_task_dir(spec.name), field="template")
        if name is None:
            name = available[0]
        if name not in available:
            raise RSGError(f"task {spec.name} has no template {name!r}", field="template", expected=available)
        path = _task_dir(spec.name) / f"{name}.yaml"
    return parse_template(path, spec.name)


def parse_template(path: Path, task: str) -> Template:
    """Read and check one template file for `task` (fields, choices, Jinja syntax)."""
    spec = get_task(task)
    data = read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RSGError("not UTF-8 text", file=path, line=data[: exc.start].count(b"\n") + 1) from None
    raw = load_yaml(text, file=path)  # bounded first: compose() below meets no bomb or deep nesting
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RSGError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=path,
                       line=mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise RSGError("a template file must be a YAML mapping", file=path, expected=sorted(_KEYS))
    lines = _value_lines(node)
    unknown = sorted(set(map(str, raw)) - _KEYS)
    if unknown:
        raise RSGError(f"unknown key(s) {', '.join(unknown)}", file=path, line=lines.get(unknown[0]),
                       field=unknown[0], expected=sorted(_KEYS))
    if raw.get("task") is not None and get_task(str(raw["task"])).name != spec.name:
        raise RSGError(f"the template is for {raw['task']}, not {spec.name}", file=path, field="task")
    source = raw.get("template")
    if not isinstance(source, str) or not source.strip():
        raise RSGError("missing or empty", file=path, field="template", expected="a Jinja template string")
    tpl = Template(task=spec.name, name=path.stem, path=path, source=source,
                   prefix=str(raw.get("prefix") or ""), truncate=raw.get("truncate") or None,
                   description=str(raw.get("description") or ""), default=raw.get("default") is True,
                   tags=_check_tags(path, raw.get("tags"), lines.get("tags")),
                   sha256=content_sha256(data, text, node), lines=lines)
    for key in ("fewshot_separator", "fewshot_answer_separator"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str):
                raise RSGError("must be a string (quote it in the YAML)", file=path, line=lines.get(key), field=key)
            setattr(tpl, key, raw[key])
    _check_choices(tpl, raw, spec)
    fields = set(TASK_FIELDS[spec.name])
    if tpl.truncate is not None and tpl.truncate not in fields:
        raise RSGError(f"cannot truncate unknown field {tpl.truncate!r}", file=path, line=lines.get("truncate"),
                       field="truncate", expected=sorted(fields))
    # Compile everything now and check the variables used, so a typo fails before any model is loaded.
    _check_vars(tpl, "template", source, fields)
    for key, src in (tpl.choices or {}).items():
        _check_vars(tpl, f"choices.{key}", src, fields)
    if tpl.choice is not None:
        _check_vars(tpl, "choice", tpl.choice, fields | {"label"})
    return tpl


def content_sha256(data: bytes, text: str, node: Any) -> str:
    """sha256 of the template file's bytes without its `tags:` entry.

    Tags only label a template (selection, reports), so they stay out of run fingerprints: tagging a template
    leaves the fingerprints of runs made with it, and their resume, unchanged. The entry is cut from its key to
    the end of its value (and the line break after it); a file without tags hashes exactly as its bytes."""
    if not isinstance(node, yaml.MappingNode):
        return hashlib.sha256(data).hexdigest()
    for key, value in node.value:
        if str(key.value) == "tags":
            start, end = key.start_mark.index, value.end_mark.index
            if text[end:end + 1] == "\n":
                end += 1
            bom = data[:3] if data.startswith(b"\xef\xbb\xbf") else b""
            return hashlib.sha256(bom + (text[:start] + text[end:]).encode("utf-8")).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _check_tags(path: Path, raw: Any, line: int | None) -> dict[str, str]:
    """`tags:` must map some of TAG_KEYS to non-empty strings (style one of STYLES, choices one of CHOICES_TAGS)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RSGError("must map tag names to values, e.g. {style: question, verbaliser: да/нет}", file=path,
                       line=line, field="tags", expected=list(TAG_KEYS))
    out: dict[str, str] = {}
    for key, value in raw.items():
        if str(key) not in TAG_KEYS:
            raise RSGError(f"unknown tag {key!r}", file=path, line=line, field=f"tags.{key}", expected=list(TAG_KEYS))
        if not isinstance(value, str) or not value.strip():
            raise RSGError("must be a non-empty string", file=path, line=line, field=f"tags.{key}")
        out[str(key)] = value.strip()
    for key, allowed in (("style", STYLES), ("choices", CHOICES_TAGS)):
        if key in out and out[key] not in allowed:
            raise RSGError(f"unknown {key} {out[key]!r}", file=path, line=line, field=f"tags.{key}",
                           expected=list(allowed))
    return out


def _check_choices(tpl: Template, raw: Mapping[str, Any], spec: Any) -> None:
    has_map, has_one = raw.get("choices") is not None, raw.get("choice") is not None
    if has_map == has_one:
        raise RSGError("give exactly one of `choices` (label: text) or `choice` (one Jinja text per label)",
                       file=tpl.path, field="choices")
    if has_one:
        tpl.choice = str(raw["choice"])
        return
    if not isinstance(raw["choices"], dict):
        raise RSGError("must map each label to its answer text", file=tpl.path, line=tpl.lines.get("choices"),
                       field="choices")
    tpl.choices = {_label_key(k): str(v) for k, v in raw["choices"].items()}
    if spec.labels is None:
        raise RSGError(f"{spec.name} labels differ per item: use `choice` with the variable `label`",
                       file=tpl.path, field="choices")
    want = [_label_key(lab) for lab in spec.labels]
    missing = [w for w in want if w not in tpl.choices]
    extra = [k for k in tpl.choices if k not in want]
    if missing or extra:
        raise RSGError(f"labels {'missing: ' + ', '.join(missing) if missing else ''}"
                       f"{'; ' if missing and extra else ''}{'unknown: ' + ', '.join(extra) if extra else ''}",
                       file=tpl.path, line=tpl.lines.get("choices"), field="choices", expected=want)


def _check_vars(tpl: Template, where: str, source: str, allowed: set[str]) -> None:
    compiled = _compile(tpl, where, source)
    if where == "template":
        tpl._compiled = compiled
    else:
        tpl._compiled_choices[where] = compiled
    used = meta.find_undeclared_variables(_env().parse(source))
    unknown = sorted(used - allowed)
    if unknown:
        raise RSGError(f"unknown field {unknown[0]!r} used in {where}", file=tpl.path,
                       line=tpl.lines.get(where.split(".")[0]), field=unknown[0], expected=sorted(allowed))


def _value_lines(node: Any) -> dict[str, int]:
    """YAML key -> 1-based line where its value's text starts (block scalars start one line below `|`)."""
    out: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return out
    for key, value in node.value:
        line = value.start_mark.line + 1
        if isinstance(value, yaml.ScalarNode) and value.style in ("|", ">"):
            line += 1
        out[str(key.value)] = line
    return out


def cut_fields(fields: Mapping[str, Any], max_tokens: int | None) -> dict[str, Any]:
    """The fields with every string cut to `max_tokens` x RSG_MAX_CHARS_PER_TOKEN characters (its start kept).

    No token spans that many characters, so a cut field is still far longer than the model can read: the
    template's `truncate` field is shortened further to fit (from its start, as without the cut), and any other
    field this long makes an input that does not fit whatever is done. The cut keeps a crafted 200 MB passage
    from reaching the tokenizer (gigabytes of ids)."""
    if not max_tokens:
        return dict(fields)
    return {k: (cut_text(v, max_tokens) if isinstance(v, str) else v) for k, v in fields.items()}
