"""Stress on a real (tiny) GGUF model: threads, repeated long prompts, inputs above the limits.

- 8 threads x 50 `compare` calls on one shared Scorer: no crash, no deadlock, and every
  result identical (timing aside) to the sequential run with the same seed.
- One long prompt scored 120 times: resident memory stays flat after a warm-up.
- Inputs above the documented limits (`MAX_TEXT_CHARS`, `MAX_HISTORY_PAIRS`) are refused
  with a typed error by `compare`/`score`, by `UserProfile` and by the loader (the Scorer's
  checks on a FakeEngine: they come before any model work).

The chains are kept short (analysis of 5-20 characters, one criterion) so that the 800
calls of the concurrency test take about a minute on two cores; the counts are the issue's.
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from conftest import ALICE, PROMPT, A, B

from pgenrm_lite import CompareResult, ConfigError, Preference, RecordError, Scorer, UserProfile
from pgenrm_lite.datasets import load_rows
from pgenrm_lite.errors import DataFormatError
from pgenrm_lite.records import MAX_HISTORY_PAIRS, MAX_TEXT_CHARS
from pgenrm_lite.options import MAX_CHAINS
from pgenrm_lite.scorer import MAX_RESPONSES

N_THREADS, CALLS_PER_THREAD = 8, 50
# Shorter chains than conftest's FAST: the concurrency test makes 800 calls.
SHORT = dict(max_tokens=400, analysis_chars=(5, 20), max_criteria=1, n_threads=1)


@pytest.fixture(scope="module")
def short_scorer(tiny_gguf):
    with Scorer.from_gguf(tiny_gguf, n_samples=1, n_ctx=2048, **SHORT) as s:
        yield s


def _key(res: CompareResult) -> dict:
    return res.model_dump(exclude={"timing"})


def test_threads_hammering_one_scorer_match_the_sequential_run(short_scorer):
    seeds = [[1000 * t + i for i in range(CALLS_PER_THREAD)] for t in range(N_THREADS)]
    threaded: dict[int, CompareResult] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(N_THREADS)

    def work(my_seeds: list[int]) -> None:
        try:
            start.wait(timeout=60)
            for s in my_seeds:
                threaded[s] = short_scorer.compare(ALICE, PROMPT, A, B, seed=s)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    threaded_s = time.perf_counter() - t0
    assert not any(t.is_alive() for t in threads), "deadlock: a worker did not finish within 600 s"
    assert not errors, errors[:3]
    assert len(threaded) == N_THREADS * CALLS_PER_THREAD

    t0 = time.perf_counter()
    for s in (s for group in seeds for s in group):
        expected = short_scorer.compare(ALICE, PROMPT, A, B, seed=s)
        assert _key(threaded[s]) == _key(expected), f"seed {s}: threaded result differs from sequential"
    sequential_s = time.perf_counter() - t0
    # Calls are serialised: threads gain nothing, and must not lose much either.
    print(f"\n{N_THREADS}x{CALLS_PER_THREAD} compares: threaded {threaded_s:.1f}s, sequential {sequential_s:.1f}s")
    assert all(r.n_parsed + r.n_failed == 1 for r in threaded.values())
    assert len({r.chains[0].raw for r in threaded.values() if r.chains}) > N_THREADS * CALLS_PER_THREAD // 2


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def test_memory_stays_bounded_on_a_repeated_long_prompt(tiny_gguf):
    long_prompt = " ".join(f"Sentence {i} of a long question about reversing strings in Python." for i in range(48))
    assert 3000 < len(long_prompt) < 5000, len(long_prompt)
    with Scorer.from_gguf(tiny_gguf, n_samples=1, n_ctx=8192, **SHORT) as s:
        samples = []
        for i in range(120):
            res = s.compare(ALICE, long_prompt, A, B, seed=i)
            assert res.n_parsed + res.n_failed == 1
            assert not res.context_policy  # the whole prompt fits: the long text really is evaluated
            # evaluated, or (the system message, after the first call) restored from the prefix cache
            assert res.timing.n_prompt_tokens + res.timing.n_cached_tokens > 2000
            if i in (19, 59, 119):
                samples.append(_rss_kib())
            del res
    growth_mib = (samples[-1] - samples[0]) / 1024
    print(f"\nVmRSS after calls 20/60/120: {[round(k / 1024, 1) for k in samples]} MiB (growth {growth_mib:.1f} MiB)")
    assert growth_mib < 20, f"RSS grew by {growth_mib:.1f} MiB between call 20 and call 120"


# -- documented limits ---------------------------------------------------------------------

BIG = "x" * (MAX_TEXT_CHARS + 1)


@pytest.mark.parametrize("field", ["prompt", "response_a", "response_b"])
def test_compare_refuses_texts_above_the_limit(fake_scorer, field):
    args = {"prompt": PROMPT, "response_a": A, "response_b": B, field: BIG}
    with pytest.raises(ConfigError, match=rf"{field} has {MAX_TEXT_CHARS + 1} characters; the limit is {MAX_TEXT_CHARS}"):
        fake_scorer.compare(ALICE, **args)


def test_compare_refuses_non_text_and_broken_unicode(fake_scorer):
    with pytest.raises(ConfigError, match="response_a must be a string"):
        fake_scorer.compare(ALICE, PROMPT, b"bytes", B)
    with pytest.raises(ConfigError, match="prompt is not valid Unicode"):
        fake_scorer.compare(ALICE, "half a pair \ud83d", A, B)
    with pytest.raises(ConfigError, match="UserProfile"):
        fake_scorer.compare({"user_id": "alice"}, PROMPT, A, B)


def test_chain_counts_above_the_limit_are_refused_before_any_work(fake_engine, fake_gguf, fake_bundle):
    for kwargs in ({"n_samples": MAX_CHAINS + 1}, {"n_samples": 2 ** 64}):
        with pytest.raises(ConfigError, match=f"at most {MAX_CHAINS}"):
            Scorer.from_gguf(fake_gguf, **kwargs)
    with pytest.raises(ConfigError, match=f"at most {MAX_CHAINS}"):
        Scorer.from_bundle(fake_bundle, n_samples=1, n_neighbors=2 ** 64)
    assert fake_engine.last is None


def test_score_refuses_too_many_or_too_long_responses(fake_scorer):
    with pytest.raises(ConfigError, match=f"2 to {MAX_RESPONSES} responses"):
        fake_scorer.score(ALICE, PROMPT, ["r"] * (MAX_RESPONSES + 1))
    with pytest.raises(ConfigError, match=r"responses\[1\] has"):
        fake_scorer.score(ALICE, PROMPT, [A, BIG])


def test_text_just_under_the_limit_is_shortened_to_fit_not_refused(fake_scorer):
    res = fake_scorer.compare(ALICE, PROMPT, "y" * MAX_TEXT_CHARS, B, seed=1)
    assert res.n_parsed + res.n_failed == 1
    assert any("shortened" in p for p in res.context_policy)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected", "stated_preferences", "persona"])
def test_user_profile_refuses_texts_above_the_limit(field):
    if field in ("prompt", "chosen", "rejected"):
        pair = {"prompt": "p", "chosen": "c", "rejected": "r", field: BIG}
        data = {"user_id": "u", "history": [pair]}
    else:
        data = {"user_id": "u", field: BIG}
    with pytest.raises(RecordError, match=f"{field}.*at most {MAX_TEXT_CHARS} characters"):
        UserProfile(**data)
    with pytest.raises(RecordError, match=f"{field}.*at most {MAX_TEXT_CHARS} characters"):
        UserProfile.from_json(orjson.dumps(data))


def test_user_profile_refuses_too_many_history_pairs():
    pair = Preference(prompt="p", chosen="c", rejected="r")
    assert len(UserProfile(user_id="u", history=[pair] * MAX_HISTORY_PAIRS).history) == MAX_HISTORY_PAIRS
    with pytest.raises(RecordError, match=f"history.*at most {MAX_HISTORY_PAIRS} items"):
        UserProfile(user_id="u", history=[pair] * (MAX_HISTORY_PAIRS + 1))
    data = {"user_id": "u", "history": [{"prompt": "p", "chosen": "c", "rejected": "r"}] * (MAX_HISTORY_PAIRS + 1)}
    with pytest.raises(RecordError, match=f"history.*at most {MAX_HISTORY_PAIRS} items"):
        UserProfile.from_json(orjson.dumps(data))


@pytest.mark.parametrize("where", ["context", "chosen", "rejected"])
def test_loader_refuses_texts_above_the_limit(tmp_path, where):
    row = {"user_id": "u", "context": [{"role": "user", "content": "q"}],
           "chosen": {"role": "assistant", "content": "c"}, "rejected": {"role": "assistant", "content": "r"},
           "split": "train"}
    if where == "context":
        row["context"][0]["content"] = BIG
    else:
        row[where]["content"] = BIG
    path = tmp_path / "rows.jsonl"
    path.write_bytes(orjson.dumps({**row, "context": [{"role": "user", "content": "ok"}],
                                   "chosen": "c", "rejected": "r"}) + b"\n" + orjson.dumps(row) + b"\n")
    with pytest.raises(DataFormatError, match=f"{path}:2: field '{where}.*longer than {MAX_TEXT_CHARS}"):
        load_rows(path)
