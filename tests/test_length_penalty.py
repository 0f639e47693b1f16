"""The length-penalty baseline: the reward formula, its settings check, and the registered reward manager."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl import DataProto

import l2t_verl
from l2t_verl.length_penalty import (
    LengthPenaltyConfig,
    LengthPenaltyConfigError,
    LengthPenaltyRewardManager,
    check_length_penalty,
    length_penalized_reward,
)
from l2t_verl.settings import L2TConfigError

# ------------------------------------------------------------------------------------------- the formula


@pytest.mark.parametrize(
    "outcome, length, correct_only, reward, penalty",
    [
        (1.0, 0, True, 1.0, 0.0),  # an empty correct answer pays nothing
        (1.0, 500, True, 0.9, 0.1),  # half the budget: coef/2
        (1.0, 1000, True, 0.8, 0.2),  # the whole budget: coef
        (1.0, 4000, True, 0.8, 0.2),  # past the budget: clipped at coef
        (0.0, 500, True, 0.0, 0.0),  # wrong answers are not paid for being short
        (0.5, 500, True, 0.45, 0.05),  # a fractional score is scaled, not shifted
        (0.0, 500, False, -0.1, 0.1),  # the plain linear cost r_out - coef * L / L_max
        (1.0, 250, False, 0.95, 0.05),
    ],
)
def test_reward_matches_the_formula(outcome, length, correct_only, reward, penalty):
    got_reward, got_penalty = length_penalized_reward(outcome, length, 1000, 0.2, correct_only=correct_only)
    assert got_reward == pytest.approx(reward, abs=1e-12)
    assert got_penalty == pytest.approx(penalty, abs=1e-12)
    assert got_reward == pytest.approx(outcome - got_penalty, abs=1e-12)


@pytest.mark.parametrize("correct_only", [True, False])
def test_shorter_correct_answers_score_higher_and_never_below_a_wrong_one(correct_only):
    lengths = range(0, 1201, 50)
    right = [length_penalized_reward(1.0, n, 1000, 0.5, correct_only)[0] for n in lengths]
    wrong = [length_penalized_reward(0.0, n, 1000, 0.5, correct_only)[0] for n in lengths]
    assert all(a >= b for a, b in zip(right, right[1:], strict=False))
    assert right[0] > right[-1]
    assert min(right) >= max(wrong)


def test_zero_coef_is_the_outcome_reward():
    assert length_penalized_reward(1.0, 700, 1000, 0.0) == (1.0, 0.0)
    assert length_penalized_reward(0.0, 700, 1000, 0.0, correct_only=False) == (0.0, 0.0)


@pytest.mark.parametrize("length, max_length", [(-1, 10), (5, 0)])
def test_impossible_lengths_are_errors(length, max_length):
    with pytest.raises(ValueError):
        length_penalized_reward(1.0, length, max_length, 0.2)


# ------------------------------------------------------------------------------------------- settings


def trainer_config(**length_penalty) -> dict:
    return {
        "reward": {"reward_manager": {"source": "register", "name": "length_penalty"}},
        "data": {"max_response_length": 16384},
        "length_penalty": length_penalty,
    }


def test_max_length_defaults_to_the_response_budget():
    assert check_length_penalty(trainer_config()) == LengthPenaltyConfig(0.2, 16384, True)
    assert check_length_penalty(trainer_config(max_length=100, coef=0.5)).max_length == 100


@pytest.mark.parametrize(
    "values, key",
    [
        ({"coef": -0.1}, "length_penalty.coef"),
        ({"coef": 1.5}, "length_penalty.coef"),
        ({"coef": True}, "length_penalty.coef"),
        ({"coef": "0.2"}, "length_penalty.coef"),
        ({"max_length": 0}, "length_penalty.max_length"),
        ({"max_length": 1.5}, "length_penalty.max_length"),
        ({"correct_only": "yes"}, "length_penalty.correct_only"),
        ({"coeff": 0.1}, "length_penalty.coeff"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_key(values, key):
    with pytest.raises(LengthPenaltyConfigError) as info:
        check_length_penalty(trainer_config(**values))
    message = str(info.value)
    assert message.startswith(key + " ") and "\n" not in message
    assert isinstance(info.value, L2TConfigError)  # main.py reports both kinds the same way


def test_settings_are_ignored_unless_the_manager_is_selected():
    config = trainer_config(coef=5.0)
    config["reward"]["reward_manager"]["name"] = "naive"
    assert check_length_penalty(config) is None


def test_start_up_check_is_wired_into_main():
    """algo=length_penalty composes, and main.prepare_config stops a bad coef before anything starts."""
    from l2t_verl.main import prepare_config

    config_dir = os.path.join(os.path.dirname(l2t_verl.__file__), "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        good = compose("l2t_trainer", overrides=["algo=length_penalty"])
        bad = compose("l2t_trainer", overrides=["algo=length_penalty", "length_penalty.coef=2"])
    assert good.algorithm.adv_estimator == "grpo" and good.reward.reward_manager.name == "length_penalty"
    assert check_length_penalty(good) == LengthPenaltyConfig(0.2, good.data.max_response_length, True)
    with pytest.raises(LengthPenaltyConfigError, match=r"^length_penalty\.coef must be"):
        prepare_config(bad)


# ------------------------------------------------------------------------------------- reward manager


def test_registered_and_resolved_by_verl():
    from verl.trainer.ppo.reward import resolve_reward_manager_cls

    config = OmegaConf.create(
        {"reward": {"reward_manager": {"source": "register", "name": "length_penalty"}}}
    )
    assert resolve_reward_manager_cls(config) is LengthPenaltyRewardManager


def one_row(tokenizer, text: str, pad: int = 3) -> DataProto:
    """One right-padded response as verl lays it out; ground truth 42 on the arithmetic verifier."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    width = len(ids) + pad
    response = torch.zeros(1, width, dtype=torch.long)
    response[0, : len(ids)] = torch.tensor(ids)
    mask = torch.zeros(1, width, dtype=torch.long)
    mask[0, : len(ids)] = 1
    batch = TensorDict(
        {
            "prompts": torch.ones(1, 4, dtype=torch.long),
            "responses": response,
            "attention_mask": torch.cat([torch.ones(1, 4, dtype=torch.long), mask], dim=1),
        },
        batch_size=1,
    )
    non_tensor = {
        "data_source": np.array(["l2t_arith"], dtype=object),
        "reward_model": np.array([{"style": "rule", "ground_truth": "42"}], dtype=object),
        "extra_info": np.array([{"index": 0}], dtype=object),
    }
    return DataProto(batch=batch, non_tensor_batch=non_tensor)


def manager(tokenizer, compute_score=None, **length_penalty) -> LengthPenaltyRewardManager:
    config = OmegaConf.create(trainer_config(**length_penalty))
    return LengthPenaltyRewardManager(config=config, tokenizer=tokenizer, compute_score=compute_score)


async def test_run_single_subtracts_the_length_cost_of_the_valid_tokens(tiny_tokenizer):
    text = "The answer is \\boxed{42}."
    n = len(tiny_tokenizer.encode(text, add_special_tokens=False))
    out = await manager(tiny_tokenizer, coef=0.5, max_length=4 * n).run_single(one_row(tiny_tokenizer, text))
    # padding tokens are not counted: L = n, so the cost is 0.5 * n / (4n)
    assert out["reward_score"] == pytest.approx(1.0 - 0.125)
    info = out["reward_extra_info"]
    assert info["acc"] == 1.0 and info["l2t_verifier_error"] == 0
    assert info["length_penalty"] == pytest.approx(0.125) and info["response_length"] == n
    assert set(info) == {"acc", "l2t_outcome", "l2t_verifier_error", "length_penalty", "response_length"}


async def test_wrong_answers_and_verifier_failures_keep_the_same_keys(tiny_tokenizer):
    wrong = await manager(tiny_tokenizer, coef=0.5, max_length=8).run_single(
        one_row(tiny_tokenizer, "The answer is \\boxed{7}.")
    )
    assert wrong["reward_score"] == 0.0 and wrong["reward_extra_info"]["length_penalty"] == 0.0

    def crashing(**kwargs):
        raise RuntimeError("verifier blew up")

    failed = await manager(tiny_tokenizer, crashing, coef=0.5, correct_only=False, max_length=8).run_single(
        one_row(tiny_tokenizer, "\\boxed{42}")
    )
    info = failed["reward_extra_info"]
    assert info["l2t_verifier_error"] == 1 and info["acc"] == 0.0
    assert failed["reward_score"] == pytest.approx(-info["length_penalty"]) and info["length_penalty"] > 0
    assert set(info) == set(wrong["reward_extra_info"])


def test_manager_rejects_bad_settings_too(tiny_tokenizer):
    with pytest.raises(LengthPenaltyConfigError, match=r"^length_penalty\.coef"):
        manager(tiny_tokenizer, coef=-1)
