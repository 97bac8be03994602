"""Pairwise accuracy on the real two-user HH file: a judge without history against Ind-1, Ind-8, Ind-8/Pro-4.

Every judge is the same model through the same `Scorer`, protocol and grammar, on the same
test pairs with the same seeds (`pgenrm_lite.evaluation.evaluate`):
  no history    a `UserProfile` with an empty history (the non-personalised judge), 1 sample;
  Ind-1, Ind-8  the user's own history (3 pairs drawn from their train rows), 1 / 8 samples;
  Ind-8/Pro-4   plus 4 chains written with the histories of the most similar prototype members.
Prototypes (default `--prototypes hh`): a copy of the bundle whose index is rebuilt from
HH pseudo-users, each holding a disjoint slice of one evaluated user's *train* rows (no
test row is in any member); the evaluated users themselves are not members.
`--prototypes bundle` keeps the bundle's own index (the default bundle: the example users).
Accuracy in both tie conventions, with 95% Wilson intervals, per user and overall.

    python benchmarks/accuracy.py ../shared/data/hh_two_users_test.jsonl.gz          # 40 pairs, long
    python benchmarks/accuracy.py HH_FILE --bundle DIR --quick                       # seconds, tiny bundle

Writes benchmarks/out/accuracy.json and accuracy.png (or --out-dir).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import (OUT_DIR, add_omp_option, add_scorer_options, apply_omp_policy, fmt, hh_test_rows, load_line,
                     machine, new_figure, resolve_bundle, save_figure, scorer_options, table, write_json)

# (name, m, n, personalised)
JUDGES = [("no history", 1, 0, False), ("Ind-1", 1, 0, True), ("Ind-8", 8, 0, True), ("Ind-8/Pro-4", 8, 4, True)]
QUICK_JUDGES = [("no history", 1, 0, False), ("Ind-1", 1, 0, True), ("Ind-2", 2, 0, True),
                ("Ind-2/Pro-1", 2, 1, True)]
TIE_CONVENTIONS = {"accuracy_official": "ties and unparseable pairs dropped from the denominator (P-GenRM)",
                   "accuracy_rewardbench": "ties and unparseable pairs counted wrong (RewardBench)"}


# -- data and prototypes --------------------------------------------------------------------------

def pseudo_users(users: dict, per_user: int) -> dict:
    """Members for the prototype index: each user's train history dealt into `per_user` slices."""
    from pgenrm_lite.records import UserProfile

    members = {}
    for uid, user in users.items():
        for j in range(per_user):
            uid_j = f"{uid}~{j}"
            members[uid_j] = UserProfile(user_id=uid_j, history=user.history[j::per_user])
    return members


def hh_prototype_bundle(bundle: Path, users: dict, workdir: Path, args) -> tuple[Path, dict]:
    """A copy of `bundle` whose prototype index holds HH pseudo-users (never the evaluated users)."""
    from export.prototypes_build import build_prototypes

    copy = workdir / "bundle"
    shutil.copytree(bundle, copy)
    members = pseudo_users(users, args.pseudo_users)
    info = build_prototypes(copy, members, k=args.k, persona_source="history", members_carry="history",
                            seed=args.seed, progress=False)
    return copy, {"source": "hh", "members": info.n_members, "prototypes": info.count,
                  "persona_source": info.persona_source,
                  "description": f"{info.n_members} HH pseudo-users ({args.pseudo_users} per evaluated user, each a "
                                 "disjoint slice of that user's train rows) in "
                                 f"{info.count} prototypes; evaluated users excluded, no test rows"}


def bundle_prototypes(bundle: Path) -> dict:
    from pgenrm_lite.bundle import Bundle

    info = Bundle.open(bundle, verify="size").manifest.prototypes
    if info is None:
        return {"source": "bundle", "members": 0, "prototypes": 0, "description": "the bundle has no prototype index"}
    return {"source": "bundle", "members": info.n_members, "prototypes": info.count,
            "persona_source": info.persona_source,
            "description": f"the bundle's own index ({info.n_members} members in {info.count} prototypes; for the "
                           "default bundle: the shipped example users, not HH users)"}


# -- judging ------------------------------------------------------------------------------------

def run_judge(name: str, m: int, n: int, personalised: bool, bundle: Path, users: dict, tests: list, args) -> dict:
    from pgenrm_lite.evaluation import evaluate
    from pgenrm_lite.records import UserProfile
    from pgenrm_lite.scorer import Scorer

    start = time.perf_counter()
    with Scorer.from_bundle(bundle, n_samples=m, n_neighbors=n, n_threads=args.threads, device=args.device,
                            seed=args.seed, **scorer_options(args)) as scorer:
        def judge(user, row, seed):
            shown = user if personalised else UserProfile(user_id=user.user_id)
            res = scorer.compare(shown, row.prompt, row.chosen, row.rejected, seed=seed)
            return res.preferred, res.n_parsed, res.n_failed

        def progress(item):
            print(f"  {name}: pair {item['index'] + 1}/{len(tests)} {item['user_id']}: {item['preferred']}",
                  file=sys.stderr, flush=True)

        config = {"n_samples": m, "n_neighbors": n, "personalised": personalised,
                  "max_tokens": scorer.params.max_tokens, "history_pairs": scorer.history_pairs if personalised else 0}
        report = evaluate(judge, users, tests, seed=args.seed, config=config, on_result=progress)
    return {"judge": name, **config, "wall_s": time.perf_counter() - start, "overall": report.overall,
            "per_user": report.per_user, "results": report.results}


# -- report -------------------------------------------------------------------------------------

def _acc(s: dict, key: str) -> str:
    ci = s[f"{key}_ci95"]
    if s[key] is None:
        return "n/a"
    return f"{100 * s[key]:.1f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def print_report(judges: list[dict], settings: dict) -> None:
    counts = ", ".join(f"{u}: {c}" for u, c in settings["pairs_per_user"].items())
    print(f"\n{settings['pairs']} HH test pairs ({counts}), "
          f"seed {settings['seed']}; prototypes: {settings['prototypes']['description']}; {load_line()}")
    rows = []
    for j in judges:
        for who, s in [("overall", j["overall"])] + list(j["per_user"].items()):
            rows.append([j["judge"] if who == "overall" else "", who, s["pairs"], _acc(s, "accuracy_official"),
                         s["correct"] + s["wrong"], _acc(s, "accuracy_rewardbench"), s["ties"], s["no_parse"],
                         f"{s['samples_failed']}/{s['samples_total']}"])
    print(table(["judge", "user", "pairs", "official [95% CI]", "decided", "rewardbench [95% CI]", "ties",
                 "unparsed", "failed samples"], rows))
    print("official: " + TIE_CONVENTIONS["accuracy_official"] + "; rewardbench: "
          + TIE_CONVENTIONS["accuracy_rewardbench"])
    print("wall time: " + ", ".join(f"{j['judge']} {fmt(j['wall_s'], 1)} s" for j in judges))


def plot(judges: list[dict], path: Path) -> None:
    fig, (ax,) = new_figure(1, width=8.0)
    groups = ["overall"] + sorted({u for j in judges for u in j["per_user"]})
    width = 0.8 / len(judges)
    for k, j in enumerate(judges):
        stats = [j["overall"] if g == "overall" else j["per_user"].get(g) for g in groups]
        xs = [i + (k - (len(judges) - 1) / 2) * width for i in range(len(groups))]
        acc = [100 * (s["accuracy_official"] or 0) if s else 0 for s in stats]
        lo = [a - 100 * s["accuracy_official_ci95"][0] if s and s["accuracy_official_ci95"] else 0
              for a, s in zip(acc, stats)]
        hi = [100 * s["accuracy_official_ci95"][1] - a if s and s["accuracy_official_ci95"] else 0
              for a, s in zip(acc, stats)]
        ax.bar(xs, acc, width=width, yerr=[lo, hi], capsize=3, label=j["judge"])
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy, ties dropped (%), 95% Wilson CI")
    ax.set_title("pairwise accuracy on the two-user HH file", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path, help="the two-user HH file (hh_two_users_test.jsonl.gz)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: the default bundle)")
    p.add_argument("--limit", type=int, default=40, help="test pairs, round-robin over the users (default 40)")
    p.add_argument("--prototypes", choices=("hh", "bundle"), default="hh",
                   help="hh: rebuild the index from HH pseudo-users (default); bundle: the bundle's own index")
    p.add_argument("--pseudo-users", type=int, default=8, help="hh prototypes: members per evaluated user")
    p.add_argument("--k", type=int, default=4, help="hh prototypes: number of prototypes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the HH train/test split")
    p.add_argument("--quick", action="store_true", help="2 pairs, judges no history / Ind-1 / Ind-2 / Ind-2/Pro-1")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    add_omp_option(p)
    add_scorer_options(p)
    args = p.parse_args(argv)
    if args.quick:
        args.limit = min(args.limit, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    omp_policy = apply_omp_policy(args.omp_wait_policy)
    at_start = machine()
    bundle = resolve_bundle(args.bundle)
    users, tests = hh_test_rows(args.data, args.limit, args.split_seed)
    with tempfile.TemporaryDirectory(prefix="accuracy-bench-") as tmp:
        if args.prototypes == "hh":
            judged_bundle, protos = hh_prototype_bundle(bundle, users, Path(tmp), args)
        else:
            judged_bundle, protos = bundle, bundle_prototypes(bundle)
        judges = [run_judge(name, m, n, pers, judged_bundle, users, tests, args)
                  for name, m, n, pers in (QUICK_JUDGES if args.quick else JUDGES)
                  if n == 0 or protos["prototypes"] > 0]
    per_user: dict[str, int] = {}
    for row in tests:
        per_user[row.user_id] = per_user.get(row.user_id, 0) + 1
    settings = {"data": str(args.data), "bundle": str(bundle), "pairs": len(tests), "pairs_per_user": per_user,
                "limit": args.limit, "seed": args.seed, "split_seed": args.split_seed, "threads": args.threads,
                "omp_wait_policy": omp_policy,
                "device": args.device, "quick": args.quick, "prototypes": protos,
                "scorer_options": {k: list(v) if isinstance(v, tuple) else v for k, v in scorer_options(args).items()},
                "tie_conventions": TIE_CONVENTIONS}
    print_report(judges, settings)
    write_json(args.out_dir / "accuracy.json", {
        "benchmark": "accuracy", "machine": {**at_start, "load_average_end": machine()["load_average"]},
        "settings": settings, "judges": judges})
    plot(judges, args.out_dir / "accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
