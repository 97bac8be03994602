"""Spherical k-means (unit vectors, cosine similarity) for `python -m export prototypes`.

Only the offline builder clusters; the runtime reads the clusters it wrote.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pgenrm_lite.errors import ConfigError
from pgenrm_lite.hnsw_files import unit_rows


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
