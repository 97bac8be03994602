"""The samples of a call as typed records: which history each shows, its seed and candidate order,
what came out; and drawing them all from the engine in one batch.

Seeds are derived from the call's seed and the sample's place (`protocol.derive_seed`), so a
sample's draw does not depend on which other samples share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, Sequence

from . import protocol
from .engine import Completion, GenerationStats, Request, SamplingParams
from .errors import ChainParseError
from .prompt_fitting import PreparedPrompts
from .records import EvaluationChain, UserProfile

JobKind = Literal["self", "neighbor"]
Pair = tuple[int, int]  # indices of two candidates in the call's responses
CandidateOrder = Literal["sample", "item"]


class PromptKey(NamedTuple):
    """Whose history a prompt shows (None: the scored user's own) for which candidate pair."""

    neighbor_id: Optional[str]
    pair: Pair


@dataclass(frozen=True)
class SampleJob:
    """One sample to draw: the history owner, the pair, its seed and which candidate is shown first."""

    kind: JobKind
    owner: UserProfile
    pair: Pair
    seed: int
    swapped: bool  # Response 1 shows the pair's second candidate
    similarity: float = 1.0  # a neighbour's cosine similarity to the user

    @property
    def prompt_key(self) -> PromptKey:
        return PromptKey(self.owner.user_id if self.kind == "neighbor" else None, self.pair)


class SampleOutput(NamedTuple):
    """What one sample gave: a parsed chain or the reason it failed, and its digit read-out."""

    chain: Optional[EvaluationChain]
    error: Optional[str]
    n_tokens: int
    expected_scores: Optional[tuple[float, float]]  # final scores as digit expectations, as shown


def is_swapped(candidate_order: CandidateOrder, sample_seed: int, seed: int, pair: Pair) -> bool:
    """Whether Response 1 shows the pair's second candidate: drawn per sample, or once per item."""
    if candidate_order == "item":
        return protocol.is_swapped(protocol.derive_seed(seed, "item-order", pair))
    return protocol.is_swapped(sample_seed)


def self_jobs(user: UserProfile, pairs: Sequence[Pair], n_samples: int, seed: int,
              candidate_order: CandidateOrder) -> list[SampleJob]:
    """The individual level: `n_samples` samples per pair with the user's own history."""
    jobs = []
    for pair in pairs:
        for index in range(n_samples):
            sample_seed = protocol.derive_seed(seed, "self", index, pair)
            jobs.append(SampleJob("self", user, pair, sample_seed,
                                  is_swapped(candidate_order, sample_seed, seed, pair)))
    return jobs


def neighbor_jobs(neighbors: Sequence[tuple[UserProfile, float]], pairs: Sequence[Pair], seed: int,
                  candidate_order: CandidateOrder) -> list[SampleJob]:
    """The prototype level: one sample per (neighbour, pair) with the neighbour's history."""
    jobs = []
    for rank, (member, similarity) in enumerate(neighbors):
        for pair in pairs:
            sample_seed = protocol.derive_seed(seed, "neighbor", rank, pair)
            jobs.append(SampleJob("neighbor", member, pair, sample_seed,
                                  is_swapped(candidate_order, sample_seed, seed, pair), similarity))
    return jobs


def draw(engine, params: SamplingParams, jobs: Sequence[SampleJob], prompts: dict[PromptKey, PreparedPrompts],
         cache_owner: Callable[[SampleJob], str], expected_scores: bool
         ) -> tuple[list[SampleOutput], Optional[GenerationStats]]:
    """Generate every job's sample in one batched call (jobs sharing a prompt share a request); parse each.

    `prompts` must hold every job's prompt key; `cache_owner` names whose text a prompt's prefix holds.
    """
    if not jobs:
        return [], None
    jobs_by_prompt: dict[tuple[int, ...], list[int]] = {}
    owner_of: dict[tuple[int, ...], str] = {}
    prepared_of: dict[tuple[int, ...], PreparedPrompts] = {}
    for index, job in enumerate(jobs):
        prepared = prompts[job.prompt_key]
        tokens = prepared.tokens[job.swapped]
        jobs_by_prompt.setdefault(tokens, []).append(index)
        owner_of[tokens] = cache_owner(job)
        prepared_of[tokens] = prepared
    requests = [Request(tokens, tuple(jobs[i].seed for i in indices), prefix_len=prepared_of[tokens].prefix_len,
                        owner=owner_of[tokens], shared_len=prepared_of[tokens].shared_len)
                for tokens, indices in jobs_by_prompt.items()]
    completions, stats = engine.generate(requests, params)
    outputs: list[Optional[SampleOutput]] = [None] * len(jobs)
    for indices, request_completions in zip(jobs_by_prompt.values(), completions):
        for index, completion in zip(indices, request_completions):
            outputs[index] = parse_completion(completion, expected_scores)
    return outputs, stats  # type: ignore[return-value]


def parse_completion(completion: Completion, expected_scores: bool) -> SampleOutput:
    """A completion's chain (or why it failed) and, if asked, its final scores' digit expectations."""
    try:
        chain = protocol.parse_chain(completion.text)
    except ChainParseError as exc:
        reason = str(exc) if completion.finish_reason == "stop" else f"{exc} (hit max_tokens)"
        return SampleOutput(None, reason, completion.n_tokens, None)
    expected = (protocol.expected_final_scores(completion.text, completion.digit_probs, completion.ten_probs)
                if expected_scores else None)
    return SampleOutput(chain, None, completion.n_tokens, expected)
