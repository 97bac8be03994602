"""How sure a verdict is: chain shares, an interval for score_a - score_b, both shown orders,
each scaling level separately, and abstention under min_confidence."""

from __future__ import annotations

import pytest
from conftest import ALICE, chain_text

from pgenrm_lite import scaling
from pgenrm_lite.errors import ConfigError
from pgenrm_lite.evaluation import Tally


def test_level_confidence_arithmetic():
    c = scaling.level_confidence([((8.0, 6.0), False), ((7.0, 7.0), True), ((4.0, 6.0), True), ((9.0, 5.0), False)])
    assert (c["n_chains"], c["prefer_a"], c["prefer_b"], c["ties"]) == (4, 0.5, 0.25, 0.25)
    assert c["diff_mean"] == pytest.approx(1.0)
    lo, hi = c["diff_ci95"]
    assert lo < 1.0 < hi and hi - lo == pytest.approx(2 * 3.182 * (20 / 3) ** 0.5 / 2, rel=1e-3)
    assert c["order_consistent"] is False  # A first leans a (+3), B first leans b (-1)
    one = scaling.level_confidence([((8.0, 6.0), False)])
    assert one["diff_ci95"] is None and one["order_consistent"] is None
    assert scaling.level_confidence([])["prefer_a"] is None


def test_compare_reports_confidence_per_level_and_order(fake_engine, fake_gguf):
    from pgenrm_lite.scorer import Scorer

    fake_engine.queue = [chain_text(8, 6), chain_text(7, 3), chain_text(6, 6)]  # Response 1 / 2 as shown
    with Scorer.from_gguf(fake_gguf, n_samples=6, n_ctx=1 << 20) as scorer:
        res = scorer.compare(ALICE, "q", "a", "b", seed=0)
    conf = res.confidence
    assert conf.prototype is None and conf.overall == conf.individual and conf.overall.n_chains == 6
    expected = scaling.level_confidence([((s.score_a, s.score_b), s.swapped) for s in res.samples])
    assert conf.overall.prefer_a == expected["prefer_a"] and conf.overall.order_consistent == expected["order_consistent"]
    assert sum(s.swapped for s in res.samples) not in (0, 6)  # both orders were shown
    # Response 1 always wins in these chains, so the candidates' lean flips with the order shown
    assert conf.overall.order_consistent is False


def test_min_confidence_abstains_and_is_counted(fake_engine, fake_gguf):
    from pgenrm_lite.scorer import Scorer

    fake_engine.queue = [chain_text(8, 6), chain_text(6, 8), chain_text(6, 8)]
    with Scorer.from_gguf(fake_gguf, n_samples=3, n_ctx=1 << 20, candidate_order="item") as scorer:
        base = scorer.compare(ALICE, "q", "a", "b", seed=1)
    assert base.preferred is not None and not base.abstained
    share = max(base.confidence.overall.prefer_a, base.confidence.overall.prefer_b)
    assert share == pytest.approx(2 / 3)
    with Scorer.from_gguf(fake_gguf, n_samples=3, n_ctx=1 << 20, candidate_order="item",
                          min_confidence=0.9) as scorer:
        res = scorer.compare(ALICE, "q", "a", "b", seed=1)
    assert res.preferred is None and res.abstained and (res.score_a, res.score_b) == (base.score_a, base.score_b)
    assert any("below min_confidence=0.9" in n for n in res.notes)
    tally = Tally()
    tally.add(res.preferred, "a", res.n_parsed, res.n_failed, res.abstained)
    assert (tally.abstained, tally.ties, tally.no_parse) == (1, 0, 0)
    for bad in (0, 1.5, True, "x"):
        with pytest.raises(ConfigError, match="min_confidence"):
            Scorer.from_gguf(fake_gguf, n_ctx=1024, min_confidence=bad)
