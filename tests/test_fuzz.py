"""Property tests: parsers, records, templates and loaders fed arbitrary and near-valid input.

The one property everywhere: every failure is a `PgenrmError` subclass (typed, with a
message), never another exception. Near-valid inputs (a valid structure with one field
deleted, replaced by junk or joined by an extra field) are what finds the gaps; arbitrary
inputs check the outer layers. Valid inputs must round-trip.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pgenrm_lite import protocol
from pgenrm_lite.options import ScorerOptions
from pgenrm_lite.bundle import MANIFEST, read_manifest
from pgenrm_lite.datasets import load_rows, parse_row, users_from_rows
from pgenrm_lite.errors import (BundleError, ChainParseError, ConfigError, DataFormatError, PgenrmError,
                                RecordError)
from pgenrm_lite.protocol import JSON_END, JSON_START, Template
from pgenrm_lite.records import (MAX_HISTORY_PAIRS, MAX_TEXT_CHARS, CompareResult, Manifest, Preference,
                                 UserProfile)

# PGENRM_FUZZ_SCALE=20 runs a longer search (the default keeps the file under ~30 s).
_SCALE = float(os.environ.get("PGENRM_FUZZ_SCALE", "1"))
FAST = settings(max_examples=int(150 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=int(60 * _SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def typed(fn, *args, **kwargs):
    """Call `fn`; a typed error is an allowed outcome (returned), anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except PgenrmError as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return exc


# -- junk ---------------------------------------------------------------------------------

TRICKY_TEXT = st.sampled_from([
    "", " ", "\x00", "\ud800", "a\udfffb", "\u202eevil", "💥" * 3, "\n" * 5, "é" * 10, "{{history}}",
    "{{ 7*7 }}", "{% for x in y %}", JSON_START, JSON_END, "[The End of Response 1]", "<|im_end|>",
    '{"better_response": {"response_1": 10, "response_2": 0}}', "1e999", "NaN", "-inf", "0x10", "7/10",
    "../../etc/passwd", "/abs", "a\\b", "x" * (MAX_TEXT_CHARS + 1),
])
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=2 ** 63, max_value=2 ** 80), st.integers(max_value=-2 ** 63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0, 10 ** 30, 10 ** 400, -10 ** 400, True, False]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20), TRICKY_TEXT)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)

def _deep(n: int) -> list:
    out: list = []
    for _ in range(n):
        out = [out]
    return out


# Nesting near orjson's depth limit (1024): repr()/str() of it overflow Python's recursion limit.
DEEP = _deep(1000)
DEEP_JSON = "[" * 1020 + "]" * 1020
# Python-only junk: what a host app might pass where the library expects JSON-shaped data.
PY_JUNK = st.one_of(JUNK, st.binary(max_size=20), st.tuples(SCALARS, SCALARS), st.sets(st.integers(), max_size=3),
                    st.just(object()), st.just(Path("x")), st.just(b"\xff\xfe"), st.just(DEEP),
                    st.just({"content": DEEP, "role": DEEP}), st.just(10 ** 5000))


def _paths(obj: Any, prefix: tuple = ()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base: Any, junk=JUNK) -> Any:
    """`base` with one change at one place: replaced by junk, deleted, or an extra field added."""
    obj = copy.deepcopy(base)
    path = draw(st.sampled_from(list(_paths(obj))))
    op = draw(st.sampled_from(["replace", "replace", "delete", "extra"]))
    if not path:
        return draw(junk) if op == "replace" else obj
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = draw(junk)
    elif op == "delete":
        del parent[last]
    else:
        target = parent[last]
        if isinstance(target, dict):
            target[draw(st.text(max_size=10))] = draw(junk)
        elif isinstance(target, list):
            target.append(draw(junk))
        else:
            parent[last] = [target, draw(junk)]
    return obj


def dumps(obj: Any) -> str:
    """JSON text as a careless writer makes it: NaN/Infinity literals, huge integers and
    lone surrogates (as \\u escapes) allowed."""
    return json.dumps(obj)


# -- parse_chain ----------------------------------------------------------------------------

VALID_OBJECT = {
    "rationale": {
        "criteria": [
            {"name": "Conciseness", "weight": 60, "response_1": 8, "response_2": 3},
            {"name": "Accuracy", "weight": 40, "response_1": "7", "response_2": "6/10"},
        ],
    },
    "better_response": {"response_1": 7.6, "response_2": "4.2"},
}
MARKER_EDITS = st.sampled_from(["none", "drop_start", "drop_end", "extra_start", "extra_end", "swap",
                                "fence", "lowercase", "double_block", "start_inside", "nothing_after"])


def _chain_text(analysis: str, body: str, edit: str) -> str:
    if edit == "drop_start":
        return f"{analysis}\n{body}\n{JSON_END}"
    if edit == "drop_end":
        return f"{analysis}\n{JSON_START}\n{body}"
    if edit == "extra_start":
        return f"{analysis}\n{JSON_START}\n{JSON_START}\n{body}\n{JSON_END}"
    if edit == "extra_end":
        return f"{analysis}\n{JSON_START}\n{body}\n{JSON_END}\n{JSON_END}"
    if edit == "swap":
        return f"{analysis}\n{JSON_END}\n{body}\n{JSON_START}"
    if edit == "fence":
        return f"{analysis}\n{JSON_START}\n```json\n{body}\n```\n{JSON_END}"
    if edit == "lowercase":
        return f"{analysis}\n<json_start>\n{body}\n<json_end>"
    if edit == "double_block":
        return f"{analysis}\n{JSON_START}\n{body}\n{JSON_END}\n{JSON_START}\n{body}\n{JSON_END}"
    if edit == "start_inside":
        return f"{analysis}\n{JSON_START}\n{body[: len(body) // 2]}{JSON_START}{body[len(body) // 2:]}\n{JSON_END}"
    if edit == "nothing_after":
        return f"{analysis}\n{JSON_START}"
    return f"{analysis}\n{JSON_START}\n{body}\n{JSON_END}"


def _check_chain(text: str) -> None:
    out = typed(protocol.parse_chain, text)
    if isinstance(out, PgenrmError):
        assert isinstance(out, ChainParseError) and out.raw == text
    else:
        assert out.raw == text
        assert all(math.isfinite(x) for x in out.final_scores)
        for c in out.criteria:
            assert math.isfinite(c.weight) and all(s is None or math.isfinite(s) for s in c.scores)


@FAST
@given(st.text(max_size=300))
def test_parse_chain_arbitrary_text(text):
    _check_chain(text)


@FAST
@given(st.text(max_size=60), st.text(max_size=200))
def test_parse_chain_arbitrary_block_body(analysis, body):
    _check_chain(f"{analysis}{JSON_START}{body}{JSON_END}")


@FAST
@given(st.text(max_size=80), mutated(VALID_OBJECT), MARKER_EDITS)
def test_parse_chain_near_valid(analysis, obj, edit):
    _check_chain(_chain_text(analysis, dumps(obj), edit))


@FEW
@given(st.binary(max_size=200) | PY_JUNK)
def test_parse_chain_non_text(value):
    _check_chain_value = typed(protocol.parse_chain, value)
    if not isinstance(value, str):
        assert isinstance(_check_chain_value, ChainParseError)


@FEW
@given(st.integers(1, 10), st.integers(1, 10), st.sampled_from([JSON_START, JSON_END, "[The End of Response 1]"]))
def test_valid_chain_parses_to_its_numbers(s1, s2, marker):
    # A marker inside the *analysis* (PART 1) does not change which block is parsed.
    text = _chain_text(f"thinking {marker} done", dumps({"better_response": {"response_1": s1, "response_2": s2}}),
                       "none")
    assert protocol.parse_chain(text).final_scores == (float(s1), float(s2))


# -- record models --------------------------------------------------------------------------

VALID_USER = {
    "user_id": "alice",
    "history": [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, {"prompt": "p2", "chosen": "c2", "rejected": "r2"}],
    "stated_preferences": "short answers",
    "persona": None,
}
_chain = protocol.parse_chain(_chain_text("analysis", dumps(VALID_OBJECT), "none"))
VALID_RESULT = orjson.loads(CompareResult(
    preferred="a", score_a=7.6, score_b=4.2, chains=[_chain],
    samples=[{"kind": "self", "user_id": "alice", "seed": 3, "swapped": False, "n_tokens": 100, "chain": _chain,
              "score_a": 7.6, "score_b": 4.2},
             {"kind": "neighbor", "user_id": "bob", "seed": 4, "swapped": True, "n_tokens": 400,
              "error": "no <JSON_START> marker"}],
    n_parsed=1, n_failed=1, seed=3, n_samples=1, n_neighbors=1,
    neighbors=[{"user_id": "bob", "similarity": 0.9, "score_a": None, "score_b": None}],
    context_policy=["x"], notes=["y"]).to_json())


def _check_record(cls, data) -> None:
    out = typed(cls.from_json, data)
    if isinstance(out, PgenrmError):
        assert isinstance(out, RecordError)
    else:
        assert cls.from_json(out.to_json()) == out


def test_valid_records_round_trip():
    assert UserProfile.from_json(orjson.dumps(VALID_USER)).user_id == "alice"
    res = CompareResult.from_json(orjson.dumps(VALID_RESULT))
    assert CompareResult.from_json(res.to_json()) == res


@FAST
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_records_from_arbitrary_bytes(data):
    _check_record(UserProfile, data)
    _check_record(CompareResult, data)


@FAST
@given(mutated(VALID_USER))
def test_user_profile_near_valid(obj):
    _check_record(UserProfile, dumps(obj))
    out = typed(UserProfile.validate_obj, obj)
    assert isinstance(out, (UserProfile, RecordError))


@FAST
@given(mutated(VALID_RESULT))
def test_compare_result_near_valid(obj):
    _check_record(CompareResult, dumps(obj))


@FAST
@given(mutated({"prompt": "p", "chosen": "c", "rejected": "r"}, junk=PY_JUNK))
def test_preference_construction_near_valid(obj):
    assume(isinstance(obj, dict) and all(isinstance(k, str) for k in obj))
    out = typed(Preference, **obj)
    assert isinstance(out, (Preference, RecordError))
    out = typed(UserProfile, user_id="u", history=[obj])
    assert isinstance(out, (UserProfile, RecordError))


@FEW
@given(st.sampled_from(["prompt", "chosen", "rejected", "user_id", "stated_preferences", "persona"]))
def test_record_size_limits_are_typed(field):
    big = "x" * (MAX_TEXT_CHARS + 1)
    if field in ("prompt", "chosen", "rejected"):
        make = dict(user_id="u", history=[{"prompt": "p", "chosen": "c", "rejected": "r", field: big}])
    else:
        make = {"user_id": "u", field: big}
    with pytest.raises(RecordError, match=field):
        UserProfile(**make)
    with pytest.raises(RecordError, match=field):
        UserProfile.from_json(orjson.dumps(make))


def test_history_pair_limit_is_typed():
    pairs = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * (MAX_HISTORY_PAIRS + 1)
    with pytest.raises(RecordError, match="history"):
        UserProfile.from_json(orjson.dumps({"user_id": "u", "history": pairs}))
    with pytest.raises(RecordError, match="history"):
        UserProfile(user_id="u", history=pairs)


def test_deeply_nested_json_is_typed(scratch):
    for text in (DEEP_JSON, '{"a":' * 1020 + "1" + "}" * 1020, "[" * 5000):
        assert isinstance(typed(UserProfile.from_json, text), RecordError)
        assert isinstance(typed(CompareResult.from_json, text), RecordError)
        assert isinstance(typed(protocol.parse_chain, f"x{JSON_START}{text}{JSON_END}"), ChainParseError)
        _check_manifest(scratch, text.encode())
        (scratch / "deep.jsonl").write_text(text + "\n")
        assert isinstance(typed(load_rows, scratch / "deep.jsonl"), DataFormatError)
    assert isinstance(typed(UserProfile.validate_obj, {"user_id": "u", "history": DEEP}), RecordError)
    assert isinstance(typed(UserProfile, user_id=DEEP), RecordError)


# -- manifest -------------------------------------------------------------------------------

VALID_MANIFEST = {
    "schema_version": 1,
    "files": [{"path": "model.gguf", "sha256": "ab" * 32, "size": 10},
              {"path": "embedder/model.onnx", "sha256": "cd" * 32, "size": 5},
              {"path": "embedder/tokenizer.json", "sha256": "ef" * 32, "size": 5}],
    "llm": {"file": "model.gguf", "architecture": "llama", "context_length": 2048, "has_chat_template": True},
    "template": protocol.default_template().to_dict(),
    "embedder": {"dir": "embedder", "model_file": "model.onnx", "tokenizer_file": "tokenizer.json",
                 "dimension": 384, "pooling": "mean", "normalized": True, "max_length": 256},
    "prototypes": {"count": 2, "n_members": 4, "dimension": 384, "centroids_file": "p/c.npy",
                   "members_index_file": "p/m.bin", "members_file": "p/m.jsonl", "assignments_file": "p/a.npy",
                   "ef": 64, "persona_source": "history", "members_carry": "history"},
    "defaults": {"max_tokens": 600, "analysis_chars": [20, 240], "max_criteria": 3, "temperature": 1.0},
}
PATHS = st.sampled_from(["../x", "a/../../x", "/etc/passwd", "a\x00b", "a\\..\\b", "", ".", "a" * 5000,
                         "/".join(["a" * 200] * 30), "\ud800", "C:/x", "~/x", "a//b", "./model.gguf"])


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def _check_manifest(root: Path, payload: bytes) -> None:
    (root / MANIFEST).write_bytes(payload)
    out = typed(read_manifest, root)
    if isinstance(out, PgenrmError):
        assert isinstance(out, BundleError)
        return
    assert isinstance(out, Manifest)
    # The recommended options are untrusted too: the Scorer takes them only if well-typed.
    opts = typed(ScorerOptions.manifest_defaults, out.defaults)
    assert isinstance(opts, (dict, BundleError))
    if isinstance(opts, dict) and "template" not in opts:
        assert isinstance(typed(Template.from_dict, out.template), (Template, ConfigError))


@FAST
@given(mutated(VALID_MANIFEST))
def test_manifest_near_valid(scratch, obj):
    _check_manifest(scratch, dumps(obj).encode("utf-8"))


@FEW
@given(st.binary(max_size=300))
def test_manifest_arbitrary_bytes(scratch, data):
    _check_manifest(scratch, data)


@FAST
@given(st.sampled_from(["files", "llm", "embedder", "prototypes"]), PATHS)
def test_manifest_hostile_paths(scratch, where, path):
    obj = copy.deepcopy(VALID_MANIFEST)
    if where == "files":
        obj["files"][0]["path"] = path
    elif where == "llm":
        obj["llm"]["file"] = path
    elif where == "embedder":
        obj["embedder"]["dir"] = path
    else:
        obj["prototypes"]["members_index_file"] = path
    _check_manifest(scratch, dumps(obj).encode("utf-8"))


@pytest.mark.parametrize("defaults", [
    {"analysis_chars": 5}, {"analysis_chars": [1]}, {"analysis_chars": ["a", "b"]}, {"max_tokens": "600"},
    {"max_tokens": 1.5}, {"max_tokens": True}, {"max_tokens": 2 ** 40}, {"temperature": None},
    {"top_p": "high"}, {"c_self": [1]}, {"history_pairs": {"a": 1}},
])
def test_manifest_recommended_options_of_the_wrong_type(defaults):
    with pytest.raises(BundleError, match=next(iter(defaults))):
        ScorerOptions.manifest_defaults(defaults)


def test_manifest_recommended_options_accepted():
    opts = ScorerOptions.manifest_defaults({"max_tokens": 600, "analysis_chars": [20, 240], "temperature": 0.7,
                                   "c_self": 1, "unknown_future_option": {"x": 1}})
    assert opts == {"max_tokens": 600, "analysis_chars": (20, 240), "temperature": 0.7, "c_self": 1}


# -- templates ------------------------------------------------------------------------------

VALID_TEMPLATE = protocol.default_template().to_dict()


@FAST
@given(mutated(VALID_TEMPLATE, junk=PY_JUNK))
def test_template_near_valid(obj):
    out = typed(Template.from_dict, obj)
    if isinstance(out, PgenrmError):
        assert isinstance(out, ConfigError)
        return
    user = UserProfile(user_id="u", history=[Preference(prompt="q", chosen="c", rejected="r")],
                       stated_preferences="s")
    msgs = typed(protocol.render_messages, user, "Q", "R1", "R2", template=out)
    assert isinstance(msgs, list) and len(msgs) == 2


@FAST
@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
def test_template_text_is_substitution_only(before, middle, after):
    # Whatever surrounds the placeholders (Jinja syntax, braces, markers) comes out verbatim.
    assume(not protocol._PLACEHOLDER.search(before + middle + after))
    t = dict(VALID_TEMPLATE, user=before + "{{query}}" + middle + "{{response_1}}{{response_2}}" + after)
    out = typed(Template.from_dict, t)
    if isinstance(out, PgenrmError):
        assert isinstance(out, ConfigError)  # the free text held a placeholder-like {{word}}
        return
    msgs = protocol.render_messages(UserProfile(user_id="u"), "Q", "R1", "R2", template=out)
    assert msgs[1]["content"] == before + "Q" + middle + "R1R2" + after


# -- PersonalRewardBench loader --------------------------------------------------------------

VALID_ROW = {
    "user_id": "u1",
    "context": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "and now?"}],
    "chosen": {"role": "assistant", "content": "good"},
    "rejected": {"role": "assistant", "content": "bad"},
    "split": "train",
    "chosen_score": 5,
    "conversation_id": "c1",
}


def _check_row(obj) -> None:
    out = typed(parse_row, obj, path="mem", line=1)
    if isinstance(out, PgenrmError):
        assert isinstance(out, DataFormatError) and out.path == "mem" and out.line == 1
        return
    assert isinstance(typed(out.as_preference), (Preference, RecordError))
    assert isinstance(typed(users_from_rows, [out]), (dict, RecordError))


@FAST
@given(mutated(VALID_ROW, junk=PY_JUNK))
def test_parse_row_near_valid(obj):
    _check_row(obj)


@FEW
@given(PY_JUNK)
def test_parse_row_arbitrary(obj):
    _check_row(obj)


HOSTILE_FIELDS = [
    ("user_id", 10 ** 5000), ("user_id", True), ("user_id", ""), ("user_id", "u" * 257), ("user_id", DEEP),
    ("conversation_id", 10 ** 5000), ("conversation_id", DEEP), ("split", DEEP), ("split", "x" * 10_000),
    ("context", [{"role": DEEP, "content": "x"}]), ("context", [{"role": "user", "content": DEEP}]),
    ("context", []), ("context", "just text"), ("chosen", DEEP), ("chosen", {"content": 10 ** 5000}),
]


@pytest.mark.parametrize("field, value", HOSTILE_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(HOSTILE_FIELDS)])
def test_parse_row_hostile_fields(field, value):
    with pytest.raises(DataFormatError) as info:
        parse_row({**VALID_ROW, field: value}, path="mem", line=7)
    assert info.value.field.startswith(field) and info.value.line == 7
    assert len(str(info.value)) < 500


@FEW
@given(st.sampled_from(["context", "chosen", "rejected", "chosen_str", "user_id"]))
def test_loader_size_limits(field):
    row = copy.deepcopy(VALID_ROW)
    big = "x" * (MAX_TEXT_CHARS + 1)
    if field == "context":
        row["context"][0]["content"] = big
    elif field == "chosen_str":
        row["chosen"] = big
    elif field == "user_id":
        row["user_id"] = big
    else:
        row[field]["content"] = big
    with pytest.raises(DataFormatError, match="longer than|characters"):
        parse_row(row, path="mem", line=1)


def _write(path: Path, lines: list[bytes], gz: bool) -> None:
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


@FAST
@given(mutated(VALID_ROW), st.integers(0, 3), st.booleans())
def test_load_rows_one_near_valid_line(scratch, obj, position, gz):
    valid = orjson.dumps(VALID_ROW)
    lines = [valid] * 3
    lines.insert(position, dumps(obj).encode("utf-8"))
    path = scratch / ("rows.jsonl.gz" if gz else "rows.jsonl")
    _write(path, lines, gz)
    out = typed(load_rows, path)
    if isinstance(out, PgenrmError):
        assert isinstance(out, DataFormatError)
        assert out.line == position + 1, f"error blamed on line {out.line}, the bad line is {position + 1}"
        assert str(path) in str(out)
    else:
        assert len(out) == 4
        assert isinstance(typed(users_from_rows, out), (dict, RecordError))


@FAST
@given(st.lists(st.binary(max_size=60), max_size=5), st.sampled_from(["rows.jsonl", "rows.json", "rows.jsonl.gz"]))
def test_load_rows_arbitrary_lines(scratch, lines, name):
    path = scratch / name
    _write(path, [line.replace(b"\n", b" ") for line in lines], name.endswith(".gz"))
    out = typed(load_rows, path)
    assert isinstance(out, (list, DataFormatError))


@FEW
@given(st.integers(0, 200), st.integers(0, 255), st.booleans())
def test_load_rows_corrupted_gzip(scratch, offset, byte, truncate):
    data = gzip.compress(b"".join(orjson.dumps(VALID_ROW) + b"\n" for _ in range(20)), mtime=0)
    offset = min(offset, len(data) - 1)
    if truncate:
        data = data[:offset]
    else:
        data = data[:offset] + bytes([byte]) + data[offset + 1:]
    path = scratch / "corrupt.jsonl.gz"
    path.write_bytes(data)
    out = typed(load_rows, path)
    assert isinstance(out, (list, DataFormatError))


@FEW
@given(mutated([VALID_ROW, VALID_ROW]))
def test_load_rows_json_list_near_valid(scratch, obj):
    path = scratch / "rows.json"
    path.write_text(dumps(obj))
    out = typed(load_rows, path)
    assert isinstance(out, (list, DataFormatError))


def test_loader_missing_file_and_directory(scratch):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_rows(scratch / "nope.jsonl")
    (scratch / "adir.jsonl").mkdir(exist_ok=True)
    with pytest.raises(DataFormatError):
        load_rows(scratch / "adir.jsonl")
