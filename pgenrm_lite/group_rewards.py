"""One reward per response from pairwise comparisons of a group (pure arithmetic, no model).

A pairwise judge scores a pair, while GRPO, best-of-n and ranking want one number per
response. Two ways to get it from the k(k-1)/2 comparisons of a group:

- **mean**: a response's reward is the mean of its final scores over the pairs it took part
  in (the chains' 0-10 scale). Uses the scores' size, so rewards of different groups are on
  one scale (PPO-style value targets, thresholds); a judge that inflates both scores of
  some pairs shifts it.
- **bradley_terry**: the verdicts alone. Each compared pair (i, j) is one observation
  y_ij = the share of its parsed chains preferring i (ties count half; own and neighbour
  chains weighted c_self / c_nb as in the scaling formula), and strengths theta are the
  maximum a posteriori fit of P(i beats j) = sigmoid(theta_i - theta_j) under a N(0,
  prior_sd^2) prior (which keeps a response that wins every pair finite and centres the
  group: sum theta = 0). Rewards are theta (log-odds, centred per group), so they compare
  within a group only: the right input for GRPO's group-relative advantage and ranking,
  and robust to the score scale. Standard errors come from the Laplace approximation
  (inverse Hessian of the negative log posterior), for the centred strengths: the common
  shift of the whole group, which only the prior decides, is not part of them.

A response with no parsed comparison gets NaN under both, and its standard error is NaN.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, cast

import numpy as np

from .errors import ConfigError
from .scaling import TIE_TOLERANCE

GroupMethod = Literal["mean", "bradley_terry"]
GROUP_METHODS: tuple[str, ...] = ("mean", "bradley_terry")
DEFAULT_PRIOR_SD = 2.0  # theta gap of 2 sd = P(win) 0.98: decisive, yet finite for a clean sweep

# (i, j, share of i's wins over j in [0, 1]) for one compared pair
Outcome = tuple[int, int, float]


def check_method(method: str) -> GroupMethod:
    if method in GROUP_METHODS:
        return cast(GroupMethod, method)
    raise ConfigError(f"group reward method must be one of {', '.join(GROUP_METHODS)}, got {method!r}")


def win_share(chains: Sequence[tuple[float, float, bool]], *, c_self: float = 0.5, c_nb: float = 0.5
              ) -> Optional[float]:
    """The share of parsed chains preferring A (ties half), own and neighbour levels weighted like the
    scaling formula; chains are (score_a, score_b, is_neighbour). None when no chain parsed."""
    levels = []
    for weight, own in ((c_self, False), (c_nb, True)):
        diffs = [a - b for a, b, nb in chains if nb is own]
        if diffs and weight > 0:
            wins = sum(1.0 if d > TIE_TOLERANCE else 0.5 if d >= -TIE_TOLERANCE else 0.0 for d in diffs)
            levels.append((weight, wins / len(diffs)))
    if not levels:
        return None
    total = sum(w for w, _ in levels)
    return sum(w * s for w, s in levels) / total


def mean_rewards(n: int, scored: Sequence[tuple[int, int, float, float]]) -> tuple[list[float], list[float]]:
    """(rewards, standard errors) under `mean` from (i, j, final score of i, final score of j) per parsed
    pair; the standard error is the spread of a response's scores over its pairs (NaN below two)."""
    per: list[list[float]] = [[] for _ in range(n)]
    for i, j, si, sj in scored:
        per[i].append(si)
        per[j].append(sj)
    rewards = [float(np.mean(s)) if s else math.nan for s in per]
    stderr = [float(np.std(s, ddof=1) / math.sqrt(len(s))) if len(s) >= 2 else math.nan for s in per]
    return rewards, stderr


def bradley_terry(n: int, outcomes: Sequence[Outcome], *, prior_sd: float = DEFAULT_PRIOR_SD,
                  max_iter: int = 50, tol: float = 1e-10) -> tuple[list[float], list[float]]:
    """(strengths, standard errors) of n responses from soft pairwise outcomes; see the module docstring.

    Newton's method on a strictly convex objective (the prior makes it so), from theta = 0.
    """
    if not isinstance(prior_sd, (int, float)) or not math.isfinite(prior_sd) or prior_sd <= 0:
        raise ConfigError(f"prior_sd must be a positive number, got {prior_sd!r}")
    pairs = np.array([(i, j) for i, j, _ in outcomes], dtype=np.int64).reshape(-1, 2)
    y = np.array([y for _, _, y in outcomes], dtype=np.float64)
    if len(y) and (pairs.min() < 0 or pairs.max() >= n or np.any(pairs[:, 0] == pairs[:, 1])):
        raise ConfigError(f"outcomes must name two different responses in 0..{n - 1}")
    if np.any(~np.isfinite(y)) or np.any((y < 0) | (y > 1)):
        raise ConfigError("each outcome's win share must be in [0, 1]")
    seen = np.zeros(n, dtype=bool)
    seen[pairs.ravel()] = True
    precision = 1.0 / prior_sd ** 2
    theta = np.zeros(n)
    for _ in range(max_iter):
        p = _sigmoid(theta[pairs[:, 0]] - theta[pairs[:, 1]])
        grad = theta * precision
        np.add.at(grad, pairs[:, 0], p - y)
        np.subtract.at(grad, pairs[:, 1], p - y)
        hessian = _hessian(n, pairs, p * (1 - p), precision)
        step = np.linalg.solve(hessian, grad)
        theta -= step
        if float(np.abs(step).max(initial=0.0)) < tol:
            break
    p = _sigmoid(theta[pairs[:, 0]] - theta[pairs[:, 1]])
    cov = np.linalg.inv(_hessian(n, pairs, p * (1 - p), precision))
    # Rewards are compared within the group: drop the common shift, which only the prior pins down.
    centre = np.eye(n) - 1.0 / n
    se = np.sqrt(np.clip(np.diag(centre @ cov @ centre), 0.0, None))
    return ([float(t) if s else math.nan for t, s in zip(theta, seen)],
            [float(e) if s else math.nan for e, s in zip(se, seen)])


def _hessian(n: int, pairs: np.ndarray, w: np.ndarray, precision: float) -> np.ndarray:
    h = np.eye(n) * precision
    i, j = pairs[:, 0], pairs[:, 1]
    np.add.at(h, (i, i), w)
    np.add.at(h, (j, j), w)
    np.subtract.at(h, (i, j), w)
    np.subtract.at(h, (j, i), w)
    return h


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|
