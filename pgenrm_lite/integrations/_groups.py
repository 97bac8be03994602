"""The reward scheme shared by the TRL reward function and the reward server.

A pairwise model gives no score to a response on its own, so responses are scored
against each other:

- **group**: responses to the same prompt for the same user (GRPO's completions of one
  prompt, or a batch holding several rollouts of one prompt) form a group, scored with
  `Scorer.score_group`: every pair is compared (all pairs decoded in one batch). With
  `method="mean"` a response's reward is the mean of its final scores over its pairs, on the
  chains' 0-10 scale; with `method="bradley_terry"` it is its strength fitted to the pairs'
  verdicts (centred log-odds, comparable within the group only; see
  `pgenrm_lite.group_rewards` for when to pick which). A group larger than `max_group` is
  split into balanced sub-groups of at most `max_group`.
- **reference**: a response alone in its group is compared with a reference response
  (`Scorer.score_group(user, prompt, [response, reference])`); its reward is its own final
  score in that comparison (mean, 0-10) or its strength against the reference
  (bradley_terry), so one request's rewards share one scale whichever scheme gave them.
- no group and no reference: no reward (None).

A reward is NaN when no chain parsed for it (callers map that to None or a fixed value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

from ..group_rewards import GroupMethod, check_method
from ..records import UserProfile
from ..scorer import MAX_RESPONSES


@dataclass(frozen=True)
class Item:
    group_key: Hashable  # items with equal keys (same user and prompt) are scored together
    user: UserProfile
    query: str
    response: str
    reference: Optional[str] = None


@dataclass
class Outcome:
    reward: Optional[float] = None  # NaN: no chain parsed; None: no comparison possible
    scheme: Optional[str] = None  # "group" | "reference" | None
    group_size: int = 1
    reference_score: Optional[float] = None
    stderr: Optional[float] = None  # the reward's standard error (group scheme; NaN: unknown)
    method: Optional[str] = None  # "mean" | "bradley_terry" for the group scheme


def split_balanced(indices: Sequence[int], max_group: int) -> list[list[int]]:
    """Split into ceil(n / max_group) chunks whose sizes differ by at most one (so none is a singleton
    when n > max_group >= 2)."""
    n = len(indices)
    if n <= max_group:
        return [list(indices)]
    k = -(-n // max_group)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(list(indices[start:start + size]))
        start += size
    return out


def score_items(scorer, items: Sequence[Item], *, max_group: int = MAX_RESPONSES,
                method: GroupMethod = "mean") -> list[Outcome]:
    """One Outcome per item, by the scheme described in the module docstring."""
    if not 2 <= max_group <= MAX_RESPONSES:
        raise ValueError(f"max_group must be in 2..{MAX_RESPONSES}, got {max_group}")
    check_method(method)
    groups: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group_key, []).append(i)
    outcomes = [Outcome() for _ in items]
    for indices in groups.values():
        if len(indices) == 1:
            i = indices[0]
            item = items[i]
            if item.reference is None:
                continue
            pair = scorer.score_group(item.user, item.query, [item.response, item.reference], method=method)
            own, ref = pair.rewards
            outcomes[i] = Outcome(reward=own, scheme="reference", group_size=1,
                                  reference_score=None if math.isnan(ref) else ref, stderr=pair.stderr[0],
                                  method=method)
            continue
        for chunk in split_balanced(indices, max_group):
            first = items[chunk[0]]
            group = scorer.score_group(first.user, first.query, [items[i].response for i in chunk], method=method)
            for i, reward, se in zip(chunk, group.rewards, group.stderr):
                outcomes[i] = Outcome(reward=reward, scheme="group", group_size=len(chunk), stderr=se,
                                      method=method)
    return outcomes
