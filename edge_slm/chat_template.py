"""Render a GGUF's chat template (`tokenizer.chat_template`) into a prompt string.

Templates are Jinja2 written for Hugging Face's `apply_chat_template`, so they
are rendered the way it renders them: a sandboxed environment (a model file is
untrusted input), `trim_blocks` and `lstrip_blocks`, the loop-control
extension, and the helpers templates call (`raise_exception`, `strftime_now`,
a `tojson` that keeps non-ASCII text readable).

The sandbox keeps a template from reaching Python; a budget keeps it from
exhausting memory or holding its caller. Every loop turn, call, filter,
operator, join of text and piece of output goes through the budget, which
refuses the render once it runs too long, outputs too much, or would make
more than is left: an operation that could make one huge value in a single
step (`'x' * n`, `center(n)`, `replace`, a format width) is judged before it
runs, by the size of its operands, counting a whole number as its value."""

from __future__ import annotations

import contextvars
import json
import re
import string
import time
from collections.abc import Set, ValuesView
from contextlib import closing
from datetime import datetime
from functools import lru_cache, update_wrapper
from types import GeneratorType
from typing import Any, NoReturn

from .errors import EdgeSlmError, ModelError

# Used when a GGUF carries no template; our reference model and most small
# instruction-tuned models speak ChatML.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What one render may cost. Its text is at most OUTPUT_FACTOR times the
# messages' own size plus OUTPUT_BASE characters (real templates add a few
# hundred); all it makes on the way, WORK_FACTOR times that; and it ends
# within RENDER_SECONDS of its thread's CPU time, so that submit() never
# waits long on a template.
OUTPUT_BASE = 64 * 1024
OUTPUT_FACTOR = 4
WORK_FACTOR = 16
RENDER_SECONDS = 0.5
# The most characters a conversion makes of one (a 4-byte character URL-encoded).
STRINGIFY = 12
# Calls whose result may be the product of their operands' sizes, not about their sum
# (`replace` is judged more closely, as templates call it on whole messages).
MULTIPLYING = frozenset({"join", "expandtabs", "translate", "indent", "wordwrap"})
# Value types whose methods a template may call (the sandbox allows those that do not mutate).
_VALUES = (str, bytes, int, float, list, tuple, dict)


class ConversationRejected(EdgeSlmError):
    """The chat template refused the conversation (e.g. roles that do not alternate)."""


class _TemplateRaised(Exception):
    """Carries a template's own `raise_exception` message out of Jinja."""


class _OverBudget(Exception):
    """A render that ran too long or would make too much."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; prompts need the text as is.
    # Encoded piece by piece within the budget: an indent repeats on every line, at every level.
    encoder = json.JSONEncoder(indent=indent, separators=separators, sort_keys=sort_keys,
                               ensure_ascii=ensure_ascii)
    budget = _BUDGET.get()
    return "".join(budget.spend(piece) for piece in encoder.iterencode(value))


def _size(value: Any, cap: int) -> int:
    """About how many characters `value` holds: text by its length, a number
    by its digits, a container by its contents (shared ones each time they
    appear, so never less than it prints as), anything else 1. Counting stops
    once past `cap`, so a value is measured in time proportional to min(size, cap)."""
    total, todo = 0, [value]
    while todo and total <= cap:
        v = todo.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += 1 + v.bit_length() // 3
        elif isinstance(v, dict):
            total += 2 * len(v)
            if total <= cap:
                todo.extend(v.keys())
                todo.extend(v.values())
        elif isinstance(v, (list, tuple, Set, ValuesView)):
            total += len(v)
            if total <= cap:
                todo.extend(v)
        elif isinstance(v, range):
            total += len(v)
        else:
            total += 1
    return total


def _operand_size(value: Any, cap: int) -> int:
    """An operand's size, a whole number counting as its value: a count or a
    width (`'x' * n`, `'x'.center(n)`, `batch(n)`) makes that much."""
    if isinstance(value, int) and not isinstance(value, bool):
        return min(abs(value), cap + 1)
    return _size(value, cap)


def _widest(fmt: Any) -> int:
    """The largest width or precision in a %-style or str.format format
    (`'%999999999s'` makes that many characters whatever its arguments)."""
    if not isinstance(fmt, str):
        return 0
    specs = re.findall(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d*))?", fmt)
    numbers = [n for spec in specs for n in spec if n]
    try:
        numbers += [n for _, _, spec, _ in string.Formatter().parse(fmt) if spec
                    for n in re.findall(r"\d+", spec)]
    except ValueError:  # not a str.format format (a lone brace): it has no such widths
        pass
    return max((int(n) if len(n) < 10 else 10**10 for n in numbers), default=0)


def _replace_bound(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The longest text.replace(old, new) can make: a copy of `new` for each
    `old` the text can hold. None unless all three are text."""
    text, *rest = args or (None,)
    old = kwargs.get("old", rest[0] if rest else None)
    new = kwargs.get("new", rest[1] if len(rest) > 1 else None)
    if not all(isinstance(x, str) for x in (text, old, new)):
        return None
    return len(text) + (len(text) // max(len(old), 1) + 1) * len(new)


class _Budget:
    """What is left to one render: output, work and time."""

    def __init__(self, input_size: int):
        self.output_limit = OUTPUT_BASE + OUTPUT_FACTOR * input_size
        self.work_limit = WORK_FACTOR * self.output_limit
        self.output_left = self.output_limit
        self.work_left = self.work_limit
        self.start_clock()

    def start_clock(self) -> None:
        self.cpu_start = time.thread_time()
        self.deadline = time.monotonic() + RENDER_SECONDS

    def tick(self) -> None:
        # The wall clock is cheap to read, and never behind the thread's CPU
        # time; only CPU time is the template's doing. A thread that waited
        # for the GIL (many callers submitting at once) or for a core has
        # rendered for less than the wall clock says, and is given the rest.
        if time.monotonic() > self.deadline:
            used = time.thread_time() - self.cpu_start
            if used > RENDER_SECONDS:
                raise _OverBudget(f"it ran for over {RENDER_SECONDS} s")
            self.deadline = time.monotonic() + RENDER_SECONDS - used

    def afford(self, bound: int) -> None:
        """Refuse an operation that may make more than `bound`, if that is more than is left."""
        self.tick()
        if bound > self.work_left:
            raise _OverBudget(f"it would make over {self.work_limit:,} characters on the way")

    def spend(self, value: Any) -> Any:
        """Count what an operation made, and pass it on."""
        self.work_left -= _size(value, self.work_left)
        self.afford(0)
        return value

    def afford_call(self, name: str, args: tuple, kwargs: dict[str, Any], widths: int = 0) -> None:
        """Refuse a call that may make more than is left, judged by its
        operands (`args` starting with the value a method or filter works on)."""
        sizes = sorted((_operand_size(a, self.work_left) for a in (*args, *kwargs.values())), reverse=True)
        bound = sum(sizes) + widths
        replaced = _replace_bound(args, kwargs) if name == "replace" else None
        if replaced is not None:
            bound = replaced
        elif name in MULTIPLYING and len(sizes) > 1:
            bound *= 1 + sizes[1]
        elif name == "sum" and any(isinstance(a, (list, tuple)) for a in (*args[1:], *kwargs.values())):
            bound *= bound  # lists summed: each partial sum is a new list
        self.afford(STRINGIFY * bound)

    def output(self, piece: str) -> None:
        self.output_left -= len(piece)
        if self.output_left < 0:
            raise _OverBudget(f"its text is over {self.output_limit:,} characters")
        self.spend(piece)


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


def _materialized(args: tuple) -> tuple:
    """Generators among call arguments, as lists: so that they can be measured."""
    return tuple(list(a) if isinstance(a, GeneratorType) else a for a in args)


def _finalize(value: Any) -> Any:
    """Each `{{ value }}`: text passes as it is (counted where it was made, and
    where it is output or joined); anything else becomes text within the budget."""
    if isinstance(value, str):
        return value
    budget = _BUDGET.get()
    budget.afford(STRINGIFY * _size(value, budget.work_left))
    return budget.spend(str(value))


def _bounded_filter(name: str, f: Any) -> Any:
    passed = 1 if getattr(f, "jinja_pass_arg", None) else 0  # Jinja's context or environment comes first

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        args = _materialized(args)
        operands = args[passed:]
        budget.afford_call(name, operands, kwargs,
                           _widest(operands[0]) if name == "format" and operands else 0)
        return budget.spend(f(*args, **kwargs))

    return update_wrapper(bounded, f)  # keeps Jinja's pass_context & co.


@lru_cache(maxsize=1)
def _environment_class() -> type:
    """The sandbox that renders within the current _Budget. Made on first use,
    so that commands which never chat do not pay for importing Jinja."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_For(self, node: Any, frame: Any) -> None:
            # Every loop iterates through bounded_iter, which counts its turns.
            node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [],
                                   None, None, lineno=node.lineno)
            super().visit_For(node, frame)

        def visit_Concat(self, node: Any, frame: Any) -> None:
            # `a ~ b` joins through the environment's concat, as buffers do.
            self.write("environment.concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset(("+", "-", "*", "/", "//", "%", "**"))

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                             finalize=_finalize)
            self.globals["raise_exception"] = _raise_exception
            self.globals["strftime_now"] = _strftime_now
            del self.globals["lipsum"]  # lorem ipsum of any length; no chat template needs it
            self.filters["tojson"] = _tojson
            del self.filters["urlize"]  # links for HTML: no chat template needs it
            self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

        def bounded_iter(self, iterable: Any) -> Any:
            budget = _BUDGET.get()
            made = isinstance(iterable, GeneratorType)  # its items are new, and so count
            for item in iterable:
                budget.spend(item) if made else budget.afford(0)
                yield item

        def concat(self, parts: Any) -> str:
            """Joins output buffers (macros, set blocks, filter blocks) and `~`."""
            budget = _BUDGET.get()
            parts = list(parts)
            budget.afford(sum(len(p) if isinstance(p, str) else STRINGIFY * _size(p, budget.work_left)
                              for p in parts))
            return budget.spend("".join(map(str, parts)))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _BUDGET.get()
            if operator in ("*", "**"):
                a, b = (_operand_size(x, budget.work_left) for x in (left, right))
                budget.afford((a + b) * (1 + min(a, b)))
            elif operator == "%":  # formatting: its widths, and those its arguments give for `*`
                budget.afford_call("%", (left, *right) if isinstance(right, tuple) else (left, right), {},
                                   _widest(left))
            else:
                budget.afford(_size(left, budget.work_left) + _size(right, budget.work_left))
            return budget.spend(super().call_binop(context, operator, left, right))

        def getitem(self, obj: Any, argument: Any) -> Any:
            value = super().getitem(obj, argument)
            return _BUDGET.get().spend(value) if isinstance(argument, slice) else value

        def wrap_str_format(self, value: Any) -> Any:
            fmt = super().wrap_str_format(value)
            if fmt is None:
                return None
            spec = value.__self__

            def bounded(*args: Any, **kwargs: Any) -> str:
                budget = _BUDGET.get()
                budget.afford_call("format", (spec, *args), kwargs, _widest(spec))
                return budget.spend(fmt(*args, **kwargs))

            return bounded

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            budget = _BUDGET.get()
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, _VALUES):  # e.g. 'x'.center(n), ', '.join(items)
                args = _materialized(args)
                budget.afford_call(__obj.__name__, (owner, *args), kwargs)
                return budget.spend(super().call(__context, __obj, *args, **kwargs))
            budget.tick()
            if isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive loop
                args = (__self.bounded_iter(args[0]), *args[1:])
            return super().call(__context, __obj, *args, **kwargs)

    return BoundedEnvironment


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _environment_class()().from_string(template)
    except TemplateSyntaxError as e:
        raise ModelError(f"the model's chat template does not parse: {e.message} "
                         f"(line {e.lineno})") from None


def _one_line(message: Any, most: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= most else text[:most] + "..."


def render_chat(template: str | None, messages: list[dict[str, Any]],
                add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "") -> str:
    """The prompt text for `messages` (dicts with `role` and `content`).

    `template` is the GGUF's `tokenizer.chat_template`; None or empty means
    the model has none, and ChatML is used. A template that fails, or costs
    more than the budget allows, is a ModelError."""
    budget = _Budget(_size(messages, 1 << 62))
    token = _BUDGET.set(budget)
    try:
        compiled = _compile(template or CHATML_TEMPLATE)  # compiling folds constants: within the budget too
        budget.start_clock()  # but takes its time once per template, not per render
        out = []
        with closing(compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token)) as pieces:
            for piece in pieces:
                budget.output(piece)
                out.append(piece)
        return "".join(out)
    except _TemplateRaised as e:
        raise ConversationRejected(f"the chat template rejected the conversation: {_one_line(e)}") from None
    except _OverBudget as e:
        raise ModelError(f"the model's chat template is refused: {e}") from None
    except EdgeSlmError:
        raise
    except Exception as e:  # the template's own error: Jinja's, or any a filter or operator raised
        raise ModelError(f"the model's chat template failed to render: "
                         f"{type(e).__name__}: {_one_line(e)}") from None
    finally:
        _BUDGET.reset(token)
