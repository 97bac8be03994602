"""Scoring a Ray Data dataset of pairs: one `Scorer` per actor (extra `ray`).

    import ray
    from pgenrm_lite.integrations.ray import score_dataset
    ds = ray.data.read_json("pairs.jsonl")          # columns: user_id, prompt, response_a, response_b
    scored = score_dataset(ds, "/shared/bundle", ScorerOptions(n_samples=8, n_neighbors=4), concurrency=4,
                           profiles="/shared/users.jsonl")
    scored.write_parquet("scored/")

Each actor loads the bundle once (the bundle directory must be readable at the same path
on every node) and compares each row's two responses for the row's user. The results are
new columns: `preferred` ("a", "b" or None for a tie / no parsed chain), `score_a`,
`score_b` (NaN when none), `n_parsed`, `n_failed`, `seed`, and `personalised` (False when
the row's user is not in `profiles`: the non-personalised judge was used).

Each row's seed is derived from the base `seed` and the row's content (user, prompt and
both responses), so a row gets the same result however the dataset is split into blocks
and actors, and the same as `Scorer.compare(user, prompt, a, b, seed=row_seed)` on one
machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from ..bundle import is_bundle_dir
from ..errors import ConfigError
from ..options import ScorerOptions
from ..protocol import derive_seed
from . import non_personalised_user, profile_map

RESULT_COLUMNS = ("preferred", "score_a", "score_b", "n_parsed", "n_failed", "seed", "personalised")


def row_seed(seed: int, user_id: str, prompt: str, response_a: str, response_b: str) -> int:
    """The seed a row is judged with: independent of block boundaries and row order."""
    return derive_seed(seed, "ray-row", user_id, prompt, response_a, response_b)


class PairScorer:
    """The callable class behind `map_batches`: one Scorer per actor, pandas batches in and out."""

    def __init__(self, bundle: str, options: ScorerOptions | Mapping[str, Any] | None = None, *,
                 profiles: Any = None, device: str = "cpu", n_threads: Optional[int] = 1,
                 user_column: Optional[str] = "user_id", prompt_column: str = "prompt",
                 a_column: str = "response_a", b_column: str = "response_b",
                 scorer_options: Optional[Mapping[str, Any]] = None, **kwargs: Any):
        from ..scorer import Scorer

        options = ScorerOptions.merge(options, scorer_options, kwargs)

        if isinstance(profiles, (str, os.PathLike)):
            from ..datasets import load_profiles

            profiles = load_profiles(profiles)
        self.profiles = profile_map(profiles)
        self.seed = options.seed
        self.columns = (user_column, prompt_column, a_column, b_column)
        self.scorer = Scorer.from_bundle(bundle, options, device=device, n_threads=n_threads)

    def __call__(self, batch):
        import math

        import pandas as pd

        user_column, prompt_column, a_column, b_column = self.columns
        for name in (prompt_column, a_column, b_column):
            if name not in batch.columns:
                raise ConfigError(f"the dataset has no column '{name}' (columns: {list(batch.columns)})")
        has_user = user_column is not None and user_column in batch.columns
        out = {name: [] for name in RESULT_COLUMNS}
        for i in range(len(batch)):
            raw_user = batch[user_column].iloc[i] if has_user else None
            if raw_user is not None and pd.isna(raw_user):
                raw_user = None  # pandas' missing values: None, NaN, NA
            uid = None if raw_user is None else str(raw_user)
            user = self.profiles.get(uid) if uid is not None else None
            personalised = user is not None
            if user is None:
                user = non_personalised_user(uid)
            prompt = str(batch[prompt_column].iloc[i])
            a, b = str(batch[a_column].iloc[i]), str(batch[b_column].iloc[i])
            s = row_seed(self.seed, user.user_id, prompt, a, b)
            res = self.scorer.compare(user, prompt, a, b, seed=s)
            out["preferred"].append(res.preferred)
            out["score_a"].append(math.nan if res.score_a is None else res.score_a)
            out["score_b"].append(math.nan if res.score_b is None else res.score_b)
            out["n_parsed"].append(res.n_parsed)
            out["n_failed"].append(res.n_failed)
            out["seed"].append(s)
            out["personalised"].append(personalised)
        batch = batch.copy()
        for name in RESULT_COLUMNS:
            batch[name] = out[name]
        return batch


def score_dataset(dataset, bundle: str | os.PathLike, options: ScorerOptions | Mapping[str, Any] | None = None, *,
                  concurrency: int = 2, profiles: Any = None, user_column: Optional[str] = "user_id",
                  prompt_column: str = "prompt", a_column: str = "response_a", b_column: str = "response_b",
                  batch_size: int = 8, num_cpus: float = 1, n_threads: Optional[int] = 1, device: str = "cpu",
                  num_gpus: float = 0, **scorer_options: Any):
    """`dataset` (a `ray.data.Dataset`) with the result columns added; lazy, like any Ray Data transform.

    `concurrency` actors each hold one Scorer on `bundle` with `options` (a `ScorerOptions`
    or a dict of its fields; keyword arguments such as `n_samples=8` win), validated here
    before any actor starts; options not given take the bundle's recommended defaults. Each
    actor reserves `num_cpus` CPUs (and `num_gpus` GPUs, for `device="gpu"`) and runs
    llama.cpp on `n_threads` threads.
    `profiles`: a mapping user id -> UserProfile, an iterable of UserProfile, or the path of
    a profiles file (JSON list or JSON Lines) readable on every node. Rows whose user is not
    there, or with no `user_column`, use the non-personalised judge (`personalised` False).
    """
    try:
        import ray.data
    except ImportError as exc:
        raise ConfigError("score_dataset needs Ray Data: pip install 'pgenrm-lite[ray]'") from exc
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    given = ScorerOptions.merge(options, scorer_options).given()  # only what was asked: defaults stay the bundle's
    bundle = str(Path(bundle).resolve())
    if not is_bundle_dir(bundle):
        raise ConfigError(f"{bundle} is not a bundle directory (no manifest.json)")
    if profiles is not None and not isinstance(profiles, (str, os.PathLike)):
        profiles = profile_map(profiles)  # validated here, shipped to each actor
    elif profiles is not None:
        profiles = str(Path(profiles).resolve())
    kwargs = dict(profiles=profiles, device=device, n_threads=n_threads, user_column=user_column,
                  prompt_column=prompt_column, a_column=a_column, b_column=b_column)
    extra = {"num_gpus": num_gpus} if num_gpus else {}
    return dataset.map_batches(PairScorer, fn_constructor_args=(bundle, given), fn_constructor_kwargs=kwargs,
                               batch_size=batch_size, batch_format="pandas",
                               compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus, **extra)


__all__ = ["score_dataset", "PairScorer", "row_seed", "RESULT_COLUMNS"]
