"""RewardBench-style judging: a verdict "A", "B" or "error" for a pair.

RewardBench's generative-judge scripts turn each judgement into "A", "B" or "error" (no
parseable verdict); a tie is not a verdict, so here a tie counts as "error" as well. They
then score a pair 1 when the verdict names the chosen response, 0 when it names the
rejected one and 0.5 for "error" ("effectively a tie"); `result_value` gives that number.
(`pgenrm-lite eval` reports `accuracy_rewardbench`, which counts ties and failures as
wrong, and, for `--format rewardbench`, `rewardbench_score` with the 0.5 convention.)

    from pgenrm_lite.integrations.rewardbench import judge_pair
    verdict = judge_pair(scorer, user, prompt, response_a, response_b)   # "A" | "B" | "error"
"""

from __future__ import annotations

from typing import Literal, Optional

from ..records import CompareResult, UserProfile
from . import non_personalised_user

Verdict = Literal["A", "B", "error"]


def verdict(result: CompareResult) -> Verdict:
    """The verdict of a comparison: "A", "B", or "error" for a tie or no parseable chain."""
    if result.preferred == "a":
        return "A"
    if result.preferred == "b":
        return "B"
    return "error"


def judge_pair(scorer, user: Optional[UserProfile], prompt: str, response_a: str, response_b: str, *,
               seed: Optional[int] = None) -> Verdict:
    """Which response `user` prefers, RewardBench-style; `user=None` uses the non-personalised judge.

    The scorer already shows the two responses in a seeded random order per sample and maps
    the answer back, so no position shuffling is needed around this call.
    """
    if user is None:
        user = non_personalised_user()
    return verdict(scorer.compare(user, prompt, response_a, response_b, seed=seed))


def result_value(v: Verdict, *, chosen: Literal["A", "B"] = "A") -> float:
    """RewardBench's per-pair score: 1 if the verdict names the chosen response, 0 if the other, 0.5 for "error"."""
    if v == "error":
        return 0.5
    return 1.0 if v == chosen else 0.0


def rewardbench_score(summary: dict) -> Optional[float]:
    """RewardBench's mean score from an evaluation summary (`evaluation.Tally.summary()`): ties and
    unparsed pairs count 0.5."""
    pairs = summary.get("pairs", 0)
    if not pairs:
        return None
    return (summary["correct"] + 0.5 * (summary["ties"] + summary["no_parse"])) / pairs


__all__ = ["Verdict", "verdict", "judge_pair", "result_value", "rewardbench_score"]
