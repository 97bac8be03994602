"""An OpenRLHF-compatible reward server on Starlette + uvicorn (extra `serve`).

    pgenrm-lite serve --bundle DIR --profiles users.jsonl --host 127.0.0.1 --port 5000
    # OpenRLHF: --reward.remote_url http://127.0.0.1:5000/get_reward (older: --remote_rm_url)

`POST /get_reward` takes what OpenRLHF's remote reward client posts (JSON, `Content-Type:
application/json`): `{"query": [...], "prompts": [...], "labels": [...]}`, one entry per
rollout, where `query` is the prompt plus the response as the policy's tokenizer decoded
them and `prompts` the prompt text. It answers `{"rewards": [...], "scores": [...],
"extra_logs": {...}}` with one entry per rollout, plus a `pgenrm` object with the details.

- **User**: the label carries the user id: a string (or number) is the user id; a JSON object,
  or a string holding one, may give `user_id` and `reference` (a reference response).
  A user not in `--profiles` (or no label) gets the non-personalised judge (a profile with
  no history), flagged in `extra_logs.pgenrm_fallback` and listed in `pgenrm.unknown_users`.
- **Response**: `query` minus its `prompts` prefix, with trailing end-of-turn markers
  (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) removed. **Query judged**: the last user turn of
  the chat-templated prompt (ChatML, Llama 3, Gemma and `[INST]` layouts are recognised),
  else the whole prompt.
- **Reward** (the scheme of `pgenrm_lite.integrations._groups`): rollouts of one request with
  the same user and prompt form a group scored with `Scorer.score` (every pair compared,
  a rollout's reward is its mean final score over its pairs); a rollout alone in its group
  (what current OpenRLHF sends: one rollout per request) is compared with a reference
  response, the label's `reference` or else the server's `--reference` text, and its reward
  is its own final score in that comparison. Rewards are on the chains' 0-10 scale;
  `scores` (OpenRLHF's dynamic-filtering value) are rewards / 10. A rollout for which no
  chain parsed gets `unparsed_reward` (default: the middle of the scale, 5.0; 0.0 for
  bradley_terry), flagged in
  `extra_logs.pgenrm_unparsed`.
- `extra_logs` values are numeric lists, one entry per rollout (OpenRLHF turns each into a
  tensor): `pgenrm_fallback`, `pgenrm_grouped` (1 group, 0 reference), `pgenrm_group_size`,
  `pgenrm_unparsed`.

- With `group_reward="bradley_terry"` (`--group-reward bradley_terry`) a group's rewards are
  Bradley-Terry strengths from the pairs' verdicts (centred log-odds) and a lone rollout's
  reward is its strength against the reference; `scores` are then sigmoid(reward), the
  probability of beating an average response of its group. Each item's `reward_stderr`
  is in `pgenrm.items`.

Requests go to the model through a bounded queue served by one worker thread: a full queue
answers 503 with `Retry-After`. A body that is not JSON answers 400, wrong fields or lists
of different lengths 422, a body over `max_body_bytes` 413; every error is a JSON object
`{"error": "...", "request_id": "..."}` and the server keeps serving. `GET /health` reports
the queue.

**Access.** With a token (`token=`, or `--token-file FILE` / the `PGENRM_SERVER_TOKEN`
environment variable for the CLI) every route wants `Authorization: Bearer <token>` and
answers 401 otherwise, before reading the body; the token is compared in constant time and
never logged. Without a token the server only binds a loopback address unless told
`allow_insecure=True` (`--insecure`). OpenRLHF's clients send no Authorization header: keep
such a server on loopback, or put it behind a proxy that adds the header. Every request gets
an id (the client's `X-Request-ID` when it is a short token of letters, digits, `-` or `_`,
else a new one), answered in the `X-Request-ID` header and the body, and named in the log
line of each request (logger `pgenrm_lite.server`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import queue
import re
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Optional

import orjson

from ..errors import ConfigError, PgenrmError
from ..group_rewards import GroupMethod, check_method
from ..records import UserProfile
from ..scorer import MAX_RESPONSES
from . import non_personalised_user, profile_map
from ._groups import Item, score_items

try:  # the `serve` extra
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError("the reward server needs the `serve` extra: pip install 'pgenrm-lite[serve]' "
                      "(starlette and uvicorn)") from exc

DEFAULT_REFERENCE = "I'm sorry, but I can't help with that."
DEFAULT_QUEUE_SIZE = 64
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_UNPARSED_REWARD = {"mean": 5.0, "bradley_terry": 0.0}  # the middle of each method's scale
TOKEN_ENV = "PGENRM_SERVER_TOKEN"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
log = logging.getLogger("pgenrm_lite.server")
SCHEME = ("group: rollouts with the same user and prompt in one request are scored together with "
          "Scorer.score (all pairs compared; reward = mean final score over its pairs, 0-10); "
          "reference: a rollout alone is compared with a reference response (the label's 'reference', "
          "else the server's) and its reward is its own final score (0-10); scores = rewards / 10")

# Trailing end-of-turn markers that a decode with skip_special_tokens=False leaves on the response.
_TRAILING_MARKERS = re.compile(r"(?:\s*(?:<\|[A-Za-z0-9_]{1,40}\|>|</s>|<eos>|<end_of_turn>))+\s*\Z")
# The last user turn of common chat layouts: (opening marker, closing marker).
_USER_TURNS = (
    ("<|im_start|>user\n", "<|im_end|>"),  # ChatML (Qwen, SmolLM)
    ("<|start_header_id|>user<|end_header_id|>", "<|eot_id|>"),  # Llama 3
    ("<start_of_turn>user\n", "<end_of_turn>"),  # Gemma
    ("[INST]", "[/INST]"),  # Llama 2, Mistral
)


class RequestError(Exception):
    """A client error: answered with `status` and a JSON error message."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def judged_query(prompt: str) -> str:
    """The user's last turn in a chat-templated prompt; the prompt itself if no layout matches."""
    best: tuple[int, str] | None = None
    for start, end in _USER_TURNS:
        at = prompt.rfind(start)
        if at < 0:
            continue
        body = prompt[at + len(start):]
        stop = body.find(end)
        text = (body[:stop] if stop >= 0 else body).strip()
        if best is None or at > best[0]:
            best = (at, text)
    return best[1] if best and best[1] else prompt.strip()


def response_of(query: str, prompt: str) -> str:
    """The response inside OpenRLHF's `query` (prompt + response), end-of-turn markers removed."""
    if query.startswith(prompt):
        rest = query[len(prompt):]
    else:
        at = query.find(prompt.strip()) if prompt.strip() else -1
        if at < 0:
            raise ValueError("does not contain its prompt")
        rest = query[at + len(prompt.strip()):]
    return _TRAILING_MARKERS.sub("", rest).strip()


@dataclass
class _Label:
    user_id: Optional[str]
    reference: Optional[str]


def parse_label(label: Any, index: int) -> _Label:
    if label is None:
        return _Label(None, None)
    if isinstance(label, bool):
        raise RequestError(422, f"labels[{index}] must be a user id (string) or an object, got a boolean")
    if isinstance(label, (int, float)):
        return _Label(str(label), None)
    if isinstance(label, str):
        text = label.strip()
        if text.startswith("{"):
            try:
                label = orjson.loads(text)
            except orjson.JSONDecodeError:
                return _Label(label, None)
        else:
            return _Label(label if label else None, None)
    if isinstance(label, dict):
        uid, ref = label.get("user_id"), label.get("reference")
        if uid is not None and not isinstance(uid, (str, int)):
            raise RequestError(422, f"labels[{index}].user_id must be a string")
        if ref is not None and not isinstance(ref, str):
            raise RequestError(422, f"labels[{index}].reference must be a string")
        return _Label(None if uid is None else str(uid), ref)
    raise RequestError(422, f"labels[{index}] must be a user id (string) or an object, got {type(label).__name__}")


def _string_list(body: dict, key: str, required: bool) -> Optional[list]:
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(422, f"missing field '{key}': a list of strings")
        return None
    if not isinstance(value, list):
        raise RequestError(422, f"field '{key}' must be a list, got {type(value).__name__}")
    if key != "labels":
        for i, v in enumerate(value):
            if not isinstance(v, str):
                raise RequestError(422, f"{key}[{i}] must be a string, got {type(v).__name__}")
    return value


class RewardService:
    """The model side: validates a request body, queues it, scores it on one worker thread."""

    def __init__(self, scorer, profiles=None, *, queue_size: int = DEFAULT_QUEUE_SIZE,
                 reference: str = DEFAULT_REFERENCE, unparsed_reward: Optional[float] = None,
                 max_group: int = MAX_RESPONSES, group_reward: GroupMethod = "mean"):
        if queue_size < 1:
            raise ConfigError(f"queue_size must be >= 1, got {queue_size}")
        if not 2 <= max_group <= MAX_RESPONSES:
            raise ConfigError(f"max_group must be in 2..{MAX_RESPONSES}, got {max_group}")
        self.group_reward = check_method(group_reward)
        if unparsed_reward is None:
            unparsed_reward = DEFAULT_UNPARSED_REWARD[group_reward]
        if not math.isfinite(unparsed_reward):
            raise ConfigError("unparsed_reward must be a finite number")
        self.scorer = scorer
        self.profiles = profile_map(profiles)
        self.queue_size, self.reference = queue_size, reference
        self.unparsed_reward, self.max_group = float(unparsed_reward), max_group
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._busy = threading.Event()
        self._lock = threading.Lock()
        self.served = 0
        self.failed = 0
        self._job_seconds = 1.0  # running mean, for Retry-After

    # -- worker ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="pgenrm-reward-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        thread = self._thread
        if thread is None:
            return
        while True:  # fail what is still queued, then stop the worker
            try:
                _, fut = self._queue.get_nowait()
            except queue.Empty:
                break
            fut.set_exception(RequestError(503, "the server is shutting down"))
        self._queue.put(None)
        thread.join(timeout)
        self._thread = None

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            parsed, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            self._busy.set()
            t0 = time.perf_counter()
            try:
                fut.set_result(self.compute(parsed))
                with self._lock:
                    self.served += 1
            except BaseException as exc:  # handed to the request; the worker goes on
                with self._lock:
                    self.failed += 1
                fut.set_exception(exc)
            finally:
                elapsed = time.perf_counter() - t0
                self._job_seconds = 0.8 * self._job_seconds + 0.2 * elapsed
                self._busy.clear()

    def submit(self, parsed: dict) -> Future:
        fut: Future = Future()
        try:
            self._queue.put_nowait((parsed, fut))
        except queue.Full:
            wait = max(1, math.ceil(self._job_seconds * (self._queue.qsize() + 1)))
            raise RequestError(503, f"the reward queue is full ({self.queue_size} requests waiting); "
                                    f"retry in about {wait} s", headers={"Retry-After": str(wait)}) from None
        return fut

    def health(self) -> dict:
        s = self.scorer
        return {"status": "ok", "queue_depth": self._queue.qsize(), "queue_size": self.queue_size,
                "busy": self._busy.is_set(), "served": self.served, "failed": self.failed,
                "worker_alive": self._thread is not None and self._thread.is_alive(),
                "users": len(self.profiles), "n_samples": s.n_samples, "n_neighbors": s.n_neighbors,
                "seed": s.seed, "model": getattr(s.engine, "architecture", None)}

    # -- requests ----------------------------------------------------------------------

    def parse(self, body: Any) -> dict:
        """Validate an OpenRLHF request body; RequestError(422) names what is wrong."""
        if not isinstance(body, dict):
            raise RequestError(422, f"the body must be a JSON object with 'query', 'prompts' and 'labels', "
                                    f"got a JSON {type(body).__name__}")
        queries = _string_list(body, "query", True)
        prompts = _string_list(body, "prompts", True)
        assert queries is not None and prompts is not None  # required: never None
        labels = _string_list(body, "labels", False)
        if labels is None:
            labels = [None] * len(queries)
        if not (len(queries) == len(prompts) == len(labels)):
            raise RequestError(422, f"'query', 'prompts' and 'labels' must have the same length, got "
                                    f"{len(queries)}, {len(prompts)} and {len(labels)}")
        rows = []
        for i, (q, p, lab) in enumerate(zip(queries, prompts, labels)):
            try:
                response = response_of(q, p)
            except ValueError:
                raise RequestError(422, f"query[{i}] does not start with (or contain) prompts[{i}]; OpenRLHF "
                                        "sends query = prompt + response") from None
            rows.append((judged_query(p), p, response, parse_label(lab, i)))
        return {"rows": rows}

    def compute(self, parsed: dict) -> dict:
        t0 = time.perf_counter()
        items, known, sources = [], [], []
        for query, prompt, response, label in parsed["rows"]:
            user: UserProfile | None = self.profiles.get(label.user_id) if label.user_id is not None else None
            known.append(user is not None)
            if user is None:
                user = non_personalised_user(label.user_id)
            ref = label.reference if label.reference is not None else self.reference
            sources.append("label" if label.reference is not None else "server")
            items.append(Item(group_key=(user.user_id, known[-1], prompt), user=user, query=query,
                              response=response, reference=ref))
        outcomes = score_items(self.scorer, items, max_group=self.max_group, method=self.group_reward)
        rewards: list[float] = []
        unparsed: list[float] = []
        details: list[dict[str, Any]] = []
        for item, outcome, is_known, source in zip(items, outcomes, known, sources):
            r = outcome.reward
            bad = r is None or math.isnan(r)
            rewards.append(self.unparsed_reward if r is None or bad else float(r))
            unparsed.append(1.0 if bad else 0.0)
            details.append({"user_id": item.user.user_id, "personalised": is_known, "scheme": outcome.scheme,
                            "group_size": outcome.group_size,
                            "reference_source": source if outcome.scheme == "reference" else None,
                            "reference_score": outcome.reference_score, "reward_parsed": not bad,
                            "reward_stderr": _finite_or_none(outcome.stderr)})
        if self.group_reward == "mean":
            scores = [min(1.0, max(0.0, r / 10.0)) for r in rewards]
        else:
            scores = [1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, r)))) for r in rewards]
        extra_logs = {
            "pgenrm_fallback": [0.0 if k else 1.0 for k in known],
            "pgenrm_grouped": [1.0 if o.scheme == "group" else 0.0 for o in outcomes],
            "pgenrm_group_size": [float(o.group_size) for o in outcomes],
            "pgenrm_unparsed": unparsed,
        }
        unknown = sorted({d["user_id"] for d in details if not d["personalised"]})
        return {"rewards": rewards, "scores": scores, "extra_logs": extra_logs,
                "pgenrm": {"scheme": SCHEME, "group_reward": self.group_reward, "items": details,
                           "unknown_users": unknown,
                           "fallback": "non-personalised judge (a profile with no history)",
                           "unparsed_reward": self.unparsed_reward, "n_samples": self.scorer.n_samples,
                           "n_neighbors": self.scorer.n_neighbors, "seed": self.scorer.seed,
                           "elapsed_s": round(time.perf_counter() - t0, 4)}}


def _finite_or_none(x: Optional[float]) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(x) else None


def _error(status: int, message: str, request_id: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status, "request_id": request_id}, status_code=status,
                        headers={**(headers or {}), "X-Request-ID": request_id})


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else secrets.token_hex(8)


def _authorized(request: Request, token: Optional[str]) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Compared as bytes in constant time; a wrong length or scheme fails the same way.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def check_token(token: Optional[str]) -> Optional[str]:
    """None, or a token fit for a header: 16 to 4096 visible ASCII characters without spaces."""
    if token is None:
        return None
    if not isinstance(token, str) or not 16 <= len(token) <= 4096 or not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError("the server token must be 16 to 4096 visible ASCII characters without spaces "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if n > limit:
            raise RequestError(413, f"the body has {n} bytes; the limit is {limit} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body exceeds the limit of {limit} bytes (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _guarded(handler, token: Optional[str]):
    """An endpoint running `handler(request, request_id)` after the token check; every error becomes a
    JSON error response, and every request one log line with its id."""
    async def endpoint(request: Request) -> Response:
        rid = _request_id(request)
        t0 = time.perf_counter()
        if not _authorized(request, token):
            response = _error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                              rid, {"WWW-Authenticate": 'Bearer realm="pgenrm-lite"'})
        else:
            try:
                response = await handler(request, rid)
            except RequestError as exc:
                response = _error(exc.status, exc.message, rid, exc.headers)
            except PgenrmError as exc:  # e.g. a text over the size limit, a prompt that cannot fit the context
                response = _error(422, str(exc), rid)
            except Exception as exc:  # the server keeps serving
                log.exception("request_id=%s internal error", rid)
                response = _error(500, f"internal error: {type(exc).__name__}: {exc}", rid)
            response.headers["X-Request-ID"] = rid
        log.info("request_id=%s %s %s status=%d %.3fs", rid, request.method, request.url.path,
                 response.status_code, time.perf_counter() - t0)
        return response
    return endpoint


def create_app(scorer, profiles=None, *, queue_size: int = DEFAULT_QUEUE_SIZE,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, reference: str = DEFAULT_REFERENCE,
               unparsed_reward: Optional[float] = None, max_group: int = MAX_RESPONSES,
               group_reward: GroupMethod = "mean", token: Optional[str] = None) -> Starlette:
    """The ASGI app. The worker thread starts with the app's lifespan and stops with it."""
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    token = check_token(token)
    service = RewardService(scorer, profiles, queue_size=queue_size, reference=reference,
                            unparsed_reward=unparsed_reward, max_group=max_group, group_reward=group_reward)

    async def get_reward(request: Request, rid: str) -> Response:
        raw = await _read_body(request, max_body_bytes)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        parsed = service.parse(body)
        if not parsed["rows"]:
            return JSONResponse({"rewards": [], "scores": [], "extra_logs": {},
                                 "pgenrm": {"scheme": SCHEME, "request_id": rid}})
        result = await asyncio.wrap_future(service.submit(parsed))
        result["pgenrm"]["request_id"] = rid
        return Response(orjson.dumps(result), media_type="application/json")

    async def health(request: Request, rid: str) -> Response:
        return JSONResponse(service.health())

    async def not_found(request: Request, exc) -> Response:
        rid = _request_id(request)
        if not _authorized(request, token):
            return _error(401, "missing or wrong bearer token", rid)
        return _error(getattr(exc, "status_code", 404), getattr(exc, "detail", "not found") or "not found", rid)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = Starlette(routes=[Route("/get_reward", _guarded(get_reward, token), methods=["POST"]),
                            Route("/health", _guarded(health, token), methods=["GET"])],
                    exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.service = service
    return app


def serve(scorer, profiles=None, *, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info",
          token: Optional[str] = None, allow_insecure: bool = False, **options) -> None:
    """Run the server until interrupted (uvicorn). Without a token, only a loopback `host` is allowed
    unless `allow_insecure`."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError("the reward server needs the `serve` extra: pip install 'pgenrm-lite[serve]'") from exc
    check_bind(host, token, allow_insecure)
    app = create_app(scorer, profiles, token=token, **options)
    if not log.handlers:  # one line per request, with its id, beside uvicorn's own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s pgenrm-lite %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)


def check_bind(host: str, token: Optional[str], allow_insecure: bool) -> None:
    """Refuse to expose an unauthenticated reward server beyond this machine unless told to."""
    if token is None and not allow_insecure and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host} without a token: anyone who can reach it could read "
                          f"rewards and fill the queue. Set a token ({TOKEN_ENV}=... or --token-file FILE), "
                          "bind 127.0.0.1, or pass --insecure (allow_insecure=True) if the network is trusted")


__all__ = ["create_app", "serve", "RewardService", "judged_query", "response_of", "DEFAULT_REFERENCE",
           "check_bind", "check_token", "TOKEN_ENV"]
