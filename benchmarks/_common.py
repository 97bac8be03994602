"""Helpers shared by the benchmark scripts: paths, the default bundle, child processes, tables, plots.

Timings are printed and written to JSON only; nothing here decides pass or fail on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `export` runs from the checkout, it is not installed

OUT_DIR = REPO / "benchmarks" / "out"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh_two_users_test.jsonl.gz"

# (name, m individual samples, n prototype-level samples): the paper's scaling configurations
CONFIGS = [("Ind-1", 1, 0), ("Ind-4", 4, 0), ("Ind-8", 8, 0), ("Ind-16", 16, 0),
           ("Ind-8/Pro-4", 8, 4), ("Ind-16/Pro-8", 16, 8)]
QUICK_CONFIGS = [("Ind-1", 1, 0), ("Ind-2", 2, 0), ("Ind-2/Pro-1", 2, 1)]  # --quick: seconds on a tiny model


# -- inputs ---------------------------------------------------------------------------------

def resolve_bundle(path: Path | None) -> Path:
    """The bundle named, else the default bundle (built into its cache directory if absent)."""
    if path is not None:
        return Path(path)
    from pgenrm_lite.bundle import is_bundle_dir
    from pgenrm_lite.defaults import default_bundle_dir

    out = default_bundle_dir()
    if not is_bundle_dir(out):
        from export.default_bundle import build_default_bundle

        print(f"building the default bundle into {out} ...", file=sys.stderr)
        build_default_bundle(out)
    return out


def hh_test_rows(data: Path, limit: int, split_seed: int):
    """(users by id, the first `limit` test rows round-robin over the users) of an HH file."""
    from pgenrm_lite.datasets import load_hh, rows_of_split, users_from_rows
    from pgenrm_lite.evaluation import interleave_by_user

    rows = load_hh(data, seed=split_seed)
    return users_from_rows(rows), interleave_by_user(rows_of_split(rows))[:limit]


def int_pair(text: str) -> tuple[int, int]:
    """'20,600' -> (20, 600), for --analysis-chars."""
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from exc
    return lo, hi


def add_scorer_options(parser: argparse.ArgumentParser) -> None:
    """Options passed through to the Scorer; left out, the bundle's recommended defaults apply."""
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per chain (default: bundle's)")
    parser.add_argument("--analysis-chars", type=int_pair, default=None,
                        help="MIN,MAX characters of the free-text analysis (default: bundle's)")
    parser.add_argument("--max-criteria", type=int, default=None, help="criteria in the JSON (default: bundle's)")
    parser.add_argument("--history-pairs", type=int, default=None, help="history pairs shown (default: 3)")


def scorer_options(args: argparse.Namespace) -> dict:
    names = ("max_tokens", "analysis_chars", "max_criteria", "history_pairs")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_omp_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                        help="OMP_WAIT_POLICY for the model processes (default: the environment's). llama.cpp "
                             "here is built with OpenMP, whose idle threads spin; when the cores are "
                             "oversubscribed that slows it down many times over, and 'passive' avoids it")


def apply_omp_policy(policy: str | None) -> str | None:
    """Set OMP_WAIT_POLICY before llama.cpp (libgomp) is loaded here or in a child; return what applies."""
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return os.environ.get("OMP_WAIT_POLICY")


# -- measuring ------------------------------------------------------------------------------

def in_child(fn: Callable, *args):
    """Run fn(*args) in a fresh spawned process and return its result (peak RSS stays per call)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def decode_step_ms(engine, n_prompt: int, token: int, n: int, steps: int) -> float:
    """Median ms of one decode step for `n` sequences sharing the prompt held in sequence 0.

    Works on the engine's context (a building block, not a call). The prompt's `n_prompt`
    cells must be in sequence 0; they are left there, and nothing else.
    """
    ctx = engine.context
    for seq in range(1, n):
        ctx.seq_copy(0, seq)
    times = []
    for k in range(steps):
        ctx.batch.fill([(token, n_prompt + k, seq, True) for seq in range(n)])
        t = time.perf_counter()
        ctx.decode()
        times.append(time.perf_counter() - t)
    for seq in range(1, n):
        ctx.seq_remove(seq)
    ctx.seq_remove(0, n_prompt)
    return 1000 * float(median(times))


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(list(values), q))


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)


def machine() -> dict:
    import llama_cpp

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_line(label: str = "load average") -> str:
    one, five, fifteen = os.getloadavg()
    return f"{label} {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPU(s)"


# -- output ---------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain text table, right-aligned except the first column."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def fmt(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{suffix}"


def write_json(path: Path, data: dict, *, quiet: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")


def new_figure(n_panels: int, width: float = 6.0, height: float = 4.2):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
