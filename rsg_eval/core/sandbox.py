"""The bounded Jinja sandbox every prompt template renders in (`rsg_eval.core.prompts`).

Jinja's sandbox keeps a template away from Python internals but not from memory and time: `{{ 'a' * 10**9 }}`,
nested loops, a macro that calls itself. The hooks here bound what one render can build (RSG_MAX_PROMPT_CHARS)
and do (RSG_MAX_TEMPLATE_STEPS). Kept apart from the rendering logic on purpose: every way of rendering (plain,
few-shot) goes through `prompts.Template._render`, which calls `bounded_render` and turns `OverLimit` into an
RSGError naming the file.

    BoundedSandbox(...)                    a SandboxedEnvironment whose templates are bounded
    bounded_render(tpl, fields) -> str     one render with a fresh step budget, its output size checked
    OverLimit(what, limit)                 raised inside a render that went over a limit
"""

from __future__ import annotations

import contextvars
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment
from jinja2.visitor import NodeTransformer

from rsg_eval.core.limits import PROMPT_CHARS, TEMPLATE_STEPS, Limit


class OverLimit(Exception):
    """Raised inside a render that went over a limit; `prompts.Template._render` turns it into an RSGError
    naming the file."""

    def __init__(self, what: str, limit: Limit) -> None:
        super().__init__(what)
        self.limit = limit


@dataclass
class _Steps:
    left: int


_STEPS: contextvars.ContextVar[_Steps | None] = contextvars.ContextVar("rsg_template_steps", default=None)
_LOOP_GUARD = "__rsg_loop__"     # every {% for %} iterates through it (see BoundedSandbox._parse)
_CONCAT = "__rsg_concat__"       # every `~` concatenation goes through it
_NUMBER = re.compile(r"\d+")
_MACRO_STEPS = 10


def _step(n: int = 1) -> None:
    steps = _STEPS.get()
    if steps is not None:
        steps.left -= n
        if steps.left < 0:
            raise OverLimit("took too many steps (loop iterations and calls)", TEMPLATE_STEPS)


# Every sized value a template can build: byte strings are bounded like str (`premise.encode() * 10**8` took 15 GB).
_SEQ = (str, bytes, bytearray, list, tuple)


def _check_size(value: Any, what: str) -> Any:
    if isinstance(value, _SEQ) and len(value) > PROMPT_CHARS.value():
        raise OverLimit(f"built {what} of {len(value):,} items", PROMPT_CHARS)
    return value


def _check_format_string(fmt: Any) -> None:
    """`'%0999999999d' % x` and `'{:>999999999}'.format(x)` allocate their width first: refuse huge widths."""
    if isinstance(fmt, str):
        cap = PROMPT_CHARS.value()
        for m in _NUMBER.finditer(fmt):
            if len(m.group()) > 9 or int(m.group()) > cap:
                raise OverLimit(f"asked for a field width of {m.group()}", PROMPT_CHARS)


# Callables whose int arguments are widths or counts that are allocated up front ('x'.ljust(10**9),
# [1]|batch(10**9, 0)): such an argument beyond RSG_MAX_PROMPT_CHARS is refused before anything is built.
_SIZED_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_SIZED_FILTERS = frozenset({"center", "indent", "batch", "slice"})


def _check_int_args(args: Any, what: str) -> None:
    cap = PROMPT_CHARS.value()
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > cap:
            raise OverLimit(f"passed {a:,} to {what}", PROMPT_CHARS)


def _check_grown(name: str, base: Any, args: tuple) -> None:
    """`s.replace(old, new)` and `sep.join(parts)` size their result from their arguments: computed first, so
    `('x' * 99999).replace('', 'y' * 99999)` (10^10 characters) is refused before it is built."""
    cap = PROMPT_CHARS.value()
    if name == "replace" and len(args) >= 2 and isinstance(args[0], type(base)) and isinstance(args[1], type(base)):
        old, new = args[0], args[1]
        n = base.count(old) if old else len(base) + 1
        if len(args) >= 3 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        size = len(base) + n * (len(new) - len(old))
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        parts = args[0]
        size = len(base) * max(len(parts) - 1, 0) + sum(len(p) for p in parts if isinstance(p, _SEQ))
    else:
        return
    if size > cap:
        raise OverLimit(f"built a value of {size:,} items with {name}", PROMPT_CHARS)


def _loop_guard(iterable: Any) -> Any:
    for x in iterable:
        _step()
        yield x


def _concat(*parts: Any) -> str:
    """`a ~ b ~ c`, with the length checked as it grows."""
    cap = PROMPT_CHARS.value()
    out = []
    n = 0
    for p in parts:
        s = str(p)
        n += len(s)
        if n > cap:
            raise OverLimit(f"built a string of over {cap:,} characters with ~", PROMPT_CHARS)
        out.append(s)
    return "".join(out)


class _Rewrite(NodeTransformer):
    """Every `{% for %}` iterates through _loop_guard, every `~` goes through _concat (both then run as sandboxed
    calls, so they are counted too)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_LOOP_GUARD, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return nodes.Call(nodes.Name(_CONCAT, "load"), list(node.nodes), [], None, None, lineno=node.lineno)


class BoundedSandbox(SandboxedEnvironment):
    """A SandboxedEnvironment whose templates cannot build huge values or run for long (see above)."""

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals.pop("lipsum", None)  # paragraphs of Latin: no use in a prompt, and unbounded
        self.globals[_LOOP_GUARD] = _loop_guard
        self.globals[_CONCAT] = _concat
        # Filters are called directly by compiled templates (not through `call`): wrap each one.
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Rewrite().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _step()
        cap = PROMPT_CHARS.value()
        if operator == "*":
            seq, n = (left, right) if isinstance(left, _SEQ) else (right, left)
            if isinstance(seq, _SEQ) and isinstance(n, int) and len(seq) * n > cap:
                raise OverLimit(f"multiplied a sequence of {len(seq):,} by {n:,}", PROMPT_CHARS)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 and \
                    right * math.log2(abs(left)) > 64 * cap:
                raise OverLimit(f"raised {left} to the power {right:,}", PROMPT_CHARS)
        elif operator == "+":
            if isinstance(left, _SEQ) and isinstance(right, _SEQ) and \
                    len(left) + len(right) > cap:
                raise OverLimit(f"built a value of {len(left) + len(right):,} items with +", PROMPT_CHARS)
        elif operator == "%":
            _check_format_string(left)
        return _check_size(super().call_binop(context, operator, left, right), "a value")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # A macro call costs about 50 times a loop iteration (jinja builds its frame and output buffer).
        _step(_MACRO_STEPS if isinstance(__obj, jinja2.runtime.Macro) else 1)
        if isinstance(__obj, jinja2.runtime.LoopContext) and args:
            # `loop(children)` in a `{% for ... recursive %}`: jinja iterates the children itself, past the
            # rewritten `for` node, so count those iterations here.
            args = (_loop_guard(args[0]), *args[1:])
        name = getattr(__obj, "__name__", "")
        if name in _SIZED_METHODS:
            _check_int_args((*args, *kwargs.values()), name)
        elif name in ("replace", "join") and isinstance(getattr(__obj, "__self__", None), (str, bytes, bytearray)):
            _check_grown(name, __obj.__self__, args)
        return _check_size(super().call(__context, __obj, *args, **kwargs), "a value")

    def wrap_str_format(self, value: Any) -> Any:
        """`'{:>999999999}'.format(x)`: the format string is checked when `.format` is looked up."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format_string(value.__self__)
        return wrapped


def _bounded_filter(name: str, func: Any) -> Any:
    """`func` counting a step, refusing huge widths (see _SIZED_FILTERS) and checking the size of its result."""
    skip = 2 if hasattr(func, "jinja_pass_arg") else 1  # (context or environment,) value, then the arguments

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _step()
        if name in _SIZED_FILTERS:
            _check_int_args((*args[skip:], *kwargs.values()), f"the {name} filter")
        if name == "format":
            _check_format_string(args[skip - 1] if len(args) >= skip else None)
        return _check_size(func(*args, **kwargs), f"a value with the {name} filter")

    if hasattr(func, "jinja_pass_arg"):  # so jinja still passes the context / environment it asks for
        bounded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
    bounded.__name__ = getattr(func, "__name__", name)
    return bounded


def bounded_render(tpl: jinja2.Template, fields: Mapping[str, Any]) -> str:
    """Render with a fresh step budget, streaming the output so that its size is checked as it grows."""
    cap = PROMPT_CHARS.value()
    token = _STEPS.set(_Steps(TEMPLATE_STEPS.value()))
    try:
        out: list[str] = []
        n = 0
        for piece in tpl.generate(**fields):
            n += len(piece)
            if n > cap:
                raise OverLimit(f"rendered over {cap:,} characters", PROMPT_CHARS)
            out.append(piece)
        return "".join(out)
    finally:
        _STEPS.reset(token)

