"""Results from a call's samples, as pure functions: the scaling formula per pair, confidence,
abstention, what was cut to fit, timing; and a group's rewards from its pairs' results."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from . import group_rewards, protocol, scaling
from .engine import GenerationStats
from .group_rewards import GroupMethod
from .options import ScorerOptions
from .prompt_fitting import PreparedPrompts
from .prototype_level import PersonaSource
from .records import (CompareResult, Confidence, GroupScores, LevelConfidence, NeighborScore, Sample, Timing,
                      UserProfile)
from .sample_jobs import Pair, PromptKey, SampleJob, SampleOutput


@dataclass(frozen=True)
class CallRecord:
    """What every pair's result of one call shares."""

    options: ScorerOptions  # resolved against the contract
    contract: str
    seed: int
    neighbors: Sequence[tuple[UserProfile, float]]
    prompts: dict[PromptKey, PreparedPrompts]
    stats: Optional[GenerationStats]
    total_s: float
    notes: tuple[str, ...] = ()
    persona_from: Optional[PersonaSource] = None


def assemble_result(pair: Pair, drawn: Sequence[tuple[SampleJob, SampleOutput]], call: CallRecord) -> CompareResult:
    """The reward for one pair from its samples (`drawn`, in job order) and the call's shared record."""
    options = call.options
    samples = [_sample(job, output) for job, output in drawn]
    self_scores = [_scores(sample) for sample in samples if sample.kind == "self"]
    neighbor_scores = [_scores(sample) for sample in samples if sample.kind == "neighbor"]
    final = scaling.combine(self_scores, neighbor_scores, c_self=options.c_self, c_nb=options.c_nb)
    score_a, score_b = final if final is not None else (None, None)
    notes = list(call.notes)
    n_fallback = sum(1 for _, output in drawn
                     if options.expected_scores and output.chain is not None and output.expected_scores is None)
    if n_fallback:
        notes.append(f"{n_fallback} parsed chain(s) had no digit distributions for their final scores (not in "
                     "the grammar's form); their sampled scores were used")
    confidence = confidence_of(samples, with_prototype=options.n_neighbors > 0)
    preferred, abstained = _verdict(score_a, score_b, confidence, options.min_confidence, notes)
    own_prompts = call.prompts.get(PromptKey(None, pair))
    n_parsed = sum(1 for sample in samples if sample.chain is not None)
    return CompareResult(
        preferred=preferred, abstained=abstained, confidence=confidence,  # type: ignore[arg-type]
        score_a=score_a, score_b=score_b,
        chains=[sample.chain for sample in samples if sample.chain is not None], samples=samples, n_parsed=n_parsed,
        n_failed=len(samples) - n_parsed, seed=call.seed, n_samples=options.n_samples,
        n_neighbors=options.n_neighbors, c_self=options.c_self, c_nb=options.c_nb,
        expected_scores=options.expected_scores, contract=call.contract,  # type: ignore[arg-type]
        candidate_order=options.candidate_order, history_order=options.history_order,  # type: ignore[arg-type]
        temperature=options.temperature, max_tokens=options.max_tokens, constrained=options.constrained,
        neighbors=_neighbor_scores(samples, call.neighbors),
        history_shown=own_prompts.history_shown if own_prompts else 0,
        persona_mode=options.persona_mode if options.n_neighbors > 0 else None, persona_from=call.persona_from,
        context_policy=_context_policy(pair, call.prompts), notes=notes + (call.stats.notes if call.stats else []),
        timing=_timing(call.stats, call.total_s), options=options.for_result(call.seed))


def _sample(job: SampleJob, output: SampleOutput) -> Sample:
    """A sample's record; its scores are for (A, B), read from the digits where asked and available."""
    scores: Optional[tuple[float, float]] = None
    readout: Literal["sampled", "expected"] = "sampled"
    if output.chain is not None:
        if output.expected_scores is not None:
            shown = output.expected_scores
            scores, readout = ((shown[1], shown[0]) if job.swapped else shown), "expected"
        else:
            scores = protocol.scores_for_candidates(output.chain, job.swapped)
    return Sample(kind=job.kind, user_id=job.owner.user_id, seed=job.seed, swapped=job.swapped,
                  n_tokens=output.n_tokens, chain=output.chain, error=output.error, readout=readout,
                  score_a=scores[0] if scores else None, score_b=scores[1] if scores else None)


def _scores(sample: Sample) -> Optional[tuple[float, float]]:
    """A sample's (A, B) scores, None when it did not parse (left out of its level's mean)."""
    if sample.chain is None or sample.score_a is None or sample.score_b is None:
        return None
    return sample.score_a, sample.score_b


def _verdict(score_a: Optional[float], score_b: Optional[float], confidence: Confidence,
             min_confidence: Optional[float], notes: list[str]) -> tuple[Optional[str], bool]:
    """(preferred, abstained): a side fewer than `min_confidence` of the parsed chains prefer is withdrawn."""
    preferred = scaling.decide(score_a, score_b)
    if preferred is None or min_confidence is None:
        return preferred, False
    share = confidence.overall.prefer_a if preferred == "a" else confidence.overall.prefer_b
    if share is not None and share >= min_confidence:
        return preferred, False
    notes.append(f"abstained: {share or 0:.0%} of the parsed chains prefer {preferred}, "
                 f"below min_confidence={min_confidence:g}")
    return None, True


def _neighbor_scores(samples: Sequence[Sample], neighbors: Sequence[tuple[UserProfile, float]]) -> list[NeighborScore]:
    """Each neighbour's mean (A, B) over its parsed samples, in the order they were drawn."""
    similarity = {member.user_id: sim for member, sim in neighbors}
    by_user: dict[str, list] = {}
    for sample in samples:
        if sample.kind == "neighbor":
            by_user.setdefault(sample.user_id, []).append(_scores(sample))
    records = []
    for user_id, scores in by_user.items():
        mean = scaling.mean_pair(scores)
        records.append(NeighborScore(user_id=user_id, similarity=similarity.get(user_id, 0.0),
                                     score_a=mean[0] if mean else None, score_b=mean[1] if mean else None))
    return records


def _context_policy(pair: Pair, prompts: dict[PromptKey, PreparedPrompts]) -> list[str]:
    """What was cut to fit the window: the user's own prompts first, then the neighbours'."""
    own = prompts.get(PromptKey(None, pair))
    policy = list(own.policy) if own else []
    for key, prepared in prompts.items():
        if key.neighbor_id is not None and key.pair == pair:
            policy.extend(prepared.policy)
    return policy


def _timing(stats: Optional[GenerationStats], total_s: float) -> Timing:
    if stats is None:
        return Timing(total_s=total_s)
    return Timing(prompt_s=stats.prompt_s, decode_s=stats.decode_s, total_s=total_s,
                  n_prompt_tokens=stats.n_prompt_tokens, n_generated_tokens=stats.n_generated_tokens,
                  n_groups=stats.n_groups, n_cached_tokens=stats.n_cached_tokens, cache_hits=stats.cache_hits,
                  cache_misses=stats.cache_misses, cache_evicted=stats.cache_evicted)


def confidence_of(samples: Sequence[Sample], *, with_prototype: bool) -> Confidence:
    """Per-level confidence from the parsed samples' scores and the order each saw."""
    def level(*kinds: str) -> LevelConfidence:
        return LevelConfidence(**scaling.level_confidence(
            [((sample.score_a, sample.score_b), sample.swapped) for sample in samples
             if sample.kind in kinds and sample.score_a is not None and sample.score_b is not None]))

    return Confidence(overall=level("self", "neighbor"), individual=level("self"),
                      prototype=level("neighbor") if with_prototype else None)


def combine_stats(first: Optional[GenerationStats], second: Optional[GenerationStats]) -> Optional[GenerationStats]:
    """Two batches' statistics summed, as a new record (neither argument changes)."""
    if first is None or second is None:
        return first if second is None else second
    summed = {f.name: getattr(first, f.name) + getattr(second, f.name) for f in dataclasses.fields(first)}
    return GenerationStats(**summed)


def assemble_group(pairs: Sequence[Pair], results: Sequence[CompareResult], n_responses: int, *,
                   method: GroupMethod, prior_sd: float, options: ScorerOptions, seed: int) -> GroupScores:
    """One reward per response from its pairs' results (see `group_rewards`)."""
    shares = [_win_share(result, options) for result in results]
    if method == "mean":
        rewards, stderr = group_rewards.mean_rewards(
            n_responses, [(i, j, result.score_a, result.score_b) for (i, j), result in zip(pairs, results)
                          if result.score_a is not None and result.score_b is not None])
    else:
        rewards, stderr = group_rewards.bradley_terry(
            n_responses, [(i, j, share) for (i, j), share in zip(pairs, shares) if share is not None],
            prior_sd=prior_sd)
    return GroupScores(rewards=rewards, stderr=stderr, method=method,
                       prior_sd=prior_sd if method == "bradley_terry" else None, pairs=list(pairs),
                       win_share=shares, comparisons=list(results),
                       n_pairs_parsed=sum(result.score_a is not None for result in results), seed=seed,
                       n_samples=options.n_samples, n_neighbors=options.n_neighbors,
                       options=options.for_result(seed))


def _win_share(result: CompareResult, options: ScorerOptions) -> Optional[float]:
    """The weighted share of a pair's parsed chains preferring its first response (see `group_rewards`)."""
    return group_rewards.win_share([(sample.score_a, sample.score_b, sample.kind == "neighbor")
                                    for sample in result.samples
                                    if sample.score_a is not None and sample.score_b is not None],
                                   c_self=options.c_self, c_nb=options.c_nb)
