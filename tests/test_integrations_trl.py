"""The TRL reward function: called exactly as GRPOTrainer calls it (on the FakeEngine, whose chains
are drawn from the prompt, so a reward for the wrong user or completion would differ from the
direct call), and real GRPO steps on the tiny model and on SmolLM2."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
from conftest import ALICE, BOB, require

from pgenrm_lite import ConfigError, Scorer, UserProfile
from pgenrm_lite.group_rewards import bradley_terry
from pgenrm_lite.integrations.trl import completion_response, prompt_query, reward_function

PROFILES = {"alice": ALICE, "bob": BOB}


class _State:
    """Stands in for transformers.TrainerState where transformers is absent (the function ignores it)."""
    global_step = 0


def _trainer_state():
    if importlib.util.find_spec("transformers") is not None:
        from transformers import TrainerState

        return TrainerState()
    return _State()


def call_like_grpo_trainer(func, prompts, completions, columns, metrics=None):
    """What trl's GRPOTrainer._calculate_rewards does (trl 1.16): every dataset column except
    prompt/completion/completion_ids as a list, plus trainer_state, log_extra and log_metric."""
    metrics = {} if metrics is None else metrics
    reward_kwargs = dict(columns)
    reward_kwargs["trainer_state"] = _trainer_state()
    reward_kwargs["log_extra"] = lambda column, values: None
    reward_kwargs["log_metric"] = lambda name, value: metrics.setdefault(name, []).append(value)
    completion_ids = [[1, 2, 3] for _ in completions]
    out = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
    out = [r if r is not None else math.nan for r in out]  # as the trainer does
    assert len(out) == len(prompts)
    return out


def _same(a, b):
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b)) and len(a) == len(b)


def test_standard_format_groups_completions_of_one_prompt(fake_scorer):
    func = reward_function(fake_scorer, PROFILES)
    assert func.__name__ == "pgenrm_reward"
    # GRPO repeats each prompt num_generations times, consecutively (RepeatSampler).
    prompts = ["How do I reverse a string?"] * 2 + ["Name a colour"] * 2
    completions = ["Use s[::-1].", "Strings are sequences.", "Teal.", "Blue, the colour of the sky."]
    metrics: dict = {}
    got = call_like_grpo_trainer(func, prompts, completions, {"user_id": ["alice", "alice", "bob", "bob"],
                                                              "other_column": [1, 1, 2, 2]}, metrics)
    assert all(0 <= r <= 10 for r in got)
    assert _same(got[:2], fake_scorer.score(ALICE, prompts[0], completions[:2]))
    assert _same(got[2:], fake_scorer.score(BOB, prompts[2], completions[2:]))
    assert metrics["pgenrm/unknown_user_fraction"] == [0.0]
    assert metrics["pgenrm/no_reward_fraction"] == [0.0]


def test_conversational_format_uses_last_user_turn_and_assistant_content(fake_scorer):
    func = reward_function(fake_scorer, PROFILES)
    prompt = [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "How do I reverse a string?"}]
    completions = [[{"role": "assistant", "content": "Use s[::-1]."}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "Loop backwards."}]}],
                   [{"role": "assistant", "content": "No idea."}]]
    got = call_like_grpo_trainer(func, [prompt] * 3, completions, {"user_id": ["alice"] * 3})
    assert prompt_query(prompt) == "How do I reverse a string?"
    assert completion_response(completions[1]) == "Loop backwards."
    expected = fake_scorer.score(ALICE, "How do I reverse a string?", ["Use s[::-1].", "Loop backwards.", "No idea."])
    assert _same(got, expected)


def test_unknown_users_get_none_or_the_non_personalised_judge(fake_scorer):
    prompts = ["Q?"] * 2
    completions = ["yes", "no"]
    metrics: dict = {}
    none = call_like_grpo_trainer(reward_function(fake_scorer, PROFILES), prompts, completions,
                                  {"user_id": ["carol", "carol"]}, metrics)
    assert all(math.isnan(r) for r in none)
    assert metrics["pgenrm/unknown_user_fraction"] == [1.0] and metrics["pgenrm/no_reward_fraction"] == [1.0]
    generic = call_like_grpo_trainer(reward_function(fake_scorer, PROFILES, fallback="unpersonalised"), prompts,
                                     completions, {"user_id": ["carol", "carol"]})
    assert _same(generic, fake_scorer.score(UserProfile(user_id="carol"), "Q?", completions))
    # no user column at all: the non-personalised judge, or a clear error
    assert len(call_like_grpo_trainer(reward_function(fake_scorer, [ALICE], fallback="unpersonalised"), prompts,
                                      completions, {})) == 2
    with pytest.raises(ConfigError, match="no 'user_id' column"):
        call_like_grpo_trainer(reward_function(fake_scorer, PROFILES), prompts, completions, {})


def test_lonely_completion_uses_the_reference_column_or_gets_none(fake_scorer):
    prompts = ["How do I reverse a string?"]
    without = call_like_grpo_trainer(reward_function(fake_scorer, PROFILES), prompts, ["Use s[::-1]."],
                                     {"user_id": ["alice"]})
    assert math.isnan(without[0])
    func = reward_function(fake_scorer, PROFILES, reference_key="reference")
    got = call_like_grpo_trainer(func, prompts, ["Use s[::-1]."], {"user_id": ["alice"], "reference": ["reversed(s)"]})
    assert got[0] == fake_scorer.score(ALICE, prompts[0], ["Use s[::-1].", "reversed(s)"])[0]


def test_large_groups_split_evenly(fake_scorer):
    func = reward_function(fake_scorer, PROFILES, max_group=2)
    completions = ["a", "b", "c", "d"]
    got = call_like_grpo_trainer(func, ["Q?"] * 4, completions, {"user_id": ["bob"] * 4})
    assert _same(got, fake_scorer.score(BOB, "Q?", ["a", "b"]) + fake_scorer.score(BOB, "Q?", ["c", "d"]))


def test_bad_arguments(fake_scorer):
    with pytest.raises(ConfigError, match="fallback"):
        reward_function(fake_scorer, PROFILES, fallback="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_group"):
        reward_function(fake_scorer, PROFILES, max_group=1)
    with pytest.raises(ConfigError, match="UserProfile"):
        reward_function(fake_scorer, {"x": {"user_id": "x"}})
    func = reward_function(fake_scorer, PROFILES)
    with pytest.raises(ConfigError, match="one prompt per completion"):
        func(prompts=["a"], completions=["x", "y"], user_id=["alice", "alice"])


# -- one real GRPOTrainer step ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_one_real_grpo_step(tmp_path, scorer, conversational):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub
    for module in ("trl", "datasets", "torch", "transformers"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not importable: install the trl extra (pip install -e '.[trl]')")
    from datasets import Dataset
    from tiny_models import build_tiny_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    checkpoint = build_tiny_checkpoint(tmp_path / "policy", "llama")
    inner = reward_function(scorer, PROFILES)
    calls = []

    def pgenrm_reward(**kwargs):  # records what the trainer passed, then scores
        calls.append(kwargs)
        return inner(**kwargs)

    def prompt(text):
        return [{"role": "user", "content": text}] if conversational else text

    ds = Dataset.from_list([{"prompt": prompt("How do I sort a list?"), "user_id": "alice"},
                            {"prompt": prompt("Name a colour"), "user_id": "bob"}])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=8, use_cpu=True, bf16=False, report_to=[],
                      logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(checkpoint), reward_funcs=pgenrm_reward, args=args, train_dataset=ds)
    trainer.train()

    assert trainer.state.global_step == 1
    assert len(calls) == 1
    call = calls[0]
    assert len(call["prompts"]) == len(call["completions"]) == 4
    assert sorted(call["user_id"]) == ["alice", "alice", "bob", "bob"]
    assert "trainer_state" in call and "completion_ids" in call
    if conversational:
        assert call["completions"][0][0]["role"] == "assistant"
    else:
        assert isinstance(call["completions"][0], str)
    logged = trainer.state.log_history[0]
    mean = logged["rewards/pgenrm_reward/mean"]
    assert math.isfinite(mean) and 0 <= mean <= 10
    assert logged["pgenrm/unknown_user_fraction"] == 0.0


@pytest.mark.slow
def test_grpo_step_with_bradley_terry_rewards_on_smollm2(tmp_path, default_bundle):
    """A real GRPOTrainer step rewarded by the real SmolLM2 bundle with group_reward="bradley_terry":
    one group of four completions, six pairs judged in one batch, strengths fitted to the verdicts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for module in ("trl", "datasets", "torch", "transformers"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not importable: install the trl extra (pip install -e '.[trl]')")
    from datasets import Dataset
    from tiny_models import build_tiny_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    checkpoint = build_tiny_checkpoint(tmp_path / "policy", "llama")
    with Scorer.from_bundle(default_bundle, n_samples=1, n_threads=2, seed=3) as scorer:
        inner = reward_function(scorer, PROFILES, group_reward="bradley_terry")
        calls, returned = [], []

        def pgenrm_reward(**kwargs):
            calls.append(kwargs)
            returned.append(inner(**kwargs))
            return returned[-1]

        ds = Dataset.from_list([{"prompt": "How do I sort a list?", "user_id": "alice"}] * 2)
        args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                          num_generations=4, max_completion_length=8, use_cpu=True, bf16=False, report_to=[],
                          logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=str(checkpoint), reward_funcs=pgenrm_reward, args=args, train_dataset=ds)
        trainer.train()

        assert trainer.state.global_step == 1 and len(calls) == 1
        rewards = returned[0]
        completions = [completion_response(c) for c in calls[0]["completions"]]
        assert len(rewards) == 4
        # The same group scored directly, same seed: the same strengths, fitted to the six pairs' verdicts.
        group = scorer.score_group(ALICE, "How do I sort a list?", completions, method="bradley_terry")
    assert group.method == "bradley_terry" and len(group.pairs) == 6 and len(group.comparisons) == 6
    expected = [None if math.isnan(r) else r for r in group.rewards]
    assert rewards == pytest.approx(expected, nan_ok=True)
    assert group.n_pairs_parsed >= 4, "the grammar-constrained SmolLM2 chains should mostly parse"
    parsed = [r for r in rewards if r is not None]
    if len(parsed) == 4:
        assert abs(sum(parsed)) < 1e-6  # centred within the group
    # The strengths are the fit to these verdicts (a complete round robin ranks by total wins).
    outcomes = [(i, j, y) for (i, j), y in zip(group.pairs, group.win_share) if y is not None]
    assert group.rewards == pytest.approx(bradley_terry(4, outcomes)[0], nan_ok=True)
    if len(outcomes) == 6:
        wins = [sum(y if i == k else 1 - y for i, j, y in outcomes if k in (i, j)) for k in range(4)]
        ranked = sorted(range(4), key=lambda k: group.rewards[k])
        assert [wins[k] for k in ranked] == sorted(wins)
    print(f"BT rewards {[round(r, 3) for r in group.rewards]}, win shares {group.win_share}")
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["pgenrm/reward_stderr_mean"]) and logged["pgenrm/reward_stderr_mean"] > 0
