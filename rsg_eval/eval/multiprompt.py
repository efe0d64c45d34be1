"""Many templates per task in one `rsg zeroshot` run (`--templates all|NAME,NAME|tag:STYLE`, `--calibrate both`).

The runner (`rsg_eval.eval.zeroshot`) plans one job per task split as usual; in a multi-template run the job carries
its *variants* (a template, or a template scored with calibration) and everything else stays: the same shards
(per task split, shared out among processes, saved for resume), the same gather, the same one-configuration rule
(the template set and the selection rule are part of the run's settings). What changes is what a shard does and
where its results go:

- scoring (`score_variants`): every variant's prompts of the shard are rendered, identical prompts are merged
  for seq2seq models (their answer choices joined) so the encoder runs once for them, and the whole lot goes
  through one `score_choices` call: one set of length-sorted batches for all the templates instead of one per
  template. Calibration's content-free prompts likewise. Tokenisations are cached
  (`CachedTokenizer`): a prompt measured while fitting it to the input length is not tokenised again to score
  it, and the answer words ("Да", "Нет") once per shard, not once per item and template.
- results (`write_variants`): each variant's predictions/logs/state go to `templates/<Task>/<variant>/`, a
  folder laid out like a run folder holding one task, with the fingerprint a one-template run of that variant
  would have. Then `promote` copies the variant picked by `--select` (default: the task's default template;
  best-val: the best val score) to the run folder's own predictions/logs/state, so metrics.json, the zip,
  `rsg score`, `rsg submit` and `rsg report` read a multi-template folder as a one-template one.
- numbers (`finish_metrics`): metrics.json gets "templates" (per task and variant, the metrics), "selected",
  "select" and "spread"; spread.json the whole table of rsg_eval.report.spread.

A variant's scores equal those of a one-template run up to float noise: merged prompts share batches with
other templates' prompts, and a packed decoder row holds more answer choices.

API::

    multi_mode(opts) -> bool
    select_templates(task, spec) -> list[Template]         spec: "all" | "a,b" | "tag:VALUE"
    plan_variants(opts, task, split, base_parts) -> list[Variant]
    score_variants(job, loaded, opts, advance) -> (None, rows, n_truncated)
    job_problem(run, job) -> str | None
    write_variants(run, job, rows, extra)
    promote(run, jobs, opts) -> list[str]                    notes to print
    finish_metrics(run, jobs, opts, metrics) -> dict
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from rsg_eval.core.errors import RSGError
from rsg_eval.report.spread import (CAL_SUFFIX, OPTIMISM_NOTE, SELECT_RULES, TEMPLATES_DIR, score_rows,
                                    select_variant, spread_table, variant_name)
from rsg_eval.runs import RunFolder, fingerprint, log_row

SPREAD_FILE = "spread.json"
TOKEN_CACHE_ENTRIES = 200_000   # bounds the tokenisation cache of one shard (texts are already length-capped)


@dataclass
class Variant:
    """One template as scored in a multi-template run (the template, with or without calibration)."""

    name: str                 # template name, "+cal" appended for the calibrated twin under --calibrate both
    template: Any             # rsg_eval.core.prompts.Template
    calibrate: bool
    parts: dict               # exactly a one-template run's fingerprint parts for this template
    fingerprint: str


def multi_mode(opts: Any) -> bool:
    return getattr(opts, "templates", None) is not None or getattr(opts, "calibrate", False) == "both"


def check_options(opts: Any) -> None:
    if getattr(opts, "templates", None) is not None and opts.template is not None:
        raise RSGError("--template names one template for every task, --templates a set of them: give one",
                       field="--templates", expected="--template NAME, or --templates all|NAME,NAME|tag:STYLE")
    if opts.select not in SELECT_RULES:
        raise RSGError(f"unknown selection rule {opts.select!r}", field="--select", expected=SELECT_RULES)
    if opts.calibrate not in (True, False, "both"):
        raise RSGError(f"bad --calibrate value {opts.calibrate!r}", field="--calibrate", expected=["on", "both"])
    if opts.select != "default" and not multi_mode(opts):
        raise RSGError("--select picks one of several templates: add --templates", field="--select")


def select_templates(task: str, spec: str | None) -> list[Any]:
    """The templates of `task` that `spec` names, in `rsg prompts list` order (the default first).

    "all"; "a,b" (names; a task that has none of them is an error naming its templates); "tag:VALUE" (every
    template with a tag of that value, e.g. tag:cloze, tag:dialogue, tag:listed); None: the default only."""
    from rsg_eval.core.prompts import list_templates, load_template

    names = list_templates(task)[task]
    if spec is None:
        return [load_template(task, names[0])]
    text = spec.strip()
    if not text:
        raise RSGError("empty template set", field="--templates", expected="all, NAME,NAME or tag:VALUE")
    if text == "all":
        return [load_template(task, n) for n in names]
    if text.startswith("tag:"):
        want = text[4:].strip()
        got = [t for t in (load_template(task, n) for n in names) if want in t.tags.values()]
        if not got:
            raise RSGError(f"no {task} template has a tag {want!r}", field="--templates",
                           expected=sorted({v for n in names for v in load_template(task, n).tags.values()}))
        return got
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    got = [n for n in names if n in wanted]
    if not got:
        raise RSGError(f"{task} has none of the templates {', '.join(wanted)}", field="--templates",
                       expected=names)
    return [load_template(task, n) for n in got]


def check_names(spec: str | None, tasks: Sequence[str]) -> None:
    """Every name in a "a,b" set must belong to some task of the run (a typo is not silently dropped)."""
    if spec is None or spec.strip() == "all" or spec.strip().startswith("tag:"):
        return
    from rsg_eval.core.prompts import list_templates

    known = {n for t in tasks for n in list_templates(t)[t]}
    for w in (w.strip() for w in spec.split(",")):
        if w and w not in known:
            raise RSGError(f"no task of this run has a template {w!r}", field="--templates",
                           expected=sorted(known))


def plan_variants(opts: Any, task: str, split: str, base_parts: dict, cache: dict | None = None) -> list[Variant]:
    """The variants of one task split; `base_parts`: the job's parts without the template (and calibrate).
    `cache` ({task: templates}, one per planning) keeps a task's splits from parsing and compiling its templates
    again (tens of milliseconds each)."""
    cal_modes = [False, True] if opts.calibrate == "both" else [bool(opts.calibrate)]
    cache = {} if cache is None else cache
    if task not in cache:
        cache[task] = select_templates(task, opts.templates)
    out = []
    for tpl in cache[task]:
        for cal in cal_modes:
            parts = {**base_parts, "template": tpl.name, "template_sha256": tpl.sha256, "calibrate": cal}
            # the key order of a one-template run's parts, so the fingerprint is that run's
            ordered = {k: parts[k] for k in ORDER if k in parts}
            ordered.update({k: v for k, v in parts.items() if k not in ordered})
            out.append(Variant(variant_name(tpl.name, cal and opts.calibrate == "both"), tpl, cal, ordered,
                               fingerprint(ordered)))
    return out


# the order rsg_eval.eval.zeroshot.plan_jobs builds a job's parts in (fingerprint() sorts keys, but keep it readable)
ORDER = ("model", "revision", "dtype", "model_dir", "task", "split", "template", "template_sha256", "prefix",
         "code_version", "normalize", "calibrate", "limit", "data_sha256", "num_fewshot", "fewshot_seed",
         "fewshot_data_sha256")


def job_parts(base_parts: dict, variants: Sequence[Variant], select: str) -> dict:
    """A multi-template job's own parts: its input (the shards' key) is every variant, without the split."""
    return {**base_parts, "select": select,
            "variants": [[v.name, fingerprint({k: x for k, x in v.parts.items() if k != "split"})]
                         for v in variants]}


# --------------------------------------------------------------------------------------------------- scoring

class CachedTokenizer:
    """The model's tokenizer with a bounded cache of `text -> input_ids` per special-tokens setting.

    Only the calls the renderer and the scorers make are served from the cache (a str or a list of str, with
    `add_special_tokens` and `verbose`); ids come back as the tokenizer gave them, one text at a time, which
    for a fast tokenizer is what a batched call gives. Everything else goes to the tokenizer itself."""

    def __init__(self, tokenizer: Any, max_entries: int = TOKEN_CACHE_ENTRIES) -> None:
        self._tok = tokenizer
        self._cache: OrderedDict[tuple[bool, str], list[int]] = OrderedDict()
        self._max = max_entries
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __call__(self, text: Any, *args: Any, add_special_tokens: bool = True, verbose: bool = True,
                 **kwargs: Any) -> Any:
        if args or kwargs or not (isinstance(text, str) or (isinstance(text, list) and all(
                isinstance(t, str) for t in text))):
            return self._tok(text, *args, add_special_tokens=add_special_tokens, verbose=verbose, **kwargs)
        texts = [text] if isinstance(text, str) else text
        missing = list(dict.fromkeys(t for t in texts if (add_special_tokens, t) not in self._cache))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            got = self._tok(missing, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]
            for t, ids in zip(missing, got):
                self._cache[(add_special_tokens, t)] = list(ids)
                if len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        ids = []
        for t in texts:
            got_ids = self._cache.get((add_special_tokens, t))
            if got_ids is None:  # evicted within this very call (a call bigger than the cache): ask again
                got_ids = list(self._tok(t, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])
            ids.append(list(got_ids))
        return {"input_ids": ids[0] if isinstance(text, str) else ids}


def _render_all(job: Any, variants: Sequence[Variant], scored: Sequence[Any], tok: Any, max_tokens: Any,
                prefix: Any) -> dict[str, dict]:
    """{template name: {"rendered": [Rendered], "kept": {key: [shot ids]}, "cal": [str] | None}} (a template
    scored with and without calibration is rendered once)."""
    from rsg_eval.core.fewshot import gold_label, shot_id
    from rsg_eval.core.prompts import render_fewshot, render_fewshot_content_free, render_shot

    out: dict[str, dict] = {}
    for v in variants:
        tpl = v.template
        entry = out.get(tpl.name)
        if entry is None:
            rendered, kept = [], {}
            for it in scored:
                drawn = (job.shots or {}).get(it.key, [])
                texts = []
                for shot in drawn:  # one train example serves many items: rendered once per template
                    k = (tpl.name, shot.key)
                    if k not in job.shot_texts:
                        job.shot_texts[k] = render_shot(tpl, shot, gold_label(shot))
                    texts.append(job.shot_texts[k])
                r, n = render_fewshot(tpl, it, texts, tokenizer=tok, max_tokens=max_tokens, prefix=prefix)
                rendered.append((r, texts[:n]))
                kept[it.key] = [shot_id(s) for s in drawn[:n]]
            entry = out[tpl.name] = {"template": tpl, "rendered": [r for r, _ in rendered],
                                     "texts": [t for _, t in rendered], "kept": kept, "cal": None}
        if v.calibrate and entry["cal"] is None:
            entry["cal"] = [render_fewshot_content_free(tpl, it, texts, prefix=prefix)
                            for it, texts in zip(scored, entry["texts"])]
    return out


def _merged_scores(loaded: Any, tok: Any, prompts: list[list[str]], choices: list[list[list[str]]],
                   opts: Any, max_tokens: Any) -> list[list[list[float]]]:
    """Scores of every (prompt, choices) of every template (outer list), one `score_choices` call for all.

    Seq2seq: identical prompts are scored once with their choices joined (one encoder pass for them); each
    template then reads its own choices' scores back. Decoder-only models are not merged: there a prompt that
    does not fit the context with its longest answer loses its start, and joined choices would make that cut
    depend on the other template's answers; their prompts still share the call (one set of batches)."""
    from rsg_eval.scoring import is_causal, score_choices

    merge = not is_causal(loaded.model)
    index: dict[Any, int] = {}
    u_prompts: list[str] = []
    u_choices: list[list[str]] = []
    where: list[list[list[int]]] = []  # template, item -> positions of its choices in the merged row
    for ps, cs in zip(prompts, choices):
        w = []
        for i, (p, row) in enumerate(zip(ps, cs)):
            key = p if merge else (len(where), i)
            u = index.get(key)
            if u is None:
                u = index[key] = len(u_prompts)
                u_prompts.append(p)
                u_choices.append([])
            pos = []
            for c in row:
                if c not in u_choices[u]:
                    u_choices[u].append(c)
                pos.append(u_choices[u].index(c))
            w.append([u, *pos])
        where.append(w)
    scores = score_choices(loaded.model, tok, u_prompts, u_choices, batch_size=opts.batch_size,
                           normalize=opts.normalize, calibrate=False, max_input_tokens=max_tokens) if u_prompts else []
    return [[[scores[w[0]][j] for j in w[1:]] for w in ws] for ws in where]


def score_variants(job: Any, loaded: Any, opts: Any, advance: Any) -> tuple[None, list[dict], int]:
    """Render, score and pick every variant of `job` (a task split or one shard of it). Rows: per item
    {"key", "variants": {variant: log row}, "truncated": [variants whose passage was shortened]}."""
    from rsg_eval.scoring import predict

    tok = CachedTokenizer(loaded.tokenizer)
    max_tokens = loaded.info.get("max_input_tokens")
    variants: list[Variant] = job.variants
    scored = [it for it in job.items if it.labels]
    prefix = "" if opts.prefix is None and loaded.info.get("kind") == "causal" else opts.prefix
    renders = _render_all(job, variants, scored, tok, max_tokens, prefix)
    names = list(renders)
    raw = _merged_scores(loaded, tok, [[r.prompt for r in renders[n]["rendered"]] for n in names],
                         [[r.choices for r in renders[n]["rendered"]] for n in names], opts, max_tokens)
    raw_of = dict(zip(names, raw))
    cal_names = [n for n in names if renders[n]["cal"] is not None]
    # content-free inputs: each distinct (input, choices) once, as score_choices' own calibration does
    base = _merged_scores(loaded, tok, [renders[n]["cal"] for n in cal_names],
                          [[r.choices for r in renders[n]["rendered"]] for n in cal_names], opts, max_tokens)
    base_of = dict(zip(cal_names, base))
    rows: list[dict] = [{"key": it.key, "variants": {}, "truncated": []} for it in job.items]
    pos = {it.key: i for i, it in enumerate(scored)}
    n_trunc = 0
    for v in variants:
        entry = renders[v.template.name]
        scores = raw_of[v.template.name]
        if v.calibrate:
            scores = [[s - b for s, b in zip(row, brow)] for row, brow in zip(scores, base_of[v.template.name])]
        best = predict(scores)
        for it, row in zip(job.items, rows):
            i = pos.get(it.key)
            if i is None:
                r = log_row(it, "", prompt=None, choices=[], scores=[])
            else:
                rendered = entry["rendered"][i]
                r = log_row(it, it.labels[best[i]], prompt=rendered.prompt, choices=rendered.choices,
                            scores=scores[i])
                if rendered.truncated:
                    row["truncated"].append(v.name)
                    n_trunc += 1
            if job.shots is not None:
                r["shots"] = entry["kept"].get(it.key, [])
            row["variants"][v.name] = r
    advance(len(scored))
    return None, rows, n_trunc


# --------------------------------------------------------------------------------------------------- results

def variant_folder(run: RunFolder, task: str, variant: str) -> RunFolder:
    return RunFolder(run.path / TEMPLATES_DIR / task / variant)


def job_problem(run: RunFolder, job: Any) -> str | None:
    """None when every variant of the job is finished with its fingerprint and intact."""
    for v in job.variants:
        why = variant_folder(run, job.task, v.name).task_problem(job.task, job.split, v.fingerprint)
        if why is not None:
            return why if why == "not finished" else f"template {v.name}: {why}"
    return None


def write_variants(run: RunFolder, job: Any, rows: Sequence[dict], extra: dict) -> None:
    """Each variant's predictions, logs and state into templates/<Task>/<variant>/ (the commit marks)."""
    for v in job.variants:
        vrows = [r["variants"][v.name] for r in rows]
        preds = {it.key: r["pred"] for it, r in zip(job.items, vrows)}
        ex = {**extra, "template": v.template.name, "calibrate": v.calibrate,
              "n_truncated": sum(v.name in r.get("truncated", ()) for r in rows)}
        if job.shots is not None:
            ex["n_shots_dropped"] = sum(len(job.shots.get(it.key, [])) - len(r.get("shots", []))
                                        for it, r in zip(job.items, vrows) if r.get("prompt") is not None)
        variant_folder(run, job.task, v.name).write_task(job.task, job.split, job.items, preds, vrows,
                                                         v.fingerprint, parts=v.parts, extra=ex)


def _val_scores(run: RunFolder, job: Any) -> dict[str, float]:
    out = {}
    for v in job.variants:
        sub = variant_folder(run, job.task, v.name)
        if sub.task_problem(job.task, "val", None) is None:
            state = sub.read_state(job.task, "val") or {}
            rows = [r for r in sub.read_logs(job.task, "val") if r.get("gold") is not None]
            # the val result must be this variant's (same template file and settings but the split)
            same = {k: x for k, x in (state.get("parts") or {}).items() if k not in ("split", "data_sha256")} == \
                {k: x for k, x in v.parts.items() if k not in ("split", "data_sha256")}
            if rows and same:
                out[v.name] = score_rows(job.task, rows)["score"]
    return out


def selection(run: RunFolder, job: Any, opts: Any) -> tuple[Variant | None, str]:
    from rsg_eval.core.prompts import list_templates

    names = [v.name for v in job.variants]
    default = list_templates(job.task)[job.task][0]
    scores = _val_scores(run, job) if opts.select == "best-val" else None
    name, why = select_variant(opts.select, names, scores, default)
    return (next(v for v in job.variants if v.name == name) if name else None), why


def promote(run: RunFolder, jobs: Sequence[Any], opts: Any) -> list[str]:
    """Copy each task split's selected variant to the run folder's own predictions/logs/state (skipped when
    they hold it already). Returns notes for the terminal."""
    notes = []
    for job in jobs:
        if job.variants is None or job_problem(run, job) is not None:
            continue
        chosen, why = selection(run, job, opts)
        if chosen is None:
            notes.append(f"[yellow]{job.task}/{job.split}: --select {opts.select} {why}; run --split val in this "
                         "folder first: left out of metrics.json and the zip[/]")
            continue
        sub = variant_folder(run, job.task, chosen.name)
        sub_state = sub.read_state(job.task, job.split) or {}
        top = run.read_state(job.task, job.split) if run.state_path(job.task, job.split).is_file() else None
        if top and top.get("fingerprint") == chosen.fingerprint and top.get("variant") == chosen.name and \
                top.get("files") == sub_state.get("files") and \
                run.task_problem(job.task, job.split, chosen.fingerprint) is None:
            continue
        rows = sub.read_logs(job.task, job.split)
        preds = {it.key: r["pred"] for it, r in zip(job.items, rows)}
        extra = {k: x for k, x in sub_state.items() if k in ("n_truncated", "seconds", "model_fingerprint", "dtype",
                                                                "device", "n_shots_dropped", "calibrate")}
        extra.update(template=chosen.template.name, variant=chosen.name, selected_by=opts.select, selected_why=why)
        run.write_task(job.task, job.split, job.items, preds, rows, chosen.fingerprint, parts=chosen.parts,
                       extra=extra)
    return notes


def finish_metrics(run: RunFolder, jobs: Sequence[Any], opts: Any, metrics: dict | None, *, n_boot: int = 1000
                   ) -> dict | None:
    """Add the per-template numbers to metrics.json and write spread.json (val)."""
    from rsg_eval.core.io import atomic_write_json
    from rsg_eval.report.spread import read_template_logs

    only: dict[str, list[str]] = {}
    for job in jobs:
        if job.variants is not None:
            only.setdefault(job.task, [v.name for v in job.variants])
    if not only:
        return metrics
    logs = read_template_logs(run.path, "val", only)
    table = spread_table(logs, n_boot=n_boot, seed=opts.seed, calibrated=opts.calibrate is True)
    selected = {}
    for job in jobs:
        if job.variants is not None and job.split == "val" and job.task in (metrics or {}).get("tasks", {}):
            state = run.read_state(job.task, "val") or {}
            selected[job.task] = state.get("variant") or state.get("template")
    spread = {"split": "val", "select": opts.select, "selected": selected,
              "select_note": OPTIMISM_NOTE if opts.select == "best-val" else
              "each task's default template (picked before seeing any score)",
              "calibrate": opts.calibrate, "num_fewshot": opts.num_fewshot,
              "templates": only, **table}
    atomic_write_json(run.path / SPREAD_FILE, spread)
    if metrics is not None:
        metrics = dict(metrics)
        metrics["templates"] = {t: {v: score_rows(t, rows) for v, rows in per.items()} for t, per in logs.items()}
        metrics["selected"] = selected
        metrics["select"] = opts.select
        metrics["spread"] = {t: {c: col["summary"] for c, col in e["columns"].items()}
                             for t, e in table["tasks"].items()}
        metrics["spread_total"] = table["totals"]
        atomic_write_json(run.metrics_path, metrics)
    return metrics


__all__ = ["Variant", "CachedTokenizer", "CAL_SUFFIX", "multi_mode", "check_options", "select_templates",
           "plan_variants", "score_variants", "job_problem", "write_variants", "promote", "finish_metrics"]
