"""Does the expected-score read-out let fewer chains reach the same verdict?

For each test pair of the real two-user HH file, one batched call draws `--chains` chains
with the user's own history (Ind-K, seeded), recording at every digit the distribution it
was drawn from. Each chain then gives two numbers per candidate: the final score it wrote
(sampled read-out) and the digit-expectation of that score (expected read-out, the
Scorer's `expected_scores=True`). The chains are the same for both read-outs.

The first half of the chains feeds the estimators, the second half (held out) the
reference verdict: the sign of the mean expected score difference over the held-out
chains. For N in 1, 2, 3, ... the estimator half is cut into disjoint groups of N chains;
a group's verdict is the sign of its mean score difference under each read-out. Printed:
agreement with the reference (a tie counts as disagreement), accuracy against the human
label, and the per-chain variance of the score difference under each read-out (their
ratio is how many sampled chains one expected chain is worth, for the mean).

    python benchmarks/readout.py ../shared/data/hh_two_users_test.jsonl.gz --pairs 8 --chains 24
    python benchmarks/readout.py HH_FILE --against "I don't know."   # pairs with a clear better side
    python benchmarks/readout.py HH_FILE --bundle DIR --quick      # seconds, tiny bundle

Writes benchmarks/out/readout.json (or --out-dir).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _common import (OUT_DIR, add_omp_option, add_scorer_options, apply_omp_policy, fmt, hh_test_rows, load_line,
                     machine, new_figure, resolve_bundle, save_figure, scorer_options, table, write_json)


def draw(args) -> list[dict]:
    """Per pair: each chain's (sampled, expected) score difference a - b, or None if it failed."""
    from pgenrm_lite import Scorer
    from pgenrm_lite._progress import Progress

    users, rows = hh_test_rows(args.data, args.pairs, args.split_seed)
    out = []
    with Scorer.from_bundle(resolve_bundle(args.bundle), n_samples=args.chains, seed=args.seed,
                            n_threads=args.threads, expected_scores=True, **scorer_options(args)) as scorer, \
            Progress(len(rows), "pairs", unit="pair") as bar:
        for i, row in enumerate(rows):
            rejected = row.rejected if args.against is None else args.against
            res = scorer.compare(users[row.user_id], row.prompt, row.chosen, rejected, seed=args.seed + i)
            chains = []
            for s in res.samples:
                if s.chain is None or s.readout != "expected":
                    chains.append(None)
                    continue
                sa, sb = (s.chain.final_scores[::-1] if s.swapped else s.chain.final_scores)
                chains.append((sa - sb, s.score_a - s.score_b))
            out.append({"user_id": row.user_id, "seed": args.seed + i, "chains": chains,
                        "n_tokens": res.timing.n_generated_tokens, "seconds": res.timing.total_s})
            bar.update(1)
    return out


def _verdict(diffs: list[float]) -> int:
    m = float(np.mean(diffs))
    return 0 if m == 0 else (1 if m > 0 else -1)


def analyse(pairs: list[dict], group_sizes: list[int]) -> dict:
    half = len(pairs[0]["chains"]) // 2
    per_n: dict[int, dict[str, list[int]]] = {n: {"sampled": [], "expected": [], "sampled_correct": [],
                                                  "expected_correct": []} for n in group_sizes}
    within_var = {"sampled": [], "expected": []}
    skipped = 0
    for pair in pairs:
        est = [c for c in pair["chains"][:half] if c is not None]
        held = [c for c in pair["chains"][half:] if c is not None]
        if len(est) < half or not held:
            skipped += 1  # a failed chain would make the groups uneven; reported, not hidden
            continue
        reference = _verdict([e for _, e in held])
        for k, name in enumerate(("sampled", "expected")):
            within_var[name].append(float(np.var([c[k] for c in est], ddof=1)))
        for n in group_sizes:
            for g in range(half // n):
                group = est[g * n:(g + 1) * n]
                for k, name in enumerate(("sampled", "expected")):
                    v = _verdict([c[k] for c in group])
                    per_n[n][name].append(int(v == reference and v != 0))
                    per_n[n][name + "_correct"].append(int(v == 1))  # response a is the human's choice
    rows = []
    for n in group_sizes:
        d = per_n[n]
        rows.append({"n_chains": n, "groups": len(d["sampled"]),
                     "agreement_sampled": float(np.mean(d["sampled"])) if d["sampled"] else None,
                     "agreement_expected": float(np.mean(d["expected"])) if d["expected"] else None,
                     "accuracy_sampled": float(np.mean(d["sampled_correct"])) if d["sampled"] else None,
                     "accuracy_expected": float(np.mean(d["expected_correct"])) if d["expected"] else None})
    vs, ve = (float(np.mean(within_var[k])) if within_var[k] else None for k in ("sampled", "expected"))
    return {"rows": rows, "pairs_used": len(pairs) - skipped, "pairs_skipped_for_failed_chains": skipped,
            "mean_within_pair_variance": {"sampled": vs, "expected": ve},
            "variance_ratio_expected_over_sampled": (ve / vs) if vs and ve is not None else None}


def plot(result: dict, path: Path) -> None:
    fig, (ax,) = new_figure(1)
    ns = [r["n_chains"] for r in result["rows"]]
    for key, label in (("agreement_sampled", "sampled scores"), ("agreement_expected", "expected scores")):
        ax.plot(ns, [r[key] if r[key] is not None else float("nan") for r in result["rows"]], marker="o", label=label)
    ax.set_xlabel("chains per verdict")
    ax.set_ylabel("agreement with the held-out verdict")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="HH file (hh_two_users_test.jsonl.gz)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the default bundle)")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--chains", type=int, default=24, help="chains per pair; half estimate, half are held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--against", default=None, metavar="TEXT",
                   help="judge each chosen response against this text instead of the rejected one (a pair "
                        "set where a weak model has a preference to find)")
    p.add_argument("--quick", action="store_true", help="2 pairs, 4 chains (a smoke run)")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    add_scorer_options(p, exclude=("expected_scores",))  # always on here
    add_omp_option(p)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.chains = 2, 4
    if args.chains < 2 or args.chains % 2:
        p.error("--chains must be an even number >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    omp = apply_omp_policy(args.omp_wait_policy)
    half = args.chains // 2
    sizes = [n for n in (1, 2, 3, 4, 6, 8, 12, 16) if n <= half and half % n == 0]
    print(load_line("before:"))
    t0 = time.perf_counter()
    pairs = draw(args)
    result = analyse(pairs, sizes)
    elapsed = time.perf_counter() - t0
    print(load_line("after: "))
    print(f"{result['pairs_used']} pairs x {args.chains} chains (seed {args.seed}; "
          f"{result['pairs_skipped_for_failed_chains']} pair(s) skipped for a failed chain), {elapsed:.0f} s")
    print(table(["chains", "groups", "agree sampled", "agree expected", "acc sampled", "acc expected"],
                [[r["n_chains"], r["groups"], fmt(r["agreement_sampled"], 3), fmt(r["agreement_expected"], 3),
                  fmt(r["accuracy_sampled"], 3), fmt(r["accuracy_expected"], 3)] for r in result["rows"]]))
    v = result["mean_within_pair_variance"]
    print(f"per-chain variance of score_a - score_b: sampled {fmt(v['sampled'], 3)}, expected "
          f"{fmt(v['expected'], 3)} (ratio {fmt(result['variance_ratio_expected_over_sampled'], 3)})")
    write_json(args.out_dir / "readout.json", {
        "settings": {"pairs": args.pairs, "chains": args.chains, "seed": args.seed, "split_seed": args.split_seed,
                     "against": args.against,
                     "bundle": str(resolve_bundle(args.bundle)), "data": str(args.data),
                     "scorer_options": scorer_options(args), "omp_wait_policy": omp},
        "machine": machine(), "elapsed_s": elapsed, **result, "pairs": pairs})
    plot(result, args.out_dir / "readout.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
