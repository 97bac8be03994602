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


# -- confidence -----------------------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom (1-30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)


def level_confidence(chains: Sequence[tuple[Pair, bool]]) -> dict:
    """How the parsed chains of one level (own or neighbours) lean, from their (score_a, score_b)
    and whether each saw B first (`swapped`).

    prefer_a / prefer_b / ties: shares of the chains; diff_mean and diff_ci95: the mean of
    score_a - score_b and its 95% t-interval (None below two chains); order_consistent: the
    chains that saw A first and those that saw B first lean the same way (None when either
    order has no chain).
    """
    n = len(chains)
    diffs = [a - b for (a, b), _ in chains]
    out: dict = {"n_chains": n, "prefer_a": None, "prefer_b": None, "ties": None, "diff_mean": None,
                 "diff_ci95": None, "order_consistent": None}
    if not n:
        return out
    out["prefer_a"] = sum(d > TIE_TOLERANCE for d in diffs) / n
    out["prefer_b"] = sum(d < -TIE_TOLERANCE for d in diffs) / n
    out["ties"] = 1.0 - out["prefer_a"] - out["prefer_b"]
    mean = sum(diffs) / n
    out["diff_mean"] = mean
    if n >= 2:
        sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
        half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / n ** 0.5
        out["diff_ci95"] = (mean - half, mean + half)
    by_order = [[a - b for (a, b), swapped in chains if swapped is s] for s in (False, True)]
    if all(by_order):
        leans = [_sign(sum(d) / len(d)) for d in by_order]
        out["order_consistent"] = leans[0] == leans[1]
    return out


def _sign(x: float) -> int:
    return 0 if abs(x) <= TIE_TOLERANCE else (1 if x > 0 else -1)
