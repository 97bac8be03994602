"""`python -m export check-quant`: is a quantised judge still the same judge?

    python -m export check-quant --reference model-q4_1.gguf --candidate model-q8_0.gguf \
        --candidate model-q4_0.gguf --data pairs.jsonl --bundle bundle/ --limit 40 --noise-floor --out report.json

Perplexity says how far a quantised model's next-token distributions moved; a reward model
is judged by its verdicts. Both files judge the same test pairs with the same seeds and the
same settings (the bundle's template, chat template and recommended options with `--bundle`,
else the structured contract's defaults), one model loaded at a time, and the report gives:

- verdict agreement: the share of pairs where both models give the same verdict (A, B or no
  decision), and among the pairs where both decided;
- decision changes: pairs decided by one model and not the other (a tie or no parsed chain);
- final-score drift: mean and max |(score_a - score_b)_candidate - (score_a - score_b)_reference|
  over pairs both parsed, and the mean |score change| of each response;
- accuracy of each (chosen shown as A), for context;
- next-token KL(reference || candidate) and top-1 agreement over every position of the first
  `--kl-prompts` rendered prompts (both models loaded together for this part, batch by batch).

At temperature > 0 two runs of the *same* model disagree too. `--noise-floor` judges the pairs
once more with the reference and other seeds and reports that agreement beside the candidate's:
a candidate that agrees with the reference about as often as the reference agrees with itself
has lost nothing the sampling does not already lose.

Pass/fail per candidate against `--min-agreement`, `--max-score-drift` (mean) and `--max-kl`
(mean): exit status 0 when every candidate passes, 3 when one fails (1 is an error). `--out`
writes the report as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import orjson

from pgenrm_lite._atomic import atomic_path
from pgenrm_lite._progress import Progress
from pgenrm_lite.errors import ConfigError
from pgenrm_lite.protocol import derive_seed
from pgenrm_lite.records import UserProfile

FAILED = 3  # exit status of a check that ran and did not pass


def load_pairs(data: Path, fmt: str, limit: int, split_seed: int = 0):
    """(users by id, the first `limit` test rows, interleaved by user)."""
    from pgenrm_lite.datasets import load_hh, load_rows, rows_of_split, users_from_rows
    from pgenrm_lite.evaluation import interleave_by_user

    rows = load_hh(data, seed=split_seed) if fmt == "hh" else load_rows(data)
    tests = interleave_by_user(rows_of_split(rows))[:limit]
    if not tests:
        raise ConfigError(f"{data} has no test rows to judge (rows with split 'test')")
    users = users_from_rows(rows)
    # A user with no history rows is judged without one, as `pgenrm-lite eval` does.
    return {row.user_id: users[row.user_id] or UserProfile(user_id=row.user_id) for row in tests}, tests


def open_scorer(model: Path, bundle: Optional[Path], *, n_samples: int, threads: Optional[int], overrides: dict):
    from pgenrm_lite import Scorer

    if bundle is not None:
        return Scorer.from_bundle(bundle, model=model, n_samples=n_samples, n_threads=threads, device="cpu",
                                  **overrides)
    return Scorer.from_gguf(model, n_samples=n_samples, n_threads=threads, device="cpu", **overrides)


def judge_all(model: Path, bundle, users, tests, *, seed: int, n_samples: int, threads, overrides: dict,
              label: str, progress: Optional[bool]) -> list[dict]:
    """One verdict per test row: {preferred, score_a, score_b, n_parsed}; row i uses seed derive(seed, i)."""
    out = []
    with open_scorer(model, bundle, n_samples=n_samples, threads=threads, overrides=overrides) as scorer, \
            Progress(len(tests), label, unit="pair", enabled=progress) as bar:
        for i, row in enumerate(tests):
            user = users[row.user_id]
            res = scorer.compare(user, row.prompt, row.chosen, row.rejected, seed=derive_seed(seed, "check-quant", i))
            out.append({"preferred": res.preferred, "score_a": res.score_a, "score_b": res.score_b,
                        "n_parsed": res.n_parsed})
            bar.update(1)
    return out


def compare_verdicts(ref: list[dict], other: list[dict]) -> dict:
    """Agreement, decision changes and score drift of `other` against `ref` (same pairs, same order)."""
    n = len(ref)
    same = sum(r["preferred"] == o["preferred"] for r, o in zip(ref, other))
    both = [(r, o) for r, o in zip(ref, other) if r["preferred"] is not None and o["preferred"] is not None]
    changed = sum((r["preferred"] is None) != (o["preferred"] is None) for r, o in zip(ref, other))
    parsed = [(r, o) for r, o in zip(ref, other) if r["score_a"] is not None and o["score_a"] is not None]
    drift = [abs((o["score_a"] - o["score_b"]) - (r["score_a"] - r["score_b"])) for r, o in parsed]
    moved = [abs(o[k] - r[k]) for r, o in parsed for k in ("score_a", "score_b")]
    return {"pairs": n, "agreement": same / n if n else None,
            "agreement_decided": sum(r["preferred"] == o["preferred"] for r, o in both) / len(both) if both else None,
            "n_both_decided": len(both), "decision_changes": changed,
            "score_drift_mean": float(np.mean(drift)) if drift else None,
            "score_drift_max": float(np.max(drift)) if drift else None,
            "score_change_mean": float(np.mean(moved)) if moved else None, "n_both_parsed": len(parsed)}


def accuracy(verdicts: list[dict]) -> dict:
    decided = [v for v in verdicts if v["preferred"] is not None]
    correct = sum(v["preferred"] == "a" for v in decided)
    return {"correct": correct, "decided": len(decided), "pairs": len(verdicts),
            "accuracy_all": correct / len(verdicts) if verdicts else None,
            "accuracy_decided": correct / len(decided) if decided else None}


def next_token_kl(reference: Path, candidate: Path, prompts: list[list[int]], threads) -> dict:
    """Mean and p99 KL(reference || candidate) and top-1 agreement over every prompt position."""
    from pgenrm_lite.engine import Engine

    n_ctx = max(len(p) for p in prompts) + 16
    kls, agree = [], []
    with Engine(reference, n_ctx=n_ctx, n_threads=threads, device="cpu", n_seq_max=1) as ref, \
            Engine(candidate, n_ctx=n_ctx, n_threads=threads, device="cpu", n_seq_max=1) as cand:
        if ref.n_vocab != cand.n_vocab:
            raise ConfigError(f"the models have different vocabularies ({ref.n_vocab} and {cand.n_vocab} tokens): "
                              "next-token KL is undefined; compare quantisations of one model")
        for tokens in prompts:
            for r, c in zip(ref.prompt_logprobs(tokens), cand.prompt_logprobs(tokens)):
                kls.append((np.exp(r) * (r - c)).sum(axis=1))
                agree.append(r.argmax(axis=1) == c.argmax(axis=1))
    kl = np.concatenate(kls)
    return {"tokens": int(kl.size), "prompts": len(prompts), "mean_kl": float(kl.mean()),
            "p99_kl": float(np.quantile(kl, 0.99)), "top1_agreement": float(np.concatenate(agree).mean())}


def rendered_prompts(model: Path, bundle, users, tests, *, seed: int, threads, overrides: dict) -> list[list[int]]:
    with open_scorer(model, bundle, n_samples=1, threads=threads, overrides=overrides) as scorer:
        return [scorer.prompt(users[row.user_id], row.prompt, row.chosen, row.rejected,
                              seed=derive_seed(seed, "check-quant", i))[1] for i, row in enumerate(tests)]


def verdict_checks(vs_reference: dict, kl: Optional[dict], args) -> dict:
    checks = {"agreement": (vs_reference["agreement"], ">=", args.min_agreement),
              "score_drift_mean": (vs_reference["score_drift_mean"], "<=", args.max_score_drift)}
    if kl is not None:
        checks["mean_kl"] = (kl["mean_kl"], "<=", args.max_kl)
    out = {}
    for name, (value, op, limit) in checks.items():
        ok = value is not None and (value >= limit if op == ">=" else value <= limit)
        out[name] = {"value": value, "limit": limit, "op": op, "passed": bool(ok)}
    return out


def check(args) -> dict:
    users, tests = load_pairs(args.data, args.format, args.limit)
    overrides = {} if args.temperature is None else {"temperature": args.temperature}
    common = dict(n_samples=args.n_samples, threads=args.threads, overrides=overrides, progress=args.progress)
    t0 = time.monotonic()
    ref = judge_all(args.reference, args.bundle, users, tests, seed=args.seed, label="reference", **common)
    report: dict = {
        "reference": str(args.reference), "data": str(args.data),
        "bundle": None if args.bundle is None else str(args.bundle), "format": args.format, "pairs": len(tests),
        "seed": args.seed, "n_samples": args.n_samples, "temperature": args.temperature,
        "reference_accuracy": accuracy(ref), "candidates": [],
    }
    if args.noise_floor:
        again = judge_all(args.reference, args.bundle, users, tests, seed=args.seed + 1, label="reference again",
                          **common)
        report["reference_vs_itself"] = {**compare_verdicts(ref, again), "accuracy": accuracy(again)}
    prompts = []
    if args.kl_prompts:
        prompts = rendered_prompts(args.reference, args.bundle, users, tests[:args.kl_prompts], seed=args.seed,
                                   threads=args.threads, overrides=overrides)
    for path in args.candidate:
        verdicts = judge_all(path, args.bundle, users, tests, seed=args.seed, label=Path(path).name, **common)
        entry = {"candidate": str(path), "vs_reference": compare_verdicts(ref, verdicts),
                 "accuracy": accuracy(verdicts),
                 "next_token": next_token_kl(args.reference, path, prompts, args.threads) if prompts else None}
        entry["checks"] = verdict_checks(entry["vs_reference"], entry["next_token"], args)
        entry["passed"] = all(c["passed"] for c in entry["checks"].values())
        report["candidates"].append(entry)
    report["passed"] = all(c["passed"] for c in report["candidates"])
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    return report


def render(report: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    def num(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"

    temp = "the bundle's" if report["temperature"] is None else report["temperature"]
    lines = [f"against {report['reference']}: {report['pairs']} pairs, seed {report['seed']}, "
             f"Ind-{report['n_samples']}, temperature {temp}",
             f"  reference accuracy (chosen = A): {pct(report['reference_accuracy']['accuracy_all'])}"]
    if "reference_vs_itself" in report:
        f = report["reference_vs_itself"]
        lines.append(f"  noise floor: the reference against itself (other seeds): agreement {pct(f['agreement'])}, "
                     f"score drift mean {num(f['score_drift_mean'])}")
    for entry in report["candidates"]:
        c, k = entry["vs_reference"], entry["next_token"]
        lines += [f"{entry['candidate']}:",
                  f"  verdict agreement      {pct(c['agreement'])} (among pairs both decided: "
                  f"{pct(c['agreement_decided'])} of {c['n_both_decided']})",
                  f"  decision changes       {c['decision_changes']}",
                  f"  score drift (A-B)      mean {num(c['score_drift_mean'])}, max {num(c['score_drift_max'])} "
                  f"over {c['n_both_parsed']} pairs; mean |score change| {num(c['score_change_mean'])}",
                  f"  accuracy (chosen = A)  {pct(entry['accuracy']['accuracy_all'])}"]
        if k is not None:
            lines.append(f"  next token             mean KL {k['mean_kl']:.4f}, p99 KL {k['p99_kl']:.3f}, top-1 "
                         f"agreement {pct(k['top1_agreement'])} over {k['tokens']} positions of {k['prompts']} prompts")
        for name, chk in entry["checks"].items():
            lines.append(f"  check {name:<16} {num(chk['value'], 4)} {chk['op']} {chk['limit']}: "
                         f"{'pass' if chk['passed'] else 'FAIL'}")
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reference", type=Path, required=True, help="the GGUF file whose verdicts are the reference")
    p.add_argument("--candidate", type=Path, required=True, action="append",
                   help="a GGUF file to check (e.g. re-quantised); repeat to check several against one reference run")
    p.add_argument("--data", type=Path, required=True, help="test pairs: PersonalRewardBench rows or the HH file")
    p.add_argument("--format", choices=("prb", "hh"), default="prb")
    p.add_argument("--bundle", type=Path, default=None,
                   help="take the template, chat template and recommended options from this bundle")
    p.add_argument("--limit", type=int, default=40, help="test pairs to judge (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-samples", type=int, default=1, help="chains per pair (default 1)")
    p.add_argument("--temperature", type=float, default=None, help="override the sampling temperature")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--noise-floor", action="store_true",
                   help="also judge once more with the reference and other seeds, to see sampling's own disagreement")
    p.add_argument("--kl-prompts", type=int, default=8, help="rendered prompts for the next-token KL (0: skip)")
    p.add_argument("--min-agreement", type=float, default=0.8, help="pass when verdict agreement >= this")
    p.add_argument("--max-score-drift", type=float, default=1.5, help="pass when the mean A-B drift <= this")
    p.add_argument("--max-kl", type=float, default=0.05, help="pass when the mean next-token KL <= this")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")


def run(args) -> int:
    for path in (args.reference, *args.candidate, args.data):
        if not Path(path).is_file():
            raise ConfigError(f"{path} does not exist")
    if args.limit < 1 or args.n_samples < 1 or args.kl_prompts < 0:
        raise ConfigError("--limit and --n-samples must be >= 1, --kl-prompts >= 0")
    report = check(args)
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            tmp.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json else render(report))
    sys.stdout.flush()
    return 0 if report["passed"] else FAILED
