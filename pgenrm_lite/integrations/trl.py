"""P-GenRM as a reward function for TRL's `GRPOTrainer` (no TRL import: a plain function).

    from pgenrm_lite import Scorer
    from pgenrm_lite.integrations.trl import reward_function
    scorer = Scorer.from_bundle("bundle/", n_samples=4)
    reward = reward_function(scorer, profiles, user_key="user_id")
    trainer = GRPOTrainer(model=..., reward_funcs=reward, train_dataset=ds, args=GRPOConfig(...))

The calling convention is TRL's (checked against trl 1.16 `GRPOTrainer._calculate_rewards`):
the trainer calls `reward(prompts=..., completions=..., completion_ids=..., **columns,
trainer_state=..., log_extra=..., log_metric=...)`, where every dataset column other than
`prompt` is passed as a list with one entry per completion, and expects one float, or
None ("not applicable": TRL turns it into NaN and leaves it out), per completion. Older
TRL versions pass fewer keywords; all extra keywords are accepted and ignored.

Formats: *standard* (prompt and completion are strings) and *conversational* (lists of
`{"role", "content"}` messages). For a conversational prompt the judged query is the last
user turn; for a conversational completion the response is the assistant messages' text.

Reward scheme (see `pgenrm_lite.integrations._groups`): completions of the same prompt for
the same user in one call form a group (GRPOTrainer passes the `num_generations`
completions of each prompt together) and are scored with `scorer.score(user, prompt,
group)`: every pair is compared, all pairs decoded in one batch, and a completion's reward
is its mean final score over its pairs (0-10), or with `group_reward="bradley_terry"` its
Bradley-Terry strength from the pairs' verdicts (centred per group, which GRPO's
group-relative advantage does anyway; the strengths' standard errors are logged as
`pgenrm/reward_stderr_mean`). A completion alone in its group (e.g.
`num_generations=1`) is compared with the `reference_key` column's text when one is
configured, else gets None. A reward with no parsed chain is None.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Mapping, Optional

import orjson

from ..errors import ConfigError
from ..group_rewards import GroupMethod, check_method
from ..records import UserProfile
from ..scorer import MAX_RESPONSES
from . import non_personalised_user, profile_map
from ._groups import Item, score_items

Fallback = Literal["none", "unpersonalised"]


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or a list of content blocks ({"type": "text", "text": ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "\n".join(parts)
    return str(content)


def prompt_query(prompt: Any) -> str:
    """The query to judge: the prompt string, or the last user turn of a conversational prompt."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        messages = [m for m in prompt if isinstance(m, Mapping)]
        for m in reversed(messages):
            if m.get("role") == "user":
                return message_text(m.get("content"))
        if messages:  # no user turn: the last message's text
            return message_text(messages[-1].get("content"))
    raise ConfigError(f"a prompt must be a string or a list of {{role, content}} messages, "
                      f"got {type(prompt).__name__}")


def completion_response(completion: Any) -> str:
    """The response to judge: the completion string, or the assistant messages' text."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, Mapping)]
        texts = [message_text(m.get("content")) for m in messages if m.get("role", "assistant") == "assistant"]
        return "\n\n".join(t for t in texts if t)
    raise ConfigError(f"a completion must be a string or a list of {{role, content}} messages, "
                      f"got {type(completion).__name__}")


def _prompt_key(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    try:
        return orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return repr(prompt)


def _items(users: dict[str, UserProfile], prompts, completions, user_ids, references,
           fallback: Fallback) -> tuple[list[Item], list[int], int]:
    """The items to score, the completion each one is for, and how many completions had an unknown user."""
    items: list[Item] = []
    index: list[int] = []
    unknown = 0
    for i in range(len(completions)):
        uid = user_ids[i]
        user: UserProfile | None = users.get(str(uid)) if uid is not None else None
        if user is None:
            unknown += 1
            if fallback == "none":
                continue
            user = non_personalised_user(uid)
        ref = references[i] if references is not None else None
        items.append(Item(group_key=(user.user_id, _prompt_key(prompts[i])),
                          user=user, query=prompt_query(prompts[i]),
                          response=completion_response(completions[i]),
                          reference=None if ref is None else completion_response(ref)))
        index.append(i)
    return items, index, unknown


def reward_function(scorer, profiles, *, user_key: str = "user_id", fallback: Fallback = "none",
                    reference_key: Optional[str] = None, max_group: int = MAX_RESPONSES,
                    group_reward: GroupMethod = "mean",
                    name: str = "pgenrm_reward") -> Callable[..., list[Optional[float]]]:
    """A TRL reward function scoring completions with `scorer` for each row's user.

    `profiles`: a mapping from user id to `UserProfile` (or an iterable of them). Each row's
    user id is read from the dataset column `user_key`. A user not in `profiles` gets no
    reward (`fallback="none"`: None for each of their completions) or the non-personalised
    judge (`fallback="unpersonalised"`: a profile with no history). With
    `fallback="unpersonalised"` the `user_key` column may be absent altogether.
    `reference_key`: a dataset column holding a reference response, used for completions
    alone in their group. `max_group` (2..16) caps a group; larger groups are split evenly.
    `group_reward`: "mean" (0-10 final scores) or "bradley_terry" (strengths from verdicts).
    The function's `__name__` is `name` (TRL logs rewards under it).
    """
    if fallback not in ("none", "unpersonalised"):
        raise ConfigError(f"fallback must be 'none' or 'unpersonalised', got {fallback!r}")
    if not 2 <= max_group <= MAX_RESPONSES:
        raise ConfigError(f"max_group must be in 2..{MAX_RESPONSES}, got {max_group}")
    check_method(group_reward)
    users = profile_map(profiles)

    def reward(prompts, completions, completion_ids=None, **kwargs) -> list[Optional[float]]:
        n = len(completions)
        if len(prompts) != n:
            raise ConfigError(f"got {len(prompts)} prompts for {n} completions; TRL passes one prompt per completion")
        user_ids = kwargs.get(user_key)
        if user_ids is None:
            if fallback == "none":
                raise ConfigError(f"the dataset has no '{user_key}' column to tell whose reward this is; add one, "
                                  f"pass user_key=..., or use fallback='unpersonalised'")
            user_ids = [None] * n
        references = kwargs.get(reference_key) if reference_key else None
        items, index, unknown = _items(users, prompts, completions, user_ids, references, fallback)
        rewards: list[Optional[float]] = [None] * n
        stderrs = []
        for i, outcome in zip(index, score_items(scorer, items, max_group=max_group, method=group_reward)):
            r = outcome.reward
            rewards[i] = None if r is None or math.isnan(r) else float(r)
            if outcome.stderr is not None and math.isfinite(outcome.stderr):
                stderrs.append(outcome.stderr)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and n:
            log_metric("pgenrm/unknown_user_fraction", unknown / n)
            log_metric("pgenrm/no_reward_fraction", sum(r is None for r in rewards) / n)
            if stderrs:
                log_metric("pgenrm/reward_stderr_mean", sum(stderrs) / len(stderrs))
        return rewards

    reward.__name__ = reward.__qualname__ = name
    return reward


__all__ = ["reward_function", "prompt_query", "completion_response", "message_text"]
