"""Dual-granularity test-time scaling, as pure arithmetic (DESIGN section 3).

    s_i = c_self * mean_x Extract(S_i,x) + c_nb * mean_w Extract(S_i^(u_w))

Failed samples (None) are left out of their mean. A term with no parsed sample (m = 0,
n = 0, or every sample failed) is dropped and the remaining weights renormalised, so the
result is always a weighted mean of the terms present.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .errors import ConfigError

Pair = tuple[float, float]

TIE_TOLERANCE = 1e-9


def mean_pair(scores: Sequence[Optional[Pair]]) -> Optional[Pair]:
    """Mean (a, b) over the samples that parsed; None when none did."""
    ok = [s for s in scores if s is not None]
    if not ok:
        return None
    return (sum(s[0] for s in ok) / len(ok), sum(s[1] for s in ok) / len(ok))


def combine(self_scores: Sequence[Optional[Pair]], nb_scores: Sequence[Optional[Pair]], *,
            c_self: float = 0.5, c_nb: float = 0.5) -> Optional[Pair]:
    """Final (score_a, score_b), or None when no sample parsed at all."""
    if c_self < 0 or c_nb < 0 or c_self + c_nb <= 0:
        raise ConfigError(f"weights must be >= 0 and not both 0 (c_self={c_self}, c_nb={c_nb})")
    terms = [(c_self, mean_pair(self_scores)), (c_nb, mean_pair(nb_scores))]
    present = [(w, m) for w, m in terms if m is not None and w > 0]
    if not present:
        return None
    total = sum(w for w, _ in present)
    return (sum(w * m[0] for w, m in present) / total, sum(w * m[1] for w, m in present) / total)


def decide(score_a: Optional[float], score_b: Optional[float]) -> Optional[str]:
    """'a', 'b', or None for a tie or a missing score (no decision)."""
    if score_a is None or score_b is None or abs(score_a - score_b) <= TIE_TOLERANCE:
        return None
    return "a" if score_a > score_b else "b"
