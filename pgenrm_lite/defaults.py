"""Where the embedded default bundle lives, and the example user base shipped with the package."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ENV_BUNDLE = "PGENRM_LITE_BUNDLE"


def default_bundle_dir() -> Path:
    """$PGENRM_LITE_BUNDLE, else $XDG_CACHE_HOME/pgenrm-lite/default-bundle (~/.cache by default)."""
    if os.environ.get(ENV_BUNDLE):
        return Path(os.environ[ENV_BUNDLE]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pgenrm-lite" / "default-bundle"


def example_users_path() -> Path:
    return Path(str(resources.files("pgenrm_lite").joinpath("data/example_users.jsonl")))
