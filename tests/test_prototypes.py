"""The prototype index: k-means, retrieval on clustered vectors, atomic updates, bad input, end to end.

Retrieval tests run real hnswlib indexes on synthetic clustered vectors; the embedder tests
run the exported all-MiniLM-L6-v2 on onnxruntime; the end-to-end test runs SmolLM2.
Synthetic bundles hold a placeholder `model.gguf` (a GGUF header only): the prototype
index never loads the LLM, and Bundle.open only checks that header.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from pgenrm_lite import (BundleIntegrityError, ConfigError, DataFormatError, Preference, PrototypeIndexError,
                         Scorer, UserProfile)
from pgenrm_lite.bundle import Bundle, file_entry, read_manifest, with_files, write_manifest
from pgenrm_lite.hnsw_files import build_hnsw, read_hnsw_header, unit_rows
from pgenrm_lite.prototype_files import PROTO_DIR
from pgenrm_lite.prototypes import PrototypeIndex
from pgenrm_lite.records import MANIFEST_SCHEMA_VERSION, EmbedderInfo, LLMInfo, Manifest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from export.prototypes_build import (build_prototypes, checkpoint_path, index_members,  # noqa: E402
                                     read_users)
from export.kmeans import explained_variance, kmeans  # noqa: E402

DIM = 16


# -- helpers -----------------------------------------------------------------------------

def clustered(n_clusters: int = 5, per: int = 30, dim: int = DIM, seed: int = 0, spread: float = 0.08):
    """Unit vectors around well-separated random centres; returns (vectors, true cluster of each)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(n_clusters, dim)))
    truth = np.repeat(np.arange(n_clusters), per)
    vectors = unit_rows(centres[truth] + spread * rng.normal(size=(len(truth), dim)))
    return vectors, truth


def user(uid: str, n_pairs: int = 1) -> UserProfile:
    return UserProfile(user_id=uid, history=[Preference(prompt=f"q{i} of {uid}", chosen=f"good {i}",
                                                        rejected=f"bad {i}") for i in range(n_pairs)])


def empty_bundle(root: Path, embedder_dir: Path | None = None) -> Path:
    """A bundle with a placeholder GGUF and, optionally, a copy of an exported embedder."""
    root.mkdir(parents=True)
    (root / "model.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(24))
    rels, embedder = ["model.gguf"], None
    if embedder_dir is not None:
        desc = orjson.loads((embedder_dir / "embedder.json").read_bytes())
        shutil.copytree(embedder_dir, root / "embedder")
        rels += [f"embedder/{n}" for n in ("embedder.json", desc["model_file"], desc["tokenizer_file"])]
        embedder = EmbedderInfo(dir="embedder", model_file=desc["model_file"], tokenizer_file=desc["tokenizer_file"],
                                dimension=desc["dimension"], pooling=desc["pooling"], normalized=desc["normalized"],
                                max_length=desc["max_length"])
    manifest = Manifest(schema_version=MANIFEST_SCHEMA_VERSION, files=[file_entry(root, root / r) for r in rels],
                        llm=LLMInfo(file="model.gguf", architecture="llama", context_length=2048,
                                    has_chat_template=False),
                        template={}, embedder=embedder)
    write_manifest(root, manifest)
    return root


def synthetic_bundle(root: Path, vectors, *, k: int, ef: int = 64, carry: str = "history", seed: int = 0,
                     embedder_dir: Path | None = None) -> Path:
    empty_bundle(root, embedder_dir)
    members = [user(f"u{i:03d}") for i in range(len(vectors))]
    personas = [f"persona of u{i:03d}" for i in range(len(vectors))]
    index_members(root, members, personas, vectors, k=k, persona_source="history", members_carry=carry,
                  seed=seed, ef=ef)
    return root


def open_index(root: Path, **kw) -> PrototypeIndex:
    return PrototypeIndex.load(Bundle.open(root, verify="full"), **kw)


def ids(neighbors) -> list[str]:
    return [m.user_id for m, _ in neighbors]


@pytest.fixture(scope="module")
def clusters():
    return clustered()


@pytest.fixture(scope="module")
def bundle5(clusters, tmp_path_factory) -> Path:
    vectors, _ = clusters
    return synthetic_bundle(tmp_path_factory.mktemp("b5") / "bundle", vectors, k=5, ef=37)


@pytest.fixture(scope="module")
def index5(bundle5) -> PrototypeIndex:
    return open_index(bundle5)


# -- k-means -----------------------------------------------------------------------------

def test_kmeans_recovers_separated_clusters_and_is_seeded(clusters):
    vectors, truth = clusters
    centroids, labels = kmeans(vectors, 5, seed=1)
    assert centroids.shape == (5, DIM) and np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    # One label per true cluster, and no two clusters share one.
    mapping = {t: set(labels[truth == t]) for t in range(5)}
    assert all(len(s) == 1 for s in mapping.values())
    assert len({next(iter(s)) for s in mapping.values()}) == 5
    again_c, again_l = kmeans(vectors, 5, seed=1)
    assert np.array_equal(again_l, labels) and np.array_equal(again_c, centroids)
    # Labels are each point's most similar centroid.
    assert np.array_equal(labels, (vectors @ centroids.T).argmax(axis=1))
    assert explained_variance(vectors, labels) > 0.9 > explained_variance(vectors, np.arange(len(labels)) % 5)
    assert explained_variance(vectors, np.zeros(len(labels), int)) == pytest.approx(0.0, abs=1e-6)


def test_kmeans_clamps_k_to_the_number_of_points():
    vectors, _ = clustered(n_clusters=3, per=2)
    centroids, labels = kmeans(vectors, 50, seed=0)
    assert centroids.shape == (6, DIM)
    assert sorted(labels.tolist()) == list(range(6))  # every point its own cluster
    with pytest.raises(ConfigError):
        kmeans(vectors, 0, seed=0)


def test_kmeans_reseeds_an_empty_cluster_from_the_farthest_point(clusters):
    vectors, truth = clustered(n_clusters=3, per=20, seed=3)
    # Start with two centroids on clusters 0 and 1 and one pointing away from every point:
    # it gets no member, is re-seeded from the farthest point (in cluster 2) and takes it over.
    far = -vectors.mean(axis=0)
    init = np.stack([vectors[truth == 0].mean(0), vectors[truth == 1].mean(0), far])
    assert ((vectors @ unit_rows(init).T).argmax(axis=1) == 2).sum() == 0  # really empty at first
    _, labels = kmeans(vectors, 3, seed=0, init=init)
    assert np.bincount(labels, minlength=3).min() > 0
    assert {tuple(sorted(set(labels[truth == t]))) for t in range(3)} == {(0,), (1,), (2,)}


def test_runtime_package_holds_no_kmeans():
    """Only the offline builder clusters: no module of the runtime defines or imports k-means."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import pgenrm_lite
        names = [m.name for m in pkgutil.walk_packages(pgenrm_lite.__path__, "pgenrm_lite.")]
        for name in names:
            importlib.import_module(name)
        found = sorted(f"{n}.{a}" for n in names for a in vars(sys.modules[n]) if "kmeans" in a.lower())
        exported = sorted(m for m in sys.modules if m.split(".")[0] == "export")
        print(json.dumps({"modules": names, "kmeans": found, "export": exported}))
    """)
    done = subprocess.run([sys.executable, "-c", "import json\n" + code], cwd=REPO, capture_output=True,
                          text=True, check=True)
    seen = orjson.loads(done.stdout)
    assert {"pgenrm_lite.prototypes", "pgenrm_lite.prototype_files", "pgenrm_lite.scorer"} <= set(seen["modules"])
    assert seen["kmeans"] == [] and seen["export"] == []


# -- retrieval ---------------------------------------------------------------------------

@pytest.mark.parametrize("brute", [False, True], ids=["hnswlib", "brute-force"])
def test_every_member_finds_itself(bundle5, clusters, brute):
    vectors, _ = clusters
    index = open_index(bundle5, brute_force_below=10**9 if brute else 0)
    for i, v in enumerate(vectors):
        (member, sim), = index.neighbors_for_vector(v, 1)
        assert member.user_id == f"u{i:03d}" and sim == pytest.approx(1.0, abs=1e-5)


def test_nearest_prototype_is_the_one_each_member_was_built_from(index5, clusters):
    vectors, truth = clusters
    protos = [index5.prototype_of(f"u{i:03d}") for i in range(len(vectors))]
    for i, v in enumerate(vectors):
        assert index5.nearest_prototype(v) == protos[i]
    # Members of one true cluster share a prototype, distinct clusters do not.
    assert len({protos[i] for i in range(len(vectors))}) == 5
    for t in range(5):
        assert len({protos[i] for i in np.flatnonzero(truth == t)}) == 1


def test_neighbors_exclude_the_user_and_stay_inside_the_prototype(index5, clusters):
    vectors, truth = clusters
    res = index5.neighbors_for_vector(vectors[7], 5, exclude="u007")
    assert len(res) == 5 and "u007" not in ids(res)
    sims = [s for _, s in res]
    assert sims == sorted(sims, reverse=True)
    own = {f"u{i:03d}" for i in np.flatnonzero(truth == truth[7])}
    assert set(ids(res)) <= own
    # Similarities are real cosines.
    for member, sim in res:
        assert sim == pytest.approx(float(vectors[7] @ vectors[int(member.user_id[1:])]), abs=1e-4)


@pytest.mark.parametrize("brute", [False, True], ids=["hnswlib", "brute-force"])
def test_n_is_clamped_and_short_prototypes_fill_from_the_next_nearest(bundle5, clusters, brute):
    vectors, truth = clusters
    index = open_index(bundle5, brute_force_below=10**9 if brute else 0)
    everyone = index.neighbors_for_vector(vectors[0], 10_000, exclude="u000")
    assert len(everyone) == len(vectors) - 1 and "u000" not in ids(everyone)
    assert index.neighbors_for_vector(vectors[0], 0) == []
    # 40 > the 29 other members of u000's prototype: those 29 come first, 11 from the next ones.
    forty = index.neighbors_for_vector(vectors[0], 40, exclude="u000")
    own = {f"u{i:03d}" for i in np.flatnonzero(truth == truth[0])} - {"u000"}
    assert len(forty) == 40 and set(ids(forty)[:29]) == own
    with pytest.raises(ConfigError):
        index.neighbors_for_vector(vectors[0], -1)


def test_brute_force_path_equals_hnswlib_path_on_a_tiny_set(tmp_path):
    vectors, _ = clustered(n_clusters=3, per=12, seed=5)
    root = synthetic_bundle(tmp_path / "tiny", vectors, k=3)
    exact = open_index(root, brute_force_below=10**9)
    graph = open_index(root, brute_force_below=0)
    queries = unit_rows(np.random.default_rng(9).normal(size=(20, DIM)))
    for q in list(queries) + list(vectors):
        for n in (1, 4, 11, 50):
            a, b = exact.neighbors_for_vector(q, n, exclude="u003"), graph.neighbors_for_vector(q, n, exclude="u003")
            assert ids(a) == ids(b)
            assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-5)
        assert exact.nearest_prototype(q) == graph.nearest_prototype(q)


def test_save_and_load_keep_results_and_ef(bundle5, index5, clusters):
    vectors, _ = clusters
    reloaded = open_index(bundle5)
    assert index5.ef == reloaded.ef == 37 == read_manifest(bundle5).prototypes.ef
    assert reloaded.loaded_ef == (37, 37)  # restored into both hnswlib indexes (hnswlib defaults to 10)
    for v in vectors[::7]:
        assert ids(index5.neighbors_for_vector(v, 6)) == ids(reloaded.neighbors_for_vector(v, 6))


def test_persona_members_come_back_with_the_persona_in_place_of_the_history(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "p", vectors[:40], k=2, carry="persona")
    raw = (root / read_manifest(root).prototypes.members_file).read_bytes()
    assert b"history" not in raw and b"good 0" not in raw  # no pair of anyone ships
    index = open_index(root)
    assert index.members_carry == "persona"
    (member, _), = index.neighbors_for_vector(vectors[3], 1)
    assert member.user_id == "u003" and member.history == []
    assert member.stated_preferences == member.persona == "persona of u003"


# -- updates -----------------------------------------------------------------------------

def test_add_user_persists_replaces_and_reloads(tmp_path, clusters):
    vectors, truth = clusters
    root = synthetic_bundle(tmp_path / "b", vectors, k=5)
    index = open_index(root)
    gen0, n0 = index.generation, index.n_members
    old_files = {p.name for p in (root / PROTO_DIR).iterdir()}
    target = index.prototype_of("u065")  # a member of true cluster 2
    new_vec = unit_rows((vectors[65] + 0.01)[None])[0]
    assert index.add_user(user("newbie", 2), "persona of newbie", vector=new_vec) == target
    assert index.n_members == n0 + 1 and index.generation == gen0 + 1
    assert ids(index.neighbors_for_vector(new_vec, 1)) == ["newbie"]

    reopened = open_index(root)  # full sha256 verification of the new generation
    assert reopened.n_members == n0 + 1 and reopened.prototype_of("newbie") == target
    (member, _), = reopened.neighbors_for_vector(new_vec, 1)
    assert member.user_id == "newbie" and len(member.history) == 2 and member.persona == "persona of newbie"
    now = {p.name for p in (root / PROTO_DIR).iterdir()}
    assert not (now & old_files - {".lock"})  # the old generation was deleted

    # Same user_id again, now near cluster 4: replaced, not duplicated.
    other = index.prototype_of("u130")
    assert index.add_user(user("newbie", 1), "moved", vector=vectors[130]) == other
    reopened = open_index(root)
    assert reopened.n_members == n0 + 1 and reopened.prototype_of("newbie") == other
    assert "newbie" in ids(reopened.neighbors_for_vector(vectors[130], 2))
    assert "newbie" not in ids(reopened.neighbors_for_vector(new_vec, 3))


def test_add_user_grows_past_capacity_and_from_a_second_process(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "g", vectors[:30], k=3)
    first, second = open_index(root), open_index(root)
    rng = np.random.default_rng(0)
    for i in range(40):  # beyond the 16 spare slots the builder leaves
        first.add_user(user(f"x{i}"), f"p{i}", vector=rng.normal(size=DIM))
    # `second` is stale; its update must start from what is on disk, not overwrite it.
    second.add_user(user("late"), "late", vector=vectors[0])
    final = open_index(root)
    assert final.n_members == 30 + 40 + 1
    assert {"x0", "x39", "late"} <= set(final.member_ids())


def run_and_kill(child_args: list[str], expected: int, pause: float) -> int:
    """Start `python -c CODE ARGS...` (it prints "ready N", then "done N" after each update), check it
    started from `expected` members, SIGKILL it after `pause` seconds, return the last count it reported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", *child_args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = child.stdout.readline().split()
        assert ready[:1] == ["ready"], child.stderr.read()
        assert int(ready[1]) == expected
        time.sleep(pause)
    finally:
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    done = [int(line.split()[1]) for line in out.splitlines() if line.startswith("done")]
    return done[-1] if done else expected


KILL_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from pgenrm_lite.bundle import Bundle
    from pgenrm_lite.prototypes import PrototypeIndex
    from pgenrm_lite.records import UserProfile
    index = PrototypeIndex.load(Bundle.open(sys.argv[1], verify="size"))
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", index.n_members, flush=True)
    i = 0
    while True:
        uid = f"k{sys.argv[2]}-{i}"
        index.add_user(UserProfile(user_id=uid, persona="p"), "p " + uid, vector=rng.normal(size=%d))
        i += 1
        print("done", index.n_members, flush=True)
""" % DIM)


def test_killed_updates_always_leave_the_old_or_the_new_version(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "k", vectors[:80], k=4)
    rng = random.Random(1234)
    start = time.monotonic()
    expected = 80
    kills_mid_run = 0
    for round_ in range(20):
        last = run_and_kill([KILL_CHILD, str(root), str(round_)], expected, rng.uniform(0.0, 0.25))
        # The child may have switched the manifest and been killed before it printed.
        bundle = Bundle.open(root, verify="full")
        n = PrototypeIndex.load(bundle).n_members
        assert n in (last, last + 1), (round_, last, n)
        kills_mid_run += n == last + 1
        assert bundle.manifest.prototypes.n_members == n
        expected = n
        assert time.monotonic() - start < 120, "the kill loop is far slower than expected"
    print(f"kill loop: {expected - 80} updates, {kills_mid_run} kills after the switch before the report, "
          f"{time.monotonic() - start:.1f}s")
    assert expected > 80  # updates did happen between kills
    final = open_index(root)
    final.add_user(user("after"), "after", vector=vectors[0])
    # Leftovers of killed runs (temp files, a next generation never switched to) are gone.
    names = {p.name for p in (root / PROTO_DIR).iterdir()} - {".lock"}
    assert names == {Path(p).name for p in (final.info.centroids_file, final.info.members_index_file,
                                            final.info.members_file, final.info.assignments_file)}


def files_holding(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def test_remove_user_forgets_records_vectors_files_and_neighbours(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "f", vectors, k=5)
    index = open_index(root)
    secret = UserProfile(user_id="secret-user", history=[Preference(prompt="zq-prompt-71", chosen="zq-chosen-71",
                                                                     rejected="zq-rejected-71")])
    vec = unit_rows((vectors[3] + 0.02)[None])[0]
    index.add_user(secret, "zq-persona-71", vector=vec)
    assert files_holding(root, b"zq-chosen-71") and ids(index.neighbors_for_vector(vec, 1)) == ["secret-user"]
    ckpt = root.with_name(root.name + ".personas.jsonl")  # the LLM-persona checkpoint beside the bundle
    ckpt.write_bytes(b'{"key": "a", "user_id": "secret-user", "persona": "zq-persona-71"}\n'
                     b'{"key": "b", "user_id": "u001", "persona": "kept"}\n')

    assert index.remove_user("secret-user") == 1
    assert index.remove_user("secret-user") == 0  # forgetting twice is not an error
    n = len(vectors)
    for reopened in (index, open_index(root)):  # in memory and on disk (full sha256 check)
        assert reopened.n_members == n and "secret-user" not in reopened.member_ids()
        assert reopened.member("secret-user") is None and reopened.prototype_of("secret-user") is None
        assert "secret-user" not in ids(reopened.neighbors_for_vector(vec, n))  # every member, none is them
        assert ids(reopened.neighbors_for_vector(vectors[3], 1)) == ["u003"]  # the others are still found
    for needle in (b"zq-prompt-71", b"zq-chosen-71", b"zq-rejected-71", b"zq-persona-71", b"secret-user"):
        assert files_holding(root, needle) == [], needle
    assert ckpt.read_bytes() == b'{"key": "b", "user_id": "u001", "persona": "kept"}\n'
    # The member graph was rebuilt, not marked: its file holds exactly the remaining vectors.
    assert read_hnsw_header(root / index.info.members_index_file).count == n
    # Later additions still work on the rebuilt index.
    index.add_user(user("after-forget"), "p", vector=vectors[0])
    assert open_index(root).n_members == n + 1


def test_remove_every_member_then_add_again(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "e", vectors[:4], k=2)
    index = open_index(root)
    for i in range(4):
        assert index.remove_user(f"u{i:03d}") == 1
    assert open_index(root).n_members == 0 and index.neighbors_for_vector(vectors[0], 3) == []
    index.add_user(user("only"), "p", vector=vectors[0])
    assert ids(open_index(root).neighbors_for_vector(vectors[0], 3)) == ["only"]
    with pytest.raises(ConfigError, match="user_id"):
        index.remove_user("")


FORGET_CHILD = textwrap.dedent("""
    import sys
    from pgenrm_lite.bundle import Bundle
    from pgenrm_lite.prototypes import PrototypeIndex
    index = PrototypeIndex.load(Bundle.open(sys.argv[1], verify="size"))
    print("ready", index.n_members, flush=True)
    for uid in sorted(index.member_ids()):
        index.remove_user(uid)
        print("done", index.n_members, flush=True)
""")


def test_killed_forgets_leave_the_old_or_the_new_version(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "kf", vectors[:150], k=4)
    rng = random.Random(99)
    expected = 150
    for round_ in range(6):
        last = run_and_kill([FORGET_CHILD, str(root)], expected, rng.uniform(0.05, 0.3))
        index = PrototypeIndex.load(Bundle.open(root, verify="full"))
        n = index.n_members
        assert n in (last, last - 1), (round_, last, n)
        # The survivors are exactly the users the child had not reached yet (it goes in sorted order).
        assert index.member_ids() == sorted(f"u{i:03d}" for i in range(150))[150 - n:]
        expected = n
    assert expected < 150  # removals did happen between kills
    names = {p.name for p in (root / PROTO_DIR).iterdir()} - {".lock"}
    assert len(names) <= 4 + 4  # at most one unfinished next generation left behind, removed by the next update
    final = open_index(root)
    final.remove_user("u149")
    info = final.info
    assert {p.name for p in (root / PROTO_DIR).iterdir()} - {".lock"} == {
        Path(p).name for p in (info.centroids_file, info.members_index_file, info.members_file, info.assignments_file)}


# -- bad input ---------------------------------------------------------------------------

def replace_file(root: Path, rel: str, data: bytes) -> None:
    """Swap a bundle file and update its manifest entry, so only the content disagrees."""
    (root / rel).write_bytes(data)
    write_manifest(root, with_files(root, read_manifest(root), [rel]))


def saved_index(tmp_path: Path, vectors) -> bytes:
    path = tmp_path / "other.hnsw"
    build_hnsw(vectors, seed=0, ef=10).save_index(str(path))
    return path.read_bytes()


def test_index_with_a_different_element_count_is_refused(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "b", vectors[:40], k=2)
    info = read_manifest(root).prototypes
    replace_file(root, info.members_index_file, saved_index(tmp_path, vectors[:39]))
    with pytest.raises(PrototypeIndexError, match="39 elements but the manifest says 40"):
        open_index(root)


def test_index_with_a_different_dimension_is_refused(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "b", vectors[:40], k=2)
    info = read_manifest(root).prototypes
    replace_file(root, info.centroids_file, saved_index(tmp_path, unit_rows(np.ones((2, 8)) + np.eye(2, 8))))
    with pytest.raises(PrototypeIndexError, match="8-dimensional vectors but the manifest says 16"):
        open_index(root)


def test_manifest_count_that_disagrees_with_the_records_is_refused(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "b", vectors[:40], k=2)
    m = read_manifest(root)
    write_manifest(root, m.model_copy(update={"prototypes": m.prototypes.model_copy(update={"n_members": 41})}))
    with pytest.raises(PrototypeIndexError, match="41"):
        open_index(root)


def test_truncated_or_corrupt_index_file_is_refused_before_hnswlib(tmp_path, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "b", vectors[:40], k=2)
    rel = read_manifest(root).prototypes.members_index_file
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[:-100])
    with pytest.raises(BundleIntegrityError, match="bytes but the manifest says"):
        Bundle.open(root)
    with pytest.raises(PrototypeIndexError, match="size differs"):
        PrototypeIndex.load(Bundle.open(root, verify="none"))
    # Same size as listed but a broken structure: the header walk catches it.
    replace_file(root, rel, data[:-100])
    with pytest.raises(PrototypeIndexError, match="not a valid hnswlib index"):
        open_index(root)
    garbage = bytearray(data)
    garbage[16:24] = (10**6).to_bytes(8, "little")  # size_data_per_element
    replace_file(root, rel, bytes(garbage))
    with pytest.raises(PrototypeIndexError, match="inconsistent header"):
        open_index(root)


def test_hnsw_header_reader_matches_hnswlib(tmp_path, clusters):
    vectors, _ = clusters
    index = build_hnsw(vectors, seed=0, ef=10, capacity=500)
    index.save_index(str(tmp_path / "x.hnsw"))
    header = read_hnsw_header(tmp_path / "x.hnsw")
    assert (header.dimension, header.count, header.max_elements, header.m) == (DIM, len(vectors), 500, 16)


def test_data_file_with_a_missing_field_names_line_and_field(tmp_path):
    good = {"user_id": "a", "context": [{"role": "user", "content": "hi"}],
            "chosen": {"role": "model", "content": "x"}, "rejected": {"role": "model", "content": "y"},
            "split": "train"}
    bad = {k: v for k, v in good.items() if k != "chosen"}
    path = tmp_path / "rows.jsonl"
    path.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps(bad) + b"\n")
    with pytest.raises(DataFormatError) as err:
        read_users(path)
    assert err.value.line == 2 and err.value.field == "chosen"
    assert ":2:" in str(err.value) and "'chosen'" in str(err.value)
    hh = tmp_path / "hh.jsonl"
    hh.write_bytes(orjson.dumps({"prompt": "P", "chosen": "P a", "rejected": "P b"}) + b"\n")
    with pytest.raises(DataFormatError) as err:
        read_users(hh, fmt="hh")
    assert err.value.line == 1 and err.value.field == "objective"


def test_builder_refuses_a_bundle_without_an_embedder(tmp_path):
    from pgenrm_lite.errors import ExportError

    root = empty_bundle(tmp_path / "b")
    with pytest.raises(ExportError, match="python -m export bundle"):
        build_prototypes(root, {"a": user("a")}, k=2)


# -- with the real embedder --------------------------------------------------------------

@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir, tmp_path_factory) -> Path:
    from export.onnx_embedder import export_embedder

    out = tmp_path_factory.mktemp("minilm") / "onnx"
    export_embedder(minilm_dir, out)
    return out


def test_embedder_dimension_differing_from_the_index_is_refused(tmp_path, minilm_onnx, clusters):
    vectors, _ = clusters
    root = synthetic_bundle(tmp_path / "b", vectors[:40], k=2, embedder_dir=minilm_onnx)  # 16-dim index
    with pytest.raises(PrototypeIndexError, match=r"dimension 384 .*dimension 16"):
        PrototypeIndex.from_bundle(Bundle.open(root))
    # A manifest that claims a matching 16 is caught by the loaded embedder's own 384.
    m = read_manifest(root)
    write_manifest(root, m.model_copy(update={"embedder": m.embedder.model_copy(update={"dimension": 16})}))
    with pytest.raises(PrototypeIndexError, match=r"dimension 384 .*dimension 16"):
        PrototypeIndex.from_bundle(Bundle.open(root), device="cpu")


def test_built_from_hh_users_with_minilm(tmp_path, minilm_onnx, hh_file):
    from pgenrm_lite.datasets import load_hh, users_from_rows
    from pgenrm_lite.protocol import persona_from_history

    root = empty_bundle(tmp_path / "b", minilm_onnx)
    users = users_from_rows(load_hh(hh_file, users_per_objective=6, limit_per_user=10))
    notes: list[str] = []
    info = build_prototypes(root, users, k=3, ef=20, progress=False, report=notes.append)
    assert (info.count, info.n_members, info.dimension, info.ef) == (3, 12, 384, 20)
    assert any("explained variance" in n for n in notes)
    with PrototypeIndex.from_bundle(Bundle.open(root, verify="full"), device="cpu") as index:
        for uid, u in users.items():
            persona = persona_from_history(u)
            best, sim = index.neighbors(persona, 1)[0]
            assert best.user_id == uid and sim == pytest.approx(1.0, abs=1e-4)
            assert index.nearest_prototype(persona) == index.prototype_of(uid)
            others = index.neighbors(persona, 3, exclude=uid)
            assert len(others) == 3 and uid not in ids(others)
            assert best.history == u.history  # members_carry=history ships the pairs


def test_llm_personas_resume_after_an_interruption(tmp_path, tiny_gguf, minilm_onnx):
    from export.bundle_build import build_bundle

    root = build_bundle(tiny_gguf, tmp_path / "b", embedder_dir=minilm_onnx)
    users = {f"u{i}": user(f"u{i}", 3) for i in range(4)}
    options = dict(analysis_chars=(10, 120), max_criteria=2, n_threads=2)
    notes: list[str] = []

    def build():
        notes.clear()
        return build_prototypes(root, users, k=2, persona_source="llm", max_tokens=400, scorer_options=options,
                                progress=False, report=notes.append)

    assert build().persona_source == "llm"
    ckpt = checkpoint_path(root)
    assert ckpt.parent == root.parent  # next to the bundle, not inside it
    lines = ckpt.read_bytes().splitlines()
    first = [orjson.loads(line) for line in lines]
    assert [e["user_id"] for e in first] == list(users)
    assert not any(e["fallback"] for e in first)  # the grammar makes every chain parse, even on a random model
    with PrototypeIndex.load(Bundle.open(root, verify="full")) as index:
        stored = {uid: index.member(uid).persona for uid in users}
    assert stored == {e["user_id"]: e["persona"] for e in first}  # PART 1 of the chains, not history text

    # Interrupted during the third member: two entries and a torn line.
    ckpt.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:30])
    build()
    assert any("2 persona(s) reused" in n for n in notes)
    again = [orjson.loads(line) for line in ckpt.read_bytes().splitlines()[-2:]]
    assert [e["user_id"] for e in again] == ["u2", "u3"]
    assert [e["persona"] for e in again] == [e["persona"] for e in first[2:]]  # seeded: the same chains
    build()
    assert any("4 persona(s) reused" in n for n in notes)
    # Changed data is not served from the checkpoint.
    users["u0"] = user("u0", 2)
    build()
    assert any("3 persona(s) reused" in n for n in notes)


# -- end to end: SmolLM2 + MiniLM + HH users ---------------------------------------------

def test_end_to_end_compare_with_neighbours(tmp_path, smollm2_gguf, minilm_onnx, hh_file):
    from export.bundle_build import build_bundle
    from pgenrm_lite.datasets import load_hh, rows_of_split, users_from_rows
    from pgenrm_lite.protocol import persona_from_history

    root = build_bundle(smollm2_gguf, tmp_path / "bundle", embedder_dir=minilm_onnx)
    rows = load_hh(hh_file, users_per_objective=4, limit_per_user=12)
    users = users_from_rows(rows)
    info = build_prototypes(root, users, k=2, persona_source="history", progress=False)
    assert info.n_members == 8 and info.count == 2

    me = users["helpful-0"]
    # The shortest of the user's test pairs keeps the prompts, hence the test, short.
    test_row = min(rows_of_split([r for r in rows if r.user_id == "helpful-0"]),
                   key=lambda r: len(r.prompt) + len(r.chosen) + len(r.rejected))
    t0 = time.monotonic()
    pfx = tmp_path / "prefix-cache"
    with Scorer.from_bundle(root, n_samples=2, n_neighbors=2, max_tokens=384, analysis_chars=(20, 300),
                            max_criteria=3, history_pairs=1, n_threads=2, prefix_cache_dir=pfx) as scorer:
        res = scorer.compare(me, test_row.prompt, test_row.chosen, test_row.rejected)
        assert len(res.neighbors) == 2 and "helpful-0" not in [n.user_id for n in res.neighbors]
        kinds = [s.kind for s in res.samples]
        assert kinds.count("self") == 2 and kinds.count("neighbor") == 2
        assert {s.user_id for s in res.samples if s.kind == "neighbor"} == {n.user_id for n in res.neighbors}
        for nb in res.neighbors:
            assert 0 < nb.similarity <= 1.0 + 1e-6
            parsed = [s for s in res.samples if s.user_id == nb.user_id and s.chain is not None]
            if parsed:
                assert nb.score_a == pytest.approx(parsed[0].score_a)
        assert res.n_parsed + res.n_failed == 4
        assert res.n_parsed >= 1 and res.score_a is not None
        # confidence per level, from the real chains
        conf = res.confidence
        own = [s for s in res.samples if s.kind == "self" and s.chain is not None]
        assert conf.individual.n_chains == len(own) and conf.prototype is not None
        assert conf.overall.n_chains == res.n_parsed == conf.individual.n_chains + conf.prototype.n_chains
        if own:
            assert conf.individual.prefer_a == sum(s.score_a > s.score_b for s in own) / len(own)
        # On-device addition through the Scorer, persisted into the bundle.
        newcomer = UserProfile(user_id="newcomer", history=me.history[:2])
        proto = scorer.add_user(newcomer)
        assert proto == scorer.prototypes.nearest_prototype(persona_from_history(newcomer))
        # Forgetting a neighbour: never returned again, no bundle file holds their texts.
        gone = res.neighbors[0].user_id
        others = {t for uid, u in users.items() if uid != gone for q in u.history for t in (q.chosen, q.rejected)}
        their_texts = [t.encode() for p in users[gone].history for t in (p.chosen, p.rejected) if t not in others]
        assert their_texts and all(files_holding(root, t) for t in their_texts[:3])
        from pgenrm_lite.prefix_cache import owner_tag

        assert gone in scorer.prefix_cache.owners() and list(pfx.glob(owner_tag(gone) + "-*"))
        assert scorer.remove_user(gone) == 1
        # Their prompt-prefix states are gone from memory and disk too (the compare below writes no new ones).
        assert gone not in scorer.prefix_cache.owners() and not list(pfx.glob(owner_tag(gone) + "-*"))
        again = scorer.compare(me, test_row.prompt, test_row.chosen, test_row.rejected)
        assert gone not in [n.user_id for n in again.neighbors] and len(again.neighbors) == 2
        assert gone not in [m.user_id for m, _ in scorer.prototypes.neighbors(persona_from_history(users[gone]), 9)]
    print(f"end-to-end compare + add_user + remove_user: {time.monotonic() - t0:.1f}s")
    reopened = Bundle.open(root, verify="full")
    assert reopened.manifest.prototypes.n_members == 8
    for text in their_texts:
        assert files_holding(root, text) == []

    # The CLI forgets without loading the LLM.
    from pgenrm_lite.cli import main

    assert main(["forget", "newcomer", "--bundle", str(root), "--json"]) == 0
    assert main(["forget", "newcomer", "--bundle", str(root)]) == 0  # not a member any more: still exit 0
    assert "newcomer" not in PrototypeIndex.load(Bundle.open(root, verify="full")).member_ids()
    with Scorer.from_bundle(root, n_samples=1, n_threads=2) as plain:  # n_neighbors=0: loaded on first use
        assert plain.prototypes is None
        plain.add_user(UserProfile(user_id="second", history=me.history[2:4]))
    assert Bundle.open(root, verify="full").manifest.prototypes.n_members == 8  # 9 - forgotten newcomer + second
    with Scorer.from_gguf(smollm2_gguf, n_samples=1, n_threads=2) as bare:  # no bundle, no index
        with pytest.raises(ConfigError, match="no prototype index"):
            bare.add_user(newcomer)
