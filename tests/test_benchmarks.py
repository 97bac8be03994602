"""Each benchmark script runs end to end on a tiny model (`--quick`) and writes its JSON and plot.

Structure and sanity only (token counts, ratios, counts); never a timing value: the
machine is shared and timings are the scripts' business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"
# Tiny-vocabulary model: about one character per token, so a generous max_tokens; one thread.
TINY_SCORER = ["--max-tokens", "400", "--analysis-chars", "10,120", "--max-criteria", "2",
               "--history-pairs", "1", "--threads", "1"]
QUICK = {"Ind-1": (1, 0), "Ind-2": (2, 0), "Ind-2/Pro-1": (2, 1)}


@pytest.fixture(scope="module")
def tiny_bundle(tiny_gguf, minilm_dir, tmp_path_factory) -> Path:
    """The tiny GGUF with the real exported MiniLM and a prototype index of the example users."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from export.bundle_build import build_bundle
    from export.onnx_embedder import export_embedder
    from export.prototypes_build import build_prototypes
    from pgenrm_lite.datasets import load_rows, users_from_rows
    from pgenrm_lite.defaults import example_users_path

    work = tmp_path_factory.mktemp("bench_bundle")
    export_embedder(minilm_dir, work / "embedder")
    root = build_bundle(tiny_gguf, work / "bundle", embedder_dir=work / "embedder")
    build_prototypes(root, users_from_rows(load_rows(example_users_path())), k=2, persona_source="history")
    return root


def run_script(script: str, args: list[str], out_dir: Path) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--out-dir", str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    name = script.removesuffix(".py")
    png = out_dir / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out_dir / f"{name}.json").read_text())


def test_scaling_runs_both_engines_on_every_quick_configuration(tiny_gguf, hh_file, tmp_path):
    data = run_script("scaling.py", ["--tiny", str(tiny_gguf), "--data", str(hh_file)], tmp_path)
    assert data["benchmark"] == "scaling" and data["settings"]["quick"] is True
    rows = {(r["config"], r["engine"]): r for r in data["results"]}
    assert set(rows) == {(c, e) for c in QUICK for e in ("batched", "loop")}
    for (config, engine), r in rows.items():
        m, n = QUICK[config]
        assert r["samples"] == (m + n) * data["settings"]["pairs"]
        assert r["tokens"] > 0 and r["tok_s"] > 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 0
        assert 0 < r["parsed"] <= r["samples"]
        assert r["prompt_s"] >= 0 and r["decode_s"] > 0
        assert r["ratio_to_ind1"] > 0
        if engine == "batched":
            assert r["speedup_vs_loop"] > 0 and r["n_groups"] >= 1
    assert rows[("Ind-1", "batched")]["ratio_to_ind1"] == pytest.approx(1.0)
    assert data["compute_bound"]["tok_s"] == max(r["tok_s"] for r in rows.values())
    # The targets name Ind-8 and Ind-16/Pro-8, which a quick run does not measure.
    assert [t["met"] for t in data["targets"]] == [None, None, None]
    anatomy = data["settings"]["step_anatomy"]
    assert [a["sequences"] for a in anatomy] == [1, 2]
    assert all(a["prompt_ms"] > 0 and a["short_ms"] > 0 for a in anatomy)


def test_readout_compares_both_read_outs_on_the_same_chains(tiny_bundle, hh_file, tmp_path):
    data = run_script("readout.py", [str(hh_file), "--bundle", str(tiny_bundle), "--quick", *TINY_SCORER], tmp_path)
    assert data["settings"]["chains"] == 4 and len(data["pairs"]) == 2
    assert all(len(p["chains"]) == 4 for p in data["pairs"])
    assert [r["n_chains"] for r in data["rows"]] == [1, 2]
    for r in data["rows"]:
        for key in ("agreement_sampled", "agreement_expected", "accuracy_sampled", "accuracy_expected"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0


def test_latency_reports_cold_start_percentiles_and_lookup(tiny_bundle, hh_file, tmp_path):
    data = run_script("latency.py", ["--bundle", str(tiny_bundle), "--data", str(hh_file), "--quick", *TINY_SCORER],
                      tmp_path)
    assert data["benchmark"] == "latency"
    rows = {r["config"]: r for r in data["compare"]}
    assert set(rows) == set(QUICK)
    for config, r in rows.items():
        m, n = QUICK[config]
        assert r["calls"] >= 1 and r["samples_parsed"] + r["samples_failed"] == (m + n) * r["calls"]
        assert r["cold_start_s"] > 0 and r["p50_s"] > 0 and r["p95_s"] >= r["p50_s"]
        assert r["mean_generated_tokens"] > 0 and r["peak_rss_mb"] > 0
        assert r["neighbors_used"] == n
    lookup = data["lookup"]
    assert lookup["members"] == 8 and lookup["prototypes"] == 2 and lookup["queries"] > 0
    assert lookup["embed_ms"]["p50"] > 0 and set(lookup["lookup_ms"]) == {"4", "8"}


def test_accuracy_compares_the_judges_per_user_with_intervals(tiny_bundle, hh_file, tmp_path):
    data = run_script("accuracy.py", [str(hh_file), "--bundle", str(tiny_bundle), "--quick", *TINY_SCORER],
                      tmp_path)
    assert data["benchmark"] == "accuracy"
    assert data["settings"]["pairs"] == 2 and set(data["settings"]["pairs_per_user"]) == {"helpful", "harmless"}
    protos = data["settings"]["prototypes"]
    assert protos["source"] == "hh" and protos["members"] == 16
    judges = {j["judge"]: j for j in data["judges"]}
    assert list(judges) == ["no history", "Ind-1", "Ind-2", "Ind-2/Pro-1"]
    assert judges["no history"]["personalised"] is False and judges["no history"]["history_pairs"] == 0
    for j in judges.values():
        assert j["overall"]["pairs"] == 2 and set(j["per_user"]) == {"helpful", "harmless"}
        for summary in [j["overall"], *j["per_user"].values()]:
            assert summary["correct"] + summary["wrong"] + summary["ties"] + summary["no_parse"] == summary["pairs"]
            assert summary["accuracy_rewardbench"] is not None and 0 <= summary["accuracy_rewardbench"] <= 1
            lo, hi = summary["accuracy_rewardbench_ci95"]
            assert 0 <= lo <= summary["accuracy_rewardbench"] <= hi <= 1
        assert j["overall"]["samples_total"] == 2 * (j["n_samples"] + j["n_neighbors"])


def test_quant_types_requantises_and_compares_on_the_tiny_model(tiny_gguf, hh_file, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "quant_types.py"), "--gguf", str(tiny_gguf), "--data",
                           str(hh_file), "--types", "q8_0,q4_0", "--prompts", "1", "--prompt-tokens", "64",
                           "--steps", "4", "--threads", "1", "--out-dir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "quant_types.json").read_text())
    rows = {r["type"]: r for r in data["results"]}
    assert set(rows) == {"q8_0", "q4_0"}
    for r in rows.values():
        assert r["prompt_tok_s"] > 0 and all(ms > 0 for ms in r["step_ms"].values())
        assert 0 <= r["mean_kl"] and 0 <= r["top1_agreement"] <= 1
    # An f32 model loses less to 8 bits than to 4.
    assert rows["q8_0"]["mean_kl"] < rows["q4_0"]["mean_kl"]
