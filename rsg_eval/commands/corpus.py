"""`rsg build-corpus`: build the multi-task training corpus (readers, cleaning, annotation, leakage guard).

Heavy modules (transformers, torch) load inside the command body, and only when a teacher has work to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rsg_eval.commands._common import quiet_option
from rsg_eval.core.errors import RSGError


def _teachers(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        task, sep, model = v.partition("=")
        if not sep or not task or not model:
            raise RSGError(f"bad --teacher {v!r}", field="--teacher",
                           expected="TASK=MODEL, e.g. qa=timpal0l/mdeberta-v3-base-squad2")
        out[task.strip()] = model.strip()
    return out


def register(app: typer.Typer) -> None:
    @app.command("build-corpus")
    def build_corpus_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="Corpus config (YAML); see configs/corpus_example.yaml."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (train.jsonl, val.jsonl, labels.json, "
                                 "summary.json, work/). Rerunning into the same folder resumes the annotation."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Read at most N records per source (quick trial).",
                                            show_default="all"),
        teacher: list[str] = typer.Option([], "--teacher", help="TASK=MODEL (hub id or folder) for ner, mc, nli, "
                                          "qa, qg, summarization, title, paraphrase; repeatable; overrides the "
                                          "config.", show_default="the config's"),
        rsg_data: Optional[str] = typer.Option(None, "--data", help="RSG data (a folder like the official "
                                               "download, a zip of it, or 'sample') whose val/test texts the "
                                               "leakage guard checks against.",
                                               show_default="the config's leakage.rsg_data, else the download "
                                                            "cache"),
        strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record or failing teacher "
                                    "batch instead of skipping and counting it."),
        retry_failed: bool = typer.Option(False, "--retry-failed", help="Recompute annotation shards in which a "
                                          "teacher batch failed."),
        device: Optional[str] = typer.Option(None, "--device", help="Teacher device: auto (GPU when present), "
                                             "cpu, cuda, cuda:N.", show_default="auto"),
        quiet: bool = quiet_option(),
        subset: Optional[str] = typer.Option(None, "--subset", help="Also cut a seeded, per-task stratified "
                                             "subset of N train examples (10000 or 10k: the paper's 10k corpus) "
                                             "and N/10 val examples (the paper's 10,000 + 1,000) into "
                                             "OUT/subset-N; a corpus already built from this config is not "
                                             "rebuilt. Overrides `subset:` in the config.",
                                             show_default="the config's subset:, else none"),
        subset_out: Optional[Path] = typer.Option(None, "--subset-out", help="Folder for the subset.",
                                                  show_default="OUT/subset-N"),
    ) -> None:
        """Build the multi-task corpus for `rsg train-hmtl` from your sources (docs/corpus.md)."""
        from rsg_eval.commands._common import make_console
        from rsg_eval.corpus.build import (BuildOptions, build_corpus, build_fingerprint, finished_build,
                                           removal_lines, summary_table)
        from rsg_eval.corpus.config import SubsetSpec, load_config
        from rsg_eval.corpus.subset import cut_subset, parse_count, subset_table

        console = make_console(stderr=True)
        cfg = load_config(config)
        opts = BuildOptions(limit=limit, teachers=_teachers(teacher), rsg_data=rsg_data, strict=strict,
                            retry_failed=retry_failed, device=device, progress=not quiet,
                            echo=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
        sub = cfg.subset
        if subset is not None:
            sub = SubsetSpec(train=parse_count(subset), val=sub.val if sub else None,
                             seed=sub.seed if sub else None)
        done = finished_build(out, build_fingerprint(cfg, opts)) if sub is not None else None
        if done is not None:
            console.print(f"{out} is already built from this config: cutting the subset only", highlight=False,
                          markup=False, soft_wrap=True)
        else:
            summary = build_corpus(cfg, out, opts)
            for line in removal_lines(summary):
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            make_console().print(summary_table(summary))
            console.print(f"wrote {out}/train.jsonl, val.jsonl, labels.json, summary.json", highlight=False)
        if sub is not None:
            dest = subset_out or out / f"subset-{sub.train}"
            s = cut_subset(out, dest, sub.train, sub.val, cfg.seed if sub.seed is None else sub.seed)
            make_console().print(subset_table(s))
            console.print(f"wrote the subset to {dest}", highlight=False, markup=False, soft_wrap=True)
