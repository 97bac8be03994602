"""Hostile callers: every bad input is a typed error before any model work, one line on stderr,
never a traceback, a hang or an unbounded read. The model is a FakeEngine here (conftest)
except where noted: these tests are about the inputs, not the model."""

from __future__ import annotations

import math
import os
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from conftest import ALICE, faked_engine
from hypothesis import strategies as st

from pgenrm_lite.cli import main
from pgenrm_lite.errors import ConfigError, PgenrmError
from pgenrm_lite.records import UserProfile

REPO = Path(__file__).resolve().parent.parent
CASES = int(os.environ.get("PGENRM_FUZZ_CASES", "1200"))


@pytest.fixture(scope="module")
def bundle(fake_bundle) -> Path:
    """Every refusal here comes before the model loads; were one to come later, llama.cpp would
    fail on this tensorless model with another message, and the test with it."""
    return fake_bundle


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    out = {"user": d / "user.json", "latin1": d / "latin1.txt", "text": d / "ok.txt", "fifo": d / "fifo",
           "rows": d / "rows.jsonl"}
    out["user"].write_bytes(ALICE.to_json())
    out["latin1"].write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    out["text"].write_text("Reverse a string?")
    os.mkfifo(out["fifo"])
    out["rows"].write_text(
        '{"user_id": "u", "split": "train", "context": [{"role": "user", "content": "q"}], '
        '"chosen": {"role": "assistant", "content": "c"}, "rejected": {"role": "assistant", "content": "r"}}\n'
        '{"user_id": "u", "split": "test", "context": [{"role": "user", "content": "q2"}], '
        '"chosen": {"role": "assistant", "content": "c2"}, "rejected": {"role": "assistant", "content": "r2"}}\n')
    return out


def run_cli(*argv: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgenrm_lite.cli", *argv], input=stdin, capture_output=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    err = proc.stderr.decode()
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for f in fragments:
        assert f in err, err
    return err


# -- each cause, through the real CLI in a child process ---------------------------------------

def test_non_utf8_file_names_the_file_and_offset(files, bundle):
    proc = run_cli("compare", "--bundle", str(bundle), "--user", str(files["user"]),
                   "--prompt", f"@{files['latin1']}", "--a", "x", "--b", "y")
    assert_one_line_error(proc, str(files["latin1"]), "not UTF-8", "offset 3")


@pytest.mark.parametrize("arg", ["--user", "--prompt", "data"])
def test_dev_zero_is_refused_after_the_limit_not_read_forever(arg, files, bundle):
    start = time.perf_counter()
    if arg == "data":
        proc = run_cli("eval", "/dev/zero", "--bundle", str(bundle))
        assert_one_line_error(proc, "/dev/zero", "longer than")
    else:
        values = {"--user": str(files["user"]), "--prompt": "p"}
        values[arg] = "/dev/zero" if arg == "--user" else "@/dev/zero"
        proc = run_cli("compare", "--bundle", str(bundle), "--user", values["--user"], "--prompt",
                       values["--prompt"], "--a", "x", "--b", "y")
        assert_one_line_error(proc, "/dev/zero", "larger than the limit")
    assert time.perf_counter() - start < 50


def test_a_fifo_with_no_writer_does_not_block(files, bundle):
    proc = run_cli("compare", "--bundle", str(bundle), "--user", str(files["fifo"]), "--prompt", "p", "--a", "x",
                   "--b", "y", timeout=30)
    assert_one_line_error(proc, "UserProfile")  # read as empty: not valid JSON


def test_second_stdin_argument_is_refused(files, bundle):
    proc = run_cli("compare", "--bundle", str(bundle), "--user", str(files["user"]), "--prompt", "-",
                   "--a", "-", "--b", "y", stdin=b"hello")
    assert_one_line_error(proc, "standard input ('-') can stand for one argument only")


@pytest.mark.parametrize("argv, fragment", [
    (["--seed", str(2 ** 64)], "outside 0..2**64-1"),
    (["--seed", "-1"], "outside 0..2**64-1"),
    (["--seed", "1.5"], "is not an integer"),
])
def test_bad_seeds_are_usage_errors_before_the_model(argv, fragment, files, bundle):
    proc = run_cli("compare", "--bundle", str(bundle), "--user", str(files["user"]), "--prompt", "p",
                   "--a", "x", "--b", "y", *argv)
    assert proc.returncode == 2 and fragment in proc.stderr.decode()


@pytest.mark.parametrize("limit", ["-1", "0", "x"])
def test_eval_limit_below_one_is_a_usage_error(limit, files, bundle):
    proc = run_cli("eval", str(files["rows"]), "--bundle", str(bundle), "--limit", limit)
    assert proc.returncode == 2 and "--limit" in proc.stderr.decode()


def test_bundle_that_is_a_file(files):
    proc = run_cli("info", "--bundle", str(files["text"]))
    assert_one_line_error(proc, "is a file, not a bundle directory")


def test_every_command_takes_the_documented_options():
    from pgenrm_lite.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        flags = {o for a in p._actions for o in a.option_strings}
        assert "--json" in flags, name
        if name in ("demo", "compare", "score", "eval", "serve"):
            assert {"--bundle", "--n-samples", "--n-neighbors", "--seed", "--threads"} <= flags, name
        if name in ("doctor", "info"):
            assert "--bundle" in flags, name


# -- the Python API ------------------------------------------------------------------------

def test_api_refuses_bad_values_before_any_model_work(fake_engine, fake_gguf):
    from pgenrm_lite.scorer import Scorer

    with Scorer.from_gguf(fake_gguf, n_ctx=8192) as scorer:
        engine = scorer.engine
        for bad in ("ab", None, 5, b"ab", {"a": 1}):
            with pytest.raises(ConfigError, match="responses must be a list"):
                scorer.score(ALICE, "p", bad)  # type: ignore[arg-type]
        for seed in (1.5, -1, 2 ** 64, True, "3", None if False else float("nan")):
            with pytest.raises(ConfigError, match="seed must be an integer"):
                scorer.compare(ALICE, "p", "a", "b", seed=seed)  # type: ignore[arg-type]
        assert engine.calls == []  # nothing reached the model
        res = scorer.compare(ALICE, "p", "a", "b", seed=2 ** 64 - 1)
        assert res.seed == 2 ** 64 - 1 and UserProfile  # the largest seed is recorded ...
        assert b'"seed":18446744073709551615' in res.to_json()  # ... and serialises
    for kwargs in ({"seed": 2 ** 64}, {"n_samples": 1.5}, {"n_samples": -1}):
        with pytest.raises(ConfigError):
            Scorer.from_gguf(fake_gguf, **kwargs)


def test_wrong_types_are_described_once():
    from pgenrm_lite.errors import RecordError

    with pytest.raises(RecordError) as info:
        UserProfile.validate_obj({"user_id": "u", "history": [5]})
    assert str(info.value).count("UserProfile") == 1 and "(root)" not in str(info.value)
    with pytest.raises(RecordError, match="expected a JSON object, got an array"):
        UserProfile.from_json(b"[1]")


# -- property-based: the CLI's argv and the API's arguments ------------------------------------

OPTS = ["--json", "--n-samples", "--n-neighbors", "--seed", "--threads", "--max-tokens", "--temperature",
        "--candidate-order", "--limit", "--turns", "--format", "--device", "--expected-scores", "--chat-template"]
WORDS = st.sampled_from(["0", "1", "2", "-1", "1.5", "nan", "1e309", str(2 ** 64), "", "-", "@", "@/nonexistent",
                         "item", "sample", "first", "prb", "hh", "x" * 300, "\u00e9", "\ud7ff", "--", "auto"])
VALUES = st.one_of(WORDS, st.text(string.printable, max_size=12))


@st.composite
def argvs(draw):
    cmd = draw(st.sampled_from(["demo", "compare", "score", "eval", "info", "verify", "doctor", "nope"]))
    argv = [cmd]
    for _ in range(draw(st.integers(0, 6))):
        argv.append(draw(st.sampled_from(OPTS)))
        if draw(st.booleans()):
            argv.append(draw(VALUES))
    return argv


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(argv=argvs())
def test_cli_argv_never_escapes_typed_errors(argv, fake_engine, bundle, files, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"stdin text")))
    full = list(argv)
    if argv[0] in ("demo", "compare", "score", "eval", "info", "doctor"):
        full += ["--bundle", str(bundle)]
    if argv[0] in ("compare", "score"):
        full += ["--user", str(files["user"]), "--prompt", "p"]
        full += ["--a", "x", "--b", "y"] if argv[0] == "compare" else ["--response", "x", "--response", "y"]
    if argv[0] == "eval":
        full.insert(1, str(files["rows"]))
    if argv[0] == "verify":
        full.insert(1, str(bundle))
    if argv[0] == "doctor":
        full.append("--no-decode-check")
    try:
        code = main(full)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        code = exc.code
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (full, code)
    assert "Traceback" not in err
    if code == 1:
        assert len(err.strip().splitlines()) == 1, (full, err)


TEXTS = st.one_of(st.text(max_size=40), st.none(), st.integers(), st.binary(max_size=8), st.lists(st.text(max_size=3)))


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))
@given(prompt=TEXTS, a=TEXTS, b=TEXTS, responses=st.one_of(TEXTS, st.lists(TEXTS, max_size=4)),
       seed=st.one_of(st.integers(-2, 2 ** 65), st.floats(allow_nan=True), st.none(), st.booleans(), st.text(max_size=3)),
       user=st.one_of(st.just(ALICE), st.none(), st.text(max_size=3), st.dictionaries(st.text(max_size=3), st.integers())))
def test_api_arguments_never_escape_typed_errors(scorer_on_fake, prompt, a, b, responses, seed, user):
    for call in (lambda: scorer_on_fake.compare(user, prompt, a, b, seed=seed),
                 lambda: scorer_on_fake.score(user, prompt, responses, seed=seed),
                 lambda: scorer_on_fake.prompt(user, prompt, a, b, seed=seed)):
        try:
            out = call()
        except PgenrmError:
            continue
        if isinstance(out, list) and out and isinstance(out[0], float):
            assert all(isinstance(x, float) and (math.isnan(x) or 0 <= x <= 10) for x in out)


@pytest.fixture(scope="module")
def scorer_on_fake(fake_gguf):
    from pgenrm_lite.scorer import Scorer

    with faked_engine():
        scorer = Scorer.from_gguf(fake_gguf, n_samples=2, n_ctx=1 << 20)
    yield scorer
    scorer.close()
