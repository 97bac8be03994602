"""The default bundle's recommended sampling settings, chosen by measurement on held-out HH pairs.

For each (temperature, PART 1 length) the same test pairs are judged with the user's own
history (Ind-m, m chains per pair, same seeds everywhere) through the structured contract's
grammar. Per chain: parse rate, tie rate (equal final scores), agreement (the chain's
higher score goes to the response this user chose; ties count half) and readability (the
share of PART 1's whitespace-separated tokens that are plain words: letters, with at most
one trailing punctuation mark; URLs, code and letter soup are not). Also tokens per chain.

Choice rule (printed with the result): the configurations whose agreement interval (95%
Wilson) overlaps the best one's are indistinguishable on agreement; among those with a
parse rate of at least 95%, those within 0.01 of the best readability are equally
readable; among those, the fewest ties (a tie is no decision), then the fewest tokens per
chain (the cheapest). `--from-json FILE` prints a saved run again and re-applies the rule.

    python benchmarks/defaults_sweep.py ../shared/data/hh_two_users_test.jsonl.gz

Writes benchmarks/out/defaults_sweep.json (or --out-dir).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from _common import OUT_DIR, fmt, hh_test_rows, load_line, machine, resolve_bundle, table, write_json

READABILITY_TIE = 0.01  # readability differences below this are noise at this sample size
WORD = re.compile(r"^[A-Za-z]+(?:['-][A-Za-z]+)*[.,;:!?)]?$")


def readability(text: str) -> float | None:
    tokens = text.split()
    return sum(bool(WORD.match(t)) for t in tokens) / len(tokens) if tokens else None


def run_config(bundle: Path, users: dict, tests: list, temperature: float, analysis_max: int, args) -> dict:
    from pgenrm_lite import contracts
    from pgenrm_lite.evaluation import wilson_interval
    from pgenrm_lite.scorer import Scorer

    analysis = (20, analysis_max)
    max_tokens = contracts.structured_token_need(analysis, args.max_criteria)
    chains = parsed = ties = 0
    agree = 0.0
    read, tokens = [], []
    start = time.perf_counter()
    with Scorer.from_bundle(bundle, n_samples=args.samples, seed=args.seed, n_threads=args.threads,
                            temperature=temperature, analysis_chars=analysis, max_criteria=args.max_criteria,
                            max_tokens=max_tokens) as scorer:
        for i, row in enumerate(tests):
            res = scorer.compare(users[row.user_id], row.prompt, row.chosen, row.rejected, seed=args.seed + i)
            for s in res.samples:
                chains += 1
                tokens.append(s.n_tokens)
                if s.chain is None:
                    continue
                parsed += 1
                ties += s.score_a == s.score_b
                agree += 1.0 if s.score_a > s.score_b else 0.5 if s.score_a == s.score_b else 0.0
                r = readability(s.chain.analysis)
                if r is not None:
                    read.append(r)
    return {"temperature": temperature, "analysis_chars": list(analysis), "max_tokens": max_tokens,
            "chains": chains, "parse_rate": parsed / chains, "tie_rate": ties / parsed if parsed else None,
            "agreement": agree / parsed if parsed else None,
            "agreement_ci95": list(wilson_interval(agree, parsed)) if parsed else None,
            "readability": sum(read) / len(read) if read else None,
            "tokens_per_chain": sum(tokens) / len(tokens), "wall_s": time.perf_counter() - start}


def choose(results: list[dict]) -> dict:
    """Agreement first where it tells configurations apart, then readability, then ties, then cost."""
    best = max(results, key=lambda r: r["agreement"] or 0)
    lo_best = best["agreement_ci95"][0]
    tied = [r for r in results if r["agreement_ci95"] and r["agreement_ci95"][1] >= lo_best and r["parse_rate"] >= 0.95]
    tied = tied or [best]
    top = max(r["readability"] or 0 for r in tied)
    readable = [r for r in tied if (r["readability"] or 0) >= top - READABILITY_TIE]
    return min(readable, key=lambda r: (r["tie_rate"] or 0, r["tokens_per_chain"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--bundle", type=Path, default=None, help="default: the default bundle")
    p.add_argument("--limit", type=int, default=16, help="held-out test pairs (default 16)")
    p.add_argument("--samples", type=int, default=4, help="chains per pair (default 4)")
    p.add_argument("--temperatures", default="0.4,0.7,1.0")
    p.add_argument("--analysis", default="300,600,1200", help="PART 1 maximum lengths in characters")
    p.add_argument("--max-criteria", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--from-json", type=Path, default=None, help="re-print a saved run (no measuring)")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        report(saved["results"], saved["settings"]["pairs"], saved["settings"]["samples"], saved["settings"]["seed"],
               "load average: see the file")
        saved["chosen"] = choose(saved["results"])
        write_json(args.out_dir / "defaults_sweep.json", saved)
        return 0
    bundle = resolve_bundle(args.bundle)
    users, tests = hh_test_rows(args.data, args.limit, args.split_seed)
    at_start = machine()
    results = []
    for t in (float(x) for x in args.temperatures.split(",")):
        for a in (int(x) for x in args.analysis.split(",")):
            r = run_config(bundle, users, tests, t, a, args)
            print(f"  T={t} analysis<={a}: parse {r['parse_rate']:.2f} agree {fmt(r['agreement'])} "
                  f"read {fmt(r['readability'])} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            results.append(r)
    chosen = report(results, len(tests), args.samples, args.seed, load_line())
    write_json(args.out_dir / "defaults_sweep.json", {
        "benchmark": "defaults_sweep", "machine": {**at_start, "load_average_end": machine()["load_average"]},
        "settings": {"data": str(args.data), "bundle": str(bundle), "pairs": len(tests), "samples": args.samples,
                     "seed": args.seed, "split_seed": args.split_seed, "max_criteria": args.max_criteria},
        "results": results, "chosen": chosen})
    return 0


def report(results: list[dict], pairs: int, samples: int, seed: int, load: str) -> dict:
    chosen = choose(results)
    print(f"\n{pairs} HH test pairs x {samples} chains, seed {seed}; {load}")
    print(table(["temperature", "analysis", "parse", "ties", "agreement [95% CI]", "readability", "tokens/chain",
                 "wall s"],
                [[r["temperature"], r["analysis_chars"][1], fmt(r["parse_rate"]), fmt(r["tie_rate"]),
                  f"{fmt(r['agreement'])} [{fmt(r['agreement_ci95'][0])}, {fmt(r['agreement_ci95'][1])}]"
                  if r["agreement_ci95"] else "n/a", fmt(r["readability"]), fmt(r["tokens_per_chain"], 0),
                  fmt(r["wall_s"], 0)] for r in results]))
    print(f"chosen: temperature {chosen['temperature']}, analysis_chars {chosen['analysis_chars']}, "
          f"max_tokens {chosen['max_tokens']} (rule: agreement intervals overlapping the best, parse >= 95%, "
          f"readability within {READABILITY_TIE} of the best, then fewest ties, then fewest tokens)")
    return chosen


if __name__ == "__main__":
    sys.exit(main())
