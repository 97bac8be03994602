"""Adapters for the tools P-GenRM's users already run.

Each module imports its third-party library lazily or only when imported itself, so the
runtime never depends on them:

- `pgenrm_lite.integrations.trl`: a reward function for TRL's `GRPOTrainer` (no TRL import).
- `pgenrm_lite.integrations.server`: an OpenRLHF-compatible HTTP reward server
  (Starlette + uvicorn, extra `serve`); `pgenrm-lite serve` runs it.
- `pgenrm_lite.integrations.rewardbench`: RewardBench-style "A" / "B" / "error" verdicts.
- `pgenrm_lite.integrations.ray`: scoring a Ray Data dataset with one Scorer per actor (extra `ray`).

All of them share one rule for users they do not know: the non-personalised judge, a
`UserProfile` with no history (`non_personalised_user`), and they say when they used it.
"""

from __future__ import annotations

from ..records import UserProfile

#: The user id given to rows or requests that name no user at all.
ANONYMOUS_USER_ID = "(anonymous)"


def non_personalised_user(user_id: object = None) -> UserProfile:
    """The non-personalised judge: a profile with no preference history (P-GenRM's prompt
    then shows an empty history block, so the chain judges the pair on general grounds)."""
    uid = "" if user_id is None else str(user_id)
    return UserProfile(user_id=uid[:256] or ANONYMOUS_USER_ID)


def profile_map(profiles) -> dict[str, UserProfile]:
    """`profiles` as a dict keyed by user id: a mapping, an iterable of `UserProfile`, or None."""
    from ..errors import ConfigError

    if profiles is None:
        return {}
    if hasattr(profiles, "items"):
        out = {}
        for key, value in profiles.items():
            if not isinstance(value, UserProfile):
                raise ConfigError(f"profiles[{key!r}] must be a UserProfile, got {type(value).__name__}")
            out[str(key)] = value
        return out
    out = {}
    for value in profiles:
        if not isinstance(value, UserProfile):
            raise ConfigError(f"profiles must hold UserProfile records, got {type(value).__name__}")
        out[value.user_id] = value
    return out


__all__ = ["ANONYMOUS_USER_ID", "non_personalised_user", "profile_map"]
