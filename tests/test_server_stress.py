"""The reward server under 200 concurrent requests on loopback: every request answered, none lost."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")  # test_server.py fails instead under CI when the extra is missing
import requests  # noqa: E402

from conftest import ALICE  # noqa: E402
from test_server import PROMPT, QUESTION, query, running  # noqa: E402

from pgenrm_lite import Scorer  # noqa: E402
from pgenrm_lite.integrations.server import DEFAULT_REFERENCE, create_app  # noqa: E402

N_REQUESTS = 200
DEADLINE_S = 600  # bound on the whole test


def test_200_concurrent_requests_are_all_answered(tiny_gguf):
    with Scorer.from_gguf(tiny_gguf, n_samples=1, n_ctx=2048, max_tokens=200, analysis_chars=(5, 20),
                          max_criteria=1, n_threads=1) as scorer:
        app = create_app(scorer, {"alice": ALICE}, queue_size=16)
        with running(app) as base:
            start = time.monotonic()

            def post(i: int) -> tuple[int, float, int]:
                body = {"query": [query(f"Answer number {i}.")], "prompts": [PROMPT], "labels": ["alice"]}
                rejected = 0
                while time.monotonic() - start < DEADLINE_S:
                    r = requests.post(f"{base}/get_reward", json=body, timeout=DEADLINE_S)
                    if r.status_code == 503:  # the bounded queue is full: retry as told
                        rejected += 1
                        assert "Retry-After" in r.headers
                        time.sleep(min(float(r.headers["Retry-After"]), 0.2))
                        continue
                    assert r.status_code == 200, r.text
                    (reward,) = r.json()["rewards"]
                    return i, reward, rejected
                raise AssertionError(f"request {i} not answered within {DEADLINE_S} s")

            with ThreadPoolExecutor(max_workers=N_REQUESTS) as pool:
                results = list(pool.map(post, range(N_REQUESTS)))
            assert requests.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        assert sorted(i for i, _, _ in results) == list(range(N_REQUESTS))  # none lost
        assert sum(r for _, _, r in results) > 0  # the queue bound was exercised
        # Each answer belongs to its own request: recompute a few directly.
        for i, reward, _ in results[:: N_REQUESTS // 4]:
            expected = scorer.score(ALICE, QUESTION, [f"Answer number {i}.", DEFAULT_REFERENCE])[0]
            assert reward == pytest.approx(expected)
