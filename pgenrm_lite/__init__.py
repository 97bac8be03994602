"""pgenrm-lite: an embeddable runtime for P-GenRM personalised generative reward models.

    from pgenrm_lite import Scorer, UserProfile, Preference
    with Scorer.from_bundle("bundle/", n_samples=8) as scorer:
        result = scorer.compare(user, prompt, response_a, response_b)
"""

from .errors import (BundleError, BundleIntegrityError, BundleVersionError, ChainParseError, ConfigError,
                     ContextOverflowError, DataFormatError, EmbedderError, EngineError, PgenrmError,
                     PrototypeIndexError, RecordError)
from .records import (CompareResult, Criterion, EvaluationChain, GroupScores, NeighborScore, Preference, Sample,
                      UserProfile)
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scorer import Scorer


def __getattr__(name: str):
    # The Scorer loads llama.cpp; importing it on first use lets `pgenrm_lite.bundle` (verify a
    # bundle), records and the pure modules be used without the native library.
    if name == "Scorer":
        from .scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'pgenrm_lite' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Scorer",
    "Preference", "UserProfile", "Criterion", "EvaluationChain", "CompareResult", "GroupScores", "Sample",
    "NeighborScore",
    "PgenrmError", "ConfigError", "RecordError", "DataFormatError", "ChainParseError", "ContextOverflowError",
    "EngineError", "EmbedderError", "PrototypeIndexError", "BundleError", "BundleVersionError",
    "BundleIntegrityError",
]
