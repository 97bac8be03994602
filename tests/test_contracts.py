"""The two output contracts: grammars (checked against real vocabularies), string-rationale
parsing, weight normalisation and the official data options."""

from __future__ import annotations

import re

import orjson
import pytest

from pgenrm_lite import contracts, protocol
from pgenrm_lite.datasets import parse_row
from pgenrm_lite.errors import ConfigError
from pgenrm_lite.records import Preference, UserProfile

RATIONALE = ("A. Criteria & Weights:\n1. Directness (45%): gets to the point.\n2. **Factual care** (35%)\n"
             "3. Warmth - 20%\n\nB. Scoring Breakdown:\nResponse 1:\n- Directness: 8/10, opens with the answer.\n"
             "- Factual care (35%): 7/10\n- Warmth: 6\nResponse 1 Final Score = 8*0.45 + 7*0.35 + 6*0.2 = 7.25\n"
             "Response 2:\n- Directness: 4/10\n- Factual care: 9\n- Warmth: 7/10\nResponse 2 Final Score = 6.35")


def official_text(rationale=RATIONALE, s1="7.25", s2=6.35, part1="PART 1: the user likes <b>short</b> code `a<b`.") -> str:
    block = orjson.dumps({"rationale": rationale, "better_response": {"response_1": s1, "response_2": s2}}).decode()
    return f"{part1}\n**PART 2**\n<JSON_START>\n{block}\n<JSON_END>"


def test_string_rationale_gives_criteria_weights_and_scores():
    chain = protocol.parse_chain(official_text())
    assert [(c.name, c.weight, c.scores) for c in chain.criteria] == [
        ("Directness", 45.0, (8.0, 4.0)), ("Factual care", 35.0, (7.0, 9.0)), ("Warmth", 20.0, (6.0, 7.0))]
    assert chain.final_scores == (7.25, 6.35) and chain.rationale == RATIONALE
    assert chain.weights_sum == 100.0 and not chain.weights_normalised


@pytest.mark.parametrize("rationale", ["Response 1 is better because it is short.", "", "Clarity matters most."])
def test_a_rationale_without_the_layout_still_parses(rationale):
    chain = protocol.parse_chain(official_text(rationale=rationale, s1=3, s2="8"))
    assert chain.criteria == [] and chain.final_scores == (3.0, 8.0) and chain.weights_sum is None


def test_weights_not_summing_to_100_are_normalised_with_the_written_values_kept():
    text = official_text(rationale="Brevity (60%), Accuracy (60%).\nResponse 1: Brevity 8, Accuracy 6\n"
                                   "Response 2: Brevity 5, Accuracy 9")
    chain = protocol.parse_chain(text)
    assert [c.raw_weight for c in chain.criteria] == [60.0, 60.0]
    assert [c.weight for c in chain.criteria] == [50.0, 50.0]
    assert chain.weights_sum == 120.0 and chain.weights_normalised
    assert [c.scores for c in chain.criteria] == [(8.0, 5.0), (6.0, 9.0)]


def test_the_scores_key_of_the_specification_is_read_too():
    text = '<JSON_START>{"rationale": "r", "scores": {"response_1": 4, "response_2": 5}}<JSON_END>'
    assert protocol.parse_chain(text).final_scores == (4.0, 5.0)


def test_contract_defaults_differ_where_the_official_pipeline_does():
    off, st = contracts.get_contract("official"), contracts.get_contract("structured")
    assert (off.max_tokens, off.constrained, off.turns, off.history_order) == (3072, False, "first", "sampled")
    assert (st.max_tokens, st.constrained, st.turns, st.history_order) == (1280, True, "all", "original")
    assert off.candidate_order == st.candidate_order == "sample"
    with pytest.raises(ConfigError, match="unknown output contract 'nope'"):
        contracts.get_contract("nope")


def test_template_names_its_contract(tmp_path):
    data = {**protocol.default_template().to_dict(), "contract": "official"}
    assert protocol.Template.from_dict(data).output_contract.name == "official"
    with pytest.raises(ConfigError, match="contract"):
        protocol.Template.from_dict({**data, "contract": "freeform"})
    assert protocol.default_template().contract == "structured"


def test_history_order_original_or_as_drawn():
    history = [Preference(prompt=f"q{i}", chosen="c", rejected="r") for i in range(10)]
    original = protocol.select_history(history, 3, seed=5)
    sampled = protocol.select_history(history, 3, seed=5, order="sampled")
    assert sorted(sampled, key=history.index) == original  # the same pairs
    orders = {tuple(p.prompt for p in protocol.select_history(history, 3, s, order="sampled")) for s in range(20)}
    assert any(list(o) != sorted(o, key=lambda q: int(q[1:])) for o in orders)  # drawn order, not sorted
    assert protocol.select_history(history[:2], 3, seed=1, order="sampled") != [] and \
        len(protocol.select_history(history[:2], 3, seed=1, order="sampled")) == 2


def test_first_turn_only_rows():
    row = {"user_id": "u", "context": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                                        {"role": "user", "content": "second"}],
           "chosen": {"role": "assistant", "content": "c"}, "rejected": {"role": "assistant", "content": "r"}}
    assert parse_row(row, turns="first").prompt == "first"
    assert parse_row(row).prompt == "User: first\n\nAssistant: a\n\nUser: second"


def test_structured_names_follow_the_name_rule():
    ok = ["Brevity", "Brevity & Clarity", "Tone, Warmth", "Step-by-step logic", "Code / Examples", "Python 3"]
    bad = ["][0].opesozo@disco_ag___MyEquipe1c,", "a_b", "", " lead", "x" * 15, "one two three four five"]
    rule = re.compile(contracts.NAME_PATTERN)
    assert all(rule.fullmatch(n) for n in ok)
    assert not any(rule.fullmatch(n) for n in bad)


def _structured(name="Brevity & Clarity") -> str:
    return ('The user likes short answers.\n<JSON_START>\n{"rationale": {"criteria": [{"name": "' + name
            + '", "weight": 60, "response_1": 8, "response_2": 5}]}, "better_response": {"response_1": 8.0, '
            '"response_2": 5.0}}\n<JSON_END>')


@pytest.mark.parametrize("name", ["llama3_1", "qwen3"])
def test_grammars_on_real_vocabularies(name, real_gguf):
    """Both grammars accept what they should and refuse the rest, token by token, in real vocabularies."""
    from pgenrm_lite.engine import Engine

    with Engine(real_gguf(name), n_ctx=256) as engine:
        off = contracts.official_grammar()
        assert engine.grammar_accepts(off, official_text())
        assert engine.grammar_accepts(off, official_text(part1="code: if a<b and <JSON half"))
        assert not engine.grammar_accepts(off, official_text(part1="x <JSON_START> y"))  # one marker only
        assert not engine.grammar_accepts(off, "just free text, no block")
        assert not engine.grammar_accepts(off, official_text() + " trailing")
        assert not engine.grammar_accepts(off, official_text(s1="eleven"))
        bounded = contracts.official_grammar((10, 200), rationale_chars=400)
        assert engine.grammar_accepts(bounded, official_text(part1="PART 1: short answers win."))
        assert not engine.grammar_accepts(bounded, official_text())  # '<' in PART 1 under the bound
        st = contracts.structured_grammar((10, 500), 3)
        assert engine.grammar_accepts(st, _structured())
        assert not engine.grammar_accepts(st, _structured("][0].opesozo@disco_ag___"))


def test_candidate_order_per_item_is_shared_by_all_samples(tiny_gguf):
    from pgenrm_lite.scorer import Scorer

    user = UserProfile(user_id="u", stated_preferences="terse", history=[Preference(prompt="q", chosen="c", rejected="r")])
    with Scorer.from_gguf(tiny_gguf, n_samples=6, n_ctx=4096, constrained=False, max_tokens=4,
                          candidate_order="item") as scorer:
        res = scorer.compare(user, "q?", "a", "b", seed=11)
    assert len({s.swapped for s in res.samples}) == 1 and res.candidate_order == "item"
    assert any("stated preferences" in n for n in res.notes) is False  # the default template shows them
    with Scorer.from_gguf(tiny_gguf, n_samples=6, n_ctx=4096, constrained=False, max_tokens=4) as scorer:
        res = scorer.compare(user, "q?", "a", "b", seed=11)
    assert len({s.swapped for s in res.samples}) == 2 and res.candidate_order == "sample"
    assert (res.contract, res.max_tokens, res.constrained, res.history_order) == ("structured", 4, False, "original")
    with pytest.raises(ConfigError, match="candidate_order"):
        Scorer.from_gguf(tiny_gguf, n_ctx=1024, candidate_order="random")


def test_official_template_notes_unshown_stated_preferences(tiny_gguf):
    from pathlib import Path

    from export.official_template import read_official
    from pgenrm_lite.scorer import Scorer

    template = read_official(Path(__file__).parent / "fixtures" / "official_standin")
    user = UserProfile(user_id="u", stated_preferences="terse", history=[Preference(prompt="q", chosen="c", rejected="r")])
    with Scorer.from_gguf(tiny_gguf, n_ctx=8192, max_tokens=4, template=template) as scorer:
        assert scorer.params.max_tokens == 4 and scorer.constrained is False
        res = scorer.compare(user, "q?", "a", "b")
    assert res.contract == "official" and res.history_order == "sampled"
    assert any("stated preferences were not shown" in n for n in res.notes)


def test_chat_template_override_and_errors_name_real_options(tiny_gguf, tmp_path):
    from pgenrm_lite.chat import ChatFormatter
    from pgenrm_lite.errors import EngineError
    from pgenrm_lite.scorer import Scorer

    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    user = UserProfile(user_id="u", history=[])
    with Scorer.from_gguf(tiny_gguf, n_ctx=2048, max_tokens=4, constrained=False, chat_template=custom) as scorer:
        messages, ids = scorer.prompt(user, "q", "a", "b")
        assert scorer.engine.detokenize(ids).startswith("[system] ")
    dropping = ChatFormatter("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(EngineError, match="chat_template=") as info:
        dropping.render_parts([{"role": "user", "content": "hi"}])
    assert "from_bundle" in str(info.value) and "--chat-template" in str(info.value)
