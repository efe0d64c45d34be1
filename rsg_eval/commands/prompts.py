"""`rsg prompts list` and `rsg prompts show TASK`: the prompt templates and what they render to. Light."""

from __future__ import annotations

from typing import Optional

import typer

from rsg_eval.commands._common import RsgTyper, console, data_option

prompts_app = RsgTyper(help="Prompt templates (prompts/<task>/<name>.yaml): list them, show rendered examples.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(prompts_app, name="prompts")


@prompts_app.command("list")
def list_cmd(
    task: Optional[str] = typer.Argument(None, metavar="TASK", help="Only this task (default: all nine)."),
) -> None:
    """List the templates of each task (the default one first) with their tags and descriptions."""
    from rich.table import Table

    from rsg_eval.core.prompts import list_templates, load_template, prompts_dir

    table = Table(title=f"prompt templates ({prompts_dir()})")
    for col in ("task", "template", "style", "verbaliser", "description", "truncates"):
        table.add_column(col)
    for name, templates in list_templates(task).items():
        for i, t in enumerate(templates):
            tpl = load_template(name, t)
            table.add_row(name if i == 0 else "", t + (" (default)" if i == 0 else ""), tpl.tags.get("style", ""),
                          tpl.tags.get("verbaliser", ""), tpl.description, tpl.truncate or "")
    console.print(table)


@prompts_app.command("show")
def show_cmd(
    task: str = typer.Argument(..., metavar="TASK", help="Task name (e.g. TERRa)."),
    template: Optional[str] = typer.Option(None, "--template", help="Template name or a .yaml path.",
                                           show_default="the task's default"),
    n: int = typer.Option(3, "--examples", "-n", min=1, help="How many examples."),
    data: str = data_option("sample"),
    split: str = typer.Option("val", "--split", help="Data split to take the examples from: train, val or test."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help="Override the template's prefix ('' for none).",
                                         show_default="the template's"),
) -> None:
    """Print rendered prompts and their answer choices for the first N examples of a task."""
    from rich.panel import Panel
    from rich.text import Text

    from rsg_eval.core.prompts import load_template
    from rsg_eval.core.tasks import get_task
    from rsg_eval.core.data import load_items

    spec = get_task(task)
    tpl = load_template(spec.name, template)
    items = load_items(data, spec.name, split)[:n]
    console.print(f"[bold]{spec.name}[/] template [bold]{tpl.name}[/] ({tpl.path}, sha256 {tpl.sha256[:12]})")
    for it in items:
        r = tpl.render(it, prefix=prefix)
        body = Text(r.prompt)
        body.append("\n\nchoices:\n", style="bold")
        for label, choice in zip(it.labels, r.choices):
            mark = "  <- gold" if it.gold is not None and (label == it.gold or
                                                       (isinstance(it.gold, tuple) and label in it.gold)) else ""
            body.append(f"  {label!r}: ", style="cyan")
            body.append(choice)
            body.append(mark + "\n", style="green")
        console.print(Panel(body, title=f"{spec.name} {split} key {it.key}", title_align="left"))
