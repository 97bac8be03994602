"""Refined prototype space: the query-time half of prototype refinement (numpy only).

`python -m export prototypes --refine` trains, with torch, a small model that predicts a
user's choice on a pair from three parts (the paper's z = a_j + l_q W_q q + l_s W_s v_H):

    z = A[c] + l_q * W_q q + l_s * W_s v
    v = unit( sum_i softmax_i(l_a * (q . W_a p_i) + w_d . d_i) * d_i )   (attention over the history)
    P(chosen preferred) = sigmoid(beta * z . d)

where c is the user's k-means prototype (by cosine to the k-means centroids), q the
query's embedding, p_i the embedding of history item i's prompt and d_i = e(chosen_i) -
e(rejected_i) its preference direction. v is scaled to unit length: a difference of two
unit vectors is short, and the history's direction, not its length, is what tells users
apart (it would otherwise vanish beside the unit anchor). The arrays below are the trained (EMA) weights;
this module turns them into a user's vector, so the runtime places a query user the same
way the builder placed every member. The formula lives here once; export/ trains its
torch twin and checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import PrototypeIndexError

ARRAY_NAMES = ("kmeans_centroids", "anchors", "w_attn", "w_diff", "w_query", "w_hist", "scales")
# scales = [l_a, l_q, l_s, beta]


@dataclass(frozen=True)
class RefinedSpace:
    kmeans_centroids: np.ndarray  # [k, dim] unit: picks a user's anchor
    anchors: np.ndarray  # [k, dim] the trained prototype vectors a_j
    w_attn: np.ndarray  # [dim, dim]
    w_diff: np.ndarray  # [dim]
    w_query: np.ndarray  # [dim, dim]
    w_hist: np.ndarray  # [dim, dim]
    scales: np.ndarray  # [4]: l_a, l_q, l_s, beta

    @property
    def dimension(self) -> int:
        return self.anchors.shape[1]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAY_NAMES}

    @classmethod
    def from_arrays(cls, arrays, *, dimension: int, count: int, where: str = "refinement file") -> "RefinedSpace":
        missing = [n for n in ARRAY_NAMES if n not in arrays]
        if missing:
            raise PrototypeIndexError(f"{where} lacks {missing}; rebuild the prototypes with --refine")
        out = {n: np.asarray(arrays[n], dtype=np.float32) for n in ARRAY_NAMES}
        k = out["anchors"].shape[0]
        want = {"kmeans_centroids": (k, dimension), "anchors": (k, dimension), "w_attn": (dimension, dimension),
                "w_diff": (dimension,), "w_query": (dimension, dimension), "w_hist": (dimension, dimension),
                "scales": (4,)}
        for name, shape in want.items():
            if out[name].shape != shape or not np.all(np.isfinite(out[name])):
                raise PrototypeIndexError(f"{where}: {name} has shape {out[name].shape} (want {shape}) or "
                                          "non-finite values; rebuild the prototypes with --refine")
        if k < 1 or count < 1:
            raise PrototypeIndexError(f"{where} holds no prototypes")
        return cls(**out)

    def anchor_of(self, persona_vec: np.ndarray) -> int:
        """A user's k-means prototype: the most similar k-means centroid to their persona."""
        return int(np.argmax(self.kmeans_centroids @ _unit(persona_vec)))

    def history_summary(self, query: np.ndarray, prompts: np.ndarray, diffs: np.ndarray) -> np.ndarray:
        """v: the history's preference directions, weighted by attention from the query."""
        if len(prompts) == 0:
            return np.zeros(self.dimension, np.float32)
        logits = self.scales[0] * (prompts @ (self.w_attn.T @ query)) + diffs @ self.w_diff
        weights = np.exp(logits - logits.max())
        return _unit((weights / weights.sum()) @ diffs)

    def vector(self, anchor: int, query: np.ndarray, prompts: np.ndarray, diffs: np.ndarray) -> np.ndarray:
        """z for one user and one query, as a unit vector (what the index compares by cosine)."""
        v = self.history_summary(query, prompts, diffs)
        z = (self.anchors[anchor] + self.scales[1] * (self.w_query @ query)
             + self.scales[2] * (self.w_hist @ v))
        return _unit(z)


def history_arrays(embed, pairs: Sequence, *, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt embeddings, chosen-minus-rejected differences) of the first `limit` pairs.

    `embed` maps a list of texts to unit rows; `pairs` are `Preference`s.
    """
    pairs = list(pairs)[:limit]
    if not pairs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    texts = [t for p in pairs for t in (p.prompt, p.chosen, p.rejected)]
    e = np.asarray(embed(texts), dtype=np.float32).reshape(len(pairs), 3, -1)
    return e[:, 0], e[:, 1] - e[:, 2]


def mean_query(prompts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """A member's stand-in query: the unit mean of its history prompts (its persona when it has none)."""
    return _unit(prompts.mean(axis=0)) if len(prompts) else _unit(fallback)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(x))
    return x / n if n > 1e-12 else x
