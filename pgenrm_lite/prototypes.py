"""User prototypes on hnswlib: the nearest prototype, its most similar members, on-device additions.

The index over one generation of files (layout, reading, writing and locking in
`prototype_files`; the hnswlib file checks in `hnsw_files`; what a member is in `members`).
Neighbour look-ups never return any member of the asking user. The clusters come from
`python -m export prototypes` (k-means lives there: the runtime never clusters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import hnswlib
import numpy as np

from .bundle import Bundle
from .errors import ConfigError, PrototypeIndexError
from .hnsw_files import build_hnsw, fresh_hnsw, read_hnsw_header, unit_rows
from .members import (CHAIN_SEP, chain_members, forget_persona_checkpoint, member_owner, member_record,
                      persona_checkpoint_path)
from .prototype_files import (PROTO_DIR, Generation, LiveGeneration, generation_of, read_generation,
                              write_generation, write_next, writer_lock)
from .records import EmbedderInfo, Manifest, PrototypeInfo, UserProfile
from .refinement import RefinedSpace, history_arrays, mean_query

# Names long imported from here; they live in the modules above.
__all__ = ["BRUTE_FORCE_BELOW", "CHAIN_SEP", "PROTO_DIR", "PrototypeIndex", "build_hnsw", "chain_members",
           "forget_persona_checkpoint", "member_owner", "member_record", "persona_checkpoint_path",
           "read_hnsw_header", "unit_rows", "write_generation", "writer_lock"]

BRUTE_FORCE_BELOW = 64  # members; below this an exact numpy scan is as fast and exact


class _Space:
    """One hnswlib index plus exact search, for clamped top-k queries over a subset of labels."""

    def __init__(self, index: hnswlib.Index, *, brute_force_below: int):
        self.index = index
        self.brute_force_below = brute_force_below

    @property
    def count(self) -> int:
        return self.index.get_current_count()

    def search(self, q: np.ndarray, k: int, allowed: Optional[Sequence[int]] = None) -> list[tuple[int, float]]:
        """Up to k (label, cosine similarity) pairs, most similar first; never raises for a large k."""
        candidates = range(self.count) if allowed is None else allowed
        k = min(k, len(candidates))
        if k <= 0:
            return []
        if self.count >= self.brute_force_below:
            wanted = None if allowed is None or len(allowed) == self.count else frozenset(allowed)
            try:
                labels, dists = self.index.knn_query(q, k=k, num_threads=1,
                                                     filter=None if wanted is None else wanted.__contains__)
                return [(int(i), 1.0 - float(d)) for i, d in zip(labels[0], dists[0])]
            except RuntimeError:  # too few reachable matches in the graph: fall back to exact
                pass
        return self.exact(q, k, list(candidates))

    def exact(self, q: np.ndarray, k: int, candidates: list[int]) -> list[tuple[int, float]]:
        vectors = np.asarray(self.index.get_items(candidates, return_type="numpy"), dtype=np.float32)
        sims = vectors @ q
        top = np.argsort(-sims, kind="stable")[:k]
        return [(int(candidates[i]), float(sims[i])) for i in top]


@dataclass
class _State:
    """A loaded generation with its lookup tables (rows by user id, by prototype, by owner)."""
    info: PrototypeInfo
    centroids: _Space
    members: _Space
    records: list[UserProfile]
    assignments: np.ndarray
    row_of: dict[str, int]
    by_prototype: list[list[int]]
    rows_of_owner: dict[str, list[int]]
    space: Optional[RefinedSpace] = None

    @classmethod
    def build(cls, info: PrototypeInfo, centroids: _Space, members: _Space, records: list[UserProfile],
              assignments: np.ndarray, space: Optional[RefinedSpace]) -> "_State":
        by_prototype: list[list[int]] = [[] for _ in range(info.count)]
        for row, proto in enumerate(assignments.tolist()):
            by_prototype[proto].append(row)
        rows_of_owner: dict[str, list[int]] = {}
        for row, r in enumerate(records):
            rows_of_owner.setdefault(member_owner(r.user_id, info.granularity), []).append(row)
        return cls(info=info, centroids=centroids, members=members, records=records, assignments=assignments,
                   row_of={r.user_id: i for i, r in enumerate(records)}, by_prototype=by_prototype,
                   rows_of_owner=rows_of_owner, space=space)

    @classmethod
    def load(cls, generation: Generation, wrap: Callable[[hnswlib.Index], _Space]) -> "_State":
        return cls.build(generation.info, wrap(generation.centroids), wrap(generation.members),
                         generation.records, generation.assignments, generation.space)

    def unit_query(self, vec) -> np.ndarray:
        q = np.asarray(vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.info.dimension:
            raise ConfigError(f"query vector has dimension {q.shape[0]}; the index has {self.info.dimension}")
        return unit_rows(q[None, :])[0]

    def nearest(self, q: np.ndarray) -> int:
        return self.centroids.search(q, 1)[0][0]

    def neighbors(self, q: np.ndarray, n: int, exclude: str | None) -> list[tuple[UserProfile, float]]:
        """See `PrototypeIndex.neighbors`; `q` a unit vector of the index space."""
        skip = frozenset(self.rows_of_owner.get(exclude, ())) if exclude is not None else frozenset()
        picked: list[tuple[int, float]] = []
        if n > 0:
            for proto, _ in self.centroids.search(q, self.centroids.count):
                candidates = [r for r in self.by_prototype[proto] if r not in skip]
                picked += self.members.search(q, n - len(picked), candidates)
                if len(picked) >= n:
                    break
        picked.sort(key=lambda t: (-t[1], t[0]))
        return [(_as_neighbor(self.records[row], self.info), sim) for row, sim in picked]


def _embedder_of(bundle: Bundle) -> EmbedderInfo:
    """The bundle's embedder, checked to match its prototype index."""
    info, emb = bundle.manifest.prototypes, bundle.manifest.embedder
    if info is None:
        raise PrototypeIndexError(f"bundle {bundle.root} has no prototype index; build one with "
                                  "`python -m export prototypes --bundle DIR ...`")
    if emb is None:
        raise PrototypeIndexError(f"bundle {bundle.root} has prototypes but no embedder to embed personas; "
                                  "rebuild it with `python -m export bundle --embedder DIR`")
    if emb.dimension != info.dimension:
        raise PrototypeIndexError(f"the bundle's embedder has dimension {emb.dimension} but its prototype "
                                  f"index has dimension {info.dimension}; rebuild the prototypes with "
                                  "this embedder")
    return emb


def _embed(embedder, texts: list[str], *, query: bool) -> np.ndarray:
    if embedder is None:
        raise ConfigError("this PrototypeIndex was loaded without an embedder; pass vectors, or load it "
                          "with PrototypeIndex.from_bundle")
    for text in texts:
        if not isinstance(text, str):
            raise ConfigError(f"persona text must be a string, got {type(text).__name__}")
    return embedder.embed(texts, query=query)


def _info_field(name: str) -> property:
    """A read-only property forwarding the loaded generation's `PrototypeInfo.<name>`."""
    return property(lambda self: getattr(self.info, name), doc=f"The index's `{name}` (see `PrototypeInfo`).")


def _as_neighbor(record: UserProfile, info: PrototypeInfo) -> UserProfile:
    # A persona-only member is rendered with its persona in place of the history.
    if info.members_carry == "persona" or (not record.history and not record.stated_preferences):
        return UserProfile(user_id=record.user_id, history=[], stated_preferences=record.persona,
                           persona=record.persona)
    return record


def _with_row(state: _State, row: int, record: UserProfile, proto: int) -> tuple[list[UserProfile], np.ndarray]:
    """Records and assignments with `record` at `row` (a new last row, or replacing one)."""
    records = list(state.records)
    assignments = state.assignments.copy()
    if row == len(records):
        records.append(record)
        assignments = np.append(assignments, np.int32(proto))
    else:
        records[row] = record
        assignments[row] = proto
    return records, assignments


def _put_vector(members: hnswlib.Index, row: int, q: np.ndarray) -> None:
    if row >= members.get_max_elements():
        members.resize_index(max(16, 2 * members.get_max_elements()))
    members.add_items(q[None, :], np.array([row]), num_threads=1)  # replaces an existing label


def _without_owner(state: _State, drop: str, records: list[UserProfile], vectors: np.ndarray,
                   assignments: np.ndarray) -> tuple[list[UserProfile], np.ndarray, np.ndarray]:
    """(records, vectors, assignments) of every member but `drop`'s, with the given ones appended."""
    gone = set(state.rows_of_owner.get(drop, ()))
    keep = [r for r in range(len(state.records)) if r not in gone]
    old = (np.asarray(state.members.index.get_items(keep, return_type="numpy"), dtype=np.float32)
           if keep else np.zeros((0, state.info.dimension), np.float32))
    all_vectors = np.concatenate([old, np.asarray(vectors, np.float32).reshape(-1, state.info.dimension)])
    all_records = [state.records[r] for r in keep] + list(records)
    all_assignments = np.concatenate([state.assignments[keep], np.asarray(assignments, np.int32)])
    return all_records, all_vectors, all_assignments


class PrototypeIndex:
    """User prototypes of a bundle: `neighbors(persona_text, n, exclude=user_id)` and `add_user`.

    With refined prototypes the index lives in the refined space: a query user is placed
    there from their persona, their history and the current query (`query_vector`).

    Build with `PrototypeIndex.from_bundle(bundle)`; `load(bundle, embedder=None)` opens
    the index without an embedder (vector queries only). Calls are thread-safe.
    """

    def __init__(self, root: Path, manifest: Manifest, embedder=None, *, n_threads: int | None = None,
                 brute_force_below: int = BRUTE_FORCE_BELOW):
        self.root = Path(root)
        self.embedder = embedder
        self._n_threads = n_threads or 1
        self._brute_force_below = brute_force_below
        self._live: LiveGeneration[_State] = LiveGeneration(
            self.root, manifest, lambda m: _State.load(read_generation(self.root, m), self._space))

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str = "auto", n_threads: int | None = None,
                    brute_force_below: int = BRUTE_FORCE_BELOW) -> "PrototypeIndex":
        """Load the bundle's embedder and prototype index; every mismatch is a PrototypeIndexError."""
        emb = _embedder_of(bundle)
        from .embedder import Embedder  # onnxruntime is only needed when personas are embedded

        embedder = Embedder.from_dir(bundle.path(emb.dir), device=device, threads=n_threads)
        return cls.load(bundle, embedder, n_threads=n_threads, brute_force_below=brute_force_below)

    @classmethod
    def load(cls, bundle: Bundle, embedder=None, *, n_threads: int | None = None,
             brute_force_below: int = BRUTE_FORCE_BELOW) -> "PrototypeIndex":
        if bundle.manifest.prototypes is None:
            raise PrototypeIndexError(f"bundle {bundle.root} has no prototype index")
        if embedder is not None and embedder.dimension != bundle.manifest.prototypes.dimension:
            raise PrototypeIndexError(f"the embedder has dimension {embedder.dimension} but the prototype index "
                                      f"has dimension {bundle.manifest.prototypes.dimension}; rebuild the "
                                      "prototypes with this embedder")
        return cls(bundle.root, bundle.manifest, embedder, n_threads=n_threads,
                   brute_force_below=brute_force_below)

    # -- properties ----------------------------------------------------------------------

    @property
    def info(self) -> PrototypeInfo:
        return self._live.state.info

    persona_source = _info_field("persona_source")
    members_carry = _info_field("members_carry")
    granularity = _info_field("granularity")
    ef = _info_field("ef")

    @property
    def refined(self) -> bool:
        return self.info.refinement is not None

    @property
    def loaded_ef(self) -> tuple[int, int]:
        """The search breadth set on the loaded (centroid, member) hnswlib indexes."""
        state = self._live.state
        return state.centroids.index.ef, state.members.index.ef

    @property
    def n_members(self) -> int:
        return len(self._live.state.records)

    @property
    def n_prototypes(self) -> int:
        return self._live.state.centroids.count

    @property
    def generation(self) -> int:
        return generation_of(self.info)

    def member_ids(self) -> list[str]:
        return [r.user_id for r in self._live.state.records]

    def member(self, user_id: str) -> Optional[UserProfile]:
        """A member's stored record (as written, persona included), or None."""
        state = self._live.state
        row = state.row_of.get(user_id)
        return None if row is None else state.records[row]

    def prototype_of(self, user_id: str) -> Optional[int]:
        state = self._live.state
        row = state.row_of.get(user_id)
        return None if row is None else int(state.assignments[row])

    def members_of(self, owner: str) -> list[str]:
        """The member ids that belong to a user (one, or one per chain)."""
        state = self._live.state
        return [state.records[r].user_id for r in state.rows_of_owner.get(owner, [])]

    # -- queries -------------------------------------------------------------------------

    def embed(self, text: str, *, query: bool = True) -> np.ndarray:
        """A persona (or prompt) looked up at query time: embedded as a query (with the embedder's
        query prefix, if it has one); members were embedded as documents."""
        return _embed(self.embedder, [text], query=query)[0]

    def query_vector(self, persona_text: str, *, history: Sequence = (), query: Optional[str] = None) -> np.ndarray:
        """Where a user stands in the index: their persona's embedding, or with refined prototypes
        the refined vector from the persona, the first history pairs and the query (its prompt
        embedding; without one, the mean of the history prompts)."""
        vec = self.embed(persona_text)
        return self._place(self._live.state, vec, history, query)

    def _place(self, state: _State, persona_vec: np.ndarray, history: Sequence, query: Optional[str]) -> np.ndarray:
        if state.space is None:
            return persona_vec
        space, limit = state.space, state.info.refinement.history_pairs  # type: ignore[union-attr]
        prompts, diffs = history_arrays(lambda t: _embed(self.embedder, t, query=False), history, limit=limit)
        if not len(prompts):
            prompts = diffs = np.zeros((0, space.dimension), np.float32)
        q = self.embed(query) if query is not None else mean_query(prompts, persona_vec)
        return space.vector(space.anchor_of(persona_vec), q, prompts, diffs)

    def nearest_prototype(self, vec_or_text) -> int:
        """The prototype whose centroid is most similar to a vector or a persona text."""
        with self._live.lock:
            state = self._live.state
            return state.nearest(self._query(vec_or_text, state))

    def neighbors(self, persona_text: str, n: int, *, exclude: str | None = None, history: Sequence = (),
                  query: Optional[str] = None) -> list[tuple[UserProfile, float]]:
        """The n members most similar to a persona, by cosine, most similar first; never a member of
        the user `exclude` (their own member, or every chain of theirs).

        Members come from the nearest prototype; when it has fewer than n (other)
        members the rest are filled from the next-nearest prototypes in order. n is
        clamped to the members available. `history` and `query` place the user in a
        refined index (see `query_vector`); an unrefined one ignores them.
        """
        return self.neighbors_for_vector(self.query_vector(persona_text, history=history, query=query), n,
                                         exclude=exclude)

    def neighbors_for_vector(self, vec, n: int, *, exclude: str | None = None
                             ) -> list[tuple[UserProfile, float]]:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"n must be a non-negative integer, got {n!r}")
        with self._live.lock:
            state = self._live.state
            return state.neighbors(self._query(vec, state), n, exclude)

    def _query(self, vec_or_text, state: _State) -> np.ndarray:
        return state.unit_query(self.embed(vec_or_text) if isinstance(vec_or_text, str) else vec_or_text)

    # -- updates -------------------------------------------------------------------------

    def add_user(self, profile: UserProfile, persona_text: str, *, vector=None) -> int:
        """Add (or replace, by user_id) a member and persist the index atomically; return its prototype.

        `vector` is an already computed index-space vector for the member (skips the
        embedder). In a chain index the user's chain members all go and one member per
        history item comes in (see `chain_members`), each with `persona_text` when personas
        came from an LLM, else its own history text; the return value is then the first
        chain's prototype.
        """
        if not isinstance(profile, UserProfile):
            raise ConfigError(f"profile must be a UserProfile, got {type(profile).__name__}")
        if not isinstance(persona_text, str) or not persona_text.strip():
            raise ConfigError("persona_text must be a non-empty string")
        with self._live.update() as (on_disk, state):
            if state.info.granularity == "chain":
                return self._replace_chains(on_disk, state, profile, persona_text)
            q = self._query(self._member_vector(state, profile, persona_text) if vector is None else vector, state)
            proto = state.nearest(q)
            row = state.row_of.get(profile.user_id, len(state.records))
            records, assignments = _with_row(state, row, member_record(profile, persona_text,
                                                                       state.info.members_carry), proto)
            with self._live.switching():
                _put_vector(state.members.index, row, q)
                self._switch(on_disk, state, state.members, records, assignments)
            return proto

    def _member_vector(self, state: _State, profile: UserProfile, persona_text: str) -> np.ndarray:
        return self._place(state, _embed(self.embedder, [persona_text], query=False)[0], profile.history, None)

    def _replace_chains(self, on_disk: Manifest, state: _State, profile: UserProfile, persona_text: str) -> int:
        from .protocol import persona_from_history

        chains = chain_members(profile, seed=state.info.seed)
        if not chains:
            raise ConfigError(f"user {profile.user_id!r} has no history items to make chain members of")
        llm = state.info.persona_source == "llm"
        texts = [persona_text if llm else persona_from_history(c) for c in chains]
        vectors = np.stack([self._query(self._member_vector(state, c, t), state) for c, t in zip(chains, texts)])
        protos = [state.nearest(v) for v in vectors]
        new = [member_record(c, t, state.info.members_carry) for c, t in zip(chains, texts)]
        self._rewrite(on_disk, state, drop=profile.user_id, records=new, vectors=vectors,
                      assignments=np.asarray(protos, np.int32))
        return int(protos[0])

    def _rewrite(self, on_disk: Manifest, state: _State, *, drop: str, records: list[UserProfile],
                 vectors: np.ndarray, assignments: np.ndarray) -> None:
        """Write a generation without `drop`'s members and with `records` added; the member graph is
        built afresh (a removed element's vector would otherwise stay in the file)."""
        all_records, all_vectors, all_assignments = _without_owner(state, drop, records, vectors, assignments)
        members = fresh_hnsw(all_vectors, dimension=state.info.dimension, seed=state.info.seed, ef=state.info.ef)
        with self._live.switching():
            self._switch(on_disk, state, self._space(members), all_records, all_assignments)

    def _switch(self, on_disk: Manifest, state: _State, members: _Space, records: list[UserProfile],
                assignments: np.ndarray) -> None:
        """Write the next generation (call inside `switching()`) and hold it in memory."""
        manifest = self._live.manifest = write_next(self.root, on_disk, state.info, centroids=state.centroids.index,
                                                    members=members.index, records=records, assignments=assignments)
        assert manifest.prototypes is not None  # write_next always records the generation it wrote
        self._live.state = _State.build(manifest.prototypes, state.centroids, members, records, assignments,
                                        state.space)

    def remove_user(self, user_id: str) -> int:
        """Forget a user: drop every member record of `user_id` (their one member, or all their
        chains), rebuild the member index without their vectors, persist atomically, and return
        how many records were removed (0: not a member).

        The old generation's files are deleted after the switch, so no file of the index holds
        the user's texts or vectors any more. Centroids (and refinement arrays) are kept: they
        are trained over many members and hold no text; `python -m export prototypes`
        recomputes them.
        """
        if not isinstance(user_id, str) or not user_id:
            raise ConfigError(f"user_id must be a non-empty string, got {user_id!r}")
        with self._live.update() as (on_disk, state):
            removed = len(state.rows_of_owner.get(user_id, ()))
            if not removed:
                return 0
            self._rewrite(on_disk, state, drop=user_id, records=[],
                          vectors=np.zeros((0, state.info.dimension), np.float32),
                          assignments=np.zeros(0, np.int32))
            forget_persona_checkpoint(self.root, user_id)
            return removed

    def close(self) -> None:
        with self._live.lock:
            self._live.close()
            self.embedder = None

    def __enter__(self) -> "PrototypeIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _space(self, index: hnswlib.Index) -> _Space:
        index.set_num_threads(self._n_threads)
        return _Space(index, brute_force_below=self._brute_force_below)
