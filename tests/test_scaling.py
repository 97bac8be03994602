"""Dual-granularity aggregation (DESIGN section 3) against values worked out by hand.

    s_i = c_self * mean(self samples) + c_nb * mean(neighbour samples)

Failed samples (None) leave their mean; a term with nothing parsed is dropped and the
remaining weights renormalised.
"""

from __future__ import annotations

import pytest

from pgenrm_lite.errors import ConfigError
from pgenrm_lite.scaling import combine, decide, mean_pair

SELF = [(8.0, 4.0), (6.0, 6.0)]  # mean (7, 5)
NB = [(2.0, 9.0), (4.0, 7.0)]    # mean (3, 8)


def approx(pair):
    return pytest.approx(pair, abs=1e-12)


def test_equal_weights_average_the_two_means():
    # 0.5 * 7 + 0.5 * 3 = 5 ; 0.5 * 5 + 0.5 * 8 = 6.5
    assert combine(SELF, NB) == approx((5.0, 6.5))
    assert decide(*combine(SELF, NB)) == "b"


def test_failed_samples_are_left_out_of_their_mean():
    # Self: (8,4) and (6,6) parsed, one failed -> still (7, 5). Neighbours: only (3, 8) parsed.
    assert mean_pair([(8.0, 4.0), None, (6.0, 6.0)]) == approx((7.0, 5.0))
    # 0.5 * 7 + 0.5 * 3 = 5 ; 0.5 * 5 + 0.5 * 8 = 6.5
    assert combine([(8.0, 4.0), None, (6.0, 6.0)], [None, (3.0, 8.0)]) == approx((5.0, 6.5))
    # A failed sample is not a zero: counting it as (0, 0) would give self mean (14/3, 10/3).
    assert combine([(9.0, 1.0), None], [], c_self=1.0, c_nb=0.0) == approx((9.0, 1.0))


def test_m_zero_drops_the_self_term():
    assert combine([], NB) == approx((3.0, 8.0))
    assert combine([], NB, c_self=0.9, c_nb=0.1) == approx((3.0, 8.0))  # renormalised, not scaled by 0.1


def test_n_zero_drops_the_neighbour_term():
    assert combine(SELF, []) == approx((7.0, 5.0))
    assert combine(SELF, [], c_self=0.2, c_nb=0.8) == approx((7.0, 5.0))


def test_unequal_weights():
    # 0.75 * 7 + 0.25 * 3 = 6.0 ; 0.75 * 5 + 0.25 * 8 = 5.75
    assert combine(SELF, NB, c_self=0.75, c_nb=0.25) == approx((6.0, 5.75))
    # Weights need not sum to 1: (1 * 7 + 3 * 3) / 4 = 4 ; (1 * 5 + 3 * 8) / 4 = 7.25
    assert combine(SELF, NB, c_self=1.0, c_nb=3.0) == approx((4.0, 7.25))
    # A zero weight ignores its term even when it has samples.
    assert combine(SELF, NB, c_self=1.0, c_nb=0.0) == approx((7.0, 5.0))


def test_a_term_whose_samples_all_failed_is_dropped():
    assert combine(SELF, [None, None], c_self=0.2, c_nb=0.8) == approx((7.0, 5.0))
    assert combine([None], NB) == approx((3.0, 8.0))


def test_nothing_parsed_gives_none_and_no_decision():
    assert combine([None, None], [None]) is None
    assert combine([], []) is None
    assert mean_pair([]) is None and mean_pair([None]) is None
    assert decide(None, None) is None and decide(None, 3.0) is None and decide(3.0, None) is None


def test_ties_are_no_decision():
    # Self (8, 6), neighbours (4, 6): 0.5 * 8 + 0.5 * 4 = 6 = 0.5 * 6 + 0.5 * 6.
    final = combine([(8.0, 6.0)], [(4.0, 6.0)])
    assert final == approx((6.0, 6.0))
    assert decide(*final) is None
    assert decide(5.0, 5.0 + 1e-12) is None  # float noise is a tie too
    assert decide(5.0, 5.1) == "b" and decide(5.1, 5.0) == "a"


def test_invalid_weights_are_refused():
    with pytest.raises(ConfigError):
        combine(SELF, NB, c_self=-0.1, c_nb=0.5)
    with pytest.raises(ConfigError):
        combine(SELF, NB, c_self=0.0, c_nb=0.0)
