"""Prototype refinement (`python -m export prototypes --refine`): train, with torch, the small
model whose query-time half is `pgenrm_lite.refinement`, then move every member into the
refined space and reassign it by cosine.

Training data, per member: its history items embedded (prompt p, direction d = e(chosen) -
e(rejected)); targets are items whose choice the model must predict from the *other*
items: for a user member, up to `max_targets` of its items (seeded pick), each with the
first `history_pairs` of the rest as context; for a chain member, the item it was made
for, with its own shown history as context. The query of a target is its prompt. The
loss is the pairwise logistic loss -log sigmoid(beta * z . d) (the chosen reply should
score above the rejected one), minimised with AdamW; the weights kept are an exponential
moving average of the trained ones.

After training: each member's refined vector is `RefinedSpace.vector` (numpy, the code
the runtime runs) with its k-means prototype as anchor, its first `history_pairs` items
as context and the mean of their prompts as query; a refined prototype starts as the unit
mean of the refined vectors of its k-means members; members are then reassigned by
cosine to the most similar refined prototype, the prototypes following their members,
until no member moves.

Resumable: after every epoch the state (weights, averages, optimiser, losses) is saved
atomically to `<bundle>.refine.pt` beside the bundle, keyed by the training data and the
settings (all but the epoch count); a rerun with the same key continues from the last
finished epoch, and one asking for more epochs continues from where a shorter one ended.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pgenrm_lite._atomic import atomic_path
from pgenrm_lite._progress import Progress
from pgenrm_lite.errors import ConfigError, ExportError
from pgenrm_lite.protocol import derive_seed
from pgenrm_lite.records import Preference, RefinementInfo, UserProfile
from pgenrm_lite.refinement import RefinedSpace, mean_query


@dataclass(frozen=True)
class RefineSettings:
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    ema: float = 0.98
    batch_size: int = 32
    max_targets: int = 16
    history_pairs: int = 8

    def check(self) -> None:
        ints = (self.epochs, self.batch_size, self.max_targets, self.history_pairs)
        if any(not isinstance(v, int) or v < 1 for v in ints):
            raise ConfigError(f"refinement epochs, batch size, targets and history pairs must be positive integers, "
                              f"got {ints}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.ema < 1):
            raise ConfigError(f"refinement needs lr > 0, weight_decay >= 0 and 0 <= ema < 1 (got lr={self.lr}, "
                              f"weight_decay={self.weight_decay}, ema={self.ema})")


@dataclass
class Refined:
    vectors: np.ndarray  # [n_members, dim] unit: what the member index holds
    centroids: np.ndarray  # [k, dim] unit: refined prototypes
    labels: np.ndarray  # [n_members] int32
    space: RefinedSpace
    info: RefinementInfo
    notes: list[str] = field(default_factory=list)


class RefineModel(torch.nn.Module):
    """The torch twin of `RefinedSpace` (same names, same formula), batched over padded histories."""

    def __init__(self, centroids: np.ndarray):
        super().__init__()
        k, dim = centroids.shape
        eye = torch.eye(dim)
        self.anchors = torch.nn.Parameter(torch.tensor(centroids, dtype=torch.float32))
        self.w_attn = torch.nn.Parameter(eye.clone())
        self.w_diff = torch.nn.Parameter(torch.zeros(dim))
        self.w_query = torch.nn.Parameter(eye.clone())
        self.w_hist = torch.nn.Parameter(eye.clone())
        # l_a sharpens attention over unit-vector similarities; the history's direction (the
        # user's own) starts at twice the anchor, the query (shared by all who ask it) at a
        # quarter; beta scales z . d into logits
        self.scales = torch.nn.Parameter(torch.tensor([5.0, 0.25, 2.0, 10.0]))

    def z(self, anchor, query, prompts, diffs, mask):
        logits = self.scales[0] * torch.einsum("bhd,bd->bh", prompts, query @ self.w_attn) + diffs @ self.w_diff
        logits = logits.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a target without context: v = 0
        v = torch.einsum("bh,bhd->bd", weights, diffs)
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return self.anchors[anchor] + self.scales[1] * query @ self.w_query.T + self.scales[2] * v @ self.w_hist.T

    def loss(self, batch) -> torch.Tensor:
        anchor, query, prompts, diffs, mask, target = batch
        z = self.z(anchor, query, prompts, diffs, mask)
        z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)  # unit, as the runtime compares
        return torch.nn.functional.softplus(-self.scales[3] * (z * target).sum(dim=1)).mean()

    def space(self, kmeans_centroids: np.ndarray) -> RefinedSpace:
        def arr(p):
            return p.detach().cpu().numpy().astype(np.float32)

        return RefinedSpace(kmeans_centroids=kmeans_centroids.astype(np.float32), anchors=arr(self.anchors),
                            w_attn=arr(self.w_attn), w_diff=arr(self.w_diff), w_query=arr(self.w_query),
                            w_hist=arr(self.w_hist), scales=arr(self.scales))


def refine(members: Sequence[UserProfile], targets: Sequence[Optional[Preference]], persona_vectors: np.ndarray,
           centroids: np.ndarray, labels: np.ndarray, embed: Callable[[list[str]], np.ndarray], *,
           settings: RefineSettings, seed: int, checkpoint: Optional[Path] = None,
           progress: Optional[bool] = None, report: Callable[[str], None] = lambda s: None) -> Refined:
    """Train the refinement on `members` (a chain member's own item in `targets`, None for a user
    member) and return the members' refined vectors, prototypes and assignments."""
    settings.check()
    dim = persona_vectors.shape[1]
    picks = _picks(members, targets, labels, settings, seed)
    used = [p for _, pair, context in picks for p in [pair] + context]
    used += [p for m in members for p in list(m.history)[:settings.history_pairs]]
    table = _TextTable(embed, [t for p in used for t in (p.prompt, p.chosen, p.rejected)], dim, progress)
    examples = [(c, *table.pair(pair), *table.history(context, 10**9)) for c, pair, context in picks]
    examples = [(c, q, p, d, target) for c, q, target, p, d in examples]
    if not examples:
        raise ExportError("no member has two history items (or a chain item): nothing to train refinement on")
    data = _tensors(examples, settings.history_pairs, dim)
    key = _key(data, centroids, settings, seed)

    torch.manual_seed(seed & 0xFFFFFFFF)
    model = RefineModel(centroids)
    ema = RefineModel(centroids)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    with torch.no_grad():
        loss_before = float(model.loss(data))
    done = 0
    state = _read_checkpoint(checkpoint, key)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        done = int(state["epochs_done"])
        report(f"refinement: resuming after epoch {done} from {checkpoint}")
    n = len(examples)
    steps = (n + settings.batch_size - 1) // settings.batch_size
    with Progress(steps * (settings.epochs - done), "refining prototypes", unit="step", enabled=progress) as bar:
        for epoch in range(done, settings.epochs):
            order = np.random.default_rng(derive_seed(seed, "refine-epoch", epoch)).permutation(n)
            for start in range(0, n, settings.batch_size):
                idx = torch.from_numpy(order[start:start + settings.batch_size])
                loss = model.loss(tuple(t[idx] for t in data))
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.mul_(settings.ema).add_(pm, alpha=1.0 - settings.ema)
                bar.update(1)
            _write_checkpoint(checkpoint, key, epoch + 1, model, ema, opt)
    with torch.no_grad():
        loss_after = float(ema.loss(data))
    space = ema.space(centroids)

    vectors = np.stack([_member_vector(space, m, int(c), table, u, settings)
                        for m, c, u in zip(members, labels, persona_vectors)])
    refined_centroids, new_labels = _reassign(vectors, labels, centroids)
    moved = int((new_labels != labels).sum())
    info = RefinementInfo(file="", epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay,
                          ema=settings.ema, batch_size=settings.batch_size, max_targets=settings.max_targets,
                          history_pairs=settings.history_pairs, seed=seed, n_examples=n, loss_before=loss_before,
                          loss_after=loss_after, moved=moved)
    notes = [f"refinement: {n} targets, loss {loss_before:.4f} -> {loss_after:.4f} (EMA weights), "
             f"{moved} of {len(members)} members reassigned"]
    empty = int(len(centroids) - len(np.unique(new_labels)))
    if empty:
        notes.append(f"refinement: {empty} refined prototype(s) kept no member")
    return Refined(vectors=vectors, centroids=refined_centroids, labels=new_labels, space=space, info=info,
                   notes=notes)


# -- data --------------------------------------------------------------------------------

class _TextTable:
    """Each distinct text embedded once (chain members share their user's items)."""

    def __init__(self, embed, texts: list[str], dim: int, progress: Optional[bool]):
        unique = list(dict.fromkeys(texts))
        self.row = {t: i for i, t in enumerate(unique)}
        self.vectors = np.zeros((len(unique), dim), np.float32)
        batch = 64
        with Progress(len(unique), "embedding history texts", enabled=progress) as bar:
            for i in range(0, len(unique), batch):
                chunk = unique[i:i + batch]
                self.vectors[i:i + len(chunk)] = embed(chunk)
                bar.update(len(chunk))

    def pair(self, p: Preference) -> tuple[np.ndarray, np.ndarray]:
        return self.vectors[self.row[p.prompt]], self.vectors[self.row[p.chosen]] - self.vectors[self.row[p.rejected]]

    def history(self, pairs: Sequence[Preference], limit: int) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.pair(p) for p in list(pairs)[:limit]]
        if not rows:
            dim = self.vectors.shape[1]
            return np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32)
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def _picks(members, targets, labels, settings: RefineSettings, seed: int) -> list[tuple]:
    """(anchor, target pair, context pairs) for every training target."""
    out = []
    for m, target, c in zip(members, targets, labels):
        items = list(m.history)
        if target is not None:  # a chain member: its own item, its shown history as context
            picks = [(target, items)]
        else:
            if len(items) < 2:
                continue
            order = np.random.default_rng(derive_seed(seed, "refine-targets", m.user_id)).permutation(len(items))
            picks = [(items[t], [p for i, p in enumerate(items) if i != t])
                     for t in sorted(order[:settings.max_targets])]
        out += [(int(c), pair, list(context)[:settings.history_pairs]) for pair, context in picks]
    return out


def _tensors(examples, h: int, dim: int):
    n = len(examples)
    anchor = torch.tensor([e[0] for e in examples], dtype=torch.long)
    query = torch.tensor(np.stack([e[1] for e in examples]))
    prompts = torch.zeros((n, h, dim))
    diffs = torch.zeros((n, h, dim))
    mask = torch.zeros((n, h), dtype=torch.bool)
    for i, (_, _, p, d, _) in enumerate(examples):
        prompts[i, :len(p)] = torch.from_numpy(p)
        diffs[i, :len(d)] = torch.from_numpy(d)
        mask[i, :len(p)] = True
    target = torch.tensor(np.stack([e[4] for e in examples]))
    return anchor, query, prompts, diffs, mask, target


def _member_vector(space: RefinedSpace, member: UserProfile, anchor: int, table: _TextTable, persona: np.ndarray,
                   settings: RefineSettings) -> np.ndarray:
    prompts, diffs = table.history(member.history, settings.history_pairs)
    return space.vector(anchor, mean_query(prompts, persona), prompts, diffs)


def _reassign(vectors: np.ndarray, labels: np.ndarray, centroids: np.ndarray, max_iter: int = 50
              ) -> tuple[np.ndarray, np.ndarray]:
    """Refined prototypes start as the unit means of their k-means members' refined vectors; members
    then move to their most similar prototype and prototypes follow, until nobody moves."""
    current = np.asarray(labels)
    refined = np.stack([_unit_mean(vectors[current == c], centroids[c]) for c in range(len(centroids))])
    for _ in range(max_iter):
        new = (vectors @ refined.T).argmax(axis=1)
        if np.array_equal(new, current):
            break
        current = new
        refined = np.stack([_unit_mean(vectors[current == c], refined[c]) for c in range(len(centroids))])
    return refined.astype(np.float32), current.astype(np.int32)


def _unit_mean(rows: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    if not len(rows):
        return fallback
    mean = rows.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 1e-12 else fallback


# -- checkpoint --------------------------------------------------------------------------

def checkpoint_path(bundle_dir: Path) -> Path:
    bundle_dir = Path(bundle_dir).resolve()
    return bundle_dir.with_name(bundle_dir.name + ".refine.pt")


def _key(data, centroids: np.ndarray, settings: RefineSettings, seed: int) -> str:
    h = hashlib.sha256()
    for t in data:
        h.update(t.numpy().tobytes())
    h.update(np.ascontiguousarray(centroids, np.float32).tobytes())
    # epochs stay out of the key: a run asked for more epochs continues a shorter one
    h.update(repr((dataclasses.replace(settings, epochs=0), seed)).encode())
    return h.hexdigest()


def _read_checkpoint(path: Optional[Path], key: str) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # torn or foreign file: start over
        return None
    return state if isinstance(state, dict) and state.get("key") == key else None


def _write_checkpoint(path: Optional[Path], key: str, epochs_done: int, model, ema, opt) -> None:
    if path is None:
        return
    with atomic_path(path) as tmp:
        torch.save({"key": key, "epochs_done": epochs_done, "model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict()}, str(tmp))
