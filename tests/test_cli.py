"""The CLI through `main([...])`: every command, its `--json` output and its exit codes (0 on
success, 1 on a typed error with one line on stderr, 2 on a usage error). Where the model does
not matter the commands run on the FakeEngine, with a bundle around a tensorless GGUF; the real
default bundle where it does. Then the machine checks (`doctor`): versions, the llama.cpp build,
a one-token decode in a child."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading

import pytest
from conftest import ALICE, BOB, PROMPT, A, B

from pgenrm_lite import CompareResult
from pgenrm_lite.cli import build_parser, main

# The commands tested here; a new command fails test_every_command_is_tested until it has tests.
COMMANDS = {"demo", "compare", "score", "eval", "serve", "info", "forget", "verify", "doctor"}

ROWS = [  # PersonalRewardBench format: alice's history pair, then two test pairs (alice, bob)
    {"user_id": "alice", "split": "train", "context": [{"role": "user", "content": "Sort a list?"}],
     "chosen": {"role": "assistant", "content": "sorted(xs)"}, "rejected": {"role": "assistant", "content": "No."}},
    {"user_id": "alice", "split": "test", "context": [{"role": "user", "content": PROMPT}],
     "chosen": {"role": "assistant", "content": A}, "rejected": {"role": "assistant", "content": B}},
    {"user_id": "bob", "split": "test", "context": [{"role": "user", "content": "Explain a loop."}],
     "chosen": {"role": "assistant", "content": "It repeats."}, "rejected": {"role": "assistant", "content": "?"}},
]


@pytest.fixture
def files(tmp_path):
    user = tmp_path / "alice.json"
    user.write_bytes(ALICE.to_json())
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    profiles = tmp_path / "profiles.jsonl"
    profiles.write_bytes(ALICE.to_json() + b"\n" + BOB.to_json() + b"\n")
    return {"user": str(user), "rows": str(rows), "profiles": str(profiles)}


def run(argv, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); usage errors (argparse's SystemExit) as their code."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def typed_error(argv, capsys, *fragments: str) -> str:
    """The command exits 1 with one line on stderr naming each fragment."""
    code, _, err = run(argv, capsys)
    assert code == 1, (argv, code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("pgenrm-lite: error: "), err
    for f in fragments:
        assert f in err, err
    return err


def test_every_command_is_tested():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == COMMANDS
    for name, p in sub.choices.items():  # every command has machine-readable output
        assert "--json" in {o for a in p._actions for o in a.option_strings}, name


def test_usage_errors_exit_2(capsys):
    assert run(["nope"], capsys)[0] == 2
    assert run(["compare", "--prompt", "p"], capsys)[0] == 2  # --user, --a, --b missing
    code, _, err = run(["score", "--user", "u.json", "--prompt", "p", "--response", "x", "--seed", "-1"], capsys)
    assert code == 2 and "--seed" in err


# -- scoring commands, on the FakeEngine ----------------------------------------------------

def test_compare_json_and_text(fake_engine, fake_bundle, files, capsys):
    argv = ["compare", "--bundle", str(fake_bundle), "--user", files["user"], "--prompt", PROMPT, "--a", A, "--b", B]
    code, out, _ = run([*argv, "--json", "--n-samples", "3", "--seed", "9"], capsys)
    assert code == 0
    res = CompareResult.model_validate_json(out)
    assert (res.seed, res.n_samples, res.n_parsed) == (9, 3, 3) and res.preferred in ("a", "b", None)
    assert res.history_shown == 3  # from the user file: three of alice's four pairs
    code, out, _ = run([*argv, "--seed", "9", "--n-samples", "3"], capsys)
    assert code == 0
    assert out.startswith(f"preferred: {res.preferred or 'none'}  score_a: {res.score_a:.3f}") and "seed: 9" in out


def test_options_reach_the_scorer(fake_engine, fake_bundle, files, capsys):
    argv = ["compare", "--bundle", str(fake_bundle), "--user", files["user"], "--prompt", "p", "--a", "x", "--b", "y",
            "--json", "--max-tokens", "1500", "--temperature", "0.5", "--candidate-order", "item", "--threads", "3"]
    assert run(argv, capsys)[0] == 0
    engine = fake_engine.last
    _, params = engine.calls[-1]
    assert (params.max_tokens, params.temperature, engine.n_threads) == (1500, 0.5, 3)


def test_score_json_and_text(fake_engine, fake_bundle, files, capsys):
    argv = ["score", "--bundle", str(fake_bundle), "--user", files["user"], "--prompt", PROMPT,
            "--response", A, "--response", B, "--response", "No idea.", "--seed", "4"]
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    got = json.loads(out)
    assert (got["method"], got["seed"], got["n_samples"], got["n_neighbors"]) == ("mean", 4, 1, 0)
    assert got["n_pairs"] == 3 and got["n_pairs_parsed"] == 3  # every pair of three responses
    assert len(got["scores"]) == len(got["stderr"]) == 3 and all(0 <= x <= 10 for x in got["scores"])
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert [line.split("\t")[:2] for line in out.splitlines()] == [[str(i), f"{x:.3f}"]
                                                                  for i, x in enumerate(got["scores"])]
    code, out, _ = run([*argv, "--json", "--group-reward", "bradley_terry"], capsys)
    assert code == 0 and json.loads(out)["method"] == "bradley_terry"


def test_eval_json_and_text(fake_engine, fake_bundle, files, capsys):
    argv = ["eval", files["rows"], "--bundle", str(fake_bundle), "--seed", "2"]
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    config, overall = report["config"], report["overall"]
    assert (config["pairs"], config["seed"], config["n_samples"], config["format"]) == (2, 2, 1, "prb")
    assert config["model"] == "fake" and config["max_tokens"] and config["contract"]
    assert overall["pairs"] == 2 and overall["correct"] + overall["wrong"] + overall["ties"] + overall["no_parse"] == 2
    assert set(report["per_user"]) == {"alice", "bob"}
    code, out, _ = run([*argv, "--limit", "1"], capsys)
    assert code == 0 and out.startswith(" " * 9 + "overall: ") and "alice" in out and "bob" not in out
    # --format rewardbench: tests/test_integrations_rewardbench.py


def test_demo_json_and_text(fake_engine, fake_bundle, capsys):
    code, out, _ = run(["demo", "--bundle", str(fake_bundle), "--json", "--seed", "5"], capsys)
    assert code == 0
    got = json.loads(out)
    assert got["user_chose"] == "a" and got["result"]["seed"] == 5 and got["result"]["n_parsed"] == 1
    code, out, _ = run(["demo", "--bundle", str(fake_bundle)], capsys)
    assert code == 0 and "Decision:" in out and "Weighted criteria" in out


def test_serve_answers_over_http_until_stopped(fake_engine, fake_bundle, files, monkeypatch, capsys):
    uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    requests = pytest.importorskip("requests")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answers = {}

    def run_briefly(app, host, port, **kw):  # uvicorn.run, stopped after two requests
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

        def client():
            try:
                while not server.started:
                    threading.Event().wait(0.05)
                base = f"http://{host}:{port}"
                answers["health"] = requests.get(f"{base}/health", timeout=30).json()
                body = {"query": ["Q? A short answer.", "Q? A long answer."], "prompts": ["Q?", "Q?"],
                        "labels": ["alice", "alice"]}
                answers["reward"] = requests.post(f"{base}/get_reward", json=body, timeout=30).json()
            finally:
                server.should_exit = True

        threading.Thread(target=client, daemon=True).start()
        server.run()

    monkeypatch.setattr(uvicorn, "run", run_briefly)
    monkeypatch.delenv("PGENRM_LITE_TOKEN", raising=False)
    code, _, err = run(["serve", "--bundle", str(fake_bundle), "--profiles", files["profiles"], "--port", str(port),
                        "--seed", "3"], capsys)
    assert code == 0, err
    assert "serving 2 user profile(s)" in err
    health = answers["health"]
    assert (health["users"], health["seed"], health["model"]) == (2, 3, "fake")
    assert len(answers["reward"]["rewards"]) == 2


def test_serve_refusals_come_before_the_model(fake_engine, fake_bundle, tmp_path, monkeypatch, capsys):
    pytest.importorskip("uvicorn", reason="the serve extra is not installed")
    monkeypatch.delenv("PGENRM_LITE_TOKEN", raising=False)
    typed_error(["serve", "--bundle", str(fake_bundle), "--host", "0.0.0.0"], capsys, "refusing to serve on 0.0.0.0")
    empty = tmp_path / "token"
    empty.write_text("\n")
    typed_error(["serve", "--bundle", str(fake_bundle), "--token-file", str(empty)], capsys, "is empty")
    assert fake_engine.last is None  # no model was loaded


# -- bundle commands --------------------------------------------------------------------------

def test_info_json_and_text(fake_bundle, capsys):
    code, out, _ = run(["info", "--bundle", str(fake_bundle), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["path"] == str(fake_bundle) and info["llm"]["architecture"] == "llama"
    assert info["embedder"] is None and info["prototypes"] is None
    assert {f["path"] for f in info["files"]} >= {"model.gguf"}
    code, out, _ = run(["info", "--bundle", str(fake_bundle)], capsys)
    assert code == 0 and out.startswith(f"bundle {fake_bundle} ") and "model.gguf" in out


def test_verify_json_and_a_changed_file(fake_bundle, tmp_path, capsys):
    code, out, _ = run(["verify", str(fake_bundle), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {"path": str(fake_bundle), "ok": True, "files_checked": len(json.loads(
        (fake_bundle / "manifest.json").read_text())["files"])}
    copy = shutil.copytree(fake_bundle, tmp_path / "copy")
    model = copy / "model.gguf"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1  # same size, other bytes: only the full check sees it
    model.write_bytes(bytes(data))
    assert run(["info", "--bundle", str(copy), "--json"], capsys)[0] == 0
    typed_error(["verify", str(copy)], capsys, "model.gguf", "sha256")


def test_forget_json_on_a_bundle_without_prototypes(fake_bundle, tmp_path, capsys):
    copy = shutil.copytree(fake_bundle, tmp_path / "copy")
    code, out, _ = run(["forget", "alice", "--bundle", str(copy), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {"user_id": "alice", "bundle": str(copy), "members_removed": 0}
    code, out, _ = run(["forget", "alice", "--bundle", str(copy)], capsys)
    assert code == 0 and "nothing to remove" in out


# -- typed errors -----------------------------------------------------------------------------

def test_a_bad_bundle_path_is_a_typed_error_for_every_command_that_takes_one(fake_engine, files, tmp_path, capsys):
    absent = str(tmp_path / "absent")
    user = ["--user", files["user"], "--prompt", "p"]
    for argv in (["demo"], ["compare", *user, "--a", "x", "--b", "y"], ["score", *user, "--response", "x",
                 "--response", "y"], ["eval", files["rows"]], ["serve"], ["info"]):
        typed_error([*argv, "--bundle", absent], capsys, absent)
    typed_error(["forget", "alice", "--bundle", absent], capsys, absent)
    typed_error(["verify", absent], capsys, absent)
    assert fake_engine.last is None


def test_no_default_bundle_says_how_to_build_one(fake_engine, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PGENRM_LITE_BUNDLE", str(tmp_path / "none"))
    typed_error(["compare", "--user", files["user"], "--prompt", "p", "--a", "x", "--b", "y"], capsys,
                "no default bundle", "python -m export default-bundle")


def test_bad_records_and_data_are_typed_errors(fake_engine, fake_bundle, tmp_path, capsys):
    bundle = ["--bundle", str(fake_bundle)]
    bad_user = tmp_path / "user.json"
    bad_user.write_text('{"user_id": "u", "history": [{"prompt": "p"}]}')
    typed_error(["compare", *bundle, "--user", str(bad_user), "--prompt", "p", "--a", "x", "--b", "y"], capsys,
                "UserProfile", "chosen")
    typed_error(["score", *bundle, "--user", str(tmp_path / "absent.json"), "--prompt", "p", "--response", "x",
                 "--response", "y"], capsys, "absent.json")
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text('{"user_id": "u", "split": "test"}\nnot json\n')
    typed_error(["eval", str(bad_rows), *bundle], capsys, str(bad_rows))
    no_tests = tmp_path / "train.jsonl"
    no_tests.write_text(json.dumps(ROWS[0]) + "\n")
    typed_error(["eval", str(no_tests), *bundle], capsys, "no test rows")
    assert fake_engine.last is None  # every refusal so far came before the model
    good_user = tmp_path / "alice.json"
    good_user.write_bytes(ALICE.to_json())
    typed_error(["score", *bundle, "--user", str(good_user), "--prompt", "p", "--response", "x"], capsys,
                "2 to 16 responses")


def usage_error(argv, capsys, *fragments: str) -> str:
    """A flag's own bad value: argparse's exit 2, the message naming the flag and the bound."""
    code, _, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err, (argv, code, err)
    for f in fragments:
        assert f in err, err
    return err


def test_a_scorer_option_out_of_range_is_refused(fake_engine, fake_bundle, files, capsys):
    argv = ["compare", "--bundle", str(fake_bundle), "--user", files["user"], "--prompt", "p", "--a", "x", "--b", "y"]
    usage_error([*argv, "--min-confidence", "2"], capsys, "--min-confidence", "min_confidence")
    usage_error([*argv, "--n-samples", str(2 ** 64)], capsys, "--n-samples", "at most 1024")  # no endless job list
    # What only the options together, or the bundle, can tell: a typed error after parsing.
    typed_error([*argv, "--n-samples", "0"], capsys, "n_samples")
    typed_error([*argv, "--n-neighbors", "1"], capsys, "prototype index")
    typed_error([*argv, "--max-tokens", "50"], capsys, "too small for the output grammar")


# -- the real default bundle ------------------------------------------------------------------

def test_compare_and_info_on_the_real_default_bundle(default_bundle, files, capsys):
    code, out, _ = run(["info", "--bundle", str(default_bundle), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["embedder"] and info["prototypes"] and info["prototypes"]["count"] > 0
    code, out, _ = run(["compare", "--bundle", str(default_bundle), "--user", files["user"], "--prompt", PROMPT,
                        "--a", A, "--b", B, "--n-neighbors", "1", "--threads", "2", "--json"], capsys)
    assert code == 0
    res = CompareResult.model_validate_json(out)
    assert (res.n_samples, res.n_neighbors, res.seed) == (1, 1, 0)
    assert [s.kind for s in res.samples] == ["self", "neighbor"] and res.neighbors
    assert res.n_parsed == 2, [s.error for s in res.samples]  # SmolLM2 under the grammar writes the contract
    assert 0 <= res.score_a <= 10 and 0 <= res.score_b <= 10


# -- doctor -----------------------------------------------------------------------------------


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
