"""ScorerOptions: one model behind Scorer arguments, manifest defaults, CLI and benchmark flags, results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pgenrm_lite import Preference, UserProfile
from pgenrm_lite.errors import BundleError, ConfigError
from pgenrm_lite.options import (MANIFEST_OPTIONS, RESULT_OPTIONS, ScorerOptions, add_option_flags,
                                 options_from_flags)
from pgenrm_lite.protocol import resolve_template

USER = UserProfile(user_id="u", history=[Preference(prompt="Hi?", chosen="Hello.", rejected="Go away.")])


# -- the model by itself --------------------------------------------------------------------

def test_defaults_and_what_was_given():
    options = ScorerOptions(n_samples=4, analysis_chars=[20, 300])
    assert options.n_samples == 4 and options.analysis_chars == (20, 300) and options.seed == 0
    assert options.given() == {"n_samples": 4, "analysis_chars": (20, 300)}
    with pytest.raises(ValidationError, match="frozen"):
        options.n_samples = 2  # type: ignore[misc]


def test_merge_later_sources_win_and_only_given_fields_count():
    base = ScorerOptions(n_samples=4, temperature=0.7)
    merged = ScorerOptions.merge({"temperature": 0.3, "max_tokens": 500}, base, {"n_samples": 2})
    assert (merged.n_samples, merged.temperature, merged.max_tokens) == (2, 0.7, 500)
    assert set(merged.given()) == {"n_samples", "temperature", "max_tokens"}
    with pytest.raises(ConfigError, match="options must be a ScorerOptions or a dict"):
        ScorerOptions.merge([("n_samples", 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, fragment", [
    ({"n_samples": 0}, "at least one > 0"),
    ({"n_samples": -1}, "n_samples must be an integer >= 0"),
    ({"n_neighbors": True}, "n_neighbors must be an integer"),
    ({"seed": 2 ** 64}, "seed must be an integer from 0 to 2\\*\\*64-1"),
    ({"c_self": 0.0, "c_nb": 0.0}, "weights must be >= 0 and not both 0"),
    ({"c_self": -1.0}, "weights"),
    ({"history_pairs": -1}, "history_pairs: .*greater than or equal to 0.*history pairs shown"),
    ({"temperature": float("nan")}, "temperature: .*finite"),
    ({"max_tokens": 0}, "max_tokens: .*greater than or equal to 1"),
    ({"max_tokens": "600"}, "max_tokens: Input should be a valid integer, got '600'"),
    ({"candidate_order": "random"}, "candidate_order: Input should be 'sample' or 'item', got 'random'"),
    ({"persona_mode": "x"}, "persona_mode"),
    ({"min_confidence": 1.5}, "min_confidence: .*less than or equal to 1"),
    ({"min_confidence": True}, "min_confidence"),
    ({"analysis_chars": [1]}, "analysis_chars"),
    ({"top_p": 2}, "top_p"),
    ({"expected_scores": "yes"}, "expected_scores"),
    ({"n_sample": 2}, "unknown option 'n_sample'; the options are: n_samples, "),
])
def test_bad_values_are_config_errors_that_say_how_to_mend(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ScorerOptions(**bad)


def test_resolve_fills_the_contracts_defaults_only_where_none():
    contract = resolve_template(None).output_contract
    resolved = ScorerOptions(max_tokens=321).resolve(contract)
    assert resolved.max_tokens == 321
    assert (resolved.constrained, resolved.analysis_chars, resolved.history_order, resolved.candidate_order) == (
        contract.constrained, contract.analysis_chars, contract.history_order, contract.candidate_order)


def test_results_record_the_options_that_change_numbers_and_rebuild_them():
    options = ScorerOptions(n_samples=3, seed=5, analysis_chars=(20, 300), prefix_cache_dir="/tmp/x")
    recorded = options.for_result(seed=9)
    assert set(recorded) == RESULT_OPTIONS
    assert recorded["seed"] == 9 and recorded["analysis_chars"] == [20, 300]  # JSON: the call's seed, a list
    assert not {"prefix_cache_mb", "prefix_cache_dir", "prefix_cache_disk_mb"} & set(recorded)
    assert ScorerOptions(**recorded).for_result(seed=9) == recorded


def test_manifest_defaults_are_validated_and_unknown_names_ignored():
    assert ScorerOptions.manifest_defaults({"max_tokens": 600, "analysis_chars": [20, 240], "c_self": 1,
                                            "newer_option": {"x": 1}, "n_samples": 8}) == {
        "max_tokens": 600, "analysis_chars": (20, 240), "c_self": 1.0}  # counts and seeds are not a bundle's
    for bad in ({"max_tokens": True}, {"temperature": None}, {"analysis_chars": ["a", "b"]}, {"top_p": "high"}):
        with pytest.raises(BundleError, match=f"recommended option '{next(iter(bad))}' is invalid"):
            ScorerOptions.manifest_defaults(bad)
    assert "n_samples" not in MANIFEST_OPTIONS and "max_tokens" in MANIFEST_OPTIONS


# -- flags ----------------------------------------------------------------------------------

def test_every_option_is_a_flag_parsed_and_validated_by_the_model(capsys):
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == set(ScorerOptions.model_fields)
    args = parser.parse_args(["--n-samples", "4", "--analysis-chars", "20,300", "--no-constrained",
                              "--expected-scores", "--persona-mode", "query", "--seed", str(2 ** 64 - 1)])
    assert options_from_flags(args) == {"n_samples": 4, "analysis_chars": (20, 300), "constrained": False,
                                        "expected_scores": True, "persona_mode": "query", "seed": 2 ** 64 - 1}
    for argv, fragment in ((["--seed", str(2 ** 64)], "seed must be an integer"),
                           (["--temperature", "-1"], "temperature: Input should be greater than or equal to 0"),
                           (["--analysis-chars", "20"], "analysis_chars"),
                           (["--max-tokens", "x"], "'x' is not an integer")):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_cli_model_commands_take_the_option_flags():
    from pgenrm_lite.cli import build_parser

    args = build_parser().parse_args(["compare", "--user", "u.json", "--prompt", "p", "--a", "x", "--b", "y",
                                      "--top-p", "0.9", "--history-pairs", "2"])
    assert options_from_flags(args) == {"top_p": 0.9, "history_pairs": 2}


def test_benchmark_flags_are_the_options_a_bundle_may_recommend():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _common import add_scorer_options, scorer_options

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)  # a script's own flag stays out of the options
    add_scorer_options(parser, exclude=("expected_scores",))
    args = parser.parse_args(["--seed", "3", "--max-criteria", "2", "--min-confidence", "0.6"])
    assert scorer_options(args) == {"max_criteria": 2, "min_confidence": 0.6}
    with pytest.raises(SystemExit):
        parser.parse_args(["--expected-scores"])


# -- through a Scorer (fake engine) -----------------------------------------------------------

def test_options_flow_into_sampling_and_results(fake_engine):
    from pgenrm_lite.scorer import Scorer

    engine = fake_engine("model.gguf", n_ctx=8192)
    options = ScorerOptions(n_samples=2, temperature=0.5, top_p=0.9, seed=4)
    scorer = Scorer(engine, options, max_tokens=1100, expected_scores=True)
    assert (scorer.n_samples, scorer.seed, scorer.expected_scores) == (2, 4, True)
    result = scorer.compare(USER, "Hi?", "Hello there.", "No.", seed=11)
    _, params = engine.calls[0]
    assert (params.temperature, params.top_p, params.max_tokens, params.digit_probs) == (0.5, 0.9, 1100, True)
    assert result.options == scorer.options.for_result(seed=11)
    assert result.options["n_samples"] == 2 and result.options["seed"] == 11
    assert result.options["analysis_chars"] == list(scorer.contract.analysis_chars)
    group = scorer.score_group(USER, "Hi?", ["a", "b", "c"], seed=3)
    assert group.options == scorer.options.for_result(seed=3)
    assert all(c.options == group.options for c in group.comparisons)


def test_same_options_as_a_model_or_as_keywords_give_the_same_result(fake_engine):
    from pgenrm_lite.scorer import Scorer

    kwargs = dict(n_samples=3, candidate_order="item", history_pairs=1, min_confidence=0.5)
    by_keywords = Scorer(fake_engine("m"), **kwargs).compare(USER, "Hi?", "a", "b")  # type: ignore[arg-type]
    by_model = Scorer(fake_engine("m"), ScorerOptions(**kwargs)).compare(USER, "Hi?", "a", "b")
    assert by_keywords.model_dump(exclude={"timing"}) == by_model.model_dump(exclude={"timing"})
    with pytest.raises(ConfigError, match="unknown option 'n_sampels'"):
        Scorer(fake_engine("m"), n_sampels=3)


def test_two_batches_statistics_sum_into_a_new_record():
    from pgenrm_lite.engine import GenerationStats
    from pgenrm_lite.result_assembly import combine_stats

    first = GenerationStats(prompt_s=1.0, n_prompt_tokens=10, n_groups=1, notes=["a"], cache_hits=1)
    second = GenerationStats(prompt_s=0.5, n_prompt_tokens=5, n_groups=1, notes=["b"], cache_misses=2)
    total = combine_stats(first, second)
    assert (total.prompt_s, total.n_prompt_tokens, total.n_groups, total.notes, total.cache_hits,
            total.cache_misses) == (1.5, 15, 2, ["a", "b"], 1, 2)
    assert first.notes == ["a"] and first.n_prompt_tokens == 10  # neither argument changed
    assert combine_stats(None, second) is second and combine_stats(first, None) is first
