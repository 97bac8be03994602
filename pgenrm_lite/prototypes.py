"""User prototypes on hnswlib: the nearest prototype, its most similar members, on-device additions.

Files, all under `prototypes/` in the bundle and named by a generation number N:

    centroids.gN.hnsw     hnswlib index (cosine) of the prototype centroids, labels 0..count-1
    members.gN.hnsw       hnswlib index (cosine) of the members' persona embeddings; label = row
    members.gN.jsonl      one `UserProfile` per row; with members_carry="persona" only the
                          user_id and the persona text (no preference pair of anyone ships)
    assignments.gN.npy    int32 [n_members]: each member's prototype
    refinement.gN.npz     only for refined prototypes: the arrays that place a query user in
                          the refined space (see `refinement`); members and centroids above
                          then hold refined vectors

Members are users (`granularity` "user") or chains (`"chain"`, the paper's): one member per
history item of a user, id `<user_id>#<item>`, holding the item's own shown history.
Neighbour look-ups never return any member of the asking user.

An update writes generation N+1 beside N (each file: temp file, fsync, rename), then
switches by rewriting `manifest.json` atomically (its sha256/size entries name the new
files), then deletes generation N. A crash at any point leaves a manifest that names one
complete generation; loading follows the manifest, and leftovers are removed by the next
update. One writer at a time: updates take an exclusive lock file (POSIX). A process that
is loading while another one switches generations can find the old files gone: it gets a
PrototypeIndexError and can simply load again.

Every index file's header is checked (structure, dimension, element count) before
hnswlib reads it, since a malformed file can crash the native loader.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import hnswlib
import numpy as np
import orjson

from ._atomic import atomic_path
from .bundle import Bundle, read_manifest, with_files, write_manifest
from .errors import ConfigError, PrototypeIndexError, RecordError
from .records import Manifest, PrototypeInfo, UserProfile
from .refinement import RefinedSpace, history_arrays, mean_query

PROTO_DIR = "prototypes"
BRUTE_FORCE_BELOW = 64  # members; below this an exact numpy scan is as fast and exact
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
LOCK_FILE = ".lock"
_GENERATION = re.compile(r"\.g(\d+)\.")
_OUR_FILE = re.compile(r"^(centroids|members|assignments|refinement)\.g(\d+)\.(hnsw|jsonl|npy|npz)$")
CHAIN_SEP = "#"
GRANULARITIES = ("user", "chain")
_CARRY = "carry"


# -- k-means (spherical: unit vectors, cosine similarity) ------------------------------------

def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); refuses empty, non-finite or zero rows."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"expected a 2-D array of vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norms == 0):
        raise ConfigError("vectors must be finite and non-zero")
    return x / norms


def kmeans(vectors: np.ndarray, k: int, *, seed: int, n_iter: int = 50, n_init: int = 4,
           init: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means: (unit centroids [k, dim], labels [n]) with k clamped to the point count.

    Seeded k-means++ initialisation (or `init`, k rows), Lloyd iterations on cosine
    similarity; a cluster left empty is re-seeded with the point farthest from its own
    centroid (taken from a cluster that keeps at least one point). The best of `n_init`
    seeded runs (highest total similarity to the own centroid) is kept, since one run can
    settle in a split-and-merge local optimum. Returned labels are each point's most
    similar centroid, so a cluster can only end empty when there are fewer distinct
    points than k.
    """
    x = unit_rows(vectors)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    k = min(int(k), len(x))
    if init is not None:
        centroids = unit_rows(init)
        if centroids.shape != (k, x.shape[1]):
            raise ConfigError(f"init has shape {centroids.shape}, expected {(k, x.shape[1])}")
        return _lloyd(x, centroids, n_iter)
    rng = np.random.default_rng(seed)
    best, best_score = None, -np.inf
    for _ in range(max(1, n_init)):
        centroids, labels = _lloyd(x, _kmeanspp(x, k, rng), n_iter)
        score = float((x * centroids[labels]).sum())
        if score > best_score + 1e-6:
            best, best_score = (centroids, labels), score
    return best


def _lloyd(x: np.ndarray, centroids: np.ndarray, n_iter: int) -> tuple[np.ndarray, np.ndarray]:
    k = len(centroids)
    labels = np.full(len(x), -1, dtype=np.int64)
    for _ in range(max(1, n_iter)):
        sims = x @ centroids.T
        new = _reseed_empty(sims.argmax(axis=1), sims, k)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = _centroids(x, labels, centroids)
    return centroids.astype(np.float32), (x @ centroids.T).argmax(axis=1).astype(np.int32)


def _kmeanspp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++: each step draws a few D^2-weighted candidates and keeps the best one."""
    n = len(x)
    tries = 2 + int(np.log(k))

    def dist2(i: int) -> np.ndarray:  # squared distance of unit vectors
        return np.clip(2.0 - 2.0 * (x @ x[i]), 0.0, None)

    chosen = [int(rng.integers(n))]
    d2 = dist2(chosen[0])
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 1e-12:  # only duplicates left: any unused point
            pick = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
            chosen.append(pick)
            continue
        candidates = rng.choice(n, size=tries, p=d2 / total)
        options = [np.minimum(d2, dist2(int(c))) for c in candidates]
        best = int(np.argmin([o.sum() for o in options]))
        chosen.append(int(candidates[best]))
        d2 = options[best]
    return x[chosen].copy()


def _reseed_empty(labels: np.ndarray, sims: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if not len(empty):
        return labels
    labels = labels.copy()
    own = sims[np.arange(len(labels)), labels]
    farthest_first = iter(np.argsort(own, kind="stable"))
    for cluster in empty:
        for i in farthest_first:
            if counts[labels[i]] > 1:
                counts[labels[i]] -= 1
                labels[i] = cluster
                counts[cluster] += 1
                break
    return labels


def _centroids(x: np.ndarray, labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    out = previous.copy()
    for c in range(len(previous)):
        members = x[labels == c]
        if not len(members):
            continue
        mean = members.mean(axis=0)
        norm = float(np.linalg.norm(mean))
        out[c] = mean / norm if norm > 1e-12 else members[0]  # opposite points cancel out
    return out


def explained_variance(vectors: np.ndarray, labels: np.ndarray) -> float:
    """1 - within-cluster / total sum of squares of the unit vectors (the paper picks k by this)."""
    x = unit_rows(vectors)
    labels = np.asarray(labels)
    total = float(((x - x.mean(axis=0)) ** 2).sum())
    within = sum(float(((x[labels == c] - x[labels == c].mean(axis=0)) ** 2).sum()) for c in np.unique(labels))
    return 1.0 - within / total if total > 0 else 1.0


# -- hnswlib files -----------------------------------------------------------------------

_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # hnswlib HierarchicalNSW::saveIndex, 0.7/0.8


@dataclass(frozen=True)
class HnswHeader:
    dimension: int
    count: int
    max_elements: int
    m: int


def read_hnsw_header(path: Path) -> HnswHeader:
    """Validate an hnswlib float index file's whole structure without hnswlib; raise PrototypeIndexError."""
    def bad(why: str) -> PrototypeIndexError:
        return PrototypeIndexError(f"{path} is not a valid hnswlib index ({why}); rebuild the prototypes "
                                   "with `python -m export prototypes`")

    size = path.stat().st_size
    if size < _HEADER.size:
        raise bad(f"{size} bytes is shorter than the header")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        (offset0, max_elements, count, per_element, label_offset, data_offset, max_level, entry,
         max_m, max_m0, m, _mult, _efc) = _HEADER.unpack_from(mm, 0)
        dim_bytes = label_offset - data_offset
        if (offset0 != 0 or data_offset != max_m0 * 4 + 4 or per_element != label_offset + 8
                or dim_bytes <= 0 or dim_bytes % 4 or count > max_elements or m < 2 or max_m != m
                or max_m0 != 2 * m):
            raise bad("inconsistent header fields")
        if count and not (0 <= max_level < 64 and entry < count):
            raise bad("entry point or level out of range")
        pos = _HEADER.size + count * per_element
        link_block = max_m * 4 + 4
        for _ in range(count):  # each element: uint32 byte size of its upper-level links, then links
            if pos + 4 > size:
                raise bad("truncated link lists")
            n_bytes = int.from_bytes(mm[pos:pos + 4], "little")
            if n_bytes % link_block or n_bytes > max_level * link_block:
                raise bad("malformed link list")
            pos += 4 + n_bytes
        if pos != size:
            raise bad(f"expected {pos} bytes, found {size}")
    return HnswHeader(dimension=dim_bytes // 4, count=count, max_elements=max_elements, m=m)


def build_hnsw(vectors: np.ndarray, *, seed: int, ef: int, capacity: int | None = None) -> hnswlib.Index:
    """A cosine hnswlib index of `vectors` with labels 0..n-1 (single-threaded: reproducible)."""
    x = unit_rows(vectors)
    index = hnswlib.Index(space="cosine", dim=x.shape[1])
    index.init_index(max_elements=max(len(x), capacity or 0, 1), ef_construction=HNSW_EF_CONSTRUCTION,
                     M=HNSW_M, random_seed=seed)
    index.add_items(x, np.arange(len(x)), num_threads=1)
    index.set_ef(ef)
    return index


def load_hnsw(path: Path, *, dimension: int, count: int, ef: int, what: str, headroom: int = 0) -> hnswlib.Index:
    """Load an index file after checking it holds `count` vectors of `dimension`; restore `ef`."""
    header = read_hnsw_header(path)
    if header.dimension != dimension:
        raise PrototypeIndexError(f"{what} index {path.name} holds {header.dimension}-dimensional vectors but "
                                  f"the manifest says {dimension}")
    if header.count != count:
        raise PrototypeIndexError(f"{what} index {path.name} holds {header.count} elements but the manifest "
                                  f"says {count}; rebuild the prototypes")
    index = hnswlib.Index(space="cosine", dim=dimension)
    # Our own capacity, never the file's: a forged max_elements cannot make hnswlib allocate.
    index.load_index(str(path), max_elements=count + headroom)
    labels = np.sort(np.asarray(index.get_ids_list(), dtype=np.int64))
    if not np.array_equal(labels, np.arange(count)):
        raise PrototypeIndexError(f"{what} index {path.name} does not label its elements 0..{count - 1}")
    index.set_ef(ef)  # hnswlib does not save ef; the manifest does
    return index


# -- one generation of files -------------------------------------------------------------

def generation_of(info: PrototypeInfo | None) -> int:
    if info is None:
        return 0
    found = _GENERATION.search(info.members_index_file)
    return int(found.group(1)) if found else 0


def file_names(generation: int) -> dict[str, str]:
    g = f"g{generation}"
    return {"centroids_file": f"{PROTO_DIR}/centroids.{g}.hnsw",
            "members_index_file": f"{PROTO_DIR}/members.{g}.hnsw",
            "members_file": f"{PROTO_DIR}/members.{g}.jsonl",
            "assignments_file": f"{PROTO_DIR}/assignments.{g}.npy"}


def refinement_file(generation: int) -> str:
    return f"{PROTO_DIR}/refinement.g{generation}.npz"


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


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on the bundle's prototype files across processes (no-op without fcntl)."""
    directory = Path(root) / PROTO_DIR
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: one writer is the caller's responsibility
        yield
        return
    with open(directory / LOCK_FILE, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_generation(root: Path, manifest: Manifest, *, centroids: hnswlib.Index, members: hnswlib.Index,
                     records: Sequence[UserProfile], assignments: np.ndarray, ef: int,
                     persona_source: str, members_carry: str, seed: int, granularity: str | None = None,
                     refinement=_CARRY) -> Manifest:
    """Write the next generation of prototype files and switch the manifest to it; return the manifest.

    The single place that knows the file layout; the offline builder and `add_user` both
    call it, holding `writer_lock(root)`. `manifest` must be the one currently on disk.
    `granularity` None keeps the current one. `refinement`: "carry" keeps the current
    refinement (its arrays copied to the new generation), None drops it, or a pair
    (RefinementInfo, RefinedSpace) writes new arrays.
    """
    root = Path(root)
    n = len(records)
    assignments = np.asarray(assignments, dtype=np.int32)
    if members.get_current_count() != n or assignments.shape != (n,):
        raise PrototypeIndexError(f"{n} member records but {members.get_current_count()} indexed vectors and "
                                  f"{assignments.shape} assignments")
    if n and (assignments.min() < 0 or assignments.max() >= centroids.get_current_count()):
        raise PrototypeIndexError("an assignment names a prototype that does not exist")
    old = manifest.prototypes
    generation = generation_of(old) + 1
    names = file_names(generation)
    granularity = granularity or (old.granularity if old else "user")
    if granularity not in GRANULARITIES:
        raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    (root / PROTO_DIR).mkdir(parents=True, exist_ok=True)
    refined = None
    if isinstance(refinement, str) and refinement == _CARRY:
        if old is not None and old.refinement is not None:
            refined = old.refinement.model_copy(update={"file": refinement_file(generation)})
            with atomic_path(root / refined.file) as tmp:
                tmp.write_bytes((root / old.refinement.file).read_bytes())
    elif refinement is not None:
        info_r, space = refinement
        refined = info_r.model_copy(update={"file": refinement_file(generation)})
        with atomic_path(root / refined.file) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **space.arrays())
    with atomic_path(root / names["centroids_file"]) as tmp:
        centroids.save_index(str(tmp))
    with atomic_path(root / names["members_index_file"]) as tmp:
        members.save_index(str(tmp))
    with atomic_path(root / names["members_file"]) as tmp:
        tmp.write_bytes(b"".join(orjson.dumps(r.model_dump(mode="json", exclude_defaults=True)) + b"\n"
                                 for r in records))
    with atomic_path(root / names["assignments_file"]) as tmp, open(tmp, "wb") as fh:
        np.save(fh, assignments, allow_pickle=False)
    info = PrototypeInfo(count=centroids.get_current_count(), n_members=n, dimension=centroids.dim, ef=ef,
                         persona_source=persona_source, members_carry=members_carry, seed=seed,
                         granularity=granularity, refinement=refined, **names)
    old_files = set(_info_files(old))
    kept = manifest.model_copy(update={"files": [f for f in manifest.files if f.path not in old_files],
                                       "prototypes": info})
    new_manifest = with_files(root, kept, list(names.values()) + ([refined.file] if refined else []))
    write_manifest(root, new_manifest)  # the switch: before this line the old generation is the bundle
    remove_stale_files(root, new_manifest)
    return new_manifest


def _fresh_hnsw(vectors: np.ndarray, *, dimension: int, seed: int, ef: int) -> hnswlib.Index:
    """`build_hnsw`, also for zero vectors (an index whose last member was removed)."""
    if len(vectors):
        return build_hnsw(vectors, seed=seed, ef=ef, capacity=len(vectors) + 16)
    index = hnswlib.Index(space="cosine", dim=dimension)
    index.init_index(max_elements=16, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=seed)
    index.set_ef(ef)
    return index


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


def remove_stale_files(root: Path, manifest: Manifest) -> None:
    """Delete prototype files the manifest no longer names (old generations, interrupted writes)."""
    keep = {Path(p).name for p in _info_files(manifest.prototypes)}
    directory = Path(root) / PROTO_DIR
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        name = path.name
        ours = _OUR_FILE.match(name) or (name.startswith(".") and name.endswith(".tmp"))
        if ours and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _info_files(info: PrototypeInfo | None) -> list[str]:
    if info is None:
        return []
    refined = [info.refinement.file] if info.refinement is not None else []
    return [info.centroids_file, info.members_index_file, info.members_file, info.assignments_file] + refined


# -- the index ---------------------------------------------------------------------------

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
    info: PrototypeInfo
    centroids: _Space
    members: _Space
    records: list[UserProfile]
    assignments: np.ndarray
    row_of: dict[str, int]
    by_prototype: list[list[int]]
    rows_of_owner: dict[str, list[int]]
    space: Optional[RefinedSpace] = None


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
        self._lock = threading.RLock()
        self._manifest = manifest
        self._state: Optional[_State] = self._load(manifest)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str = "auto", n_threads: int | None = None,
                    brute_force_below: int = BRUTE_FORCE_BELOW) -> "PrototypeIndex":
        """Load the bundle's embedder and prototype index; every mismatch is a PrototypeIndexError."""
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
        return self._live().info

    @property
    def persona_source(self) -> str:
        return self.info.persona_source

    @property
    def members_carry(self) -> str:
        return self.info.members_carry

    @property
    def granularity(self) -> str:
        return self.info.granularity

    @property
    def refined(self) -> bool:
        return self.info.refinement is not None

    @property
    def ef(self) -> int:
        return self.info.ef

    @property
    def loaded_ef(self) -> tuple[int, int]:
        """The search breadth set on the loaded (centroid, member) hnswlib indexes."""
        state = self._live()
        return state.centroids.index.ef, state.members.index.ef

    @property
    def n_members(self) -> int:
        return len(self._live().records)

    @property
    def n_prototypes(self) -> int:
        return self._live().centroids.count

    @property
    def generation(self) -> int:
        return generation_of(self.info)

    def member_ids(self) -> list[str]:
        return [r.user_id for r in self._live().records]

    def member(self, user_id: str) -> Optional[UserProfile]:
        """A member's stored record (as written, persona included), or None."""
        state = self._live()
        row = state.row_of.get(user_id)
        return None if row is None else state.records[row]

    def prototype_of(self, user_id: str) -> Optional[int]:
        state = self._live()
        row = state.row_of.get(user_id)
        return None if row is None else int(state.assignments[row])

    def members_of(self, owner: str) -> list[str]:
        """The member ids that belong to a user (one, or one per chain)."""
        state = self._live()
        return [state.records[r].user_id for r in state.rows_of_owner.get(owner, [])]

    # -- queries -------------------------------------------------------------------------

    def embed(self, text: str, *, query: bool = True) -> np.ndarray:
        """A persona (or prompt) looked up at query time: embedded as a query (with the embedder's
        query prefix, if it has one); members were embedded as documents."""
        return self._embed_texts([text], query=query)[0]

    def _embed_texts(self, texts: list[str], *, query: bool = False) -> np.ndarray:
        if self.embedder is None:
            raise ConfigError("this PrototypeIndex was loaded without an embedder; pass vectors, or load it "
                              "with PrototypeIndex.from_bundle")
        for text in texts:
            if not isinstance(text, str):
                raise ConfigError(f"persona text must be a string, got {type(text).__name__}")
        return self.embedder.embed(texts, query=query)

    def query_vector(self, persona_text: str, *, history: Sequence = (), query: Optional[str] = None) -> np.ndarray:
        """Where a user stands in the index: their persona's embedding, or with refined prototypes
        the refined vector from the persona, the first history pairs and the query (its prompt
        embedding; without one, the mean of the history prompts)."""
        vec = self.embed(persona_text)
        space = self._live().space
        if space is None:
            return vec
        return self._refined_vector(space, vec, history, query)

    def _refined_vector(self, space: RefinedSpace, persona_vec: np.ndarray, history: Sequence,
                        query: Optional[str]) -> np.ndarray:
        limit = self.info.refinement.history_pairs  # type: ignore[union-attr]
        prompts, diffs = history_arrays(lambda t: self._embed_texts(t), history, limit=limit)
        if not len(prompts):
            prompts = diffs = np.zeros((0, space.dimension), np.float32)
        q = self.embed(query) if query is not None else mean_query(prompts, persona_vec)
        return space.vector(space.anchor_of(persona_vec), q, prompts, diffs)

    def nearest_prototype(self, vec_or_text) -> int:
        """The prototype whose centroid is most similar to a vector or a persona text."""
        with self._lock:
            state = self._live()
            return state.centroids.search(self._query(vec_or_text, state), 1)[0][0]

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
        with self._lock:
            state = self._live()
            q = self._query(vec, state)
            skip = frozenset(state.rows_of_owner.get(exclude, ())) if exclude is not None else frozenset()
            picked: list[tuple[int, float]] = []
            if n > 0:
                for proto, _ in state.centroids.search(q, state.centroids.count):
                    candidates = [r for r in state.by_prototype[proto] if r not in skip]
                    picked += state.members.search(q, n - len(picked), candidates)
                    if len(picked) >= n:
                        break
            picked.sort(key=lambda t: (-t[1], t[0]))
            return [(self._as_neighbor(state.records[row], state.info), sim) for row, sim in picked]

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
        with self._lock, writer_lock(self.root):
            on_disk, state = self._sync_with_disk()
            if state.info.granularity == "chain":
                return self._replace_chains(on_disk, state, profile, persona_text)
            q = self._query(self._member_vector(state, profile, persona_text) if vector is None else vector, state)
            proto = state.centroids.search(q, 1)[0][0]
            record = member_record(profile, persona_text, state.info.members_carry)
            row = state.row_of.get(profile.user_id, len(state.records))
            records = list(state.records)
            assignments = state.assignments.copy()
            if row == len(records):
                records.append(record)
                assignments = np.append(assignments, np.int32(proto))
            else:
                records[row] = record
                assignments[row] = proto
            try:
                members = state.members.index
                if row >= members.get_max_elements():
                    members.resize_index(max(16, 2 * members.get_max_elements()))
                members.add_items(q[None, :], np.array([row]), num_threads=1)  # replaces an existing label
                self._manifest = write_generation(
                    self.root, on_disk, centroids=state.centroids.index, members=members, records=records,
                    assignments=assignments, ef=state.info.ef, persona_source=state.info.persona_source,
                    members_carry=state.info.members_carry, seed=state.info.seed)
            except BaseException:
                self._state = self._load(read_manifest(self.root))  # memory follows what is on disk
                raise
            self._state = self._with_records(state, self._manifest.prototypes, records, assignments)
            return proto

    def _member_vector(self, state: _State, profile: UserProfile, persona_text: str) -> np.ndarray:
        vec = self._embed_texts([persona_text])[0]
        if state.space is None:
            return vec
        return self._refined_vector(state.space, vec, profile.history, None)

    def _replace_chains(self, on_disk: Manifest, state: _State, profile: UserProfile, persona_text: str) -> int:
        from .protocol import persona_from_history

        chains = chain_members(profile, seed=state.info.seed)
        if not chains:
            raise ConfigError(f"user {profile.user_id!r} has no history items to make chain members of")
        llm = state.info.persona_source == "llm"
        texts = [persona_text if llm else persona_from_history(c) for c in chains]
        vectors = np.stack([self._query(self._member_vector(state, c, t), state) for c, t in zip(chains, texts)])
        protos = [state.centroids.search(v, 1)[0][0] for v in vectors]
        new = [member_record(c, t, state.info.members_carry) for c, t in zip(chains, texts)]
        self._rewrite(on_disk, state, drop=profile.user_id, records=new, vectors=vectors,
                      assignments=np.asarray(protos, np.int32))
        return int(protos[0])

    def _rewrite(self, on_disk: Manifest, state: _State, *, drop: str, records: list[UserProfile],
                 vectors: np.ndarray, assignments: np.ndarray) -> None:
        """Write a generation without `drop`'s members and with `records` added; the member graph is
        built afresh (a removed element's vector would otherwise stay in the file)."""
        gone = set(state.rows_of_owner.get(drop, ()))
        keep = [r for r in range(len(state.records)) if r not in gone]
        old = (np.asarray(state.members.index.get_items(keep, return_type="numpy"), dtype=np.float32)
               if keep else np.zeros((0, state.info.dimension), np.float32))
        all_vectors = np.concatenate([old, np.asarray(vectors, np.float32).reshape(-1, state.info.dimension)])
        all_records = [state.records[r] for r in keep] + list(records)
        all_assignments = np.concatenate([state.assignments[keep], np.asarray(assignments, np.int32)])
        members = _fresh_hnsw(all_vectors, dimension=state.info.dimension, seed=state.info.seed, ef=state.info.ef)
        try:
            self._manifest = write_generation(
                self.root, on_disk, centroids=state.centroids.index, members=members, records=all_records,
                assignments=all_assignments, ef=state.info.ef, persona_source=state.info.persona_source,
                members_carry=state.info.members_carry, seed=state.info.seed)
        except BaseException:
            self._state = self._load(read_manifest(self.root))
            raise
        members.set_num_threads(self._n_threads)
        space = _Space(members, brute_force_below=self._brute_force_below)
        live = replace(state, members=space)
        self._state = self._with_records(live, self._manifest.prototypes, all_records, all_assignments)

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
        with self._lock, writer_lock(self.root):
            on_disk, state = self._sync_with_disk()
            removed = len(state.rows_of_owner.get(user_id, ()))
            if not removed:
                return 0
            self._rewrite(on_disk, state, drop=user_id, records=[],
                          vectors=np.zeros((0, state.info.dimension), np.float32),
                          assignments=np.zeros(0, np.int32))
            forget_persona_checkpoint(self.root, user_id)
            return removed

    def close(self) -> None:
        with self._lock:
            self._state = None
            self.embedder = None

    def __enter__(self) -> "PrototypeIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------

    def _sync_with_disk(self) -> tuple[Manifest, _State]:
        """The manifest on disk and the state loaded from it; call holding the locks of an update."""
        on_disk = read_manifest(self.root)
        if on_disk.prototypes != self._manifest.prototypes:  # another process updated it
            self._state = self._load(on_disk)
        self._manifest = on_disk
        return on_disk, self._live()

    def _live(self) -> _State:
        if self._state is None:
            raise ConfigError("this PrototypeIndex is closed")
        return self._state

    def _query(self, vec_or_text, state: _State) -> np.ndarray:
        vec = self.embed(vec_or_text) if isinstance(vec_or_text, str) else vec_or_text
        q = np.asarray(vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != state.info.dimension:
            raise ConfigError(f"query vector has dimension {q.shape[0]}; the index has {state.info.dimension}")
        return unit_rows(q[None, :])[0]

    @staticmethod
    def _as_neighbor(record: UserProfile, info: PrototypeInfo) -> UserProfile:
        # A persona-only member is rendered with its persona in place of the history.
        if info.members_carry == "persona" or (not record.history and not record.stated_preferences):
            return UserProfile(user_id=record.user_id, history=[], stated_preferences=record.persona,
                               persona=record.persona)
        return record

    def _load(self, manifest: Manifest) -> _State:
        info = manifest.prototypes
        if info is None:
            raise PrototypeIndexError(f"bundle {self.root} has no prototype index")
        sizes = {f.path: f.size for f in manifest.files}
        paths = {}
        for rel in _info_files(info):
            if rel not in sizes:
                raise PrototypeIndexError(f"manifest names {rel} but does not list its size and sha256")
            path = Bundle(self.root, manifest).path(rel)
            if not path.is_file() or path.stat().st_size != sizes[rel]:
                raise PrototypeIndexError(f"prototype file {rel} is missing or its size differs from the "
                                          "manifest; rebuild the prototypes")
            paths[rel] = path
        records = _read_records(paths[info.members_file], info.n_members)
        assignments = _read_assignments(paths[info.assignments_file], info.n_members, info.count)
        space = dict(brute_force_below=self._brute_force_below)
        centroids = _Space(load_hnsw(paths[info.centroids_file], dimension=info.dimension, count=info.count,
                                     ef=info.ef, what="prototype centroid"), **space)
        members = _Space(load_hnsw(paths[info.members_index_file], dimension=info.dimension,
                                   count=info.n_members, ef=info.ef, what="member", headroom=16), **space)
        for s in (centroids, members):
            s.index.set_num_threads(self._n_threads)
        space = _read_space(paths[info.refinement.file], info) if info.refinement is not None else None
        return self._with_records(_State(info, centroids, members, [], np.zeros(0, np.int32), {}, [], {}, space),
                                  info, records, assignments)

    @staticmethod
    def _with_records(state: _State, info: PrototypeInfo, records: list[UserProfile],
                      assignments: np.ndarray) -> _State:
        by_prototype: list[list[int]] = [[] for _ in range(info.count)]
        for row, proto in enumerate(assignments.tolist()):
            by_prototype[proto].append(row)
        rows_of_owner: dict[str, list[int]] = {}
        for row, r in enumerate(records):
            rows_of_owner.setdefault(member_owner(r.user_id, info.granularity), []).append(row)
        return _State(info=info, centroids=state.centroids, members=state.members, records=records,
                      assignments=assignments, row_of={r.user_id: i for i, r in enumerate(records)},
                      by_prototype=by_prototype, rows_of_owner=rows_of_owner, space=state.space)


def _read_records(path: Path, expected: int) -> list[UserProfile]:
    records = []
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = UserProfile.validate_obj(orjson.loads(line))
        except (orjson.JSONDecodeError, RecordError) as exc:
            raise PrototypeIndexError(f"{path.name} line {lineno}: {exc}") from exc
        if record.user_id in seen:
            raise PrototypeIndexError(f"{path.name} line {lineno}: user_id {record.user_id!r} appears twice")
        seen.add(record.user_id)
        records.append(record)
    if len(records) != expected:
        raise PrototypeIndexError(f"{path.name} holds {len(records)} member records but the manifest says "
                                  f"{expected}; rebuild the prototypes")
    return records


def _read_space(path: Path, info: PrototypeInfo) -> RefinedSpace:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return RefinedSpace.from_arrays(dict(arrays), dimension=info.dimension, count=info.count,
                                            where=path.name)
    except (ValueError, OSError, EOFError) as exc:
        raise PrototypeIndexError(f"{path.name} is not a valid .npz file: {exc}") from exc


def _read_assignments(path: Path, expected: int, count: int) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError for malformed files
        raise PrototypeIndexError(f"{path.name} is not a valid .npy file: {exc}") from exc
    if arr.shape != (expected,) or not np.issubdtype(arr.dtype, np.integer):
        raise PrototypeIndexError(f"{path.name} holds {arr.dtype} {arr.shape}; expected {expected} integers "
                                  "(one per member)")
    if expected and (arr.min() < 0 or arr.max() >= count):
        raise PrototypeIndexError(f"{path.name} assigns a member to a prototype outside 0..{count - 1}")
    return arr.astype(np.int32)
