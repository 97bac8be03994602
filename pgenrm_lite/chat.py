"""Chat messages to prompt tokens, with the model's own chat template rendered in a sandbox.

The tokens equal what `transformers`' `apply_chat_template(messages,
add_generation_prompt=True)` gives on ordinary text, the template's own whitespace
trimming (Llama 3's `content | trim`, Gemma 3's) included, with one deliberate
difference: special tokens come only from the template's own text. A user's text that
spells `<|eot_id|>` or `<|im_end|>` stays plain text (transformers would make it a
control token).

How: every message is first rendered as a marker padded with whitespace probes. The
probes that survive tell whether the template trims that message (we then strip it the
same way); the template text around the markers is split at its control tokens; the
plain text between two control tokens, template and content together, is tokenized as
one run, as a Hugging Face tokenizer does. A second render with the real contents must
give exactly the string the pieces join to, or the template is refused.

A template that refuses a system message (Gemma 2, early Mistral) gets it at the head of
the first user message, separated by a blank line, where transformers would raise.
"""

from __future__ import annotations

import datetime
import json
import re
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
OVERRIDE_HINT = ("pass chat_template= (a Jinja template string or a .jinja file) to Scorer.from_bundle / "
                 "from_gguf, or set it in the bundle with `python -m export bundle --chat-template FILE`")

# Whitespace probes around each marker: no template text ends or starts with these.
_PAD_LEFT, _PAD_RIGHT = " \t\n", "\n\t "


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' version: no HTML escaping, unlike Jinja's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


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
    # The same environment settings as transformers' chat-template renderer.
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
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
            raise ConfigError(f"the chat template does not compile ({exc}); {OVERRIDE_HINT}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._accepts_system: bool | None = None

    def render(self, messages: Sequence[dict]) -> str:
        """The prompt as one string, as `apply_chat_template(..., tokenize=False)` writes it."""
        try:
            # enable_thinking=False: Qwen3-style templates then open the answer with an empty
            # think block; a reward model's contract starts with its own analysis.
            out = self._template.render(messages=list(messages), add_generation_prompt=True,
                                        enable_thinking=False, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except Exception as exc:
            # The template is data from the model file: whatever it raises (a SecurityError from the
            # sandbox, OverflowError from a huge range(), TypeError, ...) is a configuration problem.
            raise ConfigError(f"the chat template failed to render these messages: "
                              f"{type(exc).__name__}: {exc}; {OVERRIDE_HINT}") from exc
        if len(out) > MAX_RENDERED_CHARS:
            raise ConfigError(f"the chat template wrote {len(out)} characters; {OVERRIDE_HINT}")
        return out

    def accepts_system(self) -> bool:
        """Whether the template renders a system message (Gemma 2 and early Mistral templates refuse one)."""
        if self._accepts_system is None:
            try:
                self.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
                self._accepts_system = True
            except ConfigError:
                self._accepts_system = False
        return self._accepts_system

    def fit_roles(self, messages: Sequence[dict]) -> list[dict]:
        """The messages as this template takes them: a system message it refuses is put at the head
        of the first user message, separated by a blank line (what those models were tuned with)."""
        messages = list(messages)
        if len(messages) >= 2 and messages[0].get("role") == "system" and messages[1].get("role") == "user" \
                and not self.accepts_system():
            head, first = messages[0], messages[1]
            return [{**first, "content": f"{head['content']}\n\n{first['content']}"}] + messages[2:]
        return messages

    def render_parts(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
        """The prompt as (text, is_template_text) pieces, in order; contents trimmed as the template does."""
        messages = self.fit_roles(messages)
        marks = [f"\ue000{uuid.uuid4().hex}\ue001" for _ in messages]
        probed = self.render([{**m, "content": _PAD_LEFT + mark + _PAD_RIGHT} for m, mark in zip(messages, marks)])
        found = []
        for i, mark in enumerate(marks):
            at = [m.start() for m in re.finditer(re.escape(mark), probed)]
            if len(at) != 1:
                raise EngineError(f"the chat template {'dropped' if not at else 'repeated'} message {i} "
                                  f"({messages[i].get('role')!r}); it cannot be tokenized safely: {OVERRIDE_HINT}")
            found.append((at[0], i))
        parts: list[tuple[str, bool]] = []
        cursor = 0
        for pos, i in sorted(found):
            keep_left = probed[:pos].endswith(_PAD_LEFT)
            keep_right = probed.startswith(_PAD_RIGHT, pos + len(marks[i]))
            start = pos - len(_PAD_LEFT) if keep_left else pos
            content = messages[i]["content"]
            content = content if keep_left else content.lstrip()
            content = content if keep_right else content.rstrip()
            parts.append((probed[cursor:start], True))
            parts.append((content, False))
            cursor = pos + len(marks[i]) + (len(_PAD_RIGHT) if keep_right else 0)
        parts.append((probed[cursor:], True))
        parts = [(t, is_template) for t, is_template in parts if t]
        if "".join(t for t, _ in parts) != self.render(messages):  # the real contents, as transformers renders them
            raise EngineError("the chat template changes message contents in a way that cannot be reproduced "
                              f"safely (beyond trimming whitespace): {OVERRIDE_HINT}")
        return parts

    def tokenize(self, messages: Sequence[dict], tokenize: Callable[..., list[int]], *,
                 is_control: Callable[[int], bool], token_text: Callable[[int], str],
                 bos_id: int | None) -> list[int]:
        """Prompt token ids: control tokens from template text only, every other run tokenized whole."""
        tokens: list[int] = []
        run: list[str] = []

        def flush() -> None:
            text = "".join(run)
            run.clear()
            if text:
                tokens.extend(tokenize(text, add_special=False, parse_special=False))

        for text, is_template in self.render_parts(messages):
            if not is_template:
                run.append(text)
                continue
            cursor = 0
            for tid in tokenize(text, add_special=False, parse_special=True):
                if not is_control(tid):
                    continue
                spelled = token_text(tid)
                at = text.find(spelled, cursor) if spelled else -1
                if at < 0:
                    raise EngineError(f"control token {tid} ({spelled!r}) of the chat template's text cannot "
                                      f"be located in it; {OVERRIDE_HINT}")
                run.append(text[cursor:at])
                flush()
                tokens.append(tid)
                cursor = at + len(spelled)
            run.append(text[cursor:])
        flush()
        if bos_id is not None and (not tokens or tokens[0] != bos_id):
            tokens.insert(0, bos_id)
        return tokens
