"""The prompt-prefix cache, off against on, side by side in one run (issue 15).

Through the real `Scorer` on a bundle (default: the default bundle) and HH pseudo-users,
three usage patterns, each cell in a fresh child process (so peak RSS is per cell):
  (a) evaluation  one user, --pairs test pairs in order, at Ind-1 and at Ind-8/Pro-4
  (b) RLHF        --users users x --rollouts calls each, in a seeded random order, at Ind-4
  (c) restart     a new process's first call (Ind-1) with the disk cache warm (filled by an
                  earlier process) against the cache off
For each: prompt tokens evaluated, prompt tokens restored, wall time of the calls (model
load excluded; median over --reps processes), peak RSS. Every call's result (timing
aside) is hashed, and the script checks that cache off and on gave the same results.

    flock /tmp/pgenrm-cpu.lock python benchmarks/prefix_cache.py            # many minutes
    python benchmarks/prefix_cache.py --pairs 3 --heavy-pairs 1 --rollouts 2 --reps 1   # a few minutes

Writes benchmarks/out/prefix_cache.json (or --out).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import (DEFAULT_DATA, OUT_DIR, add_omp_option, add_scorer_options, apply_omp_policy, fmt, in_child,
                     load_line, machine, median, peak_rss_mb, resolve_bundle, scorer_options, table, write_json)


# -- workload -------------------------------------------------------------------------------------

def pseudo_users(data: Path, n_users: int, seed: int):
    """HH pseudo-users (the two objectives split into several users each) and their test rows."""
    from pgenrm_lite.datasets import load_hh, rows_of_split, users_from_rows

    rows = load_hh(data, seed=seed, users_per_objective=max(1, (n_users + 1) // 2))
    users = users_from_rows(rows)
    tests: dict[str, list] = {}
    for r in rows_of_split(rows):
        tests.setdefault(r.user_id, []).append(r)
    ids = sorted(users)[:n_users]
    return {u: users[u] for u in ids}, {u: tests[u] for u in ids}


def calls_for(pattern: str, users: dict, tests: dict, args) -> list[tuple]:
    """(user, prompt, a, b) per call, in the order the pattern makes them."""
    first = next(iter(users))
    if pattern.startswith("a"):
        n = args.pairs if pattern == "a Ind-1" else args.heavy_pairs
        return [(users[first], r.prompt, r.chosen, r.rejected) for r in tests[first][:n]]
    if pattern.startswith("b"):
        calls = [(users[u], r.prompt, r.chosen, r.rejected) for u in users for r in tests[u][:args.rollouts]]
        random.Random(args.seed).shuffle(calls)
        return calls
    return [(users[first], r.prompt, r.chosen, r.rejected) for r in tests[first][:1]]


# -- child ----------------------------------------------------------------------------------------

def run_calls(bundle: str, m: int, n: int, calls: list[tuple], cache: dict, job: dict) -> dict:
    """Load a scorer, make the calls in order; what they evaluated, their time and the result hashes."""
    from pgenrm_lite.scorer import Scorer

    t0 = time.perf_counter()
    scorer = Scorer.from_bundle(bundle, n_samples=m, n_neighbors=n, n_threads=job["threads"], device="cpu",
                                seed=job["seed"], **cache, **job["options"])
    load_s = time.perf_counter() - t0
    out = {"calls": len(calls), "prompt_tokens": 0, "cached_tokens": 0, "hits": 0, "misses": 0, "evicted": 0,
           "prompt_s": 0.0, "decode_s": 0.0, "generated_tokens": 0, "load_s": load_s, "hashes": [], "per_call": []}
    t1 = time.perf_counter()
    for user, prompt, a, b in calls:
        tc = time.perf_counter()
        res = scorer.compare(user, prompt, a, b)
        tc = time.perf_counter() - tc
        t = res.timing
        out["prompt_tokens"] += t.n_prompt_tokens
        out["cached_tokens"] += t.n_cached_tokens
        out["hits"] += t.cache_hits
        out["misses"] += t.cache_misses
        out["evicted"] += t.cache_evicted
        out["prompt_s"] += t.prompt_s
        out["decode_s"] += t.decode_s
        out["generated_tokens"] += t.n_generated_tokens
        out["per_call"].append((t.n_prompt_tokens, t.cache_misses, tc))
        out["hashes"].append(hashlib.sha256(res.model_dump_json(exclude={"timing"}).encode()).hexdigest()[:16])
    out["wall_s"] = time.perf_counter() - t1
    snap = scorer.prefix_cache.snapshot()
    out["state_bytes_per_prefix"] = snap.bytes // snap.entries if snap.entries else None
    out["disk_hits"] = snap.disk_hits
    scorer.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# -- main -----------------------------------------------------------------------------------------

def measure(label: str, bundle: str, m: int, n: int, calls: list, cache: dict, job: dict, reps: int,
            before=None) -> dict:
    runs = []
    for _ in range(reps):
        if before is not None:
            before()
        runs.append(in_child(run_calls, bundle, m, n, calls, cache, job))
        print(f"  {label}: {runs[-1]['wall_s']:.1f} s, {runs[-1]['prompt_tokens']} prompt tokens evaluated",
              file=sys.stderr)
    cell = {k: runs[0][k] for k in ("calls", "prompt_tokens", "cached_tokens", "hits", "misses", "evicted",
                                    "generated_tokens", "state_bytes_per_prefix", "disk_hits", "per_call")}
    cell.update(wall_s=median([r["wall_s"] for r in runs]), wall_s_runs=[r["wall_s"] for r in runs],
                prompt_s=median([r["prompt_s"] for r in runs]), decode_s=median([r["decode_s"] for r in runs]),
                peak_rss_mb=max(r["peak_rss_mb"] for r in runs), reps=reps,
                identical_across_reps=all(r["hashes"] == runs[0]["hashes"] for r in runs))
    cell["hashes"] = runs[0]["hashes"]
    cell["per_call_wall_s"] = [median([r["per_call"][i][2] for r in runs]) for i in range(len(calls))]
    return cell


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--pairs", type=int, default=20, help="(a) test pairs of the one user at Ind-1 (default 20)")
    ap.add_argument("--heavy-pairs", type=int, default=20, help="(a) test pairs at Ind-8/Pro-4 (default 20)")
    ap.add_argument("--users", type=int, default=4, help="(b) users (default 4)")
    ap.add_argument("--rollouts", type=int, default=16, help="(b) calls per user (default 16)")
    ap.add_argument("--reps", type=int, default=3, help="processes per cell; wall time is their median (default 3)")
    ap.add_argument("--heavy-reps", type=int, default=None, help="reps for Ind-8/Pro-4 and (b) (default: --reps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patterns", default="a,b,c", help="which of a,b,c to run (default all; a1 / a8: one half of a)")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "prefix_cache.json")
    add_scorer_options(ap, exclude=("prefix_cache_mb",))  # the benchmark switches it
    add_omp_option(ap)
    args = ap.parse_args(argv)
    omp = apply_omp_policy(args.omp_wait_policy)
    bundle = str(resolve_bundle(args.bundle))
    heavy_reps = args.heavy_reps or args.reps
    job = {"threads": args.threads, "seed": args.seed, "options": scorer_options(args)}
    users, tests = pseudo_users(args.data, args.users, args.seed)
    off, on = {"prefix_cache_mb": 0}, {}
    wanted = set(args.patterns.split(","))
    cells: dict[str, dict] = {}
    started = time.time()
    plan = []
    if wanted & {"a", "a1"}:
        plan += [("a Ind-1", 1, 0, args.reps)]
    if wanted & {"a", "a8"}:
        plan += [("a Ind-8/Pro-4", 8, 4, heavy_reps)]
    if "b" in wanted:
        plan += [("b Ind-4", 4, 0, heavy_reps)]
    for name, m, n, reps in plan:
        calls = calls_for(name, users, tests, args)
        print(f"{name}: {len(calls)} calls, {reps} process(es) per cell", file=sys.stderr)
        cells[name] = {"m": m, "n": n, "off": measure(f"{name} off", bundle, m, n, calls, off, job, reps),
                       "on": measure(f"{name} on", bundle, m, n, calls, on, job, reps)}
    if "c" in wanted:
        calls = calls_for("c", users, tests, args)
        with tempfile.TemporaryDirectory(prefix="pgenrm-prefix-cache-") as tmp:
            disk = {"prefix_cache_dir": tmp}
            print("c restart: filling the disk cache in one process", file=sys.stderr)
            fill = in_child(run_calls, bundle, 1, 0, calls, disk, job)
            cells["c restart Ind-1"] = {
                "m": 1, "n": 0, "fill_process_prompt_tokens": fill["prompt_tokens"],
                "off": measure("c off", bundle, 1, 0, calls, off, job, args.reps),
                "on": measure("c on (disk warm)", bundle, 1, 0, calls, disk, job, args.reps)}
    rows = []
    for name, c in cells.items():
        o, w = c["off"], c["on"]
        c["same_results_off_and_on"] = o["hashes"] == w["hashes"]
        c["prompt_tokens_ratio"] = w["prompt_tokens"] / o["prompt_tokens"] if o["prompt_tokens"] else None
        c["wall_ratio"] = w["wall_s"] / o["wall_s"] if o["wall_s"] else None
        # Warm calls: those the cache served without evaluating any prefix (misses == 0).
        warm = [i for i, (_, misses, _) in enumerate(w["per_call"]) if misses == 0]
        c["warm_calls"] = len(warm)
        c["warm_prompt_tokens_ratio"] = (sum(w["per_call"][i][0] for i in warm) / sum(o["per_call"][i][0] for i in warm)
                                         if warm else None)
        c["warm_wall_ratio"] = (sum(w["per_call_wall_s"][i] for i in warm) / sum(o["per_call_wall_s"][i] for i in warm)
                                if warm else None)
        rows.append([name, o["calls"], o["prompt_tokens"], w["prompt_tokens"], fmt(c["prompt_tokens_ratio"]),
                     f"{len(warm)}: {fmt(c['warm_prompt_tokens_ratio'])}, {fmt(c['warm_wall_ratio'])}",
                     fmt(o["wall_s"], 1), fmt(w["wall_s"], 1), fmt(c["wall_ratio"]), fmt(o["peak_rss_mb"], 0),
                     fmt(w["peak_rss_mb"], 0), f"{w['hits']}/{w['misses']}/{w['evicted']}",
                     "yes" if c["same_results_off_and_on"] else "NO"])
    print(table(["pattern", "calls", "prompt tok off", "on", "ratio", "warm calls: tok, wall ratio",
                 "wall s off", "on", "ratio", "RSS MB off",
                 "on", "hit/miss/evict", "same results"], rows))
    print(load_line())
    out = {
        "benchmark": "prefix_cache", "bundle": bundle, "data": str(args.data), "seed": args.seed,
        "threads": args.threads, "omp_wait_policy": omp, "options": job["options"],
        "pairs": args.pairs, "heavy_pairs": args.heavy_pairs, "users": args.users, "rollouts": args.rollouts,
        "reps": args.reps, "heavy_reps": heavy_reps,
        "notes": ["wall time: the calls only (model load excluded), median over `reps` fresh processes",
                  "prompt tokens: evaluated per cell (the same in every rep); cached: restored from the cache",
                  "cache on: the default memory budget; (c) also a disk cache filled by an earlier process"],
        "machine": machine(), "load": load_line(), "elapsed_s": round(time.time() - started, 1), "cells": cells,
    }
    write_json(args.out, out)
    return 0 if all(c["same_results_off_and_on"] for c in cells.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
