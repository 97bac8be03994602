"""`python -m export quantize` and `check-quant` on real GGUF files: SmolLM2 as its package ships it (Q4_1)
against a Q8_0 re-quantised here, judged on real HH pairs with the default bundle's settings."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from export.__main__ import main as export_main  # noqa: E402
from export.check_quant import FAILED, compare_verdicts  # noqa: E402


@pytest.fixture(scope="module")
def q8(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quant") / "model-q8_0.gguf"
    assert export_main(["quantize", "--input", str(smollm2_gguf), "--output", str(out),
                        "--type", "q8_0", "--threads", "2"]) == 0
    return out


def test_check_quant_reports_verdicts_drift_and_kl(default_bundle, smollm2_gguf, q8, hh_file, tmp_path, capsys):
    ref = smollm2_gguf  # the shipped Q4_1 file, judged with the default bundle's settings
    out = tmp_path / "report.json"
    rc = export_main(["check-quant", "--reference", str(ref), "--candidate", str(q8), "--data", str(hh_file),
                      "--format", "hh", "--bundle", str(default_bundle), "--limit", "2", "--kl-prompts", "1",
                      "--temperature", "0", "--threads", "2", "--min-agreement", "0", "--max-score-drift", "10",
                      "--out", str(out)])
    printed = capsys.readouterr().out
    report = orjson.loads(out.read_bytes())
    assert rc == 0 and report["passed"] and printed.rstrip().endswith("PASS")
    assert report["pairs"] == 2 and report["seed"] == 0 and report["temperature"] == 0
    (entry,) = report["candidates"]
    c = entry["vs_reference"]
    assert c["pairs"] == 2 and 0 <= c["agreement"] <= 1 and c["decision_changes"] in (0, 1, 2)
    kl = entry["next_token"]
    # Q8_0 from Q4_1 moves the distributions a little, never nothing, never much.
    assert kl["prompts"] == 1 and kl["tokens"] > 500 and 0 < kl["mean_kl"] < 0.05 and kl["top1_agreement"] > 0.8
    assert set(entry["checks"]) == {"agreement", "score_drift_mean", "mean_kl"}
    assert "verdict agreement" in printed and "mean KL" in printed
    # The default bundle ships the Q8_0 re-quantisation (export/default_bundle.py GGUF_TYPE), not the Q4_1 file.
    assert (default_bundle / "model.gguf").stat().st_size == q8.stat().st_size


def test_a_failed_threshold_exits_3_and_identical_files_agree_exactly(default_bundle, hh_file, tmp_path, capsys):
    ref = default_bundle / "model.gguf"
    same = tmp_path / "copy.gguf"
    shutil.copy(ref, same)
    rc = export_main(["check-quant", "--reference", str(ref), "--candidate", str(same), "--data", str(hh_file),
                      "--format", "hh", "--bundle", str(default_bundle), "--limit", "1", "--kl-prompts", "1",
                      "--threads", "2", "--max-score-drift", "-1", "--json"])
    report = orjson.loads(capsys.readouterr().out)
    (entry,) = report["candidates"]
    assert rc == FAILED and not report["passed"] and not entry["checks"]["score_drift_mean"]["passed"]
    # The same file, seeds and settings: the same verdict, no drift, the same distributions.
    c = entry["vs_reference"]
    assert c["agreement"] == 1.0 and c["score_drift_mean"] in (0.0, None)
    assert entry["next_token"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert entry["next_token"]["top1_agreement"] == 1.0


def test_verdict_comparison_arithmetic():
    ref = [{"preferred": "a", "score_a": 8.0, "score_b": 6.0}, {"preferred": None, "score_a": 5.0, "score_b": 5.0},
           {"preferred": "b", "score_a": 4.0, "score_b": 7.0}, {"preferred": None, "score_a": None, "score_b": None}]
    cand = [{"preferred": "a", "score_a": 7.0, "score_b": 6.0}, {"preferred": "a", "score_a": 6.0, "score_b": 5.0},
            {"preferred": "a", "score_a": 7.0, "score_b": 4.0}, {"preferred": None, "score_a": None, "score_b": None}]
    c = compare_verdicts(ref, cand)
    assert c["agreement"] == 0.5  # pairs 0 and 3 (no decision both times counts as the same verdict)
    assert c["agreement_decided"] == 0.5 and c["n_both_decided"] == 2
    assert c["decision_changes"] == 1 and c["n_both_parsed"] == 3
    assert c["score_drift_mean"] == pytest.approx((1 + 1 + 6) / 3) and c["score_drift_max"] == 6.0


def test_bad_inputs_are_typed_errors(default_bundle, tmp_path, capsys):
    ref = default_bundle / "model.gguf"
    assert export_main(["check-quant", "--reference", str(ref), "--candidate", str(tmp_path / "none.gguf"),
                        "--data", str(ref)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert export_main(["quantize", "--input", str(ref), "--output", str(ref), "--type", "q8_0"]) == 1
    assert "must differ" in capsys.readouterr().err
    from pgenrm_lite.engine import Engine
    from pgenrm_lite.errors import ConfigError, ContextOverflowError

    with Engine(ref, n_ctx=64, n_seq_max=1, n_threads=1) as engine:
        with pytest.raises(ConfigError, match="no tokens"):
            next(engine.prompt_logprobs([]))
        with pytest.raises(ContextOverflowError, match="do not fit"):
            next(engine.prompt_logprobs([1] * (engine.n_ctx_seq + 1)))
        with pytest.raises(ConfigError, match="token ids"):
            next(engine.prompt_logprobs([engine.n_vocab]))
        rows = [r for r in engine.prompt_logprobs(engine.tokenize("Hello there, how are you?"))]
        assert len(rows) == 1 and abs(float(np.exp(rows[0]).sum(axis=1).max()) - 1.0) < 1e-3
