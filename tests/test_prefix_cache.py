"""The prompt-prefix cache on real SmolLM2 (llama.cpp): a cold, warm, reordered, evicting or
disk-backed cache gives bitwise the same logits and results as no cache; damaged files are
refused and rebuilt; threads share one cache.
"""

from __future__ import annotations

import hashlib
import threading

import llama_cpp
import numpy as np
import pytest
from conftest import SMOLLM2_SHORT, ALICE, BOB, PROMPT, A, B

from pgenrm_lite import Scorer, protocol
from pgenrm_lite.engine import Engine, Request, SamplingParams, common_prefix
from pgenrm_lite.errors import CacheFileError
from pgenrm_lite.llama_sampler import SequenceSampler
from pgenrm_lite.prefix_cache import HEADER, PrefixCache, cache_key, read_file_payload

SHORT = SamplingParams(max_tokens=6, temperature=1.0)  # unconstrained: a few tokens, logits compared


def _requests(engine: Engine, users, shared: bool = True) -> list[Request]:
    """Both candidate orders for each user: requests sharing a prefix (and, within a user, the
    query span), and requests that do not."""
    out = []
    for k, user in enumerate(users):
        toks = [engine.chat_tokens(protocol.render_messages(user, PROMPT, r1, r2)) for r1, r2 in ((A, B), (B, A))]
        p = engine.cacheable_prefix(toks[0], toks[1])
        q = min(common_prefix(*toks), *(len(t) - 1 for t in toks)) if shared else 0  # the query span
        assert 0 < p < min(map(len, toks)) and (q > p or not shared)
        out += [Request(toks[0], (10 * k + 1, 10 * k + 2), p, shared_len=q),
                Request(toks[1], (10 * k + 3,), p, shared_len=q)]
    return out


def _run(engine: Engine, requests: list[Request]):
    """Completions, every logits row sampled from (hashed), and the call's stats."""
    seen: list[str] = []
    drawn: dict[SequenceSampler, int] = {}  # tokens each sampler has drawn so far (keeps it alive)
    real = SequenceSampler.sample

    def watching(self, context, row):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context.ptr, row), shape=(context.n_vocab,))
        drawn[self] = n = drawn.get(self, -1) + 1
        seen.append(f"{self.seed}:{n}:{hashlib.sha256(logits.tobytes()).hexdigest()}")
        return real(self, context, row)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SequenceSampler, "sample", watching)
        completions, stats = engine.generate(requests, SHORT)
    return [[(c.text, c.seed) for c in row] for row in completions], sorted(seen), stats


def _engine(bundle, kv_unified: bool) -> Engine:
    from pgenrm_lite.bundle import Bundle

    return Engine(Bundle.open(bundle).llm_path, n_ctx=8192, n_threads=2, device="cpu", n_seq_max=8,
                  kv_unified=kv_unified, model_id="smollm2-test")


@pytest.fixture(scope="module")
def engine(default_bundle):
    with _engine(default_bundle, True) as eng:
        yield eng


@pytest.fixture(scope="module")
def split_engine(default_bundle):
    with _engine(default_bundle, False) as eng:
        yield eng


@pytest.mark.parametrize("kv", ["unified", "split"])
def test_cold_warm_reordered_and_evicting_caches_give_bitwise_the_same_logits(kv, default_bundle, request):
    # default_bundle is named so that the real_model mark sees the engine fixture's model
    engine = request.getfixturevalue("engine" if kv == "unified" else "split_engine")
    requests = _requests(engine, [ALICE, BOB])
    engine.prefix_cache = PrefixCache(0)  # no cache: the reference
    ref_out, ref_logits, ref_stats = _run(engine, requests)
    assert ref_stats.cache_misses == 2 and ref_stats.cache_hits == 0
    assert len(ref_logits) >= 6 and len(set(ref_logits)) > 1

    engine.prefix_cache = cache = PrefixCache(64)
    cold = _run(engine, requests)
    warm = _run(engine, requests)
    assert (cold[0], cold[1]) == (ref_out, ref_logits) == (warm[0], warm[1])
    assert (cold[2].cache_misses, warm[2].cache_hits, warm[2].cache_misses) == (2, 2, 0)
    # Warm: only the text after the system messages is evaluated.
    assert warm[2].n_prompt_tokens + warm[2].n_cached_tokens == cold[2].n_prompt_tokens
    assert warm[2].n_prompt_tokens < 0.4 * cold[2].n_prompt_tokens

    # Filled by other calls, in another order (bob alone, then alice alone), then used together.
    engine.prefix_cache = PrefixCache(64)
    _run(engine, requests[2:])
    _run(engine, requests[:2])
    assert _run(engine, requests)[:2] == (ref_out, ref_logits)

    if kv == "split":
        return  # eviction is the cache's bookkeeping, checked once
    # A budget that holds one prefix: every call evicts, results stay the same.
    one = len(cache.get(cache_key(*engine.cache_scope(), requests[0].tokens[:requests[0].prefix_len])))
    engine.prefix_cache = tiny = PrefixCache(1.5 * one / (1 << 20))
    for users in ([ALICE], [BOB], [ALICE]):
        reqs = _requests(engine, users)
        _run(engine, reqs)
    assert tiny.snapshot().evicted == 2 and tiny.snapshot().entries == 1
    out, logits, stats = _run(engine, requests)
    assert (out, logits) == (ref_out, ref_logits) and stats.cache_evicted >= 1


def test_both_candidate_orders_evaluate_the_shared_query_once(engine):
    requests = _requests(engine, [ALICE])
    engine.prefix_cache = PrefixCache(0)
    out, logits, stats = _run(engine, requests)
    q = requests[0].shared_len
    assert stats.n_prompt_tokens == q + sum(len(r.tokens) - q for r in requests)
    # Without the span each order evaluates the query again, and the results differ only at the
    # sampling-noise level (another ubatch split), so they are not compared here.
    unshared = _run(engine, _requests(engine, [ALICE], shared=False))[2]
    assert unshared.n_prompt_tokens - stats.n_prompt_tokens == q - requests[0].prefix_len
    # The order whose span is copied still gets the same logits, call after call.
    assert _run(engine, requests)[:2] == (out, logits)


def test_disk_cache_survives_a_restart_and_refuses_damaged_or_foreign_files(engine, tmp_path):
    requests = _requests(engine, [ALICE])
    engine.prefix_cache = PrefixCache(64, tmp_path)
    ref = _run(engine, requests)[:2]
    key = cache_key(*engine.cache_scope(), requests[0].tokens[:requests[0].prefix_len])
    path = engine.prefix_cache.path(key)
    good = path.read_bytes()
    assert read_file_payload(good, key)

    def restart_and_run():  # a new process: nothing in memory, the directory as left
        engine.prefix_cache = PrefixCache(64, tmp_path)
        out = _run(engine, requests)
        return out[:2], out[2], engine.prefix_cache.snapshot()

    out, stats, snap = restart_and_run()
    assert out == ref and (stats.cache_hits, snap.disk_hits, snap.disk_rejected) == (1, 1, 0)

    # A file written under another model's key, moved to this key's name.
    other = Engine.__new__(Engine)
    other._cache_scope = ("another-model",) + engine.cache_scope()[1:]
    other_key = cache_key(*other._cache_scope, requests[0].tokens[:requests[0].prefix_len])
    foreign = HEADER.pack(good[:8], 1, other_key, *HEADER.unpack_from(good)[3:]) + good[HEADER.size:]
    damaged = {
        "truncated": good[: len(good) // 2],
        "corrupted": good[:-100] + bytes([good[-100] ^ 1]) + good[-99:],
        "foreign": foreign,
        "not a cache file": b"GGUF" + good[4:],
    }
    for blob in damaged.values():
        with pytest.raises(CacheFileError):
            read_file_payload(blob, key)
    for what in ("truncated", "corrupted", "foreign"):
        path.write_bytes(damaged[what])
        out, stats, snap = restart_and_run()
        assert out == ref, what
        assert (stats.cache_misses, snap.disk_rejected, snap.disk_written) == (1, 1, 1), what
        assert path.read_bytes() == good, what  # rebuilt: the same bytes again


def test_disk_cache_keeps_within_its_size_cap(tmp_path):
    one = 1 << 20
    cache = PrefixCache(0, tmp_path, disk_mb=2.5)
    for i in range(4):
        cache.put(cache_key("k", i), bytes([i]) * one)
    files = sorted(p.name for p in tmp_path.glob("*.pfx"))
    assert len(files) == 2 and cache.get(cache_key("k", 3)) == bytes([3]) * one
    assert cache.get(cache_key("k", 0)) is None  # the oldest went first


def test_memory_cache_is_lru_within_budget_and_thread_safe():
    cache = PrefixCache(3 / 1024)  # 3 KiB: three 1 KiB entries
    for i in range(3):
        cache.put(cache_key(i), bytes(1024))
    assert cache.get(cache_key(0)) is not None  # 0 is now the most recent
    cache.put(cache_key(3), bytes(1024))
    assert cache.get(cache_key(1)) is None and cache.get(cache_key(0)) is not None
    errors = []

    def hammer(t):
        try:
            for i in range(2000):
                k = cache_key(t, i % 7)
                if cache.get(k) is None:
                    cache.put(k, bytes(256 + t))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = cache.snapshot()
    assert not errors and snap.bytes <= 3 * 1024
    assert snap.bytes == sum(len(v) for v in cache._entries.values()) and snap.entries == len(cache._entries)
    assert snap.hits + snap.misses == 4 * 2000 + 3




def test_scorer_compare_and_score_with_neighbours_cold_warm_and_threaded(default_bundle):
    with Scorer.from_bundle(default_bundle, n_samples=1, n_neighbors=1, **SMOLLM2_SHORT) as scorer:
        cold = scorer.compare(ALICE, PROMPT, A, B, seed=5)
        warm = scorer.compare(ALICE, PROMPT, A, B, seed=5)
        assert [s.kind for s in cold.samples] == ["self", "neighbor"]
        assert cold.timing.cache_misses == 2 and cold.timing.cache_hits == 0  # own and neighbour prefix
        assert warm.timing.cache_hits == 2 and warm.timing.cache_misses == 0
        assert warm.timing.n_prompt_tokens + warm.timing.n_cached_tokens == cold.timing.n_prompt_tokens
        assert warm.model_dump(exclude={"timing"}) == cold.model_dump(exclude={"timing"})
        three = [A, B, "Reverse it."]
        warm_scores = scorer.score(ALICE, PROMPT, three, seed=5)  # three pairs, one user prefix: warm
        scorer.prefix_cache.clear()
        assert scorer.score(ALICE, PROMPT, three, seed=5) == warm_scores
        # Threads share the scorer's cache: the same results, and every lookup counted once.
        results = {}
        before = scorer.prefix_cache.snapshot()

        def work(user):
            results[user.user_id] = scorer.compare(user, PROMPT, A, B, seed=5)

        threads = [threading.Thread(target=work, args=(u,)) for u in (ALICE, BOB)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert results["alice"].model_dump(exclude={"timing"}) == cold.model_dump(exclude={"timing"})
        after = scorer.prefix_cache.snapshot()
        lookups = sum(r.timing.cache_hits + r.timing.cache_misses for r in results.values())
        assert (after.hits + after.misses) - (before.hits + before.misses) == lookups


def test_options_reach_the_engine_and_bad_sizes_are_config_errors(fake_engine, fake_gguf, tmp_path):
    from pgenrm_lite.cli import build_parser
    from pgenrm_lite.errors import ConfigError

    with Scorer.from_gguf(fake_gguf, prefix_cache_mb=1, prefix_cache_dir=tmp_path / "kv",
                          prefix_cache_disk_mb=3) as s:
        cache = s.prefix_cache
        assert s.engine.prefix_cache is cache and (tmp_path / "kv").is_dir()
        assert (cache.budget, cache.disk_budget) == (1 << 20, 3 << 20)
    for bad in (-1, "12", True, float("nan")):
        with pytest.raises(ConfigError, match="prefix_cache_mb"):
            Scorer.from_gguf(fake_gguf, prefix_cache_mb=bad)
    with pytest.raises(ConfigError, match="cannot be created"):
        Scorer.from_gguf(fake_gguf, prefix_cache_dir=fake_gguf / "kv")  # under a file
    args = build_parser().parse_args(["compare", "--user", "u.json", "--prompt", "p", "--a", "a", "--b", "b",
                                      "--prefix-cache-mb", "0", "--prefix-cache-dir", str(tmp_path)])
    assert (args.prefix_cache_mb, args.prefix_cache_dir) == (0.0, str(tmp_path))


def test_forget_drops_an_owners_states_from_memory_and_disk(tmp_path):
    from pgenrm_lite.prefix_cache import PrefixCache, cache_key, owner_tag

    cache = PrefixCache(1.0, tmp_path)
    keys = {name: cache_key(name, (1, 2, 3)) for name in ("a1", "a2", "b1", "n1")}
    cache.put(keys["a1"], b"x" * 100, "alice")
    cache.put(keys["a2"], b"y" * 100, "alice")
    cache.put(keys["b1"], b"z" * 100, "bob")
    cache.put(keys["n1"], b"w" * 100)  # nobody's
    assert cache.owners() == {"alice", "bob"}
    assert len(list(tmp_path.glob(owner_tag("alice") + "-*"))) == 2 and "alice" not in str(list(tmp_path.iterdir()))
    assert cache.forget("alice") == 4  # two in memory, two on disk
    assert cache.owners() == {"bob"} and not list(tmp_path.glob(owner_tag("alice") + "-*"))
    assert cache.get(keys["a1"], "alice") is None and cache.get(keys["b1"], "bob") == b"z" * 100
    assert cache.get(keys["n1"]) == b"w" * 100 and cache.forget("") == 0
    fresh = PrefixCache(1.0, tmp_path)  # a restarted process finds only what was not forgotten
    assert fresh.get(keys["a2"], "alice") is None and fresh.get(keys["b1"], "bob") == b"z" * 100
