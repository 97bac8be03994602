"""Chat messages to prompt tokens, with the model's own chat template rendered in a sandbox.

Template text may produce special tokens (`<|im_start|>`...); message content never does:
each content is rendered as a sentinel, the rendered string is split on the sentinels, and
only the template's own pieces are tokenized with special-token parsing. A user's text
that spells `<|im_end|>` therefore stays plain text.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Callable, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ConfigError, EngineError

# Used when a GGUF file carries no chat template.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str):
    raise jinja2.TemplateError(message)


MAX_RENDERED_CHARS = 1 << 22  # a chat template's output never needs more than a few MB


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus a cap on `*` and `**` so a template cannot build a huge value."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise jinja2.TemplateError("exponent too large in chat template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDERED_CHARS:
                    raise jinja2.TemplateError("chat template builds a value that is too large")
        return super().call_binop(context, operator, left, right)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class ChatFormatter:
    """Renders messages with a chat template and tokenizes them safely."""

    def __init__(self, template: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.template_source = template or FALLBACK_TEMPLATE
        self.uses_fallback = template is None
        try:
            self._template = _environment().from_string(self.template_source)
        except Exception as exc:  # TemplateSyntaxError, or e.g. RecursionError on absurd nesting
            raise ConfigError(f"the model's chat template does not compile ({exc}); pass a "
                              "chat_template= override") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render_parts(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
        """The prompt as (text, is_template_text) pieces, in order."""
        marks = [f"\x1e{uuid.uuid4().hex}\x1e" for _ in messages]
        stand_ins = [{"role": m["role"], "content": mark} for m, mark in zip(messages, marks)]
        try:
            rendered = self._template.render(messages=stand_ins, add_generation_prompt=True,
                                             bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as exc:
            # The template is data from the model file: whatever it raises (a SecurityError from the
            # sandbox, OverflowError from a huge range(), TypeError, ...) is a configuration problem.
            raise ConfigError(f"the chat template failed to render these messages: "
                              f"{type(exc).__name__}: {exc}") from exc
        parts: list[tuple[str, bool]] = []
        rest = rendered
        for m, mark in zip(messages, marks):
            before, found, after = rest.partition(mark)
            if not found:
                raise EngineError("the chat template dropped or rewrote a message; it cannot be "
                                  "used safely (pass a chat_template= override)")
            parts.append((before, True))
            parts.append((m["content"], False))
            rest = after
        parts.append((rest, True))
        return [(t, special) for t, special in parts if t]

    def tokenize(self, messages: Sequence[dict], tokenize: Callable[..., list[int]], *,
                 bos_id: int | None) -> list[int]:
        tokens: list[int] = []
        for text, is_template in self.render_parts(messages):
            tokens.extend(tokenize(text, add_special=False, parse_special=is_template))
        if bos_id is not None and (not tokens or tokens[0] != bos_id):
            tokens.insert(0, bos_id)
        return tokens
