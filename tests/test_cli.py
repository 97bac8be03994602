"""The CLI's machine checks (`doctor`): versions, the llama.cpp build, a one-token decode in a child."""

from __future__ import annotations

import json
import os

from pgenrm_lite.cli import main


def test_doctor_reports_versions_and_the_openmp_hint(monkeypatch, capsys):
    import pgenrm_lite.engine  # noqa: F401  (importing the engine sets the default wait policy)

    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["llama-cpp-python"] and info["packages"]["onnxruntime"]
    openmp = "OPENMP = 1" in info["llama_cpp_system_info"]
    assert any("OMP_WAIT_POLICY=ACTIVE" in h for h in info["hints"]) == openmp
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert main(["doctor", "--json"]) == 0
    assert not any("OMP_WAIT_POLICY" in h for h in json.loads(capsys.readouterr().out)["hints"])
    assert main(["doctor"]) == 0
    assert "hints: none" in capsys.readouterr().out


def test_the_runtime_makes_openmp_threads_wait_passively_unless_told_otherwise():
    import subprocess
    import sys

    code = "import os, pgenrm_lite.engine; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "ACTIVE"


def test_doctor_reports_the_build_and_a_child_decode(tiny_gguf, tmp_path, capsys):
    from export.bundle_build import build_bundle

    bundle = build_bundle(tiny_gguf, tmp_path / "b")
    assert main(["doctor", "--json", "--bundle", str(bundle), "--threads", "1"]) == 0
    info = json.loads(capsys.readouterr().out)
    build = info["llama_cpp_build"]
    assert build["features"] and all(isinstance(v, bool) for v in build["features"].values())
    assert build["features"].get("AVX2") is ("AVX2 = 1" in info["llama_cpp_system_info"])
    # scripts/setup.sh keeps AMX kernels out unless asked: a CPU that advertises AMX gets none
    assert not build["amx_kernels_built"] or "--amx" in (build["setup_flags"] or "")
    check = info["decode_check"]
    assert check["ok"] is True and check["returncode"] == 0 and check["message"] == "a one-token decode ran"
    assert main(["doctor", "--bundle", str(tmp_path / "absent"), "--no-decode-check"]) == 0
    assert "decode_check: not run" in capsys.readouterr().out


def test_a_child_killed_by_sigill_is_reported_in_one_line_with_the_fix():
    import sys

    from pgenrm_lite import diagnostics

    report = diagnostics.run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert report["ok"] is False and report["signal"] == "SIGILL" and report["returncode"] < 0
    assert "setup.sh" in report["message"] and "\n" not in report["message"]
    failed = diagnostics.run_child([sys.executable, "-c", "import sys; sys.exit('no model here')"])
    assert failed["ok"] is False and "no model here" in failed["message"]


def test_doctor_exits_non_zero_when_the_decode_check_crashes(tiny_gguf, tmp_path, monkeypatch, capsys):
    import sys

    from export.bundle_build import build_bundle
    from pgenrm_lite import diagnostics

    bundle = build_bundle(tiny_gguf, tmp_path / "b")
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    monkeypatch.setattr(diagnostics, "decode_check", lambda model, **kw: diagnostics.run_child(crash))
    assert main(["doctor", "--bundle", str(bundle)]) == 1
    out = capsys.readouterr().out
    assert "decode_check: FAILED: a one-token decode killed the process with SIGILL" in out


def test_build_backends_are_read_from_ggml_system_info():
    from pgenrm_lite import diagnostics

    info = ("CUDA : ARCHS = 890 | NO_VMM = 1 | USE_GRAPHS = 1 | FA_QUANTS = q4_0-q4_0,f16-f16 | "
            "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 0 | OPENMP = 1 | ")
    assert diagnostics.backends(info) == {
        "CUDA": {"ARCHS": "890", "NO_VMM": "1", "USE_GRAPHS": "1", "FA_QUANTS": "q4_0-q4_0,f16-f16"},
        "CPU": {"SSE3": "1", "AVX2": "1", "AMX_INT8": "0", "OPENMP": "1"}}
    features = diagnostics.build_features(info)
    assert features["AVX2"] is True and features["AMX_INT8"] is False and "ARCHS" not in features
