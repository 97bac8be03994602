"""One reward per response from pairwise verdicts: the Bradley-Terry fit and the mean scheme (pure math)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pgenrm_lite.errors import ConfigError
from pgenrm_lite.group_rewards import bradley_terry, check_method, mean_rewards, win_share


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def expected_outcomes(theta, repeat: int = 1):
    return [(i, j, sigmoid(theta[i] - theta[j])) for i, j in itertools.combinations(range(len(theta)), 2)] * repeat


def test_recovers_known_strengths_from_their_expected_outcomes():
    truth = np.array([1.2, 0.4, -0.3, -1.3])  # centred
    theta, se = bradley_terry(4, expected_outcomes(truth, repeat=200), prior_sd=100.0)
    assert np.allclose(theta, truth, atol=2e-3)
    assert abs(sum(theta)) < 1e-9  # the prior centres the group
    assert all(0 < s < 0.2 for s in se)


def test_optimum_zeroes_the_posterior_gradient_and_se_matches_a_numeric_hessian():
    outcomes = [(0, 1, 0.75), (0, 2, 1.0), (1, 2, 0.5), (2, 3, 0.0), (1, 3, 0.25)]
    prior_sd = 2.0
    theta, se = bradley_terry(4, outcomes, prior_sd=prior_sd)

    def neg_log_post(t):
        nll = -sum(y * math.log(sigmoid(t[i] - t[j])) + (1 - y) * math.log(sigmoid(t[j] - t[i]))
                   for i, j, y in outcomes)
        return nll + sum(x * x for x in t) / (2 * prior_sd ** 2)

    t = np.array(theta)
    h = 1e-4
    grad = [(neg_log_post(t + h * e) - neg_log_post(t - h * e)) / (2 * h) for e in np.eye(4)]
    assert np.allclose(grad, 0, atol=1e-6)
    hess = np.array([[(neg_log_post(t + h * a + h * b) - neg_log_post(t + h * a - h * b)
                       - neg_log_post(t - h * a + h * b) + neg_log_post(t - h * a - h * b)) / (4 * h * h)
                      for b in np.eye(4)] for a in np.eye(4)])
    centre = np.eye(4) - 0.25  # standard errors of the centred strengths
    assert np.allclose(np.sqrt(np.diag(centre @ np.linalg.inv(hess) @ centre)), se, rtol=1e-3)


def test_a_clean_sweep_stays_finite_and_ordered():
    outcomes = [(i, j, 1.0) for i, j in itertools.combinations(range(4), 2)]  # 0 beats all, 1 beats 2, 3 ...
    theta, se = bradley_terry(4, outcomes)
    assert all(math.isfinite(t) for t in theta) and theta == sorted(theta, reverse=True)
    assert abs(sum(theta)) < 1e-9


def test_symmetry_ties_and_relabelling():
    theta, _ = bradley_terry(3, [(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5)])
    assert np.allclose(theta, 0)
    a, se_a = bradley_terry(3, [(0, 1, 0.9), (1, 2, 0.7)])
    b, se_b = bradley_terry(3, [(2, 1, 0.9), (1, 0, 0.7)])  # the same data with 0 and 2 swapped
    assert np.allclose(a, b[::-1]) and np.allclose(se_a, se_b[::-1])


def test_more_evidence_means_smaller_standard_errors():
    truth = [0.5, 0.0, -0.5]
    _, few = bradley_terry(3, expected_outcomes(truth, 1))
    _, many = bradley_terry(3, expected_outcomes(truth, 20))
    assert all(m < f for m, f in zip(many, few))


def test_a_response_without_a_parsed_comparison_is_nan():
    theta, se = bradley_terry(3, [(0, 1, 1.0)])
    assert math.isnan(theta[2]) and math.isnan(se[2])
    assert theta[0] > 0 > theta[1] and theta[0] == pytest.approx(-theta[1])
    theta, se = bradley_terry(2, [])
    assert all(math.isnan(x) for x in theta + se)


def test_bad_outcomes_and_settings_are_refused():
    with pytest.raises(ConfigError, match="two different responses"):
        bradley_terry(2, [(0, 0, 0.5)])
    with pytest.raises(ConfigError, match="two different responses"):
        bradley_terry(2, [(0, 2, 0.5)])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        bradley_terry(2, [(0, 1, 1.5)])
    with pytest.raises(ConfigError, match="prior_sd"):
        bradley_terry(2, [(0, 1, 0.5)], prior_sd=0)
    with pytest.raises(ConfigError, match="bradley_terry"):
        check_method("elo")


def test_win_share_weights_levels_like_the_scaling_formula():
    own = [(8.0, 6.0, False), (5.0, 7.0, False)]  # own level: 0.5
    nbs = [(9.0, 2.0, True), (6.0, 6.0, True)]  # neighbour level: (1 + 0.5) / 2 = 0.75
    assert win_share(own + nbs) == pytest.approx(0.625)
    assert win_share(own + nbs, c_self=1.0, c_nb=0.0) == pytest.approx(0.5)
    assert win_share(nbs) == pytest.approx(0.75)  # a level with no chain drops out
    assert win_share([]) is None


def test_mean_rewards_and_their_spread():
    rewards, se = mean_rewards(3, [(0, 1, 8.0, 6.0), (0, 2, 6.0, 4.0), (1, 2, 7.0, 7.0)])
    assert rewards == pytest.approx([7.0, 6.5, 5.5])
    assert se[0] == pytest.approx(np.std([8.0, 6.0], ddof=1) / math.sqrt(2))
    rewards, se = mean_rewards(3, [(0, 1, 8.0, 6.0)])
    assert math.isnan(rewards[2]) and all(math.isnan(s) for s in se)
