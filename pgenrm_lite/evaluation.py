"""Pairwise accuracy of a Scorer on held-out preference rows, with both tie conventions.

`official` drops ties and unparseable outputs from the denominator (as the P-GenRM
evaluation does); `rewardbench` counts them wrong. Intervals are 95% Wilson intervals.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from .datasets import Row
from .protocol import derive_seed
from .records import UserProfile

Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; (0, 1) when total is 0."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class Tally:
    pairs: int = 0
    correct: int = 0
    wrong: int = 0
    ties: int = 0  # both final scores equal: no decision
    no_parse: int = 0  # no sample parsed: no decision
    abstained: int = 0  # a verdict withdrawn under min_confidence: no decision
    samples_failed: int = 0
    samples_total: int = 0

    def add(self, preferred: Optional[str], expected: str, n_parsed: int, n_failed: int,
            abstained: bool = False) -> None:
        self.pairs += 1
        self.samples_failed += n_failed
        self.samples_total += n_parsed + n_failed
        if preferred is None:
            if abstained:
                self.abstained += 1
            elif n_parsed == 0:
                self.no_parse += 1
            else:
                self.ties += 1
        elif preferred == expected:
            self.correct += 1
        else:
            self.wrong += 1

    def summary(self) -> dict:
        decided = self.correct + self.wrong
        official = self.correct / decided if decided else None
        rb = self.correct / self.pairs if self.pairs else None
        return {
            **asdict(self),
            "accuracy_official": official,
            "accuracy_official_ci95": list(wilson_interval(self.correct, decided)) if decided else None,
            "accuracy_rewardbench": rb,
            "accuracy_rewardbench_ci95": list(wilson_interval(self.correct, self.pairs)) if self.pairs else None,
        }


@dataclass
class EvalReport:
    config: dict
    overall: dict
    per_user: dict[str, dict]
    results: list[dict] = field(default_factory=list)


def interleave_by_user(rows: Sequence[Row]) -> list[Row]:
    """Rows round-robin across users, so a `--limit` sample covers every user."""
    by_user: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_user[r.user_id].append(r)
    queues = [by_user[u] for u in sorted(by_user)]
    out: list[Row] = []
    i = 0
    while any(i < len(q) for q in queues):
        out.extend(q[i] for q in queues if i < len(q))
        i += 1
    return out


def evaluate(judge: Callable[[UserProfile, Row, int], tuple[Optional[str], int, int]],
             users: dict[str, UserProfile], rows: Iterable[Row], *, seed: int, config: dict,
             on_result: Callable[[dict], None] | None = None) -> EvalReport:
    """Judge every row (chosen shown as candidate 'a'); `judge` returns (preferred, n_parsed, n_failed)
    or (preferred, n_parsed, n_failed, abstained)."""
    overall = Tally()
    per_user: dict[str, Tally] = defaultdict(Tally)
    results = []
    for i, row in enumerate(rows):
        user = users.get(row.user_id) or UserProfile(user_id=row.user_id)
        row_seed = derive_seed(seed, "eval", i)
        verdict = judge(user, row, row_seed)
        preferred, n_parsed, n_failed = verdict[:3]
        abstained = bool(verdict[3]) if len(verdict) > 3 else False
        overall.add(preferred, "a", n_parsed, n_failed, abstained)
        per_user[row.user_id].add(preferred, "a", n_parsed, n_failed, abstained)
        item = {"index": i, "user_id": row.user_id, "seed": row_seed, "preferred": preferred,
                "correct": preferred == "a", "n_parsed": n_parsed, "n_failed": n_failed, "abstained": abstained}
        results.append(item)
        if on_result:
            on_result(item)
    return EvalReport(config=config, overall=overall.summary(),
                      per_user={u: t.summary() for u, t in sorted(per_user.items())}, results=results)
