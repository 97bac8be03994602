"""score_dataset on a real local Ray cluster (two worker CPUs, two actors) with a tiny-model bundle."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
from conftest import ALICE, BOB, FAST, require

from pgenrm_lite import Scorer, UserProfile
from pgenrm_lite.integrations.ray import RESULT_COLUMNS, row_seed

@pytest.fixture(scope="module")
def ray_cluster():
    require(importlib.util.find_spec("ray") is not None, "ray is not installed: pip install -e '.[ray]'")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tiny_gguf, tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from export.bundle_build import build_bundle

    return build_bundle(tiny_gguf, tmp_path_factory.mktemp("ray") / "bundle")


def test_score_dataset_on_two_actors_matches_a_local_scorer(ray_cluster, bundle):
    from pgenrm_lite.integrations.ray import score_dataset

    rows = []
    for i in range(8):
        rows.append({"id": i, "user_id": ["alice", "bob", "carol", None][i % 4], "prompt": f"Question {i}?",
                     "response_a": f"A short answer {i}.", "response_b": f"A much longer answer number {i}, with detail."})
    ds = ray_cluster.data.from_items(rows, override_num_blocks=4)
    scored = score_dataset(ds, bundle, n_samples=1, seed=3, concurrency=2, profiles={"alice": ALICE, "bob": BOB},
                           batch_size=2, **FAST)
    out = sorted(scored.take_all(), key=lambda r: r["id"])
    assert len(out) == 8
    for r in out:
        assert set(RESULT_COLUMNS) <= set(r) and {"prompt", "response_a", "response_b"} <= set(r)
        assert r["preferred"] in ("a", "b", None)
        assert r["n_parsed"] + r["n_failed"] == 1
    assert [r["personalised"] for r in out] == [True, True, False, False] * 2

    # The same rows on one machine, with the same per-row seeds, give the same results.
    with Scorer.from_bundle(bundle, n_samples=1, seed=3, **FAST) as scorer:
        for r in out:
            uid = r["user_id"]
            user = {"alice": ALICE, "bob": BOB}.get(uid) or UserProfile(user_id=uid or "(anonymous)")
            s = row_seed(3, user.user_id, r["prompt"], r["response_a"], r["response_b"])
            assert r["seed"] == s, (r, user.user_id)
            local = scorer.compare(user, r["prompt"], r["response_a"], r["response_b"], seed=s)
            assert r["preferred"] == local.preferred
            for got, want in ((r["score_a"], local.score_a), (r["score_b"], local.score_b)):
                assert (want is None and math.isnan(got)) or got == pytest.approx(want)

    # the map ran on the actor pool of PairScorer (one Scorer per actor)
    assert "PairScorer" in scored.stats()


def test_profiles_from_a_file_and_bad_arguments(ray_cluster, bundle, tmp_path):
    from pgenrm_lite import ConfigError
    from pgenrm_lite.integrations.ray import score_dataset

    profiles = tmp_path / "users.jsonl"
    profiles.write_bytes(ALICE.to_json() + b"\n")
    ds = ray_cluster.data.from_items([{"user_id": "alice", "prompt": "Q?", "chosen": "yes", "rejected": "no"}])
    (row,) = score_dataset(ds, bundle, profiles=profiles, a_column="chosen", b_column="rejected", concurrency=1,
                           **FAST).take_all()
    assert row["personalised"] is True and row["n_parsed"] == 1
    with pytest.raises(ConfigError, match="concurrency"):
        score_dataset(ds, bundle, concurrency=0)
    with pytest.raises(ConfigError, match="not a bundle"):
        score_dataset(ds, tmp_path, **FAST)
    with pytest.raises(Exception, match="no column 'response_a'"):
        score_dataset(ds, bundle, concurrency=1, **FAST).take_all()
