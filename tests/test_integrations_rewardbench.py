"""RewardBench-style verdicts, the RewardBench/profiles loaders and `eval --format rewardbench`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ALICE, FAST

from pgenrm_lite import CompareResult, DataFormatError, Scorer, UserProfile
from pgenrm_lite.datasets import NO_USER, load_profiles, load_rewardbench
from pgenrm_lite.integrations.rewardbench import judge_pair, result_value, rewardbench_score, verdict


def _result(preferred, a, b, n_parsed=1):
    return CompareResult(preferred=preferred, score_a=a, score_b=b, chains=[], n_parsed=n_parsed,
                         n_failed=1 - n_parsed, seed=0, n_samples=1, n_neighbors=0)


def test_verdicts_ties_are_errors():
    assert verdict(_result("a", 7.0, 3.0)) == "A"
    assert verdict(_result("b", 3.0, 7.0)) == "B"
    assert verdict(_result(None, 5.0, 5.0)) == "error"  # a tie
    assert verdict(_result(None, None, None, n_parsed=0)) == "error"  # nothing parsed
    assert [result_value(v) for v in ("A", "B", "error")] == [1.0, 0.0, 0.5]
    assert result_value("B", chosen="B") == 1.0
    assert rewardbench_score({"pairs": 4, "correct": 2, "ties": 1, "no_parse": 1}) == 0.75
    assert rewardbench_score({"pairs": 0}) is None


def test_judge_pair_is_the_verdict_of_compare(fake_engine, fake_gguf):
    with Scorer.from_gguf(fake_gguf, n_samples=3, n_ctx=4096, **FAST) as scorer:
        v = judge_pair(scorer, ALICE, "Reverse a string?", "s[::-1]", "No idea.", seed=5)
        res = scorer.compare(ALICE, "Reverse a string?", "s[::-1]", "No idea.", seed=5)
        assert v == verdict(res) and v in ("A", "B", "error")
        generic = judge_pair(scorer, None, "Reverse a string?", "s[::-1]", "No idea.", seed=5)
        assert generic == verdict(scorer.compare(UserProfile(user_id="(anonymous)"), "Reverse a string?",
                                                 "s[::-1]", "No idea.", seed=5))


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_rewardbench_rows(tmp_path):
    path = _write_jsonl(tmp_path / "rb.jsonl", [
        {"id": 30, "prompt": "Q1?", "chosen": "good", "rejected": "bad", "subset": "chat", "user": "alice"},
        {"prompt": [{"role": "user", "content": "Q2?"}], "chosen": {"role": "assistant", "content": "c"},
         "rejected": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "r"}], "user": ""},
        {"prompt": "Q3?", "chosen": "c", "rejected": "r", "user": 42},
    ])
    rows = load_rewardbench(path, user_column="user")
    assert [(r.user_id, r.prompt, r.chosen, r.rejected) for r in rows] == [
        ("alice", "Q1?", "good", "bad"), (NO_USER, "Q2?", "c", "r"), ("42", "Q3?", "c", "r")]
    assert rows[0].conversation_id == "30" and all(r.split == "test" for r in rows)
    assert all(r.user_id == NO_USER for r in load_rewardbench(path))  # no user column asked for
    (tmp_path / "list.json").write_text(json.dumps([{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    assert len(load_rewardbench(tmp_path / "list.json")) == 1


@pytest.mark.parametrize("row, fragment", [
    ({"prompt": "p", "chosen": "c"}, "missing field 'rejected'"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, "'prompt' must be a string"),
    ({"prompt": "p", "chosen": 1, "rejected": "r"}, "chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "user": ["x"]}, "'user'"),
    ("not an object", "JSON object"),
])
def test_bad_rewardbench_rows_name_file_line_and_field(tmp_path, row, fragment):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, row])
    with pytest.raises(DataFormatError, match=fragment) as info:
        load_rewardbench(path, user_column="user")
    assert "bad.jsonl" in str(info.value) and "2" in str(info.value)


def test_load_profiles_json_list_and_jsonl(tmp_path):
    bob = UserProfile(user_id="bob")
    (tmp_path / "p.json").write_text(json.dumps([json.loads(ALICE.to_json()), json.loads(bob.to_json())]))
    assert load_profiles(tmp_path / "p.json") == {"alice": ALICE, "bob": bob}
    (tmp_path / "p.jsonl").write_bytes(ALICE.to_json() + b"\n\n" + bob.to_json() + b"\n")
    assert load_profiles(tmp_path / "p.jsonl") == {"alice": ALICE, "bob": bob}
    (tmp_path / "dup.jsonl").write_bytes(ALICE.to_json() + b"\n" + ALICE.to_json() + b"\n")
    with pytest.raises(DataFormatError, match="appears twice"):
        load_profiles(tmp_path / "dup.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"user_id": "x", "history": "no"}\n')
    with pytest.raises(DataFormatError, match="UserProfile"):
        load_profiles(tmp_path / "bad.jsonl")


def test_cli_eval_rewardbench(tmp_path, fake_engine, fake_bundle, capsys):
    from pgenrm_lite.cli import main

    bundle = fake_bundle
    data = _write_jsonl(tmp_path / "rb.jsonl", [
        {"prompt": "Reverse a string?", "chosen": "s[::-1]", "rejected": "No idea.", "uid": "alice"},
        {"prompt": "Name a colour", "chosen": "Teal.", "rejected": "I cannot answer.", "uid": "stranger"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    ])
    profiles = tmp_path / "users.jsonl"
    profiles.write_bytes(ALICE.to_json() + b"\n")
    rc = main(["eval", str(data), "--format", "rewardbench", "--user-column", "uid", "--profiles", str(profiles),
               "--bundle", str(bundle), "--threads", "1", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    overall = report["overall"]
    assert overall["pairs"] == 3
    assert set(report["per_user"]) == {"alice", "stranger", NO_USER}
    assert overall["rewardbench_score"] == pytest.approx(rewardbench_score(overall))
    assert report["config"]["format"] == "rewardbench" and report["config"]["users_known"] == ["alice"]
    for summary in report["per_user"].values():
        assert 0 <= summary["rewardbench_score"] <= 1
    # the text report works too
    assert main(["eval", str(data), "--format", "rewardbench", "--bundle", str(bundle), "--threads", "1",
                 "--limit", "1"]) == 0
    assert "overall" in capsys.readouterr().out
