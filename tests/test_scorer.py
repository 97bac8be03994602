"""The Scorer on real GGUF models loaded by llama.cpp (a tiny random Llama and SmolLM2-135M), and
its own logic (fitting, aggregation, failures, options) on the FakeEngine."""

from __future__ import annotations

import math
import re
import threading

import pytest
from conftest import ALICE, FAST, PROMPT, A, B, chain_text

from pgenrm_lite import CompareResult, ConfigError, ContextOverflowError, Preference, Scorer, UserProfile
from pgenrm_lite.datasets import load_hh, rows_of_split, users_from_rows
from pgenrm_lite.engine import Request


@pytest.fixture(scope="module")
def tiny_scorer(tiny_gguf):
    with Scorer.from_gguf(tiny_gguf, n_samples=3, n_ctx=4096, **FAST) as scorer:
        yield scorer


def test_compare_returns_a_complete_typed_result(tiny_scorer):
    res = tiny_scorer.compare(ALICE, PROMPT, A, B)
    assert isinstance(res, CompareResult)
    assert res.n_samples == 3 and res.n_neighbors == 0 and res.seed == 0
    assert res.n_parsed + res.n_failed == 3 == len(res.samples)
    # The grammar guarantees the contract even on a random model.
    assert res.n_failed == 0 and len(res.chains) == 3
    assert res.preferred in ("a", "b", None)
    assert res.score_a is not None and 0 <= res.score_a <= 10
    mean_a = sum(s.score_a for s in res.samples) / 3
    assert math.isclose(res.score_a, mean_a)
    assert res.history_shown == 3  # three pairs by default
    assert res.timing.n_generated_tokens == sum(s.n_tokens for s in res.samples) > 0
    assert res.timing.decode_s > 0 and res.timing.n_groups == 1
    # Each sample maps its chain back to the candidates it was shown in.
    for s in res.samples:
        s1, s2 = s.chain.final_scores
        assert (s.score_a, s.score_b) == ((s2, s1) if s.swapped else (s1, s2))
    assert CompareResult.from_json(res.to_json()) == res


def test_same_seed_same_result_different_seed_different_samples(tiny_scorer):
    first = tiny_scorer.compare(ALICE, PROMPT, A, B, seed=7)
    again = tiny_scorer.compare(ALICE, PROMPT, A, B, seed=7)
    assert first.model_dump(exclude={"timing"}) == again.model_dump(exclude={"timing"})
    other = tiny_scorer.compare(ALICE, PROMPT, A, B, seed=8)
    assert [c.raw for c in other.chains] != [c.raw for c in first.chains]
    assert other.seed == 8


def test_samples_within_a_call_differ(tiny_scorer):
    res = tiny_scorer.compare(ALICE, PROMPT, A, B, seed=3)
    assert len({c.raw for c in res.chains}) == 3


def test_threads_give_the_same_results_as_sequential_calls(tiny_scorer):
    seeds = list(range(6))
    sequential = {s: tiny_scorer.compare(ALICE, PROMPT, A, B, seed=s) for s in seeds}
    threaded: dict[int, CompareResult] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            threaded[seed] = tiny_scorer.compare(ALICE, PROMPT, A, B, seed=seed)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for s in seeds:
        assert threaded[s].model_dump(exclude={"timing"}) == sequential[s].model_dump(exclude={"timing"})


def test_samples_that_do_not_fit_together_run_in_groups(tiny_gguf):
    with Scorer.from_gguf(tiny_gguf, n_samples=6, n_ctx=2048, **FAST) as scorer:
        res = scorer.compare(ALICE, PROMPT, A, B)
    assert res.timing.n_groups > 1
    assert any("groups" in n for n in res.notes)
    assert res.n_parsed == 6


def test_an_unknown_device_is_a_config_error(tiny_gguf):
    with pytest.raises(ConfigError, match="device"):
        Scorer.from_gguf(tiny_gguf, n_samples=1, device="tpu", **FAST)


def test_not_a_gguf_file_is_refused_before_llama_cpp(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="GGUF"):
        Scorer.from_gguf(bad)


# -- the Scorer's own logic, on the FakeEngine -------------------------------------------

def test_chains_are_averaged_and_mapped_back_to_the_candidates(fake_engine, fake_gguf):
    fake_engine.queue = [chain_text(8, 6), chain_text(7, 3), chain_text(2, 9)]  # Response 1 / 2 as shown
    with Scorer.from_gguf(fake_gguf, n_samples=3, n_ctx=4096, **FAST) as scorer:
        res = scorer.compare(ALICE, PROMPT, A, B, seed=4)
    shown = [(8, 6), (7, 3), (2, 9)]
    assert [s.chain.final_scores for s in res.samples] == shown
    for s, (s1, s2) in zip(res.samples, shown):
        assert (s.score_a, s.score_b) == ((s2, s1) if s.swapped else (s1, s2))
    assert res.score_a == pytest.approx(sum(s.score_a for s in res.samples) / 3)
    assert res.score_b == pytest.approx(sum(s.score_b for s in res.samples) / 3)
    assert res.preferred == ("a" if res.score_a > res.score_b else "b")
    assert res.n_parsed == 3 and res.n_failed == 0 and len(res.chains) == 3


def test_seeds_and_counts_are_recorded_and_reach_the_engine(fake_engine, fake_gguf):
    with Scorer.from_gguf(fake_gguf, n_samples=4, n_ctx=4096, **FAST) as scorer:
        res = scorer.compare(ALICE, PROMPT, A, B, seed=11)
        requests, params = scorer.engine.calls[-1]
    assert (res.seed, res.n_samples, res.n_neighbors) == (11, 4, 0) and len(res.samples) == 4
    sample_seeds = [s.seed for s in res.samples]
    assert len(set(sample_seeds)) == 4  # each chain is drawn with its own seed ...
    assert sorted(sample_seeds) == sorted(seed for r in requests for seed in r.seeds)  # ... the one decoded
    assert params.max_tokens == FAST["max_tokens"] and params.grammar
    assert CompareResult.from_json(res.to_json()) == res


def test_score_two_and_many_responses(fake_scorer):
    two = fake_scorer.score(ALICE, PROMPT, [A, B])
    res = fake_scorer.compare(ALICE, PROMPT, A, B)
    assert two == [res.score_a, res.score_b]
    three = fake_scorer.score(ALICE, PROMPT, [A, B, "No idea."])
    assert len(three) == 3 and all(0 <= x <= 10 for x in three)
    with pytest.raises(ConfigError, match="2 to 16"):
        fake_scorer.score(ALICE, PROMPT, [A])


def test_unconstrained_failures_are_counted_not_hidden(fake_engine, fake_gguf):
    fake_engine.queue = ["Response 1 is better. No JSON here."]
    with Scorer.from_gguf(fake_gguf, n_samples=2, constrained=False, n_ctx=2048, **FAST) as scorer:
        res = scorer.compare(ALICE, PROMPT, A, B)
        assert scorer.engine.calls[-1][1].grammar is None  # unconstrained: no grammar reached the engine
    assert res.n_failed == 2 and res.n_parsed == 0
    assert res.preferred is None and res.score_a is None
    assert all(s.error for s in res.samples)


def test_one_failed_chain_of_two_is_counted_and_the_other_scores(fake_engine, fake_gguf):
    fake_engine.queue = [chain_text(9, 2), "no chain at all"]
    with Scorer.from_gguf(fake_gguf, n_samples=2, n_ctx=4096, candidate_order="item", **FAST) as scorer:
        res = scorer.compare(ALICE, PROMPT, A, B)
    assert (res.n_parsed, res.n_failed) == (1, 1) and len(res.chains) == 1
    ok = next(s for s in res.samples if s.error is None)
    assert (res.score_a, res.score_b) == (ok.score_a, ok.score_b)


def test_long_history_is_fitted_to_the_context_and_recorded(fake_engine, fake_gguf):
    long = "word " * 600
    user = UserProfile(user_id="long", history=[Preference(prompt=long, chosen=long, rejected=long)
                                                for _ in range(3)])
    with Scorer.from_gguf(fake_gguf, n_samples=1, n_ctx=2000, **FAST) as scorer:
        res = scorer.compare(user, PROMPT, A, B)
        requests, _ = scorer.engine.calls[-1]
    longest = max(len(r.tokens) for r in requests)
    assert res.history_shown == 1
    assert any("history pairs" in p for p in res.context_policy)
    assert any("shortened" in p for p in res.context_policy)
    assert longest <= 2000 - FAST["max_tokens"]  # what was decoded fits beside the chain
    assert res.n_parsed == 1


def test_prompt_over_the_context_window_is_a_typed_error(fake_engine, fake_gguf):
    with Scorer.from_gguf(fake_gguf, n_samples=1, n_ctx=512, **FAST) as scorer:
        with pytest.raises(ContextOverflowError, match="larger n_ctx") as info:
            scorer.compare(ALICE, PROMPT, A, B)
        assert scorer.engine.calls == []  # refused before any generation
    assert info.value.n_ctx == 512 and info.value.max_tokens == 400
    assert info.value.n_prompt_tokens > 512 - 400


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(n_samples=0), "at least one"),
    (dict(n_samples=1, n_neighbors=2), "prototype index"),
    (dict(n_samples=1, c_self=-1.0), "weights"),
    (dict(n_samples=1, history_pairs=-1), "history_pairs"),
    (dict(n_samples=1, max_tokens=50), "too small for the output grammar"),
])
def test_bad_configuration_is_a_config_error(fake_engine, fake_gguf, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Scorer.from_gguf(fake_gguf, **{**FAST, **kwargs})


def test_bad_call_arguments_are_config_errors(fake_scorer):
    with pytest.raises(ConfigError, match="UserProfile"):
        fake_scorer.compare({"user_id": "x"}, PROMPT, A, B)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a string"):
        fake_scorer.compare(ALICE, PROMPT, A, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="limit"):
        fake_scorer.compare(ALICE, PROMPT, A, "x" * 300_000)


def test_user_without_history_still_scores(fake_scorer):
    res = fake_scorer.compare(UserProfile(user_id="new"), PROMPT, A, B)
    assert res.history_shown == 0 and res.n_parsed == 1


# -- the real model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hh_pairs(hh_file):
    rows = load_hh(hh_file, seed=0)
    users = users_from_rows(rows)
    tests = rows_of_split(rows)
    picked = [r for r in tests if r.user_id == "helpful"][:10] + [r for r in tests if r.user_id == "harmless"][:10]
    return users, picked


def test_every_constrained_smollm2_sample_parses_on_20_real_pairs(smollm2_gguf, hh_pairs):
    users, pairs = hh_pairs
    assert len(pairs) == 20
    with Scorer.from_gguf(smollm2_gguf, n_samples=1, max_tokens=448, analysis_chars=(20, 240),
                          max_criteria=3, n_threads=2) as scorer:
        results = [scorer.compare(users[r.user_id], r.prompt, r.chosen, r.rejected, seed=i)
                   for i, r in enumerate(pairs)]
    assert sum(r.n_parsed for r in results) == 20
    assert sum(r.n_failed for r in results) == 0
    for r in results:
        chain = r.chains[0]
        assert chain.criteria, "the grammar asks for at least one criterion"
        assert all(1 <= s <= 10 for c in chain.criteria for s in c.scores)
        assert 0 <= r.score_a <= 10 and 0 <= r.score_b <= 10


def test_expected_read_out_on_smollm2_keeps_the_chains_and_reads_digit_expectations(smollm2_gguf, hh_pairs):
    users, pairs = hh_pairs
    row = pairs[0]
    opts = dict(n_samples=4, max_tokens=448, analysis_chars=(20, 240), max_criteria=3, n_threads=2)
    with Scorer.from_gguf(smollm2_gguf, **opts) as sampled_scorer:
        sampled = sampled_scorer.compare(users[row.user_id], row.prompt, row.chosen, row.rejected, seed=3)
    with Scorer.from_gguf(smollm2_gguf, expected_scores=True, **opts) as scorer:
        expected = scorer.compare(users[row.user_id], row.prompt, row.chosen, row.rejected, seed=3)
        again = scorer.compare(users[row.user_id], row.prompt, row.chosen, row.rejected, seed=3)
        # The digit distributions themselves, from the engine: grammar-masked and normalised.
        prepared = scorer._prepare(users[row.user_id], row.prompt, row.chosen, row.rejected, 3)
        ((comp,),), _ = scorer.engine.generate([Request(prepared.tokens[False], (11,))], scorer.params)
    assert expected.expected_scores and not sampled.expected_scores
    assert again.model_dump() == expected.model_dump() | {"timing": again.timing.model_dump()}
    # Recording distributions draws no random numbers: the chains are the same either way.
    assert [s.chain.raw for s in expected.samples] == [s.chain.raw for s in sampled.samples]
    assert expected.n_parsed == 4
    for s, ref in zip(expected.samples, sampled.samples):
        assert s.readout == "expected" and ref.readout == "sampled"
        assert 0 <= s.score_a <= 10 and 0 <= s.score_b <= 10
    assert expected.score_a == pytest.approx(sum(s.score_a for s in expected.samples) / 4)
    assert any(s.score_a != ref.score_a for s, ref in zip(expected.samples, sampled.samples))
    assert comp.digit_probs, "a chain has digits (weights and scores)"
    for offset, probs in comp.digit_probs.items():
        assert comp.text[offset].isdigit()
        assert sum(probs) == pytest.approx(1.0)
        assert probs[int(comp.text[offset])] > 0  # the sampled digit was possible
    # Probes ran at first digits where "10" was possible, and at no other digit.
    assert comp.ten_probs and set(comp.ten_probs) <= set(comp.digit_probs)
    assert all(0.0 <= q <= 1.0 and not comp.text[i - 1].isdigit() for i, q in comp.ten_probs.items())
    tens = [m.start(1) for m in re.finditer(r'"response_[12]": (10)', comp.text)]
    assert all(comp.ten_probs[i] > 0 for i in tens), "a written 10 had a positive probability of 10"
    # The grammar allows no leading 0 in a weight: its first digit never has P(0) > 0.
    base = comp.text.rindex("<JSON_START>")
    firsts = [base + m.start(1) for m in re.finditer(r'"weight": (\d)', comp.text[base:])]
    assert firsts and all(comp.digit_probs[i][0] == 0.0 for i in firsts)
