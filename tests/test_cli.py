"""The CLI's machine checks (`doctor`)."""

from __future__ import annotations

import json

from pgenrm_lite.cli import main


def test_doctor_reports_versions_and_the_openmp_hint(monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["llama-cpp-python"] and info["packages"]["onnxruntime"]
    openmp = "OPENMP = 1" in info["llama_cpp_system_info"]
    assert any("OMP_WAIT_POLICY=PASSIVE" in h for h in info["hints"]) == openmp
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert main(["doctor", "--json"]) == 0
    assert not any("OMP_WAIT_POLICY" in h for h in json.loads(capsys.readouterr().out)["hints"])
    assert main(["doctor"]) == 0
    assert "hints: none" in capsys.readouterr().out
