"""The bundled example user base (pgenrm_lite/data/example_users.jsonl) is well formed."""

from __future__ import annotations

from collections import Counter
from importlib.resources import as_file, files

import pytest

from pgenrm_lite.datasets import load_rows, rows_of_split, users_from_rows

N_USERS, N_TRAIN, N_TEST = 8, 5, 2


@pytest.fixture(scope="module")
def rows():
    resource = files("pgenrm_lite") / "data/example_users.jsonl"
    assert resource.is_file(), "example_users.jsonl is missing from the package"
    with as_file(resource) as path:
        return load_rows(path)


def test_users_and_splits(rows):
    users = Counter(r.user_id for r in rows)
    assert len(users) == N_USERS
    for uid in users:
        splits = Counter(r.split for r in rows if r.user_id == uid)
        assert splits == {"train": N_TRAIN, "test": N_TEST}, uid
    assert len(rows_of_split(rows, "test")) == N_USERS * N_TEST


def test_conversation_ids_unique(rows):
    ids = [r.conversation_id for r in rows]
    assert all(ids)
    assert len(set(ids)) == len(ids)


def test_texts_non_empty_and_distinct(rows):
    for r in rows:
        for text in (r.prompt, r.chosen, r.rejected):
            assert text.strip(), r.conversation_id
        assert r.chosen.strip() != r.rejected.strip(), r.conversation_id


def test_profiles_from_train_rows(rows):
    profiles = users_from_rows(rows)
    assert len(profiles) == N_USERS
    for uid, profile in profiles.items():
        assert profile.user_id == uid
        assert len(profile.history) == N_TRAIN
