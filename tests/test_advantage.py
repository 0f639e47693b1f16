"""The ``l2t`` advantage estimator (L2T_SPEC.md section 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn

from l2t_verl.advantage import compute_l2t_advantage
from l2t_verl.rewards import dense_token_rewards


def _random_batch(seed: int, group_sizes: list[int], width: int = 9):
    """Outcome-only batch: r_out on each row's last valid token, variable lengths incl. 0."""
    gen = torch.Generator().manual_seed(seed)
    batch = sum(group_sizes)
    index = np.array([f"uid-{g}" for g, size in enumerate(group_sizes) for _ in range(size)], dtype=object)
    lengths = torch.randint(0, width + 1, (batch,), generator=gen)
    lengths[0] = width
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    outcome = torch.randint(0, 2, (batch,), generator=gen).float() * torch.rand(batch, generator=gen) * 3 - 1
    outcome = torch.where(lengths > 0, outcome, torch.zeros_like(outcome))
    rewards = torch.zeros(batch, width)
    rows = lengths > 0
    rewards[rows, lengths[rows] - 1] = outcome[rows]
    return rewards, mask, index, outcome


@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize(
    ("seed", "group_sizes"), [(0, [4, 4]), (1, [1, 3, 1, 5]), (2, [1]), (3, [2, 1, 8]), (4, [1, 1, 1])]
)
def test_equals_verl_grpo_without_process_rewards(seed, group_sizes, norm_by_std):
    rewards, mask, index, outcome = _random_batch(seed, group_sizes)
    ref, ref_returns = compute_grpo_outcome_advantage(
        rewards.clone(), mask, index, norm_adv_by_std_in_grpo=norm_by_std
    )
    config = AlgoConfig(adv_estimator="l2t", norm_adv_by_std_in_grpo=norm_by_std)
    # As verl's trainer calls registered estimators: config, no norm_adv_by_std_in_grpo argument.
    adv, returns = compute_l2t_advantage(
        token_level_rewards=rewards, response_mask=mask, config=config, index=index, outcome_scores=outcome
    )
    assert torch.equal(adv, ref) and torch.equal(returns, ref_returns)
    # Without outcome_scores, an outcome-only batch is accepted and gives the same result.
    adv, _ = compute_l2t_advantage(rewards, mask, index, config=config)
    assert torch.equal(adv, ref)
    # The explicit argument wins over the config.
    adv, _ = compute_l2t_advantage(
        rewards, mask, index, config=config, norm_adv_by_std_in_grpo=not norm_by_std
    )
    ref_other, _ = compute_grpo_outcome_advantage(
        rewards.clone(), mask, index, norm_adv_by_std_in_grpo=not norm_by_std
    )
    assert torch.equal(adv, ref_other)


def test_process_part_is_whitened_return_to_go():
    alpha = 0.8
    # Row 0: 5 tokens, episodes end at tokens 2 and 4 (exclusive), r_out = 1.
    # Row 1: 3 valid tokens of 5, one episode ending at token 1, r_out = 0.
    rows = [
        dense_token_rewards(5, [2, 4], 1.0, [0.5, -0.25], alpha),
        torch.cat([dense_token_rewards(3, [1], 0.0, [1.0], alpha), torch.zeros(2)]),
    ]
    rewards = torch.stack(rows)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.float32)
    index = np.array(["a", "a"], dtype=object)
    adv, returns = compute_l2t_advantage(rewards, mask, index, outcome_scores=torch.tensor([1.0, 0.0]))

    # Return-to-go by hand (gamma = 1): 0.4 at t=1 and -0.2 at t=3 in row 0, 0.8 at t=0 in row 1.
    rtg = torch.tensor([[0.2, 0.2, -0.2, -0.2, 0.0], [0.8, 0.0, 0.0, 0.0, 0.0]])
    valid_values = rtg[mask.bool()]
    whitened = (rtg - valid_values.mean()) / torch.sqrt(valid_values.var(unbiased=True) + 1e-8)
    scores = torch.tensor([1.0, 0.0])
    outcome = (scores - scores.mean()) / (scores.std() + 1e-6)
    expected = (outcome[:, None] + whitened) * mask
    torch.testing.assert_close(adv, expected)
    assert torch.equal(adv, returns)
    assert torch.equal(adv[1, 3:], torch.zeros(2))  # padding stays exactly 0


def test_masked_tokens_are_zero_and_constant_process_is_zero():
    rewards = torch.tensor([[0.4, 0.0, 1.0, 7.0], [0.0, 0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    index = np.array([0, 1])
    adv, _ = compute_l2t_advantage(rewards, mask, index, outcome_scores=[0.6, 0.0])
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[~mask], torch.zeros(int((~mask).sum())))
    # Every valid token has return 0.4: nothing to whiten, the process part is exactly 0.
    rewards = torch.tensor([[0.0, 0.4], [0.4, 0.0]])
    adv, _ = compute_l2t_advantage(
        rewards, torch.tensor([[0, 1], [1, 0]]), np.array([0, 0]), outcome_scores=[0.0, 0.0]
    )
    assert torch.equal(adv, torch.zeros(2, 2))


def test_registered_with_verl():
    assert get_adv_estimator_fn("l2t") is compute_l2t_advantage


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"response_mask": torch.ones(2, 3)}, "response_mask"),
        ({"token_level_rewards": torch.zeros(2, 4, 1)}, "token_level_rewards"),
        ({"index": np.array([0, 0, 1])}, "index"),
        ({"index": None}, "index"),
        ({"outcome_scores": torch.zeros(3)}, "outcome_scores"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = {
        "token_level_rewards": torch.zeros(2, 4),
        "response_mask": torch.ones(2, 4),
        "index": np.array([0, 0]),
        "outcome_scores": torch.zeros(2),
    }
    with pytest.raises(ValueError, match=name):
        compute_l2t_advantage(**{**args, **kwargs})


def test_process_rewards_without_outcome_scores_is_an_error():
    rewards = torch.tensor([[0.4, 0.0, 1.0]])
    with pytest.raises(ValueError, match="outcome_scores"):
        compute_l2t_advantage(rewards, torch.ones(1, 3), np.array([0]))
