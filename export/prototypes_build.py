"""`python -m export prototypes`: cluster a user base into prototypes and write the index into a bundle.

Per member: a persona text, embedded with the bundle's embedder; seeded spherical k-means
(k clamped to the member count; clusters left empty are dropped); each member assigned to
its nearest prototype; the files written through `pgenrm_lite.prototype_files.write_generation`
(the one place that knows the layout) and the manifest switched atomically.

Persona sources:
- `history`: the member's history text itself (`protocol.persona_from_history`); fast.
- `llm` (the paper's): PART 1 (`analysis`) of one chain written by the bundle's LLM. The
  chain judges one of the member's own pairs (seeded pick) with the member's *other*
  pairs as the shown history, through the Scorer (so the real template, grammar and
  context fitting apply). A member whose chain fails to parse falls back to the history
  text, and the count is reported. Finished personas are appended to a checkpoint file
  `<bundle>.personas.jsonl` beside the bundle (appended and flushed per member), so an
  interrupted build resumes; entries are keyed by the member's data, the model file's
  sha256, the seed and the sampling options, so stale ones are never reused. The file is
  kept after the build: rebuilding with another k reuses every persona.

Members (`--members`): `user` makes one member per user; `chain` (the paper's) one member
per train/val item of a user, id `<user_id>#<item>`, whose history is up to three of the
user's other items (`pgenrm_lite.members.chain_members`); its LLM persona is PART 1 of
the chain judging that item with that history.

`--refine` trains the refinement model on the members' histories after k-means and puts
the index in the refined space (`export/prototype_refine.py`); the manifest records the
settings and the runtime reads the exported arrays (no torch at run time).

Members with neither history nor stated preferences are skipped: as neighbours they
would show the model nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import orjson

from export.kmeans import explained_variance, kmeans
from pgenrm_lite import protocol
from pgenrm_lite._progress import Progress
from pgenrm_lite.bundle import Bundle, read_manifest
from pgenrm_lite.datasets import load_hh, load_rows, users_from_rows
from pgenrm_lite.errors import ConfigError, ExportError
from pgenrm_lite.hnsw_files import build_hnsw
from pgenrm_lite.members import chain_members, member_record, persona_checkpoint_path
from pgenrm_lite.prototype_files import write_generation, writer_lock
from pgenrm_lite.records import Preference, PrototypeInfo, UserProfile

EMBED_BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="users: PersonalRewardBench rows (.jsonl[.gz]/.json) "
                        "or, with --format hh, the two-user HH file")
    parser.add_argument("--bundle", required=True, type=Path, help="the bundle to add the index to (needs an embedder)")
    parser.add_argument("--k", type=int, default=50, help="number of prototypes (clamped to the members; default 50)")
    parser.add_argument("--format", choices=("prb", "hh"), default="prb", help="data format (default prb)")
    parser.add_argument("--persona-source", choices=("history", "llm"), default="history",
                        help="history text (fast, default) or PART 1 of a chain by the bundle's LLM (the paper's)")
    parser.add_argument("--members-carry", choices=("history", "persona"), default="history",
                        help="what a member record ships: their preference pairs (the paper) or only the persona")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ef", type=int, default=64, help="hnswlib search breadth stored in the manifest")
    parser.add_argument("--users-per-objective", type=int, default=1,
                        help="hh only: split each objective into this many pseudo-users")
    parser.add_argument("--limit-users", type=int, default=None, help="use only the first N users of the file")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="llm only: token budget of a persona chain (default: the Scorer's)")
    parser.add_argument("--members", choices=("user", "chain"), default="user",
                        help="one member per user (default) or one per train/val item with that item's "
                        "history (the paper's)")
    parser.add_argument("--refine", action="store_true",
                        help="refine the k-means prototypes with the attention model over members' histories")
    parser.add_argument("--refine-epochs", type=int, default=1)
    parser.add_argument("--refine-lr", type=float, default=1e-3)
    parser.add_argument("--refine-ema", type=float, default=0.98)
    parser.add_argument("--refine-batch", type=int, default=32)
    parser.add_argument("--refine-history", type=int, default=8,
                        help="history items a member's refined vector reads (and a query user's)")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    users = read_users(args.data, fmt=args.format, users_per_objective=args.users_per_objective,
                       limit_users=args.limit_users, splits=SPLITS[args.members])
    refine = None
    if args.refine:
        from export.prototype_refine import RefineSettings

        refine = RefineSettings(epochs=args.refine_epochs, lr=args.refine_lr, ema=args.refine_ema,
                                batch_size=args.refine_batch, history_pairs=args.refine_history)
    info = build_prototypes(args.bundle, users, k=args.k, persona_source=args.persona_source,
                            members_carry=args.members_carry, seed=args.seed, ef=args.ef,
                            max_tokens=args.max_tokens, members=args.members, refine=refine, report=print)
    print(f"{info.n_members} {info.granularity} members in {info.count} prototypes (dim {info.dimension}, "
          f"ef {info.ef}, {info.persona_source} personas, records carry {info.members_carry}"
          f"{', refined' if info.refinement else ''}) written to {args.bundle} "
          f"in {time.monotonic() - start:.1f}s")
    return 0


# Rows that make a member's history: chain members are the official train/val items.
SPLITS = {"user": ("train",), "chain": ("train", "val")}


def read_users(path: Path, *, fmt: str = "prb", users_per_objective: int = 1,
               limit_users: Optional[int] = None, splits: tuple[str, ...] = ("train",)) -> dict[str, UserProfile]:
    if fmt == "hh":
        rows = load_hh(path, users_per_objective=users_per_objective)
    elif users_per_objective != 1:
        raise ConfigError("--users-per-objective applies to --format hh only")
    else:
        rows = load_rows(path)
    users = users_from_rows(rows, splits=splits)
    if limit_users is not None:
        if limit_users < 1:
            raise ConfigError(f"--limit-users must be >= 1, got {limit_users}")
        users = dict(list(users.items())[:limit_users])
    return users


def build_prototypes(bundle_dir: str | os.PathLike, users: dict[str, UserProfile], *, k: int = 50,
                     persona_source: str = "history", members_carry: str = "history", seed: int = 0,
                     ef: int = 64, progress: Optional[bool] = None, max_tokens: Optional[int] = None,
                     scorer_options: Optional[dict] = None, members: str = "user", refine=None,
                     report: Callable[[str], None] = lambda s: None) -> PrototypeInfo:
    """Build the prototype index of `users` into the bundle at `bundle_dir`; return its manifest entry.

    `progress`: draw progress bars (None: only on a terminal). `report` receives one-line
    notes. `scorer_options` go to `Scorer.from_bundle` for LLM personas (e.g. n_threads,
    analysis_chars). `members`: "user" or "chain"; `refine`: `RefineSettings` to refine.
    """
    root = Path(bundle_dir)
    if persona_source not in ("history", "llm"):
        raise ConfigError(f"persona_source must be 'history' or 'llm', got {persona_source!r}")
    if members_carry not in ("history", "persona"):
        raise ConfigError(f"members_carry must be 'history' or 'persona', got {members_carry!r}")
    if members not in ("user", "chain"):
        raise ConfigError(f"members must be 'user' or 'chain', got {members!r}")
    if not isinstance(k, int) or k < 1 or not isinstance(ef, int) or ef < 1:
        raise ConfigError(f"k and ef must be positive integers (k={k!r}, ef={ef!r})")
    bundle = Bundle.open(root, verify="size")
    emb = bundle.manifest.embedder
    if emb is None:
        raise ExportError(f"bundle {root} has no embedder; rebuild it with "
                          "`python -m export bundle --gguf FILE --embedder DIR --out DIR` first")
    if members_carry == "persona" and persona_source == "history":
        warnings.warn("members_carry='persona' with persona_source='history': the persona *is* the history "
                      "text, so member records still carry raw preference pairs", UserWarning, stacklevel=2)
    granularity = members
    kept = [u for u in users.values() if u.history or u.stated_preferences]
    if len(kept) < len(users):
        report(f"skipped {len(users) - len(kept)} user(s) with no history and no stated preferences")
    if not kept:
        raise ExportError("no user with a preference history to build prototypes from")
    members, targets = member_list(kept, granularity, seed=seed)

    if persona_source == "llm":
        personas = llm_personas(root, members, seed=seed, max_tokens=max_tokens, progress=progress,
                                scorer_options=scorer_options or {}, report=report, targets=targets)
    else:
        personas = [protocol.persona_from_history(u) for u in members]

    from pgenrm_lite.embedder import Embedder

    embedder = Embedder.from_dir(bundle.path(emb.dir), device="cpu")
    vectors = np.empty((len(personas), embedder.dimension), dtype=np.float32)
    with Progress(len(personas), "embedding personas", enabled=progress) as bar:
        for i in range(0, len(personas), EMBED_BATCH):
            chunk = personas[i:i + EMBED_BATCH]
            vectors[i:i + len(chunk)] = embedder.embed(chunk)
            bar.update(len(chunk))

    return index_members(root, members, personas, vectors, k=k, persona_source=persona_source,
                         members_carry=members_carry, seed=seed, ef=ef, report=report, granularity=granularity,
                         refine=refine, targets=targets, embed=embedder.embed, progress=progress)


def member_list(users: list[UserProfile], granularity: str, *, seed: int
                ) -> tuple[list[UserProfile], list[Optional[Preference]]]:
    """The members and, for chain members, the item each was made for (None for user members)."""
    if granularity == "user":
        return list(users), [None] * len(users)
    members, targets = [], []
    for u in users:
        chains = chain_members(u, seed=seed)
        members += chains
        targets += list(u.history)
        if not chains:  # stated preferences only: one member as in user mode
            members.append(u)
            targets.append(None)
    return members, targets


def index_members(bundle_dir: str | os.PathLike, members: list[UserProfile], personas: list[str],
                  vectors: np.ndarray, *, k: int, persona_source: str, members_carry: str, seed: int = 0,
                  ef: int = 64, report: Callable[[str], None] = lambda s: None, granularity: str = "user",
                  refine=None, targets: Optional[list] = None, embed=None,
                  progress: Optional[bool] = None) -> PrototypeInfo:
    """Cluster already embedded personas (optionally refine) and write the index into the bundle
    (the builder's second half). Refinement needs `embed` (texts -> unit rows) for the histories."""
    root = Path(bundle_dir)
    if not len(members) == len(personas) == len(vectors):
        raise ConfigError(f"{len(members)} members, {len(personas)} personas and {len(vectors)} vectors")
    if len({u.user_id for u in members}) != len(members):
        raise ConfigError("member user_ids must be unique")
    centroids, labels = kmeans(vectors, k, seed=seed)
    used = np.unique(labels)  # drop clusters left empty (only possible with duplicate personas)
    centroids = centroids[used]
    labels = np.searchsorted(used, labels).astype(np.int32)
    report(f"k-means: {len(used)} prototypes for {len(members)} members (asked {k}); explained variance "
           f"{explained_variance(vectors, labels):.3f}")
    refinement = None
    if refine is not None:
        from export.prototype_refine import checkpoint_path as refine_checkpoint, refine as run_refine

        if embed is None:
            raise ConfigError("refinement needs an embed function for the members' histories")
        done = run_refine(members, targets or [None] * len(members), vectors, centroids, labels, embed,
                          settings=refine, seed=seed, checkpoint=refine_checkpoint(root), progress=progress,
                          report=report)
        for note in done.notes:
            report(note)
        vectors, centroids, labels = done.vectors, done.centroids, done.labels
        refinement = (done.info, done.space)
    records = [member_record(u, p, members_carry) for u, p in zip(members, personas)]
    with writer_lock(root):
        manifest = write_generation(
            root, read_manifest(root), centroids=build_hnsw(centroids, seed=seed, ef=ef),
            members=build_hnsw(vectors, seed=seed, ef=ef, capacity=len(members) + 16), records=records,
            assignments=labels, ef=ef, persona_source=persona_source, members_carry=members_carry, seed=seed,
            granularity=granularity, refinement=refinement)
    return manifest.prototypes


# -- LLM personas, resumable -------------------------------------------------------------

checkpoint_path = persona_checkpoint_path  # one place for the name: the runtime forgets users there too


def persona_key(user: UserProfile, llm_sha256: str, seed: int, max_tokens: Optional[int], options: dict,
                target: Optional[Preference] = None) -> str:
    """What an LLM persona depends on; a checkpoint entry is reused only when this matches."""
    h = hashlib.sha256()
    h.update(user.to_json())
    if target is not None:
        h.update(b"|target|" + target.to_json())
    h.update(f"|{llm_sha256}|{seed}|{max_tokens}|{sorted(options.items())!r}".encode())
    return h.hexdigest()


def llm_personas(root: Path, members: list[UserProfile], *, seed: int, max_tokens: Optional[int],
                 progress: Optional[bool], scorer_options: dict, report: Callable[[str], None],
                 targets: Optional[list] = None) -> list[str]:
    """One persona analysis per member from the bundle's LLM, resuming from the checkpoint file.

    A chain member's chain judges its own item (`targets`) with its shown history."""
    targets = targets or [None] * len(members)
    from pgenrm_lite.scorer import Scorer

    manifest = read_manifest(root)
    llm_sha = next(f.sha256 for f in manifest.files if f.path == manifest.llm.file)
    keys = [persona_key(u, llm_sha, seed, max_tokens, scorer_options, t) for u, t in zip(members, targets)]
    ckpt = checkpoint_path(root)
    done = _read_checkpoint(ckpt)
    todo = [i for i, key in enumerate(keys) if key not in done]
    if len(todo) < len(members):
        report(f"resuming: {len(members) - len(todo)} persona(s) reused from {ckpt}")
    if todo:
        options = dict(scorer_options, **({} if max_tokens is None else {"max_tokens": max_tokens}))
        with Scorer.from_bundle(root, n_samples=1, verify="size", seed=seed, **options) as scorer, \
                open(ckpt, "ab") as out, \
                Progress(len(members), "llm personas", unit="user", enabled=progress) as bar:
            bar.update(len(members) - len(todo))
            if out.tell() and not ckpt.read_bytes().endswith(b"\n"):
                out.write(b"\n")  # end a line torn by an interruption, so the next entry stays intact
            for i in todo:
                persona, fallback = _one_persona(scorer, members[i], seed, targets[i])
                done[keys[i]] = {"persona": persona, "fallback": fallback}
                out.write(orjson.dumps({"key": keys[i], "user_id": members[i].user_id, "persona": persona,
                                        "fallback": fallback}) + b"\n")
                out.flush()
                os.fsync(out.fileno())
                bar.update(1)
    n_fallback = sum(1 for key in keys if done[key]["fallback"])
    if n_fallback:
        report(f"{n_fallback} of {len(members)} LLM chain(s) did not parse; those members use their history text")
    return [done[key]["persona"] for key in keys]


def _one_persona(scorer, user: UserProfile, seed: int, target: Optional[Preference] = None) -> tuple[str, bool]:
    """PART 1 of one chain judging one of the user's own pairs, the other pairs shown as history
    (a chain member: its own item, its history as it is)."""
    if not user.history:
        return protocol.persona_from_history(user), True
    if target is not None:
        pair, shown = target, user
    else:
        pick = protocol.derive_seed(seed, "persona", user.user_id) % len(user.history)
        pair = user.history[pick]
        others = [p for i, p in enumerate(user.history) if i != pick] or [pair]
        shown = user.model_copy(update={"history": others})
    result = scorer.compare(shown, pair.prompt, pair.chosen, pair.rejected,
                            seed=protocol.derive_seed(seed, "persona-chain", user.user_id))
    analyses = [c.analysis.strip() for c in result.chains if c.analysis.strip()]
    if analyses:
        return analyses[0], False
    return protocol.persona_from_history(user), True


def _read_checkpoint(path: Path) -> dict[str, dict]:
    """Entries by key; a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_bytes().splitlines():
        try:
            obj = orjson.loads(line)
            done[obj["key"]] = {"persona": str(obj["persona"]), "fallback": bool(obj.get("fallback", False))}
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return done
