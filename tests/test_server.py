"""The OpenRLHF-compatible reward server over real HTTP on 127.0.0.1.

The requests are the ones OpenRLHF's clients send: the current single-turn executor
(`openrlhf/utils/agent.py`, aiohttp, one rollout per request) and the older batched
`openrlhf/utils/remote_rm_utils.py` (requests, a whole batch per request). The protocol tests
score on the FakeEngine (chains drawn from the prompt, so a reward for the wrong user, prompt or
response would differ from the direct call); the full queue and the CLI's server use the tiny
model, whose calls take long enough to queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ALICE, BOB, IN_CI, require

if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
    if IN_CI:
        raise ImportError("starlette and uvicorn are required in CI: pip install -e '.[serve]'")
    pytest.skip("starlette/uvicorn not installed: pip install -e '.[serve]'", allow_module_level=True)

import requests  # noqa: E402

from pgenrm_lite import UserProfile  # noqa: E402
from pgenrm_lite.integrations.server import DEFAULT_REFERENCE, create_app, judged_query, response_of  # noqa: E402

TIMEOUT = 120  # seconds, for every HTTP call

QUESTION = "How do I reverse a string in Python?"
# The tiny model's chat template is ChatML: this is the prompt OpenRLHF renders with
# apply_chat_template, and the query is prompt + response as its tokenizer decodes them.
PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def query(response: str, prompt: str = PROMPT) -> str:
    return prompt + response + "<|im_end|>"


@contextlib.contextmanager
def running(app):
    """uvicorn serving `app` in a thread on a free loopback port; stopped on exit."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def url(fake_scorer):
    app = create_app(fake_scorer, {"alice": ALICE, "bob": BOB}, queue_size=8, max_body_bytes=256 * 1024)
    with running(app) as base:
        yield base


def healthy(base: str) -> dict:
    r = requests.get(f"{base}/health", timeout=TIMEOUT)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["worker_alive"]
    return body


# -- OpenRLHF's clients --------------------------------------------------------------------

def openrlhf_agent_request(url: str, queries, prompts, labels):
    """openrlhf/utils/agent.py SingleTurnAgentExecutor._fetch_rewards_via_http, one server."""
    import aiohttp

    async def post():
        timeout = aiohttp.ClientTimeout(total=180)
        payload = {"query": queries, "prompts": prompts, "labels": labels}
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.post(url, json=payload) as response:
                response.raise_for_status()
                return await response.json()

    return asyncio.run(asyncio.wait_for(post(), TIMEOUT))


def openrlhf_legacy_request(url: str, queries, prompts, labels):
    """openrlhf/utils/remote_rm_utils.py request_api_wrapper (remote_rm_fn_ray), one try."""
    headers = {"Content-Type": "application/json"}
    response = requests.post(url=url, json={"query": queries, "prompts": prompts, "labels": labels},
                             headers=headers, timeout=180)
    response.raise_for_status()
    return response.json()


def test_current_openrlhf_client_one_rollout_per_request(url, fake_scorer):
    require(importlib.util.find_spec("aiohttp") is not None, "aiohttp (OpenRLHF's HTTP client) is not installed")
    out = openrlhf_agent_request(f"{url}/get_reward", [query("Use s[::-1].")], [PROMPT], ["alice"])
    assert set(out) >= {"rewards", "scores", "extra_logs"}
    (reward,) = out["rewards"]
    # alone in its request: compared with the server's reference response
    expected = fake_scorer.score(ALICE, QUESTION, ["Use s[::-1].", DEFAULT_REFERENCE])[0]
    assert reward == pytest.approx(expected) and 0 <= reward <= 10
    assert out["scores"] == [pytest.approx(reward / 10)]
    # every extra_logs value is a numeric list, one per rollout (OpenRLHF makes tensors of them)
    for key, values in out["extra_logs"].items():
        assert len(values) == 1 and all(isinstance(v, (int, float)) for v in values), key
    assert out["extra_logs"]["pgenrm_fallback"] == [0.0]
    assert out["extra_logs"]["pgenrm_grouped"] == [0.0]
    item = out["pgenrm"]["items"][0]
    assert item["scheme"] == "reference" and item["reference_source"] == "server" and item["personalised"]


def test_legacy_batched_client_groups_same_prompt_and_flags_unknown_users(url, fake_scorer):
    other = "<|im_start|>user\nName a colour<|im_end|>\n<|im_start|>assistant\n"
    queries = [query("Use s[::-1]."), query("Strings are sequences of characters."), query("Teal.", other),
               query("Use reversed(s).")]
    prompts = [PROMPT, PROMPT, other, PROMPT]
    labels = ["alice", "alice", "bob", "carol"]
    out = openrlhf_legacy_request(f"{url}/get_reward", queries, prompts, labels)
    assert len(out["rewards"]) == len(out["scores"]) == 4
    group = fake_scorer.score(ALICE, QUESTION, ["Use s[::-1].", "Strings are sequences of characters."])
    assert out["rewards"][:2] == pytest.approx(group)
    assert out["extra_logs"]["pgenrm_grouped"] == [1.0, 1.0, 0.0, 0.0]
    assert out["extra_logs"]["pgenrm_group_size"] == [2.0, 2.0, 1.0, 1.0]
    assert out["extra_logs"]["pgenrm_fallback"] == [0.0, 0.0, 0.0, 1.0]
    assert out["pgenrm"]["unknown_users"] == ["carol"]
    carol = fake_scorer.score(UserProfile(user_id="carol"), QUESTION, ["Use reversed(s).", DEFAULT_REFERENCE])[0]
    assert out["rewards"][3] == pytest.approx(carol)
    assert "group" in out["pgenrm"]["scheme"] and "reference" in out["pgenrm"]["scheme"]


def test_label_object_carries_user_and_reference(url, fake_scorer):
    label = json.dumps({"user_id": "bob", "reference": "Blue."})
    out = openrlhf_legacy_request(f"{url}/get_reward", [query("Teal.")], [PROMPT], [label])
    assert out["rewards"][0] == pytest.approx(fake_scorer.score(BOB, QUESTION, ["Teal.", "Blue."])[0])
    assert out["pgenrm"]["items"][0]["reference_source"] == "label"
    # no labels at all: everyone is the non-personalised judge
    out = requests.post(f"{url}/get_reward", json={"query": [query("x")], "prompts": [PROMPT]}, timeout=TIMEOUT).json()
    assert out["extra_logs"]["pgenrm_fallback"] == [1.0]


def test_empty_batch(url):
    out = openrlhf_legacy_request(f"{url}/get_reward", [], [], [])
    assert out["rewards"] == [] and out["scores"] == []


# -- bad input: the right status, a JSON error, and the server keeps serving ----------------

@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (json.dumps({"prompts": [PROMPT]}).encode(), 422, "missing field 'query'"),
    (json.dumps({"query": "abc", "prompts": [PROMPT]}).encode(), 422, "must be a list"),
    (json.dumps({"query": [1], "prompts": [PROMPT]}).encode(), 422, "query[0] must be a string"),
    (json.dumps({"query": [query("a"), query("b")], "prompts": [PROMPT], "labels": ["alice", "alice"]}).encode(),
     422, "same length"),
    (json.dumps({"query": [query("a")], "prompts": [PROMPT], "labels": ["alice", "bob"]}).encode(), 422,
     "same length"),
    (json.dumps({"query": ["something else entirely"], "prompts": [PROMPT], "labels": ["alice"]}).encode(), 422,
     "does not start with"),
    (json.dumps({"query": [query("a")], "prompts": [PROMPT], "labels": [True]}).encode(), 422, "labels[0]"),
    (json.dumps({"query": [query("x" * 300_000)], "prompts": [PROMPT], "labels": ["alice"]}).encode(), 413, "limit"),
])
def test_bad_bodies_get_json_errors_and_the_server_keeps_serving(url, body, status, fragment):
    r = requests.post(f"{url}/get_reward", data=body, headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.json()["error"]
    healthy(url)


def test_over_large_chunked_body_is_413(url):
    def chunks():  # no Content-Length: the server counts while reading
        for _ in range(64):
            yield b"x" * 8192

    r = requests.post(f"{url}/get_reward", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=TIMEOUT)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    healthy(url)


def test_unknown_routes_and_methods_are_json_errors(url):
    r = requests.get(f"{url}/get_reward", timeout=TIMEOUT)
    assert r.status_code == 405 and "error" in r.json()
    r = requests.get(f"{url}/nope", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()
    out = openrlhf_legacy_request(f"{url}/get_reward", [query("Still here.")], [PROMPT], ["alice"])
    assert len(out["rewards"]) == 1
    assert healthy(url)["served"] >= 1


def test_full_queue_answers_503_with_retry_after(scorer):
    app = create_app(scorer, {"alice": ALICE}, queue_size=1)
    # A long request: 8 rollouts of one prompt are one group, 28 pairs decoded together.
    long_body = {"query": [query(f"Answer number {i}.") for i in range(8)], "prompts": [PROMPT] * 8,
                 "labels": ["alice"] * 8}
    short_body = {"query": [query("Short.")], "prompts": [PROMPT], "labels": ["alice"]}
    with running(app) as base:
        results: dict[str, requests.Response] = {}

        def post(name, body):
            results[name] = requests.post(f"{base}/get_reward", json=body, timeout=TIMEOUT)

        def wait_for(predicate, what):
            deadline = time.monotonic() + 30
            while not predicate(healthy(base)):
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.01)

        first = threading.Thread(target=post, args=("running", long_body))
        first.start()
        wait_for(lambda h: h["busy"] and h["queue_depth"] == 0, "the first request to run")
        second = threading.Thread(target=post, args=("queued", short_body))
        second.start()
        wait_for(lambda h: h["queue_depth"] == 1, "the second request to queue")
        rejected = requests.post(f"{base}/get_reward", json=short_body, timeout=TIMEOUT)
        busy_during = healthy(base)["busy"]
        first.join(TIMEOUT)
        second.join(TIMEOUT)
        assert busy_during, "the first request finished before the full-queue check; it must be longer"
        assert rejected.status_code == 503
        assert int(rejected.headers["Retry-After"]) >= 1
        assert "queue is full" in rejected.json()["error"]
        assert results["running"].status_code == 200 and len(results["running"].json()["rewards"]) == 8
        assert results["queued"].status_code == 200
        # and it serves again once the queue drains
        assert requests.post(f"{base}/get_reward", json=short_body, timeout=TIMEOUT).status_code == 200


def test_prompt_and_response_extraction():
    llama3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert judged_query(llama3) == "What is 2+2?"
    assert judged_query(PROMPT) == QUESTION
    assert judged_query("<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n") == "Hi there"
    assert judged_query("<s>[INST] Tell me a joke [/INST]") == "Tell me a joke"
    assert judged_query("plain prompt ") == "plain prompt"
    assert response_of(llama3 + "4<|eot_id|>", llama3) == "4"
    assert response_of(query("Use s[::-1]."), PROMPT) == "Use s[::-1]."
    assert response_of("<s>" + PROMPT + "ok</s>", PROMPT) == "ok"  # a decoded BOS before the prompt
    with pytest.raises(ValueError):
        response_of("unrelated", PROMPT)


# -- the CLI ---------------------------------------------------------------------------------

# -- access: bearer token, loopback-only without one, request ids -------------------------

TOKEN = "t0ken-for-tests-0123456789"


@pytest.fixture(scope="module")
def guarded_url(fake_scorer):
    app = create_app(fake_scorer, {"alice": ALICE}, queue_size=4, max_body_bytes=64 * 1024, token=TOKEN)
    with running(app) as base:
        yield base


def test_without_the_token_every_route_is_401_before_the_body_is_read(guarded_url):
    body = {"query": [query("Use s[::-1].")], "prompts": [PROMPT], "labels": ["alice"]}
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        for method, path, kw in (("post", "/get_reward", {"json": body}), ("get", "/health", {}),
                                 ("get", "/nowhere", {}), ("post", "/get_reward", {"data": b"x" * 100_000})):
            r = getattr(requests, method)(f"{guarded_url}{path}", headers=headers, timeout=TIMEOUT, **kw)
            assert r.status_code == 401, (headers, path, r.status_code)
            assert r.headers["WWW-Authenticate"].startswith("Bearer") if path != "/nowhere" else True
            err = r.json()
            assert "bearer token" in err["error"] and TOKEN not in r.text
            assert err["request_id"] == r.headers["X-Request-ID"]
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{guarded_url}/health", headers=ok, timeout=TIMEOUT).json()["status"] == "ok"
    r = requests.post(f"{guarded_url}/get_reward", json=body, headers={**ok, "X-Request-ID": "rollout-17"},
                      timeout=TIMEOUT)
    assert r.status_code == 200 and len(r.json()["rewards"]) == 1
    assert r.headers["X-Request-ID"] == "rollout-17" and r.json()["pgenrm"]["request_id"] == "rollout-17"


def test_request_ids_are_echoed_or_made_and_errors_carry_them(url):
    r = requests.post(f"{url}/get_reward", data=b"{not json", headers={"X-Request-ID": "bad id!"}, timeout=TIMEOUT)
    assert r.status_code == 400
    rid = r.headers["X-Request-ID"]
    assert rid != "bad id!" and len(rid) == 16 and r.json()["request_id"] == rid
    a = requests.get(f"{url}/health", timeout=TIMEOUT).headers["X-Request-ID"]
    b = requests.get(f"{url}/health", timeout=TIMEOUT).headers["X-Request-ID"]
    assert a != b


def test_unauthenticated_servers_stay_on_loopback_unless_told():
    from pgenrm_lite.cli import main
    from pgenrm_lite.errors import ConfigError
    from pgenrm_lite.integrations.server import check_bind, check_token

    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        check_bind(host, None, False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(ConfigError, match="without a token"):
            check_bind(host, None, False)
        check_bind(host, TOKEN, False)
        check_bind(host, None, True)
    with pytest.raises(ConfigError, match="16 to 4096"):
        check_token("short")
    with pytest.raises(ConfigError, match="16 to 4096"):
        check_token("has a space in it 0123456789")
    # The CLI refuses before it loads any model (the bundle path does not even exist).
    assert main(["serve", "--host", "0.0.0.0", "--bundle", "/nonexistent/bundle"]) == 1


def test_cli_serve_over_http(tmp_path, tiny_gguf):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from export.bundle_build import build_bundle

    bundle = build_bundle(tiny_gguf, tmp_path / "bundle")
    profiles = tmp_path / "users.jsonl"
    profiles.write_bytes(ALICE.to_json() + b"\n" + BOB.to_json() + b"\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("pgenrm-lite")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "pgenrm_lite.cli"]),
           "serve", "--bundle", str(bundle), "--profiles", str(profiles), "--host", "127.0.0.1",
           "--port", str(port), "--queue-size", "4", "--max-body-bytes", "4096", "--threads", "1",
           "--token-file", str(token_file), "--group-reward", "bradley_terry"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 401:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        health = requests.get(f"{base}/health", headers=auth, timeout=TIMEOUT).json()
        assert health["users"] == 2 and health["worker_alive"]
        body = {"query": [query("Use s[::-1]."), query("No.")], "prompts": [PROMPT, PROMPT],
                "labels": ["alice", "alice"]}
        assert requests.post(f"{base}/get_reward", json=body, timeout=TIMEOUT).status_code == 401
        out = requests.post(f"{base}/get_reward", json=body, headers=auth, timeout=TIMEOUT).json()
        assert len(out["rewards"]) == 2 and out["pgenrm"]["group_reward"] == "bradley_terry"
        # bradley_terry scores are sigmoid(reward); unparsed rollouts get 0.0, the middle of its scale
        assert out["scores"] == pytest.approx([1 / (1 + math.exp(-r)) for r in out["rewards"]])
        assert set(out["extra_logs"]["pgenrm_unparsed"]) <= {0.0, 1.0}
        big = requests.post(f"{base}/get_reward", data=b"x" * 10_000, headers=auth, timeout=TIMEOUT)
        assert big.status_code == 413
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    logged = proc.stdout.read()
    assert TOKEN not in logged  # never logged
    assert "request_id=" in logged and "POST /get_reward status=401" in logged and "status=413" in logged
