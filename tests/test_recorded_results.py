"""Refactors keep behaviour: a few real SmolLM2 results on the default bundle, recorded once, must
come back byte for byte (same seed, same results).

Sampled text depends on the CPU kernels llama.cpp picked, so the comparison holds only on the
build and CPU features the results were recorded with; elsewhere the test skips and says how to
record them again:

    python tests/test_recorded_results.py        # rewrites tests/fixtures/recorded_results.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import SMOLLM2_SHORT

RECORDED = Path(__file__).parent / "fixtures" / "recorded_results.json"


def build_fingerprint() -> dict:
    """What decides the bytes besides the inputs: llama.cpp's version and the CPU features it uses."""
    import llama_cpp

    return {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}


def current_results(bundle: Path) -> dict:
    """Compare at Ind-2/Pro-1 (digit read-out on) and score three responses at Ind-1, seeded."""
    from pgenrm_lite import Scorer
    from pgenrm_lite.datasets import load_rows, rows_of_split, users_from_rows
    from pgenrm_lite.defaults import example_users_path

    rows = load_rows(example_users_path())
    users = users_from_rows(rows)
    test = rows_of_split(rows, "test")
    first, second = test[0], test[-1]
    user = users[first.user_id]
    out = {}
    with Scorer.from_bundle(bundle, n_samples=2, n_neighbors=1, expected_scores=True, **SMOLLM2_SHORT) as scorer:
        res = scorer.compare(user, first.prompt, first.chosen, first.rejected, seed=11)
        out["compare_ind2_pro1"] = res.model_dump(mode="json", exclude={"timing"})
    with Scorer.from_bundle(bundle, n_samples=1, **SMOLLM2_SHORT) as scorer:
        group = scorer.score_group(users[second.user_id], second.prompt,
                                   [second.chosen, second.rejected, first.chosen], seed=12)
        out["score_group_three_ind1"] = group.model_dump(mode="json", exclude={"timing"})
    return out


def _subset_equal(recorded, current, path="") -> list[str]:
    """Where `current` differs from `recorded`; fields added since recording, and timings at any
    depth, are not compared; NaN equals NaN."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [d for k, v in recorded.items() if k != "timing"
                for d in (_subset_equal(v, current[k], f"{path}.{k}") if k in current else [f"{path}.{k}: missing"])]
    if isinstance(recorded, list) and isinstance(current, list) and len(recorded) == len(current):
        return [d for i, (a, b) in enumerate(zip(recorded, current)) for d in _subset_equal(a, b, f"{path}[{i}]")]
    both_nan = isinstance(recorded, float) and isinstance(current, float) and math.isnan(recorded) and math.isnan(current)
    return [] if recorded == current or both_nan else [f"{path}: recorded {recorded!r}, now {current!r}"]


def test_recorded_results_come_back_byte_for_byte(default_bundle):
    recorded = json.loads(RECORDED.read_text())
    if recorded["build"] != build_fingerprint():
        pytest.skip("the results were recorded with another llama.cpp build or CPU features (sampled text "
                    "depends on the kernels); record them here with `python tests/test_recorded_results.py`")
    diffs = _subset_equal(recorded["results"], current_results(default_bundle))
    assert not diffs, "\n".join(diffs[:20])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pgenrm_lite.defaults import default_bundle_dir

    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else default_bundle_dir()
    RECORDED.write_text(json.dumps({"build": build_fingerprint(), "results": current_results(bundle)},
                                   indent=1, sort_keys=True) + "\n")
    print(f"wrote {RECORDED}")
