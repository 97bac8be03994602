"""hnswlib cosine indexes: build one, check a saved file's format, load it with our own capacity.

Every index file's header is checked (structure, dimension, element count) before
hnswlib reads it, since a malformed file can crash the native loader.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from .errors import ConfigError, PrototypeIndexError

HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")  # hnswlib HierarchicalNSW::saveIndex, 0.7/0.8


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); refuses empty, non-finite or zero rows."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"expected a 2-D array of vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norms == 0):
        raise ConfigError("vectors must be finite and non-zero")
    return x / norms


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


def fresh_hnsw(vectors: np.ndarray, *, dimension: int, seed: int, ef: int) -> hnswlib.Index:
    """`build_hnsw` with room for 16 more, also for zero vectors (an index whose last member was removed)."""
    if len(vectors):
        return build_hnsw(vectors, seed=seed, ef=ef, capacity=len(vectors) + 16)
    index = hnswlib.Index(space="cosine", dim=dimension)
    index.init_index(max_elements=16, ef_construction=HNSW_EF_CONSTRUCTION, M=HNSW_M, random_seed=seed)
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
