"""The prototype level's look-up: which persona text finds a user's neighbours, and the neighbours.

The text embedded must match how the index was built: a persona given in the profile wins;
an index built from history text takes the history text; else the analysis (PART 1) of a
parsed own chain, the first one ever parsed for the user ("cached") or this call's first
("query", the official pipeline).
"""

from __future__ import annotations

from typing import Literal, Sequence

from . import protocol
from .errors import ConfigError
from .records import EvaluationChain, UserProfile
from .sample_jobs import SampleJob

PersonaMode = Literal["cached", "query"]
PersonaSource = Literal["profile", "history", "cache", "chain", "history-fallback"]


class PersonaChoice:
    """Chooses the persona text per user, caching it in "cached" mode. `index_source` is the index's
    `persona_source`: "llm" (chain analyses) or "history" (history text)."""

    def __init__(self, mode: PersonaMode):
        self.mode = mode
        self.cached: dict[str, str] = {}  # user id -> the first persona parsed for them

    def known_before_sampling(self, user: UserProfile, index_source: str) -> bool:
        """Whether the persona is known without this call's own chains (then all samples run in one batch)."""
        from_cache = self.mode == "cached" and user.user_id in self.cached
        return bool(user.persona) or from_cache or index_source == "history"

    def persona(self, user: UserProfile, index_source: str, chains: Sequence[EvaluationChain],
                notes: list[str]) -> tuple[str, PersonaSource]:
        """(the text embedded to find similar users, where it came from); a fallback adds a note."""
        if user.persona:
            return user.persona, "profile"
        if index_source == "history":
            return protocol.persona_from_history(user), "history"
        if self.mode == "cached" and user.user_id in self.cached:
            return self.cached[user.user_id], "cache"
        analyses = [chain.analysis for chain in chains if chain.analysis.strip()]
        if analyses:
            if self.mode == "cached":
                self.cached[user.user_id] = analyses[0]
            return analyses[0], "chain"
        notes.append("no parsed self chain to take a persona from; looked up neighbours by the "
                     "history text instead")
        return protocol.persona_from_history(user), "history-fallback"

    def forget(self, user_id: str) -> None:
        self.cached.pop(user_id, None)


def persona_to_add(profile: UserProfile, persona_text: str | None, index_source: str) -> str:
    """The persona a new member is embedded by: the text given, else the profile's, else (for an index
    built from history text) the history text."""
    persona_text = persona_text or profile.persona
    if persona_text is not None:
        return persona_text
    if index_source != "history":
        raise ConfigError("this prototype index was built from LLM persona analyses; pass persona_text "
                          "(e.g. the `analysis` of one of this user's chains)")
    return protocol.persona_from_history(profile)


def find_neighbors(prototypes, personas: PersonaChoice, user: UserProfile, prompt: str, n: int,
                   own_chains: Sequence[EvaluationChain], notes: list[str]
                   ) -> tuple[list[tuple[UserProfile, float]], PersonaSource]:
    """(the user's `n` nearest members with their cosine similarities, where the persona that found
    them came from); the user is never their own neighbour."""
    persona, persona_from = personas.persona(user, prototypes.persona_source, own_chains, notes)
    # history and query place the user in a refined index; an unrefined one ignores them
    neighbors = prototypes.neighbors(persona, n, exclude=user.user_id, history=user.history, query=prompt)
    return neighbors, persona_from


def job_cache_owner(job: SampleJob, prototypes) -> str:
    """The user whose history a job's prompt shows (a chain member's user), for the prefix cache."""
    if job.kind != "neighbor" or prototypes is None:
        return job.owner.user_id
    from .prototypes import member_owner

    return member_owner(job.owner.user_id, prototypes.info.granularity)
