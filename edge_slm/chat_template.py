"""Render a GGUF's chat template (`tokenizer.chat_template`) into a prompt string.

Templates are Jinja2 written for Hugging Face's `apply_chat_template`, so they
are rendered the way it renders them: a sandboxed environment (a model file is
untrusted input), `trim_blocks` and `lstrip_blocks`, the loop-control
extension, and the helpers templates call (`raise_exception`, `strftime_now`,
a `tojson` that keeps non-ASCII text readable)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
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


class ConversationRejected(EdgeSlmError):
    """The chat template refused the conversation (e.g. roles that do not alternate)."""


class _TemplateRaised(Exception):
    """Carries a template's own `raise_exception` message out of Jinja."""


def _raise_exception(message: str) -> NoReturn:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; prompts need the text as is.
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


@lru_cache(maxsize=8)
def _compile(template: str):
    # Imported here so that commands which never chat do not pay for Jinja.
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise ModelError(f"the model's chat template does not parse: {e.message} "
                         f"(line {e.lineno})") from None


def render_chat(template: str | None, messages: list[dict[str, Any]],
                add_generation_prompt: bool = True, bos_token: str = "",
                eos_token: str = "") -> str:
    """The prompt text for `messages` (dicts with `role` and `content`).

    `template` is the GGUF's `tokenizer.chat_template`; None or empty means
    the model has none, and ChatML is used."""
    from jinja2 import TemplateError

    compiled = _compile(template or CHATML_TEMPLATE)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except _TemplateRaised as e:
        raise ConversationRejected(f"the chat template rejected the conversation: {e}") from None
    except TemplateError as e:
        raise ModelError(f"the model's chat template failed to render: {e}") from None
