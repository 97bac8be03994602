"""Generations of prototype files in a bundle: the file layout, reading one, writing the next, locking.

Files, all under `prototypes/` in the bundle and named by a generation number N:

    centroids.gN.hnsw     hnswlib index (cosine) of the prototype centroids, labels 0..count-1
    members.gN.hnsw       hnswlib index (cosine) of the members' persona embeddings; label = row
    members.gN.jsonl      one `UserProfile` per row; with members_carry="persona" only the
                          user_id and the persona text (no preference pair of anyone ships)
    assignments.gN.npy    int32 [n_members]: each member's prototype
    refinement.gN.npz     only for refined prototypes: the arrays that place a query user in
                          the refined space (see `refinement`); members and centroids above
                          then hold refined vectors

An update writes generation N+1 beside N (each file: temp file, fsync, rename), then
switches by rewriting `manifest.json` atomically (its sha256/size entries name the new
files), then deletes generation N. A crash at any point leaves a manifest that names one
complete generation; loading follows the manifest, and leftovers are removed by the next
update. One writer at a time: updates take an exclusive lock file (POSIX). A process that
is loading while another one switches generations can find the old files gone: it gets a
PrototypeIndexError and can simply load again.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, Optional, Sequence, TypeVar

import hnswlib
import numpy as np
import orjson

from ._atomic import atomic_path
from .bundle import Bundle, read_manifest, with_files, write_manifest
from .errors import ConfigError, PrototypeIndexError, RecordError
from .hnsw_files import load_hnsw
from .members import GRANULARITIES
from .records import Manifest, PrototypeInfo, UserProfile
from .refinement import RefinedSpace

PROTO_DIR = "prototypes"
LOCK_FILE = ".lock"
MEMBER_HEADROOM = 16  # free member slots a loaded index keeps, so an addition need not resize it
_GENERATION = re.compile(r"\.g(\d+)\.")
_OUR_FILE = re.compile(r"^(centroids|members|assignments|refinement)\.g(\d+)\.(hnsw|jsonl|npy|npz)$")
_CARRY = "carry"
State = TypeVar("State")


# -- the layout ----------------------------------------------------------------------------

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


def info_files(info: PrototypeInfo | None) -> list[str]:
    """The files a generation consists of (bundle-relative), as its manifest entry names them."""
    if info is None:
        return []
    refined = [info.refinement.file] if info.refinement is not None else []
    return [info.centroids_file, info.members_index_file, info.members_file, info.assignments_file] + refined


# -- reading one ---------------------------------------------------------------------------

@dataclass
class Generation:
    """One generation's files, loaded and checked against the manifest."""
    info: PrototypeInfo
    centroids: hnswlib.Index
    members: hnswlib.Index  # with MEMBER_HEADROOM free slots
    records: list[UserProfile]
    assignments: np.ndarray  # int32 [n_members]
    space: Optional[RefinedSpace]


def read_generation(root: Path, manifest: Manifest) -> Generation:
    """Load the generation `manifest` names; every missing or malformed file is a PrototypeIndexError."""
    info = manifest.prototypes
    if info is None:
        raise PrototypeIndexError(f"bundle {root} has no prototype index")
    sizes = {f.path: f.size for f in manifest.files}
    paths = {}
    for rel in info_files(info):
        if rel not in sizes:
            raise PrototypeIndexError(f"manifest names {rel} but does not list its size and sha256")
        path = Bundle(root, manifest).path(rel)
        if not path.is_file() or path.stat().st_size != sizes[rel]:
            raise PrototypeIndexError(f"prototype file {rel} is missing or its size differs from the "
                                      "manifest; rebuild the prototypes")
        paths[rel] = path
    records = _read_records(paths[info.members_file], info.n_members)
    assignments = _read_assignments(paths[info.assignments_file], info.n_members, info.count)
    centroids = load_hnsw(paths[info.centroids_file], dimension=info.dimension, count=info.count, ef=info.ef,
                          what="prototype centroid")
    members = load_hnsw(paths[info.members_index_file], dimension=info.dimension, count=info.n_members,
                        ef=info.ef, what="member", headroom=MEMBER_HEADROOM)
    space = _read_space(paths[info.refinement.file], info) if info.refinement is not None else None
    return Generation(info, centroids, members, records, assignments, space)


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


# -- writing the next ----------------------------------------------------------------------

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
    refined = _write_refinement(root, old, refinement, generation)
    with atomic_path(root / names["centroids_file"]) as tmp:
        centroids.save_index(str(tmp))
    with atomic_path(root / names["members_index_file"]) as tmp:
        members.save_index(str(tmp))
    with atomic_path(root / names["members_file"]) as tmp:
        tmp.write_bytes(b"".join(orjson.dumps(r.model_dump(mode="json", exclude_defaults=True)) + b"\n"
                                 for r in records))
    with atomic_path(root / names["assignments_file"]) as tmp, open(tmp, "wb") as fh:
        np.save(fh, assignments, allow_pickle=False)
    # Validated like a manifest read from disk: the literal fields arrive as plain strings.
    info = PrototypeInfo.model_validate(dict(
        count=centroids.get_current_count(), n_members=n, dimension=centroids.dim, ef=ef,
        persona_source=persona_source, members_carry=members_carry, seed=seed, granularity=granularity,
        refinement=refined, **names))
    old_files = set(info_files(old))
    kept = manifest.model_copy(update={"files": [f for f in manifest.files if f.path not in old_files],
                                       "prototypes": info})
    new_manifest = with_files(root, kept, list(names.values()) + ([refined.file] if refined else []))
    write_manifest(root, new_manifest)  # the switch: before this line the old generation is the bundle
    remove_stale_files(root, new_manifest)
    return new_manifest


def _write_refinement(root: Path, old: PrototypeInfo | None, refinement, generation: int):
    """The new generation's RefinementInfo (None: unrefined), its arrays written (see `write_generation`)."""
    if isinstance(refinement, str) and refinement == _CARRY:
        if old is None or old.refinement is None:
            return None
        refined = old.refinement.model_copy(update={"file": refinement_file(generation)})
        with atomic_path(root / refined.file) as tmp:
            tmp.write_bytes((root / old.refinement.file).read_bytes())
        return refined
    if refinement is None:
        return None
    info_r, space = refinement
    refined = info_r.model_copy(update={"file": refinement_file(generation)})
    with atomic_path(root / refined.file) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **space.arrays())
    return refined


def write_next(root: Path, manifest: Manifest, info: PrototypeInfo, *, centroids: hnswlib.Index,
               members: hnswlib.Index, records: Sequence[UserProfile], assignments: np.ndarray) -> Manifest:
    """`write_generation` keeping the current generation's settings and refinement (on-device updates)."""
    return write_generation(root, manifest, centroids=centroids, members=members, records=records,
                            assignments=assignments, ef=info.ef, persona_source=info.persona_source,
                            members_carry=info.members_carry, seed=info.seed)


def remove_stale_files(root: Path, manifest: Manifest) -> None:
    """Delete prototype files the manifest no longer names (old generations, interrupted writes)."""
    keep = {Path(p).name for p in info_files(manifest.prototypes)}
    directory = Path(root) / PROTO_DIR
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        name = path.name
        ours = _OUR_FILE.match(name) or (name.startswith(".") and name.endswith(".tmp"))
        if ours and name not in keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# -- the one a process has loaded ----------------------------------------------------------

class LiveGeneration(Generic[State]):
    """The generation one process has loaded, kept in step with the manifest on disk.

    `load(manifest)` builds what memory holds of a generation. Calls that read take `lock`;
    an update runs inside `update()` and writes inside `switching()`.
    """

    def __init__(self, root: Path, manifest: Manifest, load: Callable[[Manifest], State]):
        self.root = Path(root)
        self.lock = threading.RLock()
        self.manifest = manifest
        self._load = load
        self._state: Optional[State] = load(manifest)

    @property
    def state(self) -> State:
        if self._state is None:
            raise ConfigError("this PrototypeIndex is closed")
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._state = state

    def close(self) -> None:
        with self.lock:
            self._state = None

    @contextlib.contextmanager
    def update(self) -> Iterator[tuple[Manifest, State]]:
        """Hold `lock` and the writer lock; yield the manifest on disk and the state loaded from it
        (reloaded when another process switched generations since)."""
        with self.lock, writer_lock(self.root):
            on_disk = read_manifest(self.root)
            if on_disk.prototypes != self.manifest.prototypes:  # another process updated it
                self._state = self._load(on_disk)
            self.manifest = on_disk
            yield on_disk, self.state

    @contextlib.contextmanager
    def switching(self) -> Iterator[None]:
        """Around an update's writes (`write_next`): on any failure memory follows what is on disk again."""
        try:
            yield
        except BaseException:
            self._state = self._load(read_manifest(self.root))
            raise
