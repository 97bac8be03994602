"""Prompts for one history owner and candidate pair, fitted to the context window.

Fitting policy, in order: drop shown history pairs down to one, then shorten every untrusted
text (history, query, candidates) to `SHORTEN_STEPS` lengths, keeping head and tail. What
was cut is recorded, so a result says how its prompts differ from the full ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from . import protocol
from .engine import common_prefix
from .errors import ContextOverflowError
from .records import UserProfile

SHORTEN_STEPS = (4000, 2000, 1000, 500, 250)
HistoryOrder = Literal["original", "sampled"]


@dataclass(frozen=True)
class PreparedPrompts:
    """The prompts for one (history owner, candidate pair): both candidate orders."""

    tokens: dict[bool, tuple[int, ...]]  # swapped -> prompt tokens
    messages: dict[bool, list[dict]]  # swapped -> the chat messages those tokens render
    history_shown: int
    policy: tuple[str, ...]  # what was cut to fit, in words
    prefix_len: int = 0  # tokens both orders share up to a control token (the system message): cacheable
    shared_len: int = 0  # tokens both orders share (the prefix, then the user's query): evaluated once per call


def fit_prompts(engine, template: protocol.Template, owner: UserProfile, prompt: str, first: str, second: str, *,
                seed: int, history_pairs: int, history_order: HistoryOrder, max_tokens: int) -> PreparedPrompts:
    """Render both candidate orders with `owner`'s history, cutting (see the module) until the longer
    prompt leaves `max_tokens` of the engine's per-sequence context; else a ContextOverflowError."""
    budget = engine.n_ctx_seq - max_tokens
    chosen = protocol.select_history(owner.history, history_pairs,
                                     protocol.derive_seed(seed, "history", owner.user_id), history_order)
    min_pairs = min(1, len(chosen))
    attempts: list[tuple[int, Optional[int]]] = [(n, None) for n in range(len(chosen), min_pairs - 1, -1)]
    attempts += [(min_pairs, chars) for chars in SHORTEN_STEPS]
    longest = 0
    for n_pairs, max_chars in attempts:
        tokens, messages = {}, {}
        for swapped in (False, True):
            shown_first, shown_second = (second, first) if swapped else (first, second)
            messages[swapped] = protocol.render_messages(owner, prompt, shown_first, shown_second, template=template,
                                                         history=chosen[:n_pairs], max_field_chars=max_chars)
            tokens[swapped] = engine.chat_tokens(messages[swapped])
        longest = max(len(t) for t in tokens.values())
        if longest <= budget:
            policy = _policy(owner, n_pairs, len(chosen), max_chars, engine.n_ctx, max_tokens)
            prefix_len = engine.cacheable_prefix(tokens[False], tokens[True])
            shared = min(common_prefix(tokens[False], tokens[True]), *(len(t) - 1 for t in tokens.values()))
            return PreparedPrompts(tokens=tokens, messages=messages, history_shown=n_pairs, policy=policy,
                                   prefix_len=prefix_len,
                                   shared_len=shared if prefix_len and shared > prefix_len else 0)
    raise ContextOverflowError(
        f"even with {min_pairs} history pair(s) and every text shortened to {SHORTEN_STEPS[-1]} "
        f"characters the prompt takes {longest} tokens, and with max_tokens={max_tokens} "
        f"that exceeds the context of {engine.n_ctx}; load with a larger n_ctx or lower max_tokens",
        n_prompt_tokens=longest, max_tokens=max_tokens, n_ctx=engine.n_ctx)


def _policy(owner: UserProfile, n_pairs: int, n_chosen: int, max_chars: Optional[int], n_ctx: int,
            max_tokens: int) -> tuple[str, ...]:
    policy = []
    if n_pairs < n_chosen:
        policy.append(f"showed {n_pairs} of {n_chosen} history pairs of {owner.user_id} "
                      f"to fit n_ctx={n_ctx} with max_tokens={max_tokens}")
    if max_chars is not None:
        policy.append(f"shortened texts longer than {max_chars} characters (marked '[...truncated N characters]')")
    return tuple(policy)


def unshown_preferences_notes(template: protocol.Template, user: UserProfile) -> list[str]:
    """A note when the user states preferences the template has no slot for."""
    if user.stated_preferences and "{{stated_preferences}}" not in template.system:
        return [f"the user's stated preferences were not shown: template {template.name!r} has no "
                "{{stated_preferences}} slot"]
    return []
