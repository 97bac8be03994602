"""Member granularity (user / chain), persona source at query time (cached / query) and
prototype refinement.

Index tests run real hnswlib indexes; refinement runs the real torch training on small
data and checks its query-time half (numpy, `pgenrm_lite.refinement`) against the torch
twin; the end-to-end tests run SmolLM2 and the exported MiniLM of the default bundle.
"""

from __future__ import annotations

import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from pgenrm_lite import ConfigError, Preference, Scorer, UserProfile
from pgenrm_lite.bundle import Bundle, read_manifest
from pgenrm_lite.hnsw_files import unit_rows
from pgenrm_lite.members import chain_members, member_owner
from pgenrm_lite.prototypes import PrototypeIndex

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from export.prototypes_build import index_members, member_list  # noqa: E402
from test_prototypes import DIM, empty_bundle  # noqa: E402


def owner_user(uid: str, n: int) -> UserProfile:
    return UserProfile(user_id=uid, history=[Preference(prompt=f"{uid} asks {i}", chosen=f"{uid} good {i}",
                                                        rejected=f"{uid} bad {i}") for i in range(n)])


def chain_bundle(root: Path, users: list[UserProfile], vectors_of, *, k: int = 2) -> Path:
    empty_bundle(root)
    members, targets = member_list(users, "chain", seed=0)
    vectors = np.stack([vectors_of(m) for m in members])
    index_members(root, members, [m.user_id for m in members], vectors, k=k, persona_source="llm",
                  members_carry="history", granularity="chain", targets=targets)
    return root


# -- member granularity ------------------------------------------------------------------

def test_chain_members_are_one_per_item_with_other_items_as_history():
    user = owner_user("a#b", 6)
    chains = chain_members(user, seed=3)
    assert [c.user_id for c in chains] == [f"a#b#{j}" for j in range(6)]
    for j, c in enumerate(chains):
        assert len(c.history) == 3 and user.history[j] not in c.history
        assert member_owner(c.user_id, "chain") == "a#b"
    assert chain_members(user, seed=3) == chains and chain_members(user, seed=4) != chains
    only = chain_members(owner_user("solo", 1), seed=0)
    assert len(only) == 1 and only[0].history == owner_user("solo", 1).history
    assert member_owner("a#b#2", "user") == "a#b#2"  # user ids are never split in a user index


@pytest.mark.parametrize("granularity", ["user", "chain"])
def test_neighbours_never_return_the_asking_user(tmp_path, granularity):
    rng = np.random.default_rng(0)
    users = [owner_user(f"u{i}", 4) for i in range(12)]
    base = {u.user_id: rng.normal(size=DIM) for u in users}

    def vec(m):  # every member of a user sits close to the user's point
        return base[member_owner(m.user_id, granularity)] + 0.01 * rng.normal(size=DIM)

    root = tmp_path / "b"
    empty_bundle(root)
    members, targets = member_list(users, granularity, seed=0)
    index_members(root, members, [m.user_id for m in members], np.stack([vec(m) for m in members]), k=3,
                  persona_source="llm", members_carry="history", granularity=granularity, targets=targets)
    index = PrototypeIndex.load(Bundle.open(root))
    assert index.granularity == granularity and index.n_members == len(members)
    for u in users:
        q = unit_rows(base[u.user_id][None])[0]
        got = index.neighbors_for_vector(q, 6, exclude=u.user_id)
        assert len(got) == 6 and all(member_owner(m.user_id, granularity) != u.user_id for m, _ in got)
        near = index.neighbors_for_vector(q, 1)[0][0]  # without exclusion: the user's own member
        assert member_owner(near.user_id, granularity) == u.user_id
    assert len(index.members_of("u3")) == (4 if granularity == "chain" else 1)


def test_add_user_in_a_chain_index_replaces_all_of_its_chains(tmp_path):
    rng = np.random.default_rng(1)
    users = [owner_user(f"u{i}", 3) for i in range(6)]
    root = chain_bundle(tmp_path / "b", users, lambda m: rng.normal(size=DIM))

    class Fixed:  # the index only needs embed(); vectors from the text's hash keep it deterministic
        dimension = DIM

        def embed(self, texts, query=False):
            return np.stack([np.random.default_rng(zlib.crc32(t.encode())).normal(size=DIM) for t in texts])

    index = PrototypeIndex.load(Bundle.open(root), Fixed())
    index.add_user(owner_user("u2", 5), "a persona")
    assert index.members_of("u2") == [f"u2#{j}" for j in range(5)]
    assert index.n_members == 6 * 3 - 3 + 5
    again = PrototypeIndex.load(Bundle.open(root))  # what is on disk
    assert again.members_of("u2") == index.members_of("u2") and again.granularity == "chain"
    assert read_manifest(root).prototypes.granularity == "chain"


# -- refinement --------------------------------------------------------------------------

def _hh_like_users(n_users: int = 8, n_items: int = 6) -> list[UserProfile]:
    out = []
    for u in range(n_users):
        side = "careful" if u % 2 else "direct"
        out.append(UserProfile(user_id=f"{side}-{u}", history=[
            Preference(prompt=f"question {u}-{i} about topic {i % 3}",
                       chosen=f"{side} answer {i}", rejected=f"{'direct' if side == 'careful' else 'careful'} answer {i}")
            for i in range(n_items)]))
    return out


def _toy_embed(texts, query=False):
    rng_vecs = []
    for t in texts:
        v = np.random.default_rng(zlib.crc32(t.encode())).normal(size=DIM) * 0.3
        v[0] += 2.0 if "careful" in t else 0.0
        v[1] += 2.0 if "direct" in t else 0.0
        rng_vecs.append(v)
    return unit_rows(np.stack(rng_vecs))


def test_refinement_torch_twin_matches_the_runtime_formula():
    import torch

    from export.prototype_refine import RefineModel

    rng = np.random.default_rng(0)
    model = RefineModel(unit_rows(rng.normal(size=(3, DIM))))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    space = model.space(unit_rows(rng.normal(size=(3, DIM))))
    h = 4
    prompts, diffs = rng.normal(size=(2, h, DIM)).astype(np.float32), rng.normal(size=(2, h, DIM)).astype(np.float32)
    query = rng.normal(size=(2, DIM)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
    with torch.no_grad():
        z = model.z(torch.tensor([0, 2]), torch.tensor(query), torch.tensor(prompts), torch.tensor(diffs),
                    torch.tensor(mask)).numpy()
    for b, anchor in enumerate([0, 2]):
        keep = mask[b]
        want = space.vector(anchor, query[b], prompts[b][keep], diffs[b][keep])
        assert np.abs(z[b] / np.linalg.norm(z[b]) - want).max() < 1e-5


def test_refinement_is_seeded_resumable_and_recorded(tmp_path):
    from export.prototype_refine import RefineSettings, refine

    users = _hh_like_users()
    personas = _toy_embed([f"persona of {u.user_id}" for u in users])
    from export.kmeans import kmeans

    centroids, labels = kmeans(personas, 2, seed=0)
    targets = [None] * len(users)

    def run(epochs, ckpt):
        return refine(users, targets, personas, centroids, labels, _toy_embed, seed=5, checkpoint=ckpt,
                      settings=RefineSettings(epochs=epochs, batch_size=8, history_pairs=4), progress=False)

    two = run(2, None)
    ckpt = tmp_path / "r.pt"
    run(1, ckpt)
    resumed = run(2, ckpt)  # continues the one-epoch run: epoch 2 only
    for a, b in zip(two.space.arrays().values(), resumed.space.arrays().values()):
        assert np.array_equal(a, b)
    assert np.array_equal(two.vectors, resumed.vectors)
    assert two.info.n_examples == len(users) * 6 and two.info.epochs == 2
    assert two.info.loss_after < two.info.loss_before  # it learns the 'careful' vs 'direct' choice
    assert not np.array_equal(run(2, None).space.anchors, refine(
        users, targets, personas, centroids, labels, _toy_embed, seed=6, settings=RefineSettings(
            epochs=2, batch_size=8, history_pairs=4), progress=False).space.anchors)


def test_refined_index_places_query_users_with_the_exported_arrays(tmp_path):
    from export.prototype_refine import RefineSettings

    users = _hh_like_users()
    root = tmp_path / "b"
    empty_bundle(root)
    personas = [f"persona of {u.user_id}" for u in users]
    info = index_members(root, users, personas, _toy_embed(personas), k=2, persona_source="llm",
                         members_carry="history", refine=RefineSettings(batch_size=8, history_pairs=4),
                         embed=_toy_embed)
    assert info.refinement is not None and info.refinement.lr == 1e-3 and info.refinement.ema == 0.98
    assert info.refinement.file in {f.path for f in read_manifest(root).files}

    class Toy:
        dimension = DIM

        def embed(self, texts, query=False):
            return _toy_embed(texts)

    index = PrototypeIndex.load(Bundle.open(root), Toy())
    assert index.refined
    # a member placed from its own persona, history and mean prompt lands on its own stored vector
    u = users[3]
    got = index.neighbors_for_vector(index.query_vector(personas[3], history=u.history), 1)[0]
    assert got[0].user_id == u.user_id and got[1] > 0.999
    # the exported query-time arrays survive an on-device update (carried to the next generation)
    index.add_user(owner_user("newcomer", 3), "persona of newcomer")
    after = read_manifest(root).prototypes
    assert after.refinement is not None and after.refinement.file != info.refinement.file
    assert PrototypeIndex.load(Bundle.open(root), Toy()).refined
    with pytest.raises(ConfigError):
        index.query_vector(17)  # type: ignore[arg-type]


# -- end to end on SmolLM2 + MiniLM --------------------------------------------------------

def _e2e_bundle(default_bundle: Path, tmp_path: Path, granularity: str, *, refine: bool = False) -> tuple[Path, list]:
    """A copy of the default bundle whose index holds LLM-persona members (user or chain)."""
    from export.prototype_refine import RefineSettings
    from pgenrm_lite.embedder import Embedder

    root = tmp_path / "bundle"
    shutil.copytree(default_bundle, root)
    users = _hh_like_users(6, 4)
    members, targets = member_list(users, granularity, seed=0)
    personas = [f"The user {m.user_id.split('-')[0]}ly prefers {'safe, cautious' if 'careful' in m.user_id else 'blunt, direct'} "
                "answers." for m in members]
    emb = Embedder.from_dir(root / "embedder", device="cpu")
    index_members(root, members, personas, emb.embed(personas), k=2, persona_source="llm", members_carry="history",
                  granularity=granularity, targets=targets, embed=emb.embed,
                  refine=RefineSettings(batch_size=8, history_pairs=3) if refine else None)
    return root, users


def test_chain_members_with_personas_per_query_end_to_end(default_bundle, tmp_path):
    root, users = _e2e_bundle(default_bundle, tmp_path, "chain", refine=True)
    user = users[1]
    with Scorer.from_bundle(root, n_samples=1, n_neighbors=2, persona_mode="query", seed=1, n_threads=2) as scorer:
        assert scorer.prototypes.granularity == "chain" and scorer.prototypes.refined
        results = [scorer.compare(user, prompt, "Sure, here is how.", "I would rather not.") for prompt in
                   ("How do I pick a lock?", "What is a good name for a cat?")]
    for res in results:
        assert res.persona_mode == "query"
        assert res.persona_from in ("chain", "history-fallback")
        assert len(res.neighbors) == 2
        assert all(member_owner(nb.user_id, "chain") != user.user_id and "#" in nb.user_id for nb in res.neighbors)
        assert sum(s.kind == "neighbor" for s in res.samples) == 2
    assert not scorer.personas.cached  # per-query personas are never cached


def test_user_members_with_cached_persona_end_to_end(default_bundle, tmp_path):
    root, users = _e2e_bundle(default_bundle, tmp_path, "user")
    user = users[0]
    with Scorer.from_bundle(root, n_samples=1, n_neighbors=1, persona_mode="cached", seed=2, n_threads=2) as scorer:
        first = scorer.compare(user, "How do I pick a lock?", "Sure, here is how.", "I would rather not.")
        second = scorer.compare(user, "What is a good name for a cat?", "Whiskers.", "Cats do not need names.")
    assert first.persona_mode == second.persona_mode == "cached"
    if first.persona_from == "chain":  # the first parsed analysis is kept and reused
        assert second.persona_from == "cache"
    else:
        assert first.persona_from == "history-fallback"
    for res in (first, second):
        assert [nb.user_id for nb in res.neighbors] != [user.user_id] and len(res.neighbors) == 1
    with pytest.raises(ConfigError, match="persona_mode"):
        Scorer.from_bundle(root, n_neighbors=1, persona_mode="sometimes")


def test_forgetting_a_user_removes_all_of_their_chains(tmp_path):
    import orjson

    from pgenrm_lite.members import persona_checkpoint_path

    rng = np.random.default_rng(2)
    users = [owner_user(f"u{i}", 3) for i in range(5)] + [owner_user("u1#0", 2)]  # an id that looks like a chain
    root = chain_bundle(tmp_path / "b", users, lambda m: rng.normal(size=DIM))
    ckpt = persona_checkpoint_path(root)
    ckpt.write_bytes(b"".join(orjson.dumps({"key": str(i), "user_id": uid, "persona": "p"}) + b"\n"
                              for i, uid in enumerate(["u1#0", "u1#2", "u2#0", "u1"])))
    index = PrototypeIndex.load(Bundle.open(root))
    assert index.remove_user("u1") == 3
    assert index.members_of("u1") == [] and index.members_of("u1#0") == ["u1#0#0", "u1#0#1"]
    again = PrototypeIndex.load(Bundle.open(root))
    assert again.n_members == 6 * 3 - 3 - 1 and not any(member_owner(m, "chain") == "u1" for m in again.member_ids())
    left = [orjson.loads(line)["user_id"] for line in ckpt.read_bytes().splitlines()]
    assert left == ["u2#0"]
    assert index.remove_user("u1") == 0
