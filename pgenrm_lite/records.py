"""The records that cross the library's boundary, as pydantic models.

These names and fields are the public contract. JSON goes through orjson.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import RecordError

# Documented size limits: a record above them is refused rather than silently cut.
MAX_TEXT_CHARS = 200_000
MAX_HISTORY_PAIRS = 10_000
MAX_USER_ID_CHARS = 256
MAX_SEED = 2 ** 64 - 1  # what a result (JSON, u64) can record


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any):
        # Construction in code gets the same typed error as parsing JSON.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise RecordError(f"{type(self).__name__}: {_describe(exc)}") from exc

    @classmethod
    def from_json(cls, data: bytes | str):
        """Parse and validate JSON; any failure is a `RecordError` naming the problem."""
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RecordError(f"{cls.__name__}: not valid JSON ({exc}); "
                              "pass a JSON object as written by .to_json()") from exc
        return cls.validate_obj(obj)

    @classmethod
    def validate_obj(cls, obj: Any):
        if not isinstance(obj, (dict, cls)):
            raise RecordError(f"{cls.__name__}: expected a JSON object, got {_json_type(obj)}")
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            # Validation runs our __init__, which already raised a RecordError: pass it on unwrapped.
            inner = [e.get("ctx", {}).get("error") for e in exc.errors()]
            if len(inner) == 1 and isinstance(inner[0], RecordError):
                raise inner[0] from None
            raise RecordError(f"{cls.__name__}: {_describe(exc)}") from exc

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"))


def _json_type(obj: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return names.get(type(obj), f"a {type(obj).__name__}")


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"field '{loc}': {err.get('msg')}")
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


Text = Field(max_length=MAX_TEXT_CHARS)


class Preference(_Record):
    """One past preference pair of a user: the first user turn, the chosen and the rejected reply."""

    prompt: str = Text
    chosen: str = Text
    rejected: str = Text


class UserProfile(_Record):
    """A user: their preference history and, optionally, stated preferences (free text)."""

    user_id: str = Field(min_length=1, max_length=MAX_USER_ID_CHARS)
    history: list[Preference] = Field(default_factory=list, max_length=MAX_HISTORY_PAIRS)
    stated_preferences: Optional[str] = Field(default=None, max_length=MAX_TEXT_CHARS)
    # A persona text already derived for this user (prototype members may carry only this).
    persona: Optional[str] = Field(default=None, max_length=MAX_TEXT_CHARS)


class Criterion(_Record):
    """One personalised criterion of a chain: its weight (percent) and both responses' 1-10 scores.

    `weight` is normalised so a chain's weights sum to 100; `raw_weight` is the number the
    model wrote (they differ when the written weights did not sum to 100).
    """

    name: str
    weight: float
    raw_weight: Optional[float] = None
    scores: tuple[Optional[float], Optional[float]] = (None, None)


class EvaluationChain(_Record):
    """One parsed evaluation chain. `final_scores` are for Response 1 and 2 *as shown in the prompt*."""

    analysis: str
    criteria: list[Criterion] = Field(default_factory=list)
    final_scores: tuple[float, float]
    raw: str
    # The official contract's rationale, one string; the criteria above are read from it when
    # it follows the criteria-and-weights / scoring-breakdown layout.
    rationale: Optional[str] = None
    # The criteria's weights as written, summed; not 100 means `weight` was normalised.
    weights_sum: Optional[float] = None

    @property
    def weights_normalised(self) -> bool:
        return self.weights_sum is not None and abs(self.weights_sum - 100.0) > 0.5

    @field_validator("final_scores")
    @classmethod
    def _finite(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("final scores must be finite numbers")
        return v


class Sample(_Record):
    """One generated sample: which history it used, how the candidates were ordered, what came out."""

    kind: Literal["self", "neighbor"]
    user_id: str
    seed: int
    swapped: bool  # True when response B was shown as Response 1
    n_tokens: int
    chain: Optional[EvaluationChain] = None
    error: Optional[str] = None  # why the sample failed to parse, when it did
    score_a: Optional[float] = None
    score_b: Optional[float] = None
    # "expected": score_a/score_b are the digit-expectation read-out of the chain's final
    # scores; "sampled": they are the numbers the chain wrote (chain.final_scores).
    readout: Literal["sampled", "expected"] = "sampled"


class NeighborScore(_Record):
    user_id: str
    similarity: float
    score_a: Optional[float]
    score_b: Optional[float]


class LevelConfidence(_Record):
    """How the parsed chains of one level lean (see `scaling.level_confidence`)."""

    n_chains: int = 0
    prefer_a: Optional[float] = None  # share of the chains whose score_a > score_b
    prefer_b: Optional[float] = None
    ties: Optional[float] = None
    diff_mean: Optional[float] = None  # mean of score_a - score_b over the chains
    diff_ci95: Optional[tuple[float, float]] = None  # 95% t-interval of that mean (2+ chains)
    order_consistent: Optional[bool] = None  # chains that saw A first and B first lean alike


class Confidence(_Record):
    """How sure the verdict is: all parsed chains, and each level of the scaling separately."""

    overall: LevelConfidence
    individual: LevelConfidence
    prototype: Optional[LevelConfidence] = None  # with n_neighbors > 0


class Timing(_Record):
    prompt_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    n_prompt_tokens: int = 0  # evaluated; a prefix shared by several prompts counts once
    n_generated_tokens: int = 0
    n_groups: int = 0  # decoding groups; >1 when the samples did not fit the context together
    # Prompt-prefix cache (system messages): prompt tokens restored instead of evaluated, and
    # distinct prefixes restored (hits), evaluated (misses), entries evicted during the call.
    n_cached_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_evicted: int = 0


class CompareResult(_Record):
    """The reward for one pair for one user, with everything needed to reproduce it."""

    preferred: Optional[Literal["a", "b"]]
    score_a: Optional[float]
    score_b: Optional[float]
    chains: list[EvaluationChain]
    samples: list[Sample] = Field(default_factory=list)
    n_parsed: int
    n_failed: int
    seed: int
    n_samples: int
    n_neighbors: int
    c_self: float = 0.5
    c_nb: float = 0.5
    expected_scores: bool = False  # final scores read as digit expectations (Scorer option)
    # How the chains were asked for (with seed and counts, what reproduces the result).
    contract: Literal["structured", "official"] = "structured"
    candidate_order: Literal["sample", "item"] = "sample"  # drawn per sample, or once per pair
    history_order: Literal["original", "sampled"] = "original"
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    constrained: Optional[bool] = None
    neighbors: list[NeighborScore] = Field(default_factory=list)
    history_shown: int = 0
    context_policy: list[str] = Field(default_factory=list)  # what was cut to fit the window
    notes: list[str] = Field(default_factory=list)  # e.g. samples ran in groups, persona fallback
    timing: Timing = Field(default_factory=Timing)
    confidence: Optional[Confidence] = None
    # With Scorer(min_confidence=...): a verdict whose side fewer than that share of the parsed
    # chains prefer is withdrawn (preferred None, scores kept) and counted as an abstention.
    abstained: bool = False
    # With n_neighbors > 0: whose persona text found the neighbours. persona_mode "cached"
    # reuses the first persona parsed for the user, "query" takes this call's first parsed
    # chain (the official pipeline); persona_from says where the text came from this time:
    # "profile", "history", "cache", "chain" or "history-fallback" (no chain parsed).
    persona_mode: Optional[Literal["cached", "query"]] = None
    persona_from: Optional[Literal["profile", "history", "cache", "chain", "history-fallback"]] = None
    # Every option that can change the numbers, as `ScorerOptions` names them (with this call's
    # seed): `Scorer.from_bundle(path, ScorerOptions(**result.options))` asks for the same chains.
    options: Optional[dict[str, Any]] = None

    @property
    def is_decision(self) -> bool:
        return self.preferred is not None


class GroupScores(_Record):
    """One reward per response of a group, from all its pairwise comparisons (`Scorer.score_group`).

    `method` says how (see `pgenrm_lite.group_rewards`): "mean" rewards are mean final
    scores on the 0-10 scale; "bradley_terry" rewards are centred log-odds strengths,
    comparable within the group only. NaN where no comparison of the response parsed.
    """

    rewards: list[float]
    stderr: list[float]  # per response: Laplace (bradley_terry) or spread over its pairs (mean); NaN if unknown
    method: Literal["mean", "bradley_terry"]
    prior_sd: Optional[float] = None  # bradley_terry's prior on the strengths
    pairs: list[tuple[int, int]]  # (i, j) of each comparison, in `comparisons` order
    win_share: list[Optional[float]]  # per pair: weighted share of parsed chains preferring i (ties half)
    comparisons: list[CompareResult]
    n_pairs_parsed: int
    seed: int
    n_samples: int
    n_neighbors: int
    options: Optional[dict[str, Any]] = None  # as in CompareResult.options


# -- bundle manifest (the one definition of its schema) -----------------------------------

MANIFEST_SCHEMA_VERSION = 1


class _Loose(_Record):
    # Manifest parts tolerate fields added by newer minor writers.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ManifestFile(_Loose):
    path: str  # relative to the bundle directory, '/'-separated
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class LLMInfo(_Loose):
    file: str
    architecture: str
    context_length: int
    has_chat_template: bool
    file_type: Optional[str] = None
    # A chat template file in the bundle that replaces the GGUF file's own (Jinja text).
    chat_template_file: Optional[str] = None
    n_params: Optional[int] = None


class EmbedderInfo(_Loose):
    dir: str
    model_file: str
    tokenizer_file: str
    dimension: int = Field(gt=0)
    pooling: str
    normalized: bool
    max_length: int = Field(gt=0)
    # Instruction the embedder wants before query texts (e.g. Qwen3-Embedding's); None: none.
    query_prefix: Optional[str] = None


class RefinementInfo(_Loose):
    """How the prototypes were refined (`python -m export prototypes --refine`) and the arrays file
    the runtime reads to place a query user among the refined members (see `refinement`)."""

    file: str
    epochs: int = Field(ge=1)
    lr: float
    weight_decay: float
    ema: float
    batch_size: int = Field(ge=1)
    max_targets: int = Field(ge=1)  # training targets per member, at most
    history_pairs: int = Field(ge=1)  # history items a member's (and a query user's) vector reads
    seed: int = 0
    n_examples: int = Field(ge=0)
    loss_before: Optional[float] = None  # mean pairwise logistic loss over the training targets
    loss_after: Optional[float] = None
    moved: int = Field(ge=0, default=0)  # members whose prototype changed when reassigned


class PrototypeInfo(_Loose):
    count: int = Field(ge=1)
    n_members: int = Field(ge=0)
    dimension: int = Field(gt=0)
    centroids_file: str
    members_index_file: str
    members_file: str
    assignments_file: str
    ef: int = Field(ge=1)
    persona_source: Literal["llm", "history"]
    members_carry: Literal["history", "persona"]
    seed: int = 0
    # "user": one member per user; "chain": one per history item, with that item's own shown
    # history (the paper's), ids "<user_id>#<item>".
    granularity: Literal["user", "chain"] = "user"
    refinement: Optional[RefinementInfo] = None


class Manifest(_Loose):
    schema_version: int
    created_by: str = "pgenrm-lite"
    files: list[ManifestFile]
    llm: LLMInfo
    template: dict[str, str]
    embedder: Optional[EmbedderInfo] = None
    prototypes: Optional[PrototypeInfo] = None
    # Scorer options recommended for this model (e.g. a shorter analysis for a small model);
    # arguments given to Scorer.from_bundle take precedence.
    defaults: dict[str, Any] = Field(default_factory=dict)
