"""One CLI grammar: every command and subcommand of `rsg` is walked (typer.main.get_command(app), recursively) and
its options are checked against one table of canonical spellings. A command added later is checked the same way,
and each failure says exactly what to change.

The rules: every option and argument has help text; every option that is not required and not a plain off-by-
default flag shows its default in --help; usage lines show arguments by name (no `[]` or `{name}`); an idea is
spelled the same way in every command (IDEAS); a short flag means the same long option everywhere (SHORTS); old
spellings are hidden aliases (rsg_eval.commands._common.ALIASES) that parse to exactly the value of the new one
and never show in --help.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest
import typer
from typer.testing import CliRunner

from rsg_eval.cli import app
from rsg_eval.commands._common import ALIASES, BARE_VALUES, RsgCommand

FIX = "rsg_eval/commands/_common.py"

# idea -> (canonical spelling, visible spellings no command may use for it)
IDEAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "progress display off": ("--quiet/-q", ("--no-progress", "--silent", "--no-bar", "--no-bars")),
    "source length": ("--max-source-length", ("--max-source-len", "--max-length", "--src-len", "--max-src-len",
                                              "--max-len", "--max-input-length", "--seq-len")),
    "target length": ("--max-target-length", ("--max-target-len", "--tgt-len", "--max-tgt-len",
                                              "--max-output-length")),
    "bf16 autocast": ("--bf16 auto|on|off", ("--no-bf16", "--fp16", "--amp", "--mixed-precision")),
    "RSG data": ("--data", ("--rsg-data", "--data-dir", "--data-path", "--dataset")),
    "save a resume point every N steps": ("--save-every", ("--save-steps", "--checkpoint-every",
                                                          "--save-interval")),
    "peak learning rate": ("--lr", ("--lr-max", "--max-lr", "--learning-rate")),
    "timed repeats, best kept": ("--repeats", ("--rounds", "--repeat")),
    "batch size": ("--batch-size/-b", ("--batch", "--bs", "--per-device-batch-size")),
    "gradient accumulation": ("--grad-accum", ("--gradient-accumulation-steps", "--grad-accumulation",
                                               "--accum-steps", "--accumulation")),
    "seed": ("--seed", ("--random-seed", "--rng-seed")),
    "device": ("--device", ("--gpu", "--cuda", "--devices")),
    "weights dtype": ("--dtype", ("--torch-dtype", "--precision")),
    "tasks": ("--tasks/-t", ("--task-names", "--only-tasks")),
    # (--templates is another idea: a set of templates scored in one run, `rsg zeroshot --templates all`)
    "prompt template": ("--template", ("--prompt", "--prompt-template")),
    "CPU threads": ("--threads", ("--num-threads", "--nthreads", "--n-threads")),
    "output folder or file": ("--out/-o", ("--output", "--output-dir", "--out-dir", "--outdir")),
    "run folder": ("--run and --root", ("--run-dir", "--run-name", "--runs-dir", "--output-root")),
    "start over": ("--restart", ("--overwrite", "--fresh", "--force-restart")),
    "a JSON copy of the result": ("--json", ("--json-out", "--json-output")),
    "Block-1 size of the encoder": ("--encoder-split", ("--split-layer", "--block1-layers")),
    "model": ("--model/-m", ("--model-name", "--model-path", "--checkpoint")),
    "config file": ("--config/-c", ("--config-file", "--cfg")),
    "gradient checkpointing": ("--gradient-checkpointing/--no-gradient-checkpointing",
                               ("--grad-checkpointing", "--checkpointing")),
}
# A short flag means one long option everywhere; these long options always have their short flag.
SHORTS = {"-m": "--model", "-t": "--tasks", "-b": "--batch-size", "-q": "--quiet", "-o": "--out", "-c": "--config",
          "-n": "--examples"}
ALWAYS_SHORT = ("--model", "--tasks", "--batch-size", "--quiet", "--out", "--config")
# Spellings reserved for one idea, checked through the option's help text.
RESERVED = {"--split": ("a data split", re.compile(r"\bval\b"), "--encoder-split")}


def _commands() -> Iterator[tuple[str, Any]]:
    def walk(cmd: Any, path: str) -> Iterator[tuple[str, Any]]:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, cmd

    yield from walk(typer.main.get_command(app), "rsg")


COMMANDS = dict(_commands())


def _options(cmd: Any, hidden: bool = False) -> list[Any]:
    return [p for p in cmd.params if p.param_type_name == "option" and (hidden or not p.hidden)]


def _spellings(cmd: Any) -> dict[str, Any]:
    return {n: p for p in _options(cmd) for n in (*p.opts, *p.secondary_opts)}


def _ctx(path: str, cmd: Any) -> Any:
    return cmd.context_class(cmd, info_name=path.split(" ", 1)[1])


def test_the_walk_sees_every_command() -> None:
    for path in ("rsg zeroshot", "rsg finetune", "rsg train-hmtl", "rsg build-corpus", "rsg report", "rsg score",
                 "rsg data download", "rsg data check", "rsg submit check", "rsg submit zip", "rsg prompts show",
                 "rsg bench zeroshot", "rsg bench finetune", "rsg bench hmtl"):
        assert path in COMMANDS, f"{path} is missing from the walk"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_has_help_and_a_shown_default(path: str) -> None:
    cmd = COMMANDS[path]
    assert isinstance(cmd, RsgCommand), (
        f"{path} is a {type(cmd).__name__}: create its typer app with RsgTyper from {FIX} (hidden aliases and "
        "usage lines depend on it)")
    ctx = _ctx(path, cmd)
    problems = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        name = "/".join(p.opts) if p.param_type_name == "option" else (p.metavar or p.name)
        if not (p.help or "").strip():
            problems.append(f"{path} {name}: no help text; add help='...' to its typer.Option/Argument")
        if p.param_type_name != "option" or p.required:
            continue
        if p.is_flag and not p.secondary_opts and not p.default:
            continue  # a plain flag is off unless given
        record = p.get_help_record(ctx)
        if record is None or "[default:" not in record[1]:
            problems.append(
                f"{path} {name}: --help shows no default; give typer.Option the real default"
                + (", or show_default='what happens without it' (its default is None)" if p.default is None
                   else " and leave show_default on"))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_usage_line_names_its_arguments(path: str) -> None:
    cmd = COMMANDS[path]
    usage = cmd.get_usage(_ctx(path, cmd))
    assert "[]" not in usage and "{" not in usage, (
        f"usage line {usage!r}: give each typer.Argument a metavar (e.g. metavar='RUN'), drop hidden arguments, "
        f"and register the command with RsgTyper ({FIX})")


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_one_spelling_per_idea(path: str) -> None:
    cmd = COMMANDS[path]
    spelled = _spellings(cmd)
    problems = []
    for idea, (canonical, variants) in IDEAS.items():
        for v in variants:
            if v in spelled:
                problems.append(f"{path}: option {v} spells '{idea}'; spell it {canonical} as every command does, "
                                f"and keep {v} working with Alias({v!r}, ...) in ALIASES ({FIX}) if it was "
                                "released")
    for name in spelled:
        if name.startswith("--") and name.endswith("-len"):
            problems.append(f"{path}: {name}: lengths are spelled in full ({name}gth: --max-source-length, "
                            "--max-target-length)")
    for p in _options(cmd):
        if p.opts and p.opts[0].startswith("--no-"):
            pos = "--" + p.opts[0][len("--no-"):]
            problems.append(f"{path}: {p.opts[0]} is a negative flag on its own; make it {pos}/{p.opts[0]} "
                            f"(typer.Option(True, '{pos}/{p.opts[0]}')) or a positive option (--quiet)")
    for short, long in SHORTS.items():
        if short in spelled and long not in spelled[short].opts:
            problems.append(f"{path}: {short} means {long} in every command, not {'/'.join(spelled[short].opts)}")
    for long in ALWAYS_SHORT:
        short = next(s for s, lo in SHORTS.items() if lo == long)
        if long in spelled and short not in spelled[long].opts:
            problems.append(f"{path}: {long} has the short flag {short} in every command; add it")
    for name, (idea, pattern, instead) in RESERVED.items():
        if name in spelled and not pattern.search(spelled[name].help or ""):
            problems.append(f"{path}: {name} means {idea} (val/test) in every command; name this option "
                            f"differently (e.g. {instead}) and keep {name} with an Alias in {FIX} if released")
    if "--bf16" in spelled:
        p = spelled["--bf16"]
        if p.is_flag or not all(w in (p.help or "") for w in ("auto", "on", "off")):
            problems.append(f"{path}: --bf16 takes auto|on|off in every command (a str option whose help lists "
                            "them); old --bf16/--no-bf16 flags are handled by the aliases")
    assert not problems, "\n".join(problems)


def _value_args(cmd: Any, option: Any) -> list[str]:
    return [] if option.is_flag else ["7"]


def _required(cmd: Any) -> list[str]:
    out: list[str] = []
    for p in cmd.params:
        if p.required and p.param_type_name == "option":
            out += [p.opts[0], "7"]
    out += ["7" for p in cmd.params if p.required and p.param_type_name == "argument"]
    return out


def _parse(path: str, cmd: Any, args: list[str]) -> dict[str, Any]:
    return dict(cmd.make_context(path.split(" ", 1)[1], list(args)).params)


def _alias_cases() -> Iterator[tuple[str, Any]]:
    for path, cmd in COMMANDS.items():
        spelled = {n for p in _options(cmd, hidden=True) for n in (*p.opts, *p.secondary_opts)}
        for al in ALIASES:
            if al.new in spelled and al.old not in spelled:
                yield path, al


ALIAS_CASES = list(_alias_cases())


def test_every_alias_applies_somewhere() -> None:
    used = {al for _, al in ALIAS_CASES}
    stale = [al for al in ALIASES if al not in used]
    assert not stale, f"aliases whose new spelling no command has (fix or drop them in {FIX}): {stale}"
    # The old spellings named in the issue are among them, on the commands that had them.
    have = {(path, al.old) for path, al in ALIAS_CASES}
    for case in (("rsg train-hmtl", "--no-progress"), ("rsg build-corpus", "--no-progress"),
                 ("rsg finetune", "--max-source-len"), ("rsg finetune", "--max-target-len"),
                 ("rsg train-hmtl", "--max-length"), ("rsg finetune", "--no-bf16"),
                 ("rsg build-corpus", "--rsg-data"), ("rsg data download", "--data-dir"),
                 ("rsg train-hmtl", "--split"), ("rsg bench hmtl", "--split"), ("rsg train-hmtl", "--lr-max"),
                 ("rsg train-hmtl", "--save-steps"), ("rsg bench finetune", "--rounds"),
                 ("rsg bench hmtl", "--batch"), ("rsg bench hmtl", "--seq-len"), ("rsg bench finetune", "--src-len"),
                 ("rsg bench finetune", "--tgt-len")):
        assert case in have, case


@pytest.mark.parametrize("path,alias", ALIAS_CASES, ids=[f"{p[4:]}:{a.old}" for p, a in ALIAS_CASES])
def test_alias_parses_to_the_same_value(path: str, alias: Any, capsys: pytest.CaptureFixture) -> None:
    cmd = COMMANDS[path]
    new = _spellings(cmd)[alias.new]
    base = _required(cmd)
    if alias.value is not None:
        old_args, new_args = [alias.old], [alias.new, alias.value]
    else:
        val = _value_args(cmd, new)
        old_args, new_args = [alias.old, *val], [alias.new, *val]
    got, want = _parse(path, cmd, base + old_args), _parse(path, cmd, base + new_args)
    assert got == want
    assert got != _parse(path, cmd, base) or alias.value == "auto", "the test value equals the default"
    # `--opt=value` works too
    if alias.value is None and not new.is_flag:
        assert _parse(path, cmd, base + [f"{alias.old}=7"]) == want
    # the old spelling is named on stderr, with the new one
    assert f"{alias.old} is now {alias.new}" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted({p for p, _ in ALIAS_CASES}))
def test_aliases_do_not_show_in_help(path: str) -> None:
    cmd = COMMANDS[path]
    res = CliRunner().invoke(app, [*path.split()[1:], "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for p, al in ALIAS_CASES:
        if p != path:
            continue
        assert al.new in res.output
        assert not re.search(rf"(?<![\w-]){re.escape(al.old)}(?![\w-])", res.output), (
            f"{path} --help mentions the hidden alias {al.old}: say {al.new} in help texts")
    assert cmd is COMMANDS[path]


def test_bf16_old_flags_and_bare_flag() -> None:
    cmd = COMMANDS["rsg finetune"]
    base = ["--model", "tiny"]
    assert _parse("rsg finetune", cmd, base + ["--bf16"])["bf16"] == BARE_VALUES["--bf16"] == "on"
    assert _parse("rsg finetune", cmd, base + ["--bf16", "--epochs", "2"])["bf16"] == "on"
    assert _parse("rsg finetune", cmd, base + ["--no-bf16"])["bf16"] == "off"
    assert _parse("rsg finetune", cmd, base + ["--bf16", "auto"])["bf16"] == "auto"
    assert _parse("rsg finetune", cmd, base)["bf16"] == "auto"
    assert _parse("rsg train-hmtl", COMMANDS["rsg train-hmtl"], ["-m", "t", "--corpus", "c", "-o", "o",
                                                                  "--no-bf16"])["bf16"] == "off"


def test_tasks_take_the_words_after_them_only_where_no_argument_follows() -> None:
    zs = COMMANDS["rsg zeroshot"]
    got = _parse("rsg zeroshot", zs, ["--tasks", "TERRa", "RCB", "-m", "tiny", "-t", "PARus", "MuSeRC", "-q"])
    assert list(got["tasks"]) == ["TERRa", "RCB", "PARus", "MuSeRC"] and got["model"] == "tiny" and got["quiet"]
    assert list(_parse("rsg finetune", COMMANDS["rsg finetune"], ["-m", "tiny", "-tTERRa", "RCB"])["tasks"]) == \
        ["TERRa", "RCB"]
    # `rsg score` has an argument: the word after --tasks VALUE is the predictions path
    got = _parse("rsg score", COMMANDS["rsg score"], ["--tasks", "TERRa", "preds/"])
    assert list(got["tasks"]) == ["TERRa"] and str(got["pred"]) == "preds"
    # an option's value is never taken for an alias or a task
    got = _parse("rsg zeroshot", zs, ["-m", "tiny", "--prefix", "--split", "--tasks", "TERRa"])
    assert got["prefix"] == "--split" and got["split"] == "all"
    # after `--`, nothing is rewritten
    with pytest.raises(Exception):
        _parse("rsg zeroshot", zs, ["-m", "tiny", "--tasks", "TERRa", "--", "RCB"])


def test_stray_words_are_refused_with_a_usage_error() -> None:
    res = CliRunner().invoke(app, ["zeroshot", "--model", "tiny", "TERRa"])
    assert res.exit_code == 2 and "TERRa" in res.output


def _help_at(path: str, columns: int) -> str:
    argv = path.split()[1:] + ["--help"]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": str(columns), "TERMINAL_WIDTH": None})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_at_80_columns_shows_every_option_and_default_whole(path: str) -> None:
    """An 80-column terminal: no line is wider than 80, nothing is cut with an ellipsis, and every option's every
    spelling and its default text are there in full (whitespace aside: a default may wrap onto the next line)."""
    out = _help_at(path, 80)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, f"{path} --help at 80 columns has a line wider than 80"
    assert "…" not in out, f"{path} --help cuts text at 80 columns: {[ln for ln in lines if '…' in ln]}"
    flat = " ".join(out.split())
    cmd = COMMANDS[path]
    ctx = _ctx(path, cmd)
    for p in _options(cmd):
        for name in (*p.opts, *p.secondary_opts):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flat), f"{path}: {name} missing at 80 columns"
        record = p.get_help_record(ctx)
        default = re.search(r"\[default: (.*?)\]$", record[1] if record else "")
        if default:
            text = " ".join(default.group(1).split())
            assert f"[default: {text}]" in flat, f"{path} {p.opts[0]}: default {text!r} not shown whole at 80 columns"


def test_root_help_at_80_columns_lists_every_command_whole() -> None:
    flat = " ".join(_help_at("rsg", 80).split())
    for name, cmd in typer.main.get_command(app).commands.items():
        assert f"{name} {' '.join(cmd.get_short_help_str(limit=10_000).split())}" in flat


def test_help_texts_name_what_the_tool_does_today() -> None:
    root = " ".join(_help_at("rsg", 200).split())
    assert "decoder-only" in root
    zs = COMMANDS["rsg zeroshot"]
    model = next(p for p in zs.params if "--model" in getattr(p, "opts", ()))
    assert "tiny-causal" in model.help
    seed = next(p for p in zs.params if "--fewshot-seed" in getattr(p, "opts", ()))
    assert "run seed" not in str(seed.show_default) and not any("--seed" in getattr(p, "opts", ()) for p in zs.params)


def test_wide_help_does_not_break_descriptions_at_the_docstring_lines() -> None:
    out = _help_at("rsg finetune", 400)  # wide enough for the paragraph on one line: no break inside it
    assert any("finished tasks are skipped. The defaults shown are the built-in ones: a --config file" in line
               for line in out.splitlines())
