"""A scorer's life cycle: use after close, close during a call, double close (real llama.cpp)."""

from __future__ import annotations

import threading

import pytest
from conftest import ALICE

from pgenrm_lite.errors import ClosedError
from pgenrm_lite.scorer import Scorer


def _scorer(tiny_gguf) -> Scorer:
    return Scorer.from_gguf(tiny_gguf, n_samples=2, n_ctx=2048, max_tokens=48, constrained=False)


def test_every_call_after_close_is_a_typed_error(tiny_gguf):
    scorer = _scorer(tiny_gguf)
    assert scorer.compare(ALICE, "q", "a", "b").n_samples == 2
    scorer.close()
    scorer.close()  # twice is harmless
    for call in (lambda: scorer.compare(ALICE, "q", "a", "b"), lambda: scorer.score(ALICE, "q", ["a", "b"]),
                 lambda: scorer.prompt(ALICE, "q", "a", "b"), lambda: scorer.engine.tokenize("x"),
                 lambda: scorer.engine.chat_tokens([{"role": "user", "content": "x"}])):
        with pytest.raises(ClosedError, match="closed"):
            call()


def test_close_from_other_threads_during_calls(tiny_gguf):
    scorer = _scorer(tiny_gguf)
    outcomes: list[str] = []
    started = threading.Event()

    def worker(i: int) -> None:
        started.set()
        for _ in range(5):
            try:
                res = scorer.compare(ALICE, f"q{i}", "a", "b", seed=i)
                outcomes.append("result" if res.n_samples == 2 else "bad")
            except ClosedError:
                outcomes.append("closed")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait()
    closers = [threading.Thread(target=scorer.close) for _ in range(2)]
    for t in closers:
        t.start()
    for t in threads + closers:
        t.join(timeout=300)
    assert len(outcomes) == 20 and set(outcomes) <= {"result", "closed"}
    assert "closed" in outcomes  # calls after close failed typed, and the process is alive
    with pytest.raises(ClosedError):
        scorer.score(ALICE, "q", ["a", "b"])
