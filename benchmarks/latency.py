"""Latency and memory of `Scorer.compare` against the sample counts, cold start, prototype look-up (issue 6).

Through the real `Scorer` on a bundle (default: the default bundle), for Ind-1, Ind-4,
Ind-8, Ind-16, Ind-8/Pro-4 and Ind-16/Pro-8, each in a fresh child process:
  cold start  `Scorer.from_bundle` to the first `compare` result (imports apart);
  compare     p50 / p95 latency over the next calls (HH pairs x repeats), with the
              prompt / decode split and generated tokens; peak RSS of the process.
Prototype level uses the bundle's own prototype index (for the default bundle: the
example users), with the user's persona taken the way the index was built.
Then, in another child: embedding a persona text and the prototype look-up
(`PrototypeIndex.neighbors`), timed apart, in milliseconds.

    python benchmarks/latency.py                         # default bundle, many minutes
    python benchmarks/latency.py --bundle DIR --quick    # seconds on a tiny bundle

Writes benchmarks/out/latency.json and latency.png (or --out-dir).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import (CONFIGS, DEFAULT_DATA, OUT_DIR, QUICK_CONFIGS, add_omp_option, add_scorer_options,
                     apply_omp_policy, fmt, hh_test_rows, in_child, load_line, machine, median, new_figure, peak_rss_mb,
                     percentile, resolve_bundle, save_figure, scorer_options, table, write_json)

LOOKUP_NS = (4, 8)


# -- workload -------------------------------------------------------------------------------------

def hh_pairs(data: Path, n_pairs: int, seed: int) -> list[tuple]:
    """(user, prompt, chosen, rejected) for the first test rows, round-robin over the two users."""
    users, tests = hh_test_rows(data, n_pairs, seed)
    return [(users[r.user_id], r.prompt, r.chosen, r.rejected) for r in tests]


def persona_texts(data: Path, n: int, seed: int) -> list[str]:
    """History-style persona texts of HH pseudo-users: what a `history` index embeds per look-up."""
    from pgenrm_lite import protocol
    from pgenrm_lite.datasets import load_hh, users_from_rows

    users = users_from_rows(load_hh(data, seed=seed, users_per_objective=max(1, (n + 1) // 2)))
    return [protocol.persona_from_history(u) for u in list(users.values())[:n]]


# -- children -------------------------------------------------------------------------------------

def run_scorer(bundle: str, m: int, n: int, pairs: list[tuple], job: dict) -> dict:
    """Cold start, then every pair `repeats` times, in this (fresh) process."""
    from pgenrm_lite import protocol

    from pgenrm_lite.scorer import Scorer

    t_start = time.perf_counter()
    scorer = Scorer.from_bundle(bundle, n_samples=m, n_neighbors=n, n_threads=job["threads"],
                                device=job["device"], seed=job["seed"], **job["options"])
    t_load = time.perf_counter()
    first = scorer.compare(*pairs[0])
    t_first = time.perf_counter()
    calls = []
    for rep in range(job["repeats"]):
        for i, (user, prompt, a, b) in enumerate(pairs):
            res = scorer.compare(user, prompt, a, b, seed=protocol.derive_seed(job["seed"], "latency", rep, i))
            t = res.timing
            calls.append({"total_s": t.total_s, "prompt_s": t.prompt_s, "decode_s": t.decode_s,
                          "n_prompt_tokens": t.n_prompt_tokens, "n_generated_tokens": t.n_generated_tokens,
                          "n_groups": t.n_groups, "n_parsed": res.n_parsed, "n_failed": res.n_failed,
                          "neighbors": len(res.neighbors)})
    out = {"load_s": t_load - t_start, "first_compare_s": t_first - t_load, "cold_start_s": t_first - t_start,
           "first_tokens": first.timing.n_generated_tokens,
           "n_ctx": scorer.engine.n_ctx, "max_tokens": scorer.params.max_tokens, "calls": calls,
           "notes": sorted(set(first.notes))}
    scorer.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_lookup(bundle: str, texts: list[str], repeats: int, threads: int) -> dict:
    """Embedding and neighbour look-up times (ms) on the bundle's prototype index."""
    from pgenrm_lite.bundle import Bundle
    from pgenrm_lite.prototypes import PrototypeIndex

    t0 = time.perf_counter()
    index = PrototypeIndex.from_bundle(Bundle.open(bundle, verify="size"), device="cpu", n_threads=threads)
    load_s = time.perf_counter() - t0
    index.embed(texts[0])  # warm-up: the first run allocates
    embed_ms, lookup_ms, total_ms = [], {n: [] for n in LOOKUP_NS}, []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            vec = index.embed(text)
            embed_ms.append((time.perf_counter() - start) * 1e3)
            for n in LOOKUP_NS:
                start = time.perf_counter()
                index.neighbors_for_vector(vec, n)
                lookup_ms[n].append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            index.neighbors(text, LOOKUP_NS[-1])
            total_ms.append((time.perf_counter() - start) * 1e3)
    out = {"load_s": load_s, "members": index.n_members, "prototypes": index.n_prototypes,
           "persona_source": index.persona_source, "queries": len(embed_ms),
           "embed_ms": stats_ms(embed_ms), "neighbors_total_ms": stats_ms(total_ms),
           "lookup_ms": {str(n): stats_ms(v) for n, v in lookup_ms.items()}}
    index.close()
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def stats_ms(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "n": len(values)}


# -- summary ------------------------------------------------------------------------------------

def summarise(name: str, m: int, n: int, r: dict) -> dict:
    calls = r["calls"]
    totals = [c["total_s"] for c in calls]
    return {
        "config": name, "m": m, "n": n, "calls": len(calls),
        "p50_s": percentile(totals, 50), "p95_s": percentile(totals, 95),
        "prompt_s_p50": median([c["prompt_s"] for c in calls]), "decode_s_p50": median([c["decode_s"] for c in calls]),
        "mean_generated_tokens": sum(c["n_generated_tokens"] for c in calls) / len(calls),
        "mean_prompt_tokens": sum(c["n_prompt_tokens"] for c in calls) / len(calls),
        "samples_parsed": sum(c["n_parsed"] for c in calls), "samples_failed": sum(c["n_failed"] for c in calls),
        "max_groups": max(c["n_groups"] for c in calls), "neighbors_used": max(c["neighbors"] for c in calls),
        "cold_start_s": r["cold_start_s"], "load_s": r["load_s"], "first_compare_s": r["first_compare_s"],
        "peak_rss_mb": r["peak_rss_mb"], "n_ctx": r["n_ctx"],
        "max_tokens": r["max_tokens"], "notes": r["notes"], "raw_calls": calls,
    }


def print_report(rows: list[dict], lookup: dict | None, settings: dict) -> None:
    base = rows[0]["p50_s"] if rows and rows[0]["config"] == "Ind-1" else None
    print(f"\n{settings['bundle']}: {settings['threads']} thread(s) (OMP_WAIT_POLICY="
          f"{settings['omp_wait_policy'] or 'unset'}), max_tokens {rows[0]['max_tokens']}, "
          f"{rows[0]['calls']} timed compare call(s) per configuration; {load_line()}")
    print(table(["config", "cold start s", "p50 s", "p95 s", "x Ind-1", "prompt s", "decode s", "gen tokens",
                 "peak RSS MB", "failed"],
                [[r["config"], fmt(r["cold_start_s"]), fmt(r["p50_s"]), fmt(r["p95_s"]),
                  fmt(r["p50_s"] / base) if base else "", fmt(r["prompt_s_p50"]), fmt(r["decode_s_p50"]),
                  f"{r['mean_generated_tokens']:.0f}", fmt(r["peak_rss_mb"], 0),
                  f"{r['samples_failed']}/{r['samples_failed'] + r['samples_parsed']}"] for r in rows]))
    print("cold start = Scorer.from_bundle + first compare, in a fresh process (interpreter start and "
          "imports excluded); p50/p95 over the calls after it")
    if lookup:
        print(f"\nprototype look-up: {lookup['members']} members in {lookup['prototypes']} prototypes "
              f"({lookup['persona_source']} personas), {lookup['queries']} queries; index load "
              f"{lookup['load_s']:.2f} s, peak RSS {lookup['peak_rss_mb']:.0f} MB")
        items = [("embed persona", lookup["embed_ms"])]
        items += [(f"neighbours n={n} (vector given)", s) for n, s in lookup["lookup_ms"].items()]
        items += [(f"neighbors() n={LOOKUP_NS[-1]} (embed + look-up)", lookup["neighbors_total_ms"])]
        print(table(["step", "p50 ms", "p95 ms"], [[k, fmt(s["p50"], 3), fmt(s["p95"], 3)] for k, s in items]))


def plot(rows: list[dict], lookup: dict | None, path: Path) -> None:
    fig, (ax_lat, ax_rss, ax_look) = new_figure(3, width=5.0)
    names = [r["config"] for r in rows]
    x = list(range(len(rows)))
    ax_lat.bar([i - 0.2 for i in x], [r["p50_s"] for r in rows], width=0.4, label="p50")
    ax_lat.bar([i + 0.2 for i in x], [r["p95_s"] for r in rows], width=0.4, label="p95")
    ax_lat.plot(x, [r["cold_start_s"] for r in rows], "k^", label="cold start")
    ax_rss.bar(x, [r["peak_rss_mb"] for r in rows], color="tab:green")
    for ax, title in ((ax_lat, "compare latency (s)"), (ax_rss, "peak RSS (MB)")):
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
    ax_lat.legend(fontsize=8)
    if lookup:
        steps = [("embed", lookup["embed_ms"])] + [(f"look-up n={n}", s) for n, s in lookup["lookup_ms"].items()]
        steps.append(("embed+look-up", lookup["neighbors_total_ms"]))
        xs = list(range(len(steps)))
        ax_look.bar([i - 0.2 for i in xs], [s["p50"] for _, s in steps], width=0.4, label="p50")
        ax_look.bar([i + 0.2 for i in xs], [s["p95"] for _, s in steps], width=0.4, label="p95")
        ax_look.set_xticks(xs, [k for k, _ in steps], rotation=20, fontsize=8)
        ax_look.legend(fontsize=8)
    ax_look.set_title("prototype look-up (ms)", fontsize=10)
    save_figure(fig, path)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the default bundle)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the two-user HH file")
    p.add_argument("--pairs", type=int, default=3, help="HH pairs per configuration (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="times each pair is compared after the first call")
    p.add_argument("--lookup-queries", type=int, default=16, help="persona texts for the look-up timing")
    p.add_argument("--lookup-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="Ind-1, Ind-2, Ind-2/Pro-1, 1 pair, few look-ups")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    add_omp_option(p)
    add_scorer_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats, args.lookup_queries, args.lookup_repeats = 1, 1, 4, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    omp_policy = apply_omp_policy(args.omp_wait_policy)
    from pgenrm_lite.bundle import Bundle

    at_start = machine()
    bundle = resolve_bundle(args.bundle)
    has_index = Bundle.open(bundle, verify="size").manifest.prototypes is not None
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    skipped = [name for name, _, n in configs if n > 0 and not has_index]
    pairs = hh_pairs(args.data, args.pairs, args.seed)
    job = {"threads": args.threads, "device": args.device, "seed": args.seed, "repeats": args.repeats,
           "options": scorer_options(args)}
    rows = []
    for name, m, n in configs:
        if name in skipped:
            continue
        r = in_child(run_scorer, str(bundle), m, n, pairs, job)
        rows.append(summarise(name, m, n, r))
        print(f"{name:13} cold {r['cold_start_s']:6.2f} s  p50 {rows[-1]['p50_s']:6.2f} s", file=sys.stderr,
              flush=True)
    lookup = None
    if has_index:
        texts = persona_texts(args.data, args.lookup_queries, args.seed)
        lookup = in_child(run_lookup, str(bundle), texts, args.lookup_repeats, args.threads)
    settings = {"bundle": str(bundle), "data": str(args.data), "pairs": len(pairs), "repeats": args.repeats,
                "threads": args.threads, "omp_wait_policy": omp_policy, "device": args.device, "seed": args.seed,
                "quick": args.quick,
                "scorer_options": {k: list(v) if isinstance(v, tuple) else v for k, v in job["options"].items()},
                "pair_users": [p[0].user_id for p in pairs],
                "skipped": {name: "the bundle has no prototype index" for name in skipped},
                "prototype_index": "the bundle's own (for the default bundle: the shipped example users)"}
    print_report(rows, lookup, settings)
    write_json(args.out_dir / "latency.json", {
        "benchmark": "latency", "machine": {**at_start, "load_average_end": machine()["load_average"]},
        "settings": settings, "compare": rows, "lookup": lookup})
    plot(rows, lookup, args.out_dir / "latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
