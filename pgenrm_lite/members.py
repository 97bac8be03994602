"""Members of the prototype index: their ids, chain members, stored records, the persona checkpoint.

Members are users (`granularity` "user") or chains (`"chain"`, the paper's): one member per
history item of a user, id `<user_id>#<item>`, holding the item's own shown history.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson

from ._atomic import atomic_path
from .records import UserProfile

CHAIN_SEP = "#"
GRANULARITIES = ("user", "chain")


def chain_member_id(owner: str, item: int) -> str:
    return f"{owner}{CHAIN_SEP}{item}"


def member_owner(member_id: str, granularity: str) -> str:
    """The user a member belongs to: itself, or for a chain member the id before the last '#'."""
    if granularity == "chain":
        owner, sep, item = member_id.rpartition(CHAIN_SEP)
        if sep and owner and item.isdigit():
            return owner
    return member_id


def chain_members(profile: UserProfile, *, seed: int, history_pairs: int = 3) -> list[UserProfile]:
    """One member per history item: the item's own shown history is up to `history_pairs` of the
    user's *other* items (seeded pick, kept in order); a user with one item shows that item."""
    from .protocol import derive_seed

    items = profile.history
    out = []
    for j in range(len(items)):
        others = [i for i in range(len(items)) if i != j]
        if len(others) > history_pairs:
            rng = np.random.default_rng(derive_seed(seed, "chain-history", profile.user_id, j))
            others = sorted(rng.choice(others, size=history_pairs, replace=False).tolist())
        shown = [items[i] for i in others] or [items[j]]
        out.append(UserProfile(user_id=chain_member_id(profile.user_id, j), history=shown,
                               stated_preferences=profile.stated_preferences))
    return out


def member_record(profile: UserProfile, persona_text: str, members_carry: str) -> UserProfile:
    """What a member record stores: the whole profile (plus its persona) or only the persona."""
    if members_carry == "persona":
        return UserProfile(user_id=profile.user_id, persona=persona_text)
    return profile.model_copy(update={"persona": persona_text})


def persona_checkpoint_path(bundle_dir: Path) -> Path:
    """Where `python -m export prototypes --persona-source llm` keeps finished personas: beside
    the bundle (never inside it, so the bundle's files and checksums do not change while it runs)."""
    bundle_dir = Path(bundle_dir).resolve()
    return bundle_dir.with_name(bundle_dir.name + ".personas.jsonl")


def forget_persona_checkpoint(bundle_dir: Path, user_id: str) -> int:
    """Rewrite the persona checkpoint without `user_id`'s entries, their chain members' included
    (`<user_id>#<item>`, whichever granularity wrote them), atomically; return how many went."""
    path = persona_checkpoint_path(bundle_dir)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().splitlines():
        try:
            mine = member_owner(str(orjson.loads(line).get("user_id")), "chain") == user_id
        except (orjson.JSONDecodeError, AttributeError):
            mine = False  # a torn line: the builder skips it; keep it rather than guess
        if mine:
            dropped += 1
        else:
            kept.append(line + b"\n")
    if dropped:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(kept))
    return dropped
