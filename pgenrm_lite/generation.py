"""What a generate call asks for and what it returns, and the prompt-cell arithmetic they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Request:
    """One prompt (already tokenized) and the seeds of the samples to draw from it."""

    tokens: tuple[int, ...]
    seeds: tuple[int, ...]
    # The first prefix_len tokens are evaluated (or restored from the prefix cache) as their
    # own span; 0: no cacheable prefix, the prompt shares prefixes with earlier ones as found.
    prefix_len: int = 0
    # Whose text the prefix holds (a user id), so a prefix cache can forget it; "" for nobody.
    owner: str = ""
    # With a cacheable prefix: the first shared_len tokens (>= prefix_len) are ones other prompts
    # of the same call may share (e.g. the user's query, which both candidate orders hold). They
    # are evaluated once per group as their own span after the prefix (a later request with the
    # same first shared_len tokens copies those cells), so like the prefix, the layout is decided
    # by the call's requests alone, never by the cache. 0: no such span.
    shared_len: int = 0


@dataclass
class Completion:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of generation) or "length" (max_tokens reached)
    seed: int
    # With SamplingParams.digit_probs: for each generated digit, its character offset in
    # `text` and the sampling distribution over "0".."9" at that step (grammar applied).
    digit_probs: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # At the first digit of a number, where "1" could open "10": P(the next token is "0" | "1").
    ten_probs: dict[int, float] = field(default_factory=dict)


@dataclass
class GenerationStats:
    prompt_s: float = 0.0
    decode_s: float = 0.0
    n_prompt_tokens: int = 0  # tokens actually evaluated (shared prefixes counted once)
    n_generated_tokens: int = 0
    n_groups: int = 0  # >1 when the samples did not fit the context together
    notes: list[str] = field(default_factory=list)
    n_cached_tokens: int = 0  # prompt tokens restored from the prefix cache instead of evaluated
    cache_hits: int = 0  # distinct prefixes restored from the cache
    cache_misses: int = 0  # distinct prefixes evaluated
    cache_evicted: int = 0  # cache entries dropped during the call to stay within the budget


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    min_p: float = 0.0
    grammar: str | None = None
    digit_probs: bool = False  # record the digit distribution wherever a digit is drawn


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prompt_cells(requests: Sequence[Request]) -> int:
    """Cells the prompts occupy: a cacheable prefix (and a call-shared span) is shared only with
    requests of the same one; a prompt without one reuses its longest prefix with an earlier prompt."""
    seen: list[tuple[int, ...]] = []
    prefixes: set[tuple[int, ...]] = set()
    spans: set[tuple[int, ...]] = set()
    total = 0
    for r in requests:
        if r.prefix_len:
            prefix, span = r.tokens[:r.prefix_len], r.tokens[:r.shared_len]
            reused = r.shared_len if r.shared_len and span in spans else r.prefix_len if prefix in prefixes else 0
            total += len(r.tokens) - reused
            prefixes.add(prefix)
            if r.shared_len:
                spans.add(span)
        else:
            shared = max((common_prefix(r.tokens, s) for s in seen), default=0)
            total += len(r.tokens) - min(shared, len(r.tokens) - 1)
        seen.append(r.tokens)
    return total
